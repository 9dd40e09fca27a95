"""SA-V (Segment Anything Video) reading: find videos, read masklet annotations and frames.

Train split as released: tar shards `sav_000.tar ...` that unpack to `sav_XXX/sav_XXXXXX.mp4` with
`sav_XXXXXX_manual.json` and `sav_XXXXXX_auto.json` beside each video. `find_videos` accepts the shards, the unpacked
folders (flat or nested, any depth), or a mix, on any `etils.epath` path (local or gs://).

Annotation json (per video): `video_frame_count`, `video_height`, `video_width`, `video_duration`, `masklet` (outer
list over annotated frames, inner over masklets, each a COCO compressed RLE `{"size": [H, W], "counts": str}`),
`masklet_id`, `masklet_size_abs` (mean area in pixels over the annotated frames where the masklet is visible), ...
Masklets are annotated at 6 fps, every 4th frame of the 24 fps video (annotated frame `j` is video frame
`j * stride`). `annotation_stride` checks that `len(masklet)` fits `video_frame_count` at that rate (or at the rate the
json's own fps, `video_frame_count / video_duration`, implies): a masklet list cut short (the json then has no
`masklet_frame_count` to tell) would otherwise lay the masks over the wrong frames, so it is a skip, never a guess.
A video without masklets (`masklet_id` empty) is a skip too: its clips would have no objects.

Val/test layout: `JPEGImages_24fps/<video_id>/<frame:05d>.jpg` and `Annotations_6fps/<video_id>/<obj_id>/<frame>.png`
(`find_frame_videos`); its PNG masks are turned into the same RLE `Annotation`, so everything downstream is shared.

A video that cannot be used raises `SkipVideo(reason, file, detail)`; `SkipCounter` counts skips by reason.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import logging
import math
import os
import re
import tarfile
import threading
from collections.abc import Sequence

import numpy as np
from etils import epath
from PIL import Image
from pycocotools import mask as mask_utils

from ttm_jax import cli
from ttm_jax.data import video_io
from ttm_jax.data.video_io import SkipVideo

__all__ = ["SkipVideo", "SkipCounter", "Source", "VideoRef", "Annotation", "find_videos", "find_frame_videos",
           "read_annotation", "read_frames", "derive_stride", "annotation_stride", "ANNOTATION_KINDS",
           "ANNOTATION_FPS", "SAV_STRIDE"]

ANNOTATION_KINDS = ("manual", "auto", "both")
_JSON_RE = re.compile(r"^(?P<vid>.+)_(?P<kind>manual|auto)\.json$")
_REQUIRED_FIELDS = ("video_frame_count", "video_height", "video_width", "masklet", "masklet_id")
# SA-V annotates masklets at 6 fps: every 4th frame of its 24 fps videos
ANNOTATION_FPS = 6.0
SAV_FPS = 24.0
SAV_STRIDE = 4
# an auto masklet that overlaps a manual one this much (mean IoU over annotated frames) is the same object
_DUPLICATE_IOU = 0.5


class SkipCounter:
    """Counts skipped videos by reason and logs each one (thread-safe)."""

    def __init__(self, name: str = "sav"):
        self.name = name
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, str] = {}  # reason -> first message, for the summary
        self.messages: list[str] = []  # every skip's message ("<file>: <detail> [<reason>]"), in order
        self._lock = threading.Lock()

    def add(self, err: SkipVideo) -> None:
        """Counts `err` under its reason, keeps its message and logs it."""
        with self._lock:
            self.counts[err.reason] += 1
            self.examples.setdefault(err.reason, str(err))
            self.messages.append(str(err))
        logging.warning("%s: skipped %s", self.name, err)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return f"{self.name}: no videos skipped"
        parts = ", ".join(f"{r}={n} (e.g. {self.examples[r]})" for r, n in sorted(self.counts.items()))
        return f"{self.name}: skipped {self.total} videos: {parts}"


@dataclasses.dataclass(frozen=True)
class Source:
    """A file, or a member of a tar shard (`member` its name, `offset`/`size` its data bytes in the tar).

    Only strings and ints: picklable into Grain worker processes.
    """

    path: str
    member: str = ""
    offset: int = 0
    size: int = -1

    @property
    def name(self) -> str:
        """For messages: `shard.tar:member` or the file path."""
        return f"{self.path}:{self.member}" if self.member else self.path

    def read_bytes(self) -> bytes:
        if not self.member:
            return epath.Path(self.path).read_bytes()
        with epath.Path(self.path).open("rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise SkipVideo("truncated_tar", self.name, f"member has {len(data)} of {self.size} bytes (truncated tar)")
        return data


@dataclasses.dataclass(frozen=True)
class VideoRef:
    """One video: its id, the video (an mp4 `Source`, or the JPEG frame folder for `layout="frames"`) and its
    annotations as `(kind, Source)` pairs (kind `manual` or `auto`; a PNG folder for `layout="frames"`)."""

    video_id: str
    video: Source
    annotations: tuple[tuple[str, Source], ...]
    layout: str = "train"  # train (mp4 + json) | frames (JPEGImages_24fps + Annotations_6fps)


@dataclasses.dataclass
class Annotation:
    """One video's masklets. `rles[j][m]` is masklet m at annotated frame j (video frame `j * stride`).

    `masklet_keys[m]` is the key local prompts use: `str(masklet_id)`, or `"auto:<id>"` for auto masklets when manual
    and auto are read together (`annotation="both"`; manual masklets first, auto duplicates of them dropped).
    """

    video_id: str
    file: str
    height: int
    width: int
    video_frame_count: int
    fps: float
    stride: int
    masklet_keys: list[str]
    rles: list[list[dict]]
    size_abs: np.ndarray  # float [M], the json's masklet_size_abs (NaN where absent)

    @property
    def num_annotated(self) -> int:
        return len(self.rles)

    @property
    def num_masklets(self) -> int:
        return len(self.masklet_keys)

    @property
    def annotated_frames(self) -> np.ndarray:
        """int32 `[num_annotated]`: the video frame of each annotated frame."""
        return np.arange(self.num_annotated, dtype=np.int32) * self.stride

    def areas(self) -> np.ndarray:
        """float `[num_annotated, M]` mask areas in pixels (from the RLEs, no decode)."""
        if not self.num_masklets:
            return np.zeros((self.num_annotated, 0))
        return np.asarray([mask_utils.area(row) for row in self.rles], dtype=np.float64).reshape(
            self.num_annotated, self.num_masklets)

    def areas_at(self, position: int) -> np.ndarray:
        """float `[M]` mask areas at one annotated position (from the RLEs, no decode)."""
        if not self.num_masklets:
            return np.zeros(0)
        return np.asarray(mask_utils.area(self.rles[position]), dtype=np.float64).reshape(self.num_masklets)

    def masks(self, positions: Sequence[int] | np.ndarray | None = None,
              masklets: Sequence[int] | None = None) -> np.ndarray:
        """bool `[len(positions), H, W, len(masklets)]` at annotated-frame positions (not video frames).

        A transposed view of a `[positions, masklets, W, H]` buffer: COCO RLE runs down columns, so each decoded mask
        is copied without a transpose, and a masklet's pixels (and a crop's columns) stay contiguous; reductions over
        the pixel axes (`trajectory.object_scores`) run several times faster than on a masklet-last copy.
        """
        pos = np.arange(self.num_annotated) if positions is None else np.asarray(positions, np.int64).reshape(-1)
        ms = list(range(self.num_masklets)) if masklets is None else list(masklets)
        buf = np.zeros((len(pos), len(ms), self.width, self.height), dtype=bool)
        for i, j in enumerate(pos.tolist()):
            if ms:  # pycocotools decodes to a Fortran-order [H, W, n] uint8 array: its transpose is C-contiguous
                buf[i] = mask_utils.decode([self.rles[j][m] for m in ms]).T.view(bool)
        return buf.transpose(0, 3, 2, 1)


# ----------------------------------------------------------------------------------------------- finding videos

def _as_paths(path) -> list[epath.Path]:
    if isinstance(path, (list, tuple)):
        return [epath.Path(p) for p in path]
    return [epath.Path(path)]


def _classify(basename: str) -> tuple[str, str] | None:
    """`sav_000001.mp4` -> ("sav_000001", "mp4"); `sav_000001_manual.json` -> ("sav_000001", "manual"); None for
    anything else, including hidden files and macOS `._*` resource forks that tar files often carry."""
    if basename.startswith("."):
        return None
    if basename.endswith(".mp4"):
        return basename[:-4], "mp4"
    m = _JSON_RE.match(basename)
    if m:
        return m.group("vid"), m.group("kind")
    return None


def _scan_tar(path: epath.Path, found: dict, foreign: list[str]) -> None:
    with path.open("rb") as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
            for info in tar:
                if not info.isfile():
                    continue
                c = _classify(os.path.basename(info.name))
                if c is None:
                    foreign.append(f"{path}:{info.name}")
                    continue
                _add(found, c[0], c[1], Source(os.fspath(path), info.name, info.offset_data, info.size))
        except tarfile.TarError as e:
            # a shard cut short still yields the members before the damage; those are listed, the rest is lost
            logging.warning("%s: tar read stopped (%s); members after this point are not listed", path, e)


def _add(found: dict, vid: str, kind: str, src: Source) -> None:
    have = found.setdefault(vid, {})
    if kind in have:
        logging.warning("find_videos: %s is a second copy of %s; keeping the first", src.name, have[kind].name)
    else:
        have[kind] = src


def _scan_dir(root: epath.Path, found: dict, foreign: list[str]) -> None:
    # walk order is the filesystem's; sort so that "the first copy wins" means the same copy on every host
    top = os.fspath(root)
    scheme = top[:top.index("://") + 3] if "://" in top else ""  # epath's gs:// walk gives folders without it
    paths = []
    for dirpath, _, filenames in root.walk():
        d = os.fspath(dirpath)
        d = d if d.startswith(scheme) else scheme + d.lstrip("/")
        paths += [os.fspath(epath.Path(d) / fn) for fn in filenames]
    paths.sort()
    for path in paths:
        fn = os.path.basename(path)
        if fn.endswith(".tar"):
            _scan_tar(epath.Path(path), found, foreign)
            continue
        c = _classify(fn)
        if c is None:
            foreign.append(path)
            continue
        _add(found, c[0], c[1], Source(path))


def find_videos(path, annotation: str = "manual", *, counter: SkipCounter | None = None) -> list[VideoRef]:
    """All SA-V train videos under `path` (a tar shard, a folder of shards and/or unpacked videos, or a list of these)
    -> `VideoRef`s sorted by video id.

    `annotation` (manual | auto | both) says which jsons a video needs; a video missing its mp4 or a needed json is
    skipped and counted in `counter` (reason `missing_file`). Files that are neither an mp4 nor an SA-V json are
    logged and ignored (they are not videos). A video id found twice (e.g. in a shard and unpacked) is taken once.
    """
    if annotation not in ANNOTATION_KINDS:
        raise ValueError(f"find_videos: annotation={annotation!r}; choose one of {ANNOTATION_KINDS} "
                         f"(config.data.annotation)")
    found: dict[str, dict[str, Source]] = {}
    foreign: list[str] = []
    for p in _as_paths(path):
        if not p.exists():
            raise cli.MissingInput(f"{p}: SA-V path does not exist; set config.data.sav_path to a tar shard or a "
                                    f"folder of shards / videos")
        if p.is_dir():
            _scan_dir(p, found, foreign)
        elif p.name.endswith(".tar"):
            _scan_tar(p, found, foreign)
        else:
            raise ValueError(f"{p}: not a tar shard or a folder; point config.data.sav_path at sav_XXX.tar files or "
                             f"the folders they unpack to")
    if foreign:
        logging.info("find_videos: ignored %d files that are not SA-V videos or annotations, e.g. %s",
                     len(foreign), foreign[:3])
    kinds = ("manual", "auto") if annotation == "both" else (annotation,)
    refs = []
    for vid in sorted(found):
        parts = found[vid]
        missing = [k for k in ("mp4",) + kinds if k not in parts]
        if missing:
            have = next(iter(parts.values())).name
            err = SkipVideo("missing_file", have, f"video {vid} has no {' or '.join(missing)} file beside it "
                            f"(annotation={annotation!r})")
            if counter is not None:
                counter.add(err)
            else:
                logging.warning("find_videos: skipped %s", err)
            continue
        refs.append(VideoRef(vid, parts["mp4"], tuple((k, parts[k]) for k in kinds)))
    return refs


def find_frame_videos(root) -> list[VideoRef]:
    """The val/test layout under `root`: `JPEGImages_24fps/<video_id>/*.jpg` + `Annotations_6fps/<video_id>/...`."""
    root = epath.Path(root)
    jpeg, ann = root / "JPEGImages_24fps", root / "Annotations_6fps"
    if not jpeg.is_dir() or not ann.is_dir():
        raise FileNotFoundError(f"{root}: expected JPEGImages_24fps/ and Annotations_6fps/ folders (SA-V val/test)")
    refs = []
    for d in sorted(jpeg.iterdir(), key=lambda p: p.name):
        if not d.is_dir():
            continue
        a = ann / d.name
        if not a.is_dir():
            logging.warning("find_frame_videos: %s has no %s; skipped", d, a)
            continue
        refs.append(VideoRef(d.name, Source(os.fspath(d)), (("manual", Source(os.fspath(a))),), layout="frames"))
    return refs


# ----------------------------------------------------------------------------------------------- annotations

def derive_stride(video_frame_count: int, num_annotated: int, *, file: str = "") -> int:
    """Annotation stride s: annotated frames 0, s, ..., (n-1)s are every s-th frame of the video, so
    `(n-1) s <= video_frame_count - 1 < n s`; the largest such s (4 for SA-V's 6-of-24 fps: 483 frames, 121
    annotated). Raises `SkipVideo("frame_count")` if no whole stride fits.
    """
    f, n = int(video_frame_count), int(num_annotated)
    if n <= 0 or f <= 0 or n > f:
        raise SkipVideo("frame_count", file, f"video_frame_count={f} with {n} annotated frames (len(masklet)): need "
                        "1 <= annotated <= video frames")
    if n == 1:
        return 1
    s = (f - 1) // (n - 1)
    if n * s <= f - 1:
        raise SkipVideo("frame_count", file, f"{n} annotated frames are not every s-th frame of a {f}-frame video for "
                        f"any whole s (len(masklet) vs video_frame_count)")
    return s


def _fits(video_frame_count: int, num_annotated: int, stride: int) -> bool:
    """Whether annotated frames 0, s, ..., (n-1)s are every s-th frame of the video: `(n-1) s <= F-1 < n s`."""
    return (num_annotated - 1) * stride <= video_frame_count - 1 < num_annotated * stride


def annotation_stride(video_frame_count: int, num_annotated: int, fps: float = SAV_FPS, *, file: str = "") -> int:
    """The annotation stride of a video whose `num_annotated` annotated frames (`len(masklet)`) cover its
    `video_frame_count` frames at SA-V's annotation rate: every `SAV_STRIDE` (4th) frame, 6 of 24 fps, or every
    `fps / ANNOTATION_FPS`-th frame for a video of another `fps` (`video_frame_count / video_duration`).

    Unlike `derive_stride` (the largest stride that fits, whatever it is), a count that fits no plausible stride is
    an error: a masklet list cut short without `masklet_frame_count` (121 annotated frames of a 483-frame video cut
    to 21 would otherwise read as "every 24th frame" and put the masks on the wrong frames). Raises
    `SkipVideo("frame_count")` naming `file`.
    """
    f, n = int(video_frame_count), int(num_annotated)
    if n <= 0 or f <= 0 or n > f:
        raise SkipVideo("frame_count", file, f"video_frame_count={f} with {n} annotated frames (len(masklet)): need "
                        "1 <= annotated <= video frames; fix the json or drop the video")
    plausible = []
    if fps and math.isfinite(fps) and fps > 0:
        r = fps / ANNOTATION_FPS
        plausible = sorted({max(1, math.floor(r)), max(1, math.ceil(r))}, key=lambda c: (abs(c - r), c))
    for s in plausible + [SAV_STRIDE]:
        if _fits(f, n, s):
            return s
    s = plausible[0] if plausible else SAV_STRIDE
    want = -(-f // s)
    try:
        got = (f"they would be one frame in {derive_stride(f, n)}" if n > 1 else
               "one annotated frame would stand for the whole video")
    except SkipVideo:
        got = "they are not every s-th frame for any whole s"
    raise SkipVideo("frame_count", file, f"{n} annotated frames (len(masklet)) do not fit video_frame_count={f} at "
                    f"{fps:g} fps: SA-V annotates at {ANNOTATION_FPS:g} fps (one frame in {s}), which gives {want} "
                    f"annotated frames; {got}. The masklet list is cut short or padded (no masklet_frame_count says "
                    "so), or video_frame_count / video_duration is wrong: fix the json or drop the video")


def _load_json(src: Source) -> dict:
    try:
        d = json.loads(src.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SkipVideo("bad_json", src.name, f"not valid JSON ({e})") from e
    except OSError as e:
        raise SkipVideo("unreadable_json", src.name, f"cannot read ({e})") from e
    if not isinstance(d, dict):
        raise SkipVideo("bad_json", src.name, "top level is not a JSON object")
    return d


def _fps(d: dict, frames: int, name: str) -> float:
    """The video's fps, `video_frame_count / video_duration` (SA-V's 24 when the json gives no duration)."""
    duration = d.get("video_duration")
    if not duration:
        return SAV_FPS
    try:
        seconds = float(duration)
    except (TypeError, ValueError):
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise SkipVideo("bad_field", name, f"video_duration={duration!r} is not a positive number of seconds (the "
                        "video's fps is video_frame_count / video_duration); fix it, or remove the field for SA-V's "
                        "24 fps")
    return frames / seconds


def _parse(d: dict, name: str) -> tuple[int, int, int, float, list[int], list[list[dict]], np.ndarray]:
    for f in _REQUIRED_FIELDS:
        if f not in d:
            raise SkipVideo("missing_field", name, f"missing field {f!r} (SA-V annotation json needs "
                            f"{', '.join(_REQUIRED_FIELDS)})")
    try:
        frames, h, w = int(d["video_frame_count"]), int(d["video_height"]), int(d["video_width"])
        ids = [int(i) for i in d["masklet_id"]]
    except (TypeError, ValueError) as e:
        raise SkipVideo("bad_field", name, f"video_frame_count / video_height / video_width / masklet_id: {e}") from e
    fps = _fps(d, frames, name)
    masklet = d["masklet"]
    if not isinstance(masklet, list) or (ids and not masklet):
        raise SkipVideo("bad_field", name, "field 'masklet' is empty or not a list of annotated frames")
    n = len(masklet)
    for j, row in enumerate(masklet):
        if not isinstance(row, list) or len(row) != len(ids):
            got = len(row) if isinstance(row, list) else type(row).__name__
            raise SkipVideo("masklet_length", name, f"annotated frame {j} has {got} masklets, masklet_id lists "
                            f"{len(ids)}: a masklet has fewer frames than the others")
        for m, rle in enumerate(row):
            if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
                raise SkipVideo("bad_rle", name, f"masklet {ids[m]} frame {j}: not an RLE {{size, counts}}")
            if list(rle["size"]) != [h, w]:
                raise SkipVideo("rle_size", name, f"masklet {ids[m]} frame {j}: RLE size {list(rle['size'])} but "
                                f"the video is [{h}, {w}] (video_height, video_width)")
    if ids:  # no masklets: nothing to lay over the frames (read_annotation decides whether that is a skip)
        annotation_stride(frames, n, fps, file=name)
    counts = d.get("masklet_frame_count")
    if counts is not None:
        for m, c in enumerate(counts):
            if int(c) != n:
                raise SkipVideo("masklet_length", name, f"masklet {ids[m]} has {int(c)} frames "
                                f"(masklet_frame_count), the others have {n}")
    size_abs = np.asarray([float(x) for x in d["masklet_size_abs"]] if "masklet_size_abs" in d
                          else [np.nan] * len(ids), dtype=np.float64)
    return frames, h, w, fps, ids, masklet, size_abs


def _mean_iou(a: list[dict], b: list[dict]) -> float:
    """Mean IoU over frames where either is visible, between two per-frame RLE lists."""
    ious = []
    for ra, rb in zip(a, b, strict=True):
        if mask_utils.area(ra) == 0 and mask_utils.area(rb) == 0:
            continue
        ious.append(float(mask_utils.iou([ra], [rb], [0])[0, 0]))
    return float(np.mean(ious)) if ious else 0.0


def _read_frames_annotation(ref: VideoRef) -> Annotation:
    """Val/test layout: PNG masks per object folder -> RLE annotation."""
    jpegs = sorted(p.name for p in epath.Path(ref.video.path).iterdir() if p.name.endswith(".jpg"))
    ann_root = epath.Path(ref.annotations[0][1].path)
    objs = sorted((p for p in ann_root.iterdir() if p.is_dir()),
                  key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))
    per_obj = {o.name: {int(q.stem): q for q in o.iterdir() if q.name.endswith(".png")} for o in objs}
    frame_ids = sorted(set().union(*[set(v) for v in per_obj.values()])) if per_obj else []
    if not jpegs or not frame_ids:
        raise SkipVideo("missing_file", ann_root.as_posix(), "no JPEG frames or no PNG masks")
    first = Image.open(io.BytesIO((epath.Path(ref.video.path) / jpegs[0]).read_bytes()))
    w, h = first.size
    stride = annotation_stride(len(jpegs), len(frame_ids), SAV_FPS, file=os.fspath(ann_root))
    rles = []
    for j, f in enumerate(frame_ids):
        if f != j * stride:
            raise SkipVideo("frame_count", os.fspath(ann_root), f"mask frame {f} is not annotated frame {j} x stride "
                            f"{stride}")
        row = []
        for o in objs:
            q = per_obj[o.name].get(f)
            if q is None:
                m = np.zeros((h, w), np.uint8)
            else:
                m = (np.asarray(Image.open(io.BytesIO(q.read_bytes())).convert("L")) > 0).astype(np.uint8)
                if m.shape != (h, w):
                    raise SkipVideo("rle_size", os.fspath(q), f"mask is {m.shape} but frames are ({h}, {w})")
            row.append(mask_utils.encode(np.asfortranarray(m)))
        rles.append(row)
    return Annotation(ref.video_id, os.fspath(ann_root), h, w, len(jpegs), SAV_FPS, stride, [o.name for o in objs],
                      rles, np.full(len(objs), np.nan))


def read_annotation(ref: VideoRef) -> Annotation:
    """Read and check a video's annotation json(s) -> `Annotation`; raises `SkipVideo` naming the json.

    Skips (reasons) beside the malformed-json ones of `_parse`: `frame_count` (len(masklet) does not fit
    video_frame_count at SA-V's annotation rate, `annotation_stride`), `no_masklets` (no json has a masklet).
    """
    if ref.layout == "frames":
        return _read_frames_annotation(ref)
    parsed = []
    for kind, src in ref.annotations:
        d = _load_json(src)
        if str(d.get("video_id", ref.video_id)) != ref.video_id:
            raise SkipVideo("mismatch", src.name, f"json video_id {d['video_id']!r} but the file is video "
                            f"{ref.video_id!r}; the json belongs to another video")
        parsed.append((kind, src.name, _parse(d, src.name)))
    file = " + ".join(name for _, name, _ in parsed)
    _, name0, (frames, h, w, fps, ids0, _, _) = parsed[0]
    keys: list[str] = []
    sizes: list[float] = []
    rles: list[list[dict]] | None = None  # [annotated frame][masklet], from the first json that has masklets
    rows_from = name0
    for i, (kind, name, (f2, h2, w2, _, ids, masklet, size_abs)) in enumerate(parsed):
        if (f2, h2, w2) != (frames, h, w):
            raise SkipVideo("mismatch", name, f"a {f2}-frame {h2}x{w2} video, but {name0} has a {frames}-frame "
                            f"{h}x{w} video")
        if not ids:  # a json without masklets adds nothing (its masklet rows may be absent)
            continue
        if rles is None:
            rles, rows_from = [[] for _ in masklet], name
        elif len(masklet) != len(rles):
            raise SkipVideo("mismatch", name, f"{len(masklet)} annotated frames of a {f2}-frame {h2}x{w2} video, but "
                            f"{rows_from} has {len(rles)} of a {frames}-frame {h}x{w} video")
        for m, mid in enumerate(ids):
            col = [row[m] for row in masklet]
            # later jsons (auto): a masklet that repeats one of the first json's (manual) is the same object
            if i and any(_mean_iou(col, [row[k] for row in rles]) >= _DUPLICATE_IOU for k in range(len(ids0))):
                continue
            keys.append(str(mid) if i == 0 else f"{kind}:{mid}")
            sizes.append(size_abs[m])
            for j, row in enumerate(rles):
                row.append(col[j])
    if rles is None:
        raise SkipVideo("no_masklets", file, f"video {ref.video_id} has no masklets (masklet_id is empty): its clips "
                        "would have no objects, no trajectory and no masks, while its caption describes objects; drop "
                        "the video, or annotate its objects")
    stride = annotation_stride(frames, len(rles), fps, file=rows_from)
    return Annotation(ref.video_id, file, h, w, frames, fps, stride, keys, rles, np.asarray(sizes, np.float64))


def read_frames(ref: VideoRef, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """Decode video frames `indices` (24 fps frame numbers) -> uint8 `[len(indices), H, W, 3]`; raises `SkipVideo`."""
    if ref.layout == "frames":
        d = epath.Path(ref.video.path)
        jpegs = sorted(p.name for p in d.iterdir() if p.name.endswith(".jpg"))
        idx = np.asarray(indices, np.int64).reshape(-1)
        if idx.size and idx.max() >= len(jpegs):
            raise SkipVideo("truncated_video", ref.video.name, f"has {len(jpegs)} frames, frame {int(idx.max())} "
                            "was asked for")
        return np.stack([np.asarray(Image.open(io.BytesIO((d / jpegs[i]).read_bytes())).convert("RGB"))
                         for i in idx.tolist()])
    src = ref.video
    data = src.path if not src.member and os.path.exists(src.path) else src.read_bytes()
    return video_io.read_frames(data, indices, name=src.name)

