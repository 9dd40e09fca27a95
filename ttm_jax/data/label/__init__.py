"""Labelling any collection of videos for training, as the paper did for data outside SA-V (the library; the command
line is `ttm_jax/data/label/__main__.py`).

    python -m ttm_jax.data.label --videos=DIR --out=DIR [--captions=FILE | --objects="dog,ball"]
        --detector_path=GROUNDING_DINO --sam2_path=SAM2_VIDEO [--threshold=0.3]

For each video under `--videos` (any container PyAV reads; sorted by path; the id is the file's stem):
1. the objects to find: the object phrases of its caption entry's local prompts (`--captions`, a sidecar), else the
   offline planner's objects of its caption, else `--objects`;
2. `detect(first frame, names)` (Grounding DINO) -> one box and score per name; names scoring below `threshold` are
   dropped, and a video where nothing is found is skipped (`nothing_found`);
3. `propagate(frames, boxes)` (SAM2 video propagation) tracks the found objects over the annotated frames, SA-V's
   6 fps: every `round(fps / 6)`-th frame (every 4th of a 24 fps video), frame 0 prompted with the boxes;
4. written as SA-V train files, `<out>/<id>.mp4` (the input's bytes for an mp4, else re-encoded at its fps) and
   `<out>/<id>_manual.json` (COCO RLE per annotated frame and masklet, every SA-V field; `video_duration` gives the
   fps, so `sav.annotation_stride` reads the stride back), and, with `--captions`, the caption line re-keyed to the
   masklet ids (`<out>/captions.jsonl`, the objects not found left out), so that
   `python -m ttm_jax.data.prepare --sav=<out> --captions=<out>/captions.jsonl` takes the folder as it is.

Resumable and counted like `prepare`: the json is written last, atomically, and marks a video done (a re-run skips
it); a video that cannot be read or labelled is skipped with its reason (`sav.SkipVideo`, counted by a
`sav.SkipCounter`); the run ends with `videos: N labelled, M skipped (reason=count, ...)`.

The models are callables (the data layer does not import the inference layer's `segment` module; the command line
passes `segment.GroundingDino(...).detect` and `segment.Sam2Video(...).propagate`):
- `detect(image uint8 [H, W, 3], names) -> [one object per name with .box (x0, y0, x1, y1) pixels and .score]`,
- `propagate(frames uint8 [T, H, W, 3], boxes float [K, 4]) -> bool [T, H, W, K]`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from ttm_jax import storage
from ttm_jax.data import captions as captions_lib
from ttm_jax.data import prompt_plan, sav, video_io
from ttm_jax.data.caption import SidecarWriter
from ttm_jax.data.video_io import SkipVideo

Detect = Callable[[np.ndarray, list[str]], Sequence[Any]]
Propagate = Callable[[np.ndarray, np.ndarray], np.ndarray]

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
CAPTIONS_FILE = "captions.jsonl"


def find_input_videos(root: str) -> list[tuple[str, str]]:
    """`(video id, path)` of every video file under `root` (any depth; hidden files ignored), sorted by path. The id
    is the file stem with characters other than letters, digits, `-` and `_` replaced by `_`; two files with the
    same id are an error naming both."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"label: --videos={root!r} is not a folder; give the folder of videos to label")
    found: dict[str, str] = {}
    for dirpath, _, files in sorted(os.walk(root)):
        for fn in sorted(files):
            if fn.startswith(".") or not fn.lower().endswith(VIDEO_EXTENSIONS):
                continue
            vid = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.splitext(fn)[0])
            path = os.path.join(dirpath, fn)
            if vid in found:
                raise ValueError(f"label: {found[vid]} and {path} both become video id {vid!r}; rename one")
            found[vid] = path
    return sorted(found.items(), key=lambda kv: kv[1])


def stride_for(fps: float) -> int:
    """The annotation stride of a video at `fps`: SA-V's 6 fps, `round(fps / 6)` frames (4 at 24 fps)."""
    return max(1, int(round(fps / sav.ANNOTATION_FPS)))


def _bucket(area: float) -> str:
    return "small" if area < 32**2 else ("medium" if area < 96**2 else "large")


