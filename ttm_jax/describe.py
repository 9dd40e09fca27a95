"""`--mode=describe`: what a config builds, without allocating it.

Every shape comes from `jax.eval_shape(init)`: no parameter memory is spent, so the 1.3B (or 14B) configs describe on
a laptop. The trained model is the configured backbone (`config.model.backbone`: any `BACKBONES` entry), built, fed
and described through its registry entry (`assembly/backbone.py: Backbone`); nothing here depends on which backbone
it is. Its table is broken down by the entry's `group` rows, and its count split into the backbone (the stage's
extra condition input channels and TTM's added layers taken off: what a converted diffusers checkpoint holds, in the
entry's `layout`), the added input channels (found by the logical axis `in_channels` of the input layer) and the
added layers (`config.model.ttm_layers`, in the entry's `ttm_where`). With `data.cached` (latents and text
embeddings from `python -m ttm_jax.data.encode`) the frozen text encoder and autoencoder are not in the step: their
rows show 0 (and what they would be). FLOPs per training step come from XLA's cost analysis of the lowered forward +
backward of the backbone on abstract inputs of the configured global batch, with the entry's `flops_overrides`
(XLA's cost analysis counts a `while` (scan) body once, not once per trip: a backbone that scans its layers unrolls
them for the count). The frozen encoders' FLOPs (VAE encode, text encoder forward) are counted the same way, per
step; the autoencoder's architecture comes from its registry entry (`registry.abstract_autoencoder`).

Memory per device (`memory_plan`, `memory_markdown`; printed by describe as a markdown table) for the mesh of
`config.mesh` (`--config.mesh.shape.{data,fsdp,tensor}=..`, `--config.mesh.context=N`) on `devices` devices (the
`--describe_devices` flag; default: the mesh's own product when it has no -1, else this host's devices), computed,
not run: the shardings come from `config.mesh.rules` through `runtime/sharding.tree_shardings` on a
`jax.sharding.AbstractMesh` of those sizes, and each parameter's bytes per device are its shard's. Rows: trainable
parameters (`model.param_dtype`), their gradients (the same shardings and dtype), the AdamW state (two moments
shaped and sharded as the params, in the params' dtype: optax's default), the EMA copy when `optim.ema_decay` > 0,
the frozen text encoder and autoencoder (0 with `data.cached`), and the activations, an ESTIMATE by the backbone
entry's `activations` (the DiT's formula: `ttm_jax/backbones/wan/entry.py`) for

  tokens per device = ceil(batch / (data x fsdp)) x N / context   (N = the entry's `video_tokens`, per example)
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util
from flax.core import meta

from ttm_jax import config as config_lib
from ttm_jax.assembly import registry
from ttm_jax.runtime import mesh as mesh_lib
from ttm_jax.runtime import sharding as sharding_lib


def _flat_shapes(tree: Any) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    tree = meta.unbox(tree)
    return traverse_util.flatten_dict(tree)


def _size(shapes: dict) -> int:
    total = 0
    for s in shapes.values():
        n = 1
        for d in s.shape:
            n *= int(d)
        total += n
    return total


def _with_model(config: ml_collections.ConfigDict, **model_overrides: Any) -> ml_collections.ConfigDict:
    if not model_overrides:
        return config
    c = ml_collections.ConfigDict(config.to_dict())
    for k, v in model_overrides.items():
        c.model[k] = v
    return c


def model_param_shapes(config: ml_collections.ConfigDict, *, boxed: bool = False, **model_overrides: Any) -> dict:
    """Flat {path: ShapeDtypeStruct} of the trained backbone's parameters (`config.model` with `model_overrides`),
    by `jax.eval_shape` (nothing allocated); `boxed` keeps the logical-axis boxes (`nn.Partitioned`) as leaves."""
    c = _with_model(config, **model_overrides)
    model = registry.build_backbone(c)
    args, kwargs = registry.init_inputs(c, abstract=True)
    variables = jax.eval_shape(lambda rng, a, kw: model.init(rng, *a, **kw), jax.random.key(0), args, kwargs)
    if boxed:
        return traverse_util.flatten_dict(variables["params"], is_leaf=lambda _, x: isinstance(x, meta.AxisMetadata))
    return _flat_shapes(variables["params"])


def input_channel_params(config: ml_collections.ConfigDict, boxed_shapes: dict) -> int:
    """Parameters of the input layer's condition channels: the share of every kernel with an `in_channels` logical
    axis that reads channels beyond the noisy latent's `latent_channels` (the DiT's patch embedding, the U-Net's
    conv_in)."""
    cin, lat = config_lib.in_channels(config), int(config.autoencoder.latent_channels)
    extra = 0
    for leaf in boxed_shapes.values():
        names = tuple(getattr(leaf, "names", ()) or ())
        if "in_channels" not in names:
            continue
        shape = tuple(int(d) for d in meta.unbox(leaf).shape)
        if shape[names.index("in_channels")] == cin:
            extra += _size({"x": meta.unbox(leaf)}) // cin * (cin - lat)
    return extra


def _text_encoder_init(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
    """(module, abstract params) of the configured frozen text encoder (`TEXT_ENCODERS` entry), nothing loaded."""
    enc = registry.text_encoder(config).build(config.text_encoder)
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    mask = jax.ShapeDtypeStruct((1, 8), jnp.bool_)
    return enc, jax.eval_shape(enc.init, jax.random.key(0), ids, mask)["params"]


def text_encoder_param_shapes(config: ml_collections.ConfigDict) -> dict:
    return _flat_shapes(_text_encoder_init(config)[1])


def autoencoder_param_shapes(config: ml_collections.ConfigDict) -> dict:
    """The frozen autoencoder's parameters (none for space_to_depth): the architecture from the folder
    `autoencoder.path` if given, else the released VAE's (`registry.abstract_autoencoder`)."""
    ae = registry.abstract_autoencoder(config.autoencoder)
    return {} if ae is None else _flat_shapes(ae.params)


