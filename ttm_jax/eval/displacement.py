"""Average displacement: how much a video moves, as the mean optical-flow magnitude in pixels per frame.

For every pair of consecutive frames the dense flow is OpenCV's Farneback (`cv2.calcOpticalFlowFarneback`) on the
grey frames (`cv2.COLOR_RGB2GRAY`); a video's displacement is the mean over all pixels and all pairs of the flow
vector's length, `mean |flow|` in pixels per frame, measured at the video's own resolution (compare videos of equal
size: the number scales with it). Parameters (`FARNEBACK`), OpenCV's documented example values:
- `pyr_scale=0.5, levels=3`: a 3-level pyramid halving each time, so motions of several pixels per frame are found;
- `winsize=15`: the averaging window (pixels); larger is steadier and blurrier;
- `iterations=3` per pyramid level; `poly_n=5, poly_sigma=1.2`: the polynomial expansion's neighbourhood and its
  Gaussian width (OpenCV recommends 1.1-1.2 for `poly_n=5`); `flags=0`.
Flow at the borders, where content enters or leaves the frame, is less reliable; the mean keeps it (no cropping).

Another flow estimator can replace Farneback: `average_displacement(videos, estimator=...)` takes any callable
`(prev, nxt)` uint8 `[B, H, W, 3]` x2 -> `[B, H, W, 2]` (dx, dy) in pixels, e.g. RAFT from torchvision's weights
(`eval/raft.py`): `estimator=raft.RaftFlow.from_checkpoint(path)`, or `make_estimator(raft_path)`. The mean is the
same formula whatever the estimator; numbers from different estimators are not comparable with each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import cv2
import numpy as np

from ttm_jax.eval import raft

FlowEstimator = Callable[[np.ndarray, np.ndarray], np.ndarray]  # uint8 [B, H, W, 3] x2 -> [B, H, W, 2] pixels
PAIRS_PER_CALL = 16  # consecutive-frame pairs given to an estimator at once (bounds the flow held in memory)

FARNEBACK = {"pyr_scale": 0.5, "levels": 3, "winsize": 15, "iterations": 3, "poly_n": 5, "poly_sigma": 1.2,
             "flags": 0}


@dataclasses.dataclass(frozen=True)
class Displacement:
    """`per_video` float64 `[N]` (pixels per frame) and their `mean`."""

    per_video: np.ndarray
    mean: float


def flow(prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    """Farneback flow from `prev` to `nxt` (uint8 `[H, W, 3]` RGB) -> float32 `[H, W, 2]` (dx, dy) in pixels."""
    grey = [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in (prev, nxt)]
    return cv2.calcOpticalFlowFarneback(grey[0], grey[1], None, **FARNEBACK)


def farneback(prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    """The default estimator: `flow` pair by pair, uint8 `[B, H, W, 3]` x2 -> float32 `[B, H, W, 2]`."""
    return np.stack([flow(a, b) for a, b in zip(prev, nxt, strict=True)])


def make_estimator(raft_path: str | None = None, *, variant: str | None = None,
                   num_flow_updates: int = 12) -> FlowEstimator:
    """Farneback when `raft_path` is None (or ""), else RAFT from the torchvision weights file `raft_path` (`variant`
    "large" / "small", None: read from the keys; `num_flow_updates` as torchvision's default 12)."""
    if not raft_path:
        return farneback
    return raft.RaftFlow.from_checkpoint(raft_path, variant, num_flow_updates=num_flow_updates)


def video_displacement(video: np.ndarray, *, estimator: FlowEstimator | None = None) -> float:
    """Mean flow magnitude of uint8 `video [T, H, W, 3]` (T >= 2) over pixels and consecutive pairs, pixels/frame;
    `estimator` None is Farneback."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8 or video.shape[0] < 2:
        raise ValueError(f"displacement: video {video.dtype} {video.shape}; fix: pass uint8 [T, H, W, 3], T >= 2")
    estimator = farneback if estimator is None else estimator
    mags: list[float] = []
    for i in range(0, video.shape[0] - 1, PAIRS_PER_CALL):
        prev, nxt = video[i:i + PAIRS_PER_CALL], video[i + 1:i + 1 + PAIRS_PER_CALL]
        prev = prev[:nxt.shape[0]]
        flows = np.asarray(estimator(prev, nxt))
        if flows.shape != prev.shape[:3] + (2,):
            raise ValueError(f"displacement: the estimator gave flow of shape {flows.shape} for frames {prev.shape}; "
                             f"fix: an estimator returns [B, H, W, 2]")
        mags += [np.linalg.norm(f, axis=-1).mean(dtype=np.float64) for f in flows]
    return float(np.mean(mags))


def average_displacement(videos: np.ndarray, *, estimator: FlowEstimator | None = None) -> Displacement:
    """Displacement of each uint8 video in `videos [N, T, H, W, 3]` and their mean (pixels per frame); `estimator`
    (see the module docstring) None is Farneback."""
    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[0] < 1:
        raise ValueError(f"displacement: videos of shape {videos.shape}; fix: pass uint8 [N, T, H, W, 3], N >= 1")
    per_video = np.array([video_displacement(v, estimator=estimator) for v in videos], np.float64)
    return Displacement(per_video=per_video, mean=float(per_video.mean()))
