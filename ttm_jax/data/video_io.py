"""Video files in and out: PyAV decode of selected frames and mp4 encode (`encode_video`, the one mp4 writer).

Everything here works on uint8 RGB arrays `[T, H, W, 3]`. A video that cannot be decoded (truncated, unreadable,
no video stream, fewer frames than asked for) raises `SkipVideo` whose message names the file, so a data pipeline can
count it and move on instead of dying on one bad file out of 50k.

Frame index `i` is the i-th frame in presentation order as the decoder outputs it, which is how SA-V numbers its
frames (annotated frame `j` of a masklet is video frame `j * stride`).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import io
import logging
import os
import platform
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from fractions import Fraction
from typing import Any, BinaryIO

import av
import numpy as np
from etils import epath

VideoSource = str | os.PathLike | bytes | BinaryIO


class SkipVideo(Exception):
    """A video that cannot be used; `reason` is a short key for counting, the message names the file.

    Defined here, the lowest data layer, and re-exported as `ttm_jax.data.sav.SkipVideo`.
    """

    def __init__(self, reason: str, file: str, detail: str):
        self.reason = reason
        self.file = file
        self.detail = detail
        super().__init__(f"{file}: {detail} [{reason}]")

    def __reduce__(self):  # picklable across Grain worker processes
        return (SkipVideo, (self.reason, self.file, self.detail))


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """Container metadata: `num_frames` as the stream reports it (0 if unknown), `fps` average rate."""

    num_frames: int
    height: int
    width: int
    fps: float


def _name(source: VideoSource, name: str | None) -> str:
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return "<in-memory video>"


def _open(source: VideoSource, name: str):
    try:
        if isinstance(source, bytes):
            src = io.BytesIO(source)
        elif hasattr(source, "read"):
            src = source
        elif os.path.exists(os.fspath(source)):
            src = os.fspath(source)
        else:  # etils.epath paths (gs://...): read through epath
            src = io.BytesIO(epath.Path(source).read_bytes())
        return av.open(src, mode="r")
    except (av.FFmpegError, OSError, ValueError) as e:
        raise SkipVideo("unreadable_video", name, f"cannot open as a video ({type(e).__name__}: {e})") from e


def probe(source: VideoSource, *, name: str | None = None) -> VideoInfo:
    """Stream metadata without decoding; raises `SkipVideo` if the file is not a video."""
    name = _name(source, name)
    with _open(source, name) as container:
        s = _video_stream(container, name)
        fps = float(s.average_rate) if s.average_rate else 0.0
        return VideoInfo(int(s.frames or 0), int(s.codec_context.height), int(s.codec_context.width), fps)


def read_frames(source: VideoSource, indices: Sequence[int] | np.ndarray | None = None, *,
                name: str | None = None, seek: bool = True) -> np.ndarray:
    """Decode the frames at `indices` (any order, repeats allowed; None: all) -> uint8 `[len(indices), H, W, 3]`.

    With `seek` (default), jumps to the keyframe before the first index and numbers frames by their timestamps
    (`(pts - start_time) * time_base * fps`, exact for constant frame rate video such as SA-V); if the timestamps do
    not give every requested index (variable frame rate, missing pts, a seek that overshoots), it decodes
    sequentially from frame 0 instead, which counts frames as the decoder outputs them. Raises `SkipVideo` naming the
    file if it cannot be decoded or has fewer frames than `max(indices) + 1`.
    """
    name = _name(source, name)
    want = None if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    if want is not None and want.size and want.min() < 0:
        raise ValueError(f"{name}: negative frame index {int(want.min())}")
    if want is not None and want.size and seek and want.min() > 0:
        out = _read_seeking(source, want, name)
        if out is not None:
            return out
        logging.debug("%s: timestamps do not number the frames; decoding from the start", name)
        if hasattr(source, "seek"):
            source.seek(0)
    return _read_sequential(source, want, name)


def _read_seeking(source: VideoSource, want: np.ndarray, name: str) -> np.ndarray | None:
    needed = set(want.tolist())
    first, last = int(want.min()), int(want.max())
    got: dict[int, np.ndarray] = {}
    prev = None
    with _open(source, name) as container:
        stream = _video_stream(container, name)
        rate, tb = stream.average_rate, stream.time_base
        if not rate or not tb:
            return None
        start = stream.start_time or 0
        # constant frame rate, by the header: the average rate (frames / duration) equals the base rate (from the
        # smallest timestamp step) and the duration holds the frame count. Otherwise timestamps cannot number the
        # frames before the seek point (a gap there would shift every index), so decode from the start.
        base = stream.base_rate
        if (not base or abs(float(base) / float(rate) - 1) > 1e-3 or not stream.frames or not stream.duration
                or round(stream.duration * tb * rate) != stream.frames):
            return None
        stream.thread_type = "AUTO"
        try:
            container.seek(start + int(first / rate / tb), stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                if frame.pts is None:
                    return None
                idx = round((frame.pts - start) * tb * rate)
                if prev is None and idx > first:
                    return None  # overshot: the seek landed after the first wanted frame
                if prev is not None and idx != prev + 1:
                    return None  # a timestamp gap or repeat: not constant frame rate after all
                prev = idx
                if idx in needed:
                    got[idx] = frame.to_ndarray(format="rgb24")
                if idx >= last:
                    break
        except (av.FFmpegError, OSError, ValueError):
            return None  # the sequential path will say what is wrong with the file
    if len(got) != len(needed):
        return None
    return np.stack([got[i] for i in want.tolist()])


def _video_stream(container: Any, name: str) -> Any:
    """The first video stream of an open container; `SkipVideo` naming the file if it has none."""
    if not container.streams.video:
        raise SkipVideo("unreadable_video", name, "has no video stream")
    return container.streams.video[0]


def _read_sequential(source: VideoSource, want: np.ndarray | None, name: str) -> np.ndarray:
    last = None if want is None else (int(want.max()) if want.size else -1)
    needed = None if want is None else set(want.tolist())
    got: dict[int, np.ndarray] = {}
    frames: list[np.ndarray] = []
    count = 0
    with _open(source, name) as container:
        stream = _video_stream(container, name)
        stream.thread_type = "AUTO"
        try:
            if last is None or last >= 0:
                for frame in container.decode(stream):
                    if needed is None:
                        frames.append(frame.to_ndarray(format="rgb24"))
                    elif count in needed:
                        got[count] = frame.to_ndarray(format="rgb24")
                    count += 1
                    if last is not None and count > last:
                        break
        except (av.FFmpegError, OSError, ValueError) as e:
            raise SkipVideo("unreadable_video", name,
                            f"decode failed after {count} frames ({type(e).__name__}: {e}); the file is damaged, "
                            f"re-download it or drop it") from e
    if want is None:
        if not frames:
            raise SkipVideo("unreadable_video", name, "decoded no frames")
        return np.stack(frames)
    if last is not None and count <= last:
        raise SkipVideo("truncated_video", name,
                        f"has {count} decodable frames, frame {last} was asked for (truncated file or wrong "
                        f"video_frame_count)")
    if not want.size:
        return np.zeros((0, 0, 0, 3), np.uint8)
    return np.stack([got[i] for i in want.tolist()])


def encode_video(frames: np.ndarray | Iterable[np.ndarray], fps: float, *, codec: str = "libx264", crf: int = 18,
                 preset: str = "ultrafast", pix_fmt: str = "yuv420p", gop: int | None = None,
                 reproducible: bool = False) -> bytes:
    """uint8 RGB frames -> mp4 bytes. `frames` is `[T, H, W, 3]` or an iterable of `[H, W, 3]` (streamed: a long
    video need not be held in memory). H and W must be even for 4:2:0 chroma (`pix_fmt="yuv420p"`).

    `crf` (0 = lossless for libx264) and `preset` go to x264; `pix_fmt="yuv444p"` keeps full-resolution colour, which
    palette-coloured trajectories benefit from. `gop`: frames between keyframes (None: the encoder's default, 250
    for x264); shorter makes seeking cheaper. `reproducible`: the same frames give the same bytes on this machine,
    whatever the process did before (single-threaded x264, encoding under `_zero_filled_allocations`); synthetic
    SA-V is written so.
    """
    options = {"crf": str(crf), "preset": preset, **({"threads": "1"} if reproducible else {})}
    with _zero_filled_allocations() if reproducible else contextlib.nullcontext():
        return _encode(frames, fps, codec, options if codec == "libx264" else None, pix_fmt, gop)


def _encode(frames: np.ndarray | Iterable[np.ndarray], fps: float, codec: str, options: dict[str, str] | None,
            pix_fmt: str, gop: int | None) -> bytes:
    buf = io.BytesIO()
    stream = None
    with av.open(buf, mode="w", format="mp4") as container:
        for frame in frames:
            frame = np.asarray(frame)
            if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
                raise ValueError(f"encode_video: frames must be uint8 [H, W, 3], got {frame.dtype} {frame.shape}")
            if stream is None:
                h, w = frame.shape[:2]
                if pix_fmt == "yuv420p" and (h % 2 or w % 2):
                    raise ValueError(f"encode_video: {h}x{w} (HxW) has an odd side; yuv420p needs even sides: crop "
                                     f"or pad by a pixel, or pass pix_fmt='yuv444p'")
                stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
                stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
                if options is not None:
                    stream.options = options
                if gop:
                    stream.codec_context.gop_size = int(gop)
            elif frame.shape[:2] != (stream.height, stream.width):
                raise ValueError(f"encode_video: frame of {frame.shape[:2]} in a {stream.height}x{stream.width} video")
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        if stream is None:
            raise ValueError("encode_video: no frames")
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


# glibc's mallopt parameter M_PERTURB: new blocks are filled with the complement of the byte, freed ones with the byte
_M_PERTURB = -6
_ZERO_FILL_LOCK = threading.Lock()


@functools.cache
def _glibc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's `mallopt`, or None under another C library."""
    if platform.libc_ver()[0] != "glibc":
        return None
    return getattr(ctypes.CDLL(None), "mallopt", None)


