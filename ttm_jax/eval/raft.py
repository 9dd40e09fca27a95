"""RAFT optical flow (Teed & Deng 2020) in Flax, as torchvision builds it (`raft_large`, `raft_small`), with the
converter from a torchvision RAFT state dict; the optional flow estimator of the average displacement.

    flow = RaftFlow.from_checkpoint("raft_large_C_T_SKHT_V2-ff5fadd5.pth")  # variant read from the keys
    flow(prev, nxt)                # uint8 [B, H, W, 3] x2 -> float32 [B, H, W, 2] (dx, dy) in pixels

The weights are torchvision's, downloaded by the user (nothing downloads here), e.g.
`https://download.pytorch.org/models/raft_large_C_T_SKHT_V2-ff5fadd5.pth` or `raft_small_C_T_V2-01064c6d.pth`; a
`.pth` state dict (read with `torch.load(weights_only=True)`) or a `.safetensors` file of the same keys.

The network, channels-last (torch NCHW -> NHWC, conv kernels `[O, I, kh, kw] -> [kh, kw, I, O]`):
- feature encoder (instance norm) on both frames and context encoder (batch norm in eval mode for large, no norm
  for small) on the first, each 1/8 resolution: a 7x7 stride-2 conv, three stages of two residual (large) or
  bottleneck (small) blocks, a 1x1 conv. The context splits into the GRU's initial hidden state (tanh) and the
  context features (relu).
- all-pairs correlation `<f1(i,j), f2(k,l)> / sqrt(C)`, pooled 2x2 over `(k, l)` into a 4-level pyramid; a lookup
  samples each level bilinearly (zeros outside, as `grid_sample(align_corners=True)`) on the `(2r+1)^2` integer
  offsets around the current target position (divided by 2 per level); r = 4 (large), 3 (small). Channel
  `level * (2r+1)^2 + a * (2r+1) + b` holds offset `(dx, dy) = (a - r, b - r)`, as torchvision orders them.
- update block, `num_flow_updates` times (a `lax.fori_loop`): motion encoder (correlation and flow convs), a
  convolutional GRU (large: a 1x5 then a 5x1 GRU; small: one 3x3), a flow head giving the flow increment at 1/8.
- upsampling x8 of the last flow: convex combination of the 3x3 neighbourhood with a predicted softmax mask (large,
  mask scaled by 0.25) or bilinear `align_corners=True` interpolation (small); both multiply the flow by 8.

Preprocessing is torchvision's `Raft_*_Weights.transforms()` (`OpticalFlow`): uint8 -> [0, 1] -> [-1, 1]. RAFT needs
H and W multiples of 8: frames that are not are padded by edge replication to the next multiple of 8, split evenly
between the two sides (the extra row/column at the end), as the original RAFT's `InputPadder`, and the flow is cropped
back, so it is in pixels of the input frames. The correlation pyramid needs at least 16 x 16 features, so padded
frames must be at least 128 x 128 (torchvision's `min_size`); smaller videos raise (resize them up first).
Matmuls and convolutions run at `Precision.HIGHEST` (float32 on GPU too, no TF32).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ttm_jax.weights import rulebook as rb
from ttm_jax.weights import safetensors_io

HIGHEST = jax.lax.Precision.HIGHEST
MIN_SIZE = 128  # pixels; H and W after padding to a multiple of 8 (16 features at 1/8 for 4 pyramid levels)
EPS = 1e-5  # torch's BatchNorm2d / InstanceNorm2d eps
WEIGHTS_HINT = ("download torchvision's weights (e.g. https://download.pytorch.org/models/"
                "raft_large_C_T_SKHT_V2-ff5fadd5.pth or raft_small_C_T_V2-01064c6d.pth) and pass that file's path")


@dataclasses.dataclass(frozen=True)
class RaftSpec:
    """One RAFT variant's shape, as torchvision's `raft_large` / `raft_small` build it."""

    name: str
    block: str  # "residual" | "bottleneck"
    feature_layers: tuple[int, ...]
    context_layers: tuple[int, ...]
    context_norm: str | None  # "batch" | None (the feature encoder always uses instance norm)
    radius: int
    corr_layers: tuple[int, ...]
    flow_layers: tuple[int, int]
    motion_out: int
    hidden: int
    gru_kernels: tuple[tuple[int, int], ...]
    flow_head_hidden: int
    mask: bool  # convex upsampling with a predicted mask (large) or bilinear (small)
    levels: int = 4
    strides: tuple[int, ...] = (2, 1, 2, 2)


SPECS = {
    "large": RaftSpec("large", "residual", (64, 64, 96, 128, 256), (64, 64, 96, 128, 256), "batch", 4, (256, 192),
                      (128, 64), 128, 128, ((1, 5), (5, 1)), 256, True),
    "small": RaftSpec("small", "bottleneck", (32, 32, 64, 96, 128), (32, 32, 64, 96, 160), None, 3, (96,),
                      (64, 32), 82, 96, ((3, 3),), 128, False),
}


def get_spec(variant: str) -> RaftSpec:
    if variant not in SPECS:
        raise ValueError(f"RAFT variant {variant!r}; fix: choose one of {sorted(SPECS)}")
    return SPECS[variant]


# ------------------------------------------------------------------------------------------------------------ modules


def _conv(features: int, kernel: tuple[int, int], stride: int = 1, name: str | None = None) -> nn.Conv:
    """torch `nn.Conv2d(padding=(k - 1) // 2)`: symmetric explicit padding (Flax's SAME pads strided convs
    asymmetrically)."""
    pad = tuple(((k - 1) // 2, (k - 1) // 2) for k in kernel)
    return nn.Conv(features, kernel, strides=stride, padding=pad, precision=HIGHEST, name=name)


class FrozenBatchNorm(nn.Module):
    """torch `BatchNorm2d` in eval mode; the running statistics are params (`mean`, `var`): inference only."""

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("mean", nn.initializers.zeros, (c,))
        var = self.param("var", nn.initializers.ones, (c,))
        return (x - mean) * (scale * jax.lax.rsqrt(var + EPS)) + bias


def instance_norm(x: jax.Array) -> jax.Array:
    """torch `InstanceNorm2d` (no affine, no running stats): per sample and channel over H, W of `[B, H, W, C]`."""
    mean = x.mean(axis=(1, 2), keepdims=True)
    var = jnp.square(x - mean).mean(axis=(1, 2), keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + EPS)


class ConvNorm(nn.Module):
    """torchvision's `Conv2dNormActivation` (conv with bias, optional norm, optional relu); params `conv`, `norm`."""

    features: int
    kernel: int = 3
    stride: int = 1
    norm: str | None = None  # "batch" | "instance" | None
    relu: bool = True

    @nn.compact
    def __call__(self, x):
        x = _conv(self.features, (self.kernel, self.kernel), self.stride, name="conv")(x)
        if self.norm == "batch":
            x = FrozenBatchNorm(name="norm")(x)
        elif self.norm == "instance":
            x = instance_norm(x)
        return nn.relu(x) if self.relu else x


