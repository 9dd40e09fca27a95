"""SA-V-128, the TTM paper's real-video benchmark: 64 single-object and 64 multi-object SA-V videos.

    python -m ttm_jax.eval.sav128 --sav=DIR --captions=FILE --out=DIR [--ids=FILE] [--num_single=64 --num_multi=64]
        [--height=32 --width=32 --frames=9 --fps=12] [--max_objects=4] [--min_travel=0.1 --max_iou=0.5
        --min_area=0.01] [--overwrite]

`--sav`: SA-V train shards / unpacked folders (`sav.find_videos`, manual masklets; comma-separated for several), or
the val/test layout (a folder with `JPEGImages_24fps/` and `Annotations_6fps/`, `sav.find_frame_videos`).
`--captions`: the sidecar (`data/captions.py`: video_id, caption, motion_prompt, local_prompts, category). Give the
stage configs' `data.height`, `data.width`, `data.num_frames`, `data.fps` (defaults: the tiny config's).

Selection: `sav128_select.py` (the rule, its parameters and why; pure function of the annotations). Videos without a
caption are skipped and counted (`missing_caption`), as are videos the readers skip (`sav.SkipVideo` reasons). The
candidates of each split are taken in their balanced order until the split is full; a candidate whose mp4 cannot be
read is skipped (counted) and the next one taken. `--ids=FILE` takes a published selection instead: one video id per
line, optionally `id,single|multi` (blank lines and `#` comments skipped); every id must be under --sav with a
caption (an error names the missing ones); its objects are the rule's objects, or, when they do not fit the given
split, `sav128_select.objects_for_split`'s.

Writes

    OUT/videos/<video_id>/first_frame.png          uint8 [H, W, 3]: clip frame 0 centre-cropped and resized as
                                                   `clips.resize_frames` does (the request's image)
    OUT/videos/<video_id>/masks/<label>.png        one binary mask per object (0 / 255) at frame 0, object order
    OUT/videos/<video_id>/first_frame_masks.npz    `masks` bool [H, W, K]
    OUT/videos/<video_id>/video.mp4                the reference clip, [T, H, W, 3] at --fps (H.264 4:4:4, crf 12)
    OUT/videos/<video_id>/masks.npz                `masks` bool [T, H, W, K] (each frame: its nearest annotated
                                                   frame's masks, exclusive, lower masklet wins, as training clips),
                                                   `frame_indices` / `mask_frame_indices` int32 [T] (video frames)
    OUT/videos/<video_id>/video.json               the video's entry (written last: marks a finished video)
    OUT/requests.jsonl                             one request per video (`inference/requests.py: read_requests`;
                                                   `--config.sample.requests=OUT/requests.jsonl`), fields as
                                                   `motion_bench` writes
    OUT/manifest.json                              parameters, the rule, skip counts, per video its entry (id,
                                                   split, objects with their motion, score); written last

Prompts come from the sidecar; a missing motion prompt is `prompt_plan.plan_offline`'s (else the caption), a missing
local prompt is the offline planner's prompt of the same position when it finds as many objects, else the caption;
`prompt_sources` in each entry says which.

Atomic and resumable: every file is written to a temporary name and renamed; `build.json` pins the arguments at the
start. A re-run with the same arguments after a finished run does nothing; an interrupted run resumes (finished videos
are kept); other arguments (a different selection) are refused unless `--overwrite`, which removes what the new
selection does not use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Sequence

import numpy as np
from absl import flags

from ttm_jax import cli, storage
from ttm_jax.data import captions as captions_lib
from ttm_jax.data import clips, prompt_plan, sav, video_io
from ttm_jax.data import trajectory as trajectory_lib
from ttm_jax.data.video_io import SkipVideo
from ttm_jax.eval import motion_bench
from ttm_jax.eval import sav128_select as select
from ttm_jax.eval.motion_bench import npz_bytes, png_bytes
from ttm_jax.inference import requests as requests_lib

FORMAT = 1
MANIFEST = "manifest.json"
REQUESTS = "requests.jsonl"
SPEC = "build.json"
VIDEOS = "videos"
VIDEO_FILE = "video.json"
# the build arguments a video's files depend on (the counts and --ids do not: a video is reused across them)
VIDEO_PARAMS = ("format", "sav", "rule")
MP4_SETTINGS = motion_bench.MP4_SETTINGS  # near-lossless H.264 4:4:4, reproducible bytes


# ------------------------------------------------------------------------------------------------------ inputs


def find_refs(sav_path: str | Sequence[str], counter: sav.SkipCounter) -> list[sav.VideoRef]:
    """The videos under `sav_path`: the val/test layout when it is one folder holding `JPEGImages_24fps/`, else
    SA-V train shards / folders (comma-separated or a list for several) with manual annotations."""
    paths = sav_path.split(",") if isinstance(sav_path, str) else list(sav_path)
    if len(paths) == 1 and os.path.isdir(os.path.join(paths[0], "JPEGImages_24fps")):
        return sav.find_frame_videos(paths[0])
    refs = sav.find_videos(paths if len(paths) > 1 else paths[0], "manual", counter=counter)
    if not refs:
        raise FileNotFoundError(f"sav128 --sav={sav_path}: no SA-V videos with manual annotations "
                                f"({counter.summary()}); point --sav at sav_XXX.tar shards, their folders, or a "
                                "val/test folder")
    return refs


def read_ids(path: str) -> list[tuple[str, str | None]]:
    """`--ids` file -> [(video id, split or None)]; raises ValueError naming the file and line."""
    out, seen = [], set()
    with open(path) as f:
        for i, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            vid, _, split = (p.strip() for p in line.partition(","))
            if split and split not in select.SPLITS:
                raise ValueError(f"{path}:{i}: split {split!r}; write `id` or `id,single` / `id,multi`")
            if vid in seen:
                raise ValueError(f"{path}:{i}: video {vid} is listed twice; list each video once")
            seen.add(vid)
            out.append((vid, split or None))
    if not out:
        raise ValueError(f"{path}: no video ids; write one id per line (optionally `id,single|multi`)")
    return out


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def params(sav_path: str | Sequence[str], captions_path: str, rule: select.Rule, *, ids: str | None,
           num_single: int, num_multi: int) -> dict:
    """What a benchmark folder is a function of (the data files by path, the captions and ids by content)."""
    paths = sav_path.split(",") if isinstance(sav_path, str) else list(sav_path)
    return {"format": FORMAT, "sav": [os.path.abspath(p) for p in paths],
            "captions_sha256": _sha256(captions_path), "ids_sha256": _sha256(ids) if ids else None,
            "num_single": int(num_single), "num_multi": int(num_multi), "rule": rule.to_json()}


# ------------------------------------------------------------------------------------------------------ prompts


def prompts_for(entry: captions_lib.CaptionEntry, keys: Sequence[str]) -> tuple[str, list[str], dict]:
    """(motion prompt, local prompts in object order, their sources) of a video's objects (masklet `keys`): the
    sidecar's; a missing one from `prompt_plan.plan_offline` of the caption, else the caption itself."""
    try:
        plan = prompt_plan.plan_offline(entry.caption)
    except prompt_plan.PlanningError:
        plan = None
    motion, motion_source = entry.motion_prompt, "sidecar"
    if not motion.strip():
        motion, motion_source = (plan.motion_prompt, "offline") if plan else (entry.caption, "caption")
    local, sources = [], []
    for i, k in enumerate(keys):
        p = entry.local_prompts.get(k, "")
        if p.strip():
            local.append(p)
            sources.append("sidecar")
        elif plan is not None and len(plan.local_prompts) == len(keys):
            local.append(plan.local_prompts[i])
            sources.append("offline")
        else:
            local.append(entry.caption)
            sources.append("caption")
    return motion, local, {"motion_prompt": motion_source, "local_prompts": sources}


