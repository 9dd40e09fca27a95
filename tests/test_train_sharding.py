"""Mesh, logical sharding rules, params born sharded, and sharded training == single-device training.

- 3 steps on 8 simulated CPU devices, mesh (data=2, fsdp=4), with 2-way gradient accumulation, give the params of
  3 steps on one device without accumulation (fp32 tolerance): the sharding, the batch split across devices, the
  micro-batch split and the per-example RNG change nothing but the schedule of the computation.
- the same with 2 processes x 4 devices through `jax.distributed` on loopback (subprocesses), each feeding its own
  rows of the global batch from its own Grain iterator.
"""

import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import train_fixtures as fx
from jax.sharding import PartitionSpec as P

from ttm_jax.assembly import params as params_lib
from ttm_jax.runtime import mesh as mesh_lib
from ttm_jax.runtime import sharding as sharding_lib
from ttm_jax.train import loop
from ttm_jax.train import state as state_lib

STEPS = 3


def _cfg(**kw):
    c = fx.tiny_config(2, **{"train.batch_size": 16, "train.total_steps": STEPS, **kw})
    return c


@pytest.fixture(scope="module")
def modules():
    return fx.make_modules(_cfg())


@pytest.fixture(scope="module")
def single_run(modules, tmp_path_factory):
    c = _cfg()
    c.mesh.shape.update(data=1, fsdp=-1, tensor=1)
    wd = str(tmp_path_factory.mktemp("single"))
    res = loop.train(c, wd, modules=modules, make_iterator=fx.iterator_factory("ids.jsonl"),
                     devices=jax.devices()[:1])
    return res, wd


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def test_resolve_shape_fills_one_free_axis_and_names_the_field():
    assert mesh_lib.resolve_shape({"data": 2, "fsdp": -1, "tensor": 1}, 8) == \
        {"data": 2, "fsdp": 4, "context": 1, "tensor": 1}
    assert mesh_lib.resolve_shape({"data": -1}, 8) == {"data": 8, "fsdp": 1, "context": 1, "tensor": 1}
    with pytest.raises(mesh_lib.MeshError, match="config.mesh.shape.*at most one"):
        mesh_lib.resolve_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(mesh_lib.MeshError, match="config.mesh.shape.*3 devices"):
        mesh_lib.resolve_shape({"data": 3, "fsdp": -1}, 8)
    with pytest.raises(mesh_lib.MeshError, match="config.mesh.shape.*8 are available"):
        mesh_lib.resolve_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
    with pytest.raises(mesh_lib.MeshError, match="unknown axes"):
        mesh_lib.resolve_shape({"model": 2}, 8)


def test_distributed_start_up_reads_the_environment(monkeypatch):
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID", "SLURM_NTASKS",
              "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(k, raising=False)
    auto = fx.tiny_config(2)
    auto.mesh.distributed = "auto"
    assert mesh_lib.initialize_distributed(auto.mesh) is None  # one process: nothing to start
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert mesh_lib._detected_cluster() is None  # a single-task SLURM job is a single process
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert mesh_lib._detected_cluster() == "slurm"
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1,10.0.0.2")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    assert mesh_lib._detected_cluster() == "explicit"  # explicit variables win
    with pytest.raises(mesh_lib.MeshError, match="JAX_NUM_PROCESSES"):
        mesh_lib.initialize_distributed(auto.mesh)
    assert mesh_lib.initialize_distributed(fx.tiny_config(2).mesh) is None  # distributed="skip"


def test_make_mesh_names_and_sizes():
    c = _cfg()
    c.mesh.shape.update(data=2, fsdp=-1, tensor=2)
    m = mesh_lib.make_mesh(c.mesh)
    assert m.axis_names == ("data", "fsdp", "context", "tensor")  # context: config.mesh.context, 1 by default
    assert dict(m.shape) == {"data": 2, "fsdp": 2, "context": 1, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)
    assert mesh_lib.batch_parallelism(m) == 4


def test_logical_rules_priority_divisibility_and_unannotated_fallback():
    c = _cfg()
    c.mesh.shape.update(data=2, fsdp=4, tensor=1)
    m = mesh_lib.make_mesh(c.mesh)
    rules = sharding_lib.rules_from_config(c.mesh)
    # a parameter's embed dim goes to fsdp, mlp to tensor
    assert sharding_lib.logical_to_sharding(("embed", "mlp"), (32, 64), m, rules).spec == P("fsdp", "tensor")
    # an activation: batch takes data and fsdp first, so embed stays whole; the tokens go to the (size-1) context axis
    assert sharding_lib.logical_to_sharding(("batch", "length", "embed"), (8, 4, 32), m, rules).spec == \
        P(("data", "fsdp"), "context", None)
    # a dimension the axes do not divide stays unsharded; a batch of 2 keeps the data axis only
    assert sharding_lib.logical_to_sharding(("embed",), (6,), m, rules).spec == P(None)
    assert sharding_lib.logical_to_sharding(("batch", "embed"), (2, 32), m, rules).spec == P("data", None)
    # parameters without names: the large ones sharded over fsdp on their largest divisible dim, small ones replicated
    big = jax.ShapeDtypeStruct((6, 4096), np.float32)
    small = jax.ShapeDtypeStruct((4, 4), np.float32)
    sh = sharding_lib.tree_shardings({"big": big, "small": small}, m, rules)
    assert sh["big"].spec == P(None, "fsdp") and sh["small"].spec == P()
    bad = c.mesh.copy_and_resolve_references()
    bad.rules = (("embed", "model"),)
    with pytest.raises(ValueError, match=r"config.mesh.rules\[0\]"):
        sharding_lib.rules_from_config(bad)


