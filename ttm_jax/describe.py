"""`--mode=describe`: what a config builds, without allocating it.

Every shape comes from `jax.eval_shape(init)`: no parameter memory is spent, so the 1.3B (or 14B) configs describe on
a laptop. With `data.cached` (latents and text embeddings from `python -m ttm_jax.data.encode`) the frozen text
encoder and autoencoder are not in the step: their rows show 0 (and what they would be). FLOPs per training step come
from XLA's cost analysis of the compiled forward + backward of the DiT on abstract inputs of the configured global
batch; the layers are unrolled for that count because XLA's cost analysis counts a `while` (scan) body once, not once
per trip. The frozen encoders' FLOPs (VAE encode, text encoder forward) are counted the same way, per step.
"""

from __future__ import annotations

import collections
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util
from flax.core import meta

from ttm_jax import config as config_lib
from ttm_jax.models import dit, text_encoder, wan_vae


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


def dit_inputs(config: ml_collections.ConfigDict, batch: int, in_channels: int | None = None
               ) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract DiT inputs for `batch` clips of the config's size (`dit.init_inputs`), as one dict: `x`,
    `timestep`, `context` and the TTM layers' inputs."""
    te = config.text_encoder
    cin = config_lib.in_channels(config) if in_channels is None else in_channels
    (x, timestep, context), kwargs = dit.init_inputs(
        dit.DiTConfig.from_config(config.model), cin, batch=batch, grid=config_lib.latent_shape(config)[:3],
        text_len=int(te.max_length), local_len=(int(config.data.max_objects) + 1) * int(te.local_max_length),
        abstract=True)
    return {"x": x, "timestep": timestep, "context": context, **kwargs}


def make_dit(config: ml_collections.ConfigDict, **model_overrides: Any) -> dit.DiT:
    m = ml_collections.ConfigDict(config.model.to_dict())
    in_ch = model_overrides.pop("in_channels", config_lib.in_channels(config))
    for k, v in model_overrides.items():
        m[k] = v
    return dit.DiT(config=m, in_channels=in_ch, out_channels=config.autoencoder.latent_channels)


def dit_param_shapes(config: ml_collections.ConfigDict, **model_overrides: Any) -> dict:
    """Flat {path: ShapeDtypeStruct} of the DiT's parameters, by `jax.eval_shape` (nothing allocated)."""
    model = make_dit(config, **model_overrides)
    cfg = config
    if "ttm_layers" in model_overrides:
        cfg = ml_collections.ConfigDict(config.to_dict())
        cfg.model.ttm_layers = model_overrides["ttm_layers"]
    inputs = dit_inputs(cfg, 1, in_channels=model.in_channels)
    variables = jax.eval_shape(
        lambda rng, inp: model.init(rng, inp.pop("x"), inp.pop("timestep"), inp.pop("context"), **inp),
        jax.random.key(0), dict(inputs),
    )
    return _flat_shapes(variables["params"])


def text_encoder_param_shapes(config: ml_collections.ConfigDict) -> dict:
    enc = text_encoder.T5Encoder(config.text_encoder)
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    mask = jax.ShapeDtypeStruct((1, 8), jnp.bool_)
    variables = jax.eval_shape(enc.init, jax.random.key(0), ids, mask)
    return _flat_shapes(variables["params"])


def autoencoder_param_shapes(config: ml_collections.ConfigDict) -> dict:
    """The frozen autoencoder's parameters (none for space_to_depth)."""
    if config.autoencoder.name == "space_to_depth":
        return {}
    # the architecture from the converted folder if given, else Wan 2.1's released VAE
    cfg = wan_vae.read_config(config.autoencoder.path) if config.autoencoder.path else wan_vae.WanVAEConfig()
    return _flat_shapes(wan_vae.param_shapes(wan_vae.WanVAE(cfg)))


def _lowered_flops(fn: Any, *args: Any) -> float:
    """XLA's HLO cost analysis of `jax.jit(fn)` lowered on abstract `args` (a `while` body counted once)."""
    cost = jax.jit(fn).lower(*args).cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float((cost or {}).get("flops", 0.0))


