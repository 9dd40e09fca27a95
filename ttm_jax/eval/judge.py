"""The independent judge of generated videos: find each object by its colour, measure its motion, compare.

Nothing here reads the model's own trajectory: every object of a benchmark scene has a distinct, saturated colour
(`synthetic.OBJECT_COLOURS`), so a generated frame says where the object is by its pixels alone.

Finding (`find_objects`): a textured synthetic object is its colour times a brightness in [0.6, 1] (stripes, checks,
dots), and a background is its muted colour times [0.7, 1]. Each pixel is matched to the nearest of all the generator's
object and background colours, as a segment `[lo, hi] x colour` in RGB (`APPEARANCE`), and left unmatched when even the
nearest is more than `Appearance.colour_tolerance` (60, of 441 for black-to-white) away. An object's pixels in a frame
are those matched to its colour, in connected components (8-neighbour) of at least `keep_component` (0.3) of the
largest one's size (so an occluder splitting an object keeps both parts, a stray speck does not count), and the object
is not seen in a frame where they total fewer than `min_pixels` (0.002 of the frame, as `data.min_object_area`, and at
least 2 pixels).

Measuring: `motion.motion_of` on the found masks' track (`ttm_jax/eval/motion.py`: direction by angle, "still" under
0.05 of the frame side, grow / shrink at area ratio 1.2 / (1 / 1.2), not found when seen in fewer than half the frames).

Scoring:
- binding accuracy: the share of objects whose measured motion is their own stated one (`motion.matches`: direction,
  and the scale change when one is stated; spin is not judged); an object not found is wrong.
- trajectory IoU: per-frame IoU of the found mask with the ground-truth mask, mean over the clip's frames (1 for a
  frame where both are empty).
- `score_trajectory`: a stage-1 trajectory (palette-coloured masks, `data/trajectory.py`) read back with
  `trajectory.masks_from_trajectory` and scored the same way against the ground-truth masks, to separate stage 1's
  errors from stage 2's.

Validation (tests/test_judge.py): ground-truth clips through the mp4 codec score >= 0.95 binding accuracy; clips that
repeat the first frame score exactly the share of objects that neither move nor change size; clips re-rendered with
two objects' directions exchanged score 0 on those two and stay right on the others.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from ttm_jax.data import synthetic, video_io
from ttm_jax.data import trajectory as trajectory_lib
from ttm_jax.eval import motion as motion_lib
from ttm_jax.eval import motion_bench

# name -> (rgb, lowest and highest brightness factor): every colour the synthetic generator paints with
APPEARANCE: dict[str, tuple[tuple[int, int, int], float, float]] = {
    **{f"object:{n}": (c, 0.5, 1.1) for n, c in synthetic.OBJECT_COLOURS.items()},
    **{f"background:{n}": (c, 0.6, 1.1) for n, c in synthetic.BACKGROUND_COLOURS.items()},
}
_NAMES = list(APPEARANCE)


@dataclasses.dataclass(frozen=True)
class Appearance:
    """How objects are found by colour (module docstring)."""

    colour_tolerance: float = 60.0
    keep_component: float = 0.3
    min_area: float = 0.002


APPEARANCE_TOLERANCES = Appearance()


def classify_pixels(video: np.ndarray, *, tol: Appearance = APPEARANCE_TOLERANCES) -> np.ndarray:
    """uint8 `[..., 3]` -> int32 `[...]`: index into `APPEARANCE` (in order) of each pixel's nearest colour segment,
    -1 where the nearest is farther than `tol.colour_tolerance`."""
    x = np.asarray(video, np.float32)
    shape = x.shape[:-1]
    x = x.reshape(-1, 3)
    d2 = np.empty((x.shape[0], len(_NAMES)), np.float32)
    for j, name in enumerate(_NAMES):
        rgb, lo, hi = APPEARANCE[name]
        c = np.asarray(rgb, np.float32)
        t = np.clip(x @ c / float(c @ c), lo, hi)
        d2[:, j] = ((x - t[:, None] * c) ** 2).sum(-1)
    best = np.argmin(d2, -1).astype(np.int32)
    best[np.take_along_axis(d2, best[:, None], -1)[:, 0] > tol.colour_tolerance**2] = -1
    return best.reshape(shape)


def _keep_components(mask: np.ndarray, keep: float, min_pixels: int) -> np.ndarray:
    """bool `[H, W]` -> its 8-connected components of at least `keep` x the largest's size; empty when they total
    fewer than `min_pixels`."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask
    sizes = np.bincount(labels.reshape(-1), minlength=n + 1)[1:]
    kept = np.nonzero(sizes >= keep * sizes.max())[0] + 1
    out = np.isin(labels, kept)
    return out if out.sum() >= min_pixels else np.zeros_like(mask)


