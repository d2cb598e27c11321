"""diffrl DDPG+HER vs Stable-Baselines3 DDPG + HerReplayBuffer on Fetch tasks, same budget, in one run.

Matched settings: 3x256 MLPs, Adam lr 1e-3 (actor and critic), batch 256, gamma 0.98, buffer 1M transitions,
HER "future" with 4 sampled goals (p = 0.8), Gaussian exploration noise 0.2, one 50-step episode then 40
gradient steps per cycle (SB3: ``train_freq=(1, "episode"), gradient_steps=40``), and the same target speed
(diffrl: Polyak 0.95 once per cycle; SB3 updates its targets every gradient step, so tau = 1 - 0.95^(1/40)).
Observations are normalised on both sides: diffrl with baselines' running normalisers, SB3 the way
rl-baselines3-zoo runs HER tasks (``VecNormalize``, ``norm_obs``, clip 5; its HerReplayBuffer normalises sampled
observations). Without it SB3's DDPG stayed at 0-10% success on FetchReach for 2500 steps (an earlier run; its rows
are gone). ``diffrl`` runs baselines' HER as diffrl does by default, with what SB3's DDPG lacks: 30% random actions,
the action L2 penalty and the target clipped to [-1/(1-gamma), 0]; ``diffrl-plain`` turns those three off
(``random_eps=0, action_l2=0, clip_return=False``), the like-for-like arm against SB3. All are scored after every
epoch (n_cycles episodes) by diffrl's one ``evaluate`` (10 deterministic test episodes, same eval seeds); env
steps/s counts training only (evaluation excluded).

    python benchmarks/her_vs_sb3.py                                  # FetchReach + FetchPush, 3 seeds
    python benchmarks/her_vs_sb3.py --envs FetchReach-v4 --seeds 0   # a smoke run

Rows go to benchmarks/results/her_vs_sb3.jsonl (finished runs are skipped when re-run).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path

import numpy as np

from diffrl.envs import make_env
from diffrl.eval import evaluate
from diffrl.pipelines.iter_her import ITERConfig, run
from diffrl.runs.logger import read_metrics
from harness import RESULTS, add_common_args, matches, run_all

OUT = Path(__file__).parent / "out"
BUDGETS = {"FetchReach-v4": dict(epochs=10, n_cycles=10), "FetchPush-v4": dict(epochs=10, n_cycles=50)}


def run_diffrl(env_id: str, seed: int, epochs: int, n_cycles: int, **agent: object) -> dict:
    cfg = ITERConfig(env=env_id, seed=seed, epochs=epochs, n_cycles=n_cycles, n_ker=0, n_ger=0, eval_episodes=10,
                     device="cpu", runs_root=OUT / "runs", progress=False, checkpoint_every=10**6, **agent)
    run_dir = run(cfg)
    s = json.loads((run_dir / "summary.json").read_text())
    curve = [(r["env_steps"], r["eval/success_rate"]) for r in read_metrics(run_dir) if "eval/success_rate" in r]
    train_s = s["wall_s"] - s["time_breakdown_s"]["eval_s"]
    return {"curve": curve, "sps": s["env_steps"] / train_s, "train_s": train_s}


def run_sb3(env_id: str, seed: int, epochs: int, n_cycles: int) -> dict:
    import gymnasium as gym
    import gymnasium_robotics
    from stable_baselines3 import DDPG, HerReplayBuffer
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.noise import NormalActionNoise
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    gym.register_envs(gymnasium_robotics)
    env = VecNormalize(DummyVecEnv([lambda: gym.make(env_id)]), norm_obs=True, norm_reward=False, clip_obs=5.0)
    T = env.get_attr("spec")[0].max_episode_steps
    eval_env = make_env(env_id)
    curve: list[tuple[int, float]] = []
    eval_s = [0.0]

    class EpochEval(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps % (n_cycles * T) == 0:
                t0 = time.perf_counter()
                result = evaluate(lambda o: self.model.predict(env.normalize_obs(o), deterministic=True)[0], eval_env,
                                  10, seed=seed)
                curve.append((self.num_timesteps, result.success_rate))
                eval_s[0] += time.perf_counter() - t0
            return True

    model = DDPG("MultiInputPolicy", env, learning_rate=1e-3, buffer_size=1_000_000, learning_starts=T, batch_size=256,
                 tau=1 - 0.95 ** (1 / 40), gamma=0.98, train_freq=(1, "episode"), gradient_steps=40,
                 action_noise=NormalActionNoise(np.zeros(4), 0.2 * np.ones(4)),
                 replay_buffer_class=HerReplayBuffer,
                 replay_buffer_kwargs=dict(n_sampled_goal=4, goal_selection_strategy="future"),
                 policy_kwargs=dict(net_arch=[256, 256, 256]), seed=seed, device="cpu", verbose=0)
    t0 = time.perf_counter()
    model.learn(total_timesteps=epochs * n_cycles * T, callback=EpochEval())
    train_s = time.perf_counter() - t0 - eval_s[0]
    return {"curve": curve, "sps": epochs * n_cycles * T / train_s, "train_s": train_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--envs", nargs="+", default=list(BUDGETS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    add_common_args(ap, RESULTS / "her_vs_sb3.jsonl")
    args = ap.parse_args()
    os.environ.setdefault("DIFFRL_PROGRESS", "0")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    fns = {"diffrl": run_diffrl, "sb3": run_sb3,
           "diffrl-plain": functools.partial(run_diffrl, random_eps=0.0, action_l2=0.0, clip_return=False)}

    def run_one(key: dict) -> dict:
        budget = BUDGETS[key["env"]]
        return {**key, **fns[key["lib"]](key["env"], key["seed"], **budget), "date": time.strftime("%Y-%m-%d %H:%M")}

    def report(row: dict) -> None:
        print(f"{row['env']} {row['lib']} seed {row['seed']}: final success {row['curve'][-1][1]:.2f}, "
              f"{row['sps']:.0f} env steps/s", flush=True)

    jobs = [dict(env=env_id, lib=lib, seed=seed, **BUDGETS[env_id]) for seed in args.seeds for env_id in args.envs
            for lib in fns]  # alternate libraries so load drift hits both
    done = run_all(jobs, args.results, run_one, table_only=args.table_only, on_row=report)
    print("\ntest success rate (10 episodes per eval) after each epoch: mean over seeds [min, max] (n); "
          "training env steps/s\n")
    for env_id in args.envs:
        budget = BUDGETS[env_id]
        print(f"### {env_id} ({budget['epochs']} epochs x {budget['n_cycles']} cycles x 50 steps)\n")
        print("| library | " + " | ".join(f"ep {e + 1}" for e in range(budget["epochs"])) + " | env steps/s |")
        print("|---|" + "---|" * (budget["epochs"] + 1))
        for lib in fns:
            rows = [r for r in done if r["env"] == env_id and r["lib"] == lib and matches(r, budget)]
            if not rows:
                continue
            curves = np.array([[s for _, s in r["curve"]][: budget["epochs"]] for r in rows])
            cells = [f"{c.mean():.2f} [{c.min():.1f}, {c.max():.1f}]" for c in curves.T]
            sps = np.array([r["sps"] for r in rows])
            print(f"| {lib} (n={len(rows)}) | " + " | ".join(cells) + f" | {sps.mean():.0f} ± {sps.std():.0f} |")
        print()


if __name__ == "__main__":
    main()