class Block(nn.Module):
    """Residual (two 3x3) or bottleneck (1x1, 3x3, 1x1 at a quarter width) block with a relu after the sum; a 1x1
    projection of the input when strided."""

    kind: str
    features: int
    stride: int
    norm: str | None

    @nn.compact
    def __call__(self, x):
        n = self.norm
        if self.kind == "residual":
            y = ConvNorm(self.features, 3, self.stride, n, name="convnormrelu1")(x)
            y = ConvNorm(self.features, 3, 1, n, name="convnormrelu2")(y)
        else:
            q = self.features // 4
            y = ConvNorm(q, 1, 1, n, name="convnormrelu1")(x)
            y = ConvNorm(q, 3, self.stride, n, name="convnormrelu2")(y)
            y = ConvNorm(self.features, 1, 1, n, name="convnormrelu3")(y)
        if self.stride != 1:
            x = ConvNorm(self.features, 1, self.stride, n, relu=False, name="downsample")(x)
        return nn.relu(x + y)


class Encoder(nn.Module):
    """Feature / context encoder: `[B, H, W, 3]` in [-1, 1] -> `[B, H/8, W/8, layers[-1]]`."""

    kind: str
    layers: tuple[int, ...]
    strides: tuple[int, ...]
    norm: str | None

    @nn.compact
    def __call__(self, x):
        x = ConvNorm(self.layers[0], 7, self.strides[0], self.norm, name="convnormrelu")(x)
        for stage in (1, 2, 3):
            x = Block(self.kind, self.layers[stage], self.strides[stage], self.norm, name=f"layer{stage}_0")(x)
            x = Block(self.kind, self.layers[stage], 1, self.norm, name=f"layer{stage}_1")(x)
        return _conv(self.layers[4], (1, 1), name="conv")(x)


