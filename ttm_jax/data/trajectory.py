"""Trajectories: the palette-coloured mask video of stage 1, and its inverse.

Contract (DESIGN.md): each object is one constant colour on black; the palette is fixed and indexed by object id
(object i of a clip, 1..K, in masklet order, gets `PALETTE[i]`; background 0 is black), so colour <-> id is a pure
function both ways. Objects overlap in SA-V; as in `ttm_jax/models/masks.py`, the lower id wins.

The inverse (`ids_from_trajectory`) reads colours back after an H.264 round trip or a VAE decode: nearest palette
colour among the clip's `num_objects + 1` entries, with pixels darker than `black_threshold` forced to background.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np


def _build_palette() -> np.ndarray:
    """Black, then the 7 saturated corners of the RGB cube, then the 19 colours with a 128 level (greys last).

    Nearest-colour decoding is safest between far-apart colours, so the colours most clips use come first: the
    first 7 objects are at least 255 apart, all 26 at least 127 apart.
    """
    corners = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255), (255, 255, 255)]
    mids = [c for c in itertools.product((0, 128, 255), repeat=3) if 128 in c]
    # fewer 128s first (more saturated), greys (all channels equal) last; ties in a fixed lexicographic order
    mids.sort(key=lambda c: (len(set(c)) == 1, c.count(128), c))
    return np.asarray([(0, 0, 0)] + corners + mids, dtype=np.uint8)


PALETTE = _build_palette()  # uint8 [27, 3]; PALETTE[0] is background
MAX_OBJECTS = len(PALETTE) - 1  # 26


def color_of(object_id: int) -> tuple[int, int, int]:
    """The colour of object `object_id` (0: background, black)."""
    if not 0 <= object_id <= MAX_OBJECTS:
        raise ValueError(f"object id {object_id} outside [0, {MAX_OBJECTS}]; config.data.max_objects <= {MAX_OBJECTS}")
    return tuple(int(x) for x in PALETTE[object_id])


def id_of(color: Sequence[int]) -> int:
    """The object id of an exact palette colour (inverse of `color_of`); raises for a colour not in the palette."""
    c = np.asarray(color, dtype=np.int64).reshape(3)
    hit = np.nonzero((PALETTE.astype(np.int64) == c).all(-1))[0]
    if not hit.size:
        raise ValueError(f"colour {tuple(c.tolist())} is not a palette colour; use ids_from_trajectory for noisy ones")
    return int(hit[0])


def ids_from_masks(object_masks: np.ndarray) -> np.ndarray:
    """bool `[..., K]` -> int32 `[...]`: 1 + the lowest k whose mask is set (lower id wins), 0 where none is."""
    m = np.asarray(object_masks, dtype=bool)
    # in the masks' memory order (any layout; `Annotation.masks` is a transposed view): each pass writes as it reads
    ids = np.zeros_like(m[..., 0], np.int32) if m.shape[-1] else np.zeros(m.shape[:-1], np.int32)
    for k in range(m.shape[-1] - 1, -1, -1):  # paint the highest id first, so lower ids overwrite it
        np.copyto(ids, k + 1, where=m[..., k])  # (boolean indexing is several times slower on a strided view)
    return ids


def masks_from_ids(ids: np.ndarray, num_objects: int) -> np.ndarray:
    """int `[...]` -> bool `[..., num_objects]` (exclusive masks; ids above num_objects are dropped)."""
    ids = np.asarray(ids)
    out = np.empty(ids.shape + (num_objects,), bool)
    for k in range(num_objects):  # one pass per object: faster than one broadcast compare at video sizes
        out[..., k] = ids == k + 1
    return out


def render_ids(ids: np.ndarray) -> np.ndarray:
    """int `[...]` object ids -> uint8 `[..., 3]` palette colours."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() > MAX_OBJECTS):
        raise ValueError(f"render_ids: ids in [{ids.min()}, {ids.max()}], outside [0, {MAX_OBJECTS}]")
    return np.take(PALETTE, ids, axis=0)  # = PALETTE[ids], several times faster


def render(object_masks: np.ndarray) -> np.ndarray:
    """bool `[T, H, W, K]` -> the trajectory, uint8 `[T, H, W, 3]` (object k+1 in `PALETTE[k+1]`, lower id on top)."""
    if object_masks.shape[-1] > MAX_OBJECTS:
        raise ValueError(f"render: {object_masks.shape[-1]} objects, the palette has {MAX_OBJECTS}; lower "
                         f"config.data.max_objects")
    return render_ids(ids_from_masks(object_masks))


