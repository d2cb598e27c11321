"""Diffusion training and sampling speed on this machine, fp32 vs bf16, against the matmul peak and SynthER.

    python benchmarks/diffusion_speed.py                      # widths 256 and 1024, fp32 and bf16
    python benchmarks/diffusion_speed.py --train-steps 300    # a smoke run

SynthER's denoiser (residual MLP, 6 blocks, dim_t 128) on Hopper transitions (27 dims with the terminal column),
batch 256, EDM loss. For each (width, precision):
- training steps/s (the full DiffusionTrainer step: batch draw, loss, backward, grad clip, fused AdamW, EMA),
  and the FLOP rate it implies (forward 2 x MACs, backward 2x forward) as a fraction of the measured matmul peak;
- a held-out loss after ``--train-steps`` steps, evaluated in fp32 with fixed noise on 4096 unseen transitions,
  so bf16 training is judged by the quality it reaches, not just its speed;
- samples/s with SynthER's sampler (128 churned Heun steps = 255 network evaluations).
SynthER's own code was measured on this machine type (project notes, 2 threads): width 1024 - 12 train steps/s,
50 samples/s; width 256 - 118 train steps/s, 530 samples/s. Those are printed beside ours (not re-run: SynthER
needs gin/accelerate/D4RL and is not installable here). Target: width 1024 >= 20 steps/s at a held-out loss within
5% of fp32's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from diffrl.augment import TransitionLayout
from diffrl.data import load_dataset
from diffrl.diffusion.spec import build_model
from diffrl.diffusion.trainer import DiffusionTrainer, TrainerSettings
from diffrl.runs.device import tune_cpu_allocator
from diffrl.runs.results import provenance
from harness import RESULTS, append_row

OUT = Path(__file__).parent / "out"
SYNTHER = {1024: (12.0, 50.0), 256: (118.0, 530.0)}  # train steps/s, samples/s (SynthER's code, this machine)


def hopper_vectors(path: Path) -> np.ndarray:
    """SynthER vectors of a Hopper dataset, or of random Hopper transitions when the dataset is not built."""
    if path.exists():
        ds = load_dataset(str(path))
        return TransitionLayout(ds.obs_dim, ds.act_dim).join(ds)
    from diffrl.envs import make_env

    env, rows = make_env("Hopper-v5"), []
    obs, _ = env.reset(seed=0)
    for _ in range(60_000):
        act = env.action_space.sample()
        nxt, rew, term, trunc, _ = env.step(act)
        rows.append(np.concatenate([obs, act, [rew], nxt, [float(term)]]))
        obs = env.reset()[0] if term or trunc else nxt
    return np.asarray(rows, np.float32)


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 20) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def spec(width: int, dim: int) -> dict:
    return {"type": "edm", "event_shape": [dim], "normalizer": {"kind": "zscore", "skip_dims": [dim - 1]},
            "denoiser": {"type": "resmlp", "width": width, "depth": 6, "dim_t": 128}}


def macs_per_sample(model: torch.nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))


@torch.no_grad()
def heldout_loss(model, data: torch.Tensor) -> float:
    gen = torch.Generator().manual_seed(123)
    model.eval()
    losses = [float(model.loss(data, generator=gen)) for _ in range(8)]
    return float(np.mean(losses))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", nargs="+", type=int, default=[256, 1024])
    ap.add_argument("--train-steps", type=int, default=2000, help="steps trained before the held-out loss")
    ap.add_argument("--samples", type=int, default=4000, help="samples drawn for the sampling rate")
    ap.add_argument("--dataset", type=Path, default=OUT / "data" / "hopper-medium-replay-quick.hdf5")
    args = ap.parse_args()
    tune_cpu_allocator()
    torch.manual_seed(0)
    x = torch.as_tensor(hopper_vectors(args.dataset))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, held = x[perm[4096:]], x[perm[:4096]]
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"matmul peak (2048^2, {torch.get_num_threads()} threads): fp32 {peak['fp32']:.0f} GFLOP/s, "
          f"bf16 {peak['bf16']:.0f} GFLOP/s; data {tuple(x.shape)} from "
          f"{args.dataset.name if args.dataset.exists() else 'random Hopper rollouts'}", flush=True)
    rows = []
    for width in args.widths:
        for prec in ("fp32", "bf16"):
            torch.manual_seed(0)
            model = build_model(spec(width, x.shape[1]))
            model.normalizer.fit(train)
            trainer = DiffusionTrainer(model, train, TrainerSettings(steps=args.train_steps, bf16=prec == "bf16"))
            for _ in range(5):
                trainer.train_step()
            t0 = time.perf_counter()
            for _ in range(args.train_steps - 5):
                trainer.train_step()
            rate = (args.train_steps - 5) / (time.perf_counter() - t0)
            flops = 3 * 2 * macs_per_sample(model.net) * 256 * rate / 1e9
            loss = heldout_loss(trainer.ema.shadow, held)
            sampler = trainer.ema.shadow
            sampler.amp_dtype = torch.bfloat16 if prec == "bf16" else None
            t0 = time.perf_counter()
            sampler.sample(args.samples, sampler="heun", steps=128, generator=torch.Generator().manual_seed(0))
            sps = args.samples / (time.perf_counter() - t0)
            row = {"width": width, "precision": prec, "train_steps_per_s": rate, "gflops": flops,
                   "peak_fraction": flops / peak[prec], "heldout_loss": loss, "samples_per_s": sps,
                   "train_steps": args.train_steps, "peak_gflops": peak[prec],
                   "date": time.strftime("%Y-%m-%d %H:%M")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    prov = provenance()
    for r in rows:
        append_row(RESULTS / "diffusion_speed.jsonl", {**r, **prov})
    print(f"\nresidual MLP denoiser, 6 blocks, batch 256, {args.train_steps} training steps, held-out EDM loss in fp32;"
          " sampling: Heun 128 steps with churn (255 evaluations)\n")
    print("| width | precision | train steps/s | GFLOP/s (% of matmul peak) | held-out loss (vs fp32) | samples/s |"
          " SynthER train steps/s | SynthER samples/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        fp32 = next(q for q in rows if q["width"] == r["width"] and q["precision"] == "fp32")
        ref = SYNTHER.get(r["width"], (None, None))
        print(f"| {r['width']} | {r['precision']} | {r['train_steps_per_s']:.1f} | {r['gflops']:.0f} "
              f"({100 * r['peak_fraction']:.0f}%) | {r['heldout_loss']:.4f} "
              f"({100 * (r['heldout_loss'] / fp32['heldout_loss'] - 1):+.1f}%) | {r['samples_per_s']:.0f} | "
              f"{ref[0] if ref[0] else '—'} | {ref[1] if ref[1] else '—'} |")


if __name__ == "__main__":
    main()
