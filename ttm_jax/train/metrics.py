"""Training progress: one console line per log interval (step, loss, steps/s, ETA) and TensorBoard scalars.

Only process 0 writes (TensorBoard event files under `<workdir>/tensorboard`); every process computes the same
(replicated) metrics.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging
from etils import epath

with warnings.catch_warnings():  # tensorboardX imports google-cloud-storage (gs:// event files) when installed, whose
    warnings.simplefilter("ignore", FutureWarning)  # grpcio deprecation notices would print on every run
    from tensorboardX import SummaryWriter


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


class MetricsWriter:
    """Averages metrics over a log interval, prints progress, writes TensorBoard scalars."""

    def __init__(self, workdir: str | epath.PathLike, total_steps: int, *, start_step: int = 0,
                 tensorboard: bool = True, console: bool = True):
        self.total_steps = total_steps
        self.console = console
        self._writer = None
        if tensorboard and jax.process_index() == 0:
            path = epath.Path(workdir) / "tensorboard"
            path.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(str(path))
        self._sums: dict[str, float] = {}
        self._count = 0
        self._last_step = start_step
        self._last_time = time.perf_counter()
        self.history: list[tuple[int, dict[str, float]]] = []

    def accumulate(self, metrics: Mapping[str, float]) -> None:
        for k, v in metrics.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v)
        self._count += 1

    def write(self, step: int, extra: Mapping[str, float] | None = None) -> dict[str, float]:
        """Flush the averages at `step` (number of optimizer steps done); returns them."""
        now = time.perf_counter()
        steps = step - self._last_step
        rate = steps / max(now - self._last_time, 1e-9)
        avg = {k: v / max(self._count, 1) for k, v in self._sums.items()}
        avg["steps_per_sec"] = rate
        if extra:
            avg.update(extra)
        self.history.append((step, avg))
        eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
        if jax.process_index() == 0:
            loss = avg.get("loss", float("nan"))
            line = (f"step {step}/{self.total_steps}  loss {loss:.5f}  {rate:.2f} steps/s  "
                    f"ETA {_fmt_duration(eta) if np.isfinite(eta) else '?'}")
            logging.info(line)
            if self.console:
                print(line, flush=True)
            if self._writer is not None:
                for k, v in avg.items():
                    self._writer.add_scalar(f"train/{k}", v, step)
                self._writer.flush()
        self._sums, self._count = {}, 0
        self._last_step, self._last_time = step, now
        return avg

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
