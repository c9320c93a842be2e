"""kNN, linear and attentive probes of the digits demo (configs/demo.py): seconds on a CPU.

Command:
  python main.py --config=configs/demo.py --workdir=W                          # pretrain
  python main.py --mode=eval --config=configs/eval_demo.py --config.init_from=W --workdir=W
  python main.py --mode=eval --config=configs/eval_demo.py --config.init_from=random \
    --workdir=W_random                                                          # the baseline
Data: the embedded digits, 1437 train (kNN bank, probe train set) / 360 test.
Protocols: kNN (DINO: cosine, T=0.07, k=10/20/200) on the cls token and on the mean of the patch
  tokens; linear and attentive probes with the MAE recipe on cached center-crop features (fast
  mode): 90 epochs of batch 128, LARS at peak lr 6.4 (base_lr 12.8), the reference recipe's peak lr
  (with LARS the step is lr x 0.001 x |w|, so the batch-scaled lr of a 128 batch, 0.05, would
  barely move the head in 990 steps).
Model: `init_from`'s (for 'random', the demo's ViT 128 x 6, patch 8, 32 px).
"""
from mim import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.default_config()
  c.model.update(dict(variant='', image_size=32, patch_size=8, width=128, depth=6, num_heads=4,
                      decoder_width=64, decoder_depth=2, decoder_heads=4))
  c.data.update(dict(name='digits', train_split='train', eval_split='test', num_workers=0,
                     flip=False))  # flipping changes a digit's meaning
  c.mesh.update(dict(data=-1, fsdp=1))
  c.eval.update(dict(protocols=('knn', 'linear', 'attentive'), knn_pool='both', batch_size=128,
                     knn_max_train=0, knn_max_test=0))
  c.probe.update(dict(mode='cached', batch_size=128, base_lr=12.8, log_every_steps=200))
  return c