def _lowered_flops(fn: Any, *args: Any) -> float:
    """XLA's HLO cost analysis of `jax.jit(fn)` lowered on abstract `args` (a `while` body counted once)."""
    cost = jax.jit(fn).lower(*args).cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float((cost or {}).get("flops", 0.0))


def text_encoder_flops(config: ml_collections.ConfigDict, rows: int, length: int) -> float:
    """FLOPs of the frozen text encoder's forward pass on `rows` prompts of `length` tokens: the scanned layer's
    cost (counted once by XLA) times the layer count (the embedding gather and final norm are negligible); T5 and
    CLIP both scan their layers."""
    if rows == 0:
        return 0.0
    enc, params = _text_encoder_init(config)
    ids = jax.ShapeDtypeStruct((rows, length), jnp.int32)
    mask = jax.ShapeDtypeStruct((rows, length), jnp.bool_)
    f = _lowered_flops(lambda p, i, m: enc.apply({"params": p}, i, m), meta.unbox(params), ids, mask)
    return f * int(config.text_encoder.num_layers)


def autoencoder_encode_flops(config: ml_collections.ConfigDict, clips: int, frames: int) -> float:
    """FLOPs of the frozen autoencoder's encoder on `clips` clips of `frames` frames at the data size, in one pass
    (`chunk=0`: a chunked encoder computes the same convolutions); 0 for one without parameters (space_to_depth: a
    reshape)."""
    d = config.data
    ae = registry.abstract_autoencoder(config.autoencoder)
    if ae is None or clips == 0:
        return 0.0
    video = jax.ShapeDtypeStruct((clips, frames, int(d.height), int(d.width), 3), jnp.float32)
    return _lowered_flops(lambda p, v: ae.raw_encode(ae.model, p, v, chunk=0), ae.params, video)


def frozen_encoder_flops(config: ml_collections.ConfigDict) -> dict[str, float]:
    """FLOPs the frozen encoders would spend in one training step at the global batch without cached inputs:
    `autoencoder` (the clips the stage encodes: video and trajectory for stage 2; trajectory and the first frame for
    stage 1; video for stage 0) and `text_encoder` (the stage's prompt, plus the K+1 local-prompt slots of a stage
    with added layers)."""
    b, d, t = int(config.train.batch_size), config.data, config.text_encoder
    kind, frames = config_lib.STAGES[int(config.stage)], int(d.num_frames)
    ae = autoencoder_encode_flops(config, b * kind.clips_encoded, frames)
    if kind.first_frame_encoded:
        ae += autoencoder_encode_flops(config, b, 1)
    text = text_encoder_flops(config, b, int(t.max_length))
    if kind.local_prompt_flops and int(config.model.ttm_layers) > 0:
        text += text_encoder_flops(config, b * (int(d.max_objects) + 1), int(t.local_max_length))
    return {"autoencoder": ae, "text_encoder": text}


