"""Checkpoints: tensors in safetensors files, everything else in a JSON manifest; never pickle.

Layout of one checkpoint (a directory)::

    checkpoints/step-000600/
        manifest.json          versions, step, env id, spaces, user metadata, and the skeleton of each part
        <part>.safetensors     the tensors of one part (e.g. ``state``, ``buffer``)
    checkpoints/latest -> step-000600   (symlink, replaced atomically)

A *part* is any tree of dicts / lists / tuples whose leaves are tensors, NumPy arrays, numbers, strings,
bools or None (agent ``state_dict()``s with their optimizers, RNG states, loop counters). Tensor leaves go to
safetensors; the rest of the tree goes to JSON with placeholders, so loading executes no code.

Writes are atomic: everything is written to a temporary directory which is then renamed into place, so a
kill at any moment leaves either the previous checkpoint or the new one, never a half-written one.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffrl.errors import CheckpointError

FORMAT_VERSION = 1
LATEST = "latest"


def versions() -> dict[str, str]:
    """Versions of diffrl and the libraries a checkpoint's numbers depend on."""
    import gymnasium

    import diffrl

    out = {"diffrl": diffrl.__version__, "torch": str(torch.__version__), "numpy": np.__version__,
           "gymnasium": gymnasium.__version__, "python": platform.python_version()}
    for name in ("mujoco", "gymnasium_robotics", "dm_control", "shimmy"):
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "__version__"):
            out[name] = str(mod.__version__)
    return out


# ---------------------------------------------------------------------------------------------- tree codec
def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def flatten_tree(tree: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a tree into a JSON-able skeleton and a flat ``{path: tensor}`` dict."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().to("cpu").contiguous().clone()
            return {"__tensor__": path}
        if isinstance(node, np.ndarray):
            tensors[path] = torch.from_numpy(np.ascontiguousarray(node).copy())
            return {"__ndarray__": path}
        if isinstance(node, np.generic):
            return node.item()
        if isinstance(node, Mapping):
            if all(isinstance(k, str) for k in node):
                # keys escaped as in JSON Pointer so {"a/b": x} and {"a": {"b": y}} get distinct tensor names
                return {"__map__": {k: enc(v, f"{path}/{_escape(k)}") for k, v in node.items()}}
            return {"__items__": [[k, enc(v, f"{path}/{i}")] for i, (k, v) in enumerate(node.items())]}
        if isinstance(node, tuple):
            return {"__tuple__": [enc(v, f"{path}/{i}") for i, v in enumerate(node)]}
        if isinstance(node, list):
            return [enc(v, f"{path}/{i}") for i, v in enumerate(node)]
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"cannot checkpoint a {type(node).__name__} at {path or '/'}")

    return enc(tree, prefix), tensors


