"""`checkpoint.restore_params`: sampling and export read only the parameter subtree of a training checkpoint.

Checkpoints here are written by the real training code (`loop.train`, `Checkpointer.save`, Orbax OCDBT). Proofs:
the restored params equal the trained ones bit for bit (EMA and raw); the optimizer state is never read (bytes read
from disk, counted by TensorStore's own file-kvstore metrics, against a full-state restore of the same checkpoint);
a checkpoint written from 8 devices lands on one device or on another mesh; errors name the path and the fix.
"""

import jax
import numpy as np
import optax
import pytest
import tensorstore as ts
import train_fixtures as fx
from jax.sharding import PartitionSpec as P

from ttm_jax.assembly import params as params_lib
from ttm_jax.convert import export
from ttm_jax.runtime import checkpoint as checkpoint_lib
from ttm_jax.runtime import mesh as mesh_lib
from ttm_jax.runtime import sharding as sharding_lib
from ttm_jax.train import loop
from ttm_jax.train import state as state_lib

STEPS = 3
EMA = 0.5  # far from 1 so that 3 steps move the EMA visibly away from the raw params


def _cfg(**kw):
    return fx.tiny_config(2, **{"train.total_steps": STEPS, "optim.ema_decay": EMA, **kw})


@pytest.fixture(scope="module")
def modules():
    return fx.make_modules(_cfg())


@pytest.fixture(scope="module")
def run(modules, tmp_path_factory):
    """A real 3-step training run with EMA on one device: (workdir, final TrainState on the host)."""
    wd = str(tmp_path_factory.mktemp("run"))
    res = loop.train(_cfg(), wd, modules=modules, make_iterator=fx.iterator_factory(), devices=jax.devices()[:1])
    assert res.final_step == STEPS
    return wd, jax.device_get(res.state)


def _assert_bitwise(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _bytes_read() -> int:
    for m in ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read"):
        return int(sum(v["value"] for v in m["values"]))
    return 0


def _nbytes(tree) -> int:
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


def test_ema_and_raw_params_bit_for_bit(run):
    wd, state = run
    assert not np.array_equal(state.ema_params["ffn_in"]["kernel"], state.params["ffn_in"]["kernel"])
    ema = checkpoint_lib.restore_params(wd)
    assert (ema.step, ema.source, int(ema.config.stage), float(ema.config.optim.ema_decay)) == (STEPS, "ema_params",
                                                                                                2, EMA)
    _assert_bitwise(jax.device_get(ema.params), state.ema_params)
    raw = checkpoint_lib.restore_params(wd, STEPS, ema=False)
    assert raw.source == "params"
    _assert_bitwise(jax.device_get(raw.params), state.params)
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    assert all(x.sharding == one for x in jax.tree.leaves(raw.params))


def test_export_load_workdir_reads_params_only(run):
    wd, state = run
    for ema, want in ((True, state.ema_params), (False, state.params)):
        before = _bytes_read()
        config, params, step = export.load_workdir(wd, ema=ema)
        assert _bytes_read() - before < 1.5 * _nbytes(want)  # neither the other subtree nor the moments
        assert step == STEPS and int(config.stage) == 2
        _assert_bitwise(jax.device_get(params), want)


def test_run_without_ema_gives_raw_params(run, tmp_path):
    wd, state = run
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(4, state.replace(ema_params=None), None, _cfg(**{"optim.ema_decay": 0.0}))
    ckpt.close()
    got = checkpoint_lib.restore_params(str(tmp_path), ema=True)
    assert (got.step, got.source) == (4, "params")
    _assert_bitwise(jax.device_get(got.params), state.params)


def test_optimizer_state_is_not_read(run):
    """Bytes read from disk: params-only ~ the params' own bytes; a full-state restore reads moments + EMA too."""
    wd, state = run
    nbytes = _nbytes(state.params)
    assert _nbytes(state.opt_state) >= 2 * nbytes  # AdamW mu and nu are params-sized
    before = _bytes_read()
    got = checkpoint_lib.restore_params(wd)
    params_only = _bytes_read() - before
    jax.block_until_ready(got.params)

    c = got.config
    modules = fx.make_modules(c)
    init = params_lib.make_init_params(c, modules)
    rng = jax.random.PRNGKey(int(c.seed))
    tx = state_lib.make_optimizer(c.optim)
    mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:1])
    sh = state_lib.state_shardings(jax.eval_shape(init, rng), tx, EMA, mesh, sharding_lib.rules_from_config(c.mesh))
    ckpt = checkpoint_lib.Checkpointer(wd, async_save=False)
    before = _bytes_read()
    full = ckpt.restore(STEPS, state_lib.abstract_state(init, rng, tx, EMA, sh))
    full_bytes = _bytes_read() - before
    ckpt.close()
    _assert_bitwise(jax.device_get(full.ema_params), jax.device_get(got.params))
    print(f"\nbytes read: params-only {params_only}, full state {full_bytes} (params {nbytes}, "
          f"ratio {full_bytes / params_only:.2f}x)")
    assert params_only < 1.5 * nbytes  # the EMA subtree and metadata, nothing params-sized besides
    assert full_bytes > 3 * nbytes  # params + EMA + mu + nu (zstd takes a little off)
    assert full_bytes > 2.5 * params_only