def module_table(shapes: dict, depth: int = 2, *,
                 backbone: str = registry.DEFAULT_BACKBONE) -> list[tuple[str, int]]:
    """Parameter counts grouped by the backbone's rows (`Backbone.group`: by default the first `depth` path
    components; the U-Net's per level and kind), in tree order."""
    group = registry.BACKBONES.get(backbone).group
    groups: dict[str, int] = collections.OrderedDict()
    for path, s in shapes.items():
        key = group(path, depth)
        n = 1
        for d in s.shape:
            n *= int(d)
        groups[key] = groups.get(key, 0) + n
    return list(groups.items())


def train_step_flops(config: ml_collections.ConfigDict, compiled: bool = False) -> float:
    """FLOPs of one training step of the backbone (forward + backward, and the gradient-free first pass of
    `model.self_condition`) at the configured global batch."""
    c = _with_model(config, remat_policy="none", **registry.backbone(config).flops_overrides)  # module docstring
    model = registry.build_backbone(c)
    (x, t, ctx), extra = registry.init_inputs(c, batch=int(config.train.batch_size), full=True, abstract=True)
    args1, kw1 = registry.init_inputs(c, abstract=True)
    params = meta.unbox(jax.eval_shape(lambda r, a, kw: model.init(r, *a, **kw), jax.random.key(0), args1,
                                       kw1)["params"])

    def loss(p, x, t, c, kw):
        out = model.apply({"params": p}, x, t, c, **kw)
        return jnp.mean(jnp.square(out.astype(jnp.float32)))

    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), params)
    lowered = jax.jit(jax.grad(loss)).lower(params, x, t, ctx, extra)
    # XLA's HLO cost analysis of the lowered step: the same dot/conv FLOPs as after compilation (checked on the tiny
    # config), without paying minutes of CPU compilation for a 30-layer unrolled graph at 32k tokens.
    def flops(lowered_fn):
        cost = lowered_fn.cost_analysis() if compiled is False else lowered_fn.compile().cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0]
        return float(cost.get("flops", float("nan")))

    total = flops(lowered)
    if config_lib.self_condition(config):
        total += flops(jax.jit(lambda p, x, t, c, kw: model.apply({"params": p}, x, t, c, **kw)).lower(
            params, x, t, ctx, extra))
    return total


# ---- memory per device --------------------------------------------------------------------------------------------

GIB = 2.0**30


@dataclasses.dataclass
class MemoryPlan:
    """Bytes per device of a training step on a mesh (`memory_plan`). `rows`: (what, bytes, how) in table order."""

    mesh: dict[str, int]
    devices: int
    batch_per_device: int
    tokens_per_device: int
    rows: list[tuple[str, int, str]]

    @property
    def total(self) -> int:
        return sum(b for _, b, _ in self.rows)

    def row(self, prefix: str) -> int:
        """Bytes of the first row whose label starts with `prefix`."""
        return next(b for what, b, _ in self.rows if what.startswith(prefix))


def mesh_devices(config: ml_collections.ConfigDict, devices: int | None = None) -> int:
    """The device count to plan for: `devices`, else the product of `config.mesh` (shape x context) when no size is
    -1, else this host's `jax.device_count()`."""
    if devices is not None:
        return int(devices)
    sizes = [int(v) for v in dict(config.mesh.shape).values()]
    if -1 in sizes:
        return jax.device_count()
    return math.prod(sizes) * int(config.mesh.context)


def abstract_mesh(config: ml_collections.ConfigDict, devices: int | None = None) -> jax.sharding.AbstractMesh:
    """An `AbstractMesh` (no devices) of `config.mesh`'s sizes for `devices` devices (`mesh.resolve_shape`)."""
    sizes = mesh_lib.resolve_shape(config.mesh.shape, mesh_devices(config, devices), config.mesh.context)
    return jax.sharding.AbstractMesh(tuple(sizes[a] for a in mesh_lib.MESH_AXES), mesh_lib.MESH_AXES)


def sharded_bytes(boxed_tree: Any, mesh: Any, rules: Any, *, shard_unannotated: bool = True,
                  dtype: Any = None) -> int:
    """Bytes per device of a (boxed, abstract) tree placed with the project's shardings (`tree_shardings`) on
    `mesh` (an `AbstractMesh` is enough): the sum of each leaf's shard (`dtype` overrides the leaves' dtype)."""
    leaves = jax.tree.leaves(boxed_tree, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))
    shardings = jax.tree.leaves(sharding_lib.tree_shardings(boxed_tree, mesh, rules,
                                                            shard_unannotated=shard_unannotated))
    total = 0
    for leaf, sh in zip(leaves, shardings, strict=True):
        value = meta.unbox(leaf)
        item = jnp.dtype(dtype if dtype is not None else value.dtype).itemsize
        total += math.prod(sh.shard_shape(tuple(value.shape))) * item
    return total


