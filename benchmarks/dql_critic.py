"""Has Diffusion-QL's critic converged by the end of a sweep's budget? Its Q on the data's actions during training,
next to what the data's own discounted returns say that value is.

    python benchmarks/dql_critic.py                    # every finished trial of runs/sweeps/dydiff-dql
    python benchmarks/dql_critic.py --sweep DIR
    python benchmarks/dql_critic.py --table-only

Per trial: ``q_mean`` from the run's ``metrics.csv`` at every logged step: the critics' mean Q(s, a) on that step's
training batch, whose actions are the ones recorded with its states (the data's alone in a control; with Dydiff,
``real_ratio`` of the rows from the data, the rest from the model's filtered rollouts, actions relabelled by the
policy). Per dataset, the behaviour policy's value on the same (s, a): the
discounted return-to-go of every transition with the run's gamma, an episode cut by a time limit continued past it
at that episode's mean reward (a terminal ends it). A critic that has converged reads about the value of the policy
it evaluates, which improves on the behaviour policy's (Diffusion-QL stays close to the data): well below the data's
value and still rising means the budget ends before the critic has. Nothing is re-run: rows come from the trials'
files (benchmarks/results/dql_critic.jsonl; finished ones are skipped when re-run).
"""

from __future__ import annotations

import argparse
import functools
import math
from pathlib import Path

import numpy as np

from diffrl import registry
from diffrl.data import fingerprint, load_dataset
from diffrl.data.formats import episode_bounds
from diffrl.runs.logger import read_metrics
from diffrl.runs.results import finished_at
from harness import RESULTS, add_common_args, by_data, finished_trials, run_all

SHOWN_STEPS = (1_000, 2_000, 5_000, 8_000, 10_000)


def behaviour_value(rewards: np.ndarray, terminals: np.ndarray, timeouts: np.ndarray, gamma: float) -> np.ndarray:
    """Discounted return-to-go ``(N,)`` of every transition; an episode not ended by a terminal (a time limit, or
    the data's end) continues past its last step at its own mean reward, ``r_mean / (1 - gamma)``."""
    out = np.zeros(len(rewards), dtype=np.float64)
    for start, stop in zip(*episode_bounds(terminals, timeouts)):
        r = rewards[start:stop].astype(np.float64)
        g = 0.0 if terminals[stop - 1] else float(r.mean()) / (1.0 - gamma)
        for t in range(len(r) - 1, -1, -1):
            g = r[t] + gamma * g
            out[start + t] = g
    return out


def q_at(rows: list[dict], step: int) -> float:
    """Mean over ``rows`` of their logged ``q_mean`` at ``step`` (NaN where a row did not log it)."""
    return float(np.mean([r["q_mean"][r["steps"].index(step)] if step in r["steps"] else np.nan for r in rows]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", type=Path, default=Path(__file__).parents[1] / "runs" / "sweeps" / "dydiff-dql")
    add_common_args(ap, RESULTS / "dql_critic.jsonl")
    args = ap.parse_args()
    jobs, dirs = [], {}
    if not args.table_only:
        for t, run in finished_trials(args.sweep, "benchmarks/dydiff_dql.yaml"):
            jobs.append({"trial": t.id, "arm": t.arm.split(",")[0], "seed": t.seed,
                         "dataset": Path(t.fields["dataset"]).stem, "finished_at": finished_at(run)})
            dirs[t.id] = run

    @functools.cache
    def data(path: str, gamma: float) -> tuple[str, float]:
        """A dataset's fingerprint and the behaviour policy's mean value over its transitions."""
        ds = load_dataset(path)
        return fingerprint(ds), float(behaviour_value(ds.rewards, ds.terminals, ds.timeouts, gamma).mean())

    def run_one(key: dict) -> dict:
        run = dirs[key["trial"]]
        cfg = registry.find_run(run)[2]
        if cfg.normalize_reward:
            raise SystemExit(f"{run} trained on normalised rewards; the data's value here is in raw reward units.")
        fp, value = data(str(cfg.dataset), cfg.gamma)
        logged = [m for m in read_metrics(run) if not math.isnan(m.get("q_mean", math.nan))]
        return {**key, "dataset_fingerprint": fp, "gamma": cfg.gamma, "data_value": value,
                "steps": [int(m["step"]) for m in logged], "q_mean": [m["q_mean"] for m in logged]}

    rows = run_all(jobs, args.results, run_one, table_only=args.table_only)
    for stem, fp, got in by_data(rows):
        print(f"\n**{stem}** (data `{fp}`): the critics' mean Q on the training batch's (s, a) at a step, mean "
              "over the arm's seeds (Dydiff's batches hold model rows too); the data's value: its discounted "
              f"return-to-go (gamma {got[0]['gamma']}), the behaviour policy's Q on its own pairs\n")
        print("| arm | seeds | " + " | ".join(f"Q at {s // 1000}k" for s in SHOWN_STEPS)
              + " | rise over the last 2k steps | data's value | Q / data's value |")
        print("|---|---|" + "---:|" * (len(SHOWN_STEPS) + 3))
        for arm in dict.fromkeys(r["arm"] for r in got):
            rs = [r for r in got if r["arm"] == arm]
            last, before = q_at(rs, SHOWN_STEPS[-1]), q_at(rs, SHOWN_STEPS[-1] - 2_000)
            value = float(np.mean([r["data_value"] for r in rs]))
            print(f"| {arm} | {', '.join(str(r['seed']) for r in rs)} | "
                  + " | ".join(f"{q_at(rs, s):.1f}" for s in SHOWN_STEPS)
                  + f" | {last - before:+.1f} | {value:.1f} | {last / value:.2f} |")


if __name__ == "__main__":
    main()
