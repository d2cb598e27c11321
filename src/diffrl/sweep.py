"""``diffrl sweep``: many runs of a registered system — arms x grid points x seeds — each a trial that runs the
system exactly as its own command would, in its own run directory under the sweep directory.

    diffrl sweep SPEC.yaml [--runner local|ray] [--address ADDR] [--cpus-per-trial C] [--gpus-per-trial G]
    diffrl sweep synther online --env HalfCheetah-v5 --seeds 0-4 --grid utd=1,20 --grid synthetic_ratio=0,0.5
    diffrl sweep status SWEEP_DIR

A spec (YAML)::

    name: synther-controls          # the sweep directory: <root>/<name> (root: runs/sweeps)
    system: synther                 # a registered CLI group ...
    command: online                 # ... and its command ("" for single-command systems such as iter)
    algo: sac                       # the algorithm, where the command has a choice
    preset: quick                   # optional; fields below override it
    base: {env: HalfCheetah-v5, steps: 30000}
    arms: {sac-utd20: {synthetic_ratio: 0.0}, synther: {}}    # optional named arms ...
    grid: {utd: [1, 20]}                                       # ... crossed with the grid's points
    seeds: [0, 1, 2]

The sweep directory holds ``sweep.yaml`` (the resolved spec), ``trials/<trial>/`` (normal run directories) and
``trials/<trial>.error`` for a trial that failed. Started again, a sweep skips finished trials (their
``summary.json``), resumes unfinished ones from their own checkpoints (so their curves equal an uninterrupted
sweep's) and retries failed ones; a failing trial is reported with its one-sentence error and does not stop the
others. ``--runner ray`` runs the trials as Ray Tune trials (``pip install 'diffrl[ray]'``) on a local Ray instance
sized to the machine, or on an existing cluster with ``--address``; each trial's torch / OpenMP threads are set to
its CPU share. The local runner runs the trials one after the other in this process.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import shutil
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from diffrl import registry
from diffrl.config import load_yaml, save_yaml
from diffrl.errors import ConfigError, DiffrlError
from diffrl.runs.checkpoint import list_checkpoints
from diffrl.runs.lock import lock_run_dir
from diffrl.runs.logger import read_metrics
from diffrl.runs.rundir import CONFIG_FILE, SUMMARY_FILE, read_summary, slug

SPEC_FILE = "sweep.yaml"
RUNNERS = ("local", "ray")
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

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "system": self.system, "command": self.command, "algo": self.algo,
                "preset": self.preset, "base": dict(self.base), "arms": {k: dict(v) for k, v in self.arms.items()},
                "grid": {k: list(v) for k, v in self.grid.items()}, "seeds": list(self.seeds)}


@dataclasses.dataclass(frozen=True)
class Trial:
    """One (arm, grid point, seed): its id (the run directory's name), arm label, seed and field overrides."""

    id: str
    arm: str
    seed: int
    fields: Mapping[str, Any]


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
    spec = SweepSpec(**data)
    for field, values in spec.grid.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"{source}: the grid of {field} is empty; give it one or more values.")
    if not spec.seeds:
        raise ConfigError(f"{source}: no seeds; give e.g. `seeds: [0, 1, 2]`.")
    command, algo = resolve_command(spec)
    fields = {f.name for f in dataclasses.fields(command.configs[algo])}
    for where, names in [("base", spec.base), ("grid", spec.grid),
                         *((f"arm {a}", v) for a, v in spec.arms.items())]:
        bad = sorted(set(names) - fields)
        if bad:
            raise ConfigError(f"{source}: {where} sets unknown field(s) {', '.join(bad)} of "
                              f"{command.configs[algo].__name__}.")
        owned = sorted(set(names) & OWNED)
        if owned:
            raise ConfigError(f"{source}: {where} sets {', '.join(owned)}, which the sweep sets for each trial.")
    return spec


def resolve_command(spec: SweepSpec) -> tuple[registry.Command, str]:
    """The registered command and algorithm a spec names (one sentence if it names none)."""
    system = registry.get(spec.system)
    if system is None:
        raise ConfigError(f"unknown system {spec.system!r}: choose one of {', '.join(registry.names())}.")
    command = system.command(spec.command)
    if command is None:
        words = ", ".join(repr(c.name) for c in system.commands) or "none"
        raise ConfigError(f"`diffrl {spec.system}` has no training command {spec.command!r} (it has {words}).")
    algo = spec.algo if spec.algo is not None else (command.default_algo or next(iter(command.configs)))
    if algo not in command.configs:
        raise ConfigError(f"unknown algorithm {algo!r} for `diffrl {spec.system} {spec.command}`: choose one of "
                          f"{', '.join(command.configs)}.")
    if spec.preset is not None and spec.preset not in command.presets.get(algo, {}):
        raise ConfigError(f"unknown preset {spec.preset!r}: choose one of {', '.join(command.presets.get(algo, {}))}.")
    return command, algo


