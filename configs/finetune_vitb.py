"""Fine-tuning a ViT-B/16 on ImageNet-1k: the official MAE protocol (main_finetune.py, FINETUNE.md).

Command:
  python main.py --mode=finetune --config=configs/finetune_vitb.py --config.init_from=W_OR_WEIGHTS \
    --workdir=W2 --config.data.data_dir=TFDS_DATA_DIR
  (`init_from`: a pretraining workdir, mae_pretrain_vit_base.pth, a timm / HF file, or 'random'
  for the from-scratch baseline; the architecture comes with the weights). A rerun resumes.
Data: `imagenet2012` as TFDS ArrayRecord in TFDS_DATA_DIR (train / validation).
Recipe (methods.md §1.8): encoder without its final norm -> global average pool of the patch
  tokens -> fc_norm (LayerNorm) -> Linear (std 2e-5); 100 epochs, batch 1024, AdamW (0.9, 0.999),
  wd 0.05 on weight matrices only, lr = 5e-4 x 1024/256 = 2e-3 with 5 warmup epochs then cosine to
  1e-6 (per iteration), layer-wise lr decay 0.65 (13 layer ids: the head 1.0, block 11 0.65, the
  patch embedding 0.65^13), drop path 0.1 (linear over depth); RandomResizedCrop(224, 0.08-1,
  bicubic) + flip, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25; mixup 0.8 / cutmix 1.0
  (switch 0.5, one lam per batch) with label smoothing 0.1; eval: resize 256, center crop 224.
  Differences: the position table stays the fixed sin-cos one (MAE learns it in fine-tuning, at
  layer id 0: lr x 0.0037); mixup pairs each image with the reversed global batch (MAE: the
  per-GPU batch).
Output: W2/finetune.json (top-1, top-5, every evaluation), metrics.jsonl, TensorBoard events,
  checkpoints; top-1 on the 50k validation images every 10 epochs and at the end.
Expected: 83.6% top-1 for MAE ViT-B/16 1600 ep (norm-pix); 83.46-83.66 over 4 seeds (FINETUNE.md).
Cost: 86.4M parameters (timm's 86.6M less its position table); ~105 GFLOP per image per step
  (3x the 35 GFLOP forward on 197 tokens), ~1.3e19 FLOP for 100 epochs (estimate, not measured):
  ~60 A100-hours at 40% of the TF32 peak. The host augmentation (RandAugment on 224 px images)
  wants ~10 CPU cores per accelerator (data.num_workers).
"""
from mim import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.default_config()
  c.model.update(dict(variant='B', patch_size=16, image_size=224))
  c.batch_size = 1024
  c.total_epochs = 100.0
  c.checkpoint_every_steps = 1250   # one epoch
  c.optim.update(dict(base_lr=5e-4, min_lr=1e-6, warmup_epochs=5.0, b1=0.9, b2=0.999,
                      weight_decay=0.05,
                      weight_decay_regex=r'.*/kernel$'))   # = layer_decay.weight_decay_mask
  c.data.update(dict(name='imagenet2012', train_split='train', eval_split='validation',
                     crop_scale=(0.08, 1.0), flip=True))
  c.finetune.update(dict(layer_decay=0.65, drop_path=0.1, head_init_std=2e-5, mixup_alpha=0.8,
                         cutmix_alpha=1.0, mix_switch_prob=0.5, label_smoothing=0.1,
                         rand_augment_ops=2, rand_augment_magnitude=9.0, rand_augment_std=0.5,
                         random_erasing=0.25, eval_every_epochs=10.0))
  return c
