"""``diffrl sweep``: many runs of a registered system — arms x grid points x seeds — each a trial that runs the
system exactly as its own command would, in its own run directory under the sweep directory.

    diffrl sweep SPEC.yaml [SPEC2.yaml ...] [--runner local|ray] [--address ADDR] [--cpus-per-trial C]
                 [--gpus-per-trial G] [--workers N] [--table-every S]
    diffrl sweep synther online --env HalfCheetah-v5 --seeds 0-4 --grid utd=1,20 --grid synthetic_ratio=0,0.5
    diffrl sweep status SWEEP_DIR

A spec (YAML)::

    name: synther-controls          # the sweep directory: <root>/<name> (root: runs/sweeps)
    system: synther                 # a registered CLI group ...
    command: online                 # ... and its command ("" for single-command systems such as iter)
    algo: sac                       # the algorithm, where the command has a choice
    preset: quick                   # optional; fields below override it
    base: {env: HalfCheetah-v5, steps: 30000}
    arms: {sac-utd20: {synthetic_ratio: 0.0}, redq: {algo: redq}, synther: {}}   # optional named arms (an arm
    grid: {utd: [1, 20]}                        # may name its own algo) crossed with the grid's points
    seeds: [0, 1, 2]
    results: benchmarks/results/synther_online.jsonl   # optional: a row per finished trial (diffrl.runs.results)

A string field may name ``{seed}`` (the trial's seed), ``{root}`` (the sweeps' root directory), ``{FIELD}``
(another field of the trial, e.g. a grid value) and ``{FIELD_name}`` (that value as trial ids spell it), so that
one sweep's trials can use another's runs, e.g. ``policy: "{root}/dppo-pretrain/trials/diffusion_env_{env}-s{seed}"``;
specs given together run in order (``diffrl sweep pretrain.yaml finetune.yaml``).

The sweep directory holds ``sweep.yaml`` (the resolved spec), ``trials/<trial>/`` (normal run directories) and
``trials/<trial>.error`` for a trial that failed. Started again, a sweep skips finished trials (their
``summary.json``), resumes unfinished ones from their own checkpoints (so their curves equal an uninterrupted
sweep's) and retries failed ones; a failing trial is reported with its one-sentence error and does not stop the
others. While trials run, the status table (trial, arm, seed, steps, latest return, ETA) is printed every
``--table-every`` seconds when it changed, and each newly finished trial's row is appended to ``results``.
``--runner ray`` runs the trials as Ray Tune trials (``pip install 'diffrl[ray]'``) on a local Ray instance
sized to the machine, or on an existing cluster with ``--address``; each trial's torch / OpenMP threads are set to
its CPU share. The local runner runs the trials one after the other in this process, or with ``--workers N`` in
N processes side by side (each a driver of its own, ``--cpus-per-trial`` threads each, default 1).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import shutil
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from diffrl import registry
from diffrl.config import load_yaml, save_yaml
from diffrl.errors import ConfigError, DiffrlError, RunLocked
from diffrl.runs.checkpoint import list_checkpoints
from diffrl.runs.lock import LOCK_FILE, is_locked, lock_run_dir, one_at_a_time
from diffrl.runs.logger import read_metrics
from diffrl.runs.memory import reset_peak_rss
from diffrl.runs.rundir import CONFIG_FILE, SUMMARY_FILE, read_summary, slug

SPEC_FILE = "sweep.yaml"
RECORD_LOCK = ".record.lock"
RUNNERS = ("local", "ray")
POLL_S = 30.0  # with --table-every 0: how often the driver looks for newly finished trials (to record their rows)
# fields a spec may not set: the sweep owns where and how each trial runs
OWNED = frozenset({"seed", "run_dir", "resume", "runs_root", "progress"})


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A sweep: which command, the fixed fields, the arms and grid, the seeds (see the module docstring)."""

    name: str
    system: str
    command: str = ""
    algo: str | None = None
    preset: str | None = None
    base: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    arms: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    grid: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)
    seeds: Sequence[int] = (0,)
    results: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "system": self.system, "command": self.command, "algo": self.algo,
                "preset": self.preset, "base": dict(self.base), "arms": {k: dict(v) for k, v in self.arms.items()},
                "grid": {k: list(v) for k, v in self.grid.items()}, "seeds": list(self.seeds),
                "results": self.results}


@dataclasses.dataclass(frozen=True)
class Trial:
    """One (arm, grid point, seed): its id (the run directory's name), arm label, seed, field overrides and the
    algorithm (None: the spec's)."""

    id: str
    arm: str
    seed: int
    fields: Mapping[str, Any]
    algo: str | None = None


