"""The run session: everything a training loop does that is not its algorithm.

One :class:`RunSession` per training process owns the run directory (DESIGN.md, "Run directory"):

- **open or resume** — a fresh directory (or the caller's), or ``--resume RUN_DIR`` with its checks: the saved config
  may differ only in the config's ``RESUMABLE`` fields, the checkpoint must have been written for the same env
  (spaces included) and the same data (dataset fingerprint). Every check runs before anything is written.
- **one writer** — the directory's lock (:mod:`diffrl.runs.lock`) is taken before anything is read for a resume or
  written, and released by :meth:`finish`; a second process writing the same directory is refused with one sentence.
- **checkpoints of named parts** — :meth:`save` writes the loop's parts atomically; the ``state`` part always holds
  the global RNG states and the loop's counters (``loop``: the :class:`Counters` dataclass, the timers, the wall
  clock, any NumPy generators the loop registered). :meth:`start` restores the counters, generators and every RNG
  *last*, after the loop restored its own parts from :attr:`parts`, so rebuilding state (e.g. replaying running
  episodes) cannot disturb them.
- **the due rule** — :func:`due`: a periodic event fires when a counter crosses a multiple of its period (one rule
  for env steps that advance by ``n_envs``, gradient steps and epochs alike).
- **timers, the finite check, the logger, the progress bar and the summary.**

A loop then reads like a script::

    session = RunSession(cfg, "train_sac", cfg.env, signature=env_signature(...))
    if session.resumed:                       # the loop's own parts, from the latest checkpoint
        agent.load_state_dict(session.parts["state"]["agent"])
    c = session.start(Counters(), generators={"rng": rng})
    session.progress_bar(cfg.steps, c.env_steps, desc="sac Hopper-v5", unit="env-step")
    while c.env_steps < cfg.steps:
        ...                                    # act, step, update
        session.log(c.env_steps, row)
        if session.due(cfg.checkpoint_every, before, c.env_steps):
            session.save(c.env_steps, state={"agent": agent.state_dict()})
    session.finish(summary)

Checkpoint layout (unchanged from the loops that wrote it by hand): ``state`` = the loop's own entries + ``rng`` +
``loop`` (counters, ``timers``, ``wall_s``, generators). Checkpoints of ``diffrl diffusion train`` and ``diffrl dppo
pretrain`` written before the session existed kept those fields at the top of ``state``; :meth:`start` reads both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from diffrl.config import to_dict
from diffrl.errors import CheckpointError
from diffrl.runs import checkpoint as ckpt
from diffrl.runs.lock import RunLock, lock_run_dir
from diffrl.runs.logger import Logger, check_finite
from diffrl.runs.progress import Progress
from diffrl.runs.rundir import check_resumable, new_run_dir, write_config, write_summary
from diffrl.runs.seeding import generator_state, get_rng_state, set_generator_state, set_rng_state

C = TypeVar("C")


def due(every: int, before: int, now: int) -> bool:
    """Whether a periodic event with period ``every`` fires when a counter moves from ``before`` to ``now``: it
    crossed a multiple of ``every`` (``every <= 0`` never fires). For steps of one this is ``now % every == 0``."""
    return every > 0 and now // every > before // every


class Timers(dict[str, float]):
    """Cumulative wall-clock seconds per named phase (saved in checkpoints, so a resumed run keeps counting)."""

    @contextlib.contextmanager
    def time(self, name: str) -> Iterator[None]:
        """Add the time spent inside the ``with`` block to ``name``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - t0


class RateMeter:
    """Units per second between two :meth:`rate` calls (``perf/*_per_s`` columns of ``metrics.csv``)."""

    def __init__(self, count: int) -> None:
        self._t, self._count = time.perf_counter(), count

    def rate(self, count: int) -> float:
        now = time.perf_counter()
        out = (count - self._count) / max(now - self._t, 1e-9)
        self._t, self._count = now, count
        return out


