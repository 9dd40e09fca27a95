"""Nothing lost in training: a refused resume writes nothing, a non-finite update is never applied nor saved, an
unusable latest checkpoint falls back to the newest usable one, and one run holds a workdir at a time."""

from __future__ import annotations

import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import time

import grain
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import train_fixtures as fx

from ttm_jax.data import loader as data_loader
from ttm_jax.data import prepare as prepare_lib
from ttm_jax.data import records, synthetic
from ttm_jax.runtime import checkpoint as checkpoint_lib
from ttm_jax.train import lock as lock_lib
from ttm_jax.train import loop

TOTAL = 4


def _cfg(**overrides):
    return fx.tiny_config(2, **{"train.total_steps": TOTAL, "train.checkpoint_every_steps": 2, **overrides})


def _one_device():
    return jax.devices()[:1]


@pytest.fixture(scope="module")
def modules():
    return fx.make_modules(_cfg())


@pytest.fixture(scope="module")
def reference(modules, tmp_path_factory):
    """An uninterrupted run of TOTAL steps with checkpoints at 2 and 4 (its workdir is copied by the tests)."""
    wd = str(tmp_path_factory.mktemp("reference"))
    res = loop.train(_cfg(), wd, modules=modules, devices=_one_device(), make_iterator=fx.iterator_factory())
    return wd, res


def _snapshot(path: str) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = fh.read()
    return out


def _saved_params(wd: str, step: int):
    with ocp.PyTreeCheckpointer() as ck:
        return ck.restore(os.path.join(wd, "checkpoints", str(step), "state"))["params"]


def _same(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_refused_resume_leaves_the_workdir_as_it_was(modules, reference, tmp_path):
    wd = str(tmp_path / "run")
    shutil.copytree(reference[0], wd)
    before = _snapshot(wd)
    with pytest.raises(ValueError, match=r"config\.model\.dim: checkpoint 32, now 64"):
        loop.train(_cfg(**{"model.dim": 64}), wd, modules=modules, devices=_one_device(),
                   make_iterator=fx.iterator_factory())
    assert _snapshot(wd) == before  # config.json included: the suggested `--workdir` alone still resumes


def test_nonfinite_update_is_never_applied_nor_saved(modules, reference, tmp_path):
    """Resumed at step 4 with an absurd learning rate, the first update makes the parameters overflow: it is rejected,
    the run stops naming step 4, and every checkpoint left holds finite parameters (4's are the good run's)."""
    wd = str(tmp_path / "run")
    shutil.copytree(reference[0], wd)
    c = _cfg(**{"train.total_steps": 8, "train.checkpoint_every_steps": 1, "optim.learning_rate": 1e30,
                "optim.warmup_steps": 0})
    with pytest.raises(FloatingPointError, match=r"step 5 gave a non-finite update.*last checkpoint is step 4"):
        loop.train(c, wd, modules=modules, devices=_one_device(), make_iterator=fx.iterator_factory())
    steps = checkpoint_lib.Checkpointer(wd).all_steps()
    assert steps == [2, 4]
    for s in steps:
        assert np.isfinite(float(optax.global_norm(_saved_params(wd, s))))
    _same(_saved_params(wd, 4), _saved_params(reference[0], 4))


def _truncate_largest_data_file(step_dir: str) -> None:
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs
             if os.sep + "d" + os.sep in os.path.join(r, f)]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)


def _truncate_manifest(step_dir: str) -> None:
    for r, _, fs in os.walk(os.path.join(step_dir, "state")):
        for f in fs:
            if f == "manifest.ocdbt":
                with open(os.path.join(r, f), "r+b") as fh:
                    fh.truncate(7)


def _remove_iterator_state(step_dir: str) -> None:
    shutil.rmtree(os.path.join(step_dir, "data"))


@pytest.mark.parametrize("corrupt", [_truncate_largest_data_file, _truncate_manifest, _remove_iterator_state],
                         ids=["truncated-data", "truncated-manifest", "no-iterator-state"])