def labels_for(local_prompts: Sequence[str]) -> list[str]:
    """A file-name label per object from its local prompt's object phrase (`red_square`), distinct (`dog`, `dog_2`);
    `object_<k>` when the phrase is no short name."""
    out: list[str] = []
    for k, p in enumerate(local_prompts):
        slug = re.sub(r"[^a-z0-9]+", "_", prompt_plan.object_phrase(p).lower()).strip("_")
        if not slug or len(slug) > 40:
            slug = f"object_{k + 1}"
        base, n = slug, 2
        while slug in out:
            slug, n = f"{base}_{n}", n + 1
        out.append(slug)
    return out


# ------------------------------------------------------------------------------------------------------ writing


def clip_arrays(ref: sav.VideoRef, ann: sav.Annotation, a: select.Analysis,
                rule: select.Rule) -> tuple[np.ndarray, np.ndarray]:
    """(video uint8 [T, H, W, 3], masks bool [T, H, W, K]) of a selected video's clip at the rule's geometry; raises
    `SkipVideo` for an mp4 that cannot be read or does not match its json."""
    hw = (rule.height, rule.width)
    frames = sav.read_frames(ref, a.frame_indices)
    if frames.shape[1:3] != (ann.height, ann.width):
        raise SkipVideo("size_mismatch", ref.video.name, f"decodes to {frames.shape[1]}x{frames.shape[2]} (HxW) but "
                        f"{ann.file} says {ann.height}x{ann.width}")
    uniq, inverse = np.unique(np.asarray(a.mask_positions), return_inverse=True)
    ids = trajectory_lib.ids_from_masks(ann.masks(uniq, list(a.objects)))  # [U, h, w]
    ids = clips.resize_ids(ids, a.box, hw)[inverse.reshape(-1)]
    return clips.resize_frames(frames, a.box, hw), trajectory_lib.masks_from_ids(ids, len(a.objects))