def parse_seeds(text: str) -> list[int]:
    """``"0-4"`` -> [0, 1, 2, 3, 4]; ``"0,2,5"`` -> [0, 2, 5]."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise ConfigError(f"invalid --seeds {text!r}: use a range like 0-4 or a list like 0,2,5.") from None
    return out


def spec_from_dict(data: Any, source: str) -> SweepSpec:
    """Validate a spec's keys, command, fields and values; each problem is one sentence naming ``source``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} is not a sweep spec (a YAML mapping with system, base, grid, seeds).")
    known = {f.name for f in dataclasses.fields(SweepSpec)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; a spec has {', '.join(sorted(known))}.")
    if "system" not in data:
        raise ConfigError(f"{source}: the spec names no system (e.g. `system: synther`).")
    data = {"name": Path(source).stem, **data}
    data["command"] = data.get("command") or ""
    seeds = data.get("seeds", [0])
    data["seeds"] = parse_seeds(seeds) if isinstance(seeds, str) else [int(s) for s in seeds]
    for key in ("base", "arms", "grid"):
        if not isinstance(data.get(key, {}), dict):
            raise ConfigError(f"{source}: {key} must be a mapping of field names to values.")
    data["arms"] = {k: ({} if v is None else v) for k, v in data.get("arms", {}).items()}  # `arm:` alone: no fields
    if data.get("results") is not None and not isinstance(data["results"], str):
        raise ConfigError(f"{source}: results must be a path to a JSONL file, e.g. benchmarks/results/NAME.jsonl.")
    spec = SweepSpec(**data)
    for field, values in spec.grid.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"{source}: the grid of {field} is empty; give it one or more values.")
    if not spec.seeds:
        raise ConfigError(f"{source}: no seeds; give e.g. `seeds: [0, 1, 2]`.")
    ids = [t.id for t in trials(spec)]
    clash = sorted({i for i in ids if ids.count(i) > 1})
    if clash:
        raise ConfigError(f"{source}: several trials would be named {clash[0]}; give the arms, grid values or seeds "
                          "distinct names.")
    for arm, values in spec.arms.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: arm {arm} must be a mapping of field names to values.")
    # base and grid apply to every arm's algorithm, an arm's fields to its own
    arms = {a: dict(v) for a, v in spec.arms.items()} or {"": {}}
    for arm, values in arms.items():
        command, algo = resolve_command(spec, values.pop("algo", None))
        cls = command.configs[algo]
        fields = {f.name for f in dataclasses.fields(cls)}
        for where, names in [("base", spec.base), ("grid", spec.grid), (f"arm {arm}", values)]:
            bad = sorted(set(names) - fields)
            if bad:
                raise ConfigError(f"{source}: {where} sets unknown field(s) {', '.join(bad)} of {cls.__name__}.")
            owned = sorted(set(names) & OWNED)
            if owned:
                raise ConfigError(f"{source}: {where} sets {', '.join(owned)}, which the sweep sets for each "
                                  "trial.")
    return spec


def resolve_command(spec: SweepSpec, algo: str | None = None) -> tuple[registry.Command, str]:
    """The registered command and algorithm (``algo``, else the spec's) a spec names (one sentence if none)."""
    system = registry.get(spec.system)
    if system is None:
        raise ConfigError(f"unknown system {spec.system!r}: choose one of {', '.join(registry.names())}.")
    command = system.command(spec.command)
    if command is None:
        words = ", ".join(repr(c.name) for c in system.commands) or "none"
        raise ConfigError(f"`diffrl {spec.system}` has no training command {spec.command!r} (it has {words}).")
    algo = algo if algo is not None else spec.algo
    algo = algo if algo is not None else (command.default_algo or next(iter(command.configs)))
    if algo not in command.configs:
        raise ConfigError(f"unknown algorithm {algo!r} for `diffrl {spec.system} {spec.command}`: choose one of "
                          f"{', '.join(command.configs)}.")
    if spec.preset is not None and spec.preset not in command.presets.get(algo, {}):
        raise ConfigError(f"unknown preset {spec.preset!r}: choose one of {', '.join(command.presets.get(algo, {}))}.")
    return command, algo


def _short(v: Any) -> Any:
    """A grid value as it appears in a trial's name: a path by its file name without suffix."""
    return Path(v).stem if isinstance(v, str) and "/" in v else v


