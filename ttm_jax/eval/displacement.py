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
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

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


def video_displacement(video: np.ndarray) -> float:
    """Mean flow magnitude of uint8 `video [T, H, W, 3]` (T >= 2) over pixels and consecutive pairs, pixels/frame."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8 or video.shape[0] < 2:
        raise ValueError(f"displacement: video {video.dtype} {video.shape}; fix: pass uint8 [T, H, W, 3], T >= 2")
    pairs = zip(video[:-1], video[1:], strict=True)
    mags = [np.linalg.norm(flow(a, b), axis=-1).mean(dtype=np.float64) for a, b in pairs]
    return float(np.mean(mags))


def average_displacement(videos: np.ndarray) -> Displacement:
    """Displacement of each uint8 video in `videos [N, T, H, W, 3]` and their mean (pixels per frame)."""
    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[0] < 1:
        raise ValueError(f"displacement: videos of shape {videos.shape}; fix: pass uint8 [N, T, H, W, 3], N >= 1")
    per_video = np.array([video_displacement(v) for v in videos], np.float64)
    return Displacement(per_video=per_video, mean=float(per_video.mean()))