def _entry(a: select.Analysis, ann: sav.Annotation, cap: captions_lib.CaptionEntry, p: dict) -> dict:
    keys = [ann.masklet_keys[k] for k in a.objects]
    motion, local, sources = prompts_for(cap, keys)
    labels = labels_for(local)
    return {
        "video_id": a.video_id, "split": a.split, "category": cap.category,
        "params": {k: p[k] for k in VIDEO_PARAMS},
        "caption": cap.caption, "motion_prompt": motion, "local_prompts": local, "prompt_sources": sources,
        "motion_score": round(a.score, 6), "num_moving": a.num_moving,
        "objects": [{**a.masklets[k].to_json(), "masklet_key": ann.masklet_keys[k], "label": lab, "palette_id": i + 1}
                    for i, (k, lab) in enumerate(zip(a.objects, labels, strict=True))],
        "masklets": [m.to_json() for m in a.masklets],
        "frame_indices": list(a.frame_indices), "mask_frame_indices": [p_ * ann.stride for p_ in a.mask_positions],
        "crop_box": [round(v, 3) for v in a.box],
        "files": {"first_frame": "first_frame.png", "masks": [f"masks/{lab}.png" for lab in labels],
                  "first_frame_masks": "first_frame_masks.npz", "video": "video.mp4", "masks_npz": "masks.npz"},
    }


def write_video(out: str, ref: sav.VideoRef, ann: sav.Annotation, a: select.Analysis,
                cap: captions_lib.CaptionEntry, rule: select.Rule, p: dict) -> dict:
    """Writes one video's folder (video.json last) unless it is there already with this entry; returns the entry."""
    entry = _entry(a, ann, cap, p)
    folder = os.path.join(out, VIDEOS, a.video_id)
    if storage.read_json(os.path.join(folder, VIDEO_FILE), missing=None) == entry:
        return entry
    video, masks = clip_arrays(ref, ann, a, rule)
    if os.path.isdir(os.path.join(folder, "masks")):  # labels of an older entry
        shutil.rmtree(os.path.join(folder, "masks"))
    for k, rel in enumerate(entry["files"]["masks"]):
        mask = np.where(masks[0, :, :, k], 255, 0).astype(np.uint8)
        storage.write_bytes_atomic(os.path.join(folder, rel), png_bytes(mask))
    storage.write_bytes_atomic(os.path.join(folder, "first_frame.png"), png_bytes(video[0]))
    storage.write_bytes_atomic(os.path.join(folder, "first_frame_masks.npz"), npz_bytes(masks=masks[0]))
    mp4 = video_io.encode_video(video, rule.fps, **MP4_SETTINGS)
    storage.write_bytes_atomic(os.path.join(folder, "video.mp4"), mp4)
    frame_idx = np.asarray(a.frame_indices, np.int32)
    mask_idx = np.asarray(entry["mask_frame_indices"], np.int32)
    storage.write_bytes_atomic(os.path.join(folder, "masks.npz"), npz_bytes(masks=masks, frame_indices=frame_idx,
                                                          mask_frame_indices=mask_idx))
    storage.write_json_atomic(os.path.join(folder, VIDEO_FILE), entry, sort_keys=False)
    return entry