def _boxed_params(config: ml_collections.ConfigDict) -> Any:
    model = registry.build_backbone(config)
    args, kwargs = registry.init_inputs(config, abstract=True)
    return jax.eval_shape(lambda rng, a, kw: model.init(rng, *a, **kw), jax.random.key(0), args, kwargs)["params"]


def video_tokens(config: ml_collections.ConfigDict) -> int:
    """Video tokens per example (`Backbone.video_tokens`: the DiT's patches of the latent grid, the U-Net's cells)."""
    return registry.backbone(config).video_tokens(config)


def activation_bytes(config: ml_collections.ConfigDict, mesh_sizes: dict[str, int]) -> tuple[int, int, int, str]:
    """(bytes per device, batch per device, tokens per device, how) of the saved activations: the backbone entry's
    estimate (`Backbone.activations`) for the tokens per device of the module docstring."""
    batch = -(-int(config.train.batch_size) // (mesh_sizes["data"] * mesh_sizes["fsdp"]))
    tokens = batch * video_tokens(config) // mesh_sizes["context"]
    estimate = registry.backbone(config).activations
    if estimate is None:
        return 0, batch, tokens, (f"not estimated for model.backbone={registry.backbone_name(config)!r} (its entry "
                                  f"has no activations formula)")
    nbytes, how = estimate(config, tokens, mesh_sizes["tensor"])
    return nbytes, batch, tokens, how


def memory_plan(config: ml_collections.ConfigDict, devices: int | None = None) -> MemoryPlan:
    """Bytes per device of one training step of `config` on its mesh over `devices` devices (module docstring)."""
    mesh = abstract_mesh(config, devices)
    sizes = dict(mesh.shape)
    rules = sharding_lib.rules_from_config(config.mesh)
    unannotated = bool(config.mesh.shard_unannotated)
    boxed = _boxed_params(config)
    params = sharded_bytes(boxed, mesh, rules, shard_unannotated=unannotated)
    pdt = jnp.dtype(config.model.param_dtype).name
    shard = ", ".join(f"{a}={n}" for a, n in sizes.items() if n > 1) or "one device"
    rows = [(f"parameters ({pdt})", params, f"the trainable backbone, sharded by config.mesh.rules ({shard})"),
            (f"gradients ({pdt})", params, "as the parameters"),
            ("optimizer state (AdamW mu, nu)", 2 * params, "two moments shaped, sharded and typed as the parameters")]
    ema = float(config.optim.ema_decay) > 0
    rows.append(("EMA parameters", params if ema else 0, "optim.ema_decay > 0" if ema else "optim.ema_decay = 0"))
    if bool(config.data.cached):
        rows.append(("frozen text encoder + autoencoder", 0, "data.cached: not in the step"))
    else:
        text = sharded_bytes(_text_encoder_init(config)[1], mesh, rules, shard_unannotated=unannotated)
        ae = registry.abstract_autoencoder(config.autoencoder)
        vae = 0 if ae is None else sharded_bytes(ae.params, mesh, rules, shard_unannotated=unannotated)
        rows.append(("frozen text encoder + autoencoder", text + vae,
                     f"{config.text_encoder.name} {text / GIB:.2f} GiB + {config.autoencoder.name} {vae / GIB:.2f} GiB"
                     f" (data.cached=True: 0)"))
    act, batch, tokens, how = activation_bytes(config, sizes)
    rows.append(("activations (estimate)", act, how))
    return MemoryPlan(mesh=sizes, devices=mesh.size, batch_per_device=batch, tokens_per_device=tokens, rows=rows)


def memory_markdown(config: ml_collections.ConfigDict, plan: MemoryPlan) -> str:
    """The plan as a markdown table (GiB = 2^30 bytes), headed by the mesh and the step's geometry."""
    d = config.data
    mesh = " x ".join(f"{a} {n}" for a, n in plan.mesh.items())
    lines = [f"Memory per device, {plan.devices} devices (mesh {mesh}); {d.num_frames}x{d.height}x{d.width}, "
             f"global batch {config.train.batch_size} ({plan.batch_per_device} per data shard), "
             f"{video_tokens(config):,} video tokens per example, {plan.tokens_per_device:,} per device",
             "", "| per device | GiB | how |", "|---|---:|---|"]
    for what, b, how in plan.rows:
        lines.append(f"| {what} | {b / GIB:.2f} | {how} |")
    lines.append(f"| **total** | **{plan.total / GIB:.2f}** | activations an estimate (a floor: no XLA temporaries) |")
    return "\n".join(lines)


def describe(config: ml_collections.ConfigDict, *, flops: bool = True, print_fn=print, memory: bool = True,
             devices: int | None = None) -> dict[str, int]:
    """Print the parameter table, `params: N`, `trainable: N`, FLOPs per step and (`memory`) the memory per device
    on `config.mesh` over `devices` devices (`memory_plan`); return the counts (and `memory_per_device`, bytes)."""
    name = registry.backbone_name(config)
    boxed = model_param_shapes(config, boxed=True)
    shapes = {k: meta.unbox(v) for k, v in boxed.items()}
    total = _size(shapes)
    k = int(config.model.ttm_layers)
    no_ttm_boxed = model_param_shapes(config, boxed=True, ttm_layers=0) if k else boxed
    no_ttm = _size({p: meta.unbox(v) for p, v in no_ttm_boxed.items()})
    added_inputs = input_channel_params(config, no_ttm_boxed)
    backbone = no_ttm - added_inputs
    latent = config.autoencoder.latent_channels
    cached = bool(config.data.cached)
    text_full = _size(text_encoder_param_shapes(config))
    vae_full = _size(autoencoder_param_shapes(config))
    # data.cached: the batches carry the latents and text embeddings (python -m ttm_jax.data.encode), so neither
    # frozen encoder is loaded into the step
    text, vae = (0, 0) if cached else (text_full, vae_full)
    where = registry.BACKBONES.get(name).ttm_where
    print_fn(f"config: stage {config.stage}, variant {config.get('variant', '?')}, backbone {name}")
    print_fn(f"{'module':<56} {'params':>16}")
    for group, n in module_table(shapes, backbone=name):
        print_fn(f"  {name}/{group:<{max(1, 52 - len(name))}} {n:>16,}")
    print_fn(f"{name + ' (trainable)':<56} {total:>16,}")
    layout = registry.BACKBONES.get(name).layout
    print_fn(f"  {'backbone (' + layout + ', ' + str(latent) + ' input channels)':<54} {backbone:>16,}")
    what = "stage conditions, self-conditioning" if config_lib.self_condition(config) else "stage conditions"
    print_fn(f"  {'added input channels (' + what + ')':<54} {added_inputs:>16,}")
    print_fn(f"  {'added TTM layers (' + str(k) + ' ' + where + ')':<54} {total - no_ttm:>16,}")
    if cached:
        print_fn(f"{'text encoder (' + config.text_encoder.name + '): cached, not loaded':<56} {0:>16,}"
                 f"   ({text_full:,} without data.cached)")
        print_fn(f"{'autoencoder (' + config.autoencoder.name + '): cached, not in the step':<56} {0:>16,}"
                 f"   ({vae_full:,} without data.cached)")
    else:
        print_fn(f"{'text encoder (' + config.text_encoder.name + ', frozen)':<56} {text:>16,}")
        print_fn(f"{'autoencoder (' + config.autoencoder.name + ', frozen)':<56} {vae:>16,}")
    params = total + text + vae
    print_fn(f"params: {params}")
    print_fn(f"trainable: {total}")
    print_fn(f"frozen: {text + vae}")
    out = {"params": params, "trainable": total, "frozen": text + vae, "backbone": backbone,
           "added_inputs": added_inputs, "added_ttm": total - no_ttm, "text_encoder": text, "autoencoder": vae,
           "cached": cached}
    if flops:
        f = train_step_flops(config)
        print_fn(f"flops per train step ({name} fwd+bwd, global batch {config.train.batch_size}): {f:.4g}")
        frozen = frozen_encoder_flops(config)
        would = frozen["autoencoder"] + frozen["text_encoder"]
        fe = 0.0 if cached else would
        print_fn(f"frozen encoder flops per train step (VAE encode {0.0 if cached else frozen['autoencoder']:.4g} + "
                 f"text encoder {0.0 if cached else frozen['text_encoder']:.4g}): {fe:.4g}"
                 + (f"   (cached: data.cached; {would:.4g} without)" if cached else ""))
        out["flops"] = f
        out["frozen_flops"] = fe
    if memory:
        plan = memory_plan(config, devices)
        print_fn("")
        print_fn(memory_markdown(config, plan))
        out["memory_per_device"] = plan.total
    return out
