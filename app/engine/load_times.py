"""How long each model took to load and warm up the last time on this machine: what a start still
has to go, reported while it loads (``GET /health/ready``'s ``estimated_remaining_s``, the log).
Kept as JSON beside the other things a first start computes once (ONNX exports, batch sizes)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("equiserve.engine")


class LoadTimes:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.previous = self._read()  # name -> seconds, as the last start measured them
        self.current: str | None = None  # the model loading now
        self._since = 0.0

    def start(self, name: str) -> None:
        self.current, self._since = name, time.perf_counter()

    def done(self, name: str, seconds: float) -> None:
        """Record a model's time (for the next start), whole file or nothing."""
        self.current = None
        entries = {**self._read(), name: round(seconds, 2)}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(json.dumps(entries, indent=1, sort_keys=True))
            partial.replace(self.path)
        except OSError as exc:  # a read-only cache: no estimate next time
            log.debug("cannot keep load times in %s: %s", self.path, exc)

    def remaining_s(self, pending: Sequence[str]) -> float | None:
        """Seconds the pending models (the one loading now included) took last time, less what the
        current one has already run; None while any of them has no time yet."""
        if any(name not in self.previous for name in pending):
            return None
        left = sum(self.previous[name] for name in pending)
        if self.current in pending:
            left -= min(self.previous[self.current], time.perf_counter() - self._since)
        return max(0.0, left)

    def _read(self) -> dict[str, float]:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(entries, dict):
            return {}
        return {str(k): float(v) for k, v in entries.items() if isinstance(v, int | float)}
