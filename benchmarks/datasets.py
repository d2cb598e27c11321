"""Build the datasets that the benchmark specs read (``benchmarks/*.yaml``): diffrl's own D4RL-style quick
datasets, written to ``benchmarks/out/data/<env id>-<kind>-quick.hdf5`` by ``diffrl data collect --preset quick``
(its SAC experts are kept in ``benchmarks/out/experts/`` and reused). A dataset that exists is left as it is.

    python benchmarks/datasets.py                                   # every dataset the specs use
    python benchmarks/datasets.py --envs Hopper-v5 --kinds medium   # some of them
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from diffrl.pipelines import data_collect

OUT = Path(__file__).parent / "out"
ENVS = ("Hopper-v5", "Walker2d-v5", "HalfCheetah-v5")
KINDS = ("medium", "medium-replay")


def dataset(env_id: str, kind: str) -> Path:
    """The quick ``kind`` dataset of ``env_id``, built if missing."""
    path = OUT / "data" / f"{env_id}-{kind}-quick.hdf5"  # specs name it from their env field
    if not path.exists():
        data_collect.run(data_collect.CollectConfig(env=env_id, kind=kind, preset="quick", out=str(path),
                                                    experts_dir=OUT / "experts", progress=False))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--envs", nargs="+", default=list(ENVS))
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    args = ap.parse_args()
    os.environ.setdefault("DIFFRL_PROGRESS", "0")
    for env_id in args.envs:
        for kind in args.kinds:
            print(dataset(env_id, kind), flush=True)


if __name__ == "__main__":
    main()
