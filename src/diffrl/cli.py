"""The ``diffrl`` command line: parsing and dispatch only (logic lives in pipelines/ and runs/).

    diffrl train sac|td3|redq [--preset quick|paper] [--env ID] [--steps N] [--seed S] [--utd G] ...
    diffrl train sac --resume RUN_DIR [--steps N]
    diffrl offline td3bc --dataset D ...;  diffrl data info|convert|collect ...
    diffrl diffusion train|sample|fidelity ...
    diffrl iter --env FetchPush-v4 [--n-ker 8] [--n-ger 4] [--ddpm] [--preset quick|paper] ...
    diffrl dppo pretrain --dataset D [--policy-type diffusion|gaussian];  diffrl dppo finetune --policy RUN_DIR ...
    diffrl eval RUN_DIR [--episodes N]
    diffrl report RUN_DIR... [--out DIR]
    diffrl quickstart

Errors a user can cause are printed as one sentence (``diffrl: error: ...``) with exit status 2; diffrl's own
warnings (:class:`~diffrl.errors.DiffrlWarning`) as one line (``diffrl: warning: ...``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

from diffrl.errors import ConfigError, DiffrlError, DiffrlWarning

USAGE = """usage: diffrl <command> [options]

commands:
  train sac|td3|redq               train an off-policy agent online      (diffrl train --help)
  offline bc|td3bc|iql|cql|edac    train an offline agent on a dataset   (diffrl offline --help)
  data info|convert|collect        inspect, convert or build datasets    (diffrl data --help)
  diffusion train|sample|fidelity  transition diffusion models           (diffrl diffusion --help)
  synther offline|online           SynthER: upsampled offline data, or online SAC/REDQ with synthetic data
                                   (diffrl synther --help)
  iter --env FetchPush-v4          DDPG+HER, ITER (KER + GER) and ITER-Diffusion on Fetch tasks
                                   (diffrl iter --help)
  dppo pretrain|finetune           DPPO: BC pre-training of a diffusion (or Gaussian) chunk policy, then PPO
                                   fine-tuning over the denoising MDP (diffrl dppo --help)
  eval RUN_DIR                     evaluate a run's latest checkpoint    (diffrl eval --help)
  report RUN_DIR...                learning curves and a results table   (diffrl report --help)
  quickstart                       a short demo run with a report

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


def _train_command(group: str, module: Any, args: list[str]) -> None:
    """``diffrl <group> ALGO [--preset P | --resume RUN_DIR] [fields]`` for a pipeline module with ``ALGOS``,
    ``PRESETS``, ``load_config``, ``algo_name`` and ``run``."""
    algos = module.ALGOS
    if not args or args[0] in ("-h", "--help"):
        print(f"usage: diffrl {group} {{{','.join(algos)}}} [--preset {'|'.join(module.PRESETS[next(iter(algos))])}] "
              f"[options]\n       diffrl {group} ALGO --resume RUN_DIR [--steps N]\n"
              f"       diffrl {group} ALGO --help   (every option)")
        return
    algo, rest = args[0], args[1:]
    if algo not in algos:
        raise ConfigError(f"unknown algorithm {algo!r} for `diffrl {group}`: choose one of {', '.join(algos)}.")
    cfg = _config_from_args(algos[algo][0], module.PRESETS[algo], rest, f"diffrl {group} {algo}", module.load_config,
                            lambda saved: f"diffrl {group} {module.algo_name(saved)}")
    run_dir = module.run(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"run directory: {run_dir}")
    _print_summary(summary)


def _config_from_args(cls: type, presets: dict[str, dict[str, Any]], rest: list[str], prog: str,
                      load_config: Any, resume_hint: Any) -> Any:
    """A pipeline config from ``[--preset P | --resume RUN_DIR] [fields]``: a preset's values become flags that
    explicit flags override; a resume starts from the saved config (and refuses a run of another kind)."""
    preset, rest = _pop_option(rest, "--preset")
    resume, _ = _pop_option(list(rest), "--resume")
    if resume is not None:
        if preset is not None:
            raise ConfigError("--preset cannot be combined with --resume: a resumed run keeps its own settings.")
        saved = load_config(Path(resume))
        if type(saved) is not cls:
            raise ConfigError(f"{resume} is another kind of run; resume it with `{resume_hint(saved)} --resume "
                              f"{resume}`.")
        default = saved
    else:
        default = None  # the dataclass's own defaults
        if preset is not None:
            if preset not in presets:
                raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join(presets)}.")
            rest = _as_args(presets[preset]) + rest  # explicit flags come later, so they win
    return _parse(cls, rest, prog, default,
                  (cls.__doc__ or "") + " Presets (--preset NAME; explicit flags override them): " + "; ".join(
                      f"{name}: " + " ".join(_as_args(values)) for name, values in presets.items()))