def _label(values: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in values.items())


def trials(spec: SweepSpec) -> list[Trial]:
    """Every (arm x grid point x seed), in a fixed order."""
    arms = spec.arms or {"": {}}
    names = list(spec.grid)
    out = []
    for arm, fields in arms.items():
        for point in itertools.product(*(spec.grid[n] for n in names)):
            values = dict(zip(names, point))
            label = ",".join(x for x in (arm, _label(values)) if x) or "run"
            for seed in spec.seeds:
                out.append(Trial(f"{slug(label)}-s{seed}", label, seed, {**spec.base, **fields, **values}))
    return out


def trial_config(spec: SweepSpec, trial: Trial, run_dir: Path, resume: bool) -> Any:
    """The trial's config, built as its own command would build it: preset values, then the trial's fields."""
    from diffrl.cli import as_args, parse_config

    command, algo = resolve_command(spec)
    args = ([] if spec.preset is None else as_args(dict(command.presets[algo][spec.preset]))) + as_args(
        {**trial.fields, "seed": trial.seed, "progress": False})
    cfg = parse_config(command.configs[algo], args, f"diffrl {spec.system} {spec.command}".strip())
    return dataclasses.replace(cfg, resume=run_dir, run_dir=None) if resume else dataclasses.replace(
        cfg, run_dir=run_dir)


# ------------------------------------------------------------------------------------------------ one trial
def trial_state(run_dir: Path) -> str:
    """``done`` (summary written), ``failed`` (an ``.error`` file), ``partial`` (a checkpoint to resume from),
    ``pending``."""
    if (run_dir / SUMMARY_FILE).is_file():
        return "done"
    if run_dir.with_suffix(".error").is_file():
        return "failed"
    return "partial" if list_checkpoints(run_dir / "checkpoints") else "pending"


def run_trial(sweep_dir: Path, spec: SweepSpec, trial: Trial) -> dict[str, Any]:
    """Run (or resume, or skip) one trial; never raises for the trial's own failure: returns its status row."""
    run_dir = sweep_dir / "trials" / trial.id
    error = run_dir.with_suffix(".error")
    state = trial_state(run_dir)
    if state == "done":
        return {"trial": trial.id, "status": "done"}
    resume = bool(list_checkpoints(run_dir / "checkpoints"))
    t0 = time.perf_counter()
    try:
        if not resume and (run_dir / CONFIG_FILE).exists():  # started, never checkpointed: keep it aside, restart
            with lock_run_dir(run_dir):  # refused (one sentence) while an earlier process still writes it
                attempts = sweep_dir / "trials" / ".attempts"
                attempts.mkdir(parents=True, exist_ok=True)
                shutil.move(str(run_dir), str(attempts / f"{trial.id}-{time.strftime('%Y%m%d-%H%M%S')}"))
        error.unlink(missing_ok=True)
        command, _ = resolve_command(spec)
        command.run(trial_config(spec, trial, run_dir, resume))
    except (DiffrlError, SystemExit) as e:
        message = str(e) if isinstance(e, DiffrlError) else f"its config was rejected (exit status {e.code})"
        error.write_text(message + "\n")
        return {"trial": trial.id, "status": "failed", "error": message}
    except Exception as e:  # noqa: BLE001 - a trial's bug must not stop the sweep; its traceback is kept
        error.write_text(f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}")
        return {"trial": trial.id, "status": "failed", "error": f"{type(e).__name__}: {e}"}
    return {"trial": trial.id, "status": "done", "wall_s": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------ runners
def set_threads(cpus: int | None) -> None:
    """Give this process ``cpus`` torch / OpenMP threads (two 2-thread processes on 2 cores slow each other ~20x)."""
    if cpus:
        import torch

        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(cpus)
        torch.set_num_threads(cpus)


def run_local(sweep_dir: Path, spec: SweepSpec, todo: Sequence[Trial], cpus_per_trial: int | None,
              report: Callable[[], None]) -> list[dict[str, Any]]:
    """The trials one after the other in this process (the table after each)."""
    set_threads(cpus_per_trial)
    rows = []
    for trial in todo:
        rows.append(run_trial(sweep_dir, spec, trial))
        report()
    return rows


def run_ray(sweep_dir: Path, spec: SweepSpec, todo: Sequence[Trial], cpus_per_trial: int, gpus_per_trial: float,
            address: str | None, max_concurrent: int | None) -> list[dict[str, Any]]:
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
    by_id = {t.id: t for t in todo}
    spec_dict = spec.to_dict()

    def trainable(config: dict[str, Any]) -> None:
        set_threads(int(threads))
        s = SweepSpec(**config["spec"])
        tune.report(run_trial(Path(config["sweep_dir"]), s, Trial(**config["trial"])))

    try:
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": cpus_per_trial, "gpu": gpus_per_trial}),
            param_space={"trial": tune.grid_search([dataclasses.asdict(by_id[i]) for i in by_id]),
                         "spec": spec_dict, "sweep_dir": str(sweep_dir.resolve())},
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent),
            run_config=tune.RunConfig(storage_path=str((sweep_dir / "ray").resolve()), name="tune", verbose=0))
        results = tuner.fit()
        return [r.metrics for r in results if r.metrics]
    finally:
        ray.shutdown()