def min_pixels(height: int, width: int, tol: Appearance = APPEARANCE_TOLERANCES) -> int:
    """Fewest pixels an object must show in a frame to be seen there."""
    return max(2, round(tol.min_area * height * width))


def find_objects(video: np.ndarray, colours: Sequence[str], *, tol: Appearance = APPEARANCE_TOLERANCES) -> np.ndarray:
    """Each object found by its colour name (`synthetic.OBJECT_COLOURS`) in every frame.

    video: uint8 `[T, H, W, 3]`; colours: `[K]` names. Returns bool `[T, H, W, K]`."""
    v = np.asarray(video)
    if v.ndim != 4 or v.shape[-1] != 3:
        raise ValueError(f"judge: a video must be uint8 [T, H, W, 3], got {v.dtype} {v.shape}")
    unknown = [c for c in colours if c not in synthetic.OBJECT_COLOURS]
    if unknown:
        raise ValueError(f"judge: colour(s) {unknown} are not synthetic object colours "
                         f"{list(synthetic.OBJECT_COLOURS)}")
    t, h, w, _ = v.shape
    cls = classify_pixels(v, tol=tol)
    floor = min_pixels(h, w, tol)
    out = np.zeros((t, h, w, len(colours)), bool)
    for k, c in enumerate(colours):
        hit = cls == _NAMES.index(f"object:{c}")
        for f in range(t):
            out[f, :, :, k] = _keep_components(hit[f], tol.keep_component, floor)
    return out


