"""Checkpoints: preemption (SIGTERM, SIGKILL) and resume give the uninterrupted run exactly, on the same examples;
a checkpoint restores onto another mesh; retention; the config travels with the checkpoint; NaN stops keeping the
last good checkpoint."""

import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import train_fixtures as fx
from jax.sharding import PartitionSpec as P

from ttm_jax.assembly import params as params_lib
from ttm_jax.runtime import checkpoint as checkpoint_lib
from ttm_jax.runtime import mesh as mesh_lib
from ttm_jax.runtime import sharding as sharding_lib
from ttm_jax.train import loop
from ttm_jax.train import state as state_lib

TOTAL = 5


def _cfg(**kw):
    return fx.tiny_config(2, **{"train.total_steps": TOTAL, **kw})


@pytest.fixture(scope="module")
def modules():
    return fx.make_modules(_cfg())


def _one_device():
    return jax.devices()[:1]


@pytest.fixture(scope="module")
def reference(modules, tmp_path_factory):
    """The uninterrupted TOTAL-step run on one device."""
    wd = str(tmp_path_factory.mktemp("reference"))
    res = loop.train(_cfg(), wd, modules=modules, make_iterator=fx.iterator_factory("ids.jsonl"),
                     devices=_one_device())
    assert res.final_step == TOTAL and not res.preempted
    return res, fx.read_records(os.path.join(wd, "ids.jsonl"))


def _assert_same_params(a, b):
    ha, hb = jax.device_get(a), jax.device_get(b)
    jax.tree.map(np.testing.assert_array_equal, ha, hb)


def test_sigterm_saves_exits_cleanly_and_resume_matches_uninterrupted(modules, reference, tmp_path, capsys):
    ref, ref_ids = reference
    wd = str(tmp_path)

    def term_at_second_batch(count):
        if count == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    first = loop.train(_cfg(), wd, modules=modules, devices=_one_device(),
                       make_iterator=fx.iterator_factory("ids.jsonl", on_batch=term_at_second_batch))
    assert first.preempted and first.final_step == 2
    assert checkpoint_lib.Checkpointer(wd).all_steps() == [2]
    assert signal.getsignal(signal.SIGTERM) is not None  # the guard put the previous handler back
    capsys.readouterr()
    second = loop.train(_cfg(), wd, modules=modules, devices=_one_device(),
                        make_iterator=fx.iterator_factory("ids.jsonl"))
    assert "resuming from step 2" in capsys.readouterr().out
    assert second.start_step == 2 and second.final_step == TOTAL
    _assert_same_params(second.state.params, ref.state.params)
    _assert_same_params(second.state.opt_state, ref.state.opt_state)
    assert fx.read_records(os.path.join(wd, "ids.jsonl")) == ref_ids  # 2 + 3 batches, the reference's 5


_KILLED = textwrap.dedent("""
    import os, signal, sys, time
    sys.path[:0] = [{repo!r}, {tests!r}]
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    import jax
    import train_fixtures as fx
    from ttm_jax.train import loop
    wd = sys.argv[1]

    def kill_after_checkpoint(count):
        if count == 4:  # steps 1-3 done; step 2 was checkpointed (async): wait for its commit, then die
            deadline = time.time() + 120
            while not os.path.isdir(os.path.join(wd, "checkpoints", "2")) and time.time() < deadline:
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)

    c = fx.tiny_config(2, **{{"train.total_steps": {total}, "train.checkpoint_every_steps": 2}})
    loop.train(c, wd, modules=fx.make_modules(c), devices=jax.devices()[:1],
               make_iterator=fx.iterator_factory("ids.jsonl", on_batch=kill_after_checkpoint))
""")


def test_sigkill_after_checkpoint_resumes_to_the_uninterrupted_run(modules, reference, tmp_path):
    ref, ref_ids = reference
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "killed.py"
    script.write_text(_KILLED.format(repo=repo, tests=os.path.join(repo, "tests"), total=TOTAL))
    wd = tmp_path / "run"
    # the same XLA environment as this process (8 CPU devices, one used): bitwise-equal numerics
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(script), str(wd)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-4000:]
    killed_ids = fx.read_records(str(wd / "ids.jsonl"))
    assert len(killed_ids) == 4
    assert checkpoint_lib.Checkpointer(str(wd)).latest_step() == 2
    res = loop.train(_cfg(**{"train.checkpoint_every_steps": 2}), str(wd), modules=modules, devices=_one_device(),
                     make_iterator=fx.iterator_factory("ids_resumed.jsonl"))
    assert res.start_step == 2 and res.final_step == TOTAL
    _assert_same_params(res.state.params, ref.state.params)
    # examples of the steps that count: the killed run's first 2 batches, then the resumed run's 3
    assert killed_ids[:2] + fx.read_records(str(wd / "ids_resumed.jsonl")) == ref_ids


