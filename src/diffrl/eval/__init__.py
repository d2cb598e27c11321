"""Evaluation: THE one evaluation path (``evaluate``), used by training and by ``diffrl eval``."""

from diffrl.eval.evaluate import EVAL_SEED_STREAM, EvalResult, evaluate
from diffrl.eval.scores import dataset_normalized_score, describe_dataset, normalized_score, reference_scores

__all__ = ["evaluate", "EvalResult", "EVAL_SEED_STREAM", "normalized_score", "reference_scores",
           "dataset_normalized_score", "describe_dataset"]
