"""Evaluation of learned features, in plain PyTorch: weighted k-nearest-neighbour classification."""

from convit_ssl.evaluation.knn import knn_accuracy, knn_scores

__all__ = ["knn_accuracy", "knn_scores"]
