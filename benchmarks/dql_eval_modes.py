"""How a trained Diffusion-QL policy is evaluated changes its score: the final policies of a sweep's Diffusion-QL
trials played three ways on the same episodes.

    python benchmarks/dql_eval_modes.py                       # every finished trial of runs/sweeps/dydiff-dql
    python benchmarks/dql_eval_modes.py --sweep DIR --episodes 10
    python benchmarks/dql_eval_modes.py --table-only

Modes, each with the run's own fixed evaluation noise (``act(obs, deterministic=True)``):

- ``argmax``: 50 candidate actions from the chain, the one of highest min-Q of the target critic (diffrl's default,
  what the runs' own evaluations report);
- ``draw``: the same candidates, one drawn by softmax over their min-Q (``--eval-draw``: how Wang et al.'s and
  Dydiff's code evaluate);
- ``chain``: one action of the evaluation chain, no critic (the policy without the selection).

Per trial and mode: ``--episodes`` episodes from the same initial states for every mode, arm and seed (diffrl's
``evaluate``, seed 0), the normalised score with the dataset's references, and how far the mode's actions are from
the dataset's on 2000 of its states (RMS); then, per mode, Dydiff's arm against its control paired by seed (does
the comparison depend on the rule?). Rows (one per trial and mode) go to
benchmarks/results/dql_eval_modes.jsonl; finished ones are skipped when re-run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from pathlib import Path

import numpy as np
import torch

from diffrl import registry
from diffrl.data import Normalizer, dataset_env, fingerprint, load_dataset
from diffrl.envs import make_env
from diffrl.eval import evaluate
from diffrl.eval.scores import normalized_score, reference_scores
from diffrl.pipelines import offline
from diffrl.runs import checkpoint as ckpt
from diffrl.runs import stats
from diffrl.runs.results import finished_at
from harness import RESULTS, add_common_args, by_data, finished_trials, run_all

MODES = ("argmax", "draw", "chain")
DATA_STATES = 2000


@contextlib.contextmanager
def evaluated_as(agent, mode: str):
    """The agent acting in ``mode`` (see the module docstring) until the block ends."""
    policy, draw = agent.policy, getattr(agent.policy, "draw_when_deterministic", None)
    if mode == "chain":
        agent.policy = agent.actor
    elif mode == "draw":
        agent.policy.draw_when_deterministic = True
    try:
        yield agent
    finally:
        agent.policy = policy
        if draw is not None:
            policy.draw_when_deterministic = draw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", type=Path, default=Path(__file__).parents[1] / "runs" / "sweeps" / "dydiff-dql")
    ap.add_argument("--episodes", type=int, default=10)
    add_common_args(ap, RESULTS / "dql_eval_modes.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(1)
    jobs, dirs = [], {}
    if not args.table_only:
        for t, run in finished_trials(args.sweep, "benchmarks/dydiff_dql.yaml"):
            for mode in MODES:
                jobs.append({"trial": t.id, "arm": t.arm.split(",")[0], "seed": t.seed,
                             "dataset": Path(t.fields["dataset"]).stem, "finished_at": finished_at(run),
                             "mode": mode, "episodes": args.episodes})
            dirs[t.id] = run

    @functools.cache
    def data(path: str) -> tuple:
        """A dataset (read and hashed once for all its trials), its fingerprint and its score references."""
        ds = load_dataset(path)
        return ds, fingerprint(ds), reference_scores(ds.metadata)

    @functools.cache
    def trained(trial: str) -> tuple:
        """A trial's final agent, its state normaliser, config and evaluation env id."""
        run = dirs[trial]
        cfg = registry.find_run(run)[2]
        ds = data(str(cfg.dataset))[0]
        agent = offline.build(cfg, ds.obs_dim, ds.act_dim, torch.device("cpu"))
        _, parts = ckpt.load_checkpoint(run, ("state",))
        agent.load_state_dict(parts["state"]["agent"])
        return agent, Normalizer.from_state_dict(parts["state"]["normalizer"]), cfg, dataset_env(ds, None,
                                                                                                  str(cfg.dataset))

    def run_one(key: dict) -> dict:
        agent, normalizer, cfg, env_id = trained(key["trial"])
        ds, fp, refs = data(str(cfg.dataset))
        idx = np.random.default_rng(0).choice(len(ds.observations), min(DATA_STATES, len(ds.observations)),
                                              replace=False)
        env = make_env(env_id)
        with evaluated_as(agent, key["mode"]), contextlib.closing(env):
            policy = offline.NormalizedPolicy(agent, normalizer)
            acts = policy.act(ds.observations[idx], deterministic=True)
            result = evaluate(policy, env, key["episodes"], seed=0)
        score = None if refs is None else float(np.mean(normalized_score(np.asarray(result.returns), refs["min"],
                                                                          refs["max"])))
        print(f"{key['trial']} {key['mode']}: return {result.return_mean:.0f}", flush=True)
        return {**key, "dataset_fingerprint": fp, "returns": result.returns, "return_mean": result.return_mean,
                "normalized_score": score,
                "action_rms_to_data": float(np.sqrt(np.mean((acts - ds.actions[idx]) ** 2)))}

    rows = run_all(jobs, args.results, run_one, table_only=args.table_only)
    for stem, fp, got in by_data(rows):
        print(f"\n**{stem}** (data `{fp}`): each trial's final policy, "
              f"{got[0]['episodes']} episodes from the same initial states in every mode, arm and seed; mean over the "
              "arm's seeds [min, max] of the seeds' normalised scores, mean return, action RMS to the data\n")
        print("| arm | mode | seeds | normalised score | return | action RMS to the data |")
        print("|---|---|---|---|---:|---:|")
        for arm in dict.fromkeys(r["arm"] for r in got):
            for mode in MODES:
                rs = [r for r in got if r["arm"] == arm and r["mode"] == mode]
                if not rs:
                    continue
                s = [r["normalized_score"] for r in rs]
                score = "–" if None in s else f"{np.mean(s):.1f} [{min(s):.1f}, {max(s):.1f}]"
                print(f"| {arm} | {mode} | {', '.join(str(r['seed']) for r in rs)} | {score} | "
                      f"{np.mean([r['return_mean'] for r in rs]):.0f} | "
                      f"{np.mean([r['action_rms_to_data'] for r in rs]):.3f} |")
    paired_by_mode(rows)


