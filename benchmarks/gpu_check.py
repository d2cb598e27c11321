"""The check to run whenever a CUDA GPU is lent: diffrl's paper-size workloads on this device, in about 5 minutes.

    python benchmarks/gpu_check.py                        # on the CUDA GPU (exit status 2 if torch sees none)
    python benchmarks/gpu_check.py --smoke --device cpu   # everything shrunk: a CPU check of the script itself
    python benchmarks/gpu_check.py --table-only           # the tables of the committed rows (benchmarks/tables.py)

It measures, on ``--device`` (warm-up first, then a fixed number of timed iterations, synchronised on CUDA):

1. SynthER's denoiser (residual MLP, 6 blocks, dim_t 128) at widths 1024 and 2048, batch 256, on random
   27-dimensional transitions (Hopper's size with the terminal column; the speed does not depend on the data):
   training steps/s of the whole ``DiffusionTrainer`` step in fp32 and in bf16 autocast, and samples/s with
   SynthER's sampler (Heun with churn, 128 steps);
2. ms per update of SAC and of REDQ (N = 10, M = 2, actor updated every step) at HalfCheetah sizes (obs 17,
   act 6), batch 256;
3. one DPPO fine-tuning iteration at DPPO's Hopper setting (``dppo`` preset ``paper``: 40 envs x 500 chunks of 4
   actions, K' = 10, 5 epochs of 50k-pair minibatches) on Hopper-v5, from a freshly initialised diffusion policy:
   seconds per iteration and env steps/s;
4. a tiny sweep through the CLI (``diffrl sweep train sac`` on Ray with ``--gpus-per-trial 0.5``): whether every
   trial finished and ran on CUDA (its config's device, and CUDA's RNG state in its checkpoint).

The table gives each rate beside the CPU reference figure of benchmarks/RESULTS.md where one exists, and the
ratio (how many times faster this device is). Each timed loop stops early once its share of the wall-clock budget
is spent, so a slower device still finishes; the total is printed at the end. ``--smoke`` shrinks everything
(tiny widths, a few steps, 2 envs, tiny runs; the sweep uses the local runner without GPUs unless Ray and a CUDA
device are both there) so the whole script runs on a CPU in seconds; it is not a measurement.

One row with every measurement, the device and the provenance of code and machine is appended to
benchmarks/results/gpu_check.jsonl (``--results`` to write elsewhere; smoke runs to the git-ignored
benchmarks/out/gpu_check_smoke.jsonl).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffrl.agents import SAC, REDQParams, SACParams
from diffrl.agents.dppo import DPPO, DPPOParams, dppo_model_spec
from diffrl.agents.ppo_utils import RunningRewardScaler
from diffrl.cli import main as diffrl_main
from diffrl.data import ReplayBuffer
from diffrl.diffusion.spec import build_model
from diffrl.diffusion.trainer import DiffusionTrainer, TrainerSettings
from diffrl.envs import make_env
from diffrl.envs.chunking import chunk_envs
from diffrl.envs.wrappers import MinMaxNormalization
from diffrl.pipelines import dppo, onpolicy
from diffrl.runs.checkpoint import load_checkpoint
from diffrl.runs.device import tune_cpu_allocator
from diffrl.runs.results import provenance, read_rows
from diffrl.runs.rundir import read_config
from diffusion_speed import spec as synther_spec
from harness import RESULTS, append_row

# CPU reference figures, from benchmarks/RESULTS.md (Intel Xeon @ 2.10 GHz with AMX-BF16, 2 threads): "Diffusion
# core" (width 1024, batch 256; samples: Heun 128 steps) and the SAC / REDQ update-cost follow-up (HalfCheetah
# sizes, batch 256, REDQ's actor updated every step).
DIFFUSION_TRAIN_CPU = {(1024, "fp32"): 17.7, (1024, "bf16"): 34.0}  # training steps/s
DIFFUSION_SAMPLE_CPU = {(1024, "fp32"): 75.0, (1024, "bf16"): 378.0}  # samples/s
SAC_MS_CPU, REDQ_MS_CPU = 6.05, 9.08  # ms per update

TRANSITION_DIM = 27  # Hopper: obs 11 + act 3 + reward 1 + next obs 11 + terminal 1
OBS_DIM, ACT_DIM = 17, 6  # HalfCheetah
DPPO_ENV = "Hopper-v5"
SWEEP_TRIALS = 2  # seeds of the sweep: two trials share the GPU at 0.5 each


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big each item is and how long it may run (``FULL``: the GPU check; ``SMOKE``: a CPU check of the script)."""

    name: str
    """full or smoke"""
    reference: bool
    """the sizes are those of the CPU reference figures (they are shown beside the rates)"""
    widths: tuple[int, ...]
    """residual MLP widths of the denoiser"""
    diffusion_batch: int
    """transitions per training step"""
    train_warmup: int
    """untimed training steps"""
    train_steps: int
    """timed training steps (at most)"""
    samples: int
    """samples per sampling call"""
    sample_steps: int
    """Heun steps per sample (SynthER: 128)"""
    sample_calls: int
    """timed sampling calls (at most; one untimed call of the same size first)"""
    agent_hidden: tuple[int, ...]
    """SAC / REDQ hidden widths"""
    agent_batch: int
    """SAC / REDQ batch"""
    agent_warmup: int
    """untimed updates"""
    agent_updates: int
    """timed updates (at most)"""
    dppo: dict[str, Any]
    """DPPO overrides of the ``paper`` presets (pre-training's model, fine-tuning's iteration)"""
    sweep_steps: int
    """env steps of each sweep trial (SAC on Hopper-v5, one trial per seed)"""
    sweep_flags: tuple[str, ...]
    """the sweep trials' other fields (CLI flags of ``diffrl train sac``)"""
    guard_s: float
    """seconds one timed loop may run before it stops early"""


