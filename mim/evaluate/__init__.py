"""Evaluation utilities: reconstruction visualization and kNN probing."""