def _label(values: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={_short(v)}" for k, v in values.items())


def trials(spec: SweepSpec) -> list[Trial]:
    """Every (arm x grid point x seed), in a fixed order."""
    arms = spec.arms or {"": {}}
    names = list(spec.grid)
    out = []
    for arm, fields in arms.items():
        fields = dict(fields)
        algo = fields.pop("algo", None)
        for point in itertools.product(*(spec.grid[n] for n in names)):
            values = dict(zip(names, point))
            label = ",".join(x for x in (arm, _label(values)) if x) or "run"
            for seed in spec.seeds:
                out.append(Trial(f"{slug(label)}-s{seed}", label, seed, {**spec.base, **fields, **values}, algo))
    return out


_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _fill(value: Any, names: Mapping[str, Any]) -> Any:
    """``{seed}``, ``{root}`` and ``{FIELD}`` (another field of the trial) in a string value; other braces stay."""
    if not isinstance(value, str):
        return value
    return _PLACEHOLDER.sub(lambda m: str(names[m[1]]) if m[1] in names else m[0], value)


def trial_config(spec: SweepSpec, trial: Trial, run_dir: Path, resume: bool) -> Any:
    """The trial's config, built as its own command would build it: preset values, then the trial's fields."""
    from diffrl.cli import as_args, parse_config

    command, algo = resolve_command(spec, trial.algo)
    root = run_dir.parent.parent.parent  # <root>/<sweep>/trials/<trial>
    scalars = {k: v for k, v in trial.fields.items() if isinstance(v, (str, int, float))}
    # {FIELD} is the value; {FIELD_name} the value as trial ids spell it (a path by its file stem, slugged)
    names = {**scalars, **{f"{k}_name": slug(str(_short(v))) for k, v in scalars.items()}, "seed": trial.seed,
             "root": root}
    fields = {k: _fill(v, names) for k, v in trial.fields.items()}
    preset = {} if spec.preset is None else command.presets.get(algo, {}).get(spec.preset)
    if preset is None:
        raise ConfigError(f"algorithm {algo} of `diffrl {spec.system} {spec.command}` has no preset {spec.preset!r}.")
    args = as_args(dict(preset)) + as_args({**fields, "seed": trial.seed, "progress": False})
    cfg = parse_config(command.configs[algo], args, f"diffrl {spec.system} {spec.command}".strip())
    return dataclasses.replace(cfg, resume=run_dir, run_dir=None) if resume else dataclasses.replace(
        cfg, run_dir=run_dir)


# ------------------------------------------------------------------------------------------------ one trial
def trial_state(run_dir: Path) -> str:
    """``done`` (summary written), ``running`` (a live process holds its lock), ``failed`` (an ``.error`` file),
    ``partial`` (a checkpoint to resume from), ``pending``."""
    if (run_dir / SUMMARY_FILE).is_file():
        return "done"
    if is_locked(run_dir):
        return "running"
    if run_dir.with_suffix(".error").is_file():
        return "failed"
    return "partial" if list_checkpoints(run_dir / "checkpoints") else "pending"


PROVENANCE_FILE = "provenance.json"


def note_provenance(run_dir: Path, prov: dict[str, Any] | None) -> None:
    """Add this start of the trial (the driver's code revision, versions, machine, and the pid of the process that
    ran it) to ``provenance.json``: a trial resumed under other code lists every revision it ran under."""
    if prov is None:
        return
    from diffrl.runs.rundir import write_json_atomic

    write_json_atomic(run_dir / PROVENANCE_FILE, [*read_starts(run_dir), {**prov, "pid": os.getpid()}])


def read_starts(run_dir: Path) -> list[dict[str, Any]]:
    """The provenance of each start of the trial (``note_provenance``), oldest first; none if never noted."""
    path = run_dir / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def run_trial(sweep_dir: Path, spec: SweepSpec, trial: Trial, prov: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume, or skip) one trial; never raises for the trial's own failure: returns its status row.

    The trial holds its run directory's lock from the first check to the end, so several drivers may work on one
    sweep (e.g. ``diffrl sweep SPEC`` started twice, one thread each): a trial that another live process is running
    is skipped (status ``running elsewhere``), not failed.
    """
    run_dir = sweep_dir / "trials" / trial.id
    error = run_dir.with_suffix(".error")
    if trial_state(run_dir) == "done":
        return {"trial": trial.id, "status": "done"}
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = lock_run_dir(run_dir)
    except RunLocked:
        return {"trial": trial.id, "status": "running elsewhere"}
    t0 = time.perf_counter()
    try:
        if trial_state(run_dir) == "done":  # finished by another driver between the first check and the lock
            return {"trial": trial.id, "status": "done"}
        resume = bool(list_checkpoints(run_dir / "checkpoints"))
        if not resume and (run_dir / CONFIG_FILE).exists():  # started, never checkpointed: keep it aside, restart
            aside = sweep_dir / "trials" / ".attempts" / f"{trial.id}-{time.strftime('%Y%m%d-%H%M%S')}"
            aside.mkdir(parents=True)
            for child in run_dir.iterdir():
                if child.name != LOCK_FILE:  # the lock stays: this process holds it
                    shutil.move(str(child), str(aside / child.name))
        error.unlink(missing_ok=True)
        note_provenance(run_dir, prov)
        reset_peak_rss()  # the trial's peak memory, not the driver's or an earlier trial's (runs/memory.py)
        command, _ = resolve_command(spec, trial.algo)
        command.run(trial_config(spec, trial, run_dir, resume))
    except (DiffrlError, SystemExit) as e:
        message = str(e) if isinstance(e, DiffrlError) else f"its config was rejected (exit status {e.code})"
        error.write_text(message + "\n")
        return {"trial": trial.id, "status": "failed", "error": message}
    except Exception as e:  # noqa: BLE001 - a trial's bug must not stop the sweep; its traceback is kept
        error.write_text(f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}")
        return {"trial": trial.id, "status": "failed", "error": f"{type(e).__name__}: {e}"}
    finally:
        lock.release()
    return {"trial": trial.id, "status": "done", "wall_s": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------ recorded
# config fields that say where and how a run was started (or where it keeps stages it shares), not what it computes
_PLACE = frozenset({"run_dir", "resume", "progress", "runs_root", "stage_cache"})


def _comparable(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config as a JSON row holds it (tuples as lists, paths as strings), less the fields of ``_PLACE``."""
    return {k: v for k, v in json.loads(json.dumps(dict(config), default=str)).items() if k not in _PLACE}


def _dataset_fingerprint(path: str, cache: dict[str, str | None]) -> str | None:
    """The fingerprint of the dataset file at ``path`` as runs record it (None if it cannot be read)."""
    if path not in cache:
        from diffrl.data import fingerprint, load_dataset

        try:
            cache[path] = fingerprint(load_dataset(path))
        except (DiffrlError, OSError):
            cache[path] = None
    return cache[path]


def recorded_trials(sweep_dir: Path, spec: SweepSpec, prints: dict[str, str | None] | None = None) -> set[str]:
    """The trials whose row is already in ``spec.results`` with the config they would run with now (same sweep,
    trial id, command and every field but where the run lives) and, for a trial that reads a dataset, the same
    data: the row's ``dataset_fingerprint`` equals the fingerprint of the file the trial would read now (a row
    without one, or a dataset built anew with other contents, runs again). What ``--skip-recorded`` counts as
    finished, so a fresh clone completes a sweep whose rows were committed without running them again."""
    if spec.results is None:
        return set()
    from diffrl.config import to_dict
    from diffrl.runs import results

    rows = [r for r in results.read_rows(spec.results) if r.get("sweep") == spec.name]
    recorded: dict[str, list[tuple[dict[str, Any], Any]]] = {}
    for row in rows:
        recorded.setdefault(row.get("trial"), []).append(
            (_comparable(row.get("config") or {}), (row.get("final") or {}).get("dataset_fingerprint")))
    out: set[str] = set()
    prints = {} if prints is None else prints  # dataset path -> fingerprint, shared with stale_trials
    for trial in trials(spec):
        if trial.id not in recorded:
            continue
        cfg = trial_config(spec, trial, sweep_dir / "trials" / trial.id, resume=False)
        want = _comparable(to_dict(cfg))
        defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING}
        added = _comparable({k: v for k, v in ADDED_FIELDS.items()  # listed, and this command's default
                             if k in defaults and _comparable({k: defaults[k]}) == _comparable({k: v})})
        # a field naming another trial's run under the sweeps' root: compared by what follows the root, so a row
        # recorded under another root (a fresh clone elsewhere, an absolute --root) is still this trial's
        rooted = {k: str(want[k])[len(str(sweep_dir.parent)):] for k, v in trial.fields.items()
                  if isinstance(v, str) and "{root}" in v and str(want.get(k, "")).startswith(str(sweep_dir.parent))}
        data = getattr(cfg, "dataset", None)
        for config, fp in recorded[trial.id]:
            if _same_config(config, want, added, rooted) and (
                    not isinstance(data, str) or not data or
                    (fp is not None and fp == _dataset_fingerprint(data, prints))):
                out.add(trial.id)
                break
    return out


