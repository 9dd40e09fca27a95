"""ViCLIP metrics of generated videos: ViCLIP-T (video-text alignment) and ViCLIP-V (video-video similarity).

Videos in, numbers out: `videos` are uint8 `[N, T, H, W, 3]` (any T >= 8, any H, W; RGB).

    scorer = ViClipScorer.from_checkpoint("<ViClip-InternVid-10M-FLT.pth>", bpe_path="<bpe_simple_vocab_16e6.txt.gz>")
    scorer.viclip_t(videos, texts)          # Score: per video, cos(video embedding, embedding of its text)
    scorer.viclip_v(fake_videos, real_videos)   # Score: per pair, cos(generated video, reference video)
    score.mean, score.mean_x100, score.per_video, score.as_dict()      # clip_score.Score

The model is InternVideo's ViCLIP (`models/viclip.py`; weights converted by `weights/viclip.py` from the public
checkpoint at a path the user gives). Each video gives one embedding: 8 frames through the video tower, the class
token projected, unit-normalised. Scores are raw cosines (papers usually report the mean x100, `mean_x100`); the
model's temperature (1/100) is not used.

Preprocessing follows the reference demo (`Data/InternVid/viclip/__init__.py: frames2tensor`):
- frames: `step = T // num_frames`, frames `0, step, 2*step, ...`, the first `num_frames` (`sample_frames`);
- each frame resized straight to S x S (S = 224; no aspect-preserving crop) by `cv2.resize(frame, (S, S))`, the
  reference's own call (bilinear, uint8 out), on the host (`resize_frames`); a frame already S x S is kept as is;
- `(x / 255 - mean) / std` with ImageNet's mean and std, not OpenAI CLIP's (`normalise`, on the accelerator).
  The reference reads frames with cv2 (BGR) and flips them to RGB; ours are RGB already.
Texts are tokenized by `tokenize(texts) -> (ids int32 [B, L], mask bool [B, L])` with L <= 32: by default CLIP's BPE
(`ClipBPE`, the reference's `SimpleTokenizer`: `<|startoftext|>`, tokens, `<|endoftext|>`, padded with 0, cut to 32
with the end token kept), whose merges file (`bpe_simple_vocab_16e6.txt.gz`, shipped with the reference code) is
read from `bpe_path`; the text tower pools at the largest id and applies no padding mask, as the reference.

How parity was established: `tests/test_viclip.py` holds a small torch re-implementation of the reference forward
(`viclip_vision.VisionTransformer`, `viclip_text.CLIP_TEXT`, written from the reference code with its module
structure, so its `state_dict()` has the reference's exact key names and shapes: `nn.MultiheadAttention`'s fused
`in_proj_weight`, the `[1, T, D]` temporal embedding, the Conv3d patch kernel, the bare `proj` / `text_projection`
matrices). A tiny random state dict of that model, saved as a `.pth`, is loaded through `weights/viclip.py` (every
key consumed, every shape checked); the Flax video and text embeddings match the torch ones in float32 to <= 1e-5,
the scorer's numbers (frame sampling, resizing, normalisation, cosines) match the reference pipeline run with the torch
oracle, and the tokenizer is checked on a hand-built merges file. A one-off check outside the suite (it needs the
reference package, with `timm`, `ftfy` and `pkg_resources` stubbed) ran the unmodified reference code at the full
ViCLIP-L shapes with random weights: its 447-key `state_dict()` loaded here with the default `head_dim` (16 / 12
heads inferred), `frames2tensor` + `get_vid_features` on a 20-frame 180x320 video vs `video_embeddings`: max abs diff
1.1e-7; `get_text_features` vs `text_embeddings`: 1.3e-7; `SimpleTokenizer` vs `ClipBPE` on the real
`bpe_simple_vocab_16e6.txt.gz`: identical ids on 9 texts (punctuation, contractions, accents, CJK, emoji, HTML).
What remains unverified: the released checkpoint itself was not available here (no download at run time), so its
keys and shapes were not read (the reference loads it with a strict `load_state_dict` into the module whose keys we
checked, so they should agree) and no embedding was compared with the real weights; the head count is inferred as
width // 64 (true of every published ViCLIP config, not readable from the file); and our cleaning skips
`ftfy.fix_text` when ftfy is not installed (it changes only mis-encoded text).
"""

