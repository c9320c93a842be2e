"""Attentive probe (EP: efficient probing, "Attention, Please!", ICLR 2026) of a ViT-B/16 on
ImageNet-1k, trained like the MAE linear probe.

Command:
  python main.py --mode=eval --config=configs/attnprobe_vitb.py --config.init_from=W_OR_WEIGHTS \
    --workdir=W2 --config.data.data_dir=TFDS_DATA_DIR
Head (methods.md §10): 32 learnable queries (normal 0.02), one head, keys = the frozen patch
  tokens after the final norm (no key projection), one bias-free value projection 768 -> 768
  split into 32 slices of 24 (query m reads slice m), then BatchNorm without affine -> Linear:
  32*768 + 768*768 + 769*1000 = 1,383,400 parameters.
Training: as configs/linprobe_vitb.py (LARS, lr 0.1 x batch/256, 10 + 80 epochs, RandomResizedCrop
  + flip, frozen encoder). The EP benchmark reports MAE ViT-B/16 at 75.5% (linear 67.8%, kNN 35.6%).
Output: W2/eval/attentive.json and one printed line.
"""
import os

from mim import config as config_lib


def get_config(arg=None):
  # The data and training recipe are the linear probe's; only the head differs.
  c = config_lib.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'linprobe_vitb.py'),
                      arg)
  c.eval.protocols = ('attentive',)
  c.probe.update(dict(num_queries=32, value_divisor=1, attentive_use_cls=False))
  return c
