"""CLIP (text and vision transformers) in Flax Linen, numerically equal to transformers' `CLIPModel`.

One implementation for two users: the evaluation metrics (`ttm_jax/eval/clip_score.py`: image and text embeddings)
and a U-Net backbone's frozen text encoder (SD 1.5 cross-attends to the text tower's `last_hidden_state`).

Both towers are pre-LayerNorm transformers (`x + attn(ln1(x))`, `x + fc2(act(fc1(ln2(x))))`, scaled dot-product
attention with biased q/k/v/out projections), layers in one `nn.scan` (params stacked on a leading `layers` axis).

- Text: token + learned position embeddings -> causal self-attention blocks (padding keys masked too) -> final
  LayerNorm = `last_hidden_state [B, L, D]`; pooled = the row at the end-of-text token, picked as transformers'
  `CLIPTextTransformer` does: with `eos_token_id == 2` (configs saved before transformers PR #24773) the position of
  the largest id, else the first position holding `eos_token_id` (0 when there is none); text features =
  `text_projection(pooled)`.
- Vision: images channels-last `[B, S, S, C]` (already resized and normalised, S = `image_size`) -> patch conv
  (stride = kernel = `patch_size`, no bias), patches row-major -> class token prepended -> position embeddings ->
  `pre_layrnorm` -> blocks -> `post_layernorm` of the class token -> `visual_projection`.

    spec = CLIPSpec.from_hf(json.load(open("<folder>/config.json")))  # a CLIPModel or CLIPTextModel config
    model = CLIP(spec)
    model.apply({"params": p}, ids, mask, method="get_text_features")      # [B, projection_dim]
    model.apply({"params": p}, images, method="get_image_features")        # [B, projection_dim]
    model.apply({"params": p}, ids, mask, method="text_hidden_states")     # [B, L, D]

`mask` (bool `[B, L]`, True = real token) is optional: SD 1.5 calls its text encoder without one (causal only).
Params in `param_dtype` (float32 default); matmuls in `dtype`, LayerNorm and softmax in float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# transformers' `hidden_act` names -> activation (quick_gelu: OpenAI CLIP; gelu (erf): OpenCLIP, e.g. SD 2's encoder)
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class TowerSpec:
    """The shape of one transformer tower (hashable, so it can be a static jit argument)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    hidden_act: str = "quick_gelu"
    eps: float = 1e-5

    @classmethod
    def from_hf(cls, hf: dict, where: str) -> TowerSpec:
        act = hf.get("hidden_act", "quick_gelu")
        if act not in ACTIVATIONS:
            raise ValueError(f"{where}: hidden_act {act!r} is not supported; choose one of {sorted(ACTIVATIONS)}")
        spec = cls(hidden_size=int(hf["hidden_size"]), intermediate_size=int(hf["intermediate_size"]),
                   num_layers=int(hf["num_hidden_layers"]), num_heads=int(hf["num_attention_heads"]),
                   hidden_act=act, eps=float(hf.get("layer_norm_eps", 1e-5)))
        if spec.hidden_size % spec.num_heads:
            raise ValueError(f"{where}: hidden_size {spec.hidden_size} does not split into num_attention_heads "
                             f"{spec.num_heads} heads")
        return spec


@dataclasses.dataclass(frozen=True)
class TextSpec:
    tower: TowerSpec
    vocab_size: int
    max_positions: int
    eos_token_id: int


