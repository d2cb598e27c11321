"""Why Dydiff + TD3+BC falls behind TD3+BC on HalfCheetah medium: how its final policies fail in the simulator.

    python benchmarks/dydiff_halfcheetah.py              # every finished HalfCheetah trial of the Dydiff sweep
    python benchmarks/dydiff_halfcheetah.py --table-only

Reads the run directories of ``diffrl sweep benchmarks/dydiff.yaml`` (runs/sweeps/dydiff; run that first) and, for
every finished trial on a HalfCheetah dataset, plays its final policy (deterministic) for 20 episodes with the
same environment seeds for every arm, recording per episode: the return, the largest root pitch |angle| (the
second observation; past pi/2 the cheetah is on its back or head), the share of steps past pi/2, and the forward
velocity over the last 200 steps (about 0 for a cheetah that has stalled). Beside it: the share of the dataset's
states past pi/2, and how far the policy's actions are from the dataset's on the dataset's states (RMS).

Rows (one per trial) go to benchmarks/results/dydiff_halfcheetah.jsonl; finished ones are skipped when re-run.
"""

from __future__ import annotations

import argparse
import functools
import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from diffrl import registry
from diffrl.data import dataset_env, fingerprint, load_dataset
from diffrl.pipelines import dydiff
from diffrl.runs.results import finished_at
from harness import RESULTS, add_common_args, finished_trials, run_all

EPISODES = 20
FLIPPED = math.pi / 2
STALLED = 0.5  # forward velocity over the last 200 steps below this: the episode ended stalled


def play(policy, env_id: str, episodes: int) -> list[dict[str, float]]:
    """``episodes`` deterministic episodes (environment seeds 1000, 1001, ...)."""
    env = gym.make(env_id)
    out = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=1000 + ep)
        ret, angle, vel, done = 0.0, [], [], False
        while not done:
            action = policy(torch.as_tensor(obs[None], dtype=torch.float32)).numpy()[0]
            obs, r, term, trunc, _ = env.step(action)
            ret += float(r)
            angle.append(abs(float(obs[1])))
            vel.append(float(obs[8]))
            done = term or trunc
        out.append({"return": ret, "max_angle": max(angle), "flipped_share": float(np.mean(np.array(angle) > FLIPPED)),
                    "end_velocity": float(np.mean(vel[-200:]))})
    env.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", type=Path, default=Path(__file__).parents[1] / "runs" / "sweeps" / "dydiff")
    add_common_args(ap, RESULTS / "dydiff_halfcheetah.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(1)
    jobs, dirs = [], {}
    if not args.table_only:
        for t, run in finished_trials(args.sweep, "benchmarks/dydiff.yaml"):
            if "HalfCheetah" not in str(t.fields.get("dataset")):
                continue
            jobs.append({"trial": t.id, "arm": t.arm.split(",")[0], "seed": t.seed,
                         "dataset": Path(t.fields["dataset"]).stem, "finished_at": finished_at(run),
                         "episodes": EPISODES})
            dirs[t.id] = run

    @functools.cache
    def data(path: str) -> tuple:
        """A dataset (read and hashed once for all its trials), its fingerprint and its share of flipped states."""
        ds = load_dataset(path)
        return ds, fingerprint(ds), float(np.mean(np.abs(ds.observations[:, 1]) > FLIPPED))

    def run_one(key: dict) -> dict:
        run = dirs[key["trial"]]
        cfg = registry.find_run(run)[2]
        ds, fp, flipped = data(str(cfg.dataset))
        policy = dydiff.trained_policy(run, cfg, ds, torch.device("cpu"))
        idx = np.random.default_rng(0).choice(len(ds.observations), min(5000, len(ds.observations)), replace=False)
        with torch.no_grad():
            acts = policy(torch.as_tensor(ds.observations[idx], dtype=torch.float32)).numpy()
        eps = play(policy, dataset_env(ds, None, str(cfg.dataset)), key["episodes"])
        row = {**key, "dataset_fingerprint": fp, "episodes_played": eps, "data_flipped_share": flipped,
               "action_rms_to_data": float(np.sqrt(np.mean((acts - ds.actions[idx]) ** 2)))}
        print(f"{key['trial']}: return {np.mean([e['return'] for e in eps]):.0f}, stalled "
              f"{np.mean([e['end_velocity'] < STALLED for e in eps]):.2f}", flush=True)
        return row

    rows = run_all(jobs, args.results, run_one, table_only=args.table_only)
    for stem in dict.fromkeys(r["dataset"] for r in rows):
        got = [r for r in rows if r["dataset"] == stem]
        print(f"\n**{stem}** (data `{got[0]['dataset_fingerprint']}`: {100 * got[0]['data_flipped_share']:.1f}% of its "
              f"states past pi/2); each trial's final policy, {EPISODES} episodes, the same environment seeds for "
              "every arm; per arm the mean over its seeds\n")
        print("| arm | seeds | return | episodes ending stalled (velocity < 0.5) | episodes past pi/2 | "
              "share of steps past pi/2 | lowest return | action RMS to the data |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for arm in dict.fromkeys(r["arm"] for r in got):
            rs = [r for r in got if r["arm"] == arm]
            eps = [e for r in rs for e in r["episodes_played"]]
            print(f"| {arm} | {', '.join(str(r['seed']) for r in rs)} | {np.mean([e['return'] for e in eps]):.0f} | "
                  f"{np.mean([e['end_velocity'] < STALLED for e in eps]):.2f} | "
                  f"{np.mean([e['max_angle'] > FLIPPED for e in eps]):.2f} | "
                  f"{np.mean([e['flipped_share'] for e in eps]):.2f} | {min(e['return'] for e in eps):.0f} | "
                  f"{np.mean([r['action_rms_to_data'] for r in rs]):.3f} |")


if __name__ == "__main__":
    main()
