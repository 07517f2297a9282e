"""Weighted k-nearest-neighbour classification of features (DINO's protocol).

For each query, the `k` most similar memory-bank features (dot product; cosine
similarity when `normalize`) vote for their class with weight
``exp(similarity / temperature)``; the class scores are the summed votes.
This is the rule of DINO's ``eval_knn.py`` and of VISSL's
``tools/nearest_neighbor_test.py`` (its ``SIGMA`` is the temperature), computed
in chunks of queries so that memory stays at ``chunk_size x N_train``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F


def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    normalize: bool = True,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """(N_test, num_classes) weighted votes of the `k` nearest training features.

    train_features: (N_train, D); train_labels: (N_train,) class indices;
    test_features: (N_test, D). Computed in float32 on the device of
    `train_features`; `k` is capped at N_train.
    """
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError(f"features must be (N, D); got {tuple(train_features.shape)} and {tuple(test_features.shape)}")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"feature widths differ: train {train_features.shape[1]}, test {test_features.shape[1]}")
    labels = train_labels.reshape(-1).long()
    if labels.numel() != train_features.shape[0]:
        raise ValueError(f"{labels.numel()} train labels for {train_features.shape[0]} train features")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0; got k={k}, temperature={temperature}")
    device = train_features.device
    bank = train_features.float()
    queries = test_features.float().to(device)
    if normalize:
        bank, queries = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
    labels = labels.to(device)
    classes = int(labels.max()) + 1 if num_classes is None else num_classes
    k = min(k, bank.shape[0])
    scores = torch.zeros(queries.shape[0], classes, device=device)
    for start in range(0, queries.shape[0], chunk_size):
        similarity = queries[start : start + chunk_size] @ bank.T
        top_similarity, top_index = similarity.topk(k, dim=1)
        weights = (top_similarity / temperature).exp()
        scores[start : start + chunk_size].scatter_add_(1, labels[top_index], weights)
    return scores


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    topk: Sequence[int] = (1, 5),
    **knn: object,
) -> dict[str, float]:
    """Top-k accuracies in percent (``{"top1": ..., "top5": ...}``) of `knn_scores`
    on labelled test features; a top-k wider than the number of classes counts every class."""
    num_classes = int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    scores = knn_scores(train_features, train_labels, test_features, num_classes=num_classes, **knn)  # type: ignore[arg-type]
    ranked = scores.argsort(dim=1, descending=True, stable=True)
    truth = test_labels.reshape(-1, 1).long().to(ranked.device)
    return {f"top{t}": float((ranked[:, :t] == truth).any(dim=1).float().mean() * 100) for t in topk}
