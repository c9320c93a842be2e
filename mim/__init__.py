"""Masked image modeling pretraining of Vision Transformers in JAX/Flax."""