def test_params_and_adam_moments_are_born_sharded(modules):
    c = _cfg()
    c.mesh.shape.update(data=2, fsdp=4, tensor=1)
    m = mesh_lib.make_mesh(c.mesh)
    rules = sharding_lib.rules_from_config(c.mesh)
    tx = state_lib.make_optimizer(c.optim)
    init = params_lib.make_init_params(c, modules)
    state, shardings = state_lib.init_state(init, jax.random.PRNGKey(0), tx, 0.0, m, rules,
                                            compiler_options={"xla_backend_optimization_level": 0})
    k = state.params["ffn_in"]["kernel"]  # logical (embed, mlp) = (32, 64)
    assert k.sharding.spec == P("fsdp", "tensor")  # tensor has size 1 here
    assert {s.data.shape for s in k.addressable_shards} == {(8, 64)}
    mu = state.opt_state[1][0].mu["ffn_in"]["kernel"]  # chain(clip, adamw): adamw's scale_by_adam state
    assert mu.sharding.spec == P("fsdp", "tensor")
    assert state.step.sharding.spec == P()
    assert shardings.params["ffn_in"]["kernel"] == k.sharding
    # per-device param bytes: the fsdp-sharded kernels hold a quarter each
    total = sum(x.nbytes for x in jax.tree.leaves(state.params))
    assert sharding_lib.per_device_bytes(state.params) < total / 2


def test_sharded_with_grad_accumulation_equals_single_device(modules, single_run, tmp_path):
    ref, ref_wd = single_run
    assert ref.final_step == STEPS
    c = _cfg(**{"train.grad_accum_steps": 2})
    c.mesh.shape.update(data=2, fsdp=4, tensor=1)
    res = loop.train(c, str(tmp_path), modules=modules, make_iterator=fx.iterator_factory("ids.jsonl"))
    assert res.final_step == STEPS
    p = res.state.params["ffn_in"]["kernel"]
    assert p.sharding.spec == P("fsdp", "tensor")
    # same examples, same order
    assert fx.read_records(os.path.join(ref_wd, "ids.jsonl")) == fx.read_records(str(tmp_path / "ids.jsonl"))
    a, b = _host(ref.state.params), _host(res.state.params)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6), a, b)
    # the params moved: equality is not that of two untouched inits
    init = params_lib.make_init_params(c, modules)(jax.random.PRNGKey(c.seed))
    moved = max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
                for x, y in zip(jax.tree.leaves(sharding_lib.unbox(init)), jax.tree.leaves(a), strict=True))
    assert moved > 1e-3
    np.testing.assert_allclose([h[1]["loss"] for h in ref.history], [h[1]["loss"] for h in res.history], rtol=1e-4)


_WORKER = textwrap.dedent("""
    import os, sys
    sys.path[:0] = [{repo!r}, {tests!r}]
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    import jax
    import numpy as np
    import train_fixtures as fx
    from jax.experimental import multihost_utils
    from ttm_jax.train import loop
    c = fx.tiny_config(2, **{{"train.batch_size": 16, "train.total_steps": {steps}}})
    c.mesh.distributed = "auto"   # JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
    c.mesh.shape.update(data=2, fsdp=4, tensor=1)
    res = loop.train(c, sys.argv[1], modules=fx.make_modules(c), make_iterator=fx.iterator_factory(
        "ids_%d.jsonl" % int(os.environ["JAX_PROCESS_ID"])))
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    flat = {{jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(res.state.params)[0]}}
    host = {{k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in flat.items()}}
    if jax.process_index() == 0:
        np.savez(os.path.join(sys.argv[1], "params.npz"), **host)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_on_loopback_equal_single_device(single_run, tmp_path):
    ref, ref_wd = single_run
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(repo=repo, tests=os.path.join(repo, "tests"), steps=STEPS))
    port = _free_port()
    procs = []
    for pid in range(2):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid)}
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(out)
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
    got = np.load(tmp_path / "params.npz")
    want = {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(ref.state.params)[0]}
    assert set(got.files) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-4, atol=2e-6, err_msg=k)
    # each process consumed its half of every global batch, together the single run's examples
    rows = [fx.read_records(str(tmp_path / f"ids_{i}.jsonl")) for i in range(2)]
    assert [a + b for a, b in zip(*rows, strict=True)] == fx.read_records(os.path.join(ref_wd, "ids.jsonl"))


@pytest.mark.slow
def test_real_dit_sharded_equals_single_device(tmp_path):
    """The same property with the real DiT (masked TTM layers, scanned blocks, its logical constraints)."""
    c = _cfg(**{"train.total_steps": 2})
    mods = fx.make_modules(c, real_model=True)
    c.mesh.shape.update(data=1, fsdp=-1, tensor=1)
    one = loop.train(c, str(tmp_path / "one"), modules=mods, make_iterator=fx.iterator_factory(),
                     devices=jax.devices()[:1])
    c8 = _cfg(**{"train.total_steps": 2})
    c8.mesh.shape.update(data=2, fsdp=4, tensor=1)
    eight = loop.train(c8, str(tmp_path / "eight"), modules=mods, make_iterator=fx.iterator_factory())
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6), _host(one.state.params),
                 _host(eight.state.params))
