"""How well Dydiff's window model fits the dynamics at a given training budget: its rollouts against MuJoCo's, next
to the single-step ensemble's and next to predicting "nothing moves" (a diagnostic for reading the Dydiff tables).

    python benchmarks/dydiff_window_fit.py          # Hopper medium-replay, seed 0, the variants in VARIANTS
    python benchmarks/dydiff_window_fit.py --datasets benchmarks/out/data/Walker2d-v5-medium-replay-quick.hdf5
    python benchmarks/dydiff_window_fit.py --table-only

Each variant trains the window model of ``diffrl dydiff --preset quick`` (horizon 32, temporal UNet width 32,
Dydiff's EDM settings) with another optimisation budget: gradient steps, windows per step, learning rate (the
first variant is the quick preset's budget until 2026-12-04, the last the one it has since). Then, from the same
128 start states of the dataset and the dataset's own next 31 actions (as ``diffrl dydiff fidelity``'s "data
actions" rows), it scores against the simulator, in units of the dataset's per-dimension std
(``diffrl.eval.rollout_fidelity.drift``):

- the window model's samples (the quick preset's sampler, DPM-Solver++(2M) SDE, 32 steps) with its EMA weights
  (what Dydiff uses) and with its raw weights, at horizons 1, 10 and 31;
- the single-step ensemble of the same preset (7 members, 5 elites), rolled out autoregressively with the same
  actions, and ``s_1 = s_0`` (the trivial one-step prediction).

Rows (one per dataset, seed and variant) go to benchmarks/results/dydiff_window_fit.jsonl; finished ones are
skipped when re-run; models are kept in benchmarks/out/dydiff_window_fit/.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from pathlib import Path

import numpy as np
import torch

from diffrl.augment.dydiff import WindowLayout, autoregressive_rollout, sample_states
from diffrl.data import dataset_env, load_dataset
from diffrl.diffusion.spec import load_model
from diffrl.eval.rollout_fidelity import drift, simulate
from diffrl.pipelines import dydiff
from diffrl.runs.device import tune_cpu_allocator
from diffrl.runs.rundir import read_summary
from harness import RESULTS, add_common_args, by_data, dataset_prints, run_all

OUT = Path(__file__).parent / "out" / "dydiff_window_fit"
QUICK = dydiff.PRESETS["td3bc"]["quick"]
HORIZON = QUICK["horizon"]
ROLLOUTS = 128
# (label, gradient steps, windows per step, learning rate)
VARIANTS = [
    ("quick until 2026-12-04", 4_000, 16, 4e-4),
    ("4x windows per step", 4_000, 64, 4e-4),
    ("lr 1e-3", 4_000, 16, 1e-3),
    ("4x steps", 16_000, 16, 4e-4),
    ("4x steps, lr 1e-3 (quick now)", 16_000, 16, 1e-3),
]


def quick_config(dataset: Path, seed: int, **override: object) -> object:
    """``diffrl dydiff --preset quick --dataset D --seed S`` (TD3+BC) with ``override``."""
    cls = dydiff.ALGOS["td3bc"]
    return cls(**{**QUICK, "dataset": str(dataset), "seed": seed, "progress": False, **override})


def window_model(dataset: Path, seed: int, steps: int, batch: int, lr: float) -> Path:
    """The quick preset's window model of ``dataset`` trained with this budget (trained once, then reused)."""
    ds = load_dataset(str(dataset))
    run_dir = OUT / f"{dataset.stem}-s{seed}-{steps}x{batch}-lr{lr:g}"
    if not (run_dir / "summary.json").exists():
        cfg = quick_config(dataset, seed, diffusion_steps=steps, diffusion_batch_size=batch, diffusion_lr=lr)
        dydiff.train_window_model(dataclasses.replace(dydiff.window_config(cfg, ds), checkpoint_every=steps,
                                                      run_dir=run_dir), ds)
    return run_dir


@functools.cache
def starts(dataset: Path, seed: int) -> tuple:
    """The dataset, its start states and actions for the check, and the simulator's rollouts from them."""
    ds = load_dataset(str(dataset))
    s0, actions = dydiff.fidelity_starts(ds, HORIZON, ROLLOUTS, torch.Generator().manual_seed(seed))
    sim = simulate(dataset_env(ds, None, str(dataset)), s0.numpy(), actions[:, :-1].numpy())
    return ds, s0, actions, sim