def paired_by_mode(rows: list[dict], arm: str = "dydiff-dql", control: str = "dql") -> None:
    """Does the Dydiff comparison depend on the evaluation rule? Per mode, ``arm`` − ``control`` paired by seed:
    per dataset the mean of the per-seed differences, and over every dataset the per-seed difference of the
    means over datasets with a 95% bootstrap CI (the sweep table's summary, on these rows)."""
    score = {(r["arm"], r["mode"], r["dataset"], r["seed"]): r["normalized_score"] for r in rows}
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    seeds = [s for s in seeds if all((a, m, d, s) in score for a in (arm, control) for m in MODES for d in datasets)]
    if not seeds or None in score.values():
        return
    print(f"\n**{arm} − {control} by evaluation mode**, paired by seed ({', '.join(map(str, seeds))}) on the rows "
          "above: per dataset the mean per-seed difference of normalised scores; over all datasets the per-seed "
          "difference of the means over datasets, its mean with a 95% bootstrap CI\n")
    names = [d.replace("-v5-", " ").removesuffix("-quick") for d in datasets]
    print("| mode | " + " | ".join(names) + " | all datasets |")
    print("|---|" + "---:|" * (len(datasets) + 1))
    for mode in MODES:
        per = {d: [score[arm, mode, d, s] - score[control, mode, d, s] for s in seeds] for d in datasets}
        overall = stats.paired_difference(
            {s: np.mean([score[arm, mode, d, s] for d in datasets]) for s in seeds},
            {s: np.mean([score[control, mode, d, s] for d in datasets]) for s in seeds})
        m = overall.mean
        ci = "" if m.lo is None else f" [{m.lo:.1f}, {m.hi:.1f}]"
        print(f"| {mode} | " + " | ".join(f"{np.mean(per[d]):+.1f}" for d in datasets) + f" | {m.value:+.1f}{ci} |")


if __name__ == "__main__":
    main()
