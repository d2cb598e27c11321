"""diffrl PPO (``diffrl train ppo``) vs Stable-Baselines3 PPO on MuJoCo, same settings, interleaved in one run.

Matched settings (both): one env, 2048-step rollouts, 10 epochs of 32 minibatches (64 samples), Adam lr 3e-4 annealed
linearly towards 0, eps 1e-5, gamma 0.99, GAE lambda 0.95, ratio clip 0.2, advantages normalised per minibatch, no
entropy bonus, gradient norm 0.5 clipped over actor and critic together, 64x64 tanh actor and critic with orthogonal
init (sqrt(2), policy head 0.01, value head 1), state-independent log-std starting at 0, running observation
normalisation and reward scaling by the running std of the discounted return (both clipped at 10; SB3:
``VecNormalize``), time limits bootstrapped from the final observation's value (SB3's ``terminal_observation``),
value clipping off (SB3's ``clip_range_vf`` keeps only the clipped prediction, CleanRL's rule takes the larger loss:
two rules, so neither), and the same value-loss weight (diffrl ``vf_coef`` 0.5 on ``0.5 MSE``, SB3 ``vf_coef`` 0.25
on ``MSE``). Two differences remain: SB3 anneals the learning rate from its progress after the first rollout
(diffrl, as CleanRL, from 1 at the first iteration), and ``diffrl-cleanrl`` (off by default, ``--libs``) is diffrl's
own default, CleanRL's settings with its value clipping (0.2).

Both are scored at equal env steps, at the first iteration end past every ``--eval-every`` env steps and after the
last, by diffrl's one ``evaluate`` (10 deterministic episodes, the same eval seeds, each library's own frozen
observation statistics). Env steps/s counts training only (evaluation excluded). Every process runs torch on one
thread.

    python benchmarks/ppo_vs_sb3.py                                # Hopper + HalfCheetah, 3 seeds, 300k env steps
    python benchmarks/ppo_vs_sb3.py --envs Hopper-v5 --seeds 0 --steps 4096 --eval-every 2048 \\
        --results /tmp/ppo_smoke.jsonl                                         # a smoke run

Rows go to benchmarks/results/ppo_vs_sb3.jsonl (finished runs are skipped when re-run).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from diffrl.envs import make_env
from diffrl.eval import evaluate
from diffrl.pipelines.ppo import PPOConfig, run
from diffrl.runs.logger import read_metrics
from harness import RESULTS, add_common_args, matches, run_all

OUT = Path(__file__).parent / "out"
EVAL_EPISODES = 10


def run_diffrl(env_id: str, seed: int, steps: int, eval_every: int, **overrides: object) -> dict:
    cfg = PPOConfig(env=env_id, seed=seed, steps=steps, eval_every=eval_every, eval_episodes=EVAL_EPISODES,
                    log_every=2048, checkpoint_every=10**9, device="cpu", runs_root=OUT / "runs", progress=False,
                    **overrides)  # type: ignore[arg-type]
    run_dir = run(cfg)
    s = json.loads((run_dir / "summary.json").read_text())
    curve = [(int(r["env_steps"]), r["eval/return_mean"]) for r in read_metrics(run_dir)
             if not np.isnan(r.get("eval/return_mean", np.nan))]
    if not curve or curve[-1][0] != s["env_steps"]:  # the final evaluation off the grid (summary only)
        curve.append((s["env_steps"], s["eval_return_mean"]))
    train_s = s["wall_s"] - s["time_breakdown_s"]["eval_s"]
    return {"curve": curve, "sps": s["env_steps"] / train_s, "train_s": train_s, "run_dir": str(run_dir)}


def run_sb3(env_id: str, seed: int, steps: int, eval_every: int) -> dict:
    import gymnasium as gym
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    venv = VecNormalize(DummyVecEnv([lambda: gym.make(env_id)]), norm_obs=True, norm_reward=True, clip_obs=10.0,
                        clip_reward=10.0, gamma=0.99)
    eval_env = make_env(env_id)
    curve: list[tuple[int, float]] = []
    eval_s = [0.0]

    def score(n: int) -> None:
        t0 = time.perf_counter()
        result = evaluate(lambda o: model.predict(venv.normalize_obs(o), deterministic=True)[0], eval_env,
                          EVAL_EPISODES, seed=seed)
        curve.append((n, result.return_mean))
        eval_s[0] += time.perf_counter() - t0

    class OnGrid(BaseCallback):
        """At each rollout's start (the previous update done, as diffrl scores after its update)."""

        last = 0

        def _on_rollout_start(self) -> None:
            n = self.num_timesteps
            if eval_every > 0 and n // eval_every > self.last // eval_every:
                score(n)
            self.last = n

        def _on_step(self) -> bool:
            return True

    model = PPO("MlpPolicy", venv, learning_rate=lambda progress: 3e-4 * progress, n_steps=2048, batch_size=64,
                n_epochs=10, gamma=0.99, gae_lambda=0.95, clip_range=0.2, clip_range_vf=None,
                normalize_advantage=True, ent_coef=0.0, vf_coef=0.25, max_grad_norm=0.5,
                policy_kwargs=dict(net_arch=dict(pi=[64, 64], vf=[64, 64]), activation_fn=torch.nn.Tanh,
                                   log_std_init=0.0, ortho_init=True),
                seed=seed, device="cpu", verbose=0)
    total = -(-steps // 2048) * 2048  # whole rollouts, as diffrl's iterations
    t0 = time.perf_counter()
    model.learn(total_timesteps=total, callback=OnGrid())
    score(model.num_timesteps)
    train_s = time.perf_counter() - t0 - eval_s[0]
    return {"curve": curve, "sps": model.num_timesteps / train_s, "train_s": train_s}


LIBS = {"diffrl": lambda *a: run_diffrl(*a, clip_vloss_coef=None), "sb3": run_sb3,
        "diffrl-cleanrl": run_diffrl}


def table(rows: list[dict], libs: list[str], columns: int = 5) -> str:
    """Returns at equal env steps (``columns`` evaluation points, evenly spread, the last one included) and env
    steps/s: mean [min, max] over seeds."""
    points = sorted({n for r in rows for n, _ in r["curve"]})
    if not points:
        return ""
    picks = sorted({points[round(i * (len(points) - 1) / max(columns - 1, 1))] for i in range(columns)})
    lines = ["| library | " + " | ".join(f"{n // 1000}k" if n >= 1000 else str(n) for n in picks) + " | env steps/s |",
             "|---|" + "---|" * (len(picks) + 1)]
    for lib in libs:
        rs = [r for r in rows if r["lib"] == lib]
        if not rs:
            continue
        cells = []
        for n in picks:
            v = np.array([dict(map(tuple, r["curve"])).get(n, np.nan) for r in rs], dtype=float)
            v = v[~np.isnan(v)]
            cells.append(f"{v.mean():.0f} [{v.min():.0f}, {v.max():.0f}]" if len(v) else "")
        sps = np.array([r["sps"] for r in rs])
        lines.append(f"| {lib} (n={len(rs)}) | " + " | ".join(cells) + f" | {sps.mean():.0f} ± {sps.std():.0f} |")
    ratios = [f"{lib} / sb3 {text}" for lib in libs if lib != "sb3" and (text := speed_ratios(rows, lib))]
    if ratios:
        lines.append("\nEnv steps/s paired by seed (the two runs of a seed ran back to back): " + "; ".join(ratios))
    return "\n".join(lines)


def speed_ratios(rows: list[dict], lib: str, ref: str = "sb3") -> str:
    """``lib``'s env steps/s over ``ref``'s, seed by seed, and their median ("" without a pair)."""
    by = {(r["lib"], r["seed"]): r["sps"] for r in rows}
    pairs = sorted(seed for (name, seed) in by if name == lib and (ref, seed) in by)
    if not pairs:
        return ""
    ratios = [by[lib, seed] / by[ref, seed] for seed in pairs]
    return (", ".join(f"seed {seed} {x:.2f}x" for seed, x in zip(pairs, ratios))
            + f" (median {float(np.median(ratios)):.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--envs", nargs="+", default=["Hopper-v5", "HalfCheetah-v5"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300_000)
    ap.add_argument("--eval-every", type=int, default=25_000)
    ap.add_argument("--libs", nargs="+", default=["diffrl", "sb3"], choices=list(LIBS))
    add_common_args(ap, RESULTS / "ppo_vs_sb3.jsonl")
    args = ap.parse_args()
    os.environ.setdefault("DIFFRL_PROGRESS", "0")
    torch.set_num_threads(1)  # one thread per process: runs share the machine with other benchmarks
    args.results.parent.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {os.cpu_count()} cpus", flush=True)

    def run_one(key: dict) -> dict:
        return {**key, **LIBS[key["lib"]](key["env"], key["seed"], key["steps"], key["eval_every"]),
                "date": time.strftime("%Y-%m-%d %H:%M")}

    def report(row: dict) -> None:
        print(f"{row['env']} {row['lib']} seed {row['seed']}: final return {row['curve'][-1][1]:.0f}, "
              f"{row['sps']:.0f} env steps/s", flush=True)

    # alternate which library goes first so slow drift in machine load hits both
    jobs = [dict(env=env_id, lib=lib, seed=seed, steps=args.steps, eval_every=args.eval_every)
            for seed in args.seeds for env_id in args.envs
            for lib in (args.libs if seed % 2 == 0 else args.libs[::-1])]
    done = run_all(jobs, args.results, run_one, table_only=args.table_only, on_row=report)
    print(f"\nPPO, {args.steps} env steps: eval return ({EVAL_EPISODES} deterministic episodes) at equal env steps, "
          "mean [min, max] over seeds; training env steps/s (one torch thread)\n")
    for env_id in args.envs:
        key = dict(env=env_id, steps=args.steps, eval_every=args.eval_every)
        rows = [r for r in done if matches(r, key) and r["seed"] in args.seeds]
        print(f"### {env_id}\n\n{table(rows, args.libs)}\n")


if __name__ == "__main__":
    main()
