"""Synthetic tasks from the paper: toy induction, the 3-gram control and hop-k, seeded and vectorised."""

from .hopk import HopKTask, error_rate_by_k, hop_k_reference, hop_k_targets
from .induction import (
    IGNORE_INDEX,
    InductionTask,
    as_generator,
    check_invariants,
    induction_accuracy,
    masked_accuracy,
    previous_occurrence,
    to_hf_labels,
)
from .ngram import NGramTask, ngram_accuracy

__all__ = [
    "IGNORE_INDEX",
    "HopKTask",
    "InductionTask",
    "NGramTask",
    "as_generator",
    "check_invariants",
    "error_rate_by_k",
    "hop_k_reference",
    "hop_k_targets",
    "induction_accuracy",
    "masked_accuracy",
    "ngram_accuracy",
    "previous_occurrence",
    "to_hf_labels",
]