class ConvGRU(nn.Module):
    hidden: int
    kernel: tuple[int, int]

    @nn.compact
    def __call__(self, h, x):
        hx = jnp.concatenate([h, x], axis=-1)
        z = jax.nn.sigmoid(_conv(self.hidden, self.kernel, name="convz")(hx))
        r = jax.nn.sigmoid(_conv(self.hidden, self.kernel, name="convr")(hx))
        q = jnp.tanh(_conv(self.hidden, self.kernel, name="convq")(jnp.concatenate([r * h, x], axis=-1)))
        return (1 - z) * h + z * q


class UpdateBlock(nn.Module):
    """Motion encoder, GRU(s) and flow head: (hidden, context, corr features, flow) at 1/8 -> (hidden, delta flow)."""

    spec: RaftSpec

    @nn.compact
    def __call__(self, hidden, context, corr, flow):
        s = self.spec
        c = ConvNorm(s.corr_layers[0], 1, name="motion_encoder_convcorr1")(corr)
        if len(s.corr_layers) == 2:
            c = ConvNorm(s.corr_layers[1], 3, name="motion_encoder_convcorr2")(c)
        f = ConvNorm(s.flow_layers[0], 7, name="motion_encoder_convflow1")(flow)
        f = ConvNorm(s.flow_layers[1], 3, name="motion_encoder_convflow2")(f)
        m = ConvNorm(s.motion_out - 2, 3, name="motion_encoder_conv")(jnp.concatenate([c, f], axis=-1))
        x = jnp.concatenate([context, m, flow], axis=-1)
        for i, k in enumerate(s.gru_kernels):
            hidden = ConvGRU(s.hidden, k, name=f"convgru{i + 1}")(hidden, x)
        d = nn.relu(_conv(s.flow_head_hidden, (3, 3), name="flow_head_conv1")(hidden))
        return hidden, _conv(2, (3, 3), name="flow_head_conv2")(d)


class MaskPredictor(nn.Module):
    """Convex-upsampling weights `[B, h, w, 9 * 8 * 8]` (0.25 x the logits) from the hidden state."""

    @nn.compact
    def __call__(self, hidden):
        x = ConvNorm(256, 3, name="convrelu")(hidden)
        return 0.25 * _conv(8 * 8 * 9, (1, 1), name="conv")(x)


class RAFT(nn.Module):
    """The RAFT networks; the iteration runs outside (`estimate_flow`), through the methods `encode`, `update`,
    `up_mask`. `__call__(image1, image2)` (one update) exists to build every parameter."""

    spec: RaftSpec

    def setup(self):
        s = self.spec
        self.feature_encoder = Encoder(s.block, s.feature_layers, s.strides, "instance")
        self.context_encoder = Encoder(s.block, s.context_layers, s.strides, s.context_norm)
        self.update_block = UpdateBlock(s)
        if s.mask:
            self.mask_predictor = MaskPredictor()

    def encode(self, image1, image2):
        """Images `[B, H, W, 3]` in [-1, 1] -> (fmap1, fmap2, hidden, context), each `[B, H/8, W/8, *]`."""
        fmaps = self.feature_encoder(jnp.concatenate([image1, image2], axis=0))
        fmap1, fmap2 = jnp.split(fmaps, 2, axis=0)
        ctx = self.context_encoder(image1)
        return fmap1, fmap2, jnp.tanh(ctx[..., :self.spec.hidden]), nn.relu(ctx[..., self.spec.hidden:])

    def update(self, hidden, context, corr, flow):
        return self.update_block(hidden, context, corr, flow)

    def up_mask(self, hidden):
        return self.mask_predictor(hidden)

    def __call__(self, image1, image2):
        s = self.spec
        fmap1, fmap2, hidden, context = self.encode(image1, image2)
        corr = jnp.zeros(fmap1.shape[:3] + (s.levels * (2 * s.radius + 1) ** 2,), fmap1.dtype)
        hidden, delta = self.update(hidden, context, corr, jnp.zeros(fmap1.shape[:3] + (2,), fmap1.dtype))
        if s.mask:
            self.up_mask(hidden)
        return delta


# -------------------------------------------------------------------------------------------------- correlation