def request_of(entry: dict) -> dict:
    """The generation request of a video (paths relative to the benchmark folder), as `motion_bench` writes them."""
    base = f"{VIDEOS}/{entry['video_id']}"
    return {"name": entry["video_id"], "image": f"{base}/{entry['files']['first_frame']}", "caption": entry["caption"],
            "masks": [f"{base}/{m}" for m in entry["files"]["masks"]], "motion_prompt": entry["motion_prompt"],
            "local_prompts": entry["local_prompts"]}


# ------------------------------------------------------------------------------------------------------ building


@dataclasses.dataclass
class Summary:
    """What a build did: `built` videos written now (0 for a no-op), the manifest, whether it was already there."""

    out: str
    manifest: dict
    built: int
    already: bool

    def line(self) -> str:
        m = self.manifest
        skipped = ", ".join(f"{r}={n}" for r, n in sorted(m["skipped"].items())) or "none"
        state = "already built, nothing to do" if self.already else f"{self.built} videos written"
        return (f"sav128: {m['selected']['single']} single + {m['selected']['multi']} multi videos under {self.out} "
                f"({state}); candidates {m['candidates']}; skipped: {skipped} (missing captions: "
                f"{m['skipped'].get('missing_caption', 0)}); requests in {os.path.join(self.out, REQUESTS)}")


def _check_spec(out: str, p: dict, overwrite: bool) -> bool:
    """True when `out` is a finished build of `p`; raises ValueError for other arguments without `overwrite`."""
    manifest = storage.read_json(os.path.join(out, MANIFEST), missing=None)
    spec = storage.read_json(os.path.join(out, SPEC), missing=None)
    old = (manifest or {}).get("params", spec)
    if old is None or old == p:
        return manifest is not None and manifest.get("params") == p
    if not overwrite:
        diff = sorted(k for k in set(old) | set(p) if old.get(k) != p.get(k))
        raise ValueError(f"{os.path.join(out, SPEC)}: {out} holds an SA-V-128 build of other arguments "
                         f"({', '.join(diff)} differ), i.e. another selection; give another --out, the same "
                         "arguments, or --overwrite")
    for name in (MANIFEST, REQUESTS):  # a killed overwrite must not leave the old manifest describing new files
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    return False


