"""Evaluation: --mode=eval (run.py) with streamed frozen-encoder features (features.py), kNN
(knn.py), linear / attentive probe heads (heads.py) trained with LARS (lars.py, probe.py); mask
and reconstruction images."""
