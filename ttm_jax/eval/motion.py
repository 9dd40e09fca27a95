"""Motion measured from object masks: centroid and area tracks, and the motion they show in synthetic SA-V's words.

A track is what a mask sequence says about one object: its centroid and area in every frame (NaN centroid, zero area
where the object is not seen). `motion_of(track)` turns it into one of `synthetic.DIRECTIONS` (or "still") and one of
`synthetic.SCALE_CHANGE` (grow / shrink / none):

- displacement: least-squares line through the centroids of the frames where the object is seen, against the frame
  index, times the clip length (`T - 1` frames); in frame fractions (x / W, y / H), so a diagonal of a non-square frame
  is still diagonal. A fit, not first-vs-last, so one bad frame of a generated video moves it little.
- direction: "still" if the displacement is shorter than `Tolerances.still` (a fraction of the frame side: 0.05, i.e.
  1.6 pixels at 32x32, 3.2 at 64x64); else the direction of `synthetic.DIRECTIONS` nearest in angle (8 sectors of 45
  degrees).
- scale change: least-squares line through log(area), as the displacement; area ratio over the clip >= `grow`
  (1.2) is "grow", <= `shrink` (1 / 1.2) is "shrink", else "none".

The thresholds sit well inside the benchmark's motions (`ttm_jax/eval/motion_bench.py`): a moving object travels at
least ~0.14 of the frame side along each axis it moves on in a clip (the generator moves it >= 55% of the free room
over the source video; a clip at the training clips' speed covers about half of that), and a growing / shrinking one
changes its area by ~1.7x / ~0.64x on its masks (found by colour in 32x32 clips, whose objects are 4-7 pixels wide:
>= 1.31x, and <= 0.79x for all but rare small objects). `clearly_matches` (motion with a margin: twice the still
threshold, an angle at most 12.5 degrees off the direction, a log area ratio 1.5x the threshold) is the benchmark's test
that a scene's ground-truth masks show its stated motions beyond doubt.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ttm_jax.data import synthetic

STILL = "still"
SCALE_NONE = "none"
MOVING_DIRECTIONS = tuple(d for d in synthetic.DIRECTIONS if d != STILL)


@dataclasses.dataclass(frozen=True)
class Tolerances:
    """The judge's thresholds (module docstring).

    still: displacement below this (fraction of the frame side, in frame-fraction coordinates) is "still".
    grow / shrink: area ratio over the clip at or beyond which the object grows / shrinks.
    min_seen: share of frames an object must be seen in (with at least one frame in each half of the clip) for its
      motion to count as measured; below it the object is "not found".
    """

    still: float = 0.05
    grow: float = 1.2
    shrink: float = 1 / 1.2
    min_seen: float = 0.5


TOLERANCES = Tolerances()


@dataclasses.dataclass(frozen=True)
class Track:
    """One object over a clip: `centroids` float `[T, 2]` (x, y in pixels, pixel centres at +0.5; NaN where unseen),
    `areas` float `[T]` (pixels; 0 where unseen), in a `height x width` frame."""

    centroids: np.ndarray
    areas: np.ndarray
    height: int
    width: int

    @property
    def seen(self) -> np.ndarray:
        """bool `[T]`: frames in which the object is seen."""
        return self.areas > 0


@dataclasses.dataclass(frozen=True)
class Motion:
    """Measured motion of a track. `found` False: seen too rarely (`Tolerances.min_seen`); then direction and scale
    are empty. `displacement` (dx, dy) in frame fractions over the clip; `angle_error` degrees between it and the
    named direction (0 for "still"); `area_ratio` last / first frame of the log-area fit."""

    found: bool
    direction: str = ""
    scale: str = ""
    displacement: tuple[float, float] = (0.0, 0.0)
    distance: float = 0.0
    angle_error: float = 0.0
    area_ratio: float = 1.0
    seen_frames: int = 0


def tracks_from_masks(masks: np.ndarray) -> list[Track]:
    """bool `[T, H, W, K]` object masks -> one `Track` per object (K)."""
    m = np.asarray(masks, dtype=bool)
    t, h, w, k = m.shape
    ys = np.arange(h, dtype=np.float64) + 0.5
    xs = np.arange(w, dtype=np.float64) + 0.5
    per_row = m.sum(2, dtype=np.float64)  # [T, H, K]
    per_col = m.sum(1, dtype=np.float64)  # [T, W, K]
    areas = per_row.sum(1)  # [T, K]
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = np.einsum("thk,h->tk", per_row, ys) / areas
        cx = np.einsum("twk,w->tk", per_col, xs) / areas
    cx = np.where(areas > 0, cx, np.nan)
    cy = np.where(areas > 0, cy, np.nan)
    return [Track(np.stack([cx[:, j], cy[:, j]], -1), areas[:, j], h, w) for j in range(k)]


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of y against x (>= 2 distinct x)."""
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def _angle_to(dx: float, dy: float, direction: str) -> float:
    """Degrees between (dx, dy) and `direction`'s unit vector, in [0, 180]."""
    ux, uy = synthetic.DIRECTIONS[direction][0]
    diff = math.degrees(math.atan2(dy, dx) - math.atan2(uy, ux))
    return abs((diff + 180.0) % 360.0 - 180.0)


