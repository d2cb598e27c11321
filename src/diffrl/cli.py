"""The ``diffrl`` command line: parsing and dispatch only (logic lives in pipelines/ and runs/).

    diffrl train sac|td3|redq [--preset quick|paper] [--env ID] [--steps N] [--seed S] [--utd G] ...
    diffrl train sac --resume RUN_DIR [--steps N]
    diffrl eval RUN_DIR [--episodes N]
    diffrl report RUN_DIR... [--out DIR]
    diffrl quickstart

Errors a user can cause are printed as one sentence (``diffrl: error: ...``) with exit status 2.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated

import tyro

from diffrl.errors import ConfigError, DiffrlError

USAGE = """usage: diffrl <command> [options]

commands:
  train sac|td3|redq   train an off-policy agent online   (diffrl train sac --help)
  eval RUN_DIR         evaluate a run's latest checkpoint  (diffrl eval --help)
  report RUN_DIR...    learning curves and a results table (diffrl report --help)
  quickstart           a short demo run with a report

Every command accepts --help. Training commands accept --preset quick|paper and --resume RUN_DIR."""


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


def cmd_train(args: list[str]) -> None:
    from diffrl.pipelines import online

    if not args or args[0] in ("-h", "--help"):
        print(f"usage: diffrl train {{{','.join(online.ALGOS)}}} [--preset quick|paper] [options]\n"
              "       diffrl train ALGO --resume RUN_DIR [--steps N]")
        return
    algo, rest = args[0], args[1:]
    if algo not in online.ALGOS:
        raise ConfigError(f"unknown algorithm {algo!r}: choose one of {', '.join(online.ALGOS)}.")
    cls = online.ALGOS[algo][0]
    preset, rest = _pop_option(rest, "--preset")
    resume, _ = _pop_option(list(rest), "--resume")
    if resume is not None:
        if preset is not None:
            raise ConfigError("--preset cannot be combined with --resume: a resumed run keeps its own settings.")
        saved = online.load_config(Path(resume))
        if type(saved) is not cls:
            raise ConfigError(f"{resume} is a {online.algo_name(saved)} run; resume it with "
                              f"`diffrl train {online.algo_name(saved)} --resume {resume}`.")
        default = saved
    elif preset is not None:
        presets = online.PRESETS[algo]
        if preset not in presets:
            raise ConfigError(f"unknown preset {preset!r} for {algo}: choose one of {', '.join(presets)}.")
        default = cls(**presets[preset])
    else:
        default = cls()
    cfg = tyro.cli(cls, default=default, args=rest, prog=f"diffrl train {algo}",
                   description=(cls.__doc__ or "") + " Presets: --preset " + "|".join(online.PRESETS[algo]))
    run_dir = online.run(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"run directory: {run_dir}")
    _print_summary(summary)


def _print_summary(summary: dict) -> None:
    ret = summary.get("eval_return_mean")
    if ret is not None:
        print(f"final eval return: {ret:.1f} ± {summary['eval_return_std']:.1f} "
              f"({summary['eval_episodes']} episodes), best {summary['best_eval_return']:.1f}")
    if summary.get("success_rate") is not None:
        print(f"success rate: {summary['success_rate']:.2f}")
    print(f"env steps: {summary['env_steps']}, gradient steps: {summary['gradient_steps']}, "
          f"wall: {summary['wall_s']:.0f} s ({summary['env_steps_per_s']:.0f} env steps/s)")


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


def cmd_eval(args: list[str]) -> None:
    from diffrl.pipelines.online import evaluate_run
    from diffrl.runs.rundir import write_json_atomic

    a = tyro.cli(EvalArgs, args=args, prog="diffrl eval")
    if a.episodes <= 0:
        raise ConfigError(f"invalid episodes={a.episodes}: it must be > 0.")
    result = evaluate_run(a.run_dir, a.episodes, a.device, a.seed)
    out = a.run_dir / f"eval-step-{result['checkpoint_step']}.json"
    write_json_atomic(out, result)
    print(f"{result['env_id']} checkpoint at step {result['checkpoint_step']}: return "
          f"{result['return_mean']:.1f} ± {result['return_std']:.1f} over {a.episodes} episodes"
          + (f", success rate {result['success_rate']:.2f}" if result["success_rate"] is not None else ""))
    print(f"written: {out}")


@dataclasses.dataclass(frozen=True)
class ReportArgs:
    """Learning curves (mean and spread over seeds) and a markdown table of final returns."""

    run_dirs: Annotated[tuple[Path, ...], tyro.conf.Positional]
    """run directories (seeds of one experiment are grouped by pipeline and env)"""
    out: Path = Path("report")
    """output directory for report.md, report.json and the PNG curves"""


def cmd_report(args: list[str]) -> None:
    from diffrl.runs.report import make_report

    a = tyro.cli(ReportArgs, args=args, prog="diffrl report")
    path = make_report(list(a.run_dirs), a.out)
    print(f"report: {path}")


@dataclasses.dataclass(frozen=True)
class QuickstartArgs:
    """A short SAC run on a real MuJoCo task, evaluated and summarised in a report (a few minutes on 2 CPU
    cores)."""

    env: str = "Hopper-v5"
    """environment id"""
    steps: int = 20_000
    """environment steps"""
    seed: int = 0
    """seed"""
    out: Path = Path("runs/quickstart")
    """where the run and its report go"""


def cmd_quickstart(args: list[str]) -> None:
    from diffrl.pipelines import online
    from diffrl.runs.report import make_report

    a = tyro.cli(QuickstartArgs, args=args, prog="diffrl quickstart")
    if a.steps <= 0:
        raise ConfigError(f"invalid steps={a.steps}: it must be > 0.")
    cfg = online.SACConfig(env=a.env, steps=a.steps, seed=a.seed, learning_starts=min(2_000, a.steps // 4),
                           eval_every=max(a.steps // 10, 1), eval_episodes=3, log_every=500,
                           checkpoint_every=a.steps, runs_root=a.out)
    print(f"diffrl quickstart: SAC on {a.env} for {a.steps} env steps (UTD 1, batch 256, 2x256 networks)")
    run_dir = online.run(cfg)
    _print_summary(json.loads((run_dir / "summary.json").read_text()))
    report = make_report([run_dir], a.out / "report")
    print(f"run directory: {run_dir}")
    print(f"report: {report}")


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "report": cmd_report, "quickstart": cmd_quickstart}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``diffrl`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        import diffrl

        print(f"diffrl {diffrl.__version__}")
        return 0
    from diffrl.runs.device import tune_cpu_allocator

    tune_cpu_allocator()
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"diffrl: error: unknown command {argv[0]!r}.\n\n{USAGE}", file=sys.stderr)
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
