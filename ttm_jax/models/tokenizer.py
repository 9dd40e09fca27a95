"""Text -> token ids for the T5-family text encoder: ByT5's byte tokenizer and a hashed word tokenizer (no files),
and SentencePiece (T5/umT5).

Both follow the T5 conventions of the transformers tokenizers they stand in for (`ByT5Tokenizer`, `T5Tokenizer`
with `padding="max_length", truncation=True`): an end-of-sequence id is appended, a text longer than `max_length`
is cut to `max_length - 1` tokens and still ends with eos, the rest is padding. `encode` returns numpy arrays, so the
tokenizers can run in data-loader workers (they pickle).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Sequence
from typing import Protocol

import ml_collections
import numpy as np
from etils import epath

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """`B` texts -> (ids int32 `[B, max_length]`, mask bool `[B, max_length]`, True on real tokens incl. eos)."""
        ...


def _pack(rows: Sequence[Sequence[int]], max_length: int, eos_id: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(max_length, int | np.integer) or max_length < 1:
        raise ValueError(f"tokenizer: max_length={max_length!r} must be a positive int "
                         f"(config.text_encoder.max_length / local_max_length)")
    ids = np.full((len(rows), max_length), pad_id, np.int32)
    mask = np.zeros((len(rows), max_length), bool)
    for i, row in enumerate(rows):
        row = list(row[: max_length - 1]) + [eos_id]
        ids[i, : len(row)] = row
        mask[i, : len(row)] = True
    return ids, mask


def _texts(texts: Sequence[str] | str) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("tokenizer.encode takes a sequence of strings (a batch); wrap one text as [text]")
    out = []
    for t in texts:
        if isinstance(t, bytes):
            t = t.decode("utf-8")
        if not isinstance(t, str):
            raise TypeError(f"tokenizer.encode: {t!r} is not a str")
        out.append(t)
    return out


class ByteTokenizer:
    """ByT5: id = utf-8 byte + 3 (0 pad, 1 eos, 2 unk); 259 ids are used, ByT5 models allocate 384."""

    offset = 3
    vocab_size = 256 + 3

    def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """`B` texts -> (ids int32 `[B, max_length]`, mask bool `[B, max_length]`)."""
        rows = [np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.int32) + self.offset for t in _texts(texts)]
        return _pack(rows, max_length, EOS_ID, PAD_ID)

    def decode(self, ids: np.ndarray) -> list[str]:
        """`[B, L]` ids -> texts, up to the first eos; special ids dropped."""
        out = []
        for row in np.asarray(ids):
            row = row.tolist()
            row = row[: row.index(EOS_ID)] if EOS_ID in row else row
            out.append(bytes(i - self.offset for i in row if self.offset <= i < 256 + self.offset)
                       .decode("utf-8", errors="replace"))
        return out


class WordTokenizer:
    """Words hashed into a fixed table: id = 3 + crc32(word) mod (vocab_size - 3) (0 pad, 1 eos, 2 unk).

    For the tiny configs, whose text encoder is a randomly initialised, frozen T5 (no weights can be downloaded): a
    random encoder over bytes hands the DiT letters it would have to assemble into words before it could read "left"
    from "right", which a small model trained for minutes does not learn (stage 1 ignored its motion prompt: the same
    x0 predictions with the right, another scene's, or the null prompt). Over hashed words, every word is one token
    with its own random embedding. Lower-cased; a word is a run of letters or digits, other non-space characters are
    one token each. Collisions are possible (a hash, not a vocabulary): `collisions` lists them for a word list.
    """

    offset = 3
    _split = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")

    def __init__(self, vocab_size: int):
        if not isinstance(vocab_size, int) or vocab_size < 64:
            raise ValueError(f"config.text_encoder.vocab_size: {vocab_size!r}; the word tokenizer hashes words into "
                             f"this many ids, set it to at least 64 (1024+ keeps collisions rare)")
        self.vocab_size = vocab_size

    def words(self, text: str) -> list[str]:
        return self._split.findall(text.lower())

    def word_id(self, word: str) -> int:
        return self.offset + zlib.crc32(word.encode("utf-8")) % (self.vocab_size - self.offset)

    def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """`B` texts -> (ids int32 `[B, max_length]`, mask bool `[B, max_length]`)."""
        rows = [[self.word_id(w) for w in self.words(t)] for t in _texts(texts)]
        return _pack(rows, max_length, EOS_ID, PAD_ID)

    def collisions(self, words: Sequence[str]) -> dict[int, list[str]]:
        """Ids shared by more than one of `words`."""
        by_id: dict[int, set[str]] = {}
        for w in words:
            by_id.setdefault(self.word_id(w.lower()), set()).add(w.lower())
        return {i: sorted(ws) for i, ws in by_id.items() if len(ws) > 1}


class SentencePieceTokenizer:
    """A SentencePiece model (e.g. umT5's `spiece.model`); `path` is the `.model` file, a folder holding
    `spiece.model`, or a diffusers pipeline folder holding `tokenizer/spiece.model`; any `etils.epath` path."""

    def __init__(self, path: str, field: str = "config.text_encoder.tokenizer_path"):
        p = epath.Path(path) if path else None
        if p is not None and p.is_dir():
            # a tokenizer folder, or a diffusers pipeline folder holding tokenizer/
            p = p / "spiece.model" if (p / "spiece.model").exists() or not (p / "tokenizer").is_dir() \
                else p / "tokenizer" / "spiece.model"
        if p is None or not p.exists():
            raise FileNotFoundError(
                f"{field}: SentencePiece model {str(p) if p is not None else repr(path)} does not exist; set {field} "
                f"to the tokenizer's spiece.model (e.g. the google/umt5-xxl folder) or use tokenizer='byte'")
        self.path = str(p)
        self._proto = p.read_bytes()
        self._sp = None
        self._load()

    def _load(self):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.vocab_size = int(self._sp.get_piece_size())
        self.eos_id = int(self._sp.eos_id())
        if self.eos_id < 0:
            raise ValueError(f"{self.path}: the SentencePiece model has no eos piece; T5 encoders need one")
        # T5 models are trained with pad = 0; a model without a pad piece still pads with 0 (masked out)
        self.pad_id = int(self._sp.pad_id()) if self._sp.pad_id() >= 0 else PAD_ID

    def __getstate__(self):
        return {"path": self.path, "_proto": self._proto}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._load()

    def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """`B` texts -> (ids int32 `[B, max_length]`, mask bool `[B, max_length]`)."""
        rows = self._sp.encode(_texts(texts))
        return _pack(rows, max_length, self.eos_id, self.pad_id)

    def decode(self, ids: np.ndarray) -> list[str]:
        out = []
        for row in np.asarray(ids).tolist():
            row = row[: row.index(self.eos_id)] if self.eos_id in row else row
            out.append(self._sp.decode([i for i in row if i != self.pad_id]))
        return out


class ClipTokenizer:
    """CLIP's BPE tokenizer (transformers' `CLIPTokenizer`, local files only: `vocab.json` + `merges.txt`) from a
    folder: a transformers CLIP folder, a tokenizer folder, or a diffusers pipeline folder holding `tokenizer/`.
    As SD 1.5's pipeline: `<|startoftext|>` ... `<|endoftext|>`, truncated and padded to `max_length` with the
    folder's pad token (SD 1.5: `<|endoftext|>`); the mask is True from the start token to the end token."""

    def __init__(self, path: str, field: str = "config.text_encoder.tokenizer_path"):
        p = epath.Path(path) if path else None
        if p is not None and not (p / "vocab.json").exists() and (p / "tokenizer" / "vocab.json").exists():
            p = p / "tokenizer"
        if p is None or not (p / "vocab.json").exists():
            raise FileNotFoundError(
                f"{field}: {str(p / 'vocab.json') if p is not None else repr(path)} does not exist; set {field} (or "
                f"config.text_encoder.path) to a folder with CLIP's vocab.json and merges.txt, e.g. "
                f"<stable-diffusion-v1-5>/tokenizer or openai/clip-vit-large-patch14")
        self.path = str(p)
        self._load()

    def _load(self):
        import transformers  # optional dependency: only for CLIP's BPE

        self._tok = transformers.CLIPTokenizer.from_pretrained(self.path, local_files_only=True)
        self.vocab_size = len(self._tok)

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._load()

    def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """`B` texts -> (ids int32 `[B, max_length]`, mask bool `[B, max_length]`)."""
        _pack([], max_length, 0, 0)  # checks max_length
        out = self._tok(_texts(texts), padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="np")
        return out["input_ids"].astype(np.int32), out["attention_mask"].astype(bool)


# config.text_encoder.tokenizer -> `config.text_encoder -> tokenizer`; a new tokenizer is one entry
TOKENIZERS: dict[str, Callable[[ml_collections.ConfigDict], Tokenizer]] = {
    "byte": lambda config: ByteTokenizer(),
    "word": lambda config: WordTokenizer(int(config.vocab_size)),
    "sentencepiece": lambda config: SentencePieceTokenizer(config.get("tokenizer_path", "")),
    # CLIP's BPE (SD 1.5 / AnimateDiff): tokenizer_path, else the text encoder's own folder
    "clip": lambda config: ClipTokenizer(config.get("tokenizer_path", "") or config.get("path", "")),
}


def make_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
    """The tokenizer `config.text_encoder.tokenizer` names (pass `config.text_encoder`); checks its ids fit the
    encoder's embedding table (`vocab_size`), which would otherwise clip them silently."""
    if config.tokenizer not in TOKENIZERS:
        raise ValueError(f"config.text_encoder.tokenizer: {config.tokenizer!r}; choose one of {sorted(TOKENIZERS)}")
    tok = TOKENIZERS[config.tokenizer](config)
    if tok.vocab_size > config.vocab_size:
        raise ValueError(
            f"config.text_encoder.vocab_size: {config.vocab_size} is smaller than the {config.tokenizer} tokenizer's "
            f"{tok.vocab_size} ids; set it to at least {tok.vocab_size}")
    return tok
