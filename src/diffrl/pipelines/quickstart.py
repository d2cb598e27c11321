"""``diffrl quickstart``: a SynthER study in miniature on a real MuJoCo task, minutes on 2 CPU cores.

1. build a small mixed-quality dataset: the replay buffer of a short SAC run (D4RL's "medium-replay" recipe at a
   CPU budget), of which a random ``data_fraction`` of the episodes is kept: little data of uneven quality, the
   setting where upsampling it could help (the expert that defines the score's 100 recorded none of it);
2. train a small transition diffusion model on that slice (SynthER's residual MLP at width 256);
3. generate synthetic transitions (stochastic DPM-Solver++, 32 evaluations) and measure their fidelity;
4. train TD3+BC on the slice alone (real), on synthetic data only, and on the slice upsampled by synthetic data
   (mixed, 50/50 batches), same seed and budget: mixed against real is SynthER's effect, or its absence;
5. write ``report.md`` with the figures and PNG plots (learning curves, marginals of real vs synthetic data).
Everything lands in one directory under ``runs/`` (the return value); nothing outside the package is needed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from diffrl import registry
from diffrl.data import load_dataset
from diffrl.errors import ConfigError
from diffrl.eval import describe_dataset
from diffrl.eval.fidelity import format_fidelity
from diffrl.registry import System, Tool
from diffrl.runs.logger import read_metrics
from diffrl.runs.rundir import task_name


@dataclasses.dataclass(frozen=True)
class QuickstartSettings:
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
    data_fraction: float = 0.25
    """share of the dataset's episodes the study keeps (the same slice for every arm and the diffusion model)"""
    diffusion_steps: int = 4_000
    """diffusion model gradient steps"""
    num_samples: int = 50_000
    """synthetic transitions"""
    agent_steps: int = 5_000
    """TD3+BC gradient steps per data mode"""
    progress: bool = True
    """show progress bars"""


MODES = ("real", "synthetic", "mixed")


def _plots(out: Path, runs: dict[str, Path], real: dict[str, np.ndarray], samples: dict[str, np.ndarray]) -> list[str]:
    # Figure + Agg canvas directly, as runs/report.py: no pyplot, no global backend switch, nothing left open
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    files = []
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for mode, run_dir in runs.items():
        rows = [r for r in read_metrics(run_dir) if not np.isnan(r.get("eval/normalized_score", np.nan))]
        ax.plot([r["step"] for r in rows], [r["eval/normalized_score"] for r in rows], marker="o", label=mode)
    ax.set_xlabel("TD3+BC gradient steps")
    ax.set_ylabel("normalized score (x100)")
    ax.set_title("TD3+BC on real, synthetic and mixed data")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=110)
    files.append("learning_curves.png")

    dims = [("observations", 0), ("observations", 5), ("actions", 0), ("rewards", None)]
    fig = Figure(figsize=(3.2 * len(dims), 3))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(dims))
    for ax, (key, d) in zip(axes, dims, strict=True):
        r = real[key] if d is None else real[key][:, d]
        s = samples[key] if d is None else samples[key][:, d]
        lo, hi = np.percentile(np.concatenate([r, s]), [0.5, 99.5])
        bins = np.linspace(lo, hi, 50)
        ax.hist(r, bins=bins, density=True, alpha=0.5, label="real")
        ax.hist(s, bins=bins, density=True, alpha=0.5, label="synthetic")
        ax.set_title(key if d is None else f"{key}[{d}]")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "marginals.png", dpi=110)
    files.append("marginals.png")
    return files


def _clipped(fraction: float | None) -> str:
    if fraction is None:
        return ""
    return (f"; {fraction:.0%} of them had an action outside [-1, 1], clipped to it (diffrl's default; SynthER "
            "keeps them: `--out-of-range keep`, and `reject` redraws them)")