def annotation_json(video_id: str, masks: np.ndarray, *, frame_count: int, fps: float,
                    masklet_ids: Sequence[int] | None = None) -> dict:
    """The SA-V annotation json of `masks bool [A, H, W, K]` (annotated frames 0, s, 2s, ... of a `frame_count`-frame
    video at `fps`): `masklet[j][k]` a COCO compressed RLE, and SA-V's other fields with their meaning (sizes over the
    frames where the masklet is visible, counts in annotated frames); `masklet_type` is `auto` (machine labels)."""
    a, h, w, k = masks.shape
    ids = list(range(k)) if masklet_ids is None else [int(i) for i in masklet_ids]
    masklet = []
    for j in range(a):
        row = []
        for m in range(k):
            rle = mask_utils.encode(np.asfortranarray(masks[j, :, :, m].astype(np.uint8)))
            row.append({"size": [h, w], "counts": rle["counts"].decode("ascii")})
        masklet.append(row)
    areas = masks.reshape(a, h * w, k).sum(1).astype(np.float64)  # [A, K]
    visible = areas > 0
    size_abs = [float(areas[visible[:, m], m].mean()) if visible[:, m].any() else 0.0 for m in range(k)]
    first = [int(np.argmax(visible[:, m])) if visible[:, m].any() else 0 for m in range(k)]
    changes = [int(np.sum(visible[first[m] + 1:, m] != visible[first[m]:-1, m])) for m in range(k)]
    return {
        "video_id": video_id, "video_duration": float(frame_count / fps), "video_frame_count": float(frame_count),
        "video_height": float(h), "video_width": float(w), "video_resolution": float(h * w),
        "video_environment": "", "video_split": "train", "masklet": masklet, "masklet_id": ids,
        "masklet_size_rel": [s / (h * w) for s in size_abs], "masklet_size_abs": size_abs,
        "masklet_size_bucket": [_bucket(s) for s in size_abs], "masklet_visibility_changes": changes,
        "masklet_first_appeared_frame": first, "masklet_frame_count": [a] * k,
        "masklet_edited_frame_count": [0] * k, "masklet_type": ["auto"] * k,
        "masklet_stability_score": [None] * k, "masklet_num": k,
    }


@dataclasses.dataclass(frozen=True)
class Objects:
    """What to find in a video: `names` (detector prompts), and per name the local prompt its caption gives (""
    without captions)."""

    names: list[str]
    local_prompts: list[str]


def objects_for(video_id: str, file: str, entry: captions_lib.CaptionEntry | None,
                objects: Sequence[str]) -> Objects:
    """The names of a video's objects: its entry's local prompts' object phrases (in key order), else the offline
    planner's objects of its caption, else `objects`; `SkipVideo("no_objects")` when none of these gives any."""
    if entry is not None:
        prompts = [entry.local_prompts[k] for k in sorted(entry.local_prompts, key=_key_order) if
                   entry.local_prompts[k]]
        if prompts:
            return Objects([prompt_plan.object_phrase(p) for p in prompts], prompts)
        try:
            plan = prompt_plan.plan_offline(entry.caption)
            return Objects(plan.objects, plan.local_prompts)
        except prompt_plan.PlanningError as e:
            if not objects:
                raise SkipVideo("no_objects", file, f"video {video_id}: its caption names no object the offline "
                                f"planner can read ({e}); give local prompts in --captions or names in --objects"
                                ) from None
    if not objects:
        raise SkipVideo("no_objects", file, f"video {video_id} has no caption line and no --objects are given: "
                        "nothing to look for")
    return Objects(list(objects), [""] * len(objects))


def _key_order(key: str) -> tuple[int, int | str]:
    return (0, int(key)) if key.isdigit() else (1, key)


@dataclasses.dataclass
class Summary:
    """What a labelling run did: videos labelled now, already done, skipped by reason (and each skip's message)."""

    labelled: int
    already: int
    skipped: dict[str, int]
    skipped_videos: list[str]
    out: str

    def line(self) -> str:
        """`videos: N labelled, M skipped (reason=count, ...)`, the line a run ends with."""
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(self.skipped.items()))
        n = sum(self.skipped.values())
        return f"videos: {self.labelled} labelled, {n} skipped" + (f" ({reasons})" if reasons else "")