def corr_pyramid(fmap1: jax.Array, fmap2: jax.Array, levels: int) -> list[jax.Array]:
    """`[B, h, w, C]` x2 -> `levels` volumes `[B, h, w, h / 2^l, w / 2^l]`: the dot products over C / sqrt(C), the
    last two axes average-pooled 2x2 (odd sizes drop the last row / column, as `avg_pool2d`)."""
    c = fmap1.shape[-1]
    vol = jnp.einsum("bijc,bklc->bijkl", fmap1, fmap2, precision=HIGHEST) / jnp.sqrt(jnp.float32(c))
    out = [vol]
    for _ in range(levels - 1):
        b, h, w, hl, wl = vol.shape
        vol = vol[..., :hl // 2 * 2, :wl // 2 * 2].reshape(b, h, w, hl // 2, 2, wl // 2, 2).mean(axis=(4, 6))
        out.append(vol)
    return out


def lookup(pyramid: list[jax.Array], coords: jax.Array, radius: int) -> jax.Array:
    """Correlation features `[B, h, w, levels * (2r+1)^2]` around `coords [B, h, w, 2]` (x, y in 1/8 pixels).

    Bilinear with zeros outside, as torchvision's `grid_sample(..., align_corners=True)`. The offsets are integers,
    so every sample of one pixel shares its bilinear weights: one gather of the `(2r+2)^2` integer neighbours, then
    one weighted sum of four shifted windows."""
    side = 2 * radius + 1
    steps = jnp.arange(-radius, radius + 2)
    feats = []
    for level, vol in enumerate(pyramid):
        b, h, w, hl, wl = vol.shape
        c = coords / (2 ** level)
        base = jnp.floor(c)
        fx, fy = (c - base)[..., 0:1, None], (c - base)[..., 1:2, None]  # [B, h, w, 1, 1]
        xs = base[..., 0, None].astype(jnp.int32) + steps  # [B, h, w, 2r+2]
        ys = base[..., 1, None].astype(jnp.int32) + steps
        valid = ((xs >= 0) & (xs < wl))[..., :, None] & ((ys >= 0) & (ys < hl))[..., None, :]  # [.., x, y]
        idx = jnp.clip(ys, 0, hl - 1)[..., None, :] * wl + jnp.clip(xs, 0, wl - 1)[..., :, None]
        v = jnp.take_along_axis(vol.reshape(b, h, w, hl * wl), idx.reshape(b, h, w, -1), axis=-1)
        v = jnp.where(valid, v.reshape(idx.shape), 0.0)  # [B, h, w, x offset (2r+2), y offset (2r+2)]
        out = ((1 - fx) * (1 - fy) * v[..., :-1, :-1] + fx * (1 - fy) * v[..., 1:, :-1]
               + (1 - fx) * fy * v[..., :-1, 1:] + fx * fy * v[..., 1:, 1:])
        feats.append(out.reshape(b, h, w, side * side))
    return jnp.concatenate(feats, axis=-1)


# --------------------------------------------------------------------------------------------------- upsampling


def convex_upsample(flow: jax.Array, mask: jax.Array) -> jax.Array:
    """`flow [B, h, w, 2]` (1/8 pixels), `mask [B, h, w, 576]` -> `[B, 8h, 8w, 2]` in pixels: each fine pixel
    `(8i + p, 8j + q)` is the softmax(mask[i, j, k, p, q]) over k of 8 x the 3x3 neighbours (zero padded) of `(i, j)`;
    mask channel `k * 64 + p * 8 + q`, k row-major over the 3x3 window, as torchvision's `upsample_flow`."""
    b, h, w, c = flow.shape
    m = jax.nn.softmax(mask.reshape(b, h, w, 9, 8, 8), axis=3)
    padded = jnp.pad(8 * flow, ((0, 0), (1, 1), (1, 1), (0, 0)))
    nb = jnp.stack([padded[:, di:di + h, dj:dj + w] for di in range(3) for dj in range(3)], axis=3)  # [B,h,w,9,c]
    up = jnp.einsum("bijkpq,bijkc->bipjqc", m, nb, precision=HIGHEST)
    return up.reshape(b, 8 * h, 8 * w, c)


def _align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
    """`[n_out, n_in]` linear interpolation with `align_corners=True` (source `o * (n_in - 1) / (n_out - 1)`)."""
    scale = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0)
    src = np.arange(n_out, dtype=np.float32) * scale
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    m = np.zeros((n_out, n_in), np.float32)
    np.add.at(m, (np.arange(n_out), i0), 1 - lam)
    np.add.at(m, (np.arange(n_out), i1), lam)
    return m