class RunSession:
    """Opens (or resumes) one run directory and keeps its logger, checkpoints, timers and progress.

    Args:
        cfg: the run's resolved config (a :class:`~diffrl.pipelines.common.RunConfig`): ``resume``, ``run_dir``,
            ``runs_root``, ``seed``, ``keep_checkpoints``, ``wandb``, ``progress`` are read from it.
        pipeline: the pipeline name recorded in ``config.yaml`` and checkpoints (``train_sac``, ``iter``, ...).
        name: the second level of a generated run directory (env id or dataset name).
        signature: the env's :func:`~diffrl.envs.env_signature`; a resumed checkpoint must match it, and every
            checkpoint records it as ``meta["env"]``.
        fingerprint: the training data's fingerprint (:func:`~diffrl.data.fingerprint`); same rule, recorded as
            ``meta["dataset_fingerprint"]``.
        meta: further manifest metadata written with every checkpoint.
        run_dir: a directory the caller created (a stage of a larger run); used when not resuming.
        load_parts: checkpoint parts to load on resume (default: all).
    """

    def __init__(self, cfg: Any, pipeline: str, name: str, *, signature: Mapping[str, Any] | None = None,
                 fingerprint: str | None = None, meta: Mapping[str, Any] | None = None, run_dir: Path | None = None,
                 load_parts: tuple[str, ...] | None = None) -> None:
        self.cfg, self.pipeline = cfg, pipeline
        self.meta: dict[str, Any] = {"pipeline": pipeline, "seed": cfg.seed, **dict(meta or {})}
        if signature is not None:
            self.meta["env"] = dict(signature)
        if fingerprint is not None:
            self.meta["dataset"] = str(getattr(cfg, "dataset", ""))
            self.meta["dataset_fingerprint"] = fingerprint
        self.resumed = cfg.resume is not None
        self.parts: dict[str, Any] = {}
        self.manifest: dict[str, Any] = {}
        lock: RunLock | None = None  # one writer per run directory (runs/lock.py), taken before any write
        try:
            if self.resumed:
                self.run_dir = Path(cfg.resume)
                lock = lock_run_dir(self.run_dir, resume=True)  # before reading: a live writer may rewrite it
                check_resumable(self.run_dir, pipeline, cfg)
                self.manifest, self.parts = ckpt.load_checkpoint(self.run_dir, parts=load_parts)
                if signature is not None:
                    ckpt.check_env(self.manifest, dict(signature), self.run_dir, resume=True)
                if fingerprint is not None and self.manifest["meta"].get("dataset_fingerprint") != fingerprint:
                    raise CheckpointError(f"the dataset {getattr(cfg, 'dataset', '')} differs from the one "
                                          f"{self.run_dir} was trained on; resume with the same data (nothing was "
                                          "changed).")
            elif run_dir is not None:
                self.run_dir = Path(run_dir)
                self.run_dir.mkdir(parents=True, exist_ok=True)
                lock = lock_run_dir(self.run_dir)
            else:
                self.run_dir = new_run_dir(pipeline, name, cfg.seed, cfg.runs_root, cfg.run_dir)
                lock = lock_run_dir(self.run_dir)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        # released by finish(); a loop that stops with an error releases it when the session is collected (and the
        # kernel, at the latest, when the process exits)
        self._unlock = weakref.finalize(self, lock.release)
        self.timers = Timers()
        self.counters: Any = None
        self._generators: dict[str, np.random.Generator] = {}
        self.logger: Logger | None = None
        self.bar: Progress | None = None

    # ------------------------------------------------------------------------------------------------ start
    @property
    def step(self) -> int:
        """The step of the checkpoint being resumed (0 for a fresh run)."""
        return int(self.manifest.get("step", 0))

    def start(self, counters: C, *, timers: Mapping[str, float] | None = None,
              generators: Mapping[str, np.random.Generator] | None = None) -> C:
        """Restore the loop's counters, timers and generators (on resume), then every RNG (last); write
        ``config.yaml`` and open the logger. Returns ``counters`` (restored in place).

        Args:
            counters: a dataclass of the loop's counters (env steps, best score, last evaluation, ...) with their
                fresh-run values; on resume its fields are overwritten from the checkpoint's ``loop``.
            timers: the timer names and their starting values for a fresh run.
            generators: NumPy generators the loop draws from, saved under their names.
        """
        self.counters = counters
        self._generators = dict(generators or {})
        self.timers.update(timers or {})
        wall_offset = 0.0
        if self.resumed:
            state = self.parts.get("state", {})
            loop = state.get("loop", state)  # older diffusion / pretrain checkpoints kept these fields in `state`
            for f in dataclasses.fields(counters):  # type: ignore[arg-type]
                if f.name in loop:
                    setattr(counters, f.name, loop[f.name])
            self.timers.update(loop.get("timers", {}))
            wall_offset = float(loop.get("wall_s", 0.0))
            for key, gen in self._generators.items():
                set_generator_state(gen, loop[key])
            if "rng" in state:
                set_rng_state(state["rng"])  # last: nothing may draw from a global RNG after this
        write_config(self.run_dir, self.pipeline, to_dict(self.cfg))
        cfg = self.cfg
        self.logger = Logger(self.run_dir, resume_step=self.step if self.resumed else None, wall_offset=wall_offset,
                             wandb_project=cfg.wandb_project if cfg.wandb else None, config=to_dict(cfg))
        return counters

    def progress_bar(self, total: int, initial: int, desc: str, unit: str) -> None:
        """Open the progress bar (``initial``: where the restored counters stand)."""
        self.bar = Progress(total, initial=initial, desc=desc, unit=unit, enabled=self.cfg.progress)

    # --------------------------------------------------------------------------------------------- the loop
    due = staticmethod(due)

    def wall_s(self) -> float:
        """Wall seconds of the whole run so far (time before a resume included)."""
        assert self.logger is not None, "RunSession.start() first"
        return self.logger.wall_s()

    def check_finite(self, row: Mapping[str, float], step: int) -> None:
        """Stop the run (one sentence) if a metric became NaN/inf, before it overwrites good checkpoints."""
        check_finite(row, step, self.run_dir)

    def log(self, step: int, row: Mapping[str, float], env_steps: int | None = None) -> None:
        """Append a row to ``metrics.csv`` / TensorBoard (nothing for an empty row)."""
        assert self.logger is not None, "RunSession.start() first"
        if row:
            self.logger.log(step, row, env_steps=env_steps)

    def progress(self, n: int = 1, **metrics: Any) -> None:
        """Advance the progress bar by ``n`` and show ``metrics``."""
        assert self.bar is not None, "RunSession.start() first"
        self.bar.update(n, **metrics)

    def save(self, step: int, *, state: Mapping[str, Any] | None = None, parts: Mapping[str, Any] | None = None,
             meta: Mapping[str, Any] | None = None) -> None:
        """Write checkpoint ``step``: ``state`` (the loop's entries of the ``state`` part) + the RNGs and the loop
        counters, timers, wall clock and generators; ``parts`` as further parts; ``meta`` on top of the session's."""
        loop = {**dataclasses.asdict(self.counters), "timers": dict(self.timers), "wall_s": self.wall_s(),
                **{key: generator_state(gen) for key, gen in self._generators.items()}}
        full = {"state": {**dict(state or {}), "rng": get_rng_state(), "loop": loop}, **dict(parts or {})}
        ckpt.save_checkpoint(self.run_dir / "checkpoints", step, full, {**self.meta, **dict(meta or {})},
                             keep_last=self.cfg.keep_checkpoints)

    def finish(self, summary: Mapping[str, Any]) -> Path:
        """Close the bar and the logger, write ``summary.json`` (with the pipeline, seed, wall clock, the device the
        run used and its torch threads) and release the run directory's lock."""
        if self.bar is not None:
            self.bar.close()
        wall = self.wall_s()
        assert self.logger is not None
        self.logger.close()
        import torch

        from diffrl.runs.device import resolve_device

        # the device the loop ran on (the config may say only "auto") and the threads it had: a result row needs both
        ran_on = {"device": str(resolve_device(getattr(self.cfg, "device", "auto"))),
                  "torch_threads": torch.get_num_threads()}
        write_summary(self.run_dir, {"pipeline": self.pipeline, "seed": self.cfg.seed, "wall_s": wall, **ran_on,
                                     **summary})
        self._unlock()  # the last write: another process may now resume the run
        return self.run_dir