def test_unusable_latest_checkpoint_falls_back_to_the_newest_usable(corrupt, modules, reference, tmp_path, capsys):
    wd = str(tmp_path / "run")
    shutil.copytree(reference[0], wd)
    corrupt(os.path.join(wd, "checkpoints", "4"))
    res = loop.train(_cfg(), wd, modules=modules, devices=_one_device(), make_iterator=fx.iterator_factory())
    out = capsys.readouterr().out
    assert "checkpoint step 4 is unusable" in out and "resuming from step 2" in out
    assert res.start_step == 2 and res.final_step == TOTAL
    _same(res.state.params, reference[1].state.params)  # the resumed steps 3-4 equal the uninterrupted ones
    assert os.path.isdir(os.path.join(wd, checkpoint_lib.UNUSABLE_DIR, "4"))
    assert checkpoint_lib.Checkpointer(wd).all_steps() == [2, 4]


def test_no_usable_checkpoint_is_a_clear_error(modules, reference, tmp_path):
    wd = str(tmp_path / "run")
    shutil.copytree(reference[0], wd)
    for s in (2, 4):
        _remove_iterator_state(os.path.join(wd, "checkpoints", str(s)))
    before = sorted(_snapshot(wd))
    with pytest.raises(checkpoint_lib.NoUsableCheckpoint, match=r"no checkpoint restores \(step 4: .*; step 2: "):
        loop.train(_cfg(), wd, modules=modules, devices=_one_device(), make_iterator=fx.iterator_factory())
    assert sorted(_snapshot(wd)) == before  # nothing moved, no lock left


def _write_lock(wd: str, host: str, pid: int) -> None:
    os.makedirs(wd, exist_ok=True)
    with open(os.path.join(wd, lock_lib.LOCK_FILE), "w") as f:
        f.write(f'{{"host": "{host}", "pid": {pid}, "started": "2026-11-29T00:00:00+00:00", "command": "x"}}')


def test_a_second_run_is_refused_while_the_first_holds_the_workdir(modules, tmp_path):
    wd = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _write_lock(wd, socket.gethostname(), holder.pid)
        before = _snapshot(wd)
        with pytest.raises(lock_lib.WorkdirLocked, match=rf"another run holds this workdir: pid {holder.pid} on host "
                                                         rf"{socket.gethostname()}"):
            loop.train(_cfg(), wd, modules=modules, devices=_one_device(), make_iterator=fx.iterator_factory())
        assert _snapshot(wd) == before
    finally:
        holder.kill()
        holder.wait()
    _write_lock(wd, "some-other-host", 1234)
    with pytest.raises(lock_lib.WorkdirLocked, match=r"another host.*remove .*lock\.json"):
        loop.train(_cfg(), wd, modules=modules, devices=_one_device(), make_iterator=fx.iterator_factory())


def test_a_stale_lock_on_this_host_is_taken_over(modules, tmp_path, capsys):
    wd = str(tmp_path / "run")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(wd, socket.gethostname(), dead.pid)
    res = loop.train(_cfg(**{"train.total_steps": 1}), wd, modules=modules, devices=_one_device(),
                     make_iterator=fx.iterator_factory())
    assert res.final_step == 1
    assert f"stale lock of pid {dead.pid}" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(wd, lock_lib.LOCK_FILE))  # released at the end


def test_a_change_that_reshapes_the_optimizer_state_is_refused_before_anything_is_written(modules, reference,
                                                                                          tmp_path):
    """Switching gradient clipping off changes the optimizer state's structure though no state field names it: the
    saved layout is compared with this run's, and the resume is refused with the workdir untouched."""
    wd = str(tmp_path / "run")
    shutil.copytree(reference[0], wd)
    before = _snapshot(wd)
    with pytest.raises(ValueError, match=r"does not fit checkpoint step 4: opt_state/.*only in the checkpoint"):
        loop.train(_cfg(**{"optim.grad_clip_norm": 0.0, "train.total_steps": 6}), wd, modules=modules,
                   devices=_one_device(), make_iterator=fx.iterator_factory())
    assert _snapshot(wd) == before


