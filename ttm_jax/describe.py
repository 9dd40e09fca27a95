"""`--mode=describe`: what a config builds, without allocating it.

Every shape comes from `jax.eval_shape(init)`: no parameter memory is spent, so the 1.3B (or 14B) configs describe on
a laptop. FLOPs per training step come from XLA's cost analysis of the compiled forward + backward of the DiT on
abstract inputs of the configured global batch; the layers are unrolled for that count because XLA's cost analysis
counts a `while` (scan) body once, not once per trip.
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
    text = _size(text_encoder_param_shapes(config))
    vae = _size(autoencoder_param_shapes(config))
    print_fn(f"config: stage {config.stage}, variant {config.get('variant', '?')}")
    print_fn(f"{'module':<56} {'params':>16}")
    for name, n in module_table(dit_shapes):
        print_fn(f"  dit/{name:<52} {n:>16,}")
    print_fn(f"{'dit (trainable)':<56} {dit_total:>16,}")
    print_fn(f"  {'backbone (Wan 2.1 layout, ' + str(latent) + ' input channels)':<54} {backbone:>16,}")
    print_fn(f"  {'added input channels (stage conditions)':<54} {no_ttm - backbone:>16,}")
    print_fn(f"  {'added TTM layers (' + str(config.model.ttm_layers) + ' blocks)':<54} {dit_total - no_ttm:>16,}")
    print_fn(f"{'text encoder (' + config.text_encoder.name + ', frozen)':<56} {text:>16,}")
    print_fn(f"{'autoencoder (' + config.autoencoder.name + ', frozen)':<56} {vae:>16,}")
    total = dit_total + text + vae
    print_fn(f"params: {total}")
    print_fn(f"trainable: {dit_total}")
    out = {"params": total, "trainable": dit_total, "backbone": backbone, "text_encoder": text, "autoencoder": vae}
    if flops:
        f = train_step_flops(config)
        print_fn(f"flops per train step (DiT fwd+bwd, global batch {config.train.batch_size}): {f:.4g}")
        out["flops"] = f
    return out
