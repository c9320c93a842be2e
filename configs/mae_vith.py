"""MAE ViT-H/14 on ImageNet-1k, official recipe (patch 14, 256 patches per 224 image).

Command:
  python main.py --config=configs/mae_vith.py --workdir=W --config.data.data_dir=TFDS_DATA_DIR
Data: `imagenet2012` as TFDS ArrayRecord (docs/data.md, "ImageNet").
Recipe: 1600 epochs, batch 4096, lr 1.5e-4 x 4096/256, 40 warmup epochs, mask 0.75, norm-pix,
  decoder 512x8 with 16 heads (prediction head 14*14*3 = 588 outputs).
Cost: 656,613,964 trainable parameters, 291 GFLOP per image per step (analytic). With the default
  FSDP mesh on 64 devices of 16 GiB add --config.grad_accum_steps=4 (the memory planner,
  --mode=summary, gives 10.9 GiB per device; 33 GiB without accumulation).
Expected: the paper's ViT-H reaches 86.9% top-1 fine-tuned, 76.6% linear probe.
"""
from mim import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.default_config()
  c.model.variant = 'H'
  c.model.patch_size = 14
  c.model.dtype = c.teacher.dtype = 'auto'  # bf16 on GPU/TPU (MAE trains in AMP), fp32 on CPU
  return c
