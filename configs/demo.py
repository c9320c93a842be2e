"""A small MAE on scikit-learn's digits (embedded, no download): a few minutes on 2 CPU cores.

Command:
  python main.py --config=configs/demo.py --workdir=/tmp/mim_demo
  python main.py --config=configs/demo.py:method=mae --workdir=W   # pick the method by name
Data: the 1797 8x8 digits shipped in scikit-learn (1437 train / 360 held out), upscaled to 32x32.
Model: ViT 128 wide x 6 blocks (4 heads), patch 4 (64 patches, 16 visible), decoder 64x2.
Cost: ~1.2M parameters, 0.43 GFLOP per image per step; about 3 minutes on 2 CPU cores.
Expected: the loss falls from ~1.0 to below 0.5; at the end the printed kNN accuracy of the
  pretrained encoder on the held-out digits is above that of a randomly initialized one.
"""
from mim import config as config_lib

METHODS = ('mae',)


def get_config(arg=None):
  method = (arg or 'method=mae').split('=', 1)[-1]
  if method not in METHODS:
    raise ValueError(f'configs/demo.py: method={method!r} is unknown; choose one of {METHODS}.')
  c = config_lib.default_config()
  c.batch_size = 128
  c.total_steps = 1500
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.reconstruction_every_steps = 500
  c.optim.base_lr = 1.5e-3
  c.optim.warmup_steps = 100
  c.model.update(dict(variant='', image_size=32, patch_size=4, width=128, depth=6, num_heads=4,
                      decoder_width=64, decoder_depth=2, decoder_heads=4))
  c.data.update(dict(name='digits', train_split='train', eval_split='test', num_workers=0,
                     crop_scale=(0.5, 1.0), flip=False))  # flipping changes a digit's meaning
  c.mesh.update(dict(data=-1, fsdp=1))
  c.eval.knn = True
  return c
