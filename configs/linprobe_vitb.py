"""Linear probe of a ViT-B/16 on ImageNet-1k: the official MAE protocol (main_linprobe.py).

Command:
  python main.py --mode=eval --config=configs/linprobe_vitb.py --config.init_from=W_OR_WEIGHTS \
    --workdir=W2 --config.data.data_dir=TFDS_DATA_DIR
  (`init_from`: a pretraining workdir, mae_pretrain_vit_base.pth, a timm / HF file; the
  architecture comes with the weights). Fast mode: --config.probe.mode=cached.
Recipe (methods.md §1.9): cls token after the final norm -> BatchNorm without affine (eps 1e-6)
  -> Linear (trunc_normal 0.01); frozen encoder; LARS momentum 0.9, trust coefficient 0.001,
  no weight decay; batch 16384, lr = 0.1 x 16384/256 = 6.4, 10 warmup epochs of 90, cosine to 0
  (per iteration); RandomResizedCrop(224, scale 0.08-1, bicubic) + flip; test: resize to 256,
  center crop 224. BN statistics are over the global batch (MAE's DDP: per GPU).
Output: W2/eval/linear.json (top-1, top-5, the mode and subsets) and one printed line.
Expected: 68.0% top-1 (paper, TF/TPU) / 67.8% (PyTorch repo) for MAE ViT-B/16 1600 ep.
Cost: 90 epochs of ViT-B/16 forward passes over 1.28M images (35.1 GFLOP each, mim/flops.py:
  ~4.0e18 FLOP; the head is free): about a third of a fine-tuning run (forward + backward).
"""
from mim import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.default_config()
  c.data.update(dict(name='imagenet2012', train_split='train', eval_split='validation'))
  c.eval.protocols = ('linear',)
  c.probe.update(dict(mode='augment', epochs=90.0, warmup_epochs=10.0, batch_size=16384,
                      base_lr=0.1, linear_pool='cls', crop_scale=(0.08, 1.0)))
  return c
