"""A small MAE on CIFAR-10 from .npz files (e.g. the 20k-image subset in ../shared/datasets/cifar10).

Command:
  python main.py --config=configs/cifar10.py --workdir=W --config.data.data_dir=PATH/cifar10
Data: `images` (N,32,32,3) uint8 and `labels` in train_*.npz (train) and test.npz (held out).
Model: ViT-S-like 192 wide x 8 blocks (3 heads), patch 4 (64 patches, 16 visible), decoder 128x2.
Cost: ~4.7M parameters, ~1.6 GFLOP per image per step; 4000 steps of batch 256 take about
  an hour on 2 CPU cores (minutes on one GPU).
Expected: loss falls from ~1.0 to ~0.45; the kNN accuracy of the pretrained encoder on test.npz
  beats the random-init encoder's.
"""
from mim import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.default_config()
  c.batch_size = 256
  c.total_steps = 4000
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.reconstruction_every_steps = 1000
  c.optim.base_lr = 1.5e-4
  c.optim.warmup_steps = 200
  c.model.update(dict(variant='', image_size=32, patch_size=4, width=192, depth=8, num_heads=3,
                      decoder_width=128, decoder_depth=2, decoder_heads=4))
  c.data.update(dict(name='npz', data_dir='../shared/datasets/cifar10', train_split='train_*.npz',
                     eval_split='test.npz', num_workers=2))
  c.mesh.update(dict(data=-1, fsdp=1))
  c.eval.knn = True
  return c
