"""Milliseconds per agent update, fp32 vs bf16 autocast (``--agent-bf16``), for SAC and REDQ at HalfCheetah sizes
(obs 17, act 6, 2x256 MLPs, batch 256; REDQ N = 10, M = 2), on this machine, side by side in one process.

    python benchmarks/update_speed.py [--updates 300] [--threads 1]
    python benchmarks/update_speed.py --table-only

bf16 autocast pays only where the CPU has native bf16 matmul (AVX512-BF16 / AMX) or on a GPU; the row records the
CPU and its flags so the table says which. Rows go to benchmarks/results/update_speed.jsonl.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from diffrl.agents import REDQ, SAC, REDQParams, SACParams
from diffrl.data import ReplayBuffer
from diffrl.runs.results import cpu_flags
from harness import RESULTS, add_common_args, run_all

DO, DA, BATCH = 17, 6, 256


def ms_per_update(agent: SAC, buf: ReplayBuffer, updates: int, bf16: bool) -> float:
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        for _ in range(20):  # warm-up
            agent.update(buf.sample(BATCH))
        t0 = time.perf_counter()
        for _ in range(updates):
            agent.update(buf.sample(BATCH))
    return (time.perf_counter() - t0) / updates * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--updates", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    add_common_args(ap, RESULTS / "update_speed.jsonl", tables="table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    n = 10_000
    buf = ReplayBuffer.for_transitions(n, DO, DA, seed=0)
    buf.add_batch(obs=rng.normal(size=(n, DO)), act=rng.uniform(-1, 1, (n, DA)), rew=rng.normal(size=n),
                  next_obs=rng.normal(size=(n, DO)), done=np.zeros(n, np.float32))
    date = time.strftime("%Y-%m-%d %H:%M")

    def run_one(key: dict) -> dict:
        torch.manual_seed(0)
        agent = SAC(DO, DA, SACParams(actor_update_every=20)) if key["agent"] == "sac" else REDQ(DO, DA, REDQParams())
        return {**key, "ms_per_update": ms_per_update(agent, buf, args.updates, key["precision"] == "bf16"),
                "cpu_flags": cpu_flags()}

    jobs = [{"agent": a, "precision": p, "threads": args.threads, "updates": args.updates, "session": date}
            for a in ("sac", "redq") for p in ("fp32", "bf16")]
    rows = run_all(jobs, args.results, run_one, table_only=args.table_only)
    print("| date | CPU (flags) | threads | agent | fp32 ms/update | bf16 ms/update | bf16 / fp32 |\n"
          "|---|---|---|---|---:|---:|---:|")
    for session in sorted({r["session"] for r in rows}):
        for agent in ("sac", "redq"):
            got = {r["precision"]: r for r in rows if r["session"] == session and r["agent"] == agent}
            if len(got) < 2:
                continue
            f, b = got["fp32"], got["bf16"]
            ratio = b["ms_per_update"] / f["ms_per_update"]
            print(f"| {session} | {f['machine']['cpu']} ({', '.join(f['cpu_flags'])}) | {f['threads']} | {agent} | "
                  f"{f['ms_per_update']:.2f} | {b['ms_per_update']:.2f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