def label_video(video_id: str, path: str, out: str, objects: Objects, detect: Detect, propagate: Propagate, *,
                threshold: float = 0.3) -> tuple[dict, list[int]]:
    """Labels one video: writes `<out>/<video_id>.mp4` and returns (its annotation json, to be written as
    `<out>/<video_id>_manual.json` by the caller, last; the indices of `objects.names` found, in masklet-id order).
    The json holds `masklet_name` too (the detector's name of each masklet; the SA-V reader ignores it). Raises
    `SkipVideo` naming the file."""
    info = video_io.probe(path)
    if not info.fps or not math.isfinite(info.fps):
        raise SkipVideo("unknown_fps", path, "the stream gives no frame rate; re-encode the video at a constant fps")
    stride = stride_for(info.fps)
    all_frames = info.num_frames or len(video_io.read_frames(path, seek=False))
    positions = np.arange(0, all_frames, stride)
    frames = video_io.read_frames(path, positions)
    found = detect(frames[0], list(objects.names))
    keep = [i for i, d in enumerate(found) if float(d.score) >= threshold]
    boxes = np.asarray([found[i].box for i in keep], np.float64).reshape(-1, 4)
    keep = [i for i, b in zip(keep, boxes, strict=True) if b[2] - b[0] >= 1 and b[3] - b[1] >= 1]
    if not keep:
        scores = ", ".join(f"{n!r}: {float(d.score):.2f}" for n, d in zip(objects.names, found, strict=True))
        raise SkipVideo("nothing_found", path, f"no object found on the first frame at --threshold={threshold:g} "
                        f"(best scores {scores}); lower the threshold or name the objects as they look")
    boxes = np.asarray([found[i].box for i in keep], np.float64)
    masks = np.asarray(propagate(frames, boxes), bool)
    if masks.shape != (len(frames), *frames.shape[1:3], len(keep)):
        raise ValueError(f"label: propagate returned {masks.shape} for {len(frames)} frames of "
                         f"{frames.shape[1]}x{frames.shape[2]} and {len(keep)} boxes")
    ann = annotation_json(video_id, masks, frame_count=all_frames, fps=info.fps)
    ann["masklet_name"] = [objects.names[i] for i in keep]
    sav.annotation_stride(all_frames, len(frames), info.fps, file=path)  # what the reader will derive
    mp4 = os.path.join(out, f"{video_id}.mp4")
    if path.lower().endswith(".mp4"):
        shutil.copyfile(path, mp4 + ".tmp")
        os.replace(mp4 + ".tmp", mp4)
    else:
        video_io.write_video(mp4, video_io.read_frames(path, seek=False), fps=info.fps)
    return ann, keep


def label_all(videos: str, out: str, detect: Detect, propagate: Propagate, *, captions: str = "",
              objects: Sequence[str] = (), threshold: float = 0.3) -> Summary:
    """Labels every video under `videos` not yet labelled in `out` -> `Summary` (module docstring)."""
    refs = find_input_videos(videos)
    if not refs:
        raise FileNotFoundError(f"label: no videos ({', '.join(VIDEO_EXTENSIONS)}) under --videos={videos!r}")
    entries = captions_lib.load_captions(captions) if captions else {}
    os.makedirs(out, exist_ok=True)
    counter = sav.SkipCounter("label")
    labelled = already = 0
    writer = SidecarWriter(os.path.join(out, CAPTIONS_FILE)) if captions else None
    try:
        for vid, path in refs:
            json_path = os.path.join(out, f"{vid}_manual.json")
            if os.path.exists(json_path):
                already += 1
                continue
            try:
                if captions and vid not in entries and not objects:
                    raise SkipVideo("missing_caption", path, f"video {vid} has no line in {captions} and no "
                                    "--objects are given")
                what = objects_for(vid, path, entries.get(vid), objects)
                ann, keep = label_video(vid, path, out, what, detect, propagate, threshold=threshold)
            except SkipVideo as e:
                counter.add(e)
                continue
            # the caption line first, then the json that marks the video done: a kill between them re-labels the
            # video and keeps its line (the same models give the same objects)
            if writer is not None and vid in entries and vid not in writer.done:
                e = entries[vid]
                writer.write(captions_lib.CaptionEntry(vid, e.caption, e.motion_prompt, {
                    str(m): what.local_prompts[i] for m, i in zip(ann["masklet_id"], keep, strict=True)}, e.category))
            storage.write_json_atomic(json_path, ann, indent=None, sort_keys=False)
            labelled += 1
            logging.info("label: %s -> %d objects (%s)", vid, len(keep), ", ".join(what.names[i] for i in keep))
    finally:
        if writer is not None:
            writer.close()
    return Summary(labelled, already, dict(counter.counts), list(counter.messages), out)
