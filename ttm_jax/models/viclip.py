"""ViCLIP (InternVideo / InternVid) in Flax Linen: a CLIP ViT over a clip of frames, plus a CLIP text tower.

The model behind the ViCLIP-T / ViCLIP-V metrics (`ttm_jax/eval/viclip_score.py`); its weights convert from the
public InternVideo checkpoint with `ttm_jax/weights/viclip.py`. Written from the reference code
(`OpenGVLab/InternVideo: Data/InternVid/viclip/viclip_vision.py`, `viclip_text.py`, `viclip.py`), not copied.

Both towers are OpenAI-CLIP pre-LayerNorm blocks (`x + attn(ln_1(x))`, `x + c_proj(quick_gelu(c_fc(ln_2(x))))`,
`nn.MultiheadAttention` = biased q/k/v/out projections, logits scaled by `head_dim ** -0.5`), the same maths as
`models/clip.py`'s encoder, which is reused here (`clip.Encoder`: layers in one `nn.scan`).

- Vision (`ViCLIPVision`): frames channels-last `[B, T, S, S, 3]`, already resized and normalised -> a patch conv
  with kernel = stride = `(kernel_size, p, p)` (no bias; ViCLIP's `kernel_size` is 1, i.e. one 2-D patch conv per
  frame) -> per frame, the class token is prepended and the spatial `positional_embedding` added to every token ->
  the per-frame class tokens are dropped but one (they are all equal: `class_embedding + positional_embedding[0]`)
  -> the learned `temporal_positional_embedding [1, T, D]` is added to each frame's patches (its mean over frames
  when T' = 1, an image) -> tokens ordered (patch, frame), i.e. `[cls, (n0,t0), (n0,t1), ..., (n1,t0), ...]`,
  `1 + N * T'` tokens in all -> `ln_pre` -> blocks (full attention over space and time) -> `ln_post` of the class
  token -> `@ proj` (`[D, embed_dim]`, no bias).
- Text (`ViCLIPText`): ids `[B, L]` (L <= `context_length`, 32 for ViCLIP) -> token + positional embeddings ->
  causal blocks (no padding mask: the reference pads with id 0 after the end-of-text token, which a causal row
  never sees) -> `ln_final` -> the row at the largest id (OpenAI's rule: `<|endoftext|>` is the largest id) ->
  `@ text_projection` (`[D, embed_dim]`, no bias).
- `temp` (the contrastive temperature, 1/100 at release) is kept so a checkpoint converts whole; the metrics use
  cosines only.

    spec = ViCLIPSpec(...)                   # or weights.viclip.read_spec(state dict shapes)
    model = ViCLIP(spec)
    model.apply({"params": p}, frames, method="encode_vision")   # [B, embed_dim] (not normalised)
    model.apply({"params": p}, ids, method="encode_text")        # [B, embed_dim] (not normalised)

Params in `param_dtype` (float32 default); matmuls in `dtype`; LayerNorm statistics and softmax in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ttm_jax.models import clip as clip_model


@dataclasses.dataclass(frozen=True)
class VisionSpec:
    """ViCLIP's video tower. ViCLIP-L: width 1024, 24 layers, 16 heads, patch 14, 224 px, 8 frames, embed 768."""

    tower: clip_model.TowerSpec
    image_size: int = 224
    patch_size: int = 14
    num_frames: int = 8
    kernel_size: int = 1  # frames per patch (the conv's temporal kernel and stride)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextSpec:
    """ViCLIP's text tower. ViCLIP-L: width 768, 12 layers, 12 heads, 32 tokens, vocabulary 49408."""

    tower: clip_model.TowerSpec
    vocab_size: int = 49408
    context_length: int = 32


