"""The registry of systems: what ``diffrl`` can run, declared by the systems themselves.

A system module (``pipelines/synther_online.py``, ``pipelines/iter_her.py``, ...) ends with one declaration::

    SYSTEM = System(
        name="iter", help="DDPG+HER, ITER (KER + GER) and ITER-Diffusion on Fetch tasks",
        commands=(Command("", {"": ITERConfig}, run, presets={"": PRESETS}, pipelines={"iter": ITERConfig},
                          evaluate=evaluate_run),))

and this file lists the module once (:data:`SYSTEMS`). ``diffrl.cli`` builds its usage text, parses each command's
config (presets, ``--resume``, every config field as a flag) and dispatches from these declarations; ``diffrl eval``
and ``diffrl report`` find a run's system from the pipeline name in its ``config.yaml``. Adding a system is one
module plus one line in :data:`SYSTEMS` (docs/adding-a-system.md). Modules are imported only when a command needs
them, so ``diffrl --help`` stays fast and a broken optional dependency affects only its own system.

A group may span several modules. Commands of different names are listed side by side (``diffrl synther offline``,
``diffrl synther online``); commands of the SAME name with disjoint algorithms are merged into one
(:func:`merge_commands`: ``diffrl train sac|td3|redq`` from ``pipelines/online.py`` and ``diffrl train ppo`` from
``pipelines/ppo.py``), which hands ``run``, ``evaluate`` and the summary lines to the module that declared the
algorithm, so each module stays the only one that knows its algorithms.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from diffrl.config import from_dict
from diffrl.errors import CheckpointError, ConfigError
from diffrl.runs.rundir import read_config

# CLI group -> the module that declares it (a module-level ``SYSTEM``). Order is the order of ``diffrl --help``.
# A group may span several modules (SynthER's offline and online pipelines; the off-policy loop and PPO under
# `train`); their commands are merged (see the module docstring).
SYSTEMS: dict[str, tuple[str, ...]] = {
    "train": ("diffrl.pipelines.online", "diffrl.pipelines.ppo"),
    "offline": ("diffrl.pipelines.offline",),
    "diffusion": ("diffrl.pipelines.diffusion",),
    "synther": ("diffrl.pipelines.synther_offline", "diffrl.pipelines.synther_online"),
    "iter": ("diffrl.pipelines.iter_her",),
    "dppo": ("diffrl.pipelines.dppo",),
    "dydiff": ("diffrl.pipelines.dydiff",),
    "diffppo": ("diffrl.pipelines.diffppo",),
    "data": ("diffrl.pipelines.data_collect",),
    "quickstart": ("diffrl.pipelines.quickstart",),
}

_extra: dict[str, tuple[str, ...]] = {}  # systems registered at run time (register()), e.g. by a plugin or a test


@dataclasses.dataclass(frozen=True)
class Command:
    """One training command of a system: ``diffrl <system> [<name>] [ALGO] [--preset P | --resume RUN_DIR] ...``.

    Args:
        name: the sub-command word (``"pretrain"``); ``""`` for a system with a single command (``diffrl iter``).
        configs: algorithm -> config class; ``{"": cls}`` when the command has no algorithm choice.
        run: ``run(cfg) -> run_dir``.
        presets: algorithm -> preset name -> field overrides (``--preset quick``).
        pipelines: every pipeline name the command writes into ``config.yaml`` -> its config class (how ``diffrl
            eval``, ``--resume`` and ``diffrl report`` recognise its runs).
        algo_flag: how the algorithm is chosen: ``None`` as the first positional word (``diffrl train sac``), or a
            flag such as ``"--algo"`` with ``default_algo`` (``diffrl synther offline --algo iql``).
        default_algo: the algorithm when ``algo_flag`` is not given.
        evaluate: ``evaluate(run_dir, cfg, episodes, device, seed, **options) -> dict`` for ``diffrl eval``: the
            latest checkpoint through :func:`diffrl.eval.evaluate` (``return_mean``, ``env_id``, ...).
        eval_options: keyword options ``diffrl eval`` may pass to ``evaluate`` (e.g. ``("path",)`` for DPPO).
        summary_lines: extra lines printed after the run's summary (e.g. a wall-clock breakdown).
        print_summary: print the generic summary (eval return, steps, wall clock) before ``summary_lines``.
        report_metric: the ``metrics.csv`` column ``diffrl report`` plots by default.
        help: one line for ``diffrl --help``.
    """

    name: str
    configs: Mapping[str, type]
    run: Callable[[Any], Path]
    presets: Mapping[str, Mapping[str, Mapping[str, Any]]]
    pipelines: Mapping[str, type]
    algo_flag: str | None = None
    default_algo: str | None = None
    evaluate: Callable[..., dict[str, Any]] | None = None
    eval_options: tuple[str, ...] = ()
    summary_lines: Callable[[dict[str, Any]], list[str]] | None = None
    print_summary: bool = True
    report_metric: str = "eval/return_mean"
    help: str = ""


@dataclasses.dataclass(frozen=True)
class Tool:
    """A command of a system that is not a training run (``diffrl diffusion sample``): ``args`` is a frozen
    dataclass parsed from the command line, ``main(args)`` does the work and prints its result."""

    name: str
    args: type
    main: Callable[[Any], None]
    run: Callable[[Any], Any] | None = None
    """the work without the printing (how another system uses the tool through the registry)"""
    help: str = ""


@dataclasses.dataclass(frozen=True)
class System:
    """What a system module declares (module-level ``SYSTEM``).

    Args:
        name: the CLI group (``diffrl <name> ...``).
        help: one line for ``diffrl --help`` (the first module's, when a group spans several modules).
        commands: its training commands.
        tools: its other commands.
    """

    name: str
    help: str
    commands: tuple[Command, ...] = ()
    tools: tuple[Tool, ...] = ()

    def command(self, name: str) -> Command | None:
        return next((c for c in self.commands if c.name == name), None)

    def tool(self, name: str) -> Tool | None:
        return next((t for t in self.tools if t.name == name), None)


def register(name: str, *modules: str) -> None:
    """Register system modules at run time under CLI group ``name`` (modules with a ``SYSTEM``)."""
    _extra[name] = modules


def unregister(name: str) -> None:
    _extra.pop(name, None)


def names() -> list[str]:
    """Every registered CLI group, in ``diffrl --help`` order."""
    return [*SYSTEMS, *(n for n in _extra if n not in SYSTEMS)]


def get(name: str) -> System | None:
    """The system registered as ``name`` (its modules imported now), or ``None``. A group of several modules lists
    their commands in module order, same-named ones merged (:func:`merge_commands`); its help joins the modules'
    distinct helps."""
    modules = _extra.get(name) or SYSTEMS.get(name)
    if modules is None:
        return None
    parts = [importlib.import_module(m).SYSTEM for m in modules]
    for m, system in zip(modules, parts):
        assert isinstance(system, System) and system.name == name, f"{m}.SYSTEM must be a System named {name!r}"
    by_name: dict[str, list[Command]] = {}
    for command in (c for p in parts for c in p.commands):
        by_name.setdefault(command.name, []).append(command)
    helps = list(dict.fromkeys(p.help for p in parts))
    return System(name, "; ".join(helps), tuple(merge_commands(*same) for same in by_name.values()),
                  tuple(t for p in parts for t in p.tools))


# one merged Command per tuple of parts (kept alive here): the CLI tells a run's command from another by identity
_merged: dict[tuple[int, ...], tuple[tuple[Command, ...], Command]] = {}


def merge_commands(*parts: Command) -> Command:
    """One command from same-named commands of several modules with disjoint algorithms (and pipeline names).

    The merged command offers every part's algorithms, presets and pipelines; ``run(cfg)``, ``evaluate(run_dir,
    cfg, ...)`` and ``summary_lines(summary)`` go to the part that declared the config's class (the summary's
    pipeline). The parts must agree on how the algorithm is chosen (``algo_flag``, ``default_algo``), on
    ``print_summary`` and on ``report_metric``; ``help`` joins theirs. The same parts always give the same object.
    A single part is returned as it is.
    """
    if len(parts) == 1:
        return parts[0]
    key = tuple(id(p) for p in parts)
    if key in _merged:
        return _merged[key][1]
    where = f"the commands {parts[0].name!r} of one group"
    for field in ("configs", "pipelines"):
        seen: set[str] = set()
        for part in parts:
            clash = seen & set(getattr(part, field))
            if clash:
                raise ConfigError(f"{where} declare the {field[:-1]} {sorted(clash)[0]!r} twice; a merged command "
                                  "needs disjoint algorithms and pipeline names.")
            seen |= set(getattr(part, field))
    for field in ("algo_flag", "default_algo", "print_summary", "report_metric"):
        values = {getattr(part, field) for part in parts}
        if len(values) > 1:
            raise ConfigError(f"{where} disagree on {field} ({', '.join(map(repr, sorted(values, key=str)))}); "
                              "a merged command needs one.")

    def part_of(cfg: Any) -> Command:
        for part in parts:
            if type(cfg) in part.configs.values():
                return part
        raise ConfigError(f"no command of this group runs a {type(cfg).__name__}.")

    def run(cfg: Any) -> Path:
        return part_of(cfg).run(cfg)

    def evaluate(run_dir: Path, cfg: Any, *args: Any, **options: Any) -> dict[str, Any]:
        part = part_of(cfg)
        if part.evaluate is None:
            raise ConfigError(f"{run_dir} is a run with no policy to evaluate.")
        unknown = sorted(set(options) - set(part.eval_options))
        if unknown:
            raise ConfigError(f"{run_dir} takes no evaluation option {unknown[0]!r}.")
        return part.evaluate(run_dir, cfg, *args, **options)

    def summary_lines(summary: dict[str, Any]) -> list[str]:
        part = next((p for p in parts if summary.get("pipeline") in p.pipelines), None)
        return part.summary_lines(summary) if part is not None and part.summary_lines is not None else []

    first = parts[0]
    merged = Command(
        first.name, {a: cls for p in parts for a, cls in p.configs.items()}, run,
        {a: presets for p in parts for a, presets in p.presets.items()},
        {n: cls for p in parts for n, cls in p.pipelines.items()}, algo_flag=first.algo_flag,
        default_algo=first.default_algo, evaluate=evaluate if any(p.evaluate for p in parts) else None,
        eval_options=tuple(dict.fromkeys(o for p in parts for o in p.eval_options)),
        summary_lines=summary_lines if any(p.summary_lines for p in parts) else None,
        print_summary=first.print_summary, report_metric=first.report_metric,
        help="; ".join(dict.fromkeys(p.help for p in parts if p.help)))
    _merged[key] = (parts, merged)
    return merged


def find_run(run_dir: Path) -> tuple[System, Command, Any]:
    """The system and command that wrote ``run_dir`` and the config it was started with (from ``config.yaml``);
    a run no registered system wrote is one sentence."""
    saved = read_config(run_dir)
    pipeline = saved["pipeline"]
    for name in names():
        system = get(name)
        for command in system.commands if system is not None else ():
            if pipeline in command.pipelines:
                return system, command, from_dict(command.pipelines[pipeline], saved["config"])  # type: ignore[return-value]
    raise CheckpointError(f"{run_dir} is a {pipeline!r} run, which no registered diffrl system knows.")


def load_config(run_dir: Path, command: Command) -> Any:
    """The config ``run_dir`` was started with, which must be a run of ``command`` (else one sentence)."""
    saved = read_config(run_dir)
    cls = command.pipelines.get(saved["pipeline"])
    if cls is None:
        raise CheckpointError(f"{run_dir} is a {saved['pipeline']} run, not a run of this command.")
    return from_dict(cls, saved["config"])