# Fields added to commands after committed rows were recorded, each with the value that runs what the command ran
# before the field existed (checked when it was added: the default path unchanged). A row without such a field is
# the run of a trial that has it at this value, where it is also the trial's command's default (a command whose
# default differs, e.g. PPO's adam_eps, had the field from its start or is not vouched for). A field added with a new
# behaviour at its default must not go here: rows from before it then run again (the safe side), as they do for any
# field missing from this table.
ADDED_FIELDS: dict[str, Any] = {
    "agent_bf16": False,  # synther online / train: bf16 autocast opt-in (2026-12-03)
    "adam_eps": 1e-8,  # PPO-family agents: torch's AdamW default, which they used before (2026-12-04)
    "joint_grad_clip": False,  # PPO-family agents: one norm over both networks, opt-in (2026-12-04)
    "orthogonal_init": False,  # PPO-family agents: orthogonal initialisation, opt-in (2026-12-04)
    "q_action": "chain",  # Diffusion-QL: Dydiff's pred_start, opt-in (2026-12-05)
    "eval_draw": False,  # Diffusion-QL: the softmax draw at evaluation, opt-in (2026-12-05)
}


def _same_config(row: Mapping[str, Any], want: Mapping[str, Any], added: Mapping[str, Any],
                 rooted: Mapping[str, str]) -> bool:
    """Whether a row's config is the one a trial would run with now, field for field, except: a field the row lacks
    matches when ``added`` (the :data:`ADDED_FIELDS` at the trial's command's defaults) has it and the trial would run
    it at that value (so adding an option does not orphan every committed row); a field in ``rooted`` matches when
    the row's value ends with the same path below the sweeps' root."""
    for key in set(row) | set(want):
        if key in rooted and key in row:
            if not str(row[key]).endswith(rooted[key]):
                return False
        elif key not in row:
            if key not in added or want.get(key) != added[key]:
                return False
        elif row[key] != want.get(key, object()):
            return False
    return True