def test_a_checkpoint_the_disk_refuses_stops_in_one_line_and_the_next_run_resumes_exactly(modules, reference, tmp_path):
    """The storage refuses the step-4 checkpoint (a real EFBIG: RLIMIT_FSIZE lowered after step 2 committed): the run
    stops with one `CheckpointWriteError` naming the step, the cause and step 2; step 2 is untouched; the next run
    removes the half-written folder and ends exactly where the uninterrupted run did."""
    ref_wd, ref = reference
    wd = str(tmp_path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def disk_full_after_step_2(count):
        if count == 3:  # steps 1-2 done; wait for step 2's (async) commit, then no file may grow past 64 KiB
            for _ in range(2400):
                if os.path.isdir(os.path.join(wd, "checkpoints", "2")):
                    break
                time.sleep(0.05)
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, hard))

    try:
        with pytest.raises(checkpoint_lib.CheckpointWriteError) as e:
            loop.train(_cfg(), wd, modules=modules, devices=_one_device(),
                       make_iterator=fx.iterator_factory("ids.jsonl", on_batch=disk_full_after_step_2))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = str(e.value)
    assert "checkpoint step 4 could not be written (file too large" in message, message
    assert "newest complete checkpoint, step 2, is untouched" in message and "\n" not in message
    assert checkpoint_lib.Checkpointer(wd).all_steps() == [2]
    assert "4" not in os.listdir(os.path.join(wd, "checkpoints"))  # at most a half-written temporary folder
    _same(_saved_params(wd, 2), _saved_params(ref_wd, 2))
    again = loop.train(_cfg(), wd, modules=modules, devices=_one_device(), make_iterator=fx.iterator_factory())
    assert (again.start_step, again.final_step) == (2, TOTAL)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2", "4"]  # the temporary folder is gone
    _same(again.state.params, ref.state.params)
    _same(_saved_params(wd, 4), _saved_params(ref_wd, 4))


class _CallAfter(grain.DatasetIterator):
    """The real loader's iterator, calling `hook(count)` after each batch it hands out (state passes through)."""

    def __init__(self, parent, hook):
        super().__init__(parent)
        self._count, self._hook = 0, hook

    def __next__(self):
        batch = next(self._parent)
        self._count += 1
        self._hook(self._count)
        return batch

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A real `prepare` folder for `_cfg()`'s clips: 8 synthetic videos, one shard each."""
    root = tmp_path_factory.mktemp("rot")
    synthetic.generate(str(root / "sav"), 8, 0, frames=24, height=32, width=32)
    prepare_lib.prepare(str(root / "sav"), str(root / "sav" / synthetic.CAPTIONS_FILE), str(root / "prep"), _cfg(),
                        chunk_size=1)
    return str(root / "prep")


def test_a_shard_that_rots_mid_run_stops_in_one_line_and_the_restored_run_resumes_exactly(modules, prepared,
                                                                                          tmp_path):
    """Every shard is cut short after the third batch (read in the main thread: no prefetch, so the fourth batch
    reads after the cut, from shards opened before it or not yet opened): the run stops with
    `ShardUnreadable` naming a shard, the record and the checkpoint the next run resumes from; with the shards put
    back, that run ends exactly where an undisturbed run on the same data does. Chosen over skipping the record:
    a skip would hand the resumed run other data than its checkpointed iterator promises."""
    folder = str(tmp_path / "prep")
    shutil.copytree(prepared, folder)
    cfg = _cfg(**{"data.prepared_path": folder, "data.read_threads": 0, "train.batch_size": 2,
                  "train.total_steps": 8})
    shards = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".array_record"))
    whole = {p: open(p, "rb").read() for p in shards}

    def rot_after_3(count):
        if count == 3:
            for p in shards:
                with open(p, "r+b") as f:
                    f.truncate(len(whole[p]) // 3)

    def make(config, **kw):
        return _CallAfter(data_loader.make_train_iterator(config, **kw), rot_after_3)

    wd = str(tmp_path / "run")
    with pytest.raises(records.ShardUnreadable) as e:
        loop.train(cfg, wd, modules=modules, devices=_one_device(), make_iterator=make)
    message = str(e.value)
    assert re.search(r"prep/records-0000\d\.array_record: record 0 of the shard .* cannot be read", message), message
    last = checkpoint_lib.Checkpointer(wd).latest_step()
    assert last in (2, 4, 6) and f"resumes from checkpoint step {last} on the very next example" in message
    for p, data in whole.items():  # the user restores the shards
        with open(p, "wb") as f:
            f.write(data)
    again = loop.train(cfg, wd, modules=modules, devices=_one_device())
    assert (again.start_step, again.final_step) == (last, 8)
    straight = loop.train(cfg, str(tmp_path / "straight"), modules=modules, devices=_one_device())
    _same(again.state.params, straight.state.params)
