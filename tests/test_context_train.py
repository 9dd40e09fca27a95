"""Context parallelism wired into the mesh and the real DiT (issue 32), on 8 simulated CPU devices.

`--config.mesh.context=N` gives the mesh a `context` axis of size N (the other sizes fill devices // N); the DiT's
video tokens, their object ids and RoPE tables are split over it, self-attention runs by `model.context_impl`
(ulysses | ring), cross-attention with the text replicated, the masked TTM layers with their ids. Pinned here, on the
tiny stage-2 config (8 video tokens, width 32, 4 heads, both masked TTM layers):

- the DiT's forward and its parameter gradients with context=4, data=2 equal one device's (ulysses and ring; also
  context=2 with fsdp=2, tensor=2), and the program really exchanges tokens (all-to-all / ppermute);
- `loop.train` with context=4, data=2 trains to the one-device losses and parameters;
- a checkpoint written with context=1 on one device resumes with context=2 (data=2, fsdp=2: parameters FSDP-sharded)
  and ends at the uninterrupted run's parameters;
- the inference pipeline's one-step denoiser (`StageRunner.sample`, guidance batched) on a context=2 mesh equals
  context=1;
- the mesh and config checks (device count, token count, U-Net, sparse attention) name the field.

Largest differences observed (float32, CPU, both impls): forward 1.4e-6 (max |value| 6.7) and parameter gradients
1.5e-5 (max |grad| 154), ~2e-7 and 1e-7 relative; after 3 training steps, losses 4.8e-7 and parameters 9.3e-8; the
resume across context 1 -> 2, parameters 3.4e-8; the pipeline step 3.6e-6 (max |latent| 8.3). `pytest -s` prints
each.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_fixtures as fx

from ttm_jax import config as config_lib
from ttm_jax.assembly import frozen as frozen_lib
from ttm_jax.assembly import params as params_lib
from ttm_jax.assembly.trained import Stage
from ttm_jax.backbones.wan import model as dit
from ttm_jax.inference import pipeline
from ttm_jax.models import masks
from ttm_jax.runtime import mesh as mesh_lib
from ttm_jax.runtime import sharding as sharding_lib
from ttm_jax.train import loop, preflight

TOTAL = 3
IMPLS = ("ulysses", "ring")
_O0 = {"xla_backend_optimization_level": 0}  # LLVM -O0: faster CPU compiles; these tests are about values


def _cfg(total_steps: int = TOTAL, *, context: int = 1, impl: str = "ulysses", **shape: int):
    """The tiny stage-2 config with 4 heads (Ulysses splits them 4 ways) and one scanned TTM block."""
    c = fx.tiny_config(2, **{"train.total_steps": total_steps, "model.num_heads": 4, "model.num_layers": 1,
                             "model.context_impl": impl})
    c.mesh.shape.update(**{"data": 1, "fsdp": -1, "tensor": 1, **shape})
    c.mesh.context = context
    return config_lib.validate(c)


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _largest(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(_host(a)), jax.tree.leaves(_host(b)), strict=True))


def _losses(result) -> list[float]:
    return [h[1]["loss"] for h in result.history]


# ---- the mesh and the checks ------------------------------------------------------------------------------------


def test_mesh_has_a_context_axis_sized_by_the_config():
    c = _cfg(context=4, data=2)
    m = mesh_lib.make_mesh(c.mesh)
    assert m.axis_names == mesh_lib.MESH_AXES == ("data", "fsdp", "context", "tensor")
    assert dict(m.shape) == {"data": 2, "fsdp": 1, "context": 4, "tensor": 1}
    assert mesh_lib.batch_parallelism(m) == 2  # context devices see the same examples
    # the default: a size-1 context axis, the other sizes as before
    assert dict(mesh_lib.make_mesh(_cfg().mesh).shape) == {"data": 1, "fsdp": 8, "context": 1, "tensor": 1}
    assert mesh_lib.resolve_shape({"data": 2, "fsdp": -1}, 8, 2) == {"data": 2, "fsdp": 2, "context": 2, "tensor": 1}
    with pytest.raises(mesh_lib.MeshError, match=r"config.mesh.context: 3 does not divide the 8 devices"):
        mesh_lib.resolve_shape({"fsdp": -1}, 8, 3)
    with pytest.raises(mesh_lib.MeshError, match=r"config.mesh.shape.*has 4 devices but 8 are available; set"):
        mesh_lib.resolve_shape({"data": 2, "fsdp": 2}, 8, 1)
    with pytest.raises(mesh_lib.MeshError, match=r"has 4 devices but 2 are available \(config.mesh.context=4"):
        mesh_lib.resolve_shape({"data": 2, "fsdp": 2}, 8, 4)
    with pytest.raises(mesh_lib.MeshError, match=r"names 'context'.*config.mesh.context"):
        mesh_lib.resolve_shape({"context": 2}, 8)
    # preflight sizes the batch shards from devices // context: fsdp=-1 is 2 with context 4 (batch 2 splits), 4
    # with context 2 (it does not)
    for context in (4, 2):
        small = _cfg(context=context)
        small.train.batch_size = 2
        if context == 4:
            preflight.check_devices(small, jax.devices())
            continue
        with pytest.raises(config_lib.ConfigError, match=r"config.train.batch_size: 2 does not split over the 4 "):
            preflight.check_devices(small, jax.devices())
    # the activations' `length` maps to the context axis, text stays replicated
    rules = sharding_lib.rules_from_config(c.mesh)
    assert sharding_lib.logical_to_sharding(("batch", "length", "embed"), (8, 8, 32), m, rules).spec == \
        jax.sharding.PartitionSpec(("data", "fsdp"), "context", None)
    assert sharding_lib.logical_to_sharding(("batch", "kv_length", "embed"), (8, 8, 32), m, rules).spec == \
        jax.sharding.PartitionSpec(("data", "fsdp"), None, None)


def test_validate_names_the_field_for_what_context_cannot_split():
    def error(context, **changes):
        c = fx.tiny_config(2)
        for field, value in changes.items():
            section, key = field.split(".")
            c[section][key] = value
        c.mesh.context = context
        with pytest.raises(config_lib.ConfigError) as e:
            config_lib.validate(c)
        return str(e.value)

    # 8 video tokens (tiny: latent (2, 4, 4), patches (1, 2, 2)) do not split 16 ways (ring: any head count)
    assert error(16, **{"model.context_impl": "ring"}).startswith(
        "config.mesh.context: 16 does not divide the 8 video tokens")
    assert "does not divide the 2 heads" in error(4)  # Ulysses' head split is checked too
    sparse = _cfg(context=2, impl="ring")
    sparse.model.attention_sparse = True
    config_lib.validate(sparse)  # the object-sparse path has a context-parallel form now (tests/test_context_sparse.py)
    u = config_lib.build(2, "tiny_unet")
    u.mesh.context = 2
    with pytest.raises(config_lib.ConfigError, match=r"config.mesh.context: 2 but model.backbone='unet' has no "
                                                     r"context-parallel path"):
        config_lib.validate(u)
    config_lib.validate(_cfg(context=2, impl="ring"))  # wired: no refusal


# ---- the DiT forward and gradients --------------------------------------------------------------------------------


def perturbed_case(c):
    """(params, args, kwargs, w) for the DiT of config `c`: params with every leaf perturbed (the TTM layers'
    zero-initialised outputs too, so the masked layers count), B = 2 inputs with object ids (queries whose object has
    no prompt, prompt padding) and cotangent weights `w`. Shared with tests/test_context_sparse.py."""
    model = dit.DiT(c.model, config_lib.in_channels(c), c.autoencoder.latent_channels)
    cfg = dit.DiTConfig.from_config(c.model)
    grid = config_lib.latent_shape(c)[:3]
    args, kwargs = dit.init_inputs(cfg, config_lib.in_channels(c), batch=2, grid=grid, text_len=8, local_len=12)
    rng = np.random.default_rng(0)
    params = nn.unbox(jax.jit(model.init, compiler_options=_O0)(jax.random.PRNGKey(0), *args, **kwargs)["params"])
    params = jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape).astype(np.float32), params)
    normal = lambda shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    args = (normal(args[0].shape), jnp.asarray([250.0, 900.0], jnp.float32), normal(args[2].shape))
    n = kwargs["token_ids"].shape[1]
    prompt_mask = rng.random((2, 3, 4)) < 0.6
    prompt_mask[:, 0, 0] = True
    local_ids = masks.local_prompt_ids(jnp.asarray(prompt_mask))
    kwargs = dict(local_context=normal(kwargs["local_context"].shape),
                  token_ids=jnp.asarray(rng.integers(0, 3, (2, n)), jnp.int32),
                  cross_token_ids=jnp.asarray(rng.integers(0, 4, (2, n)), jnp.int32), local_ids=local_ids)
    w = normal((2, *grid, c.autoencoder.latent_channels))
    return params, args, kwargs, w


@pytest.fixture(scope="module")
def forward_case():
    c = _cfg()
    return (c, *perturbed_case(c))


def _forward_and_grads(model, args, kwargs, w):
    """params -> (DiT output, gradient of sum(output * w) w.r.t. the params)."""
    def loss(p):
        return jnp.sum(model.apply({"params": p}, *args, **kwargs) * w)

    return lambda p: (model.apply({"params": p}, *args, **kwargs), jax.grad(loss)(p))


@pytest.fixture(scope="module")
def forward_reference(forward_case):
    c, params, args, kwargs, w = forward_case
    model = dit.DiT(c.model, config_lib.in_channels(c), c.autoencoder.latent_channels)
    return jax.jit(_forward_and_grads(model, args, kwargs, w), compiler_options=_O0)(params)


# the ring and the tensor-split cases run with `pytest -m slow` (the suite keeps to its 10 minutes; ring's values and
# gradients per attention kind are pinned by tests/test_context_parallel.py)
@pytest.mark.parametrize("impl,context,shape", [
    ("ulysses", 4, dict(data=2)), pytest.param("ring", 4, dict(data=2), marks=pytest.mark.slow),
    pytest.param("ulysses", 2, dict(fsdp=2, tensor=2), marks=pytest.mark.slow)])
def test_dit_forward_and_grads_with_context_equal_one_device(forward_case, forward_reference, impl, context, shape):
    """context=4 with data=2 (both impls); context=2 with fsdp=2 and tensor=2 (heads and projections split too)."""
    c, params, args, kwargs, w = forward_case
    cc = _cfg(context=context, impl=impl, **shape)
    model = dit.DiT(cc.model, config_lib.in_channels(cc), cc.autoencoder.latent_channels)
    mesh, rules = mesh_lib.make_mesh(cc.mesh), sharding_lib.rules_from_config(cc.mesh)
    fn = _forward_and_grads(model, args, kwargs, w)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        jaxpr = str(jax.make_jaxpr(fn)(params))
        out, grads = jax.jit(fn, compiler_options=_O0)(params)
    # the exchange of each kind: ulysses' all-to-alls for the two self-attentions, the ring's ppermutes; the
    # cross-attentions' shard_maps need none
    assert ("all_to_all" if impl == "ulysses" else "ppermute") in jaxpr
    assert jaxpr.count("shard_map") >= 4  # attn1, masked_self_attn, attn2, masked_cross_attn
    want_out, want_grads = forward_reference
    d_out, d_grads = _largest(out, want_out), _largest(grads, want_grads)
    s_out, s_grads = (max(float(np.max(np.abs(x))) for x in jax.tree.leaves(_host(t))) for t in forward_reference)
    print(f"DiT {impl} context={context} {shape}: max |forward diff| {d_out:.1e} (max |value| {s_out:.1f}), "
          f"max |param grad diff| {d_grads:.1e} (max |grad| {s_grads:.1f})")
    assert s_out > 0.1 and s_grads > 0.1  # not vacuous
    assert d_out < 1e-6 * s_out and d_grads < 1e-6 * s_grads


def test_dit_names_a_token_count_the_context_axis_cannot_split(forward_case):
    c, params, args, kwargs, _ = forward_case
    model = dit.DiT(_cfg(context=8, impl="ring").model, config_lib.in_channels(c), c.autoencoder.latent_channels)
    x = args[0][:, :1, :2]  # latent (1, 2, 4): 2 tokens
    kw = {k: (v[:, :2] if k in ("token_ids", "cross_token_ids") else v) for k, v in kwargs.items()}
    mesh = jax.make_mesh((8,), ("context",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"the 2 video tokens .* context axis of size 8; "
                                                              r"choose a config.mesh.context"):
        jax.eval_shape(lambda p: model.apply({"params": p}, x, args[1], args[2], **kw), params)


# ---- training: the step, and a resume across context sizes ------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """TOTAL steps on one device, context 1 (the modules keep their config's context_impl: unused there), with a
    checkpoint at step 2 too: the resume test starts from it (saving changes nothing in the run's state), so the
    one-device step compiles once for both tests."""
    c = _cfg()
    c.train.checkpoint_every_steps = 2
    mods = fx.make_modules(c, real_model=True)
    wd = str(tmp_path_factory.mktemp("reference"))
    res = loop.train(c, wd, modules=mods, make_iterator=fx.iterator_factory(), devices=jax.devices()[:1])
    assert res.final_step == TOTAL
    return res, mods, wd


@pytest.mark.parametrize("impl", ["ulysses", pytest.param("ring", marks=pytest.mark.slow)])
def test_train_with_context_4_equals_one_device(reference, impl, tmp_path):
    ref, _, _ = reference
    c = _cfg(context=4, impl=impl, data=2)
    res = loop.train(c, str(tmp_path), modules=fx.make_modules(c, real_model=True),
                     make_iterator=fx.iterator_factory())
    assert res.final_step == TOTAL
    leaf = res.state.params["ttm_blocks"]["masked_self_attn"]["attn"]["to_q"]["kernel"]
    assert dict(leaf.sharding.mesh.shape)["context"] == 4
    d_loss = max(abs(a - b) for a, b in zip(_losses(res), _losses(ref), strict=True))
    d_params = _largest(res.state.params, ref.state.params)
    print(f"train {impl} context=4 data=2, {TOTAL} steps: max |loss diff| {d_loss:.1e}, "
          f"max |param diff| {d_params:.1e}")
    assert d_loss < 1e-5 and d_params < 1e-5


def test_resume_from_context_1_onto_context_2_equals_uninterrupted(reference, tmp_path):
    ref, _, ref_wd = reference
    # the one-device context=1 run's workdir as it was after its step-2 checkpoint: its step-3 checkpoint left out
    assert ref.checkpoint_steps == [2, TOTAL]
    wd = str(tmp_path / "run")
    shutil.copytree(ref_wd, wd, ignore=lambda d, names: [str(TOTAL)] if os.path.basename(d) == "checkpoints" else [])
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2"]
    c = _cfg(context=2, data=2, fsdp=2)
    second = loop.train(c, wd, modules=fx.make_modules(c, real_model=True), make_iterator=fx.iterator_factory())
    assert second.start_step == 2 and second.final_step == TOTAL
    # [layers, embed, mlp]: embed over fsdp and context (the context devices hold a share of the weights)
    k = second.state.params["ttm_blocks"]["ffn"]["proj_in"]["kernel"]
    assert dict(k.sharding.mesh.shape) == {"data": 2, "fsdp": 2, "context": 2, "tensor": 1}
    assert k.sharding.spec[1] == ("fsdp", "context")
    assert k.addressable_shards[0].data.shape[1] * 4 == k.shape[1]
    d = _largest(second.state.params, ref.state.params)
    print(f"resume context 1 -> 2 (data=2, fsdp=2) at step 2 of {TOTAL}: max |param diff| {d:.1e}")
    assert d < 1e-5
    assert abs(_losses(second)[-1] - _losses(ref)[-1]) < 1e-5


# ---- sampling: the pipeline's denoiser on a context mesh ----------------------------------------------------------


def _stage(config, modules, params, devices) -> Stage:
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    rules = sharding_lib.rules_from_config(config.mesh)
    shardings = params_lib.param_shardings(config, modules, mesh, rules)
    frozen, _ = frozen_lib.init_frozen(config, modules, mesh, rules)
    return Stage(config, modules, jax.device_put(params, shardings), frozen, mesh, rules, 0, "")


@pytest.mark.slow  # 18 s; run with `pytest -m slow`
def test_pipeline_denoiser_with_context_2_equals_context_1(reference):
    """`StageRunner` (the pipeline's stage: conditions, guided Euler sampling) on a context=2 mesh, one step from the
    same noise, gives the context=1 latent. Params: the reference run's, TTM outputs perturbed to count."""
    ref, _, _ = reference
    params = _host(ref.state.params)
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(np.float32), params)
    examples = [fx.synthetic_example(i, _cfg()) for i in range(2)]
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0] if k != "example_id"}
    settings = dataclasses.replace(pipeline.Settings(), num_steps=1)
    out = {}
    for context in (1, 2):
        c = _cfg(context=context)
        runner = pipeline.StageRunner(_stage(c, fx.make_modules(c, real_model=True), params, jax.devices()[:2]))
        assert dict(runner.stage.mesh.shape)["context"] == context
        conds = runner.conditions(batch)
        out[context] = _host(runner.sample(conds, [0, 1], settings))
    # not vacuous: the sampling program of the context=2 stage exchanges tokens (Ulysses' all-to-all)
    with runner._ctx():
        hlo = runner._sample.lower(runner.place(runner.noise([0, 1])), jnp.asarray(runner.time_grid(settings)),
                                   runner.stage.params, conds, jnp.asarray([1.5, 3.0], jnp.float32)).as_text()
    assert "all_to_all" in hlo or "all-to-all" in hlo
    d, scale = _largest(out[2], out[1]), float(np.max(np.abs(out[1])))
    print(f"pipeline one step, context 2 vs 1: max |latent diff| {d:.1e} (max |latent| {scale:.1f})")
    assert d < 1e-6 * scale
