"""MAE ViT-B/16 on ImageNet-1k: the official recipe (He et al. 2022; facebookresearch/mae PRETRAIN.md).

Command:
  python main.py --config=configs/mae_vitb.py --workdir=W --config.data.data_dir=TFDS_DATA_DIR
Data: `imagenet2012` prepared as TFDS ArrayRecord in TFDS_DATA_DIR (see docs/data.md, "ImageNet").
Recipe: 1600 epochs, batch 4096, AdamW(0.9, 0.95), wd 0.05, lr 1.5e-4 x 4096/256 = 2.4e-3,
  40 warmup epochs then cosine to 0 (per iteration), mask 0.75, norm-pix loss,
  decoder 512 wide x 8 blocks x 16 heads, RandomResizedCrop(0.2-1, bicubic) + flip.
Cost: 111,655,680 trainable parameters; ~56 GFLOP per image per step (analytic, see
  --mode=summary), ~1.1e20 FLOP for 1600 epochs: about 8 days on 64 A100s in fp32-equivalent,
  roughly 1 day on a v4-256 pod slice.
Expected: the paper's ViT-B reaches 83.6% top-1 after fine-tuning, 68.0% linear probe.
"""
from mim import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.default_config()
  c.model.variant = 'B'
  c.model.patch_size = 16
  c.model.dtype = c.teacher.dtype = 'auto'  # bf16 on GPU/TPU (MAE trains in AMP), fp32 on CPU
  return c