@dataclasses.dataclass(frozen=True)
class VisionSpec:
    tower: TowerSpec
    image_size: int
    patch_size: int
    num_channels: int = 3

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class CLIPSpec:
    """A CLIP model: the text tower, optionally the vision tower, and `projection_dim` (None: no projections, as a
    bare `CLIPTextModel`)."""

    text: TextSpec
    vision: VisionSpec | None = None
    projection_dim: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"

    @classmethod
    def from_hf(cls, hf: dict, *, where: str = "config.json", dtype: str = "float32",
                param_dtype: str = "float32") -> CLIPSpec:
        """From a transformers `config.json` dict: `model_type` "clip" (`CLIPModel`: both towers and projections)
        or "clip_text_model" (`CLIPTextModel`: text tower only, e.g. SD 1.5's `text_encoder/`; with
        `CLIPTextModelWithProjection` in `architectures`, its `text_projection` too)."""
        kind = hf.get("model_type")
        if kind == "clip":
            text_hf, vision_hf = hf.get("text_config") or {}, hf.get("vision_config") or {}
            projection = int(hf.get("projection_dim", 512))
        elif kind == "clip_text_model":
            text_hf, vision_hf = hf, None
            with_proj = any("WithProjection" in a for a in hf.get("architectures") or ())
            projection = int(hf.get("projection_dim", 512)) if with_proj else None
        else:
            raise ValueError(f"{where}: model_type {kind!r} is not a CLIP model; expected 'clip' (CLIPModel) or "
                             f"'clip_text_model' (CLIPTextModel)")
        text = TextSpec(TowerSpec.from_hf(text_hf, f"{where}: text_config"), vocab_size=int(text_hf["vocab_size"]),
                        max_positions=int(text_hf.get("max_position_embeddings", 77)),
                        eos_token_id=int(text_hf.get("eos_token_id", 2)))
        vision = None
        if vision_hf is not None:
            vision = VisionSpec(TowerSpec.from_hf(vision_hf, f"{where}: vision_config"),
                                image_size=int(vision_hf.get("image_size", 224)),
                                patch_size=int(vision_hf.get("patch_size", 32)),
                                num_channels=int(vision_hf.get("num_channels", 3)))
            if vision.image_size % vision.patch_size:
                raise ValueError(f"{where}: vision_config.image_size {vision.image_size} is not a multiple of "
                                 f"patch_size {vision.patch_size}")
        return cls(text=text, vision=vision, projection_dim=projection, dtype=dtype, param_dtype=param_dtype)


def _dense(features: int, names: tuple[str | None, str | None], spec: CLIPSpec, name: str, *,
           use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=spec.dtype, param_dtype=spec.param_dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), names),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (names[1],)))


def _layer_norm(spec: CLIPSpec, eps: float, name: str) -> nn.LayerNorm:
    # two-pass variance (as torch), float32 statistics whatever the compute dtype
    return nn.LayerNorm(epsilon=eps, dtype=spec.dtype, param_dtype=spec.param_dtype, use_fast_variance=False,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("text_embed",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("text_embed",)), name=name)


class Attention(nn.Module):
    """Multi-head self-attention, logits scaled by `head_dim ** -0.5`: `[B, L, D] -> [B, L, D]`; `allowed` bool
    `[B, 1, L, L]` or None (everything allowed)."""

    spec: CLIPSpec
    tower: TowerSpec

    @nn.compact
    def __call__(self, x: jax.Array, allowed: jax.Array | None) -> jax.Array:
        t = self.tower
        b, length, d = x.shape
        head_dim = d // t.num_heads
        q, k, v = (_dense(d, ("text_embed", "heads"), self.spec, f"{n}_proj")(x).reshape(b, length, t.num_heads,
                                                                                         head_dim)
                   for n in "qkv")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * head_dim**-0.5
        if allowed is not None:
            # a row with no allowed key (left padding) gets uniform weights: finite, never NaN
            logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.spec.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, d)
        return _dense(d, ("heads", "text_embed"), self.spec, "out_proj")(out)


class EncoderLayer(nn.Module):
    """One pre-LayerNorm block, the body of the `nn.scan`: `(x [B, L, D], allowed) -> (x, None)`."""

    spec: CLIPSpec
    tower: TowerSpec

    @nn.compact
    def __call__(self, x: jax.Array, allowed: jax.Array | None):
        t = self.tower
        x = x + Attention(self.spec, t, name="self_attn")(_layer_norm(self.spec, t.eps, "layer_norm1")(x), allowed)
        h = _layer_norm(self.spec, t.eps, "layer_norm2")(x)
        h = ACTIVATIONS[t.hidden_act](_dense(t.intermediate_size, ("text_embed", "mlp"), self.spec, "fc1")(h))
        return x + _dense(t.hidden_size, ("mlp", "text_embed"), self.spec, "fc2")(h), None