from __future__ import annotations

import functools
import gzip
import html
from collections.abc import Sequence

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from ttm_jax.eval.clip_score import Score, Tokenize, _check_videos, _unit
from ttm_jax.models import viclip as viclip_model
from ttm_jax.weights import viclip as viclip_weights

# the reference demo's pixel statistics (ImageNet's)
VICLIP_MEAN = (0.485, 0.456, 0.406)
VICLIP_STD = (0.229, 0.224, 0.225)
CONTEXT_LENGTH = 32  # ViCLIP's text context (`max_txt_l`)


# ------------------------------------------------------------------------------------------------------ preprocessing


def sample_frames(num_available: int, num_frames: int) -> np.ndarray:
    """int `[num_frames]`: the frames the reference takes from a video of `num_available` frames (`step = T // n`,
    frames `0, step, ...`, the first n)."""
    if num_available < num_frames:
        raise ValueError(f"videos: ViCLIP takes {num_frames} frames per video, got T={num_available}; pass videos of "
                         f"at least {num_frames} frames")
    step = num_available // num_frames
    return np.arange(0, num_available, step)[:num_frames]


def resize_frames(frames: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 `[M, H, W, 3]` -> uint8 `[M, S, S, 3]`: each frame `cv2.resize(frame, (S, S))` (bilinear, the
    reference's own call); frames already S x S are returned as they are."""
    frames = np.asarray(frames)
    if frames.shape[1:3] == (image_size, image_size):
        return frames
    return np.stack([cv2.resize(np.ascontiguousarray(f), (image_size, image_size), interpolation=cv2.INTER_LINEAR)
                     for f in frames])


def prepare_videos(videos: np.ndarray, num_frames: int, image_size: int) -> np.ndarray:
    """uint8 `[N, T, H, W, 3]` -> uint8 `[N, num_frames, S, S, 3]`: `sample_frames`, then `resize_frames` (host)."""
    videos = _check_videos(videos)
    n = len(videos)
    picked = videos[:, sample_frames(videos.shape[1], num_frames)]
    frames = resize_frames(picked.reshape(n * num_frames, *videos.shape[2:]), image_size)
    return frames.reshape(n, num_frames, image_size, image_size, 3)


def normalise(frames: jax.Array, mean: Sequence[float] = VICLIP_MEAN, std: Sequence[float] = VICLIP_STD) -> jax.Array:
    """uint8 `[..., 3]` -> float32 `(x / 255 - mean) / std` (the reference's `normalize`, ImageNet statistics)."""
    x = frames.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


# ---------------------------------------------------------------------------------------------------------- tokenizer


@functools.lru_cache(maxsize=1)
def _byte_units() -> dict[int, str]:
    """Each byte -> a printable unicode character (printable ASCII / Latin-1 bytes map to themselves, the others to
    256, 257, ...), in the order CLIP's vocabulary lists them."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    units = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in units:
            units[b] = chr(256 + extra)
            extra += 1
    return units


# CLIP's pre-tokenizer: special tokens, English contractions, runs of letters, single digits, runs of other symbols
_PIECES = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48894 merges of the file


class ClipBPE:
    """CLIP's byte-level BPE tokenizer (the reference's `SimpleTokenizer`), from its merges file at `bpe_path`
    (`bpe_simple_vocab_16e6.txt.gz`, or the same text uncompressed). Vocabulary: 256 byte units, the same with
    `</w>`, the merges in order, `<|startoftext|>`, `<|endoftext|>` (49408 ids for the real file)."""

    def __init__(self, bpe_path: str):
        try:
            import regex  # unicode classes (\p{L}, \p{N}) for the pre-tokenizer; installed with transformers
        except ImportError as e:
            raise ImportError("ClipBPE needs the `regex` package (pip install regex), or pass tokenize=") from e
        self._regex = regex
        self._pieces = regex.compile(_PIECES, regex.IGNORECASE)
        p = epath.Path(bpe_path)
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist; pass bpe_path= the CLIP BPE merges file "
                                    f"(bpe_simple_vocab_16e6.txt.gz, next to InternVideo's viclip/simple_tokenizer.py)")
        raw = p.read_bytes()
        text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")
        lines = text.split("\n")[1:NUM_MERGES + 1]  # line 0 is a version header
        merges = [tuple(line.split()) for line in lines if line.strip()]
        bad = [m for m in merges if len(m) != 2]
        if bad:
            raise ValueError(f"{p}: not a BPE merges file: line {bad[0]!r} is not two symbols")
        units = list(_byte_units().values())
        vocab = units + [u + "</w>" for u in units] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {piece: i for i, piece in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.sot, self.eot = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]
        self._cache: dict[str, list[str]] = {}

    def _bpe(self, piece: str) -> list[str]:
        if piece in ("<|startoftext|>", "<|endoftext|>"):
            return [piece]
        if piece not in self._cache:
            word = [*piece[:-1], piece[-1] + "</w>"]
            while len(word) > 1:
                pairs = list(zip(word, word[1:], strict=False))
                best = min(pairs, key=lambda pair: self.ranks.get(pair, len(self.ranks)))
                if best not in self.ranks:
                    break
                merged, i = [], 0
                while i < len(word):  # every occurrence, left to right, without overlap
                    if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                        merged.append(word[i] + word[i + 1])
                        i += 2
                    else:
                        merged.append(word[i])
                        i += 1
                word = merged
            self._cache[piece] = word
        return self._cache[piece]

    def clean(self, text: str) -> str:
        """ftfy (when installed), HTML unescaping (twice), whitespace collapsed, lower case."""
        try:
            import ftfy  # optional: fixes mis-encoded text only

            text = ftfy.fix_text(text)
        except ImportError:
            pass
        text = html.unescape(html.unescape(text)).strip()
        return self._regex.sub(r"\s+", " ", text).strip().lower()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without the start / end tokens."""
        units = _byte_units()
        ids = []
        for piece in self._pieces.findall(self.clean(text)):
            piece = "".join(units[b] for b in piece.encode("utf-8"))
            ids += [self.encoder[s] for s in self._bpe(piece)]
        return ids

    def __call__(self, texts: Sequence[str], context_length: int = CONTEXT_LENGTH) -> tuple[np.ndarray, np.ndarray]:
        """`(ids int32 [B, context_length], mask bool [B, context_length])`: start token, the text's tokens, end
        token, zeros; a text too long is cut to `context_length` with the end token last."""
        if isinstance(texts, str):
            texts = [texts]
        ids = np.zeros((len(texts), context_length), np.int32)
        mask = np.zeros((len(texts), context_length), bool)
        for r, text in enumerate(texts):
            tokens = [self.sot, *self.encode(text), self.eot]
            if len(tokens) > context_length:
                tokens = tokens[:context_length - 1] + [self.eot]
            ids[r, :len(tokens)], mask[r, :len(tokens)] = tokens, True
        return ids, mask


def clip_bpe_tokenizer(bpe_path: str, context_length: int = CONTEXT_LENGTH) -> Tokenize:
    """A `Tokenize` (texts -> (ids, mask)) with CLIP's BPE from the merges file at `bpe_path`; nothing downloads."""
    bpe = ClipBPE(bpe_path)
    return lambda texts: bpe(texts, context_length)


# ------------------------------------------------------------------------------------------------------------- scorer


class ViClipScorer:
    """ViCLIP-T and ViCLIP-V of uint8 videos with a converted ViCLIP model."""

    def __init__(self, spec: viclip_model.ViCLIPSpec, params: dict, tokenize: Tokenize | None = None, *,
                 num_frames: int = 8, batch_size: int = 4):
        v = spec.vision
        if num_frames != v.num_frames * v.kernel_size:
            raise ValueError(f"ViClipScorer: num_frames={num_frames}, but the checkpoint's temporal_positional_"
                             f"embedding holds {v.num_frames} frames; pass num_frames={v.num_frames * v.kernel_size}")
        self.spec, self.tokenize = spec, tokenize
        self.num_frames, self.batch_size = int(num_frames), int(batch_size)
        self.params = jax.device_put(params)
        model = viclip_model.ViCLIP(spec)
        self._videos = jax.jit(lambda p, frames: _unit(model.apply(
            {"params": p}, normalise(frames), method="encode_vision")))
        self._texts = jax.jit(lambda p, ids: _unit(model.apply({"params": p}, ids, method="encode_text")))

    @classmethod
    def from_checkpoint(cls, path: str, tokenize: Tokenize | None = None, *, num_frames: int = 8,
                        bpe_path: str | None = None, batch_size: int = 4, head_dim: int = 64,
                        allow_pickle: bool = False) -> ViClipScorer:
        """From the InternVideo ViCLIP checkpoint at `path` (`weights/viclip.load`); `tokenize` defaults to CLIP's
        BPE from `bpe_path` (none given: `text_embeddings` / `viclip_t` raise, `viclip_v` works)."""
        spec, params = viclip_weights.load(path, head_dim=head_dim, allow_pickle=allow_pickle)
        if tokenize is None and bpe_path is not None:
            tokenize = clip_bpe_tokenizer(bpe_path, spec.text.context_length)
        return cls(spec, params, tokenize, num_frames=num_frames, batch_size=batch_size)

    def video_embeddings(self, videos: np.ndarray) -> np.ndarray:
        """uint8 `[N, T, H, W, 3]` (T >= num_frames) -> unit-norm float32 `[N, embed_dim]`, `batch_size` videos at a
        time (the last batch padded: one compilation)."""
        videos = prepare_videos(videos, self.num_frames, self.spec.vision.image_size)
        out = []
        for start in range(0, len(videos), self.batch_size):
            chunk = videos[start:start + self.batch_size]
            n = len(chunk)
            if n < self.batch_size:
                chunk = np.concatenate([chunk, np.zeros((self.batch_size - n, *chunk.shape[1:]), chunk.dtype)])
            out.append(np.asarray(self._videos(self.params, chunk))[:n])
        return np.concatenate(out)

    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """`texts` -> unit-norm float32 `[len(texts), embed_dim]`."""
        if self.tokenize is None:
            raise ValueError("ViClipScorer: no tokenizer; pass tokenize= (texts -> (ids, mask)) or bpe_path= (CLIP's "
                             "bpe_simple_vocab_16e6.txt.gz) to from_checkpoint")
        ids, _ = self.tokenize(list(texts))  # the reference applies no padding mask (causal rows only)
        return np.asarray(self._texts(self.params, np.asarray(ids, np.int32)))

    def viclip_t(self, videos: np.ndarray, texts: Sequence[str]) -> Score:
        """ViCLIP-T: per video, the cosine of its video embedding with the embedding of `texts[i]`."""
        videos = _check_videos(videos)
        if len(texts) != len(videos):
            raise ValueError(f"texts: {len(texts)} texts for {len(videos)} videos; give one text per video")
        e = self.video_embeddings(videos).astype(np.float64)
        t = self.text_embeddings(texts).astype(np.float64)
        return Score("viclip_t", np.sum(e * t, axis=-1))

    def viclip_v(self, fake_videos: np.ndarray, real_videos: np.ndarray) -> Score:
        """ViCLIP-V: per pair, the cosine of the generated video's embedding with its reference video's."""
        fake, real = _check_videos(fake_videos), _check_videos(real_videos)
        if len(fake) != len(real):
            raise ValueError(f"videos: {len(fake)} generated videos for {len(real)} reference videos; pair them one "
                             f"to one")
        a = self.video_embeddings(fake).astype(np.float64)
        b = self.video_embeddings(real).astype(np.float64)
        return Score("viclip_v", np.sum(a * b, axis=-1))