FULL = Sizes("full", True, widths=(1024, 2048), diffusion_batch=256, train_warmup=20, train_steps=300,
             samples=10_000, sample_steps=128, sample_calls=2, agent_hidden=(256, 256), agent_batch=256,
             agent_warmup=50, agent_updates=500, dppo={}, guard_s=20.0,
             sweep_steps=1000, sweep_flags=("--learning-starts", "250", "--eval-every", "500", "--eval-episodes", "1",
                                            "--log-every", "250", "--checkpoint-every", "500"))
SMOKE = Sizes("smoke", False, widths=(32, 64), diffusion_batch=32, train_warmup=1, train_steps=3, samples=8,
              sample_steps=4, sample_calls=1, agent_hidden=(32, 32), agent_batch=32, agent_warmup=1,
              agent_updates=3, guard_s=5.0,
              dppo=dict(denoising_steps=4, ft_denoising_steps=2, hidden=32, n_envs=2, n_steps=3, batch_size=16,
                        update_epochs=1),
              sweep_steps=100, sweep_flags=("--learning-starts", "50", "--batch-size", "32", "--hidden", "32", "32",
                                            "--eval-every", "100", "--eval-episodes", "1", "--log-every", "50",
                                            "--checkpoint-every", "100"))


# ------------------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(step: Callable[[], Any], warmup: int, calls: int, device: torch.device,
                     guard_s: float) -> tuple[float, int]:
    """Seconds per call of ``step`` over up to ``calls`` timed calls after ``warmup`` untimed ones; the timed loop
    stops early once ``guard_s`` have passed (the wall-clock guard). Returns (seconds per call, calls timed)."""
    for _ in range(warmup):
        step()
    sync(device)
    t0, done = time.perf_counter(), 0
    while done < calls:
        step()
        done += 1
        if time.perf_counter() - t0 > guard_s:
            break
    sync(device)
    return (time.perf_counter() - t0) / done, done


def measured(item: str, label: str, setting: str, value: float, unit: str, ref: float | None = None,
             lower_is_better: bool = False, **extra: Any) -> dict[str, Any]:
    """One table row: ``ratio`` is how many times faster than the CPU reference this device is."""
    ratio = None if ref is None else (ref / value if lower_is_better else value / ref)
    return {"item": item, "label": label, "setting": setting, "value": value, "unit": unit, "cpu_ref": ref,
            "ratio": ratio, **extra}


