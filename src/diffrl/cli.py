"""The ``diffrl`` command line: parsing, dispatch and printing only, from the registry of systems.

    diffrl <system> [<command>] [ALGO] [--preset NAME | --resume RUN_DIR] [--field value ...]
    diffrl eval RUN_DIR [--episodes N]
    diffrl report RUN_DIR... [--out DIR]

Every group but ``eval`` and ``report`` is a system declared in its own module and listed in
:mod:`diffrl.registry` (``diffrl --help`` prints them); a training command's flags are its config dataclass's fields
(tyro). Errors a user can cause are printed as one sentence (``diffrl: error: ...``) with exit status 2; diffrl's own
warnings (:class:`~diffrl.errors.DiffrlWarning`) as one line (``diffrl: warning: ...``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

from diffrl.errors import ConfigError, DiffrlError, DiffrlWarning

BUILTIN_USAGE = """  sweep SPEC.yaml | SYSTEM ...     seeds x arms of a system, local or on Ray (diffrl sweep --help)
  eval RUN_DIR                     evaluate a run's latest checkpoint    (diffrl eval --help)
  report RUN_DIR...                learning curves and a results table   (diffrl report --help)"""


def usage() -> str:
    """``diffrl --help``: every registered system with its commands, then the built-in commands."""
    from diffrl import registry

    lines = ["usage: diffrl <command> [options]", "", "commands:"]
    for name in registry.names():
        system = registry.get(name)
        assert system is not None
        words = [c.name or "|".join(c.configs) for c in system.commands] + [t.name for t in system.tools]
        head = f"  {name} {'|'.join(w for w in words if w)}".rstrip()
        lines.append(f"{head:<34} {system.help}")
    lines.append(BUILTIN_USAGE)
    lines += ["", "Every command accepts --help. Training commands accept --preset NAME and --resume RUN_DIR."]
    return "\n".join(lines)


def _pop_option(args: list[str], name: str) -> tuple[str | None, list[str]]:
    """Remove ``--name VALUE`` / ``--name=VALUE`` from args; returns (value, remaining args)."""
    rest, value, i = [], None, 0
    while i < len(args):
        a = args[i]
        if a == name:
            if i + 1 >= len(args):
                raise ConfigError(f"{name} needs a value.")
            value, i = args[i + 1], i + 2
            continue
        if a.startswith(name + "="):
            value = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return value, rest


def _config_from_args(command: Any, algo: str, rest: list[str], prog: str) -> Any:
    """A command's config from ``[--preset P | --resume RUN_DIR] [fields]``: a preset's values become flags that
    explicit flags override; a resume starts from the saved config (and refuses a run of another kind)."""
    from diffrl import registry

    cls, presets = command.configs[algo], command.presets.get(algo, {})
    preset, rest = _pop_option(rest, "--preset")
    resume, _ = _pop_option(list(rest), "--resume")
    if resume is not None:
        if preset is not None:
            raise ConfigError("--preset cannot be combined with --resume: a resumed run keeps its own settings.")
        _, saved_command, saved = registry.find_run(Path(resume))
        if saved_command is not command or type(saved) is not cls:
            raise ConfigError(f"{resume} is another kind of run; resume it with `{_resume_hint(Path(resume))} "
                              f"--resume {resume}`.")
        default = saved
    else:
        default = None  # the dataclass's own defaults
        if preset is not None:
            if preset not in presets:
                raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join(presets)}.")
            rest = as_args(presets[preset]) + rest  # explicit flags come later, so they win
    return parse_config(cls, rest, prog, default, (cls.__doc__ or "") + " Presets (--preset NAME; explicit flags "
                        "override them): " + "; ".join(f"{name}: " + " ".join(as_args(values))
                                                       for name, values in presets.items()))


def parse_config(cls: type, args: list[str], prog: str, default: Any = None, description: str | None = None) -> Any:
    """A config dataclass from command-line flags (tyro; a value its validation rejects is one sentence)."""
    return tyro.cli(cls, default=default, args=args, prog=prog, description=description or cls.__doc__)


def as_args(values: dict[str, Any]) -> list[str]:
    """Config values as command-line flags (``{"learning_starts": 5}`` -> ``["--learning-starts", "5"]``)."""
    out: list[str] = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


def _system_usage(group: str, system: Any) -> str:
    lines = []
    for c in system.commands:
        word = f" {c.name}" if c.name else ""
        algos = "|".join(c.configs)
        choice = ("" if len(c.configs) == 1 else f" {{{algos}}}" if c.algo_flag is None
                  else f" [{c.algo_flag} {algos}]")
        presets = "|".join(next(iter(c.presets.values()), {}))
        lines.append(f"diffrl {group}{word}{choice} [--preset {presets}] [options]"
                     + (f"   {c.help}" if c.help else ""))
        algo_word = " ALGO" if len(c.configs) > 1 and c.algo_flag is None else ""
        lines.append(f"diffrl {group}{word}{algo_word} --resume RUN_DIR   continue a stopped run (a larger budget "
                     "may be given)")
    lines += [f"diffrl {group} {t.name} [options]" + (f"   {t.help}" if t.help else "") for t in system.tools]
    return "usage: " + "\n       ".join(lines) + f"\n       diffrl {group} ... --help   (every option)"


def run_system(group: str, args: list[str]) -> None:
    """``diffrl <group> ...`` for a registered system: pick the command (and algorithm), build its config from
    ``[--preset P | --resume RUN_DIR] [fields]``, run it and print its summary."""
    from diffrl import registry

    system = registry.get(group)
    assert system is not None
    entries = [*system.commands, *system.tools]
    single = entries[0] if len(entries) == 1 and not entries[0].name else None
    if single is None and (not args or args[0] in ("-h", "--help")):  # a single command runs with no arguments
        print(_system_usage(group, system))
        return
    default = system.command("")
    if single is None and default is not None and args[0].startswith("-"):  # `diffrl dydiff --dataset D` beside
        single = default                                                     # `diffrl dydiff fidelity ...`
    if single is None:
        word, args = args[0], args[1:]
        entry = system.command(word) or system.tool(word)
        if entry is None:
            words = ", ".join(e.name for e in entries)
            raise ConfigError(f"unknown {group} command {word!r}: choose one of {words}.")
    else:
        word, entry = "", single
    prog = " ".join(["diffrl", group, *([word] if word else [])])
    if isinstance(entry, registry.Tool):
        entry.main(tyro.cli(entry.args, args=args, prog=prog, description=entry.args.__doc__))
        return
    algo, args = _choose_algo(entry, args, prog)
    if algo is None:
        print(_system_usage(group, system))
        return
    prog += f" {entry.algo_flag} {algo}" if entry.algo_flag else (f" {algo}" if len(entry.configs) > 1 else "")
    cfg = _config_from_args(entry, algo, args, prog)
    run_dir = entry.run(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"run directory: {run_dir}")
    if entry.print_summary:
        _print_summary(summary)
    for line in entry.summary_lines(summary) if entry.summary_lines is not None else ():
        print(line)


def _choose_algo(command: Any, args: list[str], prog: str) -> tuple[str | None, list[str]]:
    """The algorithm a command line asks for (positional word or ``command.algo_flag``); None asks for usage."""
    if len(command.configs) == 1:
        return next(iter(command.configs)), args
    if command.algo_flag is None:
        if not args or args[0] in ("-h", "--help"):
            return None, args
        algo, args = args[0], args[1:]
    else:
        algo, args = _pop_option(args, command.algo_flag)
        algo = algo or command.default_algo
    if algo not in command.configs:
        raise ConfigError(f"unknown algorithm {algo!r} for `{prog}`: choose one of {', '.join(command.configs)}.")
    return algo, args


def _resume_hint(run_dir: Path) -> str:
    """The command that resumes ``run_dir`` (for a refusal sentence)."""
    from diffrl import registry

    system, command, cfg = registry.find_run(run_dir)
    algo = next(a for a, cls in command.configs.items() if type(cfg) is cls)
    words = ["diffrl", system.name, command.name, *([command.algo_flag] if command.algo_flag and algo else []),
             algo if len(command.configs) > 1 else ""]
    return " ".join(w for w in words if w)


def _print_summary(s: dict) -> None:
    if s.get("eval_return_mean") is not None:
        line = (f"final eval return: {s['eval_return_mean']:.1f} ± {s['eval_return_std']:.1f} "
                f"({s['eval_episodes']} episodes)")
        if s.get("normalized_score") is not None:
            line += f", normalized score {s['normalized_score']:.1f}"
        if s.get("best_eval_return") is not None:
            line += f", best {s['best_eval_return']:.1f}"
        elif s.get("best_score") is not None:
            line += f", best {'score' if s.get('normalized_score') is not None else 'return'} {s['best_score']:.1f}"
        print(line)
    if s.get("success_rate") is not None:
        print(f"success rate: {s['success_rate']:.2f}")
    if s.get("env_steps"):
        print(f"env steps: {s['env_steps']}, gradient steps: {s['gradient_steps']}, wall: {s['wall_s']:.0f} s "
              f"({s['env_steps_per_s']:.0f} env steps/s)")
    else:
        print(f"gradient steps: {s['gradient_steps']}, wall: {s['wall_s']:.0f} s ({s['updates_per_s']:.0f} updates/s)")


@dataclasses.dataclass(frozen=True)
class EvalArgs:
    """Evaluate the latest checkpoint of a run (deterministic actions, the run's own eval episodes)."""

    run_dir: Annotated[Path, tyro.conf.Positional]
    """the run directory"""
    episodes: int = 10
    """evaluation episodes"""
    seed: int | None = None
    """eval seed (default: the run's seed, i.e. the same episodes as during training)"""
    device: str = "auto"
    """auto, cpu or cuda"""
    path: Literal["run", "sample", "mean"] = "run"
    """dppo runs: draw a diffusion policy's chunks as the run did (its eval_mean_path), along DPPO's sampled chain,
    or along the noise-free DDPM mean path"""


def cmd_eval(args: list[str]) -> None:
    from diffrl import registry
    from diffrl.runs.rundir import read_config, write_json_atomic

    a = tyro.cli(EvalArgs, args=args, prog="diffrl eval")
    if a.episodes <= 0:
        raise ConfigError(f"invalid episodes={a.episodes}: it must be > 0.")
    system, command, cfg = registry.find_run(a.run_dir)
    if command.evaluate is None:
        raise ConfigError(f"{a.run_dir} is a `diffrl {system.name}` run, which has no policy to evaluate.")
    if a.path != "run" and "mean_path" not in command.eval_options:
        raise ConfigError(f"--path {a.path} applies to `diffrl dppo` runs only; {a.run_dir} is a "
                          f"{read_config(a.run_dir)['pipeline']} run.")
    options = {"mean_path": a.path == "mean"} if a.path != "run" else {}
    result = command.evaluate(a.run_dir, cfg, a.episodes, a.device, a.seed, **options)
    # one file per set of options, so evaluating again another way never overwrites an earlier result
    name = [f"eval-step-{result['checkpoint_step']}", f"{a.episodes}ep"]
    name += ([f"seed{a.seed}"] if a.seed is not None else []) + ([a.path] if a.path != "run" else [])
    out = a.run_dir / ("-".join(name) + ".json")
    write_json_atomic(out, result)
    print(f"{result['env_id']} checkpoint at step {result['checkpoint_step']}: return "
          f"{result['return_mean']:.1f} ± {result['return_std']:.1f} over {a.episodes} episodes"
          + (f", success rate {result['success_rate']:.2f}" if result["success_rate"] is not None else "")
          + (f", normalized score {result['normalized_score']:.1f}" if "normalized_score" in result else ""))
    print(f"written: {out}")


@dataclasses.dataclass(frozen=True)
class ReportArgs:
    """Learning curves (mean and spread over seeds), a markdown table of final returns and, with rliable, IQM /
    mean / median / optimality gap with stratified-bootstrap 95% CIs, probability of improvement, performance
    profiles and paired per-seed differences between arms (runs that differ in a config field)."""

    run_dirs: Annotated[tuple[Path, ...], tyro.conf.Positional]
    """run directories (seeds of one experiment are grouped by pipeline and env)"""
    out: Path = Path("report")
    """output directory for report.md, report.json and the PNG curves"""
    metric: str = "auto"
    """metrics.csv column to plot; auto: eval/success_rate for goal tasks (diffrl iter), else eval/return_mean"""
    bootstrap_reps: int = 2000
    """bootstrap resamples behind every confidence interval"""
    bootstrap_seed: int = 0
    """seed of the bootstrap resampling (the same seed gives the same intervals)"""
    gap_threshold: float | None = None
    """optimality-gap threshold for raw-return scores; normalized scores use 100 and success rates 1"""


def cmd_report(args: list[str]) -> None:
    from diffrl import registry
    from diffrl.runs.report import make_report
    from diffrl.runs.stats import Bootstrap

    a = tyro.cli(ReportArgs, args=args, prog="diffrl report")
    metric = a.metric
    if metric == "auto":  # the runs' commands' own metric when they agree (success rate for goal tasks)
        metrics = {registry.find_run(d)[1].report_metric for d in a.run_dirs}
        metric = metrics.pop() if len(metrics) == 1 else "eval/return_mean"
    path = make_report(list(a.run_dirs), a.out, metric=metric, gap_threshold=a.gap_threshold,
                       bootstrap=Bootstrap(reps=a.bootstrap_reps, seed=a.bootstrap_seed))
    print(f"report: {path}")


SWEEP_OPTIONS = {"--runner": "runner", "--address": "address", "--cpus-per-trial": "cpus_per_trial",
                 "--gpus-per-trial": "gpus_per_trial", "--max-concurrent": "max_concurrent", "--root": "root",
                 "--table-every": "table_every", "--workers": "workers"}
SWEEP_USAGE = """usage: diffrl sweep SPEC.yaml [SPEC2.yaml ...] [--runner local|ray] [--address ADDR]
                         [--cpus-per-trial C] [--gpus-per-trial G] [--max-concurrent K] [--workers N]
                         [--root DIR] [--table-every SECONDS] [--skip-recorded] [--rerun-stale]
       diffrl sweep SYSTEM [COMMAND] [ALGO | --algo A] --seeds 0-4 [--grid FIELD=V1,V2 ...] [--preset P]
                         [--name NAME] [--results FILE.jsonl] [--FIELD VALUE ...] [runner options]
       diffrl sweep status SWEEP_DIR
       diffrl sweep record SWEEP_DIR

Every (arm, grid point, seed) is a trial that runs the system as its own command would, in its own run directory
under ROOT/NAME (ROOT: runs/sweeps). Started again, a sweep skips finished trials and resumes unfinished ones.
Specs given together run in order. The status table is printed every --table-every seconds (default 60; 0: when
a trial has finished) when it changed; a spec's `results` file gets one row per finished trial as it finishes (see
docs/sweeps.md). The local runner runs one trial at a time, or N side by side with --workers N (N processes,
--cpus-per-trial threads each, default 1).
--skip-recorded counts a trial whose row is already in the results file (same config) as finished, so a fresh
clone completes a sweep without re-running its committed rows; without it such a trial runs again (a newer row).
A finished trial whose dataset has changed since it ran shows as `stale` and counts as finished; --rerun-stale
moves its run directory to ROOT/NAME/trials/.stale and runs it again on the current data. `sweep record` appends
the rows of finished trials not yet in the results file without running anything (a driver records them as it
goes; one that was killed may have left some)."""


def cmd_sweep(args: list[str]) -> None:
    from diffrl import sweep

    if not args or args[0] in ("-h", "--help"):
        print(SWEEP_USAGE)
        return
    if args[0] == "status":
        if len(args) != 2:
            raise ConfigError("usage: diffrl sweep status SWEEP_DIR")
        print(sweep.status_table(Path(args[1])))
        return
    if args[0] == "record":
        if len(args) != 2:
            raise ConfigError("usage: diffrl sweep record SWEEP_DIR")
        spec = sweep.saved_spec(Path(args[1]))
        if spec.results is None:
            raise ConfigError(f"the sweep in {args[1]} names no results file (its spec has no `results`).")
        print(f"{sweep.record_results(Path(args[1]), spec)} row(s) added to {spec.results}")
        return
    options: dict[str, Any] = {}
    for flag in ("--skip-recorded", "--rerun-stale"):
        if flag in args:
            args = [a for a in args if a != flag]
            options[flag[2:].replace("-", "_")] = True
    for flag, key in SWEEP_OPTIONS.items():
        value, args = _pop_option(args, flag)
        if value is not None:
            options[key] = value
    for key in ("cpus_per_trial", "max_concurrent", "workers"):
        if key in options:
            options[key] = _number(key, options[key], int)
    for key in ("gpus_per_trial", "table_every"):
        if key in options:
            options[key] = _number(key, options[key], float)
    if "root" in options:
        options["root"] = Path(options["root"])
    if not args:
        raise ConfigError("diffrl sweep needs a spec file or a system (diffrl sweep --help).")
    if args[0].endswith((".yaml", ".yml")):
        extra = [a for a in args if not a.endswith((".yaml", ".yml"))]
        if extra:
            raise ConfigError(f"unexpected arguments after the spec files: {' '.join(extra)} (put fields in the "
                              "spec).")
        specs = []
        for path in map(Path, args):  # every spec is checked before any runs
            if not path.is_file():
                raise ConfigError(f"sweep spec {path} does not exist.")
            specs.append(sweep.spec_from_dict(load_yaml_file(path), str(path)))
    else:
        specs = [sweep.spec_from_dict(_inline_spec(args), "the command line")]
    for spec in specs:
        sweep.run_sweep(spec, **options)


def _number(name: str, text: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"invalid --{name.replace('_', '-')} {text!r}: it must be a number.") from None


def load_yaml_file(path: Path) -> Any:
    from diffrl.config import load_yaml

    try:
        return load_yaml(path)
    except Exception as e:  # yaml errors
        raise ConfigError(f"{path} is not valid YAML ({str(e).splitlines()[0]}).") from None


def _inline_spec(args: list[str]) -> dict[str, Any]:
    """``SYSTEM [COMMAND] [ALGO | --algo A] --seeds S --grid F=V1,V2 [--preset P] [--name N] [--results F]
    [--field value ...]``
    as a spec dict."""
    from diffrl import registry

    system_name, args = args[0], args[1:]
    system = registry.get(system_name)
    if system is None:
        raise ConfigError(f"unknown system {system_name!r}: choose one of {', '.join(registry.names())}.")
    spec: dict[str, Any] = {"system": system_name, "command": ""}
    if args and not args[0].startswith("-") and system.command(args[0]) is not None:
        spec["command"], args = args[0], args[1:]
    command = system.command(spec["command"])
    if command is not None and len(command.configs) > 1:
        if command.algo_flag is None and args and not args[0].startswith("-"):
            spec["algo"], args = args[0], args[1:]
        elif command.algo_flag is not None:
            spec["algo"], args = _pop_option(args, command.algo_flag)
    for flag in ("--seeds", "--preset", "--name", "--results"):
        value, args = _pop_option(args, flag)
        if value is not None:
            spec[flag[2:]] = value
    spec.setdefault("name", "-".join(w for w in (system_name, spec["command"], spec.get("algo") or "") if w))
    grid: dict[str, list[str]] = {}
    while True:
        value, args = _pop_option(args, "--grid")
        if value is None:
            break
        field, sep, values = value.partition("=")
        if not sep or not field:
            raise ConfigError(f"invalid --grid {value!r}: use FIELD=V1,V2 (e.g. --grid utd=1,20).")
        grid[field.replace("-", "_")] = [v for v in values.split(",") if v != ""]
    spec["grid"], spec["base"] = grid, _fields(args)
    return {k: v for k, v in spec.items() if v is not None}


def _fields(args: list[str]) -> dict[str, Any]:
    """``--field value [value ...]`` / ``--flag`` / ``--no-flag`` as a dict of field values (strings, as typed)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        if not args[i].startswith("--"):
            raise ConfigError(f"unexpected argument {args[i]!r}: fields are given as --field value.")
        name, i = args[i][2:].replace("-", "_"), i + 1
        values = []
        while i < len(args) and not args[i].startswith("--"):
            values.append(args[i])
            i += 1
        if not values:
            out[name.removeprefix("no_")] = not name.startswith("no_")
        else:
            out[name] = values[0] if len(values) == 1 else values
    return out


COMMANDS = {"eval": cmd_eval, "report": cmd_report, "sweep": cmd_sweep}
"""Built-in commands; every other group is a registered system (:mod:`diffrl.registry`)."""


def _one_line_warnings(fallback):
    """A ``warnings.formatwarning`` that prints diffrl's own warnings as one line (``diffrl: warning: ...``) and
    leaves other packages' warnings to ``fallback``."""

    def format_warning(message, category, filename, lineno, line=None) -> str:
        if issubclass(category, DiffrlWarning):
            return f"diffrl: warning: {message}\n"
        return fallback(message, category, filename, lineno, line)

    return format_warning


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``diffrl`` console script; returns the exit status."""
    previous = warnings.formatwarning
    warnings.formatwarning = _one_line_warnings(previous)
    try:
        return _main(argv)
    except BrokenPipeError:  # the reader went away (`diffrl sweep status DIR | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
    finally:
        warnings.formatwarning = previous


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        import diffrl

        print(f"diffrl {diffrl.__version__}")
        return 0
    from diffrl import registry
    from diffrl.runs.device import tune_cpu_allocator

    tune_cpu_allocator()
    command = COMMANDS.get(argv[0])
    if command is None and argv[0] in registry.names():
        command = functools.partial(run_system, argv[0])
    if command is None:
        print(f"diffrl: error: unknown command {argv[0]!r}.\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        command(argv[1:])
    except DiffrlError as e:
        print(f"diffrl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ndiffrl: interrupted; the latest checkpoint is intact (continue with --resume RUN_DIR).",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