def text_encoder_flops(config: ml_collections.ConfigDict, rows: int, length: int) -> float:
    """FLOPs of the frozen text encoder's forward pass on `rows` prompts of `length` tokens: the scanned layer's
    cost (counted once by XLA) times the layer count (the embedding gather and final norm are negligible)."""
    if rows == 0:
        return 0.0
    enc = text_encoder.T5Encoder(config.text_encoder)
    one_ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    params = meta.unbox(jax.eval_shape(enc.init, jax.random.key(0), one_ids,
                                       jax.ShapeDtypeStruct((1, 8), jnp.bool_))["params"])
    ids = jax.ShapeDtypeStruct((rows, length), jnp.int32)
    mask = jax.ShapeDtypeStruct((rows, length), jnp.bool_)
    f = _lowered_flops(lambda p, i, m: enc.apply({"params": p}, i, m), params, ids, mask)
    return f * int(config.text_encoder.num_layers)


def autoencoder_encode_flops(config: ml_collections.ConfigDict, clips: int, frames: int) -> float:
    """FLOPs of the frozen autoencoder's encoder on `clips` clips of `frames` frames at the data size (the Wan VAE
    in one pass: its time chunks compute the same convolutions); 0 for space_to_depth (a reshape)."""
    a, d = config.autoencoder, config.data
    if a.name == "space_to_depth" or clips == 0:
        return 0.0
    if a.name != "wan":
        return float("nan")  # not counted here
    model = wan_vae.WanVAE(wan_vae.read_config(a.path) if a.path else wan_vae.WanVAEConfig())
    video = jax.ShapeDtypeStruct((clips, frames, int(d.height), int(d.width), 3), jnp.float32)
    return _lowered_flops(lambda p, v: wan_vae.encode(model, p, v, chunk=0), wan_vae.param_shapes(model), video)


def frozen_encoder_flops(config: ml_collections.ConfigDict) -> dict[str, float]:
    """FLOPs the frozen encoders would spend in one training step at the global batch without cached inputs:
    `autoencoder` (the clips the stage encodes: video and trajectory for stage 2; trajectory and the first frame for
    stage 1; video for stage 0) and `text_encoder` (the stage's prompt, plus the K+1 local-prompt slots of a stage
    with added layers)."""
    b, d, t = int(config.train.batch_size), config.data, config.text_encoder
    stage, frames = int(config.stage), int(d.num_frames)
    if stage == 1:
        ae = autoencoder_encode_flops(config, b, frames) + autoencoder_encode_flops(config, b, 1)
    else:
        ae = autoencoder_encode_flops(config, b * (2 if stage == 2 else 1), frames)
    text = text_encoder_flops(config, b, int(t.max_length))
    if stage in (0, 2) and int(config.model.ttm_layers) > 0:
        text += text_encoder_flops(config, b * (int(d.max_objects) + 1), int(t.local_max_length))
    return {"autoencoder": ae, "text_encoder": text}


def module_table(shapes: dict, depth: int = 2) -> list[tuple[str, int]]:
    """Parameter counts grouped by the first `depth` path components, in tree order."""
    groups: dict[str, int] = collections.OrderedDict()
    for path, s in shapes.items():
        key = "/".join(path[:depth]) if len(path) > depth else "/".join(path[:-1]) or path[0]
        n = 1
        for d in s.shape:
            n *= int(d)
        groups[key] = groups.get(key, 0) + n
    return list(groups.items())


