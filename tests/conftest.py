"""Shared test settings: no progress bars, no W&B, deterministic torch on 2 CPU threads."""

import os

os.environ.setdefault("DIFFRL_PROGRESS", "0")
os.environ.setdefault("WANDB_MODE", "disabled")