def test_checkpoint_from_8_devices_restores_onto_one_device_and_another_mesh(modules, tmp_path):
    c = _cfg()
    c.mesh.shape.update(data=1, fsdp=8, tensor=1)
    rules = sharding_lib.rules_from_config(c.mesh)
    tx = optax.adamw(1e-2)  # no warm-up: the first update moves the params (and so the EMA off them)
    init = params_lib.make_init_params(c, modules)
    rng = jax.random.PRNGKey(5)
    state, _ = state_lib.init_state(init, rng, tx, EMA, mesh_lib.make_mesh(c.mesh), rules,
                                    compiler_options={"xla_backend_optimization_level": 0})
    grads = jax.tree.map(lambda p: jax.numpy.ones_like(p) * 0.1, state.params)
    state = jax.jit(lambda s, g: state_lib.apply_gradients(s, g, tx, EMA))(state, grads)
    for tree in (state.params, state.ema_params):  # really split over the 8 devices, not replicated
        sh = tree["ffn_in"]["kernel"].sharding
        assert len(sh.device_set) == 8 and not sh.is_fully_replicated
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path))
    ckpt.save(1, state, None, c)
    ckpt.close()
    saved = jax.device_get(state)
    assert not np.array_equal(saved.ema_params["ffn_in"]["kernel"], saved.params["ffn_in"]["kernel"])

    one = checkpoint_lib.restore_params(str(tmp_path))
    _assert_bitwise(jax.device_get(one.params), saved.ema_params)
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(one.params))

    c2 = c.copy_and_resolve_references()
    c2.mesh.shape.update(data=2, fsdp=4, tensor=1)
    mesh = mesh_lib.make_mesh(c2.mesh, jax.devices())
    param_sh = sharding_lib.tree_shardings(jax.eval_shape(init, rng), mesh, rules)
    other = checkpoint_lib.restore_params(str(tmp_path), ema=False, shardings=param_sh)
    k = other.params["ffn_in"]["kernel"]
    assert k.sharding == param_sh["ffn_in"]["kernel"] and k.sharding.spec == P("fsdp", "tensor")
    assert len(k.sharding.device_set) == 8
    _assert_bitwise(jax.device_get(other.params), saved.params)


def test_errors_name_the_path_and_the_fix(run, tmp_path):
    wd, state = run
    with pytest.raises(FileNotFoundError, match=r"checkpoints: no checkpoint at step 99 \(have \[3\]\)"):
        checkpoint_lib.restore_params(wd, 99)
    with pytest.raises(FileNotFoundError, match="no checkpoint at step None"):
        checkpoint_lib.restore_params(str(tmp_path))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    wrong = {"ffn_in": {"kernel": one}}
    with pytest.raises(ValueError, match=r"state \[ema_params\]: the `shardings` tree does not match.*restore_params"):
        checkpoint_lib.restore_params(wd, shardings=wrong)