def train_step_flops(config: ml_collections.ConfigDict, compiled: bool = False) -> float:
    """FLOPs of one training step of the DiT (forward + backward) at the configured global batch."""
    m = ml_collections.ConfigDict(config.model.to_dict())
    m.scan_layers = False  # see the module docstring
    m.remat_policy = "none"
    model = dit.DiT(config=m, in_channels=config_lib.in_channels(config),
                    out_channels=config.autoencoder.latent_channels)
    batch = config.train.batch_size
    inputs = dit_inputs(config, batch)
    extra = {k: v for k, v in inputs.items() if k not in ("x", "timestep", "context")}
    one = {k: jax.ShapeDtypeStruct((1,) + v.shape[1:], v.dtype) for k, v in inputs.items()}
    params = jax.eval_shape(
        lambda r, inp: model.init(r, inp.pop("x"), inp.pop("timestep"), inp.pop("context"), **inp),
        jax.random.key(0), one,
    )["params"]

    def loss(p, x, t, c, kw):
        out = model.apply({"params": p}, x, t, c, **kw)
        return jnp.mean(jnp.square(out.astype(jnp.float32)))

    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), meta.unbox(params))
    lowered = jax.jit(jax.grad(loss)).lower(params, inputs["x"], inputs["timestep"], inputs["context"], extra)
    # XLA's HLO cost analysis of the lowered step: the same dot/conv FLOPs as after compilation (checked on the tiny
    # config), without paying minutes of CPU compilation for a 30-layer unrolled graph at 32k tokens.
    cost = lowered.cost_analysis() if compiled is False else lowered.compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


def describe(config: ml_collections.ConfigDict, *, flops: bool = True, print_fn=print) -> dict[str, int]:
    """Print the parameter table, `params: N`, `trainable: N` and FLOPs per step; return the counts."""
    dit_shapes = dit_param_shapes(config)
    latent = config.autoencoder.latent_channels
    backbone = _size(dit_param_shapes(config, ttm_layers=0, in_channels=latent))
    dit_total = _size(dit_shapes)
    no_ttm = _size(dit_param_shapes(config, ttm_layers=0))
    cached = bool(config.data.get("cached", False))
    text_full = _size(text_encoder_param_shapes(config))
    vae_full = _size(autoencoder_param_shapes(config))
    # data.cached: the batches carry the latents and text embeddings (python -m ttm_jax.data.encode), so neither
    # frozen encoder is loaded into the step
    text, vae = (0, 0) if cached else (text_full, vae_full)
    print_fn(f"config: stage {config.stage}, variant {config.get('variant', '?')}")
    print_fn(f"{'module':<56} {'params':>16}")
    for name, n in module_table(dit_shapes):
        print_fn(f"  dit/{name:<52} {n:>16,}")
    print_fn(f"{'dit (trainable)':<56} {dit_total:>16,}")
    print_fn(f"  {'backbone (Wan 2.1 layout, ' + str(latent) + ' input channels)':<54} {backbone:>16,}")
    print_fn(f"  {'added input channels (stage conditions)':<54} {no_ttm - backbone:>16,}")
    print_fn(f"  {'added TTM layers (' + str(config.model.ttm_layers) + ' blocks)':<54} {dit_total - no_ttm:>16,}")
    if cached:
        print_fn(f"{'text encoder (' + config.text_encoder.name + '): cached, not loaded':<56} {0:>16,}"
                 f"   ({text_full:,} without data.cached)")
        print_fn(f"{'autoencoder (' + config.autoencoder.name + '): cached, not in the step':<56} {0:>16,}"
                 f"   ({vae_full:,} without data.cached)")
    else:
        print_fn(f"{'text encoder (' + config.text_encoder.name + ', frozen)':<56} {text:>16,}")
        print_fn(f"{'autoencoder (' + config.autoencoder.name + ', frozen)':<56} {vae:>16,}")
    total = dit_total + text + vae
    print_fn(f"params: {total}")
    print_fn(f"trainable: {dit_total}")
    out = {"params": total, "trainable": dit_total, "backbone": backbone, "text_encoder": text, "autoencoder": vae,
           "cached": cached}
    if flops:
        f = train_step_flops(config)
        print_fn(f"flops per train step (DiT fwd+bwd, global batch {config.train.batch_size}): {f:.4g}")
        frozen = frozen_encoder_flops(config)
        would = frozen["autoencoder"] + frozen["text_encoder"]
        fe = 0.0 if cached else would
        print_fn(f"frozen encoder flops per train step (VAE encode {0.0 if cached else frozen['autoencoder']:.4g} + "
                 f"text encoder {0.0 if cached else frozen['text_encoder']:.4g}): {fe:.4g}"
                 + (f"   (cached: data.cached; {would:.4g} without)" if cached else ""))
        out["flops"] = f
        out["frozen_flops"] = fe
    return out
