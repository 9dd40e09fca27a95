"""Orbax checkpoints of a run: the train state, the Grain iterator position and the config, in one step folder.

Layout: `<workdir>/checkpoints/<step>/{state, data, config}`:
  state   the `TrainState` (params, AdamW moments, EMA, step), saved asynchronously (training continues while the
          arrays are written) and restored straight into the shardings of the *current* mesh, whatever mesh wrote it;
  data    the Grain iterator state (grain's own Orbax handler, one JSON per process), so a resumed run continues on the
          very next example;
  config  the run's config as JSON: a run restarts from the workdir alone (`load_config`).
Sampling and export read only the parameter subtree (`restore_params`: the EMA params, or the raw ones) with an Orbax
partial restore, never the AdamW moments: a third of the bytes of a full restore when the run keeps EMA.
Retention: the last `train.keep_checkpoints` plus every step that is a multiple of `train.keep_period`.

A SIGKILL loses only the steps since the last checkpoint: Orbax commits a step folder atomically (temporary name, then
rename), so a half-written checkpoint is never picked up (SIGTERM: `ttm_jax.train.preemption`). A save that the storage
refuses (disk full, file size limit, read-only or unwritable folder, quota) stops the run with `CheckpointWriteError`,
one line naming the step, the cause and the newest complete checkpoint, which is untouched; the next run removes the
half-written temporary folder and resumes from that checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging as std_logging
import os
import sys
from collections.abc import Iterator
from typing import Any, NamedTuple

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from ttm_jax import cli
from ttm_jax import config as config_lib

CHECKPOINT_DIR = "checkpoints"
UNUSABLE_DIR = "checkpoints_unusable"  # steps that failed to restore, moved aside by `restore_newest_usable`
CONFIG_FILE = "config.json"  # the run's config as it started, beside the checkpoints


def checkpoint_dir(workdir: str | epath.PathLike) -> epath.Path:
    return epath.Path(workdir) / CHECKPOINT_DIR


class NoUsableCheckpoint(cli.UserError, RuntimeError):
    """Every checkpoint of a workdir fails to restore; the message lists each step and what is wrong with it."""


class CheckpointWriteError(cli.UserError, RuntimeError):
    """The storage refused a checkpoint (no space, a file size limit, read-only, no permission, quota); the message
    names the step, the cause and the newest complete checkpoint the next run resumes from."""

    mid_run = True  # raised after the run started: its workdir and log stay (`main` undoes nothing)


_REFUSED = {"write": False}  # a write was refused in this process (the excepthook below then drops its aftermath)


class _StorageFailureLogs(std_logging.Filter):
    """Keeps Orbax's and asyncio's tracebacks of a refused write off the console and the log (the run says it once,
    in `CheckpointWriteError`'s line); every other record passes."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if cli.storage_failure(exc) is None and cli.storage_failure(record.getMessage()) is None:
            return True
        _REFUSED["write"] = True  # seen here first: the background thread logs before the run finds out
        return False


_FILTER = _StorageFailureLogs()


def _after_refusal_hook(previous: Any) -> Any:
    """`sys.excepthook` that drops the "Event loop is closed" errors tensorstore's callbacks raise once a refused
    Orbax write closed its event loop (one per pending write, printed from native threads); all else goes on."""

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if _REFUSED["write"] and isinstance(value, RuntimeError) and "Event loop is closed" in str(value):
            return
        previous(kind, value, tb)
    hook.ttm_after_refusal = True
    return hook


def _after_refusal_unraisable(previous: Any) -> Any:
    """The same for `sys.unraisablehook` (where the callbacks' errors land when no thread owns them)."""

    def hook(unraisable: Any) -> None:
        value = unraisable.exc_value
        if _REFUSED["write"] and isinstance(value, RuntimeError) and "Event loop is closed" in str(value):
            return
        previous(unraisable)
    hook.ttm_after_refusal = True
    return hook


def _quiet_storage_failures() -> None:
    if not getattr(sys.excepthook, "ttm_after_refusal", False):
        sys.excepthook = _after_refusal_hook(sys.excepthook)
    if not getattr(sys.unraisablehook, "ttm_after_refusal", False):
        sys.unraisablehook = _after_refusal_unraisable(sys.unraisablehook)
    handler = logging.get_absl_handler()
    for h in (handler, handler.python_handler):
        if _FILTER not in h.filters:
            h.addFilter(_FILTER)
    for name in ("asyncio", "absl"):
        if _FILTER not in std_logging.getLogger(name).filters:
            std_logging.getLogger(name).addFilter(_FILTER)


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
            cleanup_tmp_directories=True,  # a save the storage refused left its temporary folder: gone at restart
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "config"))
        self._saving: int | None = None  # the step of the save in flight
        self._failed: CheckpointWriteError | None = None
        _quiet_storage_failures()

    @classmethod
    def from_config(cls, workdir: str | epath.PathLike, config: ml_collections.ConfigDict) -> Checkpointer:
        t = config.train
        return cls(workdir, keep=int(t.keep_checkpoints), keep_period=int(t.keep_period),
                   async_save=bool(t.async_checkpointing))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: Any | None,
             config: ml_collections.ConfigDict, *, force: bool = True) -> bool:
        """Start saving `step` (async: returns once the arrays are copied off the devices). Raises
        `CheckpointWriteError` when the storage refused this save or the one before it (async: found here)."""
        items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(json.loads(config.to_json()))}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.wait()  # the save before this one committed (async), or its refusal raised naming its step
        with self._refused(step):
            self._saving = step
            return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def _committed_steps(self) -> list[int]:
        """The step folders on disk that Orbax finished (the manager's own list also holds a save that failed)."""
        if not self.directory.exists():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())

    @contextlib.contextmanager
    def _refused(self, step: int | None) -> Iterator[None]:
        """Around a save or a wait: a refusal already raised is raised again; a storage refusal inside becomes
        `CheckpointWriteError` naming the step (the save in flight, else `step`) and the newest complete one."""
        if self._failed is not None:
            raise self._failed
        try:
            yield
        except Exception as error:
            reason = cli.storage_failure(error)
            if reason is None:
                raise
            failed = self._saving if self._saving is not None else step
            good = [s for s in self._committed_steps() if failed is None or s < failed]
            last = (f"the newest complete checkpoint, step {good[-1]}, is untouched and the next run resumes "
                    f"from it" if good else "there is no complete checkpoint, so the next run starts at step 0")
            _REFUSED["write"] = True
            logging.info("checkpoint write refused: %s", error)
            self._failed = CheckpointWriteError(
                f"{self.directory}: checkpoint step {failed} could not be written ({reason}); training stopped; "
                f"{last}. Free space (or make the folder writable), then run the same command again")
            raise self._failed from None

    def restore(self, step: int, abstract_state: Any,
                data_iterator: Any | None = None) -> Any:
        """The state of `step` resharded onto `abstract_state`'s shardings; `data_iterator` is moved in place to the
        checkpointed position."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def restore_newest_usable(self, abstract_state: Any, data_iterator: Any | None = None
                              ) -> tuple[Any, int | None, list[tuple[int, str]]]:
        """The newest step that restores completely (state, iterator, config), newest first.

        Returns `(state, step, bad)` where `bad` lists the newer steps that failed, with what was wrong; those are
        moved to `<workdir>/checkpoints_unusable/<step>` (kept for inspection, out of Orbax's way: the run will save
        those step numbers again). `(None, None, [])` when there is no checkpoint at all. Raises
        `NoUsableCheckpoint` (and moves nothing) when every step fails.
        """
        bad: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                self.restore_config(step)
                state = self.restore(step, abstract_state, data_iterator)
            except Exception as e:  # noqa: BLE001 - any failure to read a step makes it unusable; reported below
                reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
                logging.warning("%s: step %d is unusable (%s)", self.directory, step, reason)
                bad.append((step, reason))
                continue
            for b, reason in bad:
                self._set_aside(b, reason)
            if bad:
                self.manager.reload()
            return state, step, bad
        if bad:
            listing = "; ".join(f"step {b}: {r}" for b, r in bad)
            raise NoUsableCheckpoint(f"{self.directory}: no checkpoint restores ({listing}). Move the folder aside to "
                                     f"start again from step 0, or restore it from a backup")
        return None, None, []

    def _set_aside(self, step: int, reason: str) -> None:
        if jax.process_index() != 0:
            return
        dest = self.directory.parent / UNUSABLE_DIR
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / str(step)
        n = 1
        while target.exists():
            target, n = dest / f"{step}.{n}", n + 1
        # the reason first: on gs:// it is what makes `dest` exist, which epath's rename requires
        (dest / f"{target.name}.reason.txt").write_text(reason + "\n")
        (self.directory / str(step)).rename(target)
        logging.warning("moved unusable step %d to %s", step, target)

    def layout_mismatch(self, step: int, abstract_state: Any, limit: int = 5) -> list[str]:
        """How the saved state of `step` differs in structure or shapes from `abstract_state` (empty: it fits), read
        from the checkpoint's metadata only. A config change the named state fields miss (e.g. gradient clipping
        switched on or off changes the optimizer state) shows up here before anything is restored."""
        saved = ocp.PyTreeCheckpointHandler().metadata(self.directory / str(step) / "state").tree
        is_meta = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")  # noqa: E731
        have = {_keystr(p): tuple(m.shape) for p, m in jax.tree.flatten_with_path(saved, is_leaf=is_meta)[0]
                if m is not None}
        want = {_keystr(p): tuple(a.shape) for p, a in jax.tree.flatten_with_path(abstract_state)[0]}
        out = [f"{k}: only in the checkpoint" for k in sorted(set(have) - set(want))]
        out += [f"{k}: only in this run" for k in sorted(set(want) - set(have))]
        out += [f"{k}: checkpoint {have[k]}, this run {want[k]}" for k in sorted(set(have) & set(want))
                if have[k] != want[k]]
        return out[:limit]

    def restore_config(self, step: int | None = None) -> ml_collections.ConfigDict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to read a config from; train first")
        restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return config_lib.upgrade(ml_collections.ConfigDict(_tuples(restored["config"])))

    def wait(self) -> None:
        """Until the save in flight is committed; `CheckpointWriteError` when the storage refused it."""
        with self._refused(None):
            self.manager.wait_until_finished()
        self._saving = None

    def close(self) -> None:
        """Wait for the save in flight and close; after a refused save (already raised) just close."""
        try:
            if self._failed is None:
                self.wait()
        finally:
            try:
                self.manager.close()
            except Exception as e:  # noqa: BLE001 - the refusal was raised once; closing must not raise it again
                if cli.storage_failure(e) is None:
                    raise


def _tuples(x: Any) -> Any:
    """JSON lists back to the tuples the config uses (it never holds lists: shapes, patch sizes, rules)."""
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x


def restore_tree(path: str | epath.PathLike, target: Any, *, field: str, fix: str) -> Any:
    """A standalone Orbax checkpoint of a pytree (converted params, a frozen encoder's params) restored onto `target`
    (`jax.ShapeDtypeStruct`s, with shardings where they should land). The one reader of such checkpoints; a failure
    raises ValueError naming `field` (the config field or flag that gave `path`) and `fix`."""
    path = os.fspath(path)
    with ocp.StandardCheckpointer() as ckptr:
        try:
            return ckptr.restore(path if "://" in path else os.path.abspath(path), target)  # gs:// as it is
        except Exception as e:  # noqa: BLE001 - re-raised naming the field and the fix
            raise ValueError(f"{field}: could not restore {str(path)!r} ({e}); {fix}") from e


class RestoredParams(NamedTuple):
    """What `restore_params` read: the run's config, the (unboxed) params, the step and which subtree they are."""

    config: ml_collections.ConfigDict
    params: Any
    step: int
    source: str  # "ema_params" or "params"


def _keystr(path: tuple) -> str:
    """`a/b/0/count` for a key path of dict keys, sequence indices or named-tuple attributes (Orbax's metadata trees
    hold named tuples as dicts)."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _params_target(meta: Any, shardings: Any, where: str) -> Any:
    """`jax.ShapeDtypeStruct`s of the saved subtree `meta` (Orbax `ArrayMetadata` leaves) on `shardings`."""
    is_meta = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")  # noqa: E731
    flat, treedef = jax.tree.flatten_with_path(meta, is_leaf=is_meta)
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        leaf_sh = [shardings] * len(flat)
    else:
        want = {_keystr(p): sh for p, sh in jax.tree.flatten_with_path(shardings)[0]}
        have = [_keystr(p) for p, _ in flat]
        missing, extra = sorted(set(have) - set(want)), sorted(set(want) - set(have))
        if missing or extra:
            raise ValueError(f"{where}: the `shardings` tree does not match the saved params (in the checkpoint only: "
                             f"{missing[:5]}, in `shardings` only: {extra[:5]}); build the shardings from the model "
                             f"of the config saved in the checkpoint (restore_params(...).config), or pass one "
                             f"jax.sharding.Sharding for every leaf")
        leaf_sh = [want[k] for k in have]
    leaves = [jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sh)
              for (_, m), sh in zip(flat, leaf_sh, strict=True)]
    return jax.tree.unflatten(treedef, leaves)


def restore_params(workdir: str | epath.PathLike, step: int | None = None, *, ema: bool = True,
                   shardings: Any = None) -> RestoredParams:
    """Only the parameters of a training checkpoint (latest when `step` is None), for sampling and export.

    Reads the `ema_params` subtree when `ema` and the run kept an EMA (`optim.ema_decay > 0`), else `params`, with an
    Orbax partial restore: the AdamW moments and the other subtree are never read from disk (a full-state restore
    reads ~4x the parameter bytes with EMA, ~3x without). Shapes and dtypes come from the checkpoint's metadata, so no
    model is built; whatever mesh wrote the checkpoint, the arrays land on `shardings`: None (the first local device),
    one `jax.sharding.Sharding` for every leaf, or a pytree of shardings shaped like the params (e.g.
    `state_shardings(...).params` of the saved config's model). The params come back unboxed, as nested dicts
    (Flax's layout, `[layers, ...]` leading axis for scanned blocks).
    """
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        steps = ckpt.all_steps()
        step = ckpt.latest_step() if step is None else int(step)
        if step is None or step not in steps:
            raise FileNotFoundError(f"{ckpt.directory}: no checkpoint at step {step} (have {sorted(steps)}); train "
                                    f"there first (python -m ttm_jax.main --workdir={workdir}) or pick a saved step")
        config = ckpt.restore_config(step)
    finally:
        ckpt.close()
    path = ckpt.directory / str(step) / "state"
    handler = ocp.PyTreeCheckpointHandler()
    try:
        saved = handler.metadata(path).tree
        if "params" not in saved:
            raise ValueError(f"{path}: not a TrainState checkpoint (items {sorted(saved)}); point `workdir` to a "
                             f"ttm_jax training workdir")
        source = "ema_params" if ema and saved.get("ema_params") is not None else "params"
        item = {source: _params_target(saved[source], shardings, f"{path} [{source}]")}
        restored = handler.restore(path, args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
    finally:
        handler.close()
    if ema and source == "params":
        logging.info("%s: the run kept no EMA (optim.ema_decay=0); using the raw params", path)
    return RestoredParams(config, restored[source], int(step), source)


def load_config(workdir: str | epath.PathLike) -> ml_collections.ConfigDict:
    """The config a run saved, so that it restarts from its workdir alone: the newest readable checkpoint's, else
    `<workdir>/config.json` (written when the run started, before its first checkpoint). The one reader of a saved
    config, with `restore_config`: both complete a config saved by an older version (`config.upgrade`).
    Raises FileNotFoundError when the workdir holds neither."""
    if checkpoint_dir(workdir).exists():
        ckpt = Checkpointer(workdir, async_save=False)
        try:
            for step in sorted(ckpt.all_steps(), reverse=True):  # an unreadable step falls back to the one before
                try:
                    return ckpt.restore_config(step)
                except Exception as e:  # noqa: BLE001 - reported; training moves the step aside when it restores
                    logging.warning("%s: step %d: saved config unreadable (%s)", workdir, step, e)
        finally:
            ckpt.close()
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{workdir}: no checkpoint and no {CONFIG_FILE}, so no saved config; give --config")
    return config_lib.upgrade(ml_collections.ConfigDict(_tuples(json.loads(path.read_text()))))
