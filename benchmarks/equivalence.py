"""Behaviour equivalence of two revisions: the same commands, seeds and data give the same ``metrics.csv``.

For refactors that must not change behaviour. Each revision's own ``diffrl`` CLI runs five short cases on one CPU
thread (``OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 DIFFRL_PROGRESS=0 --device cpu``), each into the same explicit
``--run-dir`` (<work>/stage/<case>/..., so both trees run literally identical command lines), on one dataset:

    train_sac        train sac --env Hopper-v5 --steps 6000 --learning-starts 1000 --eval-every 2000 ... (README demo)
    offline_td3bc    offline td3bc --preset quick --steps 4000 --eval-every 2000
    synther_offline  synther offline --preset quick --diffusion-steps 1000 --num-samples 10000 --fidelity-samples 1000
                     --steps 2000 --eval-every 1000 (diffusion training, sampling, fidelity, TD3+BC on synthetic data)
    iter             iter --env FetchReach-v4 --preset quick --epochs 4 --n-batches 10 (KER 8, GER 4: the defaults)
    dppo             dppo pretrain --preset quick --steps 2000, then dppo finetune --preset quick of that run with
                     --n-steps 125 --n-train-itr 6 --eval-every 3

About 5 CPU minutes per tree (2026-12-03: 95 + 55 + 60 + 48 + 54 s); runs take a lock, so a second one waits.
Every ``metrics.csv`` under a case (a SynthER run's diffusion sub-run and both DPPO stages included) must have the
same columns and, row by row, identical values in every column but the wall-clock ones (``wall_s``, ``perf/*``).
``summary.json`` values are compared too, all but the timings (keys with the unit ``s`` in their name: ``wall_s``,
``*_per_s``, ``time_breakdown_s``, ``generation_s``, ...); their differences are reported, not failed on. The exit
status is 1 if any case differs or fails.

    python benchmarks/equivalence.py a74b3d0 WORKTREE                  # the baseline vs the working tree
    python benchmarks/equivalence.py a74b3d0 HEAD --cases train_sac dppo
    python benchmarks/equivalence.py a74b3d0 a74b3d0 --no-cache        # does the baseline reproduce itself?

A REV is a git revision (extracted with ``git archive``) or ``WORKTREE``, a snapshot of the working tree's ``src/``
(uncommitted changes included). A tree's ``src/`` comes first on ``sys.path`` (checked: ``diffrl.__file__`` is
printed once per tree), so the venv's editable install of the main checkout does not shadow it. Outputs of a git
revision are cached in benchmarks/out/equivalence/<full sha>/<case>/ (with the commands, the dataset's sha256 and
the runtime in meta.json; a case whose commands or data changed is rerun), so the BEFORE revision runs once;
``WORKTREE`` and ``--no-cache`` runs go to the work dir. The dataset (Hopper-v5 medium, 20k transitions from a
3k-step SAC run) is built once, by the BEFORE tree, in benchmarks/out/equivalence/data/.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "benchmarks" / "out" / "equivalence"
PYTHON = REPO / ".venv" / "bin" / "python"
WORKTREE = "WORKTREE"
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DIFFRL_PROGRESS": "0"}
# `python -c RUNNER SRC ARG...`: diffrl imported from SRC (checked), then its CLI as the console script runs it;
# `python -c RUNNER SRC --probe` prints where diffrl was imported from
RUNNER = """
import sys
from pathlib import Path
src, args = Path(sys.argv[1]).resolve(), sys.argv[2:]
sys.path.insert(0, str(src))
import diffrl
where = Path(diffrl.__file__).resolve()
if not where.is_relative_to(src):
    sys.exit(f"equivalence: diffrl was imported from {where}, not from {src}")
if args == ["--probe"]:
    sys.exit(print(where))
