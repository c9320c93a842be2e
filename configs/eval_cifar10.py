"""kNN, linear and attentive probes of a CIFAR-10 pretraining (configs/cifar10.py) on the 10k test images.

Command:
  python main.py --mode=eval --config=configs/eval_cifar10.py --config.init_from=W --workdir=W
  python main.py --mode=eval --config=configs/eval_cifar10.py --config.init_from=random \
    --workdir=W_random --config.model.width=256 ...                # the baseline (model.* as W's)
Data: the .npz subset of configs/cifar10.py: all 20k train images are the kNN bank and the probes'
  train set, all 10k test images the queries / test set (chance 10%).
Protocols: kNN (DINO: cosine, T=0.07, k=10/20/200, cls token); linear and attentive probes with
  the MAE recipe on cached center-crop features (fast mode): batch 256, LARS at peak lr 6.4 (the
  reference recipe's peak lr, as configs/eval_demo.py), 90 epochs, 10 warmup.
  bench/methods_table.py runs the same protocols on features extracted once per encoder, with
  the attentive probe's epochs set by its budget (--config.probe.epochs here).
Model: `init_from`'s (for 'random', configs/cifar10.py's ViT unless overridden).
"""
from mim import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.default_config()
  c.model.update(dict(variant='', image_size=32, patch_size=4, width=256, depth=4, num_heads=4,
                      decoder_width=128, decoder_depth=2, decoder_heads=4))
  c.data.update(dict(name='npz', data_dir='../shared/datasets/cifar10', train_split='train_*.npz',
                     eval_split='test.npz', num_workers=0))
  c.mesh.update(dict(data=-1, fsdp=1))
  c.eval.update(dict(protocols=('knn', 'linear', 'attentive'), knn_pool='cls', batch_size=256,
                     knn_max_train=0, knn_max_test=0))
  c.probe.update(dict(mode='cached', batch_size=256, base_lr=6.4, log_every_steps=2000))
  return c
