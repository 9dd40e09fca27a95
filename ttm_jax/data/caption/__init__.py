"""Captioning SA-V: the captions sidecar `prepare` reads, written by a vision-language model and the prompt planner
(the library; the command line is `ttm_jax/data/caption/__main__.py`).

    python -m ttm_jax.data.caption --sav=DIR --out=captions.jsonl --vlm_url=URL --vlm_model=NAME
        [--llm_url=URL --llm_model=NAME] [--concurrency=8] [--frames=4] [--image_size=512]

For each video (`sav.find_videos`, sorted by id):
1. `vlm_images`: `num_frames` annotated frames, evenly spaced over the video, scaled so that the longer side is at most
   `image_size`; every masklet is outlined in its colour and numbered 1..K (masklet order of the annotation) on the
   first sent frame where it is visible, the first frame for most;
2. `describe_messages` -> the VLM (any OpenAI-compatible chat endpoint that takes images as `image_url` data URLs:
   vLLM, llama.cpp's `llama-server`, Ollama) answers `Objects: [Object 1: <name>] ... Caption: <caption>`
   (`parse_describe_answer`, tolerant; a malformed answer is re-asked `reasks` times with the error);
3. the caption is split by the project's planning templates (`prompt_plan.plan_with_llm`, on the LLM endpoint, or the
   VLM's when no LLM is given) into the motion prompt and one local prompt per numbered object, the objects' names
   stated in order, so local prompt i belongs to masklet i: `local_prompts = {masklet key: prompt}`.

The chat endpoints are callables `complete(messages) -> text` (a data-layer library does not reach up to the
client; the command line passes `clients.llm.ChatClient.complete`, which times out, retries with
backoff, and whose failures it raises as `RequestFailed`).

Concurrency: `concurrency` worker threads, each captioning one video at a time, so at most `concurrency` requests are
in flight. Lines are written in video order (a window of `4 * concurrency` videos runs ahead of the oldest unwritten
one), so an interrupted run, re-run, writes the same file as an uninterrupted one.

Resumable: `SidecarWriter` opens `out` for appending, reads the video ids already there (they are skipped), and first
cuts off a partial last line (a run killed in the middle of a write); each line is written by one `os.write` of the
whole line and fsynced. Failed videos write no line, so a re-run retries them. A video that cannot be read counts as a
failure with its `SkipVideo` reason; requests that fail after their retries count as `request_failed`, answers that
stay malformed as `malformed_vlm_answer` / `malformed_llm_answer`. The run ends with
`videos: N captioned, M failed (reason=count, ...)` (`Summary.line`).
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import dataclasses
import fcntl
import io
import json
import logging
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

import numpy as np
from PIL import Image

from ttm_jax.clients import draw
from ttm_jax.data import captions as captions_lib
from ttm_jax.data import prompt_plan, sav
from ttm_jax.data.video_io import SkipVideo

# `complete(messages) -> the assistant's text`; messages in the OpenAI chat format (content a str, or a list of
# `{"type": "text", ...}` / `{"type": "image_url", ...}` parts)
Complete = Callable[[list[dict]], str]

# Test hook: on the N-th line this run writes (1-based), write half of it and SIGKILL the process, as a kill in the
# middle of a write would leave it, to prove that a re-run cuts the partial line and resumes to the same file.
KILL_ENV = "TTM_CAPTION_KILL_AT_LINE"

DESCRIBE_SYSTEM = (
    "You write captions for short videos, for training a video generator. You see frames of one video in time order. "
    "The objects to describe are outlined in colour and numbered 1 to {k}, each in the first frame where it is "
    "visible. Answer in exactly this format, two parts:\n"
    "Objects: [Object 1: <a short name that tells object 1 apart from the others>] [Object 2: ...] ...\n"
    "Caption: <one to three sentences: what each numbered object looks like and how it moves over the video "
    "(direction, speed, what it does), naming every numbered object once, in the order of their numbers, then the "
    "scene; never mention the numbers, the outlines or the frames>"
)

DESCRIBE_EXAMPLE = (
    "Objects: [Object 1: the dog on the left] [Object 2: the red ball]\n"
    "Caption: A brown dog on the left runs to the right and jumps, while a red ball rolls to the left across a "
    "grassy backyard."
)


class RequestFailed(RuntimeError):
    """A chat request that failed after its retries (timeouts, refused connections, HTTP errors, non-JSON answers);
    the message names the server and the cause."""


# --------------------------------------------------------------------------------------------------- the images


def sample_positions(num_annotated: int, num_frames: int) -> list[int]:
    """`num_frames` annotated-frame positions evenly spaced from the first to the last (fewer if the video has fewer
    annotated frames), sorted and distinct."""
    if num_annotated <= 0:
        return []
    n = max(1, min(int(num_frames), num_annotated))
    return sorted({int(round(x)) for x in np.linspace(0, num_annotated - 1, n)})


def _scale(height: int, width: int, image_size: int) -> tuple[int, int]:
    """(h, w) with the longer side at most `image_size` (never enlarged), aspect kept."""
    s = min(1.0, image_size / max(height, width))
    return max(1, round(height * s)), max(1, round(width * s))


def _resize_masks(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """bool `[H, W, K]` -> bool `[h, w, K]` (nearest)."""
    h, w = size
    if masks.shape[:2] == (h, w):
        return masks
    ys = np.minimum((np.arange(h) + 0.5) * masks.shape[0] / h, masks.shape[0] - 1).astype(np.int64)
    xs = np.minimum((np.arange(w) + 0.5) * masks.shape[1] / w, masks.shape[1] - 1).astype(np.int64)
    return masks[ys][:, xs]


@dataclasses.dataclass
class VlmImages:
    """What the VLM sees of one video: `images uint8 [N, h, w, 3]` (video frames `frames`, the masklets outlined and
    numbered), `keys[i]` the masklet key numbered i+1 (masklets never visible on an annotated frame are left out),
    `shown_on[i]` the image where number i+1 is drawn, and the video's `fps`."""

    images: np.ndarray
    frames: list[int]
    keys: list[str]
    shown_on: list[int]
    fps: float


