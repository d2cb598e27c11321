"""Evaluation: THE one evaluation path (``evaluate``), used by training and by ``diffrl eval``."""

from diffrl.eval.evaluate import EVAL_SEED_STREAM, EvalResult, evaluate

__all__ = ["evaluate", "EvalResult", "EVAL_SEED_STREAM"]