def stale_trials(sweep_dir: Path, spec: SweepSpec,
                 prints: dict[str, str | None] | None = None) -> dict[str, tuple[str, str]]:
    """The finished trials whose run read a dataset that has changed since: trial id -> (the fingerprint its
    ``summary.json`` recorded, the file's now). A sweep counts them as finished (their results stand for the data
    they ran on); ``run_sweep(rerun_stale=True)`` moves their run directories aside and runs them again."""
    out: dict[str, tuple[str, str]] = {}
    prints = {} if prints is None else prints  # dataset path -> fingerprint, shared with recorded_trials
    for trial in trials(spec):
        run_dir = sweep_dir / "trials" / trial.id
        if trial_state(run_dir) != "done":
            continue
        ran_on = read_summary(run_dir).get("dataset_fingerprint")
        data = getattr(trial_config(spec, trial, run_dir, resume=False), "dataset", None)
        if not ran_on or not isinstance(data, str) or not data:
            continue
        now = _dataset_fingerprint(data, prints)
        if now is not None and now != ran_on:
            out[trial.id] = (ran_on, now)
    return out


def move_aside(sweep_dir: Path, trial_ids: Sequence[str], why: str) -> Path:
    """Move the run directories of ``trial_ids`` to ``trials/.<why>/<id>-<time>`` (kept, never deleted): the
    trials are pending again. Returns the folder they went to."""
    aside = sweep_dir / "trials" / f".{why}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside.mkdir(parents=True, exist_ok=True)
    for trial_id in trial_ids:
        shutil.move(str(sweep_dir / "trials" / trial_id), str(aside / f"{trial_id}-{stamp}"))
    return aside


# ------------------------------------------------------------------------------------------------ runners
def set_threads(cpus: int | None) -> None:
    """Give this process ``cpus`` torch / OpenMP threads (two 2-thread processes on 2 cores slow each other ~20x)."""
    if cpus:
        import torch

        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(cpus)
        torch.set_num_threads(cpus)


