"""ColorMAE ViT-B/16 on ImageNet-1k: MAE with green-noise masks (Hinojosa et al., ECCV 2024).

Command:
  python main.py --config=configs/colormae_vitb.py --workdir=W --config.data.data_dir=TFDS_DATA_DIR
  (--config.total_epochs=300 or 1600 for the paper's other lengths; see the masks first with
  python main.py --mode=visualize --config=configs/colormae_vitb.py --workdir=W ...)
Data: `imagenet2012` prepared as TFDS ArrayRecord in TFDS_DATA_DIR (see docs/data.md, "ImageNet").
Recipe: configs/mae_vitb.py (batch 4096, lr 1.5e-4 x 4096/256, 40 warmup epochs, cosine, AdamW
  (0.9, 0.95), wd 0.05, mask 0.75, norm-pix, decoder 512x8) with 800 epochs, green noise
  generated on device every step (sigmas 1.0 / 2.0 patches: a difference of Gaussians) and, as
  ColorMAE's mmpretrain config, no weight decay on the cls and mask tokens. For the published
  pattern files instead: --config.masking.colored_noise.bank_path=green_noise_data_3072.npz.
Cost: the same as MAE ViT-B (the masks are data-independent; bench/masking.py measures the
  masks at 0.01% of a step): ~56 GFLOP per image per step, ~5.7e19 FLOP for 800 epochs.
Expected (paper, ViT-B/16, green): fine-tuned top-1 83.01 / 83.61 / 83.77 after 300 / 800 / 1600
  epochs, ADE20K UperNet 45.80 / 49.18 mIoU after 300 / 800 (+2.72 over random masking at 300).
"""
from mim import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.default_config()
  c.model.variant = 'B'
  c.model.patch_size = 16
  c.total_epochs = 800.0
  c.masking.name = 'colored_noise'
  c.masking.colored_noise.color = 'green'
  c.optim.weight_decay_regex = r'.*/kernel$'
  c.model.dtype = c.teacher.dtype = 'auto'  # bf16 on GPU/TPU (MAE trains in AMP), fp32 on CPU
  return c