# -------------------------------------------------------------------------------------------------------- items
def diffusion(device: torch.device, sizes: Sizes) -> list[dict[str, Any]]:
    """Item 1: SynthER's denoiser, training steps/s and Heun samples/s, fp32 and bf16 autocast."""
    gen = torch.Generator(device=device).manual_seed(0)
    data = torch.randn(100_000, TRANSITION_DIM, device=device, generator=gen)  # (N, 27) random transitions
    data[:, -1] = (data[:, -1] > 2).float()  # the terminal column (the normaliser skips it)
    out = []
    for width in sizes.widths:
        for prec in ("fp32", "bf16"):
            torch.manual_seed(0)
            model = build_model(synther_spec(width, TRANSITION_DIM)).to(device)
            model.normalizer.fit(data)
            settings = TrainerSettings(steps=sizes.train_warmup + sizes.train_steps, batch_size=sizes.diffusion_batch,
                                       bf16=prec == "bf16")
            trainer = DiffusionTrainer(model, data, settings)
            sec, n = seconds_per_call(trainer.train_step, sizes.train_warmup, sizes.train_steps, device,
                                      sizes.guard_s)
            ref = DIFFUSION_TRAIN_CPU.get((width, prec)) if sizes.reference else None
            out.append(measured("diffusion_train", "SynthER denoiser training",
                                f"width {width}, {prec}, batch {sizes.diffusion_batch} ({n} steps)", 1 / sec,
                                "steps/s", ref, width=width, precision=prec))
            sampler = trainer.ema.shadow
            sampler.amp_dtype = torch.bfloat16 if prec == "bf16" else None
            sample_gen = torch.Generator(device=device).manual_seed(0)
            sec, n = seconds_per_call(lambda s=sampler, g=sample_gen: s.sample(
                sizes.samples, sampler="heun", steps=sizes.sample_steps, generator=g), 1, sizes.sample_calls, device,
                sizes.guard_s)
            ref = DIFFUSION_SAMPLE_CPU.get((width, prec)) if sizes.reference else None
            out.append(measured("diffusion_sample", "SynthER Heun sampling",
                                f"width {width}, {prec}, {sizes.sample_steps} steps, {n} x {sizes.samples} samples",
                                sizes.samples / sec, "samples/s", ref, width=width, precision=prec))
            del model, trainer, sampler
    return out


def agent_updates(device: torch.device, sizes: Sizes) -> list[dict[str, Any]]:
    """Item 2: ms per SAC and REDQ update on random HalfCheetah-sized batches (as sac_vs_sb3.py's update cost)."""
    rng, k = np.random.default_rng(0), 10_000
    buf = ReplayBuffer.for_transitions(k, OBS_DIM, ACT_DIM, device=device)
    buf.add_batch(obs=rng.normal(size=(k, OBS_DIM)), act=rng.uniform(-1, 1, (k, ACT_DIM)), rew=rng.normal(size=k),
                  next_obs=rng.normal(size=(k, OBS_DIM)), done=np.zeros(k))
    out = []
    for item, label, params, ref in (
            ("sac_update", "SAC update", SACParams(hidden=sizes.agent_hidden), SAC_MS_CPU),
            ("redq_update", "REDQ (N=10, M=2) update", REDQParams(hidden=sizes.agent_hidden, actor_update_every=1),
             REDQ_MS_CPU)):
        torch.manual_seed(0)
        agent = SAC(OBS_DIM, ACT_DIM, params, device)
        sec, n = seconds_per_call(lambda a=agent: a.update(buf.sample(sizes.agent_batch)), sizes.agent_warmup,
                                  sizes.agent_updates, device, sizes.guard_s)
        out.append(measured(item, label, f"obs {OBS_DIM}, act {ACT_DIM}, hidden {list(sizes.agent_hidden)}, batch "
                            f"{sizes.agent_batch} ({n} updates)", 1e3 * sec, "ms/update",
                            ref if sizes.reference else None, lower_is_better=True))
    return out


def random_normalization(env_id: str, steps: int = 1_000) -> MinMaxNormalization:
    """Min-max statistics of random-action transitions (what a fresh policy's chunk envs normalise with)."""
    env = make_env(env_id)
    env.action_space.seed(0)
    obs, _ = env.reset(seed=0)
    observations, actions = [], []
    for _ in range(steps):
        act = env.action_space.sample()
        observations.append(obs)
        actions.append(act)
        obs, _, term, trunc, _ = env.step(act)
        if term or trunc:
            obs, _ = env.reset()
    env.close()
    return MinMaxNormalization.fit(np.asarray(observations), np.asarray(actions))