def _as_args(values: dict[str, Any]) -> list[str]:
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


def _parse(cls: type, args: list[str], prog: str, default: Any = None, description: str | None = None) -> Any:
    """tyro parsing; a value rejected by a config's validation is one sentence (exit status 2)."""
    return tyro.cli(cls, default=default, args=args, prog=prog, description=description or cls.__doc__)


def cmd_train(args: list[str]) -> None:
    from diffrl.pipelines import online

    _train_command("train", online, args)


def cmd_offline(args: list[str]) -> None:
    from diffrl.pipelines import offline

    _train_command("offline", offline, args)


def cmd_synther(args: list[str]) -> None:
    from diffrl.pipelines import synther_offline, synther_online

    if not args or args[0] in ("-h", "--help"):
        print("usage: diffrl synther offline --dataset D [--algo td3bc|iql|cql|edac]\n"
              "           [--data-mode synthetic|mixed|real] [--real-ratio R] [--num-samples N]\n"
              "           [--data-fraction F] [--diffusion RUN_DIR] [--preset quick|paper] [--seed S]\n"
              "       diffrl synther online --env ID [--agent sac|redq] [--utd G] [--synthetic-ratio R]\n"
              "           [--retrain-every K] [--num-samples N] [--diffusion-steps S] [--warm-start]\n"
              "           [--preset quick|paper] [--seed S]\n"
              "       diffrl synther offline|online ... --resume RUN_DIR;  ... --help (every option)")
        return
    modes = {"offline": (synther_offline, "--algo", "td3bc"), "online": (synther_online, "--agent", "sac")}
    if args[0] not in modes:
        raise ConfigError(f"unknown synther command {args[0]!r}: choose offline or online.")
    module, flag, default = modes[args[0]]
    algo, rest = _pop_option(args[1:], flag)
    algo = algo or default
    if algo not in module.ALGOS:
        raise ConfigError(f"unknown algorithm {algo!r} for `diffrl synther {args[0]}`: choose one of "
                          f"{', '.join(module.ALGOS)}.")
    prog = f"diffrl synther {args[0]} {flag} {algo}"
    cfg = _config_from_args(module.ALGOS[algo], module.PRESETS[algo], rest, prog, module.load_config,
                            lambda saved: f"diffrl synther {args[0]} {flag} {module.algo_name(saved)}")
    run_dir = module.run(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"run directory: {run_dir}")
    _print_summary(summary)
    if "time_breakdown_s" in summary:
        print("wall clock: " + ", ".join(f"{k.removesuffix('_s')} {v:.0f} s"
                                         for k, v in summary["time_breakdown_s"].items()))
    if "fidelity" in summary:
        from diffrl.eval.fidelity import format_fidelity

        print(format_fidelity(summary["fidelity"]))


def cmd_iter(args: list[str]) -> None:
    from diffrl.pipelines import iter_her

    cfg = _config_from_args(iter_her.ITERConfig, iter_her.PRESETS, args, "diffrl iter", iter_her.load_config,
                            lambda saved: "diffrl iter")
    run_dir = iter_her.run(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"run directory: {run_dir}")
    _print_summary(summary)
    print("wall clock: " + ", ".join(f"{k.removesuffix('_s')} {v:.0f} s"
                                     for k, v in summary["time_breakdown_s"].items()))