def vlm_images(ref: sav.VideoRef, *, num_frames: int = 4, image_size: int = 512) -> VlmImages:
    """The frames sent for `ref`; raises `SkipVideo` (unreadable json or video, no masklets)."""
    ann = sav.read_annotation(ref)
    positions = sample_positions(ann.num_annotated, num_frames)
    areas = ann.areas()  # [A, M]
    seen = areas.sum(0) > 0
    keep = [m for m in range(ann.num_masklets) if seen[m]]
    if not keep:
        raise SkipVideo("no_masklets", ann.file, "every masklet is empty on every annotated frame: there is no object "
                        "to caption; drop the video")
    # a masklet not visible on any sampled frame brings its first visible annotated frame along
    for m in keep:
        if not any(areas[p, m] > 0 for p in positions):
            positions.append(int(np.argmax(areas[:, m] > 0)))
    positions = sorted(set(positions))
    frames = [p * ann.stride for p in positions]
    pixels = sav.read_frames(ref, frames)
    size = _scale(ann.height, ann.width, image_size)
    masks = ann.masks(positions, keep)  # [N, H, W, K]
    shown_on = [next(i for i, p in enumerate(positions) if areas[p, m] > 0) for m in keep]
    images = []
    for i in range(len(positions)):
        img = pixels[i]
        if img.shape[:2] != size:
            img = np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.BICUBIC))
        here = [j for j in range(len(keep)) if shown_on[j] == i]
        if here:
            img = draw.draw_numbered(img, _resize_masks(masks[i][..., here], size), [j + 1 for j in here])
        images.append(img)
    return VlmImages(np.stack(images), frames, [ann.masklet_keys[m] for m in keep], shown_on, ann.fps)