def run_local(sweep_dir: Path, spec: SweepSpec, todo: Sequence[Trial], cpus_per_trial: int | None,
              report: Callable[[], None], prov: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The trials one after the other in this process (``report()`` after each)."""
    set_threads(cpus_per_trial)
    rows = []
    for trial in todo:
        rows.append(run_trial(sweep_dir, spec, trial, prov))
        report()
    return rows


def run_workers(sweep_dir: Path, spec: SweepSpec, todo: Sequence[Trial], workers: int, cpus_per_trial: int,
                out: Callable[[str], None], prov: dict[str, Any] | None = None) -> None:
    """The local runner with ``workers`` processes: each goes through the trials as a driver of its own would,
    running those no other process holds (the run directory's lock), with ``cpus_per_trial`` threads; this process
    waits for them (its status table keeps printing and recording rows)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch / OpenMP state
    procs = [ctx.Process(target=run_local, args=(sweep_dir, spec, todo, cpus_per_trial, _quiet, prov),
                         name=f"diffrl-sweep-worker-{i}") for i in range(workers)]
    for proc in procs:
        proc.start()
    try:
        for proc in procs:
            proc.join()
    finally:
        for proc in procs:  # interrupted (Ctrl-C reaches the workers too): do not leave them behind
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
    for i, proc in enumerate(procs):
        if proc.exitcode != 0:
            out(f"worker {i} stopped with exit status {proc.exitcode}; start the sweep again to finish its trials.")


def _quiet() -> None:
    """A worker's report: nothing (the driver prints the table)."""


def record_results(sweep_dir: Path, spec: SweepSpec) -> int:
    """Append the row of every finished trial not yet in ``spec.results``; returns how many were added.

    A row names its sweep, trial and the time its run finished, so a trial re-run later (e.g. in a fresh clone)
    adds a new row and a finished one is never recorded twice, also when several drivers work on the sweep (they
    record one at a time: a lock on ``RECORD_LOCK`` in the sweep directory).
    """
    if spec.results is None:
        return 0
    with one_at_a_time(sweep_dir / RECORD_LOCK):
        return _record(sweep_dir, spec)


def _record(sweep_dir: Path, spec: SweepSpec) -> int:
    from diffrl.runs import results

    rows = results.read_rows(spec.results)
    seen = {(r.get("sweep"), r.get("trial"), r.get("finished")) for r in rows}
    added = 0
    for trial in trials(spec):
        run_dir = sweep_dir / "trials" / trial.id
        if trial_state(run_dir) != "done":
            continue
        if (spec.name, trial.id, results.finished_at(run_dir)) in seen:
            continue
        starts = read_starts(run_dir) or [results.provenance()]
        # the code of the trial's last start (and, when it was resumed under other code, every start's)
        row = {"sweep": spec.name, "trial": trial.id, "arm": trial.arm, **results.run_row(run_dir), **starts[-1],
               "starts": [{k: s.get(k) for k in ("git_rev", "git_dirty", "date")} for s in starts]}
        results.append_row(spec.results, row)
        added += 1
    return added


class LiveTable:
    """While trials run: record finished trials' rows and print the status table — every ``every`` seconds when it
    changed, or with ``every <= 0`` only when a trial has finished (checked every :data:`POLL_S` seconds) — from a
    daemon thread of the driver, so it works the same for both runners and for worker processes, and a driver
    killed mid-sweep has recorded the rows of every trial finished by then."""

    def __init__(self, sweep_dir: Path, spec: SweepSpec, out: Callable[[str], None], every: float,
                 recorded: set[str] | frozenset[str] = frozenset(), stale: frozenset[str] = frozenset()) -> None:
        self.sweep_dir, self.spec, self.out, self.every = sweep_dir, spec, out, every
        # the driver's, found once: not re-read (rows, dataset hashes) at every tick
        self.recorded, self.stale = recorded, stale
        self._last = ""
        self._finished: frozenset[str] = frozenset()  # with every <= 0: the finished trials at the last look
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def finished(self) -> frozenset[str]:
        return frozenset(t.id for t in trials(self.spec) if trial_state(self.sweep_dir / "trials" / t.id) == "done")

    def tick(self, when_finished: bool = False) -> None:
        """Record the rows of newly finished trials; print the table if it changed (with ``when_finished``: only
        if the set of finished trials changed since the last tick)."""
        with self._lock:
            record_results(self.sweep_dir, self.spec)
            if when_finished:
                done = self.finished()
                if done == self._finished:
                    return
                self._finished = done
            table = status_table(self.sweep_dir, self.recorded, self.stale)
            if table != self._last:
                self.out(table)
                self._last = table

    def _loop(self) -> None:
        period = self.every if self.every > 0 else POLL_S
        while not self._stop.wait(period):
            try:
                self.tick(when_finished=self.every <= 0)
            except Exception as e:  # noqa: BLE001 - a progress display must never stop the sweep
                self.out(f"(status table skipped: {e})")

    def __enter__(self) -> LiveTable:
        if self.every <= 0:  # the trials finished before this driver started: recorded, not announced
            with self._lock:
                record_results(self.sweep_dir, self.spec)
                self._finished = self.finished()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.tick()


def run_ray(sweep_dir: Path, spec: SweepSpec, todo: Sequence[Trial], cpus_per_trial: int, gpus_per_trial: float,
            address: str | None, max_concurrent: int | None,
            prov: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The trials as Ray Tune trials: a local Ray instance sized to the machine, or the cluster at ``address``."""
    try:
        import ray
        from ray import tune
    except ImportError:
        raise ConfigError("--runner ray needs Ray Tune: pip install 'diffrl[ray]'.") from None
    threads = str(max(int(cpus_per_trial), 1))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "DIFFRL_PROGRESS": "0"}
    ray.init(address=address, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False,
             runtime_env={"env_vars": env}, configure_logging=False)
    have = ray.cluster_resources()
    for name, want, flag in (("GPU", gpus_per_trial, "--gpus-per-trial"), ("CPU", cpus_per_trial, "--cpus-per-trial")):
        if want > have.get(name, 0.0):
            ray.shutdown()
            raise ConfigError(f"{flag} {want:g} asks for more than the Ray cluster has ({have.get(name, 0.0):g} "
                              f"{name}s), so no trial could start; lower it or join a cluster with --address.")
    by_id = {t.id: t for t in todo}
    spec_dict = spec.to_dict()

    def trainable(config: dict[str, Any]) -> None:
        set_threads(int(threads))
        # Ray starts trials in their own working directory: paths a spec gives relative (datasets, policies) are
        # relative to where the driver was started, as with the local runner
        if os.path.isdir(config["cwd"]):
            os.chdir(config["cwd"])
        s = SweepSpec(**config["spec"])
        tune.report(run_trial(Path(config["sweep_dir"]), s, Trial(**config["trial"]), config["prov"]))

    try:
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": cpus_per_trial, "gpu": gpus_per_trial}),
            param_space={"trial": tune.grid_search([dataclasses.asdict(by_id[i]) for i in by_id]),
                         "spec": spec_dict, "sweep_dir": str(sweep_dir.resolve()), "prov": prov,
                         "cwd": os.getcwd()},
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent),
            run_config=tune.RunConfig(storage_path=str((sweep_dir / "ray").resolve()), name="tune", verbose=0))
        results = tuner.fit()
        return [r.metrics for r in results if r.metrics]
    finally:
        ray.shutdown()


def check_growth(sweep_dir: Path, spec: SweepSpec) -> int:
    """How many trials ``spec`` adds to the sweep saved in ``sweep_dir``; a ConfigError if it is not a growth.

    A spec may add arms, grid values or seeds to a sweep (e.g. going from 3 to 5 seeds) as long as every trial
    of the saved spec is still in it, with the same config, so finished and partial runs stay what they were.
    """
    def refuse(why: str) -> ConfigError:
        return ConfigError(f"{sweep_dir} holds another sweep ({why}); give this one another name or keep the "
                           "saved trials unchanged (nothing was changed).")

    try:
        old = spec_from_dict(load_yaml(sweep_dir / SPEC_FILE), str(sweep_dir / SPEC_FILE))
        old_trials = trials(old)
    except ConfigError:
        raise refuse(f"its {SPEC_FILE} no longer builds") from None
    new = {t.id: t for t in trials(spec)}
    for t in old_trials:
        run_dir = sweep_dir / "trials" / t.id
        if t.id not in new:
            raise refuse(f"trial {t.id} is not in the new spec")
        if trial_config(old, t, run_dir, resume=False) != trial_config(spec, new[t.id], run_dir, resume=False):
            raise refuse(f"trial {t.id} would run with another config")
        if resolve_command(old, t.algo)[0] is not resolve_command(spec, new[t.id].algo)[0]:
            raise refuse(f"trial {t.id} would run another command")
    return len(new) - len(old_trials)


def run_sweep(spec: SweepSpec, root: Path = Path("runs/sweeps"), runner: str = "local", *,
              cpus_per_trial: int | None = None, gpus_per_trial: float = 0.0, address: str | None = None,
              max_concurrent: int | None = None, table_every: float = 60.0, workers: int = 1,
              skip_recorded: bool = False, rerun_stale: bool = False, out: Callable[[str], None] = print) -> Path:
    """Run every unfinished trial of ``spec`` under ``root/<name>``; returns the sweep directory.

    The same spec continues where it stopped; a spec that only adds trials (arms, grid values, seeds) grows the
    sweep; one that would change or drop a saved trial is refused (nothing is changed). With ``skip_recorded``, a
    trial whose row is already in the spec's results file with the same config counts as finished
    (:func:`recorded_trials`); by default it runs again and adds a newer row (a reproduction). A finished trial
    whose dataset has changed since it ran (:func:`stale_trials`) counts as finished, with a warning; with
    ``rerun_stale`` its run directory is moved to ``trials/.stale`` and it runs again on the current data.
    """
    if runner not in RUNNERS:
        raise ConfigError(f"unknown runner {runner!r}: choose local or ray.")
    if runner == "local" and (gpus_per_trial or address or max_concurrent):
        flag = "--gpus-per-trial" if gpus_per_trial else "--address" if address else "--max-concurrent"
        raise ConfigError(f"{flag} needs --runner ray (the local runner runs one trial at a time per worker; "
                          "--workers N runs N at a time).")
    if workers < 1:
        raise ConfigError(f"invalid --workers {workers}: it must be at least 1.")
    if runner == "ray" and workers > 1:
        raise ConfigError("--workers is the local runner's; Ray runs trials side by side by itself "
                          "(--max-concurrent caps them).")
    sweep_dir = Path(root) / slug(spec.name)
    saved = sweep_dir / SPEC_FILE
    grown = check_growth(sweep_dir, spec) if saved.is_file() and load_yaml(saved) != spec.to_dict() else 0
    all_trials = trials(spec)
    for trial in all_trials:  # every trial's config must build before any runs
        trial_config(spec, trial, sweep_dir / "trials" / trial.id, resume=False)
    (sweep_dir / "trials").mkdir(parents=True, exist_ok=True)
    save_yaml(spec.to_dict(), saved)
    prints: dict[str, str | None] = {}  # each dataset is hashed once for both checks
    stale = stale_trials(sweep_dir, spec, prints)
    if stale and rerun_stale:
        aside = move_aside(sweep_dir, sorted(stale), "stale")
        out(f"{len(stale)} finished trial(s) ran on a dataset that has changed since: their run directories are "
            f"now in {aside}; they run again on the current data.")
        stale = {}
    elif stale:
        out(f"warning: {len(stale)} finished trial(s) ran on a dataset that has changed since "
            f"({', '.join(sorted(stale))}); they count as finished (state 'stale' in sweep status): "
            "--rerun-stale runs them again on the current data, their run directories kept in trials/.stale.")
    recorded = recorded_trials(sweep_dir, spec, prints) if skip_recorded else set()
    unfinished = [t for t in all_trials if trial_state(sweep_dir / "trials" / t.id) != "done"]
    skipped = sum(t.id in recorded for t in unfinished)
    # seed-major: every arm's seed 0, then every arm's seed 1, ... so a sweep stopped part-way has paired seeds
    todo = sorted((t for t in unfinished if t.id not in recorded), key=lambda t: list(spec.seeds).index(t.seed))
    out(f"sweep {sweep_dir}: {len(all_trials)} trials, {len(all_trials) - len(unfinished)} finished, "
        + (f"{skipped} recorded in {spec.results} (skipped), " if skip_recorded else "")
        + f"{len(todo)} to run ({runner} runner{f', {workers} workers' if workers > 1 else ''})"
        + (f"; the spec grew: {grown} new trial(s)" if grown else ""))
    from diffrl.runs.results import provenance

    prov = provenance()  # of the code this driver imported: each trial it starts records it (provenance.json)
    with LiveTable(sweep_dir, spec, out, table_every, recorded, frozenset(stale)) as live:
        if runner == "ray":
            run_ray(sweep_dir, spec, todo, cpus_per_trial or 1, gpus_per_trial, address, max_concurrent, prov)
        elif workers > 1:
            run_workers(sweep_dir, spec, todo, workers, cpus_per_trial or 1, out, prov)
        else:  # and the table after every trial
            run_local(sweep_dir, spec, todo, cpus_per_trial, live.tick, prov)
    failed = [t.id for t in todo if trial_state(sweep_dir / "trials" / t.id) == "failed"]
    if failed:
        out(f"{len(failed)} trial(s) failed: {', '.join(failed)} (errors in {sweep_dir / 'trials'}/<trial>.error); "
            "start the sweep again to retry them.")
    return sweep_dir


# ------------------------------------------------------------------------------------------------ status
def saved_spec(sweep_dir: Path) -> SweepSpec:
    """The spec a sweep directory was last run with (its ``sweep.yaml``); one sentence if it is not a sweep's."""
    if not (sweep_dir / SPEC_FILE).is_file():
        raise ConfigError(f"{sweep_dir} is not a sweep directory (no {SPEC_FILE}).")
    return spec_from_dict(load_yaml(sweep_dir / SPEC_FILE), str(sweep_dir / SPEC_FILE))


def status_rows(sweep_dir: Path, recorded: set[str] | frozenset[str] | None = None,
                stale: set[str] | frozenset[str] | None = None) -> list[dict[str, Any]]:
    """Per trial: arm, seed, state (:func:`trial_state`; ``recorded`` for a pending trial in ``recorded``, by
    default :func:`recorded_trials`; ``stale`` for a finished one in ``stale``, by default :func:`stale_trials`),
    steps done of the budget, latest evaluation, ETA (seconds, None if unknown)."""
    spec = saved_spec(sweep_dir)
    rows = []
    prints: dict[str, str | None] = {}
    if recorded is None:
        recorded = recorded_trials(sweep_dir, spec, prints)
    if stale is None:
        stale = set(stale_trials(sweep_dir, spec, prints))
    for trial in trials(spec):
        run_dir = sweep_dir / "trials" / trial.id
        state = trial_state(run_dir)
        if state == "pending" and trial.id in recorded:
            state = "recorded"  # not run here; its row is in the results file (--skip-recorded skips it)
        elif state == "done" and trial.id in stale:
            state = "stale"  # finished on a dataset that has changed since (--rerun-stale runs it again)
        metrics = read_metrics(run_dir) if (run_dir / "metrics.csv").is_file() else []
        metric = resolve_command(spec, trial.algo)[0].report_metric  # e.g. the success rate for goal tasks
        evals = [r for r in metrics if not math.isnan(r.get(metric, math.nan))]
        budget = trial_config(spec, trial, run_dir, resume=False)
        total = getattr(budget, "steps", None)
        step = int(metrics[-1]["step"]) if metrics else 0
        row = {"trial": trial.id, "arm": trial.arm, "seed": trial.seed, "state": state, "step": step,
               "steps": total, "return": evals[-1][metric] if evals else None, "eta_s": None}
        if state in ("done", "stale"):
            if metric == "eval/return_mean":
                row["return"] = read_summary(run_dir).get("eval_return_mean", row["return"])
            row["step"] = total or step
        elif metrics and total and step:
            # the recent rate (the last logged interval), not the average: warm-up phases without updates run
            # many times faster than the rest, and a resumed run's first rows say nothing of its later ones
            recent = [r for r in metrics if r["step"] < step]
            before = recent[-1] if recent else {"step": 0, "wall_s": 0.0}
            rate = (metrics[-1]["wall_s"] - before["wall_s"]) / max(step - before["step"], 1)
            row["eta_s"] = max(rate, 0.0) * max(total - step, 0)
        if state == "failed":
            row["error"] = run_dir.with_suffix(".error").read_text().splitlines()[0]
        rows.append(row)
    return rows


def status_table(sweep_dir: Path, recorded: set[str] | frozenset[str] | None = None,
                 stale: set[str] | frozenset[str] | None = None) -> str:
    """The status rows as a text table (trial, arm, seed, steps, latest return, state, ETA)."""
    lines = [f"{'trial':<32} {'arm':<24} {'seed':>4} {'steps':>15} {'latest':>9} {'state':<8} {'eta':>7}"]
    for r in status_rows(sweep_dir, recorded, stale):
        steps = f"{r['step']}/{r['steps']}" if r["steps"] else str(r["step"])
        ret = f"{r['return']:.1f}" if r["return"] is not None else "-"
        eta = f"{r['eta_s'] / 60:.0f} min" if r["eta_s"] is not None else "-"
        lines.append(f"{r['trial'][:32]:<32} {r['arm'][:24]:<24} {r['seed']:>4} {steps:>15} {ret:>9} "
                     f"{r['state']:<8} {eta:>7}" + (f"  {r['error']}" if "error" in r else ""))
    return "\n".join(lines)
