"""CLIP metrics of generated videos: CLIP-Frame (temporal consistency) and CLIP-Text (text alignment).

One interface, videos in, numbers out: `videos` are uint8 `[N, T, H, W, 3]` (any H, W; RGB).

    scorer = ClipScorer.from_folder("<CLIPModel folder>")   # e.g. openai/clip-vit-large-patch14, saved locally
    scorer.clip_frame(videos)          # Score: per video, the mean cosine similarity of consecutive frames
    scorer.clip_text(videos, texts)    # Score: per video, the mean cosine similarity of each frame with its text
    score.mean, score.mean_x100, score.per_video, score.as_dict()

- CLIP-Frame of a video = mean over t of cos(e_t, e_{t+1}) for its frames' image embeddings e (T >= 2).
- CLIP-Text of a video = mean over t of cos(e_t, text embedding of the video's text).
  Raw cosines, not clipped at 0 and not rescaled by 2.5 (Hessel et al.'s CLIPScore); papers on video generation
  usually report the mean x100, given as `mean_x100`.

Preprocessing (`preprocess`, done here, on the accelerator, in float32), as CLIP's own image processor does:
resize so the shorter side is the model's `image_size` S (the longer becomes `int(S * long / short)`), with JAX's
antialiased bicubic resize (Keys a = -0.5, as PIL's) clipped to [0, 1] (PIL resizes uint8 frames, so it rounds to
1/255 steps: expect differences of a few 1e-3 in the embeddings against `CLIPImageProcessor`); centre crop S x S
(offset `(size - S) // 2`); `(x / 255 - mean) / std` with OpenAI CLIP's mean and std per channel. A frame already
S x S is not resampled.

Frames are embedded in fixed-size batches (`batch_size` frames; the last one padded), one jitted function per frame
size; texts are tokenized by `tokenize(texts) -> (ids int32 [B, L], mask bool [B, L])`, by default the folder's
transformers tokenizer padded to `max_position_embeddings`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from ttm_jax.models import clip as clip_model
from ttm_jax.weights import clip as clip_weights

# OpenAI CLIP's pixel statistics (CLIPImageProcessor's image_mean / image_std)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Tokenize = Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]


def resized_size(height: int, width: int, image_size: int) -> tuple[int, int]:
    """`(h, w)` with the shorter side `image_size` and the longer `int(image_size * long / short)`."""
    if height <= width:
        return image_size, int(image_size * width / height)
    return int(image_size * height / width), image_size


def preprocess(frames: jax.Array, image_size: int, mean: Sequence[float] = CLIP_MEAN,
               std: Sequence[float] = CLIP_STD) -> jax.Array:
    """uint8 `[M, H, W, 3]` -> float32 `[M, S, S, 3]` (S = `image_size`): resize (shorter side S), centre crop,
    CLIP normalisation; see the module docstring."""
    m, h, w, c = frames.shape
    x = frames.astype(jnp.float32) / 255.0
    nh, nw = resized_size(h, w, image_size)
    if (nh, nw) != (h, w):
        x = jnp.clip(jax.image.resize(x, (m, nh, nw, c), "bicubic", antialias=True), 0.0, 1.0)
    top, left = (nh - image_size) // 2, (nw - image_size) // 2
    x = x[:, top:top + image_size, left:left + image_size]
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _unit(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class Score:
    """A metric over N videos: `per_video` float64 `[N]` mean cosine similarities."""

    name: str
    per_video: np.ndarray

    @property
    def mean(self) -> float:
        return float(np.mean(self.per_video))

    @property
    def mean_x100(self) -> float:
        return 100.0 * self.mean

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.name, "mean": self.mean, "mean_x100": self.mean_x100,
                "per_video": [float(v) for v in self.per_video]}


def _check_videos(videos: Any) -> np.ndarray:
    videos = np.asarray(videos)
    if videos.dtype != np.uint8 or videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"videos: expected uint8 [N, T, H, W, 3], got {videos.dtype} {videos.shape}; pass RGB "
                         f"frames as uint8 (e.g. (x + 1) * 127.5 rounded, for videos in [-1, 1])")
    return videos


def hf_tokenizer(path: str, max_length: int) -> Tokenize:
    """The transformers tokenizer saved in `path` (or its `tokenizer/` for a diffusers pipeline folder), padded and
    truncated to `max_length`."""
    import transformers  # optional dependency: only for tokenizing with a saved transformers tokenizer

    p = epath.Path(path)
    if not any((p / f).exists() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")) and (
            p / "tokenizer").exists():
        p = p / "tokenizer"
    tok = transformers.AutoTokenizer.from_pretrained(str(p))

    def tokenize(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        out = tok(list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
        return out["input_ids"].astype(np.int32), out["attention_mask"].astype(bool)

    return tokenize


class ClipScorer:
    """CLIP-Frame and CLIP-Text of uint8 videos with a converted CLIP model (both towers and projections)."""

    def __init__(self, spec: clip_model.CLIPSpec, params: dict, tokenize: Tokenize | None = None, *,
                 batch_size: int = 32):
        if spec.vision is None or spec.projection_dim is None:
            raise ValueError("ClipScorer: the CLIP metrics need a CLIPModel (vision tower and projections); this "
                             "checkpoint is text-only")
        self.spec, self.tokenize, self.batch_size = spec, tokenize, int(batch_size)
        self.params = jax.device_put(params)
        model = clip_model.CLIP(spec)
        size = spec.vision.image_size
        self._images = jax.jit(lambda p, frames: _unit(model.apply(
            {"params": p}, preprocess(frames, size), method="get_image_features")))
        self._texts = jax.jit(lambda p, ids, mask: _unit(model.apply(
            {"params": p}, ids, mask, method="get_text_features")))

    @classmethod
    def from_folder(cls, path: str, tokenize: Tokenize | None = None, *, batch_size: int = 32) -> ClipScorer:
        """From a transformers `CLIPModel` folder; `tokenize` defaults to the folder's tokenizer (`hf_tokenizer`)."""
        spec, params = clip_weights.load(path)
        if tokenize is None:
            tokenize = hf_tokenizer(path, spec.text.max_positions)
        return cls(spec, params, tokenize, batch_size=batch_size)

    def image_embeddings(self, frames: np.ndarray) -> np.ndarray:
        """uint8 `[M, H, W, 3]` -> unit-norm float32 `[M, projection_dim]`, in batches of `batch_size` frames."""
        frames = np.asarray(frames)
        out = []
        for start in range(0, len(frames), self.batch_size):
            chunk = frames[start:start + self.batch_size]
            n = len(chunk)
            if n < self.batch_size:  # one shape per frame size: one compilation
                chunk = np.concatenate([chunk, np.zeros((self.batch_size - n, *chunk.shape[1:]), chunk.dtype)])
            out.append(np.asarray(self._images(self.params, chunk))[:n])
        return np.concatenate(out)

    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """`texts` -> unit-norm float32 `[len(texts), projection_dim]`."""
        if self.tokenize is None:
            raise ValueError("ClipScorer: no tokenizer; pass tokenize= (texts -> (ids, mask)) or use from_folder")
        ids, mask = self.tokenize(list(texts))
        return np.asarray(self._texts(self.params, np.asarray(ids, np.int32), np.asarray(mask, bool)))

    def _video_embeddings(self, videos: np.ndarray) -> np.ndarray:
        n, t = videos.shape[:2]
        return self.image_embeddings(videos.reshape(n * t, *videos.shape[2:])).reshape(n, t, -1)

    def clip_frame(self, videos: np.ndarray) -> Score:
        """CLIP-Frame: per video, the mean cosine similarity of consecutive frames' image embeddings."""
        videos = _check_videos(videos)
        if videos.shape[1] < 2:
            raise ValueError(f"videos: CLIP-Frame needs at least 2 frames per video, got T={videos.shape[1]}")
        e = self._video_embeddings(videos).astype(np.float64)
        return Score("clip_frame", np.sum(e[:, 1:] * e[:, :-1], axis=-1).mean(axis=1))

    def clip_text(self, videos: np.ndarray, texts: Sequence[str]) -> Score:
        """CLIP-Text: per video, the mean cosine similarity of each frame's image embedding with the embedding of
        `texts[i]` (one text per video)."""
        videos = _check_videos(videos)
        if len(texts) != len(videos):
            raise ValueError(f"texts: {len(texts)} texts for {len(videos)} videos; give one text per video")
        e = self._video_embeddings(videos).astype(np.float64)
        txt = self.text_embeddings(texts).astype(np.float64)
        return Score("clip_text", np.einsum("ntd,nd->nt", e, txt).mean(axis=1))