def data_url(image: np.ndarray, quality: int = 90) -> str:
    """`image uint8 [H, W, 3]` -> `data:image/jpeg;base64,...` (the form every OpenAI-compatible server takes)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------------------------- the VLM request


def describe_messages(seen: VlmImages, *, quality: int = 90) -> list[dict]:
    """The VLM request: the system prompt (format and an example) and one user turn with the images in time order."""
    k = len(seen.keys)
    times = ", ".join(f"{f / seen.fps:.1f} s" for f in seen.frames)
    where = ", ".join(f"{j + 1} on frame {seen.shown_on[j] + 1}" for j in range(k))
    text = (f"{len(seen.frames)} frames of the video, at {times}. Numbered objects: {k} ({where}). Describe them in "
            f"the format of the example:\n{DESCRIBE_EXAMPLE}")
    content: list[dict] = [{"type": "text", "text": text}]
    content += [{"type": "image_url", "image_url": {"url": data_url(img, quality)}} for img in seen.images]
    return [{"role": "system", "content": DESCRIBE_SYSTEM.format(k=k)}, {"role": "user", "content": content}]


_CAPTION_MARK = re.compile(r"\bcaption\s*:", re.IGNORECASE)
_FENCE = re.compile(r"```[a-zA-Z]*")


def parse_describe_answer(text: str, num_objects: int) -> tuple[list[str], str]:
    """`Objects: [Object 1: ...] ... Caption: ...` -> (object names in number order, caption); tolerant of markdown,
    quotes, numbered lists and line breaks; raises `prompt_plan.PromptParseError` quoting the answer otherwise."""
    cleaned = _FENCE.sub("\n", text).replace("**", "").replace("__", "").replace("`", "")
    marks = list(_CAPTION_MARK.finditer(cleaned))
    quoted = repr(text.strip()[:300])
    if not marks:
        raise prompt_plan.PromptParseError(f"caption.parse_describe_answer: no `Caption:` in the VLM answer {quoted}; "
                                           f"expected `Objects: [Object 1: ...] ...` then `Caption: ...`")
    head, caption = cleaned[:marks[-1].start()], cleaned[marks[-1].end():]
    caption = " ".join(caption.split()).strip().strip("\"'\u201c\u201d").strip()
    if not caption:
        raise prompt_plan.PromptParseError(f"caption.parse_describe_answer: an empty caption in the VLM answer "
                                           f"{quoted}")
    try:
        names = prompt_plan.parse_local_answer(re.sub(r"\bobjects\s*:", " ", head, flags=re.IGNORECASE),
                                               num_objects)
    except prompt_plan.PromptParseError as e:
        raise prompt_plan.PromptParseError(f"caption.parse_describe_answer: the object list of the VLM answer: "
                                           f"{e}") from None
    return [n.rstrip(".") for n in names], caption


def ask(complete: Complete, messages: list[dict], parse: Callable[[str], object], reasks: int) -> object:
    """`parse(complete(messages))`, re-asking `reasks` times with the parse error appended; raises the last
    `PromptParseError`."""
    for attempt in range(reasks + 1):
        answer = complete(messages)
        try:
            return parse(answer)
        except prompt_plan.PromptParseError as e:
            if attempt == reasks:
                raise
            messages = [*messages, {"role": "assistant", "content": answer},
                        {"role": "user", "content": f"That answer could not be read ({e}). Answer again in exactly "
                                                    f"the format asked for."}]
    raise AssertionError("unreachable")


@dataclasses.dataclass(frozen=True)
class Settings:
    """How videos are captioned.

    num_frames: frames shown to the VLM (more when a masklet is visible on none of them).
    image_size: longer side of each image, pixels (never enlarged).
    jpeg_quality: of the images sent.
    reasks: re-asks of a malformed answer (each of the VLM and the two planning requests).
    concurrency: worker threads, each captioning one video at a time: the bound on requests in flight.
    annotation: which SA-V jsons a video needs (`sav.find_videos`): manual | auto | both.
    max_request_failures: stop the run after this many videos in a row failed with `request_failed` (a server that
      is down); 0: never stop.
    """

    num_frames: int = 4
    image_size: int = 512
    jpeg_quality: int = 90
    reasks: int = 1
    concurrency: int = 8
    annotation: str = "manual"
    max_request_failures: int = 20


def caption_video(ref: sav.VideoRef, describe: Complete, plan: Complete | None = None,
                  settings: Settings = Settings()) -> captions_lib.CaptionEntry:
    """The sidecar entry of one video (see the module docstring); `plan` defaults to `describe`. Raises `SkipVideo`
    with reason `request_failed`, `malformed_vlm_answer`, `malformed_llm_answer`, or the reading's reason."""
    seen = vlm_images(ref, num_frames=settings.num_frames, image_size=settings.image_size)
    k = len(seen.keys)
    try:
        names, caption = ask(describe, describe_messages(seen, quality=settings.jpeg_quality),
                             lambda a: parse_describe_answer(a, k), settings.reasks)
    except RequestFailed as e:
        raise SkipVideo("request_failed", ref.video.name, f"VLM: {e}") from None
    except prompt_plan.PromptParseError as e:
        raise SkipVideo("malformed_vlm_answer", ref.video.name, f"{e} (after {settings.reasks} re-ask(s))") from None
    try:
        p = prompt_plan.plan_with_llm(caption, plan or describe, num_objects=k, object_names=names,
                                      reasks=settings.reasks)
    except RequestFailed as e:
        raise SkipVideo("request_failed", ref.video.name, f"LLM: {e}") from None
    except prompt_plan.PromptParseError as e:
        raise SkipVideo("malformed_llm_answer", ref.video.name, f"{e} (after {settings.reasks} re-ask(s))") from None
    return captions_lib.CaptionEntry(ref.video_id, caption, p.motion_prompt,
                                     dict(zip(seen.keys, p.local_prompts, strict=True)))


