"""DTM, Dynamic Token Morphing (Kim, Heo, Han; ICLR 2025, arXiv 2401.00254), ViT-B/16.

Command:
  python main.py --config=configs/dtm_vitb.py --workdir=W --config.data.data_dir=TFDS_DATA_DIR --config.teacher.weights=TEACHER
  TEACHER: a ViT-B/16 (the paper distills CLIP ViT-B/16).
Method (docs/distillation.md §4, from naver-ai/dtm): the teacher's output tokens (all 196) are
  grouped by ToMe bipartite soft matching (even/odd split, cosine, the first token protected),
  n ~ U{0..196} tokens in k ~ U{1..14} steps, in 2 independent branches; the decoder's output at
  every patch (through a linear head) and the teacher's tokens are both replaced by their group
  means, smooth-L1 (beta 2) over all tokens, averaged over the branches. No pixel loss. BEiT
  block masking of 40%.
Optimization: lr 1.5e-3 x sqrt(batch / 2048) (here blr-scaled: base_lr 1.5e-3 x 256/2048 at
  batch 2048 gives the same lr), wd 0.05, gradient clipping 3.0, 300 epochs.
Departures: the student is MAE-style (encoder on the visible patches, decoder with mask tokens)
  where DTM's is BEiT-style (mask tokens in the encoder, an LN head); the schedule is drawn per
  sample as the paper describes (the code draws once per batch: --config.distill.morph_per_sample=False).
Expected: the paper reports gains over BEiT v2-style baselines; not measured here.
"""
from mim import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.default_config()
  c.model.update(dict(variant='B', patch_size=16))
  c.batch_size = 2048
  c.total_epochs = 300.0
  c.optim.update(dict(base_lr=1.5e-3 * 256 / 2048, min_lr=1e-5, warmup_epochs=10.0,
                      grad_clip_norm=3.0))
  c.masking.update(dict(name='block', ratio=0.4))
  c.masking.block.min_patches = 16
  c.teacher.model.update(dict(variant='B', image_size=224, patch_size=16))
  config_lib.add_distillation(c, 'dtm')
  c.model.dtype = c.teacher.dtype = 'auto'  # bf16 on GPU/TPU, fp32 on CPU
  return c