def run_sweep(spec: SweepSpec, root: Path = Path("runs/sweeps"), runner: str = "local", *,
              cpus_per_trial: int | None = None, gpus_per_trial: float = 0.0, address: str | None = None,
              max_concurrent: int | None = None, out: Callable[[str], None] = print) -> Path:
    """Run every unfinished trial of ``spec`` under ``root/<name>``; returns the sweep directory.

    A directory that holds another spec is refused (nothing is changed); the same spec continues where it stopped.
    """
    if runner not in RUNNERS:
        raise ConfigError(f"unknown runner {runner!r}: choose local or ray.")
    sweep_dir = Path(root) / slug(spec.name)
    saved = sweep_dir / SPEC_FILE
    if saved.is_file() and load_yaml(saved) != spec.to_dict():
        raise ConfigError(f"{sweep_dir} holds another sweep (its {SPEC_FILE} differs); give this one another name "
                          "(nothing was changed).")
    all_trials = trials(spec)
    for trial in all_trials:  # every trial's config must build before any runs
        trial_config(spec, trial, sweep_dir / "trials" / trial.id, resume=False)
    (sweep_dir / "trials").mkdir(parents=True, exist_ok=True)
    save_yaml(spec.to_dict(), saved)
    todo = [t for t in all_trials if trial_state(sweep_dir / "trials" / t.id) != "done"]
    out(f"sweep {sweep_dir}: {len(all_trials)} trials, {len(all_trials) - len(todo)} finished, {len(todo)} to run "
        f"({runner} runner)")
    if runner == "ray":
        run_ray(sweep_dir, spec, todo, cpus_per_trial or 1, gpus_per_trial, address, max_concurrent)
        out(status_table(sweep_dir))
    else:  # the table after every trial
        run_local(sweep_dir, spec, todo, cpus_per_trial, lambda: out(status_table(sweep_dir)))
    return sweep_dir


# ------------------------------------------------------------------------------------------------ status
def status_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """Per trial: arm, seed, state, steps done of the budget, latest evaluation, ETA (seconds, None if unknown)."""
    if not (sweep_dir / SPEC_FILE).is_file():
        raise ConfigError(f"{sweep_dir} is not a sweep directory (no {SPEC_FILE}).")
    spec = spec_from_dict(load_yaml(sweep_dir / SPEC_FILE), str(sweep_dir / SPEC_FILE))
    rows = []
    for trial in trials(spec):
        run_dir = sweep_dir / "trials" / trial.id
        state = trial_state(run_dir)
        metrics = read_metrics(run_dir) if (run_dir / "metrics.csv").is_file() else []
        evals = [r for r in metrics if not math.isnan(r.get("eval/return_mean", math.nan))]
        budget = trial_config(spec, trial, run_dir, resume=False)
        total = getattr(budget, "steps", None)
        step = int(metrics[-1]["step"]) if metrics else 0
        row = {"trial": trial.id, "arm": trial.arm, "seed": trial.seed, "state": state, "step": step,
               "steps": total, "return": evals[-1]["eval/return_mean"] if evals else None, "eta_s": None}
        if state == "done":
            summary = read_summary(run_dir)
            row["return"] = summary.get("eval_return_mean", row["return"])
            row["step"] = total or step
        elif metrics and total and step:
            row["eta_s"] = metrics[-1]["wall_s"] / step * max(total - step, 0)
        if state == "failed":
            row["error"] = run_dir.with_suffix(".error").read_text().splitlines()[0]
        rows.append(row)
    return rows


def status_table(sweep_dir: Path) -> str:
    """The status rows as a text table (trial, arm, seed, steps, latest return, state, ETA)."""
    lines = [f"{'trial':<32} {'arm':<24} {'seed':>4} {'steps':>15} {'return':>9} {'state':<8} {'eta':>7}"]
    for r in status_rows(sweep_dir):
        steps = f"{r['step']}/{r['steps']}" if r["steps"] else str(r["step"])
        ret = f"{r['return']:.1f}" if r["return"] is not None else "-"
        eta = f"{r['eta_s'] / 60:.0f} min" if r["eta_s"] is not None else "-"
        lines.append(f"{r['trial'][:32]:<32} {r['arm'][:24]:<24} {r['seed']:>4} {steps:>15} {ret:>9} "
                     f"{r['state']:<8} {eta:>7}" + (f"  {r['error']}" if "error" in r else ""))
    return "\n".join(lines)