@pytest.mark.slow
def test_mid_config_bytes_read_full_state_vs_params_only(tmp_path):
    """Prints the figures for the report: the mid model's state (real DiT shapes, AdamW after one update, EMA) saved by
    the Checkpointer, restored in full and params-only: bytes read from disk, bytes restored, and the peak RSS of a
    fresh process doing each restore (Linux `VmHWM`) over one that only reads the config."""
    import ml_collections

    from ttm_jax import config as config_lib
    from ttm_jax.backbones.wan import model as dit_lib

    c = config_lib.build(2, "mid")
    c.optim.ema_decay = 0.999
    cfg = dit_lib.DiTConfig.from_config(c.model)
    cin, cout = config_lib.in_channels(c), int(c.autoencoder.latent_channels)
    args, kwargs = dit_lib.init_inputs(cfg, cin)
    model = dit_lib.DiT(cfg, cin, cout)
    shapes = jax.eval_shape(lambda r: sharding_lib.unbox(model.init(r, *args, **kwargs)["params"]),
                            jax.random.key(0))
    rs = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rs.standard_normal(s.shape, np.float32) * 0.02, shapes)
    tx = optax.adamw(1e-4)
    grads = jax.tree.map(lambda p: rs.standard_normal(p.shape, np.float32), params)  # incompressible moments
    state = state_lib.apply_gradients(state_lib.create(params, tx, 0.999), grads, tx, 0.999)
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(1, state, None, ml_collections.ConfigDict(c))
    ckpt.close()
    nbytes = _nbytes(params)
    before = _bytes_read()
    got = checkpoint_lib.restore_params(str(tmp_path))
    params_only = _bytes_read() - before
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one), jax.eval_shape(
        lambda: state))
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path), async_save=False)
    before = _bytes_read()
    full = ckpt.restore(1, abstract)
    full_bytes = _bytes_read() - before
    ckpt.close()
    _assert_bitwise(jax.device_get(got.params), jax.device_get(full.ema_params))
    held_full, held_params = _nbytes(full), _nbytes(got.params)
    print(f"\nmid: {state_lib.param_count(params) / 1e6:.1f}M params ({nbytes / 2**20:.0f} MiB); bytes read from disk: "
          f"full state {full_bytes / 2**20:.0f} MiB, params-only {params_only / 2**20:.0f} MiB "
          f"({full_bytes / params_only:.2f}x); restored arrays: {held_full / 2**20:.0f} MiB vs "
          f"{held_params / 2**20:.0f} MiB ({held_full / held_params:.2f}x)")
    assert full_bytes > 3 * params_only

    # peak RSS of a fresh process doing only this restore, over one that only reads the config
    rss = {mode: _peak_rss_kib(str(tmp_path), mode) for mode in ("config", "params", "full")}
    d_full, d_params = rss["full"] - rss["config"], rss["params"] - rss["config"]
    print(f"mid: peak RSS over baseline ({rss['config'] / 2**10:.0f} MiB): full state {d_full / 2**10:.0f} MiB, "
          f"params-only {d_params / 2**10:.0f} MiB ({d_full / d_params:.2f}x)")
    assert d_full > 2 * d_params


_RSS = """
import sys
import jax, orbax.checkpoint as ocp
from ttm_jax.runtime import checkpoint as ck
wd, mode = sys.argv[1], sys.argv[2]
if mode == "params":
    jax.block_until_ready(ck.restore_params(wd).params)
elif mode == "full":
    k = ck.Checkpointer(wd, async_save=False)
    md = ocp.PyTreeCheckpointHandler().metadata(k.directory / str(k.latest_step()) / "state").tree
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=one), md,
                          is_leaf=lambda x: hasattr(x, "shape"))
    jax.block_until_ready(k.restore(k.latest_step(), target))
    k.close()
else:
    ck.load_config(wd)
# VmHWM, not ru_maxrss: ru_maxrss carries the (larger) parent's peak across fork + exec
print("RSS", [ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0])
"""


def _peak_rss_kib(workdir: str, mode: str) -> int:
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _RSS, workdir, mode], capture_output=True, text=True, env=env,
                         check=True).stdout
    return int(out.split("RSS")[-1])