def bilinear_upsample(flow: jax.Array) -> jax.Array:
    """`[B, h, w, 2]` -> `[B, 8h, 8w, 2]`, 8 x bilinear `align_corners=True` interpolation (torchvision's small)."""
    _, h, w, _ = flow.shape
    mh, mw = jnp.asarray(_align_corners_matrix(h, 8 * h)), jnp.asarray(_align_corners_matrix(w, 8 * w))
    return 8 * jnp.einsum("Hh,Ww,bhwc->bHWc", mh, mw, flow, precision=HIGHEST)


# ------------------------------------------------------------------------------------------------------- the flow


def preprocess(frames: jax.Array) -> jax.Array:
    """uint8 `[B, H, W, 3]` -> float32 in [-1, 1] (torchvision's `OpticalFlow` transform)."""
    return (frames.astype(jnp.float32) / 255.0 - 0.5) / 0.5


def padding(h: int, w: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Rows and columns added (before, after) to reach multiples of 8: half before, the rest after."""
    ph, pw = -h % 8, -w % 8
    return (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)


def check_size(h: int, w: int, where: str = "RAFT") -> None:
    (a, b), (c, d) = padding(h, w)
    if h + a + b < MIN_SIZE or w + c + d < MIN_SIZE:
        raise ValueError(f"{where}: frames of {h}x{w} are too small for RAFT's 4-level correlation pyramid (at least "
                         f"{MIN_SIZE}x{MIN_SIZE}); fix: resize the videos up or use the Farneback estimator")


def estimate_flow(params: Any, spec: RaftSpec, frame1: jax.Array, frame2: jax.Array,
                  num_flow_updates: int = 12) -> jax.Array:
    """Flow from `frame1` to `frame2` (uint8 `[B, H, W, 3]`, any H, W >= 128) -> float32 `[B, H, W, 2]` (dx, dy) in
    pixels: torchvision's last prediction after `num_flow_updates` updates. Jit it (see `flow_fn`)."""
    model = RAFT(spec)
    variables = {"params": params}
    b, h, w, _ = frame1.shape
    check_size(h, w)
    pad = ((0, 0),) + padding(h, w) + ((0, 0),)
    img1, img2 = (jnp.pad(preprocess(f), pad, mode="edge") for f in (frame1, frame2))
    fmap1, fmap2, hidden, context = model.apply(variables, img1, img2, method=RAFT.encode)
    pyramid = corr_pyramid(fmap1, fmap2, spec.levels)
    hh, ww = fmap1.shape[1:3]
    ys, xs = jnp.meshgrid(jnp.arange(hh, dtype=jnp.float32), jnp.arange(ww, dtype=jnp.float32), indexing="ij")
    coords0 = jnp.broadcast_to(jnp.stack([xs, ys], axis=-1), (b, hh, ww, 2))

    def step(_, carry):
        hidden, coords1 = carry
        corr = lookup(pyramid, coords1, spec.radius)
        hidden, delta = model.apply(variables, hidden, context, corr, coords1 - coords0, method=RAFT.update)
        return hidden, coords1 + delta

    hidden, coords1 = jax.lax.fori_loop(0, num_flow_updates, step, (hidden, coords0))
    flow = coords1 - coords0
    if spec.mask:
        up = convex_upsample(flow, model.apply(variables, hidden, method=RAFT.up_mask))
    else:
        up = bilinear_upsample(flow)
    (top, _), (left, _) = pad[1], pad[2]
    return up[:, top:top + h, left:left + w]


@functools.lru_cache(maxsize=8)
def flow_fn(spec: RaftSpec, num_flow_updates: int):
    """The jitted `(params, frame1, frame2) -> flow` of `estimate_flow` (one per spec and update count)."""

    def fn(params, frame1, frame2):
        return estimate_flow(params, spec, frame1, frame2, num_flow_updates)

    return jax.jit(fn)


# ---------------------------------------------------------------------------------------------------- conversion


def _convnorm_rules(torch_prefix: str, flax_prefix: str, norm: str | None) -> list:
    rules: list = [rb.Rule(f"{torch_prefix}.0.weight", f"{flax_prefix}/conv/kernel", rb.CONV2D),
                   rb.Rule(f"{torch_prefix}.0.bias", f"{flax_prefix}/conv/bias")]
    if norm == "batch":
        for t, f in (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var")):
            rules.append(rb.Rule(f"{torch_prefix}.1.{t}", f"{flax_prefix}/norm/{f}"))
        rules.append(rb.Ignore(f"{torch_prefix}.1.num_batches_tracked", "a training counter"))
    return rules


def _conv_rules(torch_prefix: str, flax_prefix: str) -> list:
    return [rb.Rule(f"{torch_prefix}.weight", f"{flax_prefix}/kernel", rb.CONV2D),
            rb.Rule(f"{torch_prefix}.bias", f"{flax_prefix}/bias")]


def _encoder_rules(spec: RaftSpec, name: str, layers: tuple[int, ...], norm: str | None) -> list:
    rules = _convnorm_rules(f"{name}.convnormrelu", f"{name}/convnormrelu", norm)
    convs = (1, 2) if spec.block == "residual" else (1, 2, 3)
    for stage in (1, 2, 3):
        for blk in (0, 1):
            t, f = f"{name}.layer{stage}.{blk}", f"{name}/layer{stage}_{blk}"
            for c in convs:
                rules += _convnorm_rules(f"{t}.convnormrelu{c}", f"{f}/convnormrelu{c}", norm)
            if blk == 0 and spec.strides[stage] != 1:
                rules += _convnorm_rules(f"{t}.downsample", f"{f}/downsample", norm)
    return rules + _conv_rules(f"{name}.conv", f"{name}/conv")


def rulebook(spec: RaftSpec) -> rb.RuleBook:
    """torchvision `raft_<variant>` state dict keys <-> `RAFT(spec)` params."""
    u, fu = "update_block", "update_block"
    rules = [*_encoder_rules(spec, "feature_encoder", spec.feature_layers, None),
             *_encoder_rules(spec, "context_encoder", spec.context_layers, spec.context_norm)]
    me = ["convcorr1", "convflow1", "convflow2", "conv"] + (["convcorr2"] if len(spec.corr_layers) == 2 else [])
    for n in me:
        rules += _convnorm_rules(f"{u}.motion_encoder.{n}", f"{fu}/motion_encoder_{n}", None)
    for i in range(1, len(spec.gru_kernels) + 1):
        for g in ("convz", "convr", "convq"):
            rules += _conv_rules(f"{u}.recurrent_block.convgru{i}.{g}", f"{fu}/convgru{i}/{g}")
    for n in ("conv1", "conv2"):
        rules += _conv_rules(f"{u}.flow_head.{n}", f"{fu}/flow_head_{n}")
    if spec.mask:
        rules += _convnorm_rules("mask_predictor.convrelu", "mask_predictor/convrelu", None)
        rules += _conv_rules("mask_predictor.conv", "mask_predictor/conv")
    return rb.RuleBook(f"raft_{spec.name}", rules)


def param_template(spec: RaftSpec) -> dict:
    """`jax.ShapeDtypeStruct` tree of `RAFT(spec)`'s params."""
    x = jax.ShapeDtypeStruct((1, MIN_SIZE, MIN_SIZE, 3), jnp.float32)
    return jax.eval_shape(RAFT(spec).init, jax.random.key(0), x, x)["params"]


def init_params(spec: RaftSpec, seed: int = 0) -> dict:
    """Random params of `RAFT(spec)` (tests, shapes)."""
    x = jnp.zeros((1, MIN_SIZE, MIN_SIZE, 3), jnp.float32)
    return RAFT(spec).init(jax.random.key(seed), x, x)["params"]


def variant_of(keys: Any) -> str:
    """"large" when the state dict has the convex-upsampling mask predictor, else "small"."""
    return "large" if any(k.startswith("mask_predictor.") for k in keys) else "small"


def from_torch(state_dict: dict[str, Any], spec: RaftSpec) -> dict:
    """A torchvision RAFT state dict ({key: numpy array or tensor}) -> `RAFT(spec)` params (float32 numpy)."""
    arrays = {k: rb.as_numpy(v) for k, v in state_dict.items()}
    return rulebook(spec).to_flax(arrays, param_template(spec))


def to_torch(params: dict, spec: RaftSpec) -> dict[str, np.ndarray]:
    """`RAFT(spec)` params -> torchvision state dict keys (numpy; without `num_batches_tracked`)."""
    return rulebook(spec).to_torch(params)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """{key: float32 numpy} from a torchvision RAFT `.pth` (torch state dict; `{"state_dict": ...}` / `{"model":
    ...}` wrappers and a DataParallel `module.` prefix are unwrapped) or `.safetensors` file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such RAFT weights file; fix: {WEIGHTS_HINT}")
    if path.endswith(".safetensors"):
        sd: Any = dict(safetensors_io.SafetensorsReader(path))
    else:
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"{path}: reading a .pth needs torch (pip install torch, CPU is enough) or save the "
                              f"state dict as .safetensors") from e
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
            raise ValueError(f"{path}: not a torch state dict ({type(e).__name__}: {e}); fix: {WEIGHTS_HINT}") from e
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, dict) and set(sd) == {wrapper}:
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not sd:
        raise ValueError(f"{path}: holds a {type(sd).__name__}, not a RAFT state dict; fix: {WEIGHTS_HINT}")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    out = {}
    for k, v in sd.items():
        v = v.detach().cpu().float().numpy() if hasattr(v, "detach") and v.is_floating_point() else rb.as_numpy(v)
        out[k] = v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v
    return out


def load(path: str, variant: str | None = None) -> tuple[RaftSpec, dict]:
    """`(spec, params)` of the torchvision RAFT weights file `path`; `variant` "large" / "small", or None to read it
    from the keys. A missing, unexpected or mis-shaped key raises `rulebook.ConversionError` naming the file."""
    sd = read_state_dict(path)
    if not any(k.startswith("feature_encoder.") for k in sd):
        raise rb.ConversionError(f"{path}: no feature_encoder.* keys (first keys: {list(sd)[:4]}): not a torchvision "
                                 f"RAFT state dict (the original princeton-vl checkpoints use other names); fix: "
                                 f"{WEIGHTS_HINT}")
    found = variant_of(sd)
    if variant is not None and get_spec(variant).name != found:
        raise ValueError(f"{path}: a raft_{found} state dict ({'has' if found == 'large' else 'no'} mask_predictor.* "
                         f"keys), but variant={variant!r}; fix: variant={found!r} (or None to detect it)")
    spec = get_spec(found)
    try:
        return spec, from_torch(sd, spec)
    except rb.ConversionError as e:
        raise rb.ConversionError(f"{path}: not torchvision's raft_{spec.name}: {e}") from e


# ------------------------------------------------------------------------------------------------------ estimator


@dataclasses.dataclass
class RaftFlow:
    """A flow estimator for `displacement.average_displacement(..., estimator=)`: `(prev, nxt)` uint8
    `[B, H, W, 3]` -> float32 numpy `[B, H, W, 2]` (dx, dy) in pixels. Pairs run `batch_size` at a time (the last
    batch padded, so one compile per frame size)."""

    spec: RaftSpec
    params: Any
    num_flow_updates: int = 12
    batch_size: int = 8

    @classmethod
    def from_checkpoint(cls, path: str, variant: str | None = None, *, num_flow_updates: int = 12,
                        batch_size: int = 8) -> RaftFlow:
        """Load torchvision RAFT weights from `path` (see `load`); the params go to the default device."""
        spec, params = load(path, variant)
        return cls(spec, jax.device_put(params), num_flow_updates, batch_size)

    def __call__(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        prev, nxt = np.asarray(prev), np.asarray(nxt)
        if prev.shape != nxt.shape or prev.ndim != 4 or prev.shape[-1] != 3 or prev.dtype != np.uint8 \
                or nxt.dtype != np.uint8:
            raise ValueError(f"RAFT: frames {prev.dtype} {prev.shape} and {nxt.dtype} {nxt.shape}; fix: pass two uint8 "
                             f"[B, H, W, 3] batches of one shape")
        check_size(*prev.shape[1:3])
        fn = flow_fn(self.spec, self.num_flow_updates)
        n, bs = prev.shape[0], self.batch_size
        out = []
        for i in range(0, n, bs):
            a, b = prev[i:i + bs], nxt[i:i + bs]
            k = a.shape[0]
            if k < bs:
                a, b = (np.concatenate([x, np.repeat(x[-1:], bs - k, axis=0)]) for x in (a, b))
            out.append(np.asarray(fn(self.params, a, b))[:k])
        return np.concatenate(out) if out else np.zeros(prev.shape[:3] + (2,), np.float32)