sys.argv = ["diffrl", *args]
from diffrl.cli import main
sys.exit(main(args))
"""

# {data}: the shared dataset; {run}: the case's run directory root (the same path for both trees)
DATA = "hopper-medium.hdf5"
DATA_ARGV = ["data", "collect", "--env", "Hopper-v5", "--kind", "medium", "--expert-steps", "3000",
             "--transitions", "20000", "--seed", "0", "--experts-dir", "{dir}/experts", "--out", "{dir}/" + DATA]
CASES: dict[str, list[tuple[str, list[str]]]] = {
    "train_sac": [("run", ["train", "sac", "--env", "Hopper-v5", "--steps", "6000", "--learning-starts", "1000",
                           "--eval-every", "2000", "--eval-episodes", "3", "--seed", "0"])],
    "offline_td3bc": [("run", ["offline", "td3bc", "--dataset", "{data}", "--preset", "quick", "--steps", "4000",
                               "--eval-every", "2000", "--seed", "0"])],
    "synther_offline": [("run", ["synther", "offline", "--dataset", "{data}", "--preset", "quick",
                                 "--diffusion-steps", "1000", "--num-samples", "10000", "--fidelity-samples", "1000",
                                 "--steps", "2000", "--eval-every", "1000", "--seed", "0"])],
    "iter": [("run", ["iter", "--env", "FetchReach-v4", "--preset", "quick", "--epochs", "4", "--n-batches", "10",
                      "--seed", "0"])],
    "dppo": [("pretrain", ["dppo", "pretrain", "--dataset", "{data}", "--preset", "quick", "--steps", "2000",
                           "--seed", "0"]),
             ("finetune", ["dppo", "finetune", "--policy", "{run}/pretrain", "--preset", "quick",
                           "--n-steps", "125", "--n-train-itr", "6", "--eval-every", "3", "--seed", "0"])],
}
COMMON = ["--device", "cpu", "--no-progress"]


def is_wall_clock(column: str) -> bool:
    """Columns measured by the clock, not computed: they differ between any two runs."""
    return column == "wall_s" or column.startswith("perf/")


def is_timing_key(key: str) -> bool:
    """``summary.json`` keys (dotted paths) holding wall-clock times or rates: a name with the unit ``s`` in it
    (``wall_s``, ``env_steps_per_s``, ``time_breakdown_s.*``, ``generation_s``, ``rollout_s_per_env_step``)."""
    return any("s" in part.split("_") for part in key.split("."))


def sh(cmd: list[str], cwd: Path | None = None) -> str:
    """Run a short command, return its stdout; raise on failure."""
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def resolve(rev: str) -> str | None:
    """A revision's full commit sha; None for the working tree."""
    if rev == WORKTREE:
        return None
    try:
        return sh(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], REPO)
    except subprocess.CalledProcessError:
        raise SystemExit(f"equivalence: {rev!r} is neither a git revision nor {WORKTREE}") from None


def materialise(sha: str | None, trees: Path) -> Path:
    """A tree's ``src/`` directory: the commit extracted with ``git archive``, or a snapshot of the working tree's."""
    dest = trees / (sha or WORKTREE)
    if sha is None or not (dest / "src").is_dir():  # the working tree is snapshotted afresh on every run
        shutil.rmtree(dest, ignore_errors=True)
        tmp = trees / f"{dest.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if sha is None:
            shutil.copytree(REPO / "src", tmp / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            tar = subprocess.run(["git", "archive", "--format=tar", sha, "src"], cwd=REPO, check=True,
                                 capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(tmp)], input=tar, check=True)
        tmp.rename(dest)
    probe = subprocess.run([str(PYTHON), "-c", RUNNER, str(dest / "src"), "--probe"], env=tree_env(dest / "src"),
                           capture_output=True, text=True)
    if probe.returncode != 0:
        raise SystemExit(f"{sha or WORKTREE}: {probe.stderr.strip() or probe.stdout.strip()}")
    print(f"{(sha or WORKTREE)[:12]}: diffrl imported from {probe.stdout.strip()}", flush=True)
    return dest / "src"


def tree_env(src: Path) -> dict[str, str]:
    return {**os.environ, **ENV, "PYTHONPATH": str(src)}


def cli(src: Path, argv: list[str], cwd: Path, log: Path) -> int:
    """``diffrl ARGV`` with the tree's code, single-threaded; output appended to ``log``; the exit status."""
    with open(log, "a") as f:
        f.write(f"$ diffrl {' '.join(argv)}\n")
        f.flush()
        return subprocess.run([str(PYTHON), "-c", RUNNER, str(src), *argv], cwd=cwd, env=tree_env(src), stdout=f,
                              stderr=subprocess.STDOUT).returncode