def direction_of(dx: float, dy: float, *, still: float = TOLERANCES.still) -> tuple[str, float]:
    """(direction name, angle error in degrees) of a displacement in frame fractions (x right, y down): "still" below
    `still`, else the nearest of `synthetic.DIRECTIONS` by angle."""
    if math.hypot(dx, dy) < still:
        return STILL, 0.0
    errors = {d: _angle_to(dx, dy, d) for d in MOVING_DIRECTIONS}
    best = min(MOVING_DIRECTIONS, key=lambda d: (errors[d], d))
    return best, errors[best]


def scale_of(area_ratio: float, tol: Tolerances = TOLERANCES) -> str:
    """"grow" / "shrink" / "none" of an area ratio over the clip."""
    if area_ratio >= tol.grow:
        return "grow"
    if area_ratio <= tol.shrink:
        return "shrink"
    return SCALE_NONE


def motion_of(track: Track, tol: Tolerances = TOLERANCES) -> Motion:
    """The motion a track shows (module docstring); not found when seen in fewer than `tol.min_seen` of the frames or
    never in one half of the clip."""
    seen = track.seen
    t = seen.shape[0]
    idx = np.nonzero(seen)[0]
    half = t // 2
    if t < 2 or idx.size < max(2, math.ceil(tol.min_seen * t)) or not (idx < half).any() or not (idx >= half).any():
        return Motion(found=False, seen_frames=int(idx.size))
    x = idx.astype(np.float64)
    span = float(t - 1)
    dx = _slope(x, track.centroids[idx, 0] / track.width) * span
    dy = _slope(x, track.centroids[idx, 1] / track.height) * span
    direction, err = direction_of(dx, dy, still=tol.still)
    ratio = math.exp(_slope(x, np.log(track.areas[idx])) * span)
    return Motion(True, direction, scale_of(ratio, tol), (dx, dy), math.hypot(dx, dy), err, ratio, int(idx.size))


def direction_ok(motion: Motion, direction: str) -> bool:
    """The measured direction is the stated one."""
    return motion.found and motion.direction == direction


def scale_ok(motion: Motion, scale_change: str) -> bool:
    """The measured scale change is the stated one; always true when the statement is "none" (the judge checks a
    scale change only where the prompt states one)."""
    return motion.found and (scale_change == SCALE_NONE or motion.scale == scale_change)


def matches(motion: Motion, direction: str, scale_change: str) -> bool:
    """Binding: the measured motion is the stated one (direction, and the scale change when one is stated)."""
    return direction_ok(motion, direction) and scale_ok(motion, scale_change)


def clearly_matches(motion: Motion, direction: str, scale_change: str, tol: Tolerances = TOLERANCES) -> bool:
    """`matches` with a margin: a moving object travels at least twice `tol.still` within 12.5 degrees of its
    direction (sectors are +-22.5), a still one at most half of `tol.still`; a stated scale change reaches 1.5x the
    threshold in log area, and "none" stays within half of it."""
    if not matches(motion, direction, scale_change):
        return False
    if direction == STILL:
        moved_ok = motion.distance <= 0.5 * tol.still
    else:
        moved_ok = motion.distance >= 2.0 * tol.still and motion.angle_error <= 12.5
    log_r = math.log(motion.area_ratio)
    if scale_change == "grow":
        scale_ok_ = log_r >= 1.5 * math.log(tol.grow)
    elif scale_change == "shrink":
        scale_ok_ = log_r <= 1.5 * math.log(tol.shrink)
    else:
        scale_ok_ = 0.5 * math.log(tol.shrink) <= log_r <= 0.5 * math.log(tol.grow)
    return moved_ok and scale_ok_
