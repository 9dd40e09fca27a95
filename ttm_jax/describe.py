"""`--mode=describe`: what a config builds, without allocating it.

Every shape comes from `jax.eval_shape(init)`: no parameter memory is spent, so the 1.3B (or 14B) configs describe on
a laptop. The trained model is the configured backbone (`config.model.backbone`: the DiT, the AnimateDiff U-Net, or
any `BACKBONES` entry), built and fed through its registry entry; its table is broken down by the first levels of
its parameter tree, and its count split into the backbone (the stage's extra condition input channels and TTM's added
layers taken off: what a converted diffusers checkpoint holds), the added input channels (found by the logical axis
`in_channels` of the input layer) and the added layers (`config.model.ttm_layers`). With `data.cached` (latents and
text embeddings from `python -m ttm_jax.data.encode`) the frozen text encoder and autoencoder are not in the step:
their rows show 0 (and what they would be). FLOPs per training step come from XLA's cost analysis of the lowered
forward + backward of the backbone on abstract inputs of the configured global batch; the DiT's layers are unrolled
for that count because XLA's cost analysis counts a `while` (scan) body once, not once per trip. The frozen encoders'
FLOPs (VAE encode, text encoder forward) are counted the same way, per step.

Memory per device (`memory_plan`, `memory_markdown`; printed by describe as a markdown table) for the mesh of
`config.mesh` (`--config.mesh.shape.{data,fsdp,tensor}=..`, `--config.mesh.context=N`) on `devices` devices (the
`--describe_devices` flag; default: the mesh's own product when it has no -1, else this host's devices), computed,
not run: the shardings come from `config.mesh.rules` through `runtime/sharding.tree_shardings` on a
`jax.sharding.AbstractMesh` of those sizes, and each parameter's bytes per device are its shard's. Rows: trainable
parameters (`model.param_dtype`), their gradients (the same shardings and dtype), the AdamW state (two moments
shaped and sharded as the params, in the params' dtype: optax's default), the EMA copy when `optim.ema_decay` > 0,
the frozen text encoder and autoencoder (0 with `data.cached`), and the activations, an ESTIMATE:

  activations = layers x tokens per device x values saved per token and layer x bytes of `model.dtype`
                (+ one layer's full set, recomputed in the backward pass, under remat_policy=full)
  tokens per device = ceil(batch / (data x fsdp)) x N / context   (N video tokens of the latent, per example)
  values per token and layer (D = dim, F = ffn_dim, t = mesh tensor size; `_SAVED`):
    none           8 D + (19 D + 2 F) / t       every block intermediate (norms, residuals, q/k/v before and after
                                                 norm and RoPE, attention outputs, FFN hidden before and after GELU)
    dots,
    dots_no_batch  3 D + (10 D + F) / t         the projections' outputs and the attention residuals (q, k, v, o)
    full           D                            the block input only
  TTM's blocks add 4 D + 11 D / t (none), 2 D + 10 D / t (dots). Not counted: the attention's own working set (the
  Pallas / splash kernels keep O(tokens) statistics; the XLA fallback holds [heads, Lq, Lk] logits per layer), the
  text embeddings (~10^2 tokens), XLA's temporaries and fragmentation: read the figure as a floor.
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
from ttm_jax.backbones.animatediff import vae as sd_vae
from ttm_jax.backbones.wan import vae as wan_vae
from ttm_jax.runtime import mesh as mesh_lib
from ttm_jax.runtime import sharding as sharding_lib

# how the backbone's own count is labelled (the layout a converted checkpoint has)


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


def dit_param_shapes(config: ml_collections.ConfigDict, **model_overrides: Any) -> dict:
    """The DiT's (any backbone's) flat parameter shapes: `model_param_shapes` (kept for callers of the old name)."""
    return model_param_shapes(config, **model_overrides)


def _text_encoder_init(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
    """(module, abstract params) of the configured frozen text encoder (`TEXT_ENCODERS` entry), nothing loaded."""
    enc = registry.text_encoder(config).build(config.text_encoder)
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    mask = jax.ShapeDtypeStruct((1, 8), jnp.bool_)
    return enc, jax.eval_shape(enc.init, jax.random.key(0), ids, mask)["params"]


def text_encoder_param_shapes(config: ml_collections.ConfigDict) -> dict:
    return _flat_shapes(_text_encoder_init(config)[1])


def _sd_vae(config: ml_collections.ConfigDict) -> sd_vae.SDVAE:
    a = config.autoencoder
    return sd_vae.SDVAE(sd_vae.read_config(a.path) if a.path else sd_vae.SDVAEConfig())


def _wan_vae(config: ml_collections.ConfigDict) -> wan_vae.WanVAE:
    a = config.autoencoder
    return wan_vae.WanVAE(wan_vae.read_config(a.path) if a.path else wan_vae.WanVAEConfig())


def autoencoder_param_shapes(config: ml_collections.ConfigDict) -> dict:
    """The frozen autoencoder's parameters (none for space_to_depth): the architecture from the folder
    `autoencoder.path` if given, else the released VAE's (Wan 2.1's, SD 1.5's)."""
    name = config.autoencoder.name
    if name == "space_to_depth":
        return {}
    if name == "sd":
        return _flat_shapes(sd_vae.param_shapes(_sd_vae(config)))
    return _flat_shapes(wan_vae.param_shapes(_wan_vae(config)))


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
    """FLOPs of the frozen autoencoder's encoder on `clips` clips of `frames` frames at the data size (the Wan VAE
    in one pass: its time chunks compute the same convolutions; the SD VAE on every frame at once); 0 for
    space_to_depth (a reshape)."""
    a, d = config.autoencoder, config.data
    if a.name == "space_to_depth" or clips == 0:
        return 0.0
    video = jax.ShapeDtypeStruct((clips, frames, int(d.height), int(d.width), 3), jnp.float32)
    if a.name == "sd":
        model = _sd_vae(config)
        return _lowered_flops(lambda p, v: sd_vae.encode(model, p, v, chunk=0), sd_vae.param_shapes(model), video)
    if a.name != "wan":
        return float("nan")  # not counted here
    model = _wan_vae(config)
    return _lowered_flops(lambda p, v: wan_vae.encode(model, p, v, chunk=0), wan_vae.param_shapes(model), video)


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