def build(sav_path: str | Sequence[str], captions_path: str, out: str, *, ids: str | None = None,
          num_single: int = 64, num_multi: int = 64, rule: select.Rule = select.Rule(),
          overwrite: bool = False) -> Summary:
    """Builds (or finishes, or leaves as it is) the benchmark folder `out` (module docstring)."""
    rule.check()
    if num_single < 0 or num_multi < 0 or num_single + num_multi == 0:
        raise ValueError(f"sav128 --num_single={num_single} --num_multi={num_multi}: give counts >= 0, not both 0")
    p = params(sav_path, captions_path, rule, ids=ids, num_single=num_single, num_multi=num_multi)
    if _check_spec(out, p, overwrite):
        return Summary(out, storage.read_json(os.path.join(out, MANIFEST), missing=None), 0, True)
    os.makedirs(out, exist_ok=True)
    storage.remove_stale_tmp(out, recursive=True)
    storage.write_json_atomic(os.path.join(out, SPEC), p, sort_keys=False)
    counter = sav.SkipCounter("sav128")
    refs = find_refs(sav_path, counter)
    caps = captions_lib.load_captions(captions_path)
    if ids:
        plan, anns, candidates = _plan_ids(ids, refs, caps, rule)
    else:
        plan, anns, candidates = _plan_rule(refs, caps, rule, counter, {"single": num_single, "multi": num_multi})
    want = {"single": num_single, "multi": num_multi}
    by_id = {r.video_id: r for r in refs}
    entries: list[dict] = []
    built = 0
    for split in select.SPLITS:
        taken = 0
        for a in plan.get(split, []):
            if not ids and taken == want[split]:
                break
            folder_done = storage.read_json(os.path.join(out, VIDEOS, a.video_id, VIDEO_FILE), missing=None)
            ann = anns[a.video_id]
            try:
                e = write_video(out, by_id[a.video_id], ann, a, caps[a.video_id], rule, p)
            except SkipVideo as err:
                if ids:
                    raise ValueError(f"sav128 --ids={ids}: video {a.video_id} cannot be read: {err}") from None
                counter.add(err)
                continue
            built += folder_done != e
            entries.append(e)
            taken += 1
        if not ids and taken < want[split]:
            logging.warning("sav128: only %d %s-object videos of %d asked for (%d candidates)", taken, split,
                            want[split], candidates[split])
    keep = {e["video_id"] for e in entries}
    videos_dir = os.path.join(out, VIDEOS)
    for name in sorted(os.listdir(videos_dir)) if os.path.isdir(videos_dir) else []:
        if name not in keep:  # another selection's video (only after --overwrite: other arguments are refused)
            shutil.rmtree(os.path.join(videos_dir, name))
    lines = []
    for e in entries:
        req = request_of(e)
        requests_lib.Request.from_json(req, where=f"{REQUESTS}:{e['video_id']}")  # the reader accepts it
        lines.append(json.dumps(req))
    storage.write_bytes_atomic(os.path.join(out, REQUESTS), ("\n".join(lines) + "\n").encode())
    manifest = {
        "params": p, "rule": {"name": "ids" if ids else "sav128_select", "parameters": rule.to_json(),
                              "description": f"the published selection in --ids={ids}" if ids else
                              (select.__doc__ or "").strip()},
        "selected": {s: sum(e["split"] == s for e in entries) for s in select.SPLITS},
        "candidates": candidates, "skipped": dict(sorted(counter.counts.items())),
        "skipped_videos": list(counter.messages), "videos": entries,
    }
    storage.write_json_atomic(os.path.join(out, MANIFEST), manifest, sort_keys=False)
    return Summary(out, manifest, built, False)


def _analyse(ref: sav.VideoRef, rule: select.Rule, category: str | None) -> tuple[sav.Annotation, select.Analysis]:
    ann = sav.read_annotation(ref)
    return ann, select.analyse(ann, rule, category=category)


def _plan_rule(refs: Sequence[sav.VideoRef], caps: dict, rule: select.Rule, counter: sav.SkipCounter,
               want: dict[str, int]) -> tuple[dict, dict, dict]:
    """-> ({split: candidates in the order taken}, {video id: annotation}, {single|multi|none: candidate counts})."""
    anns, cands = {}, []
    counts = {"single": 0, "multi": 0, "none": 0}
    for ref in refs:
        try:
            cap = captions_lib.lookup(caps, ref.video_id, file=ref.video.name)
            ann, a = _analyse(ref, rule, cap.category)
        except SkipVideo as e:
            counter.add(e)
            continue
        counts[a.split or "none"] += 1
        if a.split is not None:
            anns[ref.video_id] = ann
            cands.append(a)
    return select.split_order(cands, want), anns, counts


