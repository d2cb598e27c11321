"""Progress bar with ETA and key metrics for long commands (tqdm on stderr)."""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm


class Progress:
    """A thin tqdm wrapper: ``update(n, **metrics)`` advances and shows the metrics.

    Disabled with ``enabled=False`` or the environment variable ``DIFFRL_PROGRESS=0``.
    """

    def __init__(self, total: int, initial: int = 0, desc: str = "", unit: str = "step",
                 enabled: bool = True) -> None:
        enabled = enabled and os.environ.get("DIFFRL_PROGRESS", "1") != "0"
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                         mininterval=1.0, smoothing=0.05, disable=not enabled, file=sys.stderr)
        self._postfix: dict[str, Any] = {}

    def update(self, n: int = 1, **metrics: Any) -> None:
        if metrics:
            self._postfix.update({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in metrics.items()})
            self._bar.set_postfix(self._postfix, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()
