"""Evaluation layer: retrieval, zero-shot classification, representational similarity, SSW distances."""

from .distance import selection_distance, ssw_distance
from .retrieval import retrieval_metrics
from .similarity import linear_cka, mutual_knn
from .zeroshot import zero_shot_accuracy, zero_shot_weights

__all__ = [
    "linear_cka",
    "mutual_knn",
    "retrieval_metrics",
    "selection_distance",
    "ssw_distance",
    "zero_shot_accuracy",
    "zero_shot_weights",
]