def cmd_dppo(args: list[str]) -> None:
    from diffrl.pipelines import dppo

    if not args or args[0] in ("-h", "--help"):
        print("usage: diffrl dppo pretrain --dataset D [--policy-type diffusion|gaussian] [--preset quick|paper]\n"
              "           [--seed S] [options]\n"
              "       diffrl dppo finetune --policy PRETRAIN_RUN_DIR [--env ID] [--ft-denoising-steps K']\n"
              "           [--use-ddim --ddim-steps S] [--n-envs N] [--preset quick|paper] [--seed S] [options]\n"
              "       diffrl dppo pretrain|finetune --resume RUN_DIR;  ... --help (every option)")
        return
    stages = {"pretrain": (dppo.PretrainConfig, dppo.pretrain), "finetune": (dppo.FinetuneConfig, dppo.finetune)}
    if args[0] not in stages:
        raise ConfigError(f"unknown dppo command {args[0]!r}: choose pretrain or finetune.")
    cls, run = stages[args[0]]
    cfg = _config_from_args(cls, dppo.PRESETS[args[0]], args[1:], f"diffrl dppo {args[0]}", dppo.load_config,
                            lambda saved: "diffrl dppo " + ("pretrain" if isinstance(saved, dppo.PretrainConfig)
                                                            else "finetune"))
    run_dir = run(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"run directory: {run_dir}")
    _print_summary(summary)
    print("wall clock: " + ", ".join(f"{k.removesuffix('_s')} {v:.0f} s"
                                     for k, v in summary["time_breakdown_s"].items()))


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
    from diffrl.pipelines import offline, online
    from diffrl.runs.rundir import read_config, write_json_atomic

    a = tyro.cli(EvalArgs, args=args, prog="diffrl eval")
    if a.episodes <= 0:
        raise ConfigError(f"invalid episodes={a.episodes}: it must be > 0.")
    pipeline = read_config(a.run_dir)["pipeline"]
    if pipeline == "iter":
        from diffrl.pipelines import iter_her as module
    elif pipeline.startswith("synther_offline_"):
        from diffrl.pipelines import synther_offline as module
    elif pipeline.startswith("synther_online_"):
        from diffrl.pipelines import synther_online as module
    elif pipeline.startswith("dppo_"):
        from diffrl.pipelines import dppo as module
    else:
        module = offline if pipeline.startswith("offline_") else online
    if not pipeline.startswith("dppo_") and a.path != "run":
        raise ConfigError(f"--path {a.path} applies to `diffrl dppo` runs only; {a.run_dir} is a {pipeline} run.")
    options = {"mean_path": a.path == "mean"} if a.path != "run" else {}
    result = module.evaluate_run(a.run_dir, a.episodes, a.device, a.seed, **options)
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
class DataInfoArgs:
    """Episodes, transitions, return statistics, normalized scores and spaces of a dataset."""

    dataset: Annotated[str, tyro.conf.Positional]
    """Minari id (under MINARI_DATASETS_PATH) or a path to a D4RL .hdf5 or DPPO .npz file"""
    env: str | None = None
    """also check the dataset against this env's spaces and action bounds"""
    json: bool = False
    """print JSON instead of a table"""


@dataclasses.dataclass(frozen=True)
class DataConvertArgs:
    """Convert a dataset between the Minari, D4RL HDF5 and DPPO npz layouts (arrays bit-exact)."""

    dataset: Annotated[str, tyro.conf.Positional]
    """source: Minari id or a .hdf5 / .npz path"""
    to: Literal["minari", "d4rl", "npz"]
    """target layout"""
    out: str
    """target: a Minari id (or dataset directory) for minari, a file path otherwise"""
    overwrite: bool = False
    """replace an existing target"""


def cmd_data(args: list[str]) -> None:
    from diffrl.data import load_dataset, save_dataset

    sub_commands = ("info", "convert", "collect")
    if not args or args[0] in ("-h", "--help"):
        print("usage: diffrl data info DATASET [--env ID]\n"
              "       diffrl data convert DATASET --to minari|d4rl|npz --out TARGET\n"
              "       diffrl data collect --env ID --kind random|medium|medium-replay|expert|medium-expert")
        return
    if args[0] not in sub_commands:
        raise ConfigError(f"unknown data command {args[0]!r}: choose one of {', '.join(sub_commands)}.")
    if args[0] == "info":
        a = tyro.cli(DataInfoArgs, args=args[1:], prog="diffrl data info")
        info = load_dataset(a.dataset, env_id=a.env).describe()
        if a.json:
            print(json.dumps(info, indent=2, default=float))
        else:
            width = max(map(len, info))
            for k, v in info.items():
                print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    elif args[0] == "convert":
        a = tyro.cli(DataConvertArgs, args=args[1:], prog="diffrl data convert")
        ds = load_dataset(a.dataset)
        print(f"written: {save_dataset(ds, a.out, a.to, overwrite=a.overwrite)} ({len(ds)} transitions)")
    else:
        from diffrl.pipelines import data_collect

        cfg = _parse(data_collect.CollectConfig, args[1:], "diffrl data collect")
        print(f"dataset: {data_collect.run(cfg)}")