def ids_from_trajectory(trajectory: np.ndarray, num_objects: int, *, black_threshold: float = 48.0) -> np.ndarray:
    """A (noisy) trajectory -> int32 object ids `[...]`.

    `trajectory` uint8 `[..., 3]` in [0, 255], or float in [-1, 1] (a VAE decode). Each pixel takes the nearest of
    `PALETTE[0..num_objects]` (Euclidean RGB); pixels whose brightest channel is below `black_threshold` are
    background, so dim codec/VAE noise on black never becomes an object.
    """
    x = np.asarray(trajectory)
    if x.shape[-1] != 3:
        raise ValueError(f"ids_from_trajectory: last axis must be RGB (3), got shape {x.shape}")
    if np.issubdtype(x.dtype, np.floating):
        x = (np.clip(x, -1.0, 1.0) + 1.0) * 127.5
    x = x.astype(np.float32)
    pal = PALETTE[: num_objects + 1].astype(np.float32)
    # |x - p|^2 = |x|^2 - 2 x.p + |p|^2; the |x|^2 term is common to all p
    d = (pal**2).sum(-1) - 2.0 * (x @ pal.T)
    ids = np.argmin(d, axis=-1).astype(np.int32)
    return np.where(x.max(-1) < black_threshold, 0, ids).astype(np.int32)


def masks_from_trajectory(trajectory: np.ndarray, num_objects: int, **kwargs) -> np.ndarray:
    """A (noisy) trajectory -> bool `[..., num_objects]` exclusive object masks."""
    return masks_from_ids(ids_from_trajectory(trajectory, num_objects, **kwargs), num_objects)


def object_scores(masks: np.ndarray, *, motion_weight: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per masklet: (size, motion, score), each float `[M]`, from bool masks `[T, H, W, M]` of a clip.

    size: mean area fraction over the frames where the masklet is visible; motion: 1 - mean IoU of consecutive frames
    (0 for a still object, 1 when consecutive masks never overlap: moving, deforming or (dis)appearing);
    score = size * (1 + motion_weight * motion): big objects first, moving ones preferred over still ones.
    """
    m = np.asarray(masks, dtype=bool)
    t, h, w, n = m.shape
    # counts over the pixel axes of any layout (a reshape would copy a strided view such as `Annotation.masks`)
    area = np.count_nonzero(m, axis=(1, 2)).astype(np.float64)  # [T, M]
    vis = area > 0
    size = np.where(vis.any(0), area.sum(0) / np.maximum(vis.sum(0), 1), 0.0) / (h * w)
    if t > 1:
        a, b = m[:-1], m[1:]
        inter = np.count_nonzero(a & b, axis=(1, 2)).astype(np.float64)
        union = np.count_nonzero(a | b, axis=(1, 2)).astype(np.float64)
        iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)  # both empty: no change
        motion = 1.0 - iou.mean(0)
    else:
        motion = np.zeros(n)
    return size, motion, size * (1.0 + motion_weight * motion)


def select_objects(masks: np.ndarray, max_objects: int, *, min_area: float = 0.0, motion_weight: float = 1.0,
                   candidates: Sequence[int] | None = None) -> list[int]:
    """Choose up to `max_objects` masklets of a clip -> their indices into the last axis, ascending (masklet order).

    `masks` bool `[T, H, W, M]`, frame 0 = the clip's first frame. Eligible: in `candidates` (default all) and visible
    in frame 0 with more than 0 and at least `min_area` of the frame (stage 1 starts from the first-frame masks s0).
    Candidates are taken greedily by `object_scores` score (ties: lower masklet index); one is accepted only if,
    with overlaps resolved by id order (lower masklet wins, as in the trajectory), every accepted object still shows
    at least that much of itself in frame 0: a part hidden under a lower-numbered whole (SA-V annotates both) adds
    nothing and would vanish from the trajectory. The result is in masklet order, so an object's palette colour
    follows masklet order and the choice does not depend on the order masklets are listed in.
    """
    m = np.asarray(masks, dtype=bool)
    t, h, w, n = m.shape
    cand = list(range(n)) if candidates is None else sorted(set(int(c) for c in candidates))
    first = np.count_nonzero(m[0], axis=(0, 1)) / (h * w)
    cand = [c for c in cand if first[c] > 0 and first[c] >= min_area]
    if not cand or max_objects <= 0:
        return []
    _, _, score = object_scores(m[..., cand], motion_weight=motion_weight)
    order = sorted(range(len(cand)), key=lambda i: (-score[i], cand[i]))
    chosen: list[int] = []
    for i in order:
        trial = sorted(chosen + [cand[i]])
        shown = np.bincount(ids_from_masks(m[0][..., trial]).reshape(-1), minlength=len(trial) + 1)[1:] / (h * w)
        if (shown > 0).all() and (shown >= min_area).all():
            chosen = trial
            if len(chosen) == max_objects:
                break
    return chosen
