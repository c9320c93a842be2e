"""MAE ViT-L/16 on ImageNet-1k, official recipe (same as ViT-B except the encoder).

Command:
  python main.py --config=configs/mae_vitl.py --workdir=W --config.data.data_dir=TFDS_DATA_DIR
Data: `imagenet2012` as TFDS ArrayRecord (docs/data.md, "ImageNet").
Recipe: 1600 epochs (800 is the common shorter run), batch 4096, lr 1.5e-4 x 4096/256, 40 warmup
  epochs, mask 0.75, norm-pix, decoder 512x8 with 16 heads.
Cost: ~329M trainable parameters (see --mode=summary for the exact count and FLOPs).
Expected: the paper's ViT-L reaches 85.9% top-1 fine-tuned (85.4% at 800 epochs), 75.8% linear probe.
"""
from mim import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.default_config()
  c.model.variant = 'L'
  c.model.patch_size = 16
  c.model.dtype = c.teacher.dtype = 'auto'  # bf16 on GPU/TPU (MAE trains in AMP), fp32 on CPU
  return c