@dataclasses.dataclass(frozen=True)
class DiffusionSampleArgs:
    """Generate transitions with a trained diffusion model (EMA weights) into SynthER's npz layout
    (observations, actions, rewards, next_observations, terminals; terminals thresholded, out-of-range actions
    clipped or rejected)."""

    model: Path
    """run directory of `diffrl diffusion train` (or one of its checkpoints)"""
    num: int
    """number of transitions"""
    out: Path
    """output .npz file (never overwritten unless --overwrite)"""
    sampler: str | None = None
    """heun, euler, dpmpp_2m (EDM) or ddpm, ddim (DDPM); default: the model's"""
    steps: int | None = None
    """sampler steps (default: the model's)"""
    batch_size: int = 100_000
    """samples generated per batch"""
    seed: int = 0
    """sampling seed"""
    out_of_range: str = "clip"
    """a generated action outside the action space: clip it (SynthER) or reject the sample and draw another"""
    terminals: str = "model"
    """terminal flags: the model's (SynthER) or the env's known termination rule on the generated next state"""
    bf16: bool = False
    """run the network in bfloat16 autocast"""
    device: str = "auto"
    """auto, cpu or cuda"""
    overwrite: bool = False
    """replace an existing --out"""


@dataclasses.dataclass(frozen=True)
class DiffusionFidelityArgs:
    """Fidelity of generated transitions against a dataset: simulator validity, diversity, marginals, next to real
    data and a real-plus-noise baseline."""

    samples: Path
    """.npz of generated transitions (diffrl diffusion sample)"""
    dataset: str
    """the real dataset (Minari id or .hdf5 / .npz path)"""
    env: str | None = None
    """env id (default: the dataset's)"""
    num: int = 2000
    """transitions compared"""
    seed: int = 0
    """subsampling seed"""
    json_out: Path | None = None
    """also write the full report as JSON here"""


def cmd_diffusion(args: list[str]) -> None:
    from diffrl.pipelines import diffusion

    sub_commands = ("train", "sample", "fidelity")
    if not args or args[0] in ("-h", "--help"):
        print("usage: diffrl diffusion train --dataset D [--preset quick|paper] [options]\n"
              "       diffrl diffusion train --resume RUN_DIR [--steps N]\n"
              "       diffrl diffusion sample --model RUN_DIR --num N --out samples.npz [--sampler NAME --steps K]\n"
              "       diffrl diffusion fidelity --samples F --dataset D [--env ID]")
        return
    if args[0] not in sub_commands:
        raise ConfigError(f"unknown diffusion command {args[0]!r}: choose one of {', '.join(sub_commands)}.")
    if args[0] == "train":
        cfg = _config_from_args(diffusion.DiffusionConfig, diffusion.PRESETS, args[1:], "diffrl diffusion train",
                                diffusion.load_config, lambda saved: "diffrl diffusion train")
        run_dir = diffusion.run(cfg)
        s = json.loads((run_dir / "summary.json").read_text())
        print(f"run directory: {run_dir}")
        print(f"gradient steps: {s['gradient_steps']}, final loss {s['final_loss']:.4f}, wall {s['wall_s']:.0f} s "
              f"({s['updates_per_s']:.1f} steps/s)")
        if "synthetic" in (s.get("fidelity") or {}):
            from diffrl.eval.fidelity import format_fidelity

            print(format_fidelity(s["fidelity"]))
    elif args[0] == "sample":
        a = tyro.cli(DiffusionSampleArgs, args=args[1:], prog="diffrl diffusion sample")
        r = diffusion.sample_to_file(a.model, a.num, a.out, sampler=a.sampler, steps=a.steps,
                                     batch_size=a.batch_size, seed=a.seed, device=a.device, overwrite=a.overwrite,
                                     bf16=a.bf16, out_of_range=a.out_of_range, terminals=a.terminals)
        print(f"written: {r['out']} ({r['num']} transitions, sampler {r['sampler']} with {r['steps']} steps = "
              f"{r['network_evaluations']} network evaluations, {r['samples_per_s']:.0f} samples/s; "
              f"{r['out_of_range_fraction']:.1%} of the samples drawn had out-of-range actions, "
              f"{'rejected' if a.out_of_range == 'reject' else 'clipped'})")
        if r.get("terminal_rule_disagreement") is not None:
            print(f"the model's terminal flags disagree with {r['env_id']}'s termination rule on "
                  f"{r['terminal_rule_disagreement']:.2%} of the transitions"
                  + (" (the rule's labels were written)" if a.terminals == "rule" else ""))
    else:
        a = tyro.cli(DiffusionFidelityArgs, args=args[1:], prog="diffrl diffusion fidelity")
        report, table = diffusion.fidelity_of_file(a.samples, a.dataset, a.env, a.num, a.seed)
        print(table)
        if a.json_out is not None:
            from diffrl.runs.rundir import write_json_atomic

            write_json_atomic(a.json_out, report)
            print(f"written: {a.json_out}")


