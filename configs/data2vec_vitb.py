"""EMA feature targets, data2vec-style (Baevski et al., ICML 2022), ViT-B/16 on ImageNet-1k.

Command:
  python main.py --config=configs/data2vec_vitb.py --workdir=W --config.data.data_dir=TFDS_DATA_DIR
  --config.targets.pixel_weight=1.0 --config.targets.feature_ramp_epochs=200 adds pixels back,
  BootMAE-style (its feature weight ramps over the first 25% of 800 epochs).
Data: `imagenet2012` as TFDS ArrayRecord (docs/data.md, "ImageNet").
Targets (methods.md §4.1): the EMA teacher on all patches; the mean over its top 6 of 12 blocks
  of the parameter-free-LayerNorm'd block outputs (before the final norm), LayerNorm'd again;
  regressed at masked positions with Smooth-L1 (beta 2), through a Dense(512 -> 768) feature head
  on the MAE decoder's output. EMA momentum constant 0.9998 (the released ViT-B command).
Optimization as released: 800 epochs, batch 2048, lr 2e-3 absolute (= blr 2.5e-4 x 2048/256),
  AdamW (0.9, 0.999), wd 0.05, 10 warmup epochs, cosine to 1e-5, gradient clipping 3.0.
  BEiT block masking of 120 of 196 patches (ratio 0.6122 -> 76 visible), min 16 per block.
Departures from the official data2vec (which is a BEiT model): our student is MAE-style, the
  encoder sees only the visible patches and the decoder adds mask tokens (data2vec puts mask
  tokens in the encoder and regresses with a linear head on it); fixed sin-cos positions instead
  of a shared relative position bias; no layer scale, no drop path; no pixel term by default.
Cost: 112,049,664 trainable parameters; 94.3 GFLOP per image per step (1.61x MAE: the teacher
  runs the encoder on all patches), plus the EMA copy.
Expected: not measured here; the official data2vec ViT-B reaches 84.2 fine-tuned (its student
  differs, see above).
"""
from mim import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.default_config()
  c.model.update(dict(variant='B', patch_size=16, feature_head=True))
  c.batch_size = 2048
  c.total_epochs = 800.0
  c.optim.update(dict(base_lr=2.5e-4, min_lr=1e-5, warmup_epochs=10.0, b2=0.999,
                      grad_clip_norm=3.0))
  c.masking.update(dict(name='block', ratio=0.6122))
  c.masking.block.min_patches = 16
  c.targets.update(dict(pixel_weight=0.0, feature_weight=1.0, feature_top_k=6,
                        feature_loss='smooth_l1', feature_beta=2.0))
  c.teacher.update(dict(momentum=((0.0, 0.9998),)))
  c.model.dtype = c.teacher.dtype = 'auto'  # bf16 on GPU/TPU (MAE trains in AMP), fp32 on CPU
  return c