@dataclasses.dataclass(frozen=True)
class ViCLIPSpec:
    """Both towers and the shared embedding width (`proj` and `text_projection` both end in `embed_dim`)."""

    vision: VisionSpec
    text: TextSpec
    embed_dim: int = 768
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        v = self.vision
        if v.image_size % v.patch_size:
            raise ValueError(f"ViCLIPSpec: image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
        for name, t in (("vision", v.tower), ("text", self.text.tower)):
            if t.hidden_size % t.num_heads:
                raise ValueError(f"ViCLIPSpec: {name} width {t.hidden_size} does not split into {t.num_heads} heads")

    @property
    def clip_spec(self) -> clip_model.CLIPSpec:
        """The `CLIPSpec` handed to `clip.Encoder` (it reads only `dtype` and `param_dtype` from it)."""
        text = clip_model.TextSpec(self.text.tower, vocab_size=self.text.vocab_size,
                                   max_positions=self.text.context_length, eos_token_id=2)
        return clip_model.CLIPSpec(text=text, vision=None, projection_dim=None, dtype=self.dtype,
                                   param_dtype=self.param_dtype)


def vit_l14(**kw: Any) -> ViCLIPSpec:
    """The released ViCLIP-L/14 (InternVid-10M-FLT): the shapes of `Data/InternVid/viclip`'s `clip_joint_l14` and
    `clip_text_l14` with `context_length=32`; `kw`: dtype, param_dtype."""
    vision = VisionSpec(clip_model.TowerSpec(1024, 4096, 24, 16), image_size=224, patch_size=14, num_frames=8)
    text = TextSpec(clip_model.TowerSpec(768, 3072, 12, 12), vocab_size=49408, context_length=32)
    return ViCLIPSpec(vision=vision, text=text, embed_dim=768, **kw)


def _param(module: nn.Module, name: str, shape: tuple[int, ...], std: float, spec: ViCLIPSpec,
           names: tuple[str | None, ...]) -> jax.Array:
    init = nn.initializers.normal(std) if std else nn.initializers.zeros
    return module.param(name, nn.with_logical_partitioning(init, names), shape, spec.param_dtype)


def _layer_norm(spec: ViCLIPSpec, eps: float, name: str) -> nn.LayerNorm:
    # two-pass variance (as torch), float32 statistics whatever the compute dtype
    return nn.LayerNorm(epsilon=eps, dtype=spec.dtype, param_dtype=spec.param_dtype, use_fast_variance=False,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("text_embed",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("text_embed",)), name=name)


def _projection(spec: ViCLIPSpec, name: str) -> nn.Dense:
    # the torch side is a bare `[width, embed_dim]` matrix used as `x @ proj`: already a Dense kernel
    return nn.Dense(spec.embed_dim, use_bias=False, dtype=spec.dtype, param_dtype=spec.param_dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("text_embed", None)))


class ViCLIPVision(nn.Module):
    """`frames [B, T, S, S, 3]` (normalised, channels-last) -> `[B, embed_dim]`; see the module docstring."""

    spec: ViCLIPSpec

    @nn.compact
    def __call__(self, frames: jax.Array) -> jax.Array:
        s, v = self.spec, self.spec.vision
        d = v.tower.hidden_size
        b, t, h, w, c = frames.shape
        if (h, w, c) != (v.image_size, v.image_size, 3):
            raise ValueError(f"ViCLIP vision: frames are {h}x{w}x{c}, the model takes {v.image_size}x{v.image_size}x3;"
                             f" resize them first (ttm_jax.eval.viclip_score.preprocess)")
        if t % v.kernel_size:
            raise ValueError(f"ViCLIP vision: {t} frames do not split into patches of {v.kernel_size} frames")
        k = (v.kernel_size, v.patch_size, v.patch_size)
        x = nn.Conv(d, k, strides=k, padding="VALID", use_bias=False, dtype=s.dtype, param_dtype=s.param_dtype,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                             (None, None, None, None, "text_embed")),
                    name="conv1")(frames.astype(s.dtype))
        frames_out = x.shape[1]
        if frames_out not in (1, v.num_frames):
            raise ValueError(f"ViCLIP vision: {t} frames give {frames_out} temporal positions, but the model has "
                             f"{v.num_frames} (temporal_positional_embedding); pass {v.num_frames * v.kernel_size} "
                             f"frames (ttm_jax.eval.viclip_score.sample_frames)")
        n = v.grid * v.grid
        x = x.reshape(b, frames_out, n, d)  # row-major over the patch grid, as torch's reshape(B*T, H*W, C)
        cls = _param(self, "class_embedding", (d,), d**-0.5, s, ("text_embed",))
        pos = _param(self, "positional_embedding", (n + 1, d), d**-0.5, s, (None, "text_embed"))
        temporal = _param(self, "temporal_positional_embedding", (1, v.num_frames, d), 0.0, s,
                          (None, None, "text_embed"))
        x = x + pos[1:].astype(x.dtype)
        cls = (cls + pos[0]).astype(x.dtype)
        # an image (one temporal position) gets the mean temporal embedding, as the reference does
        temporal = temporal[0] if frames_out > 1 else jnp.mean(temporal[0], axis=0, keepdims=True)
        x = x + temporal[:, None, :].astype(x.dtype)
        x = jnp.swapaxes(x, 1, 2).reshape(b, n * frames_out, d)  # tokens ordered (patch, frame)
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
        x = _layer_norm(s, v.tower.eps, "ln_pre")(x)
        x = clip_model.Encoder(s.clip_spec, v.tower, name="transformer")(x, None)
        x = _layer_norm(s, v.tower.eps, "ln_post")(x[:, 0])
        return _projection(s, "proj")(x)


