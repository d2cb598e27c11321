"""``diffrl data collect``: D4RL-style datasets built locally, with reference returns for normalised scores.

Recipes (D4RL's definitions, Fu et al. 2020, arXiv:2004.07219, section 5):

- ``random``: uniform random actions.
- ``expert``: a SAC policy trained for the preset's budget (D4RL: to convergence): its best-evaluated checkpoint
  (the latest of equals). D4RL's expert is the last policy of a converged run; a budget too short to converge can
  end on a dip (Walker2d at the quick budget does), and the last checkpoint would then define a 100 below what the
  run reached, with "medium" set from it.
- ``medium``: the SAC snapshot whose return, acting stochastically as when it records data, is closest to 1/3
  of the (deterministic) expert's.
- ``medium-replay``: the replay buffer of that SAC run up to the medium snapshot (the transitions it saw).
- ``medium-expert``: medium and expert data concatenated.

One SAC run per (env, preset, seed) serves every kind: it checkpoints at each evaluation, so the medium policy
and its replay buffer are read back from the checkpoint of the chosen step. The run is cached (and resumed if
it was killed) under ``experts_dir``. Data is recorded with the policies' stochastic actions (as D4RL);
time-limit ends are ``timeouts``, never ``terminals``. Reference returns (random policy, deterministic expert)
are stored in the dataset's metadata, so D4RL-style normalised scores are defined.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import tyro
from safetensors.torch import save_file

import diffrl
from diffrl import registry
from diffrl.agents.base import Params
from diffrl.config import check, check_positive
from diffrl.data import OfflineDataset, detect_format, load_dataset, save_dataset
from diffrl.data.formats import minari_root
from diffrl.envs import VecEnv, make_env
from diffrl.envs.vector import obs_dim
from diffrl.eval import describe_dataset, evaluate
from diffrl.pipelines import online
from diffrl.registry import System, Tool
from diffrl.runs import checkpoint as ckpt
from diffrl.runs.device import resolve_device
from diffrl.runs.progress import Progress
from diffrl.runs.rundir import task_name
from diffrl.runs.seeding import derive_seed

Kind = Literal["random", "medium", "medium-replay", "expert", "medium-expert"]
COLLECT_STREAM = 104_729  # episodes recorded for datasets use seeds derive_seed(seed, COLLECT_STREAM, kind, k)

# Budgets per preset: `quick` fits minutes on 2 CPU cores (clearly labelled in the metadata), `paper` is D4RL's.
BUDGETS: dict[str, dict[str, int]] = {
    "quick": {"expert_steps": 60_000, "transitions": 100_000, "eval_every": 3_000, "ref_episodes": 5},
    "paper": {"expert_steps": 1_000_000, "transitions": 1_000_000, "eval_every": 20_000, "ref_episodes": 10},
}


@dataclasses.dataclass(frozen=True)
class CollectConfig(Params):
    """``diffrl data collect``: build a D4RL-style dataset locally."""

    env: str = "Hopper-v5"
    """environment id (Gymnasium MuJoCo v5)"""
    kind: Kind = "medium"
    """dataset recipe (D4RL's definitions)"""
    preset: Literal["quick", "paper"] = "quick"
    """budgets: quick (minutes on 2 CPU cores) or paper (D4RL's sizes: 1M transitions, 1M SAC steps)"""
    seed: int = 0
    """seed of the SAC run and of the recorded episodes"""
    out: str | None = None
    """Minari id, or a .hdf5 / .npz path; default: the Minari id diffrl/<task>/<kind>-<preset>-v0"""
    transitions: int | None = None
    """transitions to record (default: the preset's; medium-expert records this many of each)"""
    expert_steps: int | None = None
    """SAC env steps for the expert (default: the preset's)"""
    experts_dir: Path = Path("runs/experts")
    """where SAC expert runs are kept and reused"""
    device: str = "auto"
    """auto, cpu or cuda"""
    overwrite: bool = False
    """replace an existing dataset"""
    progress: bool = True
    """show progress bars"""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("transitions", "expert_steps"):
            value = getattr(self, name)
            if value is not None:
                check_positive(name, value)
        steps = self.expert_steps or BUDGETS[self.preset]["expert_steps"]
        check(steps >= 2 * BUDGETS[self.preset]["eval_every"] or self.expert_steps is not None, "expert_steps",
              steps, "large enough for several evaluations")


def _sac_config(run_dir: Path) -> online.OnlineConfig:
    """The config of the SAC run behind a dataset (through the registry: the run's own command reads it)."""
    return registry.load_config(run_dir, online.SYSTEM.commands[0])


def expert_run(cfg: CollectConfig, budget: dict[str, int]) -> Path:
    """Train (or reuse, or resume) the SAC run that provides the expert and medium policies."""
    steps = cfg.expert_steps or budget["expert_steps"]
    eval_every = min(budget["eval_every"], max(steps // 10, 1))
    run_dir = cfg.experts_dir / f"{cfg.env.replace('/', '_')}-{cfg.preset}-{steps}-s{cfg.seed}"
    sac = online.SACConfig(env=cfg.env, steps=steps, seed=cfg.seed, learning_starts=min(5_000, steps // 5),
                           eval_every=eval_every, eval_episodes=budget["ref_episodes"], checkpoint_every=eval_every,
                           keep_checkpoints=0, log_every=1_000, device=cfg.device, progress=cfg.progress)
    if (run_dir / "summary.json").is_file():
        return run_dir  # finished earlier: reuse
    if (run_dir / "config.yaml").is_file():
        return online.run(dataclasses.replace(sac, resume=run_dir))  # killed earlier: continue exactly
    return online.run(dataclasses.replace(sac, run_dir=run_dir))


def _eval_returns(run_dir: Path) -> dict[int, float]:
    """env step -> eval return of each logged evaluation of the SAC run."""
    from diffrl.runs.logger import read_metrics

    return {int(r["step"]): r["eval/return_mean"] for r in read_metrics(run_dir)
            if not np.isnan(r.get("eval/return_mean", np.nan))}


def _snapshots(run_dir: Path, steps: list[int], env: Any, device: torch.device) -> dict[int, Any]:
    """The SAC agent of each checkpoint in ``steps`` (networks only; the replay buffers stay on disk)."""
    sac_cfg = _sac_config(run_dir)
    out = {}
    for step in steps:
        agent = online.build(sac_cfg, obs_dim(env.observation_space), obs_dim(env.action_space), device)
        _, parts = ckpt.load_checkpoint(run_dir / "checkpoints" / ckpt.step_dir_name(step), parts=("state",))
        agent.load_state_dict(parts["state"]["agent"])
        out[step] = agent
    return out


@contextlib.contextmanager
def seeded_torch(*keys: int) -> Iterator[None]:
    """Torch's global generator seeded from ``keys`` inside the block and restored after it: SAC's stochastic
    actions draw from it, so what a dataset holds must not depend on what ran before in the process (which expert
    was trained there or read from the cache, which dataset was built first)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(*keys))
        yield


def record(env_id: str, act: Any, transitions: int, seed: int, stream: int, progress: bool,
           desc: str) -> OfflineDataset:
    """Roll out ``act(obs_batch) -> action_batch`` for ``transitions`` steps; the last episode ends as a timeout."""
    with seeded_torch(seed, COLLECT_STREAM, stream, 1):
        return _record(env_id, act, transitions, seed, stream, progress, desc)


def _record(env_id: str, act: Any, transitions: int, seed: int, stream: int, progress: bool,
            desc: str) -> OfflineDataset:
    envs = VecEnv(env_id, 1, derive_seed(seed, COLLECT_STREAM, stream))
    obs = envs.reset()
    d_obs, d_act = obs.shape[1], envs.single_action_space.shape[0]
    arrays = {"observations": np.zeros((transitions, d_obs), np.float32),
              "actions": np.zeros((transitions, d_act), np.float32), "rewards": np.zeros(transitions, np.float32),
              "next_observations": np.zeros((transitions, d_obs), np.float32),
              "terminals": np.zeros(transitions, bool), "timeouts": np.zeros(transitions, bool)}
    bar = Progress(transitions, desc=desc, unit="step", enabled=progress)
    for t in range(transitions):
        a = np.asarray(act(obs), dtype=np.float32)
        step = envs.step(a)
        arrays["observations"][t], arrays["actions"][t] = obs[0], a[0]
        arrays["rewards"][t], arrays["next_observations"][t] = step.reward[0], step.next_obs[0]
        arrays["terminals"][t], arrays["timeouts"][t] = step.terminated[0], step.truncated[0]
        obs = step.obs
        bar.update(1)
    bar.close()
    arrays["timeouts"][-1] |= not arrays["terminals"][-1]  # the end of collection cuts the last episode
    envs.close()
    return OfflineDataset(**arrays, metadata={})


def concat(a: OfflineDataset, b: OfflineDataset) -> OfflineDataset:
    return OfflineDataset(**{k: np.concatenate([a.arrays()[k], b.arrays()[k]]) for k in a.arrays()}, metadata={})


def from_replay(buf: dict[str, Any]) -> OfflineDataset:
    """A saved replay buffer (``ReplayBuffer.state_dict``) as a dataset, episodes closed by terminals/timeouts."""
    size = int(buf["size"])
    data = {k: v[:size].numpy() for k, v in buf["data"].items()}
    # The online buffer stores terminations only; episode ends by time limit are where next_obs != obs[t+1].
    cont = np.all(data["next_obs"][:-1] == data["obs"][1:], axis=1)
    terminals = data["done"].astype(bool)
    timeouts = np.append(~cont, True) & ~terminals
    return OfflineDataset(observations=data["obs"], actions=data["act"], rewards=data["rew"],
                          next_observations=data["next_obs"], terminals=terminals, timeouts=timeouts, metadata={})


def run(cfg: CollectConfig) -> str:
    """Build the dataset ``cfg`` describes; returns where it was written (path or Minari id)."""
    budget = BUDGETS[cfg.preset]
    n = cfg.transitions or budget["transitions"]
    device = resolve_device(cfg.device)
    out = cfg.out or f"diffrl/{task_name(cfg.env)}/{cfg.kind}-{cfg.preset}-v0"
    eval_env = make_env(cfg.env)  # also validates the id before any training
    rng = np.random.default_rng(derive_seed(cfg.seed, COLLECT_STREAM, 0))
    t0 = time.perf_counter()

    def random_act(o: np.ndarray) -> np.ndarray:
        return rng.uniform(-1.0, 1.0, size=(o.shape[0], eval_env.action_space.shape[0])).astype(np.float32)

    random_ref = evaluate(random_act, eval_env, budget["ref_episodes"], seed=cfg.seed).return_mean
    sac_dir = expert_run(cfg, budget)
    evals = _eval_returns(sac_dir)
    expert_step = max(evals, key=lambda step: (evals[step], step))  # the best evaluation (see the recipes)
    snapshots = _snapshots(sac_dir, sorted(evals), eval_env, device)
    expert = snapshots[expert_step]
    expert_ref = evaluate(expert, eval_env, budget["ref_episodes"], seed=cfg.seed).return_mean
    medium_target = expert_ref / 3.0
    # Score each snapshot with the policy that will record the data: SAC's stochastic policy can differ a lot
    # from its deterministic mean mid-training (HalfCheetah at 39k steps: 1057 deterministic vs 2223 stochastic).
    recording = {}
    for s, agent in snapshots.items():
        with seeded_torch(cfg.seed, COLLECT_STREAM, 5, s):  # the same actions whatever ran before
            recording[s] = evaluate(lambda o, a=agent: a.act(o, deterministic=False), eval_env,
                                    budget["ref_episodes"], seed=cfg.seed).return_mean
    medium_step = min(recording, key=lambda s: (abs(recording[s] - medium_target), s))
    medium = snapshots[medium_step]
    meta: dict[str, Any] = {
        "env_id": cfg.env, "kind": cfg.kind, "preset": cfg.preset, "seed": cfg.seed,
        "ref_min_score": float(random_ref), "ref_max_score": float(expert_ref),
        "ref_note": "ref_min: uniform random policy; ref_max: the deterministic SAC expert "
                    f"({budget['ref_episodes']} episodes each)",
        "expert": {"run_dir": str(sac_dir), "env_steps": expert_step, "eval_return": evals[expert_step]},
        "medium": {"env_steps": medium_step, "eval_return": evals[medium_step], "target": medium_target,
                   "stochastic_return": recording[medium_step], "selected_by": "stochastic (recording) return"},
        "recipe": __doc__.split("Recipes")[1].split("One SAC run")[0].strip() if __doc__ else "",
        "budget_note": ("quick preset: small budgets for a 2-core CPU, NOT D4RL's sizes" if cfg.preset == "quick"
                        else "paper preset: D4RL's sizes"),
        "diffrl_version": diffrl.__version__, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if cfg.kind == "random":
        ds = record(cfg.env, random_act, n, cfg.seed, 1, cfg.progress, "random")
    elif cfg.kind == "expert":
        ds = record(cfg.env, expert.act, n, cfg.seed, 2, cfg.progress, "expert")
    elif cfg.kind == "medium":
        ds = record(cfg.env, medium.act, n, cfg.seed, 3, cfg.progress, "medium")
    elif cfg.kind == "medium-replay":
        _, parts = ckpt.load_checkpoint(sac_dir / "checkpoints" / ckpt.step_dir_name(medium_step), parts=("buffer",))
        ds = from_replay(parts["buffer"])
    else:
        ds = concat(record(cfg.env, medium.act, n, cfg.seed, 3, cfg.progress, "medium"),
                    record(cfg.env, expert.act, n, cfg.seed, 2, cfg.progress, "expert"))
    ds.metadata = {**meta, "transitions": len(ds), "collect_wall_s": round(time.perf_counter() - t0, 1)}
    written = save_dataset(ds, out, detect_format(out), overwrite=cfg.overwrite)
    _save_policies(written, cfg, sac_dir, {"expert": (expert_step, expert), "medium": (medium_step, medium)})
    eval_env.close()
    return written


def _save_policies(written: str, cfg: CollectConfig, sac_dir: Path, policies: dict[str, tuple[int, Any]]) -> None:
    """Save the actors (name -> (env step, agent)) beside the dataset (``<out>.policies/`` or the Minari dir)."""
    target = Path(written)
    if not target.suffix:  # Minari id or directory
        folder = (target if target.is_dir() else minari_root() / written) / "policies"
    else:
        folder = target.with_name(target.name + ".policies")
    folder.mkdir(parents=True, exist_ok=True)
    for name, (_, agent) in policies.items():
        save_file({k: v.contiguous() for k, v in agent.actor.state_dict().items()}, str(folder / f"{name}.safetensors"))
    (folder / "policies.json").write_text(json.dumps(
        {"architecture": "diffrl.agents.nets.TanhGaussianActor", "hidden": list(_sac_config(sac_dir).hidden),
         "env_id": cfg.env, **{f"{name}_env_steps": step for name, (step, _) in policies.items()},
         "sac_run": str(sac_dir)}, indent=2))


# ------------------------------------------------------------------------------------------ `diffrl data` tools
@dataclasses.dataclass(frozen=True)
class DataInfoArgs:
    """Episodes, transitions, return statistics, normalized scores and spaces of a dataset."""

    dataset: Annotated[str, tyro.conf.Positional]
    """Minari id (under MINARI_DATASETS_PATH) or a path to a D4RL .hdf5 or DPPO .npz file"""
    env: str | None = None
    """also check the dataset against this env's spaces and action bounds"""
    json: bool = False
    """print JSON instead of a table"""


@dataclasses.dataclass(frozen=True)
class DataConvertArgs:
    """Convert a dataset between the Minari, D4RL HDF5 and DPPO npz layouts (arrays bit-exact)."""

    dataset: Annotated[str, tyro.conf.Positional]
    """source: Minari id or a .hdf5 / .npz path"""
    to: Literal["minari", "d4rl", "npz"]
    """target layout"""
    out: str
    """target: a Minari id (or dataset directory) for minari, a file path otherwise"""
    overwrite: bool = False
    """replace an existing target"""


def info_main(a: DataInfoArgs) -> None:
    """``diffrl data info``: print a dataset's statistics as a table (or JSON)."""
    info = describe_dataset(load_dataset(a.dataset, env_id=a.env))
    if a.json:
        print(json.dumps(info, indent=2, default=float))
        return
    width = max(map(len, info))
    for k, v in info.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")


def convert_main(a: DataConvertArgs) -> None:
    """``diffrl data convert``: write a dataset in another layout."""
    ds = load_dataset(a.dataset)
    print(f"written: {save_dataset(ds, a.out, a.to, overwrite=a.overwrite)} ({len(ds)} transitions)")


def collect_main(cfg: CollectConfig) -> None:
    """``diffrl data collect``: build a D4RL-style dataset and print where it went."""
    print(f"dataset: {run(cfg)}")


SYSTEM = System("data", "inspect, convert or build datasets", tools=(
    Tool("info", DataInfoArgs, info_main, help="dataset statistics, normalized scores, spaces"),
    Tool("convert", DataConvertArgs, convert_main, help="--to minari|d4rl|npz --out TARGET"),
    Tool("collect", CollectConfig, collect_main, run=run,
         help="--env ID --kind random|medium|medium-replay|expert|medium-expert")))
