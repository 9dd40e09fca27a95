"""Preemption: `PreemptionGuard` turns SIGTERM (what TPU maintenance, SLURM's `--signal` and Kubernetes send) into a
flag the training loop polls after each step; the loop then saves, waits for the write to finish and returns cleanly.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class PreemptionGuard:
    """SIGTERM -> a flag polled by the loop (`should_stop`); agreed across processes so every host saves together.

    Use as a context manager; the previous handler is put back on exit. Handlers can only be installed from the main
    thread; elsewhere the guard is inert (it never fires).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self._flag = threading.Event()
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame):
        del frame
        logging.warning("received signal %d: checkpointing after this step, then exiting", signum)
        self._flag.set()

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def should_stop(self) -> bool:
        """True on every process as soon as any process got the signal (one tiny all-gather when multi-process)."""
        local = self._flag.is_set()
        if jax.process_count() == 1:
            return local
        flags = multihost_utils.process_allgather(np.asarray([int(local)], np.int32))
        return bool(np.any(flags))
