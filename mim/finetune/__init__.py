"""Fine-tuning, MAE protocol (methods.md §1.8): the loop (train.py, `main.py --mode=finetune`),
the classifier (model.py), layer-wise lr decay, mixup / cutmix (RandAugment and random erasing
are in data/augment.py)."""
