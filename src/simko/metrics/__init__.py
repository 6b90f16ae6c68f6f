"""Evaluation metrics: unbiased pass@k and its torchmetrics accumulator; solution diversity."""

from simko.metrics.diversity import SolutionDiversity, problem_diversity, register_solution_key, solution_keys
from simko.metrics.pass_at_k import pass_at_k, pass_at_k_tensor
from simko.metrics.passk_metric import PassAtK, default_ks, majority_at_n

__all__ = [
    "PassAtK",
    "SolutionDiversity",
    "default_ks",
    "majority_at_n",
    "pass_at_k",
    "pass_at_k_tensor",
    "problem_diversity",
    "register_solution_key",
    "solution_keys",
]