@dataclasses.dataclass(frozen=True)
class ReportArgs:
    """Learning curves (mean and spread over seeds) and a markdown table of final returns."""

    run_dirs: Annotated[tuple[Path, ...], tyro.conf.Positional]
    """run directories (seeds of one experiment are grouped by pipeline and env)"""
    out: Path = Path("report")
    """output directory for report.md, report.json and the PNG curves"""
    metric: str = "auto"
    """metrics.csv column to plot; auto: eval/success_rate for goal tasks (diffrl iter), else eval/return_mean"""


def cmd_report(args: list[str]) -> None:
    from diffrl.runs.report import make_report
    from diffrl.runs.rundir import read_config

    a = tyro.cli(ReportArgs, args=args, prog="diffrl report")
    metric = a.metric
    if metric == "auto":
        goal = a.run_dirs and all(read_config(d).get("pipeline") == "iter" for d in a.run_dirs)
        metric = "eval/success_rate" if goal else "eval/return_mean"
    path = make_report(list(a.run_dirs), a.out, metric=metric)
    print(f"report: {path}")


@dataclasses.dataclass(frozen=True)
class QuickstartArgs:
    """SynthER in miniature on a real MuJoCo task (minutes on 2 CPU cores): build a small dataset, train a diffusion
    model, generate, measure fidelity, train TD3+BC on real vs synthetic vs mixed data, write a report."""

    env: str = "Hopper-v5"
    """environment id (Gymnasium MuJoCo v5 locomotion)"""
    seed: int = 0
    """seed"""
    out: Path = Path("runs/quickstart")
    """where the study's directory goes"""
    expert_steps: int = 20_000
    """SAC env steps behind the dataset"""
    transitions: int = 20_000
    """dataset size"""
    diffusion_steps: int = 4_000
    """diffusion model gradient steps"""
    num_samples: int = 100_000
    """synthetic transitions"""
    agent_steps: int = 5_000
    """TD3+BC gradient steps per data mode"""
    progress: bool = True
    """show progress bars"""


def cmd_quickstart(args: list[str]) -> None:
    from diffrl.pipelines import quickstart

    a = tyro.cli(QuickstartArgs, args=args, prog="diffrl quickstart")
    for name in ("expert_steps", "transitions", "diffusion_steps", "num_samples", "agent_steps"):
        if getattr(a, name) <= 0:
            raise ConfigError(f"invalid {name}={getattr(a, name)}: it must be > 0.")
    print(f"diffrl quickstart: SynthER in miniature on {a.env} (dataset, diffusion model, fidelity, TD3+BC on real / "
          "synthetic / mixed data)", flush=True)
    report = quickstart.run(quickstart.QuickstartSettings(**dataclasses.asdict(a)))
    scores = json.loads((report.parent / "quickstart.json").read_text())
    print("normalized scores: " + ", ".join(f"{m} {v:.1f}" for m, v in scores["scores"].items()))
    print(f"total: {scores['timings_s']['total']:.0f} s")
    print(f"report: {report.resolve()}")


COMMANDS = {"train": cmd_train, "offline": cmd_offline, "data": cmd_data, "diffusion": cmd_diffusion,
            "synther": cmd_synther, "iter": cmd_iter, "dppo": cmd_dppo, "eval": cmd_eval,
            "report": cmd_report, "quickstart": cmd_quickstart}


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
    finally:
        warnings.formatwarning = previous


def _main(argv: list[str] | None) -> int:
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