class ViCLIPText(nn.Module):
    """`ids int32 [B, L]` (L <= context_length; padding after the end-of-text token) -> `[B, embed_dim]`."""

    spec: ViCLIPSpec

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        s, ts = self.spec, self.spec.text
        d = ts.tower.hidden_size
        ids = jnp.asarray(ids, jnp.int32)
        length = ids.shape[1]
        if length > ts.context_length:
            raise ValueError(f"ViCLIP text: {length} tokens, more than context_length {ts.context_length}; tokenize "
                             f"with context_length={ts.context_length}")
        x = nn.Embed(ts.vocab_size, d, dtype=s.dtype, param_dtype=s.param_dtype, name="token_embedding",
                     embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                 ("vocab", "text_embed")))(ids)
        pos = _param(self, "positional_embedding", (ts.context_length, d), 0.01, s, (None, "text_embed"))
        x = x + pos[:length].astype(x.dtype)[None]
        causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
        x = clip_model.Encoder(s.clip_spec, ts.tower, name="transformer")(x, causal)
        x = _layer_norm(s, ts.tower.eps, "ln_final")(x)
        eot = jnp.argmax(ids, axis=-1)  # the first largest id: <|endoftext|> in CLIP's vocabulary
        return _projection(s, "text_projection")(jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0])


class ViCLIP(nn.Module):
    """ViCLIP; `__call__` (for `init`) runs both towers: `(frames [B, T, S, S, 3], ids [B, L]) -> (video [B, E],
    text [B, E])`, not normalised."""

    spec: ViCLIPSpec

    def setup(self):
        self.vision_encoder = ViCLIPVision(self.spec)
        self.text_encoder = ViCLIPText(self.spec)
        # the contrastive temperature (1/logit scale): converted, unused by the metrics
        self.temp = self.param("temp", nn.with_logical_partitioning(nn.initializers.constant(0.01), ()), (),
                               self.spec.param_dtype)

    def encode_vision(self, frames: jax.Array) -> jax.Array:
        """`frames [B, T, S, S, 3]` normalised -> `[B, embed_dim]`."""
        return self.vision_encoder(frames)

    def encode_text(self, ids: jax.Array) -> jax.Array:
        """`ids int32 [B, L]` -> `[B, embed_dim]`."""
        return self.text_encoder(ids)

    def __call__(self, frames: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.encode_vision(frames), self.encode_text(ids)


def init_inputs(spec: ViCLIPSpec, batch: int = 1) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """Abstract `(frames, ids)` that build every parameter of `ViCLIP(spec)`."""
    v = spec.vision
    frames = jax.ShapeDtypeStruct((batch, v.num_frames * v.kernel_size, v.image_size, v.image_size, 3), jnp.float32)
    return frames, jax.ShapeDtypeStruct((batch, spec.text.context_length), jnp.int32)


def init_params(spec: ViCLIPSpec, rng: jax.Array) -> dict[str, Any]:
    """Random parameters (unboxed) of `ViCLIP(spec)`."""
    frames, ids = init_inputs(spec)
    variables = jax.jit(ViCLIP(spec).init)(rng, jnp.zeros(frames.shape, frames.dtype), jnp.zeros(ids.shape, ids.dtype))
    return nn.meta.unbox(variables["params"])
