"""Which sampler Dydiff's window model needs: the reference's Heun with churn against few-step samplers, scored by
how far each one's rollouts are from MuJoCo's.

    python benchmarks/dydiff_samplers.py            # the six quick datasets, seed 0, the samplers in SAMPLERS
    python benchmarks/dydiff_samplers.py --datasets benchmarks/out/data/Hopper-v5-medium-replay-quick.hdf5
    python benchmarks/dydiff_samplers.py --table-only

The window model is the one ``diffrl dydiff --preset quick`` trains (horizon 32, temporal UNet width 32, 16k steps
at lr 1e-3), taken from the stage cache the Dydiff sweeps share (``--stage-cache``, default runs/dydiff-stages; it
is trained there first if it is missing). From the same 256 start states of the dataset and the dataset's own
next 31 actions (as ``diffrl dydiff fidelity``'s "data actions" rows), each sampler draws the model's states and
they are scored against the simulator replaying those actions, in units of the dataset's per-dimension std
(``diffrl.eval.rollout_fidelity.drift``), at horizons 1, 10 and 31, three noise seeds each; the single-step
ensemble of the same run, rolled out autoregressively, is the scale. Also: network evaluations per sample and the
sampling time of the 256 windows (one torch thread).

Rows (one per dataset, run seed and sampler) go to benchmarks/results/dydiff_samplers.jsonl; finished ones are
skipped when re-run.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from diffrl.augment.dydiff import WindowLayout, autoregressive_rollout, sample_states
from diffrl.data import dataset_env, load_dataset
from diffrl.diffusion.samplers import network_evaluations
from diffrl.eval.rollout_fidelity import drift, simulate
from diffrl.pipelines import dydiff
from diffrl.runs.device import tune_cpu_allocator
from harness import RESULTS, add_common_args, by_data, dataset_prints, run_all

DATA = Path(__file__).parent / "out" / "data"
DATASETS = [DATA / f"{env}-{kind}-quick.hdf5" for kind in ("medium-replay", "medium")
            for env in ("Hopper-v5", "Walker2d-v5", "HalfCheetah-v5")]
OUT = Path(__file__).parent / "out" / "dydiff_samplers"
QUICK = dydiff.PRESETS["td3bc"]["quick"]
HORIZON = QUICK["horizon"]
ROLLOUTS = 256
NOISE_SEEDS = (0, 1, 2)
# (label, sampler, steps): the quick preset's, cheaper and costlier few-step ones, and Heun with the reference's
# churn settings (S_churn 60, S_tmin 0.37, S_tmax 50, S_noise 1.003) at the reference's 34 steps and fewer
SAMPLERS = [
    ("DPM-Solver++(2M) SDE (quick)", "dpmpp_2m_sde", 32),
    ("DPM-Solver++(2M) SDE", "dpmpp_2m_sde", 16),
    ("DPM-Solver++(2M) SDE", "dpmpp_2m_sde", 64),
    ("DPM-Solver++(2M), ODE", "dpmpp_2m", 32),
    ("Heun + churn", "heun", 8),
    ("Heun + churn", "heun", 17),
    ("Heun + churn (reference)", "heun", 34),
]


def quick_config(dataset: Path, seed: int, cache: Path) -> object:
    """``diffrl dydiff --preset quick --dataset D --seed S --stage-cache CACHE`` (TD3+BC)."""
    cls = dydiff.ALGOS["td3bc"]
    return cls(**{**QUICK, "dataset": str(dataset), "seed": seed, "progress": False, "stage_cache": str(cache)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", type=Path, default=DATASETS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="run seeds (which window model)")
    ap.add_argument("--stage-cache", type=Path, default=Path(__file__).parents[1] / "runs" / "dydiff-stages")
    add_common_args(ap, RESULTS / "dydiff_samplers.jsonl")
    args = ap.parse_args()
    tune_cpu_allocator()
    prints = dataset_prints(args.datasets, args.table_only)
    jobs = [{"dataset": d.stem, "dataset_fingerprint": prints.get(d.stem), "seed": seed, "label": label,
             "sampler": sampler, "steps": steps, "horizon": HORIZON, "rollouts": ROLLOUTS}
            for d in args.datasets for seed in args.seeds for label, sampler, steps in SAMPLERS]
    paths = {d.stem: d for d in args.datasets}
    cache: dict[tuple[str, int], tuple] = {}

    def setting(stem: str, seed: int) -> tuple:
        """The run's models, start states, the simulator's rollouts and the single-step model's score (once)."""
        if (stem, seed) not in cache:
            cfg = quick_config(paths[stem], seed, args.stage_cache)
            ds = load_dataset(str(paths[stem]))
            run_dir = OUT / f"{stem}-s{seed}"  # used only without a stage cache
            model, model_dir = dydiff.window_model(cfg, ds, run_dir, torch.device("cpu"))
            dynamics = dydiff.single_step_models(cfg, ds, run_dir)[0]
            s0, actions = dydiff.fidelity_starts(ds, HORIZON, ROLLOUTS, torch.Generator().manual_seed(seed))
            sim = simulate(dataset_env(ds, None, str(paths[stem])), s0.numpy(), actions[:, :-1].numpy())
            scale = ds.observations.std(0)
            single = []
            for noise in NOISE_SEEDS:
                with torch.no_grad():
                    states = autoregressive_rollout(None, dynamics, s0, HORIZON, torch.Generator().manual_seed(noise),
                                                    actions)[0]
                single.append(drift(sim, states.numpy(), scale=scale)["state_error"])
            cache[stem, seed] = (cfg, ds, model, model_dir, s0, actions, sim, scale, np.mean(single, 0))
        return cache[stem, seed]

    def run_one(key: dict) -> dict:
        cfg, ds, model, model_dir, s0, actions, sim, scale, single = setting(key["dataset"], key["seed"])
        opts = dataclasses.replace(cfg, sampler=key["sampler"], sample_steps=key["steps"]).sample_options()
        layout = WindowLayout(ds.obs_dim, ds.act_dim, HORIZON)
        errs, secs = [], []
        for noise in NOISE_SEEDS:
            t0 = time.perf_counter()
            states = sample_states(model, layout, s0, actions, torch.Generator().manual_seed(noise), **opts)
            secs.append(time.perf_counter() - t0)
            errs.append(drift(sim, states.numpy(), scale=scale)["state_error"])
        err = np.mean(errs, 0)
        row = {**key, "model": str(model_dir), "nfe": network_evaluations(key["sampler"], key["steps"]),
               "sample_s": float(np.median(secs)), **{f"h{h}": float(err[h - 1]) for h in (1, 10, 31)},
               "h31_seeds": [float(e[30]) for e in errs], "options": opts,
               **{f"single_step_h{h}": float(single[h - 1]) for h in (1, 10, 31)}}
        print(f"{key['dataset']} s{key['seed']} {key['label']} {key['steps']}: h1 {row['h1']:.3f} h10 "
              f"{row['h10']:.3f} h31 {row['h31']:.3f} in {row['sample_s']:.1f} s", flush=True)
        return row

    rows = run_all(jobs, args.results, run_one, table_only=args.table_only)
    for stem, fp, got in by_data(rows):
        print(f"\n**{stem}** (data `{fp}`; {ROLLOUTS} start states, the dataset's actions, horizon {HORIZON - 1}; "
              f"state error against MuJoCo in dataset stds, mean over {len(NOISE_SEEDS)} noise seeds and run seeds "
              f"{sorted({r['seed'] for r in got})}; in brackets: against the reference's Heun)\n")
        print("| window-model sampler | steps | network evaluations | h1 | h10 | h31 | sampling s (256 windows) |")
        print("|---|---:|---:|---:|---:|---:|---:|")

        def m(rs: list, k: str) -> float:
            return float(np.mean([r[k] for r in rs]))

        def cell(rs: list, k: str, ref: list) -> str:
            """The mean, and its gap to the reference's Heun (unless it is that)."""
            gap = f" ({100 * (m(rs, k) / m(ref, k) - 1):+.0f}%)" if ref and rs[0] not in ref else ""
            return f"{m(rs, k):.3f}{gap}"

        ref = [r for r in got if r["sampler"] == "heun" and r["steps"] == 34]
        for label, sampler, steps in dict.fromkeys((r["label"], r["sampler"], r["steps"]) for r in got):
            rs = [r for r in got if (r["label"], r["sampler"], r["steps"]) == (label, sampler, steps)]
            print(f"| {label} | {steps} | {rs[0]['nfe']} | {cell(rs, 'h1', ref)} | {cell(rs, 'h10', ref)} | "
                  f"{cell(rs, 'h31', ref)} | {m(rs, 'sample_s'):.1f} |")
        print(f"| single-step ensemble, autoregressive | | | {m(got, 'single_step_h1'):.3f} | "
              f"{m(got, 'single_step_h10'):.3f} | {m(got, 'single_step_h31'):.3f} | |")
    # per sampler: its worst gap to the reference's Heun over the datasets that have both
    worst: dict[tuple, dict[str, float]] = {}
    for r in rows:
        ref = next((q for q in rows if (q["dataset"], q["dataset_fingerprint"], q["seed"], q["sampler"], q["steps"])
                    == (r["dataset"], r["dataset_fingerprint"], r["seed"], "heun", 34)), None)
        if ref is not None and r is not ref:
            w = worst.setdefault((r["label"], r["steps"], r["nfe"]), {})
            for h in ("h1", "h10", "h31"):
                w[h] = max(w.get(h, -np.inf), 100 * (r[h] / ref[h] - 1))
            w["n"] = w.get("n", 0) + 1
    if worst:
        print("\nWorst gap to the reference's Heun (34 steps, 67 evaluations) over the datasets, per horizon "
              "(negative: closer to MuJoCo on every dataset)\n")
        print("| window-model sampler | steps | network evaluations | datasets | h1 | h10 | h31 |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for (label, steps, nfe), w in worst.items():
            print(f"| {label} | {steps} | {nfe} | {w['n']} | {w['h1']:+.0f}% | {w['h10']:+.0f}% | {w['h31']:+.0f}% |")


if __name__ == "__main__":
    main()