def test_checkpoint_from_8_devices_restores_onto_2x4_and_one_device(modules, tmp_path):
    c = _cfg()
    c.mesh.shape.update(data=1, fsdp=8, tensor=1)
    rules = sharding_lib.rules_from_config(c.mesh)
    tx = state_lib.make_optimizer(c.optim)
    init = params_lib.make_init_params(c, modules)
    rng = jax.random.PRNGKey(3)
    opts = {"xla_backend_optimization_level": 0}
    state, _ = state_lib.init_state(init, rng, tx, 0.0, mesh_lib.make_mesh(c.mesh), rules, compiler_options=opts)
    state = state.replace(step=state.step + 7, params=jax.tree.map(lambda p: p + 0.5, state.params))
    assert state.params["ffn_in"]["kernel"].sharding.spec == P("fsdp", "tensor")
    it = iter(fx.make_dataset(c))
    next(it)
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path))
    ckpt.save(7, state, it, c)
    ckpt.wait()
    expected_next = next(it)["example_id"].tolist()
    saved = jax.device_get(state)
    abstract_boxed = jax.eval_shape(init, rng)
    for shape, devices in (({"data": 2, "fsdp": 4, "tensor": 1}, jax.devices()),
                           ({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])):
        c2 = c.copy_and_resolve_references()
        c2.mesh.shape.update(**shape)
        m = mesh_lib.make_mesh(c2.mesh, devices)
        sh = state_lib.state_shardings(abstract_boxed, tx, 0.0, m, rules)
        it2 = iter(fx.make_dataset(c))
        restored = ckpt.restore(7, state_lib.abstract_state(init, rng, tx, 0.0, sh), it2)
        k = restored.params["ffn_in"]["kernel"]
        assert k.sharding == sh.params["ffn_in"]["kernel"]
        assert len(k.sharding.device_set) == len(devices)
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), saved)
        assert next(it2)["example_id"].tolist() == expected_next  # the data position travelled too
    ckpt.close()


def test_retention_keeps_last_n_and_every_mth_and_config_travels(modules, tmp_path):
    c = _cfg(**{"train.keep_checkpoints": 2, "train.keep_period": 3})
    state = state_lib.TrainState(step=np.int32(0), params={"w": np.ones((2,), np.float32)}, opt_state=(),
                                 ema_params=None)
    ckpt = checkpoint_lib.Checkpointer.from_config(str(tmp_path), c)
    for s in range(1, 8):
        ckpt.save(s, state.replace(step=np.int32(s)), None, c)
    ckpt.wait()
    assert ckpt.all_steps() == [3, 6, 7]
    ckpt.close()
    loaded = checkpoint_lib.load_config(str(tmp_path))
    assert loaded.to_dict() == c.to_dict()


@pytest.mark.slow  # ~28 s; test_train_robustness::test_nonfinite_update_is_never_applied_nor_saved pins the same stop
def test_nan_loss_stops_with_a_clear_error_keeping_the_last_good_checkpoint(modules, tmp_path):
    """Step 1 trains normally and is saved; from step 2 the learning rate is absurd: step 2's update overflows, is
    not applied (issue 10: the old contract saved it and called it good), and the run stops naming step 1."""
    good = _cfg(**{"train.total_steps": 1, "train.checkpoint_every_steps": 1})
    loop.train(good, str(tmp_path), modules=modules, make_iterator=fx.iterator_factory(), devices=_one_device())
    c = _cfg(**{"optim.learning_rate": 1e30, "optim.warmup_steps": 0, "train.checkpoint_every_steps": 1})
    with pytest.raises(FloatingPointError, match=r"step 2 gave a non-finite update.*last checkpoint is step 1"):
        loop.train(c, str(tmp_path), modules=modules, make_iterator=fx.iterator_factory(), devices=_one_device())
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path))
    assert ckpt.all_steps() == [1]
    cfg = ckpt.restore_config()
    assert cfg.optim.learning_rate == good.optim.learning_rate
    ckpt.close()


def test_resume_refuses_a_config_that_changes_the_state_and_names_the_field():
    saved = _cfg()
    ok = _cfg(**{"train.total_steps": 50, "model.attention": "splash", "optim.learning_rate": 1e-4})
    loop.check_resumable(saved, ok, "/w")  # longer run, other kernel, other LR: fine
    with pytest.raises(ValueError, match=r"/w: cannot resume.*config.model.dim: checkpoint 32, now 64"):
        loop.check_resumable(saved, _cfg(**{"model.dim": 64}), "/w")
    with pytest.raises(ValueError, match=r"config.optim.ema_decay"):
        loop.check_resumable(saved, _cfg(**{"optim.ema_decay": 0.999}), "/w")