@contextlib.contextmanager
def _zero_filled_allocations() -> Iterator[None]:
    """While active, glibc's malloc hands out zero-filled blocks (`mallopt(M_PERTURB, 0xff)`), as a fresh process does.

    x264's AVX-512 routines read memory they allocated but never wrote (seen on 64x64 and 32x48 frames): the bytes of
    an encode then depend on whatever the process freed before. With zero-filled blocks they are the bytes of a fresh
    process, always (one such encode at a time). Other C libraries: nothing changes.
    """
    mallopt = _glibc_mallopt()
    if mallopt is None:
        yield
        return
    with _ZERO_FILL_LOCK:
        mallopt(_M_PERTURB, 0xFF)
        try:
            yield
        finally:  # back to the process' setting (glibc reads MALLOC_PERTURB_ at start)
            mallopt(_M_PERTURB, int(os.environ.get("MALLOC_PERTURB_", "0") or 0) & 0xFF)


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float, **kwargs) -> None:
    """Write uint8 `[T, H, W, 3]` to an mp4 at `path` (local or any etils.epath path); kwargs as `encode_video`."""
    data = encode_video(frames, fps, **kwargs)
    n = len(frames) if hasattr(frames, "__len__") else -1
    p = epath.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    logging.debug("wrote %s (%d frames, %d bytes)", p, n, len(data))


