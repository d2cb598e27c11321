"""Shared test settings: no progress bars, no W&B, deterministic torch on 2 CPU threads."""

import os
import tempfile

os.environ.setdefault("DIFFRL_PROGRESS", "0")
os.environ.setdefault("WANDB_MODE", "disabled")
# no test may write to the user's ~/.minari: datasets go to a per-session temporary root
os.environ["MINARI_DATASETS_PATH"] = tempfile.mkdtemp(prefix="diffrl-minari-")