class Encoder(nn.Module):
    """`num_layers` blocks as one scan: `[B, L, D] -> [B, L, D]`."""

    spec: CLIPSpec
    tower: TowerSpec

    @nn.compact
    def __call__(self, x: jax.Array, allowed: jax.Array | None) -> jax.Array:
        layers = nn.scan(EncoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=nn.broadcast, length=self.tower.num_layers,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = layers(self.spec, self.tower, name="layers")(x, allowed)
        return x


def _embed(num: int, features: int, spec: CLIPSpec, names: tuple[str | None, str], std: float,
           name: str) -> nn.Embed:
    return nn.Embed(num, features, dtype=spec.dtype, param_dtype=spec.param_dtype, name=name,
                    embedding_init=nn.with_logical_partitioning(nn.initializers.normal(std), names))


def eos_positions(ids: jax.Array, eos_token_id: int) -> jax.Array:
    """int32 `[B]`: where transformers' `CLIPTextTransformer` pools each row of `ids [B, L]`: the largest id's
    (first) position for legacy configs with `eos_token_id == 2`, else the first `eos_token_id` (0 when absent)."""
    if eos_token_id == 2:
        return jnp.argmax(ids, axis=-1).astype(jnp.int32)
    return jnp.argmax(ids == eos_token_id, axis=-1).astype(jnp.int32)


class TextTransformer(nn.Module):
    """`(ids int32 [B, L], mask bool [B, L] or None) -> (last_hidden_state [B, L, D], pooled [B, D])`."""

    spec: CLIPSpec

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        s = self.spec.text
        d = s.tower.hidden_size
        ids = jnp.asarray(ids, jnp.int32)
        length = ids.shape[1]
        if length > s.max_positions:
            raise ValueError(f"CLIP text: {length} tokens, more than max_position_embeddings {s.max_positions}; "
                             f"truncate the tokens to {s.max_positions}")
        x = _embed(s.vocab_size, d, self.spec, ("vocab", "text_embed"), 0.02, "token_embedding")(ids)
        pos = _embed(s.max_positions, d, self.spec, (None, "text_embed"), 0.01, "position_embedding")
        x = x + pos(jnp.arange(length))[None]
        allowed = jnp.tril(jnp.ones((length, length), bool))[None, None]
        if mask is not None:
            allowed = allowed & jnp.asarray(mask, bool)[:, None, None, :]
        x = Encoder(self.spec, s.tower, name="encoder")(x, allowed)
        x = _layer_norm(self.spec, s.tower.eps, "final_layer_norm")(x)
        pooled = jnp.take_along_axis(x, eos_positions(ids, s.eos_token_id)[:, None, None], axis=1)[:, 0]
        return x, pooled


class VisionTransformer(nn.Module):
    """`images [B, S, S, C]` (normalised, channels-last) -> (last_hidden_state [B, 1 + (S/p)^2, D], pooled [B, D])."""

    spec: CLIPSpec

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        v = self.spec.vision
        d = v.tower.hidden_size
        b, h, w, c = images.shape
        if (h, w, c) != (v.image_size, v.image_size, v.num_channels):
            raise ValueError(f"CLIP vision: images are {h}x{w}x{c}, the model takes {v.image_size}x{v.image_size}x"
                             f"{v.num_channels}; resize and crop them first (ttm_jax.eval.clip_score.preprocess)")
        patches = nn.Conv(d, (v.patch_size, v.patch_size), strides=(v.patch_size, v.patch_size), padding="VALID",
                          use_bias=False, dtype=self.spec.dtype, param_dtype=self.spec.param_dtype,
                          kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                   (None, None, None, "text_embed")),
                          name="patch_embedding")(images.astype(self.spec.dtype))
        patches = patches.reshape(b, v.grid * v.grid, d)  # row-major over the patch grid, as torch's flatten(2)
        cls = self.param("class_embedding", nn.with_logical_partitioning(nn.initializers.normal(d**-0.5),
                                                                         ("text_embed",)), (d,), self.spec.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(patches.dtype), (b, 1, d)), patches], axis=1)
        pos = _embed(v.grid * v.grid + 1, d, self.spec, (None, "text_embed"), 0.02, "position_embedding")
        x = x + pos(jnp.arange(v.grid * v.grid + 1))[None]
        x = _layer_norm(self.spec, v.tower.eps, "pre_layrnorm")(x)
        x = Encoder(self.spec, v.tower, name="encoder")(x, None)
        return x, _layer_norm(self.spec, v.tower.eps, "post_layernorm")(x[:, 0])