def module_table(shapes: dict, depth: int = 2, *, backbone: str = "dit") -> list[tuple[str, int]]:
    """Parameter counts grouped by the backbone's rows (`Backbone.group`, e.g. the U-Net's per level and kind; none:
    the first `depth` path components), in tree order."""
    group = registry.BACKBONES.get(backbone).group
    groups: dict[str, int] = collections.OrderedDict()
    for path, s in shapes.items():
        if group is not None:
            key = group(path, depth)
        else:
            key = "/".join(path[:depth]) if len(path) > depth else "/".join(path[:-1]) or path[0]
        n = 1
        for d in s.shape:
            n *= int(d)
        groups[key] = groups.get(key, 0) + n
    return list(groups.items())


def train_step_flops(config: ml_collections.ConfigDict, compiled: bool = False) -> float:
    """FLOPs of one training step of the backbone (forward + backward, and the gradient-free first pass of
    `model.self_condition`) at the configured global batch."""
    overrides: dict[str, Any] = {"remat_policy": "none"}
    if registry.backbone_name(config) == "dit":
        overrides["scan_layers"] = False  # see the module docstring
    c = _with_model(config, **overrides)
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

# values saved per token and layer by remat policy: (D-wide, not split; D-wide split over tensor; F-wide split over
# tensor), and what TTM's two added layers add in their blocks (module docstring)
_SAVED = {"none": ((8, 19, 2), (4, 11, 0)), "dots": ((3, 10, 1), (2, 10, 0)), "dots_no_batch": ((3, 10, 1), (2, 10, 0)),
          "full": ((1, 0, 0), (0, 0, 0))}
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
    """Video tokens per example: the latent grid over the DiT's patch (`config.grid_step`-free: the U-Net's 1)."""
    t, h, w = config_lib.latent_shape(config)[:3]
    patch = tuple(config.model.get("patch_size", (1, 1, 1)))
    return (t // patch[0]) * (h // patch[1]) * (w // patch[2])


def activation_bytes(config: ml_collections.ConfigDict, mesh_sizes: dict[str, int]) -> tuple[int, int, int, str]:
    """(bytes per device, batch per device, tokens per device, formula) of the saved activations: the estimate of
    the module docstring."""
    m = config.model
    batch = -(-int(config.train.batch_size) // (mesh_sizes["data"] * mesh_sizes["fsdp"]))
    tokens = batch * video_tokens(config) // mesh_sizes["context"]
    d, f, t = int(m.get("dim", 0)), int(m.get("ffn_dim", 0)), mesh_sizes["tensor"]
    if not d:  # the formula counts a transformer block's values per token; the U-Net has no such width
        return 0, batch, tokens, f"not estimated for model.backbone={m.get('backbone', 'dit')!r} (the DiT's formula)"
    policy = m.remat_policy
    (a, b, c), (ta, tb, tc) = _SAVED.get(policy, _SAVED["none"])
    per_token = a * d + (b * d + c * f) / t
    ttm_extra = ta * d + (tb * d + tc * f) / t
    layers, k = int(m.get("num_layers", 0)), int(m.ttm_layers)
    item = jnp.dtype(m.dtype).itemsize
    values = layers * per_token + k * ttm_extra
    how = f"{layers} layers x {tokens:,} tokens x {per_token / d:.3g} D"
    if k and ttm_extra:
        how += f" (+{ttm_extra / d:.3g} D in {k} TTM blocks)"
    if policy == "full":
        (a2, b2, c2), _ = _SAVED["none"]
        values += a2 * d + (b2 * d + c2 * f) / t
        how += " + one layer's full set (recomputed in the backward)"
    how += f", D={d}, {jnp.dtype(m.dtype).name}, remat {policy}: ESTIMATE"
    return int(values * tokens * item), batch, tokens, how


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
        vae = 0
        if config.autoencoder.name == "wan":
            vae = sharded_bytes(wan_vae.param_shapes(_wan_vae(config)), mesh, rules, shard_unannotated=unannotated)
        elif config.autoencoder.name == "sd":
            vae = sharded_bytes(sd_vae.param_shapes(_sd_vae(config)), mesh, rules, shard_unannotated=unannotated)
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