def mask_iou(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """bool `[T, H, W]` twice -> float `[T]`: per-frame IoU (1 where both are empty)."""
    inter = (found & truth).sum((1, 2)).astype(np.float64)
    union = (found | truth).sum((1, 2)).astype(np.float64)
    return np.where(union > 0, inter / np.maximum(union, 1.0), 1.0)


def trajectory_iou(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over frames of the per-frame IoU of bool `[T, H, W]` masks."""
    return float(mask_iou(found, truth).mean())


def carried_first_frame(truth: np.ndarray) -> np.ndarray:
    """bool `[T, H, W]` -> bool `[T, H, W]`: the first frame's mask moved by whole pixels (nothing wraps round the
    border) onto each frame's true centroid, empty where the truth is empty: the given shape copied exactly along the
    true path, the placement rounded to a pixel (an object at a sub-pixel offset rasterises to another mask, which
    the first frame does not fully determine). `bench/stage1_probe.py` prints its IoU beside the oracle."""
    truth = np.asarray(truth, bool)
    out = np.zeros_like(truth)
    track = motion_lib.tracks_from_masks(truth[..., None])[0]
    if not track.seen[0]:
        return out
    ys, xs = np.nonzero(truth[0])
    h, w = truth.shape[1:]
    for f in np.nonzero(track.seen)[0]:
        dx, dy = np.round(track.centroids[f] - track.centroids[0]).astype(int)  # centroids are (x, y)
        ty, tx = ys + dy, xs + dx
        keep = (ty >= 0) & (ty < h) & (tx >= 0) & (tx < w)
        out[f, ty[keep], tx[keep]] = True
    return out


@dataclasses.dataclass(frozen=True)
class ObjectVerdict:
    """One object of one video: its stated motion, what was measured, and the scores."""

    label: str
    colour: str
    expected_direction: str
    expected_scale: str
    found: bool
    measured_direction: str
    measured_scale: str
    displacement: tuple[float, float]
    area_ratio: float
    seen_frames: int
    direction_ok: bool
    scale_ok: bool
    correct: bool
    iou: float | None  # None without ground-truth masks
    centroids: tuple[tuple[float, float], ...] = ()  # [T] (x, y) pixels of the found mask; NaN where unseen
    areas: tuple[int, ...] = ()  # [T] pixels of the found mask

    def to_json(self) -> dict:
        """JSON-ready (NaN centroids as null)."""
        d = dataclasses.asdict(self)
        d["displacement"] = [round(v, 4) for v in self.displacement]
        d["area_ratio"] = round(self.area_ratio, 4)
        d["centroids"] = [[None if np.isnan(v) else round(float(v), 2) for v in c] for c in self.centroids]
        d["areas"] = list(self.areas)
        return d


def judge_video(video: np.ndarray, objects: Sequence[Mapping[str, Any]], gt_masks: np.ndarray | None = None, *,
                tol: motion_lib.Tolerances = motion_lib.TOLERANCES,
                appearance: Appearance = APPEARANCE_TOLERANCES) -> list[ObjectVerdict]:
    """Judge one generated video.

    video: uint8 `[T, H, W, 3]`; objects: `[K]` mappings with `colour`, `direction`, `scale_change` (and `label`),
    as a benchmark manifest's objects; gt_masks: bool `[T, H, W, K]` or None. Returns one verdict per object, with
    its centroid and area tracks."""
    colours = [o["colour"] for o in objects]
    found = find_objects(video, colours, tol=appearance)
    if gt_masks is not None and gt_masks.shape != found.shape:
        raise ValueError(f"judge: the video gives masks {found.shape[:3]} x {len(colours)} objects but the ground "
                         f"truth is {gt_masks.shape} [T, H, W, K]; generate at the benchmark's frames and size")
    out = []
    for k, (o, track) in enumerate(zip(objects, motion_lib.tracks_from_masks(found), strict=True)):
        m = motion_lib.motion_of(track, tol)
        d_ok = motion_lib.direction_ok(m, o["direction"])
        s_ok = motion_lib.scale_ok(m, o["scale_change"])
        iou = None if gt_masks is None else trajectory_iou(found[..., k], gt_masks[..., k])
        out.append(ObjectVerdict(str(o.get("label", o["colour"])), o["colour"], o["direction"], o["scale_change"],
                                 m.found, m.direction, m.scale, m.displacement, m.area_ratio, m.seen_frames, d_ok,
                                 s_ok, d_ok and s_ok, iou, tuple(tuple(float(v) for v in c) for c in track.centroids),
                                 tuple(int(a) for a in track.areas)))
    return out


def binding_accuracy(verdicts: Sequence[ObjectVerdict]) -> float:
    """Share of objects bound to their own motion (objects not found are wrong)."""
    return sum(v.correct for v in verdicts) / max(len(verdicts), 1)


def score_trajectory(trajectory: np.ndarray, gt_masks: np.ndarray) -> np.ndarray:
    """A stage-1 trajectory against the ground truth: float `[K]` per-object mean IoU over frames.

    trajectory: uint8 `[T, H, W, 3]` (or float in [-1, 1]) palette-coloured masks, object k in
    `trajectory.PALETTE[k + 1]`; gt_masks: bool `[T, H, W, K]`."""
    k = gt_masks.shape[-1]
    found = trajectory_lib.masks_from_trajectory(np.asarray(trajectory), k)
    if found.shape != gt_masks.shape:
        raise ValueError(f"score_trajectory: trajectory {np.shape(trajectory)} vs ground-truth masks {gt_masks.shape}; "
                         f"give the trajectory at the benchmark's frames and size")
    return np.asarray([trajectory_iou(found[..., j], gt_masks[..., j]) for j in range(k)])


def _as_video(v: np.ndarray | str | os.PathLike, name: str) -> np.ndarray:
    if isinstance(v, (str, os.PathLike)):
        return video_io.read_frames(v)
    arr = np.asarray(v)
    if arr.dtype != np.uint8:
        raise ValueError(f"judge_benchmark: video {name!r} is {arr.dtype}; give uint8 [T, H, W, 3] (or an mp4 path)")
    return arr


def _mean(xs: Sequence[float]) -> float | None:
    return float(np.mean(xs)) if len(xs) else None


def judge_benchmark(bench_dir: str, videos: Mapping[str, np.ndarray | str | os.PathLike], *,
                    trajectories: Mapping[str, np.ndarray | str | os.PathLike] | None = None,
                    tol: motion_lib.Tolerances = motion_lib.TOLERANCES,
                    appearance: Appearance = APPEARANCE_TOLERANCES) -> dict:
    """Judge generated videos of a benchmark folder (`motion_bench`); JSON-ready.

    videos: scene name -> uint8 `[T, H, W, 3]` or an mp4 path; trajectories (optional): scene name -> stage 1's
    trajectory (uint8 `[T, H, W, 3]` or path). Scenes without a video are listed under `missing` and not scored.
    Returns `{"overall": {binding_accuracy (over objects), scene_binding_accuracy (mean over scenes), mean_iou
    (over objects), trajectory_iou (over objects, when trajectories are given), static_share (what a video that never
    moves scores), num_scenes, num_objects, missing}, "scenes": {name: {binding_accuracy, mean_iou, trajectory_iou?,
    objects: [ObjectVerdict.to_json()]}}, "tolerances": {...}}`."""
    bench = motion_bench.load_benchmark(bench_dir)
    names = {s.name for s in bench.scenes}
    for what, given in (("videos", videos), ("trajectories", trajectories or {})):
        unknown = sorted(set(given) - names)
        if unknown:
            raise ValueError(f"judge_benchmark: {what} for {unknown[:5]} which {bench_dir} does not hold; name them as "
                             f"its requests.jsonl does ({sorted(names)[:3]}...)")
    scenes: dict[str, dict] = {}
    verdicts_all: list[ObjectVerdict] = []
    traj_all: list[float] = []
    objects_judged: list[dict] = []
    for s in bench.scenes:
        if s.name not in videos:
            continue
        gt = s.masks()
        verdicts = judge_video(_as_video(videos[s.name], s.name), s.objects, gt, tol=tol, appearance=appearance)
        row: dict[str, Any] = {"binding_accuracy": binding_accuracy(verdicts),
                               "mean_iou": _mean([v.iou for v in verdicts]),
                               "objects": [v.to_json() for v in verdicts]}
        if trajectories and s.name in trajectories:
            ious = score_trajectory(_as_video(trajectories[s.name], s.name), gt)
            row["trajectory_iou"] = [float(x) for x in ious]
            traj_all += row["trajectory_iou"]
        scenes[s.name] = row
        verdicts_all += verdicts
        objects_judged += s.objects
    overall = {
        "binding_accuracy": binding_accuracy(verdicts_all) if verdicts_all else None,
        "scene_binding_accuracy": _mean([r["binding_accuracy"] for r in scenes.values()]),
        "mean_iou": _mean([v.iou for v in verdicts_all]),
        "trajectory_iou": _mean(traj_all),
        "static_share": motion_bench.static_share(objects_judged) if objects_judged else None,
        "num_scenes": len(scenes),
        "num_objects": len(verdicts_all),
        "missing": [s.name for s in bench.scenes if s.name not in videos],
    }
    return {"overall": overall, "scenes": scenes,
            "tolerances": {**dataclasses.asdict(tol), **dataclasses.asdict(appearance)}}


def still_video(first_frame: np.ndarray, frames: int) -> np.ndarray:
    """uint8 `[frames, H, W, 3]`: the first frame repeated (the no-motion baseline)."""
    return np.repeat(np.asarray(first_frame)[None], frames, 0)

