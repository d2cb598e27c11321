"""Gradient updates per second of each offline agent at its paper / CORL settings (batch 256, Hopper sizes).

    python benchmarks/offline_updates.py [--updates 300] [--obs-dim 11 --act-dim 3]

Timing is the agent's ``update`` alone on batches sampled from a replay buffer (as the offline pipeline does);
the first 20 updates are warm-up and not timed.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from diffrl.agents import BC, CQL, EDAC, IQL, TD3BC, BCParams, CQLParams, EDACParams, IQLParams, TD3BCParams
from diffrl.data import ReplayBuffer
from diffrl.runs.device import tune_cpu_allocator

AGENTS = {
    "bc": (BC, BCParams(), "2x256 MLP policy, MSE"),
    "td3bc": (TD3BC, TD3BCParams(), "2x256 actor, 2 critics, policy delay 2"),
    "iql": (IQL, IQLParams(actor_lr_steps=1_000_000), "2x256 policy, V, 2 critics"),
    "cql": (CQL, CQLParams(), "3x256 policy, 2x 3x256 critics, 10 sampled actions"),
    "edac": (EDAC, EDACParams(), "3x256 policy, 10x 3x256 critics, eta 1"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--updates", type=int, default=300)
    ap.add_argument("--obs-dim", type=int, default=11)
    ap.add_argument("--act-dim", type=int, default=3)
    args = ap.parse_args()
    tuned = tune_cpu_allocator()
    rng = np.random.default_rng(0)
    n, do, da = 100_000, args.obs_dim, args.act_dim
    buf = ReplayBuffer.for_transitions(n, do, da)
    buf.add_batch(obs=rng.normal(size=(n, do)), act=rng.uniform(-1, 1, (n, da)), rew=rng.normal(size=n),
                  next_obs=rng.normal(size=(n, do)), done=(rng.random(n) < 0.01).astype(np.float32))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, allocator tuned "
          f"{tuned}; obs {do}, act {da}, batch 256, {args.updates} timed updates\n")
    print("| agent | networks | updates/s | ms/update |\n|---|---|---|---|")
    for name, (cls, params, nets) in AGENTS.items():
        torch.manual_seed(0)
        agent = cls(do, da, params)
        for _ in range(20):
            agent.update(buf.sample(256))
        t0 = time.perf_counter()
        for _ in range(args.updates):
            agent.update(buf.sample(256))
        dt = (time.perf_counter() - t0) / args.updates
        print(f"| {name} | {nets} | {1 / dt:.0f} | {dt * 1e3:.2f} |", flush=True)


if __name__ == "__main__":
    main()