def dppo_iteration(device: torch.device, sizes: Sizes) -> list[dict[str, Any]]:
    """Item 3: one fine-tuning iteration of a fresh diffusion policy, as ``dppo.finetune`` runs it."""
    pre = {**dppo.PRESETS["pretrain"]["paper"], **sizes.dppo}
    ft = {**dppo.PRESETS["finetune"]["paper"], **sizes.dppo}
    names = {f.name for f in dataclasses.fields(DPPOParams)}
    params = DPPOParams(**{**{k: v for k, v in ft.items() if k in names}, "horizon_steps": pre["horizon_steps"],
                           "act_steps": pre["act_steps"], "cond_steps": 1, "denoising_steps": pre["denoising_steps"]})
    norm = random_normalization(DPPO_ENV)
    torch.manual_seed(0)
    model = build_model(dppo_model_spec(norm.obs_dim, norm.act_dim, params, hidden=pre["hidden"],
                                        blocks=pre["blocks"], time_dim=pre["time_dim"], activation=pre["activation"]))
    agent = DPPO(model, norm.obs_dim, params, device)
    envs = chunk_envs(DPPO_ENV, ft["n_envs"], 0, params, norm, params.act_steps, ft["max_episode_steps"])
    scaler = RunningRewardScaler(ft["n_envs"])
    sample_gen, minibatch_gen = torch.Generator(device=device).manual_seed(1), torch.Generator().manual_seed(2)
    obs = envs.reset()

    def iteration(n_steps: int) -> tuple[int, float, float]:  # env steps, rollout s, scoring + update s
        nonlocal obs
        sync(device)
        t0 = time.perf_counter()
        ro = onpolicy.collect(agent, envs, obs, n_steps, sample_gen)
        sync(device)
        t1 = time.perf_counter()
        values, adv, ret, _ = onpolicy.advantages(agent, ro, ft["gamma"], ft["gae_lambda"], scaler)
        onpolicy.ppo_update(agent, ro, values, adv, ret, update_epochs=ft["update_epochs"],
                            minibatch_size=ft["batch_size"], critic_only=False, generator=minibatch_gen)
        sync(device)
        obs = ro.last_obs
        return ro.env_steps, t1 - t0, time.perf_counter() - t1

    iteration(2)  # warm-up: 2 chunks per env
    env_steps, rollout_s, update_s = iteration(ft["n_steps"])
    envs.close()
    total = rollout_s + update_s
    setting = (f"{DPPO_ENV}, {ft['n_envs']} envs x {ft['n_steps']} chunks x {params.act_steps}, K "
               f"{params.denoising_steps} / K' {params.ft_denoising_steps}, {ft['update_epochs']} PPO epochs")
    extra = dict(env_steps=env_steps, rollout_s=rollout_s, update_s=update_s)
    return [measured("dppo_iteration", "DPPO fine-tuning iteration", setting, total, "s/iteration", **extra),
            measured("dppo_env_steps", "DPPO fine-tuning iteration", setting, env_steps / total, "env steps/s",
                     **extra)]


def sweep(device: torch.device, sizes: Sizes, smoke: bool) -> list[dict[str, Any]]:
    """Item 4: a tiny ``diffrl sweep train sac`` through the CLI; every trial finished? on CUDA?"""
    try:
        import ray  # noqa: F401
        have_ray = True
    except ImportError:
        have_ray = False
    cuda = device.type == "cuda"
    if have_ray and (cuda or not smoke):
        runner = ["--runner", "ray", "--cpus-per-trial", "1"] + (["--gpus-per-trial", "0.5"] if cuda else [])
        how = "Ray, 0.5 GPU + 1 CPU per trial" if cuda else "Ray, 1 CPU per trial, no GPU (--device cpu)"
    else:
        runner = ["--runner", "local"]
        why = "Ray not installed" if not have_ray else "--device cpu" if torch.cuda.is_available() else "no CUDA device"
        how = f"local runner, no GPUs ({why})"
    with tempfile.TemporaryDirectory(prefix="gpu-check-sweep-") as root:
        argv = ["sweep", "train", "sac", "--env", "Hopper-v5", "--steps", str(sizes.sweep_steps), *sizes.sweep_flags,
                "--device", str(device), "--seeds", f"0-{SWEEP_TRIALS - 1}", "--name",
                "gpu-check", *runner, "--root", root, "--table-every", "3600"]
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            status = diffrl_main(argv)
        trials = sorted(p for p in (Path(root) / "gpu-check" / "trials").glob("*") if p.is_dir())
        finished = [t for t in trials if (t / "summary.json").is_file()]
        on_cuda = [t for t in finished if ran_on_cuda(t)]
    if status != 0 or len(finished) < SWEEP_TRIALS:
        print(f"the sweep did not finish (exit status {status}); its output:\n{log.getvalue()}", file=sys.stderr)
    setting = f"{SWEEP_TRIALS} x SAC Hopper-v5, {sizes.sweep_steps} steps, {how}; on CUDA: {len(on_cuda)}/{len(trials)}"
    return [measured("sweep", "sweep --gpus-per-trial", setting, float(len(finished)), f"of {len(trials)} trials done",
                     all_finished=status == 0 and len(finished) == len(trials) == SWEEP_TRIALS, trials=len(trials),
                     on_cuda=len(on_cuda), runner=how)]