# ------------------------------------------------------------------------------------------------- the sidecar


def entry_line(entry: captions_lib.CaptionEntry) -> bytes:
    """One sidecar line, as `captions.write_captions` writes it (sorted keys, UTF-8, newline-terminated)."""
    return (json.dumps(entry.to_json(), ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")


class SidecarWriter:
    """Appends lines to the captions sidecar `path`, safely across kills and re-runs.

    On open: takes an exclusive lock (a second run on the same file is an error), cuts a partial last line (a kill
    in the middle of a write), and reads the video ids already captioned (`done`); a malformed complete line is an
    error naming the line. `write` puts each line down with one `os.write` and fsyncs it.
    """

    def __init__(self, path: str, *, kill_at_line: int = 0):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise RuntimeError(f"{path}: another captioning run is writing this file; wait for it, or give --out "
                               f"another file") from None
        self.done: set[str] = set()
        self.dropped_partial = 0  # bytes of a partial last line cut on open
        self._read_existing()
        self._written = 0
        self._kill_at = kill_at_line

    def _read_existing(self) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            self.dropped_partial = len(data) - end
            os.ftruncate(self._fd, end)
            os.fsync(self._fd)
            logging.warning("%s: cut a partial last line of %d bytes (a run killed mid-write); its video is "
                            "captioned again", self.path, self.dropped_partial)
        for lineno, line in enumerate(data[:end].decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                e = captions_lib.parse_line(line, file=self.path, lineno=lineno)
            except captions_lib.CaptionsError as err:
                raise captions_lib.CaptionsError(f"{err}; fix or delete that line, then re-run") from None
            self.done.add(e.video_id)

    def write(self, entry: captions_lib.CaptionEntry) -> None:
        data = entry_line(entry)
        self._written += 1
        if self._kill_at and self._written == self._kill_at:  # the test hook: die mid-write
            os.write(self._fd, data[:len(data) // 2])
            os.fsync(self._fd)
            os.kill(os.getpid(), signal.SIGKILL)
        n = os.write(self._fd, data)
        if n != len(data):  # a short write (disk full): leave no broken line behind
            os.ftruncate(self._fd, os.lseek(self._fd, 0, os.SEEK_END) - n)
            raise OSError(f"{self.path}: wrote {n} of {len(data)} bytes of a line (disk full?); the partial line was "
                          f"removed, free space and re-run")
        os.fsync(self._fd)
        self.done.add(entry.video_id)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # releases the lock
            self._fd = -1

    def __enter__(self) -> SidecarWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------- the run


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """`caption: 12/100 videos (1 failed), 0.80 videos/s, ETA 1m50s` on `stream`: redrawn in place on a terminal,
    else a line at most every `interval` seconds; `close` prints the final state."""

    def __init__(self, total: int, *, stream: TextIO | None = None, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.done, self.failed = total, 0, 0
        self.stream = stream if stream is not None else sys.stderr
        self.interval, self.clock = interval, clock
        self.start = self._last = clock()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def text(self) -> str:
        elapsed = self.clock() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else math.inf
        failed = f" ({self.failed} failed)" if self.failed else ""
        return f"caption: {self.done}/{self.total} videos{failed}, {rate:.2f} videos/s, ETA {_duration(eta)}"

    def update(self, *, failed: bool = False) -> None:
        self.done += 1
        self.failed += int(failed)
        now = self.clock()
        if self.tty:
            self.stream.write("\r" + self.text() + "\033[K")
            self.stream.flush()
        elif now - self._last >= self.interval:
            self._last = now
            self.stream.write(self.text() + "\n")
            self.stream.flush()

    def close(self) -> None:
        self.stream.write(("\r" if self.tty else "") + self.text() + ("\033[K\n" if self.tty else "\n"))
        self.stream.flush()


@dataclasses.dataclass
class Summary:
    """What a captioning run did: videos captioned now, already in the file, failed by reason (and each failure's
    message `"<file>: <detail> [<reason>]"`), and whether it stopped early (`stopped`: why)."""

    captioned: int
    already: int
    failed: dict[str, int]
    failures: list[str]
    out: str
    stopped: str = ""

    @property
    def num_failed(self) -> int:
        return sum(self.failed.values())

    def line(self) -> str:
        """`videos: N captioned, M failed (reason=count, ...)`, the line a run ends with."""
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(self.failed.items()))
        return f"videos: {self.captioned} captioned, {self.num_failed} failed" + (f" ({reasons})" if reasons else "")


def caption_all(sav_path: str | Sequence[str], out: str, describe: Complete, plan: Complete | None = None,
                settings: Settings = Settings(), *, progress: TextIO | None = None) -> Summary:
    """Captions every video under `sav_path` not yet in the sidecar `out` (see the module docstring) -> `Summary`.

    `describe`: the VLM's `complete`; `plan`: the LLM's (None: the VLM's). `progress`: the progress stream (stderr).
    """
    if settings.concurrency < 1 or settings.num_frames < 1 or settings.reasks < 0:
        raise ValueError(f"caption: concurrency={settings.concurrency} and frames={settings.num_frames} must be >= 1, "
                         f"reasks={settings.reasks} >= 0 (--concurrency, --frames, --reasks)")
    if isinstance(sav_path, str) and "," in sav_path:
        sav_path = sav_path.split(",")
    counter = sav.SkipCounter("caption")
    refs = sav.find_videos(sav_path, settings.annotation, counter=counter)
    if not refs and not counter.total:
        raise FileNotFoundError(f"caption: no SA-V videos under {sav_path!r}; check --sav")
    kill_at = int(os.environ.get(KILL_ENV, "0") or 0)
    captioned, stopped, in_a_row = 0, "", 0
    with SidecarWriter(out, kill_at_line=kill_at) as writer:
        todo = [r for r in refs if r.video_id not in writer.done]
        already = len(refs) - len(todo)
        bar = Progress(len(todo), stream=progress)
        window: collections.deque[tuple[sav.VideoRef, concurrent.futures.Future]] = collections.deque()
        pending = iter(todo)
        pool = concurrent.futures.ThreadPoolExecutor(settings.concurrency, thread_name_prefix="caption")
        try:
            while True:
                while len(window) < 4 * settings.concurrency:
                    ref = next(pending, None)
                    if ref is None:
                        break
                    window.append((ref, pool.submit(caption_video, ref, describe, plan, settings)))
                if not window:
                    break
                ref, future = window.popleft()
                try:
                    entry = future.result()
                except SkipVideo as e:
                    counter.add(e)
                    bar.update(failed=True)
                    in_a_row = in_a_row + 1 if e.reason == "request_failed" else 0
                    if settings.max_request_failures and in_a_row >= settings.max_request_failures:
                        stopped = (f"stopped after {in_a_row} videos in a row failed with request_failed (last: {e}); "
                                   f"is the server up? Re-run the same command to continue")
                        break
                    continue
                in_a_row = 0
                writer.write(entry)
                captioned += 1
                bar.update()
        finally:
            for _, f in window:
                f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
    return Summary(captioned, already, dict(counter.counts), list(counter.messages), out, stopped)
