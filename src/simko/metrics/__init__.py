"""Evaluation metrics: unbiased pass@k and its torchmetrics accumulator."""

from simko.metrics.pass_at_k import pass_at_k, pass_at_k_tensor
from simko.metrics.passk_metric import PassAtK, default_ks, majority_at_n

__all__ = ["PassAtK", "default_ks", "majority_at_n", "pass_at_k", "pass_at_k_tensor"]
