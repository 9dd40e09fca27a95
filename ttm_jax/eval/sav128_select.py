"""SA-V-128 selection: which SA-V videos are single-object and multi-object motion benchmarks, from masklets alone.

The rule (`Rule`; the defaults are the benchmark's, `sav128.py` records them in its manifest):

- The clip: `frames` frames at `fps` from video frame 0 (`clips.clip_frame_indices`, an annotated start, so the first
  frame's masks are exact), centre-cropped to the model's aspect ratio (`clips.crop_box`). Motion is measured on the
  annotated frames (6 fps) from frame 0 to the clip's last frame, on the masks cropped to that box.
- Per manual masklet (`analyse`): its visible-pixel centroid per annotated frame, in units of the crop's diagonal;
  `travel` = the largest distance of the centroid from its frame-0 place; `min_iou` = the smallest IoU of its mask
  with its frame-0 mask, *occlusion-aware*: pixels that another masklet covers in either frame are left out of both
  (an object that is only passed in front of keeps IoU 1); frames where the masklet is not visible are left out.
  `speed` = centroid path length over the visible annotated frames / the time they span (diagonals per second).
- A masklet **moves** when `travel >= min_travel` (`MIN_TRAVEL` = 10% of the diagonal) or `min_iou < max_iou`
  (`MAX_IOU` = 0.5). Why these: a still object's centroid moves only by annotation jitter (< 1% of the diagonal on
  SA-V) and by partial occlusion the IoU rule cannot see (a third of a disc hidden on one side, then on the other,
  moves its visible centroid by ~half its radius: ~4-5% of the diagonal for an object of a tenth of the frame), so 10%
  is twice the worst still case and still small next to a walk across the frame; a rigid object whose mask shares
  less than half its pixels with its first one (IoU < 0.5: shifted a third of its width, or grown/shrunk by more than
  2x in area, or turned/deformed as much) has clearly changed, while a still object's mask keeps IoU > 0.8 under
  annotation jitter. The IoU rule catches motion in place (a dancer, a turning wheel) that the centroid misses.
- A masklet is **large enough** when its own mask covers at least `min_area` (`MIN_AREA` = 1%) of the model's frame
  at frame 0 (resized to the geometry by nearest neighbour, as `clips.resize_ids`): big enough for metrics and for
  the masked attention (at 480x832 that is > 16 DiT tokens of 16x16 pixels).
- The **objects** of a video: the moving, large-enough masklets, taken greedily by frame-0 area (largest first; ties:
  masklet order); one is accepted only if, with overlaps resolved by masklet order (the trajectory's rule: lower
  masklet wins), every accepted object still shows at least `min_area` of the frame: a moving part of a moving whole
  (SA-V annotates both at times: the real sample's masklet 4 lies inside masklet 1) is one object, the whole; at most
  `max_objects`. Objects are listed in masklet order.
- **single** = exactly one object, **multi** = two or more; a video with none is not a candidate. The **motion score**
  is the mean speed of the objects. Candidates are ranked by score (descending), ties by video id.
- **Balance** (`balance`): within a split, categories (the captions sidecar's `category`; absent: one category) take
  turns: round r takes the r-th best candidate of every category that has one, in score order, until the split has
  its count (64 + 64 by default). Fewer candidates than asked: all of them.

Everything is a pure function of the annotation json and the rule: the same inputs give the same selection.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from ttm_jax.data import clips, sav
from ttm_jax.data import trajectory as trajectory_lib

MIN_TRAVEL = 0.10  # fraction of the crop's diagonal
MAX_IOU = 0.5  # occlusion-aware IoU with the first-frame mask
MIN_AREA = 0.01  # fraction of the model's frame at frame 0
MAX_OBJECTS = 4  # config.data.max_objects
SPLITS = ("single", "multi")


@dataclasses.dataclass(frozen=True)
class Rule:
    """The clip geometry the benchmark is for and the selection thresholds (module docstring)."""

    height: int = 32
    width: int = 32
    frames: int = 9
    fps: float = 12.0
    min_travel: float = MIN_TRAVEL
    max_iou: float = MAX_IOU
    min_area: float = MIN_AREA
    max_objects: int = MAX_OBJECTS

    def check(self) -> None:
        """Raises ValueError naming the flag for a value outside its range."""
        if self.height < 2 or self.width < 2 or self.height % 2 or self.width % 2:
            raise ValueError(f"sav128 --height={self.height} --width={self.width}: give even sides >= 2 (the model's "
                             "data.height, data.width)")
        if self.frames < 2:
            raise ValueError(f"sav128 --frames={self.frames}: a clip needs >= 2 frames to show motion")
        if not 0 < self.fps <= sav.SAV_FPS:
            raise ValueError(f"sav128 --fps={self.fps}: must be in (0, {sav.SAV_FPS:g}] (SA-V's frame rate)")
        if not (self.min_travel > 0 and 0 <= self.max_iou <= 1 and 0 <= self.min_area < 1):
            raise ValueError(f"sav128: --min_travel={self.min_travel} must be > 0, --max_iou={self.max_iou} in "
                             f"[0, 1], --min_area={self.min_area} in [0, 1)")
        if not 1 <= self.max_objects <= trajectory_lib.MAX_OBJECTS:
            raise ValueError(f"sav128 --max_objects={self.max_objects}: must be in [1, {trajectory_lib.MAX_OBJECTS}] "
                             "(config.data.max_objects)")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class MaskletMotion:
    """One masklet over the clip (module docstring): `area0` share of the model frame at frame 0, `travel` in crop
    diagonals, `min_iou` occlusion-aware, `speed` in diagonals per second."""

    index: int
    key: str
    area0: float
    travel: float
    min_iou: float
    speed: float
    moving: bool
    large: bool

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("area0", "travel", "min_iou", "speed"):
            d[k] = round(float(d[k]), 6)
        return d


@dataclasses.dataclass(frozen=True)
class Analysis:
    """A video under the rule: its clip (`frame_indices` [T] video frames, `mask_positions` [T] the annotated frame
    each takes its masks from), crop `box` (left, top, right, bottom in source pixels), every masklet's motion, the
    chosen `objects` (masklet indices, ascending), the split (None: no object) and the motion score."""

    video_id: str
    frame_indices: tuple[int, ...]
    mask_positions: tuple[int, ...]
    box: tuple[float, float, float, float]
    masklets: tuple[MaskletMotion, ...]
    objects: tuple[int, ...]
    split: str | None
    score: float
    category: str | None = None

    @property
    def num_moving(self) -> int:
        """Moving, large-enough masklets (before overlaps and `max_objects`)."""
        return sum(m.moving and m.large for m in self.masklets)


def clip_frames(ann: sav.Annotation, rule: Rule) -> tuple[np.ndarray, np.ndarray]:
    """(frame_indices int32 [T], mask_positions int32 [T]) of the benchmark clip: from frame 0 at `rule.fps`, each frame
    with the masks of its nearest annotated frame. Raises `SkipVideo` (`low_fps`, `too_short`) naming the json."""
    clips.check_fps(ann, rule.fps)
    # one annotated start: frame 0 (the random choice among starts has one option)
    frames, _ = clips.clip_frame_indices(ann.video_frame_count, ann.stride, 1, rule.frames, rule.fps, ann.fps,
                                         np.random.default_rng(0), file=ann.file)
    pos = np.clip(np.floor(frames / ann.stride + 0.5), 0, ann.num_annotated - 1).astype(np.int32)
    return frames, pos


def _centroids(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """bool [h, w, M] -> (area [M], centroid [M, 2] (y, x) in pixels; NaN where empty)."""
    h, w, n = m.shape
    area = m.reshape(h * w, n).sum(0).astype(np.float64)
    ys = (m.sum(1) * np.arange(h)[:, None]).sum(0)
    xs = (m.sum(0) * np.arange(w)[:, None]).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.stack([ys, xs], -1) / area[:, None]
    return area, c


def _occlusion_aware_iou(m0: np.ndarray, m: np.ndarray) -> np.ndarray:
    """float [M]: IoU of each masklet's mask in `m` with its mask in `m0` (both bool [h, w, M]), leaving out pixels
    another masklet covers in either frame; 1 where nothing is left."""
    others0 = (m0.sum(-1, dtype=np.int32)[..., None] - m0) > 0
    others = (m.sum(-1, dtype=np.int32)[..., None] - m) > 0
    keep = ~(others0 | others)
    inter = (m0 & m & keep).sum((0, 1)).astype(np.float64)
    union = ((m0 | m) & keep).sum((0, 1)).astype(np.float64)
    return np.where(union > 0, inter / np.maximum(union, 1.0), 1.0)


def analyse(ann: sav.Annotation, rule: Rule, *, category: str | None = None) -> Analysis:
    """The rule applied to one video's annotation (module docstring). Raises `SkipVideo` (`low_fps`, `too_short`)."""
    frames, pos = clip_frames(ann, rule)
    hw = (rule.height, rule.width)
    box = clips.crop_box(ann.height, ann.width, *hw)
    left, top, right, bottom = (int(round(v)) for v in box)
    diag = float(np.hypot(bottom - top, right - left))
    positions = range(int(frames[-1]) // ann.stride + 1)  # every annotated frame from 0 to the clip's last frame
    n = ann.num_masklets
    cents, visible, ious = [], [], []
    m0_full = m0 = None
    for j in positions:
        full = ann.masks([j])[0]  # [h, w, M]
        m = full[top:bottom, left:right]
        if m0 is None:
            m0_full, m0 = full, m
        area, c = _centroids(m)
        cents.append(c / diag)
        visible.append(area > 0)
        ious.append(_occlusion_aware_iou(m0, m))
    cents_a, vis, iou = np.stack(cents), np.stack(visible), np.stack(ious)  # [P, M, 2], [P, M], [P, M]
    own = clips.resize_ids(np.moveaxis(m0_full, -1, 0).astype(np.uint8), box, hw)  # [M, H, W] 0/1
    area0 = own.reshape(n, -1).mean(1) if n else np.zeros(0)
    times = np.asarray(list(positions), np.float64) * ann.stride / ann.fps
    out = []
    for k in range(n):
        v = np.nonzero(vis[:, k])[0]
        if not vis[0, k] or v.size < 2:
            travel, min_iou, speed = 0.0, 1.0, 0.0
        else:
            c = cents_a[v, k]
            travel = float(np.linalg.norm(c - c[0], axis=-1).max())
            min_iou = float(iou[v[1:], k].min())
            speed = float(np.linalg.norm(np.diff(c, axis=0), axis=-1).sum() / (times[v[-1]] - times[v[0]]))
        moving = bool(vis[0, k]) and (travel >= rule.min_travel or min_iou < rule.max_iou)
        out.append(MaskletMotion(k, ann.masklet_keys[k], float(area0[k]), travel, min_iou, speed, moving,
                                 bool(area0[k] > 0 and area0[k] >= rule.min_area)))
    objects = _objects(out, m0_full, box, rule)
    split = None if not objects else ("single" if len(objects) == 1 else "multi")
    score = float(np.mean([out[k].speed for k in objects])) if objects else 0.0
    return Analysis(ann.video_id, tuple(int(f) for f in frames), tuple(int(p) for p in pos), box, tuple(out),
                    tuple(objects), split, score, category)


def _shows(trial: Sequence[int], m0_full: np.ndarray, box: tuple[float, float, float, float], rule: Rule) -> bool:
    """Whether every masklet of `trial` (ascending) shows at least `min_area` (and > 0) of the model frame at frame 0
    with overlaps resolved by masklet order (`m0_full` bool [h, w, M], the frame-0 masks)."""
    ids = clips.resize_ids(trajectory_lib.ids_from_masks(m0_full[..., list(trial)])[None], box,
                           (rule.height, rule.width))[0]
    shown = np.bincount(ids.reshape(-1), minlength=len(trial) + 1)[1:] / ids.size
    return bool((shown > 0).all() and (shown >= rule.min_area).all())


def _greedy(order: Sequence[int], m0_full: np.ndarray, box: tuple[float, float, float, float], rule: Rule,
            limit: int) -> list[int]:
    """Masklets taken in `order`, each kept if the kept ones all still show (`_shows`); at most `limit`; ascending."""
    chosen: list[int] = []
    for k in order:
        trial = sorted(chosen + [k])
        if _shows(trial, m0_full, box, rule):
            chosen = trial
            if len(chosen) == limit:
                break
    return chosen


def _objects(motions: Sequence[MaskletMotion], m0_full: np.ndarray, box: tuple[float, float, float, float],
             rule: Rule) -> list[int]:
    """The moving, large-enough masklets, greedily by area (ties: masklet order), at most `max_objects`."""
    order = sorted((m.index for m in motions if m.moving and m.large), key=lambda k: (-motions[k].area0, k))
    return _greedy(order, m0_full, box, rule, rule.max_objects)


def objects_for_split(ann: sav.Annotation, a: Analysis, rule: Rule, split: str | None) -> Analysis:
    """A user-chosen video (`--ids`) as `split` (None: whatever its objects make it): the rule's objects when they
    fit the split; else the moving masklets, then the still large-enough ones, each by area, greedily as
    `analyse` (single: one, multi: two or more). Raises ValueError naming the video when too few can be shown."""
    if (split is None and a.objects) or (split == "single" and len(a.objects) == 1) or (
            split == "multi" and len(a.objects) >= 2):
        return a
    ms = a.masklets
    order = (sorted((m.index for m in ms if m.moving and m.large), key=lambda k: (-ms[k].area0, k))
             + sorted((m.index for m in ms if not m.moving and m.large), key=lambda k: (-ms[k].area0, k)))
    chosen = _greedy(order, ann.masks([0])[0], a.box, rule, 1 if split == "single" else rule.max_objects)
    need = 2 if split == "multi" else 1
    if len(chosen) < need:
        raise ValueError(f"{ann.file}: video {ann.video_id} has {len(chosen)} masklet(s) showing at least "
                         f"--min_area={rule.min_area:g} of its first frame at {rule.width}x{rule.height}; a "
                         f"{split or 'benchmark'} video needs {need}: drop it from --ids or mark it single")
    score = float(np.mean([ms[k].speed for k in chosen]))
    return dataclasses.replace(a, objects=tuple(chosen), split="single" if len(chosen) == 1 else "multi",
                               score=score)


def rank(cands: Sequence[Analysis]) -> list[Analysis]:
    """By motion score, descending; ties by video id."""
    return sorted(cands, key=lambda a: (-a.score, a.video_id))


def balance(cands: Sequence[Analysis], n: int | None = None) -> list[Analysis]:
    """Every candidate, in the order the split takes them (module docstring): round r holds the r-th best of each
    category, rounds in turn, each round by score (ties: video id). The first `n` (all when None)."""
    by_cat: dict[str, list[Analysis]] = {}
    for a in rank(cands):
        by_cat.setdefault(a.category or "", []).append(a)
    out: list[Analysis] = []
    for r in range(max((len(v) for v in by_cat.values()), default=0)):
        out += rank([v[r] for v in by_cat.values() if r < len(v)])
    return out if n is None else out[:n]


def split_order(cands: Sequence[Analysis], counts: Mapping[str, int]) -> dict[str, list[Analysis]]:
    """{split: every candidate of the split in the order it is taken}; `counts` names the splits to fill."""
    return {s: balance([a for a in cands if a.split == s]) for s in SPLITS if counts.get(s, 0) > 0}
