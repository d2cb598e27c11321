"""diffrl SAC vs Stable-Baselines3 SAC, same settings, interleaved in one run.

Settings (both): batch 256, 2x256 MLPs, UTD 1 (one gradient step per env step), learning starts 5000,
lr 3e-4, gamma 0.99, tau 0.005, automatic temperature (initial alpha 1), buffer 1M, CPU.
Env steps/s is measured over the whole training run (random warm-up included, evaluation excluded).
Both libraries' final policies are scored by diffrl's single ``evaluate`` (10 deterministic episodes, same
eval seeds). Runs alternate between libraries so machine-load drift hits both.

Also prints the cost of one REDQ (N=10, M=2) update relative to one SAC update.

    python benchmarks/sac_vs_sb3.py                       # the full table (2 envs x 3 seeds x 30k steps)
    python benchmarks/sac_vs_sb3.py --steps 6000 --seeds 0 --envs Hopper-v5   # a smoke run

Results are appended to benchmarks/results/sac_vs_sb3.jsonl (finished runs are skipped when re-run).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from diffrl.agents import SAC, REDQParams, SACParams
from diffrl.data import ReplayBuffer
from diffrl.envs import make_env
from diffrl.eval import evaluate
from diffrl.pipelines.online import SACConfig, run
from diffrl.runs.device import tune_cpu_allocator
from harness import RESULTS, add_common_args, print_row, run_all

OUT = Path(__file__).parent / "out"


def run_diffrl(env_id: str, seed: int, steps: int, eval_episodes: int) -> dict:
    cfg = SACConfig(env=env_id, seed=seed, steps=steps, learning_starts=5000, batch_size=256, utd=1,
                    hidden=(256, 256), buffer_size=1_000_000, eval_every=0, eval_episodes=eval_episodes,
                    log_every=1000, checkpoint_every=10**9, device="cpu", runs_root=OUT / "runs", progress=False)
    run_dir = run(cfg)
    s = json.loads((run_dir / "summary.json").read_text())
    train_s = s["wall_s"] - s["time_breakdown_s"]["eval_s"]
    return {"sps": steps / train_s, "train_s": train_s, "return": s["eval_return_mean"]}


def run_sb3(env_id: str, seed: int, steps: int, eval_episodes: int) -> dict:
    import gymnasium as gym
    from stable_baselines3 import SAC as SB3SAC

    env = gym.make(env_id)
    model = SB3SAC("MlpPolicy", env, learning_rate=3e-4, buffer_size=1_000_000, learning_starts=5000,
                   batch_size=256, tau=0.005, gamma=0.99, train_freq=1, gradient_steps=1, ent_coef="auto",
                   policy_kwargs=dict(net_arch=[256, 256]), seed=seed, device="cpu", verbose=0)
    t0 = time.perf_counter()
    model.learn(total_timesteps=steps)
    train_s = time.perf_counter() - t0
    result = evaluate(lambda o: model.predict(o, deterministic=True)[0], make_env(env_id), eval_episodes, seed=seed)
    return {"sps": steps / train_s, "train_s": train_s, "return": result.return_mean}


def update_cost(n: int = 200) -> dict:
    """Seconds per update of SAC (N=2) and REDQ (N=10, M=2) on the same random HalfCheetah-sized batches."""
    rng = np.random.default_rng(0)
    buf = ReplayBuffer.for_transitions(10_000, 17, 6)
    k = 10_000
    buf.add_batch(obs=rng.normal(size=(k, 17)), act=rng.uniform(-1, 1, (k, 6)), rew=rng.normal(size=k),
                  next_obs=rng.normal(size=(k, 17)), done=np.zeros(k))
    out = {}
    for name, agent in (("sac", SAC(17, 6, SACParams())), ("redq", SAC(17, 6, REDQParams(actor_update_every=1)))):
        for _ in range(20):
            agent.update(buf.sample(256))
        t0 = time.perf_counter()
        for _ in range(n):
            agent.update(buf.sample(256))
        out[name] = (time.perf_counter() - t0) / n
    return out


def table(rows: list[dict]) -> str:
    lines = ["| env | library | env steps/s (mean ± std) | final return (mean ± std) | seeds |",
             "|---|---|---|---|---|"]
    for env_id in sorted({r["env"] for r in rows}):
        sps = {}
        for lib in ("diffrl", "sb3"):
            rs = [r for r in rows if r["env"] == env_id and r["lib"] == lib]
            if not rs:
                continue
            s, R = np.array([r["sps"] for r in rs]), np.array([r["return"] for r in rs])
            sps[lib] = s.mean()
            lines.append(f"| {env_id} | {lib} | {s.mean():.1f} ± {s.std():.1f} | {R.mean():.0f} ± {R.std():.0f} | "
                         f"{len(rs)} |")
        if len(sps) == 2:
            lines.append(f"| {env_id} | **ratio diffrl / sb3** | **{sps['diffrl'] / sps['sb3']:.2f}x** | | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--envs", nargs="+", default=["HalfCheetah-v5", "Hopper-v5"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=30_000)
    ap.add_argument("--eval-episodes", type=int, default=10)
    add_common_args(ap, RESULTS / "sac_vs_sb3.jsonl")
    args = ap.parse_args()
    os.environ.setdefault("DIFFRL_PROGRESS", "0")
    # The allocator setting `diffrl` applies; process-wide, so SB3 runs with it too (same conditions).
    tuned = tune_cpu_allocator()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {os.cpu_count()} cpus, "
          f"glibc allocator tuned: {tuned}", flush=True)

    def run_one(key: dict) -> dict:
        fn = run_diffrl if key["lib"] == "diffrl" else run_sb3
        return {**key, **fn(key["env"], key["seed"], args.steps, args.eval_episodes),
                "date": time.strftime("%Y-%m-%d %H:%M")}

    # alternate which library goes first so slow drift in machine load hits both
    jobs = [dict(env=env_id, seed=seed, lib=lib, steps=args.steps) for seed in args.seeds for env_id in args.envs
            for lib in (("diffrl", "sb3") if seed % 2 == 0 else ("sb3", "diffrl"))]
    done = run_all(jobs, args.results, run_one, table_only=args.table_only, on_row=print_row)
    rows = [r for r in done if r["steps"] == args.steps and r["env"] in args.envs and r["seed"] in args.seeds]
    print()
    print(f"SAC, {args.steps} env steps, UTD 1, batch 256, 2x256, learning starts 5000")
    print(table(rows))
    cost = update_cost()
    print()
    print(f"update cost: SAC {cost['sac'] * 1e3:.2f} ms, REDQ (N=10, M=2) {cost['redq'] * 1e3:.2f} ms "
          f"-> REDQ/SAC = {cost['redq'] / cost['sac']:.2f}x (one REDQ update; REDQ runs UTD 20 per env step)")


if __name__ == "__main__":
    main()
