"""MAE ViT-B/16 on ImageNet-1k with BEiT's block-wise masks instead of random masking.

Command:
  python main.py --config=configs/blockmask_vitb.py --workdir=W --config.data.data_dir=TFDS_DATA_DIR
Data: `imagenet2012` prepared as TFDS ArrayRecord in TFDS_DATA_DIR (see docs/data.md, "ImageNet").
Recipe: configs/mae_vitb.py (1600 epochs, batch 4096, lr 1.5e-4 x 4096/256, norm-pix, decoder
  512x8) with BEiT's block sampler on the 14x14 grid (blocks of >= 16 patches, aspect 0.3-3.3,
  10 tries per block; mim/masks/block.py), the shortfall filled at random so exactly 147 patches
  are masked. Mask ratio 0.75 keeps MAE's compute; MAE's ablation favours 0.5 for blocks
  (--config.masking.ratio=0.5, twice the encoder tokens).
Cost: as MAE ViT-B, ~56 GFLOP per image per step at ratio 0.75 (the block sampler is a small
  while loop on device, 0.02% of a step: bench/masking.py).
Expected: below random masking. MAE's ablation (ViT-L, 800 epochs, fine-tune / linear probe):
  block 75% 82.8 / 63.9 and block 50% 83.9 / 72.3 vs random 75% 84.9 / 73.5 (paper, re-check).
"""
from mim import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.default_config()
  c.model.variant = 'B'
  c.model.patch_size = 16
  c.masking.name = 'block'
  c.model.dtype = c.teacher.dtype = 'auto'  # bf16 on GPU/TPU (MAE trains in AMP), fp32 on CPU
  return c
