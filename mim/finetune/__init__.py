"""Fine-tuning pieces (MAE protocol, methods.md §1.8): layer-wise lr decay, mixup / cutmix
(RandAugment and random erasing are in data/augment.py). No training loop yet."""
