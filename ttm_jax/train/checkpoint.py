"""Orbax checkpoints of a run: the train state, the Grain iterator position and the config, in one step folder.

Layout: `<workdir>/checkpoints/<step>/{state, data, config}`:
  state   the `TrainState` (params, AdamW moments, EMA, step), saved asynchronously (training continues while the
          arrays are written) and restored straight into the shardings of the *current* mesh, whatever mesh wrote it;
  data    the Grain iterator state (grain's own Orbax handler, one JSON per process), so a resumed run continues on the
          very next example;
  config  the run's config as JSON: a run restarts from the workdir alone (`load_config`).
Retention: the last `train.keep_checkpoints` plus every step that is a multiple of `train.keep_period`.

Preemption: `PreemptionGuard` turns SIGTERM (what TPU maintenance, SLURM's `--signal` and Kubernetes send) into a
flag the loop polls after each step; it then saves, waits for the write to finish and returns cleanly. A SIGKILL
loses only the steps since the last checkpoint: Orbax commits a step folder atomically (temporary name, then rename),
so a half-written checkpoint is never picked up.
"""

from __future__ import annotations

import json
import signal
import threading
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from ttm_jax.train import state as state_lib

CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(workdir: str | epath.PathLike) -> epath.Path:
    return epath.Path(workdir) / CHECKPOINT_DIR


class Checkpointer:
    """An async `ocp.CheckpointManager` over `<workdir>/checkpoints` with items state, data and config."""

    def __init__(self, workdir: str | epath.PathLike, *, keep: int = 3, keep_period: int | None = None,
                 async_save: bool = True):
        self.directory = checkpoint_dir(workdir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep and keep > 0 else None,
            keep_period=keep_period if keep_period and keep_period > 0 else None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "config"))

    @classmethod
    def from_config(cls, workdir: str | epath.PathLike, config: ml_collections.ConfigDict) -> Checkpointer:
        t = config.train
        return cls(workdir, keep=int(t.keep_checkpoints), keep_period=int(t.keep_period),
                   async_save=bool(t.get("async_checkpointing", True)))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: state_lib.TrainState, data_iterator: Any | None,
             config: ml_collections.ConfigDict, *, force: bool = True) -> bool:
        """Start saving `step` (async: returns once the arrays are copied off the devices)."""
        items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(json.loads(config.to_json()))}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: state_lib.TrainState,
                data_iterator: Any | None = None) -> state_lib.TrainState:
        """The state of `step` resharded onto `abstract_state`'s shardings; `data_iterator` is moved in place to the
        checkpointed position."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def restore_config(self, step: int | None = None) -> ml_collections.ConfigDict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to read a config from; train first")
        restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return ml_collections.ConfigDict(_tuples(restored["config"]))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _tuples(x: Any) -> Any:
    """JSON lists back to the tuples the config uses (it never holds lists: shapes, patch sizes, rules)."""
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x


def load_config(workdir: str | epath.PathLike) -> ml_collections.ConfigDict:
    """The config saved with the latest checkpoint of `workdir` (a run restarts from the workdir alone)."""
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        return ckpt.restore_config()
    finally:
        ckpt.close()


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

    def trigger(self) -> None:
        self._flag.set()

    def should_stop(self) -> bool:
        """True on every process as soon as any process got the signal (one tiny all-gather when multi-process)."""
        local = self._flag.is_set()
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray([int(local)], np.int32))
        return bool(np.any(flags))