def child_cpu_s() -> float:
    """CPU seconds used so far by finished child processes (a runtime that other load on the machine barely moves)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def fill(argv: list[str], **paths: Path) -> list[str]:
    return [a.format(**{k: str(v) for k, v in paths.items()}) for a in argv]


def build_data(src_of_before: Callable[[], Path]) -> Path:
    """The shared dataset, built once (by the BEFORE tree) in the cache; rebuilt only if its command changed."""
    root = CACHE / "data"
    meta = root / "meta.json"
    if meta.is_file() and json.loads(meta.read_text())["argv"] == DATA_ARGV and (root / DATA).is_file():
        return root / DATA
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    src = src_of_before()
    t0 = time.perf_counter()
    argv = fill(DATA_ARGV, dir=root) + ["--device", "cpu", "--no-progress"]
    if cli(src, argv, root, root / "log.txt") != 0:
        raise SystemExit(f"building the dataset failed: see {root / 'log.txt'}")
    meta.write_text(json.dumps({"argv": DATA_ARGV, "built_by": str(src), "seconds": time.perf_counter() - t0}))
    return root / DATA


def run_case(case: str, src: Path, data: Path, out: Path, stage: Path) -> dict:
    """Run a case's commands into ``stage/case`` (the same path for every tree), then move them to ``out/case``."""
    run = stage / case
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    t0, cpu0, rc = time.perf_counter(), child_cpu_s(), 0
    for name, argv in CASES[case]:
        rc = cli(src, fill(argv, data=data, run=run) + COMMON + ["--run-dir", str(run / name)], stage, run / "log.txt")
        if rc != 0:
            break
    meta = {"commands": CASES[case], "data_sha256": sha256(data), "seconds": round(time.perf_counter() - t0, 1),
            "cpu_s": round(child_cpu_s() - cpu0, 1), "rc": rc, "src": str(src), "stage": str(run)}
    (run / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out / case, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    shutil.move(run, out / case)
    return meta


def cached(case_dir: Path, data: Path) -> dict | None:
    """A cached case's meta.json if it finished with the current commands and data."""
    try:
        meta = json.loads((case_dir / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    same = (meta.get("commands") == json.loads(json.dumps(CASES[case_dir.name]))
            and meta.get("data_sha256") == sha256(data) and "stage" in meta)
    return meta if same and meta["rc"] == 0 else None


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def compare_metrics(a: Path, b: Path) -> tuple[int, int, str, bool]:
    """(rows, columns compared, result, identical) for two ``metrics.csv`` files; values compared as written."""
    if not (a.is_file() and b.is_file()):
        return 0, 0, f"metrics.csv missing in {'BEFORE' if not a.is_file() else 'AFTER'}", False
    (ca, ra), (cb, rb) = read_csv(a), read_csv(b)
    notes, ok = [], True
    if set(ca) != set(cb):
        ok = False
        notes.append(f"columns only BEFORE {sorted(set(ca) - set(cb))}, only AFTER {sorted(set(cb) - set(ca))}")
    elif ca != cb:
        notes.append("same columns in another order")
    cols = [c for c in ca if c in set(cb) and not is_wall_clock(c)]
    if len(ra) != len(rb):
        ok = False
        notes.append(f"rows {len(ra)} vs {len(rb)}")
    for x, y in zip(ra, rb):
        diff = next((c for c in cols if x[c] != y[c]), None)
        if diff is not None:
            notes.append(f"{diff} at step {x.get('step', '?')}: {x[diff]!r} vs {y[diff]!r}")
            ok = False
            break
    return len(ra), len(cols), ("identical" if ok else "DIFFERS") + (f" ({'; '.join(notes)})" if notes else ""), ok


def flatten(d: object, prefix: str = "") -> dict[str, object]:
    """Nested dicts as one dict with dotted keys (``time_breakdown_s.env_s``)."""
    if not (isinstance(d, dict) and d):
        return {prefix: d}
    return {k: v for key, val in d.items() for k, v in flatten(val, f"{prefix}.{key}" if prefix else key).items()}


def read_summary(path: Path, stage: str) -> dict[str, object]:
    """A ``summary.json``, flattened, with the case's staging directory written as ``<run>`` in its paths."""
    text = path.read_text().replace(json.dumps(stage)[1:-1], "<run>")
    return flatten(json.loads(text))


def compare_summaries(a: Path, b: Path, stage_a: str, stage_b: str) -> list[str]:
    """Differing non-timing keys of two ``summary.json`` files, as ``key: before vs after``."""
    if not (a.is_file() and b.is_file()):
        return [] if a.is_file() == b.is_file() else ["summary.json missing on one side"]
    fa, fb = read_summary(a, stage_a), read_summary(b, stage_b)
    keys = sorted(k for k in fa.keys() | fb.keys() if not is_timing_key(k))
    return [f"{k}: {fa.get(k, '<absent>')!r} vs {fb.get(k, '<absent>')!r}" for k in keys
            if fa.get(k, "<absent>") != fb.get(k, "<absent>")]


def report(cases: list[str], outs: dict[str, Path], metas: dict[tuple[str, str], dict]) -> bool:
    """Print the table (one line per metrics.csv) and the summary.json differences; whether all are identical."""
    head = f"{'case':<29} {'rows':>4} {'cols':>4} {'BEFORE s':>9} {'AFTER s':>9}  result   (s: wall/CPU)"
    print(head + "\n" + "-" * len(head))
    all_ok, notes = True, []
    for case in cases:
        mb, ma = metas["BEFORE", case], metas["AFTER", case]
        secs = " ".join(f"{m['seconds']:.0f}/{m['cpu_s']:.0f}".rjust(9) for m in (mb, ma))
        root_b, root_a = outs["BEFORE"] / case, outs["AFTER"] / case
        files = sorted({p.relative_to(root_b) for p in root_b.rglob("metrics.csv")}
                       | {p.relative_to(root_a) for p in root_a.rglob("metrics.csv")})
        if mb["rc"] or ma["rc"] or not files:
            all_ok = False
            print(f"{case:<29} {'':>4} {'':>4} {secs}  FAILED (rc {mb['rc']} / {ma['rc']}, {len(files)} metrics.csv; "
                  "see log.txt)")
            continue
        for i, rel in enumerate(files):
            rows, ncols, result, ok = compare_metrics(root_b / rel, root_a / rel)
            all_ok &= ok
            label = f"{case}/{rel.parent}"
            print(f"{label:<29} {rows:>4} {ncols:>4} {secs if i == 0 else '':>19}  {result}")
            notes += [f"{label}: {d}" for d in compare_summaries(root_b / rel.parent / "summary.json",
                                                                 root_a / rel.parent / "summary.json",
                                                                 mb["stage"], ma["stage"])]
    print("\nsummary.json (timing keys aside): " + ("identical" if not notes else "differences (not failed on):"))
    for n in notes:
        print("  " + n)
    print("\nresult: " + ("IDENTICAL" if all_ok else "DIFFERENT"))
    return all_ok


def lock_out_other_runs() -> None:
    """Hold the cache's lock for the life of this process: a second run waits (they share the cache and, by
    default, the work dir; on a small CPU they would only slow each other down)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    lock = open(CACHE / ".lock", "w")  # noqa: SIM115 (released when the process exits)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("waiting for another benchmarks/equivalence.py run to finish ...", flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
    globals()["_LOCK"] = lock


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", metavar="BEFORE_REV")
    ap.add_argument("after", metavar="AFTER_REV")
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--work", type=Path, default=CACHE / "work",
                    help="extracted trees, staging run dirs and uncached outputs (default: %(default)s)")
    ap.add_argument("--keep", action="store_true", help="keep the extracted source trees (default: removed)")
    ap.add_argument("--no-cache", action="store_true",
                    help="run AFTER_REV afresh into the work dir even if it is cached (BEFORE still uses the cache)")
    args = ap.parse_args()
    lock_out_other_runs()
    work = args.work.resolve()
    trees, stage = work / "trees", work / "stage"
    shas = {"BEFORE": resolve(args.before), "AFTER": resolve(args.after)}
    srcs: dict[str | None, Path] = {}

    def src_of(sha: str | None) -> Path:
        if sha not in srcs:
            srcs[sha] = materialise(sha, trees)
        return srcs[sha]

    data = build_data(lambda: src_of(shas["BEFORE"]))
    print(f"dataset: {data} (sha256 {sha256(data)[:12]})", flush=True)
    outs, metas = {}, {}
    for side, rev in (("BEFORE", args.before), ("AFTER", args.after)):
        sha = shas[side]
        fresh = sha is None or (side == "AFTER" and args.no_cache)
        outs[side] = work / "runs" / side.lower() if fresh else CACHE / sha
        for case in args.cases:
            meta = None if fresh else cached(outs[side] / case, data)
            if meta is None:
                src = src_of(sha)
                print(f"{side} {rev}: {case} ...", end=" ", flush=True)
                meta = run_case(case, src, data, outs[side], stage)
                print(f"{meta['seconds']:.0f} s ({meta['cpu_s']:.0f} s CPU)"
                      + (f", FAILED (rc {meta['rc']}, see {outs[side] / case / 'log.txt'})" if meta["rc"] else ""),
                      flush=True)
            metas[side, case] = meta
    if not args.keep:
        shutil.rmtree(trees, ignore_errors=True)

    print(f"\nBEFORE {args.before} ({outs['BEFORE']})\nAFTER  {args.after} ({outs['AFTER']})\n")
    sys.exit(0 if report(args.cases, outs, metas) else 1)


if __name__ == "__main__":
    main()