class CLIP(nn.Module):
    """The CLIP model of `spec`; see the module docstring. `__call__` (for `init`) runs every part the spec has."""

    spec: CLIPSpec

    def setup(self):
        s = self.spec
        self.text_model = TextTransformer(s)
        if s.projection_dim is not None:
            self.text_projection = _dense(s.projection_dim, ("text_embed", None), s, "text_projection", use_bias=False)
        if s.vision is not None:
            self.vision_model = VisionTransformer(s)
            self.visual_projection = _dense(s.projection_dim, ("text_embed", None), s, "visual_projection",
                                            use_bias=False)
            # CLIPModel's learned temperature: kept so a checkpoint converts both ways; the metrics do not use it
            self.logit_scale = self.param("logit_scale", nn.with_logical_partitioning(
                nn.initializers.constant(2.6592), ()), (), s.param_dtype)

    def text_hidden_states(self, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """`[B, L, D]` after the final LayerNorm: what SD 1.5's U-Net cross-attends to."""
        return self.text_model(ids, mask)[0]

    def get_text_features(self, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """`[B, projection_dim]`: the projected end-of-text row (not normalised)."""
        if self.spec.projection_dim is None:
            raise ValueError("CLIP: this text-only model (CLIPTextModel) has no text_projection; load a CLIPModel or "
                             "CLIPTextModelWithProjection folder for text features")
        return self.text_projection(self.text_model(ids, mask)[1])

    def get_image_features(self, images: jax.Array) -> jax.Array:
        """`images [B, S, S, C]` normalised -> `[B, projection_dim]` (not normalised)."""
        if self.spec.vision is None:
            raise ValueError("CLIP: this text-only model has no vision tower; load a CLIPModel folder")
        return self.visual_projection(self.vision_model(images)[1])

    def __call__(self, ids: jax.Array, mask: jax.Array | None = None, images: jax.Array | None = None) -> dict:
        out = {"last_hidden_state": self.text_hidden_states(ids, mask)}
        if self.spec.projection_dim is not None:
            out["text_embeds"] = self.get_text_features(ids, mask)
        if self.spec.vision is not None and images is not None:
            out["image_embeds"] = self.get_image_features(images)
        return out


def init_inputs(spec: CLIPSpec, batch: int = 1) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Abstract `(ids, mask, images)` that build every parameter of `CLIP(spec)` (`images` None for text-only)."""
    ids = jax.ShapeDtypeStruct((batch, spec.text.max_positions), jnp.int32)
    mask = jax.ShapeDtypeStruct((batch, spec.text.max_positions), jnp.bool_)
    images = None
    if spec.vision is not None:
        v = spec.vision
        images = jax.ShapeDtypeStruct((batch, v.image_size, v.image_size, v.num_channels), jnp.float32)
    return ids, mask, images


def init_params(spec: CLIPSpec, rng: jax.Array) -> dict[str, Any]:
    """Random parameters (unboxed) of `CLIP(spec)`."""
    ids, mask, images = init_inputs(spec)
    zeros = lambda a: None if a is None else jnp.zeros(a.shape, a.dtype)
    variables = jax.jit(CLIP(spec).init)(rng, zeros(ids), zeros(mask), zeros(images))
    return nn.meta.unbox(variables["params"])