@functools.cache
def single_step(dataset: Path, seed: int) -> dict[str, float]:
    """The quick preset's single-step ensemble (fitted once per dataset and seed, then kept) and s_1 = s_0, scored."""
    ds, s0, actions, sim = starts(dataset, seed)
    scale = ds.observations.std(0)
    ens = dydiff.fit_single_step_models(quick_config(dataset, seed), ds, OUT / f"{dataset.stem}-s{seed}-models")[0]
    with torch.no_grad():
        states = autoregressive_rollout(None, ens, s0, HORIZON, torch.Generator().manual_seed(seed), actions)[0]
    err = drift(sim, states.numpy(), scale=scale)["state_error"]
    still = drift(sim, s0[:, None].expand(-1, HORIZON, -1).numpy(), scale=scale)["state_error"]
    return {"single_step_h1": float(err[0]), "single_step_h10": float(err[9]),
            "single_step_h31": float(err[HORIZON - 2]), "still_h1": float(still[0])}


def score(dataset: Path, seed: int, model_dir: Path) -> dict:
    ds, s0, actions, sim = starts(dataset, seed)
    scale = ds.observations.std(0)
    layout = WindowLayout(ds.obs_dim, ds.act_dim, HORIZON)
    out: dict = {"train_s": read_summary(model_dir)["wall_s"], "final_loss": read_summary(model_dir)["final_loss"]}
    for weights in ("ema", "raw"):
        model, _ = load_model(model_dir, ema=weights == "ema")
        with torch.no_grad():
            states = sample_states(model, layout, s0, actions, torch.Generator().manual_seed(seed))
            err = drift(sim, states.numpy(), scale=scale)["state_error"]
        out.update({f"{weights}_h1": float(err[0]), f"{weights}_h10": float(err[9]),
                    f"{weights}_h31": float(err[HORIZON - 2])})
    return {**out, **single_step(dataset, seed)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", type=Path,
                    default=[Path(__file__).parent / "out" / "data" / "Hopper-v5-medium-replay-quick.hdf5"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    add_common_args(ap, RESULTS / "dydiff_window_fit.jsonl")
    args = ap.parse_args()
    tune_cpu_allocator()
    prints = dataset_prints(args.datasets, args.table_only)
    jobs = [{"dataset": d.stem, "dataset_fingerprint": prints.get(d.stem), "seed": seed, "label": label,
             "steps": steps, "batch_size": batch, "lr": lr, "horizon": HORIZON, "rollouts": ROLLOUTS}
            for d in args.datasets for seed in args.seeds for label, steps, batch, lr in VARIANTS]
    paths = {d.stem: d for d in args.datasets}

    def run_one(key: dict) -> dict:
        t0 = time.perf_counter()
        model_dir = window_model(paths[key["dataset"]], key["seed"], key["steps"], key["batch_size"], key["lr"])
        row = {**key, **score(paths[key["dataset"]], key["seed"], model_dir)}
        print(f"{key['dataset']} s{key['seed']} {key['label']}: h1 {row['ema_h1']:.2f} (single-step "
              f"{row['single_step_h1']:.2f}) in {time.perf_counter() - t0:.0f} s", flush=True)
        return row

    rows = run_all(jobs, args.results, run_one, table_only=args.table_only)
    for stem, fp, got in by_data(rows):
        print(f"\n**{stem}** (data `{fp}`; {ROLLOUTS} start states, the dataset's actions, horizon {HORIZON - 1}; "
              "state error against MuJoCo in dataset stds, mean over seeds "
              f"{sorted({r['seed'] for r in got})})\n")
        print("| model | steps x windows, lr | train s | final loss | EMA h1 | h10 | h31 | raw h1 | h10 | h31 |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        labels = list(dict.fromkeys(r["label"] for r in got))
        for label in labels:
            rs = [r for r in got if r["label"] == label]

            def m(k: str, rs: list = rs) -> float:
                return float(np.mean([r[k] for r in rs]))

            r0 = rs[0]
            print(f"| window, {label} | {r0['steps']} x {r0['batch_size']}, {r0['lr']:g} | {m('train_s'):.0f} | "
                  f"{m('final_loss'):.3f} | {m('ema_h1'):.2f} | {m('ema_h10'):.2f} | {m('ema_h31'):.2f} | "
                  f"{m('raw_h1'):.2f} | {m('raw_h10'):.2f} | {m('raw_h31'):.2f} |")
        ss = {k: float(np.mean([r[k] for r in got])) for k in ("single_step_h1", "single_step_h10",
                                                                  "single_step_h31", "still_h1")}
        print(f"| single-step ensemble, autoregressive | | | | {ss['single_step_h1']:.2f} | "
              f"{ss['single_step_h10']:.2f} | {ss['single_step_h31']:.2f} | | | |")
        print(f"| s_1 = s_0 | | | | {ss['still_h1']:.2f} | | | | | |")


if __name__ == "__main__":
    main()