def _plan_ids(path: str, refs: Sequence[sav.VideoRef], caps: dict,
              rule: select.Rule) -> tuple[dict, dict, dict]:
    """The `--ids` selection, in file order within each split; ValueError naming every id missing from --sav or the
    captions, or whose annotation is skipped."""
    wanted = read_ids(path)
    by_id = {r.video_id: r for r in refs}
    absent = [v for v, _ in wanted if v not in by_id]
    uncaptioned = [v for v, _ in wanted if v in by_id and v not in caps]
    if absent or uncaptioned:
        parts = []
        if absent:
            parts.append(f"not under --sav: {', '.join(absent)}")
        if uncaptioned:
            parts.append(f"without a caption line: {', '.join(uncaptioned)}")
        raise ValueError(f"sav128 --ids={path}: {len(absent) + len(uncaptioned)} of {len(wanted)} videos are missing "
                         f"({'; '.join(parts)}); add them to --sav / --captions or remove them from the list")
    plan: dict[str, list[select.Analysis]] = {s: [] for s in select.SPLITS}
    anns = {}
    for vid, split in wanted:
        try:
            ann, a = _analyse(by_id[vid], rule, caps[vid].category)
        except SkipVideo as e:
            raise ValueError(f"sav128 --ids={path}: video {vid} cannot be used: {e}") from None
        a = select.objects_for_split(ann, a, rule, split)
        if split is not None and a.split != split:
            raise AssertionError(f"sav128: {vid} planned as {a.split}, listed as {split}")
        anns[vid] = ann
        plan[a.split].append(a)
    return plan, anns, {s: len(v) for s, v in plan.items()}


def load_manifest(out: str) -> dict:
    """A finished benchmark folder's manifest; FileNotFoundError naming it and the fix when there is none."""
    m = storage.read_json(os.path.join(out, MANIFEST), missing=None)
    if m is None:
        raise FileNotFoundError(f"{os.path.join(out, MANIFEST)}: no SA-V-128 manifest; build one with `python -m "
                                f"ttm_jax.eval.sav128 --sav=... --captions=... --out={out}`")
    return m


# the build raises these for what the user gave (a selection file, a video): one line naming the file and the fix
USER_ERRORS = (ValueError, FileNotFoundError)


def main(argv: Sequence[str]) -> None:
    """Builds SA-V-128 from `--sav` + `--captions` under `--out` and says what it kept."""
    del argv
    f = flags.FLAGS
    cli.require_paths("--sav", f.sav, "SA-V shards or folders, or a val/test folder", command="sav128")
    cli.require_paths("--captions", f.captions, "the captions sidecar JSONL", command="sav128")
    if f.ids:
        cli.require_paths("--ids", f.ids, "a selection file (one `video_id[,single|multi]` per line)",
                          command="sav128")
    rule = select.Rule(height=f.height, width=f.width, frames=f.frames, fps=f.fps, min_travel=f.min_travel,
                       max_iou=f.max_iou, min_area=f.min_area, max_objects=f.max_objects)
    summary = build(f.sav, f.captions, f.out, ids=f.ids, num_single=f.num_single, num_multi=f.num_multi, rule=rule,
                    overwrite=f.overwrite)
    for message in summary.manifest["skipped_videos"][:20]:
        print(f"skipped {message}")
    print(summary.line())


def define_flags() -> None:
    """The flags of `main` (defined only when this module runs, so importing it defines nothing)."""
    flags.DEFINE_string("sav", None, "SA-V shards / folders (comma-separated), or a val/test folder", required=True)
    flags.DEFINE_string("captions", None, "captions sidecar JSONL", required=True)
    flags.DEFINE_string("out", None, "output folder", required=True)
    flags.DEFINE_string("ids", None, "a published selection: one `video_id[,single|multi]` per line")
    flags.DEFINE_integer("num_single", 64, "single-object videos")
    flags.DEFINE_integer("num_multi", 64, "multi-object videos")
    flags.DEFINE_integer("height", 32, "clip height (config.data.height; even)")
    flags.DEFINE_integer("width", 32, "clip width (config.data.width; even)")
    flags.DEFINE_integer("frames", 9, "clip frames (config.data.num_frames)")
    flags.DEFINE_float("fps", 12.0, "clip frame rate (config.data.fps)")
    flags.DEFINE_integer("max_objects", select.MAX_OBJECTS, "objects per video at most (config.data.max_objects)")
    flags.DEFINE_float("min_travel", select.MIN_TRAVEL, "moving: centroid travel >= this share of the diagonal")
    flags.DEFINE_float("max_iou", select.MAX_IOU, "moving: occlusion-aware IoU with frame 0 below this")
    flags.DEFINE_float("min_area", select.MIN_AREA, "objects cover at least this share of the first frame")
    flags.DEFINE_bool("overwrite", False, "replace a build of other arguments")


if __name__ == "__main__":
    define_flags()
    cli.run(main, user_errors=USER_ERRORS)