def run(s: QuickstartSettings) -> Path:
    """Run the study; returns the path of ``report.md``."""
    out = s.out / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=False)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    data_path = out / f"{task_name(s.env)}-medium-replay-sac{s.expert_steps // 1000}k.hdf5"
    collect = _tool("data", "collect")  # other systems are reached through the registry, never imported
    collect.run(collect.args(env=s.env, kind="medium-replay", seed=s.seed, out=str(data_path),
                             expert_steps=s.expert_steps, experts_dir=out / "expert", progress=s.progress))
    timings["dataset"] = time.perf_counter() - t0

    synther = registry.get("synther").command("offline")  # type: ignore[union-attr]
    algo = synther.configs["td3bc"]  # type: ignore[union-attr]
    common: dict[str, Any] = dict(dataset=str(data_path), seed=s.seed, steps=s.agent_steps, eval_every=1_000,
                                  eval_episodes=5, checkpoint_every=s.agent_steps, diffusion_steps=s.diffusion_steps,
                                  diffusion_width=256, sampler="dpmpp_2m_sde", sample_steps=32,
                                  num_samples=s.num_samples, data_fraction=s.data_fraction,
                                  progress=s.progress)
    runs: dict[str, Path] = {}
    for mode in ("synthetic", "mixed", "real"):  # synthetic first: it trains the diffusion model the others reuse
        t0 = time.perf_counter()
        extra: dict[str, Any] = {"data_mode": mode, "run_dir": out / f"td3bc-{mode}"}
        if mode != "synthetic":
            extra["diffusion"] = runs["synthetic"] / "diffusion"
        runs[mode] = synther.run(algo(**common, **extra))  # type: ignore[union-attr]
        timings[f"td3bc_{mode}"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    summaries = {m: json.loads((runs[m] / "summary.json").read_text()) for m in MODES}
    full = load_dataset(str(data_path))
    real = full.subset_episodes(s.data_fraction, s.seed) if s.data_fraction < 1.0 else full  # the arms' slice
    with np.load(runs["synthetic"] / "samples.npz") as f:
        samples = {k: f[k] for k in f.files}
    plots = _plots(out, {m: runs[m] for m in MODES}, real.arrays(), samples)
    syn = summaries["synthetic"]
    info, kept = describe_dataset(full), describe_dataset(real)
    lines = [
        f"# diffrl quickstart: SynthER in miniature on {s.env}",
        "",
        f"Total wall time: {timings['total']:.0f} s on this machine. Directory: `{out}`.",
        "",
        "## 1. Data",
        f"A SAC agent trained for {s.expert_steps} env steps; its replay buffer up to its medium snapshot (D4RL's "
        f"medium-replay recipe) holds {info['transitions']} transitions in {info['episodes']} episodes of uneven "
        f"quality (return {info['return_mean']:.0f} ± {info['return_std']:.0f}, normalized score "
        f"{info.get('normalized_mean', 0):.1f}; 100 is that SAC run's best snapshot, which recorded none of them)"
        f" -> `{data_path.name}` ({timings['dataset']:.0f} s). The study keeps a random "
        f"{s.data_fraction:.0%} of the episodes: {kept['transitions']} transitions in {kept['episodes']} episodes "
        f"(normalized score {kept.get('normalized_mean', 0):.1f}). Every arm below and the diffusion model see "
        "only this slice.",
        "",
        "## 2. Diffusion model and synthetic data",
        f"EDM with SynthER's residual MLP (width 256, 6 blocks) trained for {s.diffusion_steps} steps on the "
        f"slice ({syn.get('diffusion_train_s', 0):.0f} s, final loss "
        f"{syn.get('diffusion_final_loss') or 0:.3f}); "
        f"{syn['num_samples']} synthetic transitions generated with stochastic DPM-Solver++ (32 network "
        f"evaluations){_clipped(syn.get('out_of_range_fraction'))}.",
        "",
        "How good are they? Each generated (s, a) is replayed in MuJoCo and the generated (r, s') compared with "
        "the simulator's; real data and real data plus noise give the scale:",
        "",
        format_fidelity(syn["fidelity"]) if "fidelity" in syn else "(fidelity not measured for this env)",
        "",
        "Reading it: NMSE is the squared error against the simulator in units of the data's variance (real data "
        "replays exactly, ~1e-13); the noise baseline shows what a 10%-of-std perturbation costs. A nearest-"
        "neighbour ratio near 1 means synthetic points sit as far from the real data as real points sit from each "
        "other (new data, not copies; near 0 would be memorisation). Marginal W1 compares each dimension's "
        "distribution with the real one, in units of its std.",
        "",
        "![marginals](marginals.png)",
        "",
        "## 3. TD3+BC on real, synthetic and mixed data",
        f"Same seed, {s.agent_steps} gradient steps each, state normalisation from the slice; evaluation every "
        "1000 steps over 5 episodes. real: the slice alone; synthetic: generated data only; mixed: batches half "
        "slice, half generated (SynthER's upsampling). Mixed against real is the effect SynthER claims.",
        "",
        "| data | final normalized score | best | final return | wall |",
        "|---|---:|---:|---:|---:|",
    ]
    for m in MODES:
        sm = summaries[m]
        lines.append(f"| {m} | {sm['normalized_score']:.1f} | {sm['best_score']:.1f} | {sm['eval_return_mean']:.0f} "
                     f"| {timings[f'td3bc_{m}']:.0f} s |")
    gain = summaries["mixed"]["normalized_score"] - summaries["real"]["normalized_score"]
    lines += ["", f"mixed - real: {gain:+.1f} points of normalized score at the end of training (one seed).", "",
              "![learning curves](learning_curves.png)", "",
              "One seed and a tiny budget: a difference of a few points is within the seed-to-seed spread and is no "
              "evidence either way. `benchmarks/RESULTS.md` has the same comparison over paired seeds (SynthER "
              "offline) with bootstrap confidence intervals. Next: `diffrl synther offline --help`, "
              "`diffrl synther online --help`."]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (out / "quickstart.json").write_text(json.dumps({"timings_s": timings, "plots": plots,
                                                     "runs": {m: str(p) for m, p in runs.items()},
                                                     "scores": {m: summaries[m]["normalized_score"] for m in MODES}},
                                                    indent=2))
    return report


def _tool(system: str, name: str) -> Tool:
    found = registry.get(system)
    tool = found.tool(name) if found is not None else None
    assert tool is not None and tool.run is not None, f"no `diffrl {system} {name}` with a run() is registered"
    return tool


def main(a: QuickstartSettings) -> None:
    """``diffrl quickstart``: run the study and print the scores and the report's path."""
    for name in ("expert_steps", "diffusion_steps", "num_samples", "agent_steps"):
        if getattr(a, name) <= 0:
            raise ConfigError(f"invalid {name}={getattr(a, name)}: it must be > 0.")
    if not 0 < a.data_fraction <= 1:
        raise ConfigError(f"invalid data_fraction={a.data_fraction}: it must be in (0, 1].")
    print(f"diffrl quickstart: SynthER in miniature on {a.env} (a small mixed-quality dataset, a diffusion model, "
          "fidelity, TD3+BC on the data alone / synthetic / upsampled)", flush=True)
    report = run(a)
    scores = json.loads((report.parent / "quickstart.json").read_text())
    print("normalized scores: " + ", ".join(f"{m} {v:.1f}" for m, v in scores["scores"].items()))
    print(f"total: {scores['timings_s']['total']:.0f} s")
    print(f"report: {report.resolve()}")


SYSTEM = System("quickstart", "a short demo run with a report (SynthER in miniature)",
                tools=(Tool("", QuickstartSettings, main),))
