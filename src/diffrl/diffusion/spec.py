"""A diffusion model as data: a JSON-able spec rebuilds the architecture, a checkpoint part holds the weights.

    spec = {"type": "edm" | "ddpm", "event_shape": [D] or [T, D], "cond_dim": 0,
            "denoiser": {"type": "resmlp" | "unet" | "chunk_mlp", ...options},
            "normalizer": {"kind": "zscore" | "minmax" | "none", "skip_dims": [...]},  # none if left out
            "diffusion": {EDM or DDPM options}, "cond_drop_prob": 0.0,
            "sampler": {"sampler": "heun", "steps": 128, ...defaults}}

The spec travels in the checkpoint manifest, so ``load_model(run_dir)`` needs nothing but the checkpoint.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from diffrl.diffusion.models import DDPM, EDM, DiffusionModel
from diffrl.diffusion.nets import build_denoiser
from diffrl.diffusion.normalize import DataNormalizer
from diffrl.errors import CheckpointError
from diffrl.runs.checkpoint import load_checkpoint, load_weights

MODEL_TYPES = {"edm": EDM, "ddpm": DDPM}


def build_model(spec: dict[str, Any]) -> DiffusionModel:
    """Instantiate the (untrained) model a spec describes."""
    spec = copy.deepcopy(spec)
    kind = spec["type"]
    if kind not in MODEL_TYPES:
        raise ValueError(f"unknown diffusion model type {kind!r}: choose one of {', '.join(MODEL_TYPES)}")
    shape = [int(s) for s in spec["event_shape"]]
    cond_dim = int(spec.get("cond_dim", 0))
    den = dict(spec["denoiser"])
    net = build_denoiser(den.pop("type"), shape, cond_dim, **den)
    norm = spec.get("normalizer") or {}
    normalizer = DataNormalizer(shape[-1], norm.get("kind", "none"), norm.get("skip_dims", ()))
    return MODEL_TYPES[kind](net, shape, cond_dim, normalizer, cond_drop_prob=spec.get("cond_drop_prob", 0.0),
                             sampler_defaults=spec.get("sampler"), **spec.get("diffusion", {}))


def load_model(path: Path, *, ema: bool = True, part: str = "diffusion",
               device: torch.device | str = "cpu") -> tuple[DiffusionModel, dict[str, Any]]:
    """Rebuild a trained model from a run directory or checkpoint (EMA weights by default).

    Returns ``(model in eval mode, manifest meta)``; the spec is ``meta["model_spec"]``.
    """
    manifest, parts = load_checkpoint(Path(path), (part,))
    meta = manifest.get("meta", {})
    spec = meta.get("model_spec")
    if spec is None:
        raise CheckpointError(f"{path} holds no diffusion model (its checkpoint has no model spec).")
    model = build_model(spec)
    state = parts[part]["ema"]["shadow"] if ema else parts[part]["model"]
    load_weights(model, state, path)
    return model.to(device).eval(), meta