def unflatten_tree(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_tree`."""

    def dec(node: Any) -> Any:
        if isinstance(node, list):
            return [dec(v) for v in node]
        if not isinstance(node, dict):
            return node
        if "__tensor__" in node:
            return tensors[node["__tensor__"]]
        if "__ndarray__" in node:
            return tensors[node["__ndarray__"]].numpy()
        if "__map__" in node:
            return {k: dec(v) for k, v in node["__map__"].items()}
        if "__items__" in node:
            return {k: dec(v) for k, v in node["__items__"]}
        if "__tuple__" in node:
            return tuple(dec(v) for v in node["__tuple__"])
        raise CheckpointError(f"unrecognised entry {sorted(node)} in checkpoint manifest.")

    return dec(skeleton)


# ---------------------------------------------------------------------------------------------- save / load
def step_dir_name(step: int) -> str:
    return f"step-{step:09d}"


def save_checkpoint(
    root: Path, step: int, parts: Mapping[str, Any], meta: Mapping[str, Any] | None = None, keep_last: int = 2
) -> Path:
    """Atomically write checkpoint ``root/step-N`` holding ``parts``, point ``root/latest`` at it, prune.

    Args:
        root: the run's ``checkpoints/`` directory.
        step: the counter that names the checkpoint (env steps for online RL, gradient steps offline).
        parts: name -> tree (see module docstring); each becomes ``<name>.safetensors``.
        meta: JSON-able metadata stored in the manifest (env id, spaces, counters, ...).
        keep_last: how many ``step-*`` checkpoints to keep (the newest); ``0`` keeps all.
    Returns:
        The final checkpoint directory.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    skeletons = {}
    for name, tree in parts.items():
        skeleton, tensors = flatten_tree(tree)
        save_file(tensors, str(tmp / f"{name}.safetensors"))
        skeletons[name] = skeleton
    manifest = {"format": FORMAT_VERSION, "step": step, "versions": versions(), "meta": dict(meta or {}),
                "parts": skeletons}
    with open(tmp / "manifest.json", "w") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # re-saving the same step (e.g. right after a resume): swap, then delete the old one
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    link_tmp = root / f".{LATEST}-{os.getpid()}"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    link_tmp.symlink_to(final.name)
    os.replace(link_tmp, root / LATEST)
    if keep_last > 0:
        for old_dir in list_checkpoints(root)[:-keep_last]:
            if old_dir != final:
                shutil.rmtree(old_dir, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete ``step-*`` checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "manifest.json").is_file())


def resolve_checkpoint(path: Path) -> Path:
    """Accept a run directory, its ``checkpoints/`` dir, or one checkpoint dir; return the checkpoint dir."""
    path = Path(path)
    for cand in (path, path / "checkpoints" / LATEST, path / LATEST):
        if (cand / "manifest.json").is_file():
            return cand.resolve()
    for root in (path / "checkpoints", path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a run directory written by diffrl.")
    raise CheckpointError(f"no checkpoint found in {path}; the run may have stopped before its first save.")


def read_manifest(ckpt: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((ckpt / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint manifest {ckpt / 'manifest.json'} is unreadable ({e}).") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION or "parts" not in manifest:
        raise CheckpointError(f"{ckpt / 'manifest.json'} is not a diffrl checkpoint manifest (format "
                              f"{FORMAT_VERSION}).")
    return manifest


def load_checkpoint(path: Path, parts: tuple[str, ...] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a checkpoint: returns ``(manifest, {part: tree})``. Only safetensors and JSON are read.

    Args:
        path: run directory, ``checkpoints/`` directory or a checkpoint directory.
        parts: which parts to load (default all).
    """
    ckpt = resolve_checkpoint(path)
    manifest = read_manifest(ckpt)
    wanted = parts if parts is not None else tuple(manifest["parts"])
    out = {}
    for name in wanted:
        if name not in manifest["parts"]:
            raise CheckpointError(f"checkpoint {ckpt} has no part {name!r} (it has "
                                  f"{', '.join(manifest['parts'])}).")
        file = ckpt / f"{name}.safetensors"
        try:
            tensors = load_file(str(file))
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"checkpoint file {file} is missing or corrupt ({e}).") from None
        try:
            out[name] = unflatten_tree(manifest["parts"][name], tensors)
        except KeyError as e:
            raise CheckpointError(f"checkpoint file {file} lacks tensor {e}; it does not match its "
                                  "manifest.") from None
    return manifest, out


def load_weights(target: Any, state: Mapping[str, Any], source: Path | str) -> None:
    """``target.load_state_dict(state)`` (a module, or anything whose ``load_state_dict`` loads modules); weights
    of another layout are a one-sentence :class:`CheckpointError` naming ``source`` and the first mismatch."""
    try:
        target.load_state_dict(state)
    except RuntimeError as e:
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else "unknown"
        raise CheckpointError(f"the weights in {source} do not fit this diffrl's network ({detail[:160]}); they "
                              "were written by another model or diffrl version.") from None


def check_env(manifest: dict[str, Any], signature: dict[str, Any], run_dir: Path, resume: bool = False) -> None:
    """Refuse, in one sentence, a checkpoint written for another env (id or spaces) than ``signature``."""
    saved = manifest["meta"].get("env")
    if saved != signature:
        raise CheckpointError(f"the checkpoint in {run_dir} was written for {saved}, not {signature}"
                              + ("; nothing was changed." if resume else "."))