def ran_on_cuda(run_dir: Path) -> bool:
    """A finished trial asked for CUDA (its config) and had CUDA initialised (CUDA's RNG state in its checkpoint)."""
    if not str(read_config(run_dir)["config"].get("device", "")).startswith("cuda"):
        return False
    _, parts = load_checkpoint(run_dir, parts=("state",))
    return "cuda" in parts["state"]["rng"]


# ------------------------------------------------------------------------------------------------------- output
def number(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| item | setting | rate on this device | unit | CPU reference | ratio |", "|---|---|---:|---|---:|---:|"]
    for r in rows:
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.1f}x"
        lines.append(f"| {r['label']} | {r['setting']} | {number(r['value'])} | {r['unit']} | {number(r['cpu_ref'])} "
                     f"| {ratio} |")
    return "\n".join(lines)


def tables(rows: list[dict[str, Any]]) -> str:
    """One table per committed (non-smoke) row: the device, its code and when, then the measurements."""
    out = []
    for row in rows:
        if row.get("smoke"):
            continue
        machine = row.get("machine", {})
        head = (f"{row['device_name']} ({row['device']}), torch {row['torch']}, CUDA {row['cuda'] or 'none'}, "
                f"{machine.get('torch_threads')} CPU threads ({machine.get('cpu')}, {machine.get('cores')} cores); "
                f"git {str(row.get('git_rev'))[:7]}{'+edits' if row.get('git_dirty') else ''}; {row.get('date')}; "
                f"wall clock {row['wall_s']:.0f} s")
        out.append(f"{head}\n\n{table(row['measurements'])}\n")
    return "\n".join(out) if out else "No rows yet: run `python benchmarks/gpu_check.py` on a CUDA machine.\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--smoke", action="store_true", help="shrink everything (a CPU check of the script)")
    ap.add_argument("--results", type=Path, default=None,
                    help="the JSONL file of rows (default: benchmarks/results/gpu_check.jsonl; with --smoke, the "
                         "git-ignored benchmarks/out/gpu_check_smoke.jsonl)")
    ap.add_argument("--table-only", action="store_true", help="print the tables of the rows in --results; run nothing")
    args = ap.parse_args()
    if args.table_only:
        print(tables(read_rows(args.results or RESULTS / "gpu_check.jsonl")), end="")
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device} was asked but this torch ({torch.__version__}) sees no CUDA GPU; run the check "
              "on a machine with one, or pass --device cpu.", file=sys.stderr)
        return 2
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        ap.error(f"--device {args.device}: choose cuda, cuda:N or cpu")
    os.environ.setdefault("DIFFRL_PROGRESS", "0")
    tune_cpu_allocator()
    if args.results is None:
        args.results = (Path(__file__).parent / "out" / "gpu_check_smoke.jsonl" if args.smoke
                        else RESULTS / "gpu_check.jsonl")
    device, sizes, start = torch.device(args.device), SMOKE if args.smoke else FULL, time.perf_counter()
    prov = provenance()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else prov["machine"]["cpu"]
    print(f"device: {name} ({device}) | torch {torch.__version__} | CUDA {torch.version.cuda or 'none'} | "
          f"{torch.get_num_threads()} CPU threads | {sizes.name} sizes", flush=True)
    rows: list[dict[str, Any]] = []
    for item in (diffusion, agent_updates, dppo_iteration):
        t0 = time.perf_counter()
        rows += item(device, sizes)
        print(f"{item.__name__}: {time.perf_counter() - t0:.0f} s", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    t0 = time.perf_counter()
    rows += sweep(device, sizes, args.smoke)
    print(f"sweep: {time.perf_counter() - t0:.0f} s", flush=True)
    wall = time.perf_counter() - start
    print(f"\n{table(rows)}\n\nratio: times faster than the CPU reference (benchmarks/RESULTS.md); wall clock "
          f"{wall:.0f} s" + (" — over the 5-minute budget" if wall > 300 and not args.smoke else ""))
    row = {"benchmark": "gpu_check", "smoke": args.smoke, "device": str(device), "device_name": name,
           "torch": torch.__version__, "cuda": torch.version.cuda, "measurements": rows, "wall_s": wall}
    append_row(args.results, {**row, **prov})
    print(f"row appended to {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