# ----------------------------------------------------------------------------------------------- frame stamps
# A frame index written into the pixels as a row of black/white blocks survives lossy codecs, so tests and data
# checks can see which source frame a decoded frame really is (alignment of masks to frames, seeking, fps changes).

def stamp_frame_index(frame: np.ndarray, index: int, *, bits: int = 10, block: int = 16) -> np.ndarray:
    """Write `index` (< 2**bits) into the top-left `block x (bits*block)` pixels of uint8 `[H, W, 3]` (a copy)."""
    h, w = frame.shape[:2]
    if bits * block > w or block > h or not 0 <= index < 2**bits:
        raise ValueError(f"stamp_frame_index: {bits} blocks of {block} px in a {h}x{w} frame, index {index}")
    out = np.array(frame, copy=True)
    for b in range(bits):
        out[:block, b * block:(b + 1) * block] = 255 if (index >> b) & 1 else 0
    return out


def read_frame_index(frames: np.ndarray, *, bits: int = 10, block: int = 16) -> np.ndarray:
    """The stamped indices of uint8 `[..., H, W, 3]` frames -> int64 `[...]` (block centres, threshold 128)."""
    frames = np.asarray(frames)
    m = block // 4  # read the block centre, away from codec ringing at the edges
    out = np.zeros(frames.shape[:-3], np.int64)
    for b in range(bits):
        v = frames[..., m:block - m, b * block + m:(b + 1) * block - m, :].astype(np.float32).mean((-3, -2, -1))
        out |= (v > 128).astype(np.int64) << b
    return out
