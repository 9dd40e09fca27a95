"""Tokenizers against transformers' ByT5Tokenizer / T5Tokenizer (a SentencePiece model trained here), errors."""

import io
import pickle
import random
import zlib

import numpy as np
import pytest
import sentencepiece as spm
from transformers import ByT5Tokenizer, T5Tokenizer

from ttm_jax import config as config_lib
from ttm_jax.data import synthetic
from ttm_jax.models import tokenizer as tok_lib

TEXTS = [
    "a dog runs to the left",
    "",
    "Zebra über straße, 犬が走る!",
    "the small red car moves fast while the big blue car moves slowly toward the camera",
    "  two  spaces and a tab\tbetween ",
]

WORDS = ("the a dog cat runs jumps left right over under big small red blue car moves fast slowly person walks "
         "toward camera while waving hands water splashes ocean wave").split()


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """A ~80-piece unigram SentencePiece model trained on generated sentences, saved as <dir>/spiece.model."""
    rnd = random.Random(0)
    sentences = [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3, 10))) for _ in range(300)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buf, vocab_size=80,
                                   hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   model_type="unigram", minloglevel=2)
    d = tmp_path_factory.mktemp("spm")
    (d / "spiece.model").write_bytes(buf.getvalue())
    return d


@pytest.mark.parametrize("max_length", [1, 6, 40])
def test_byte_tokenizer_matches_transformers_byt5(max_length):
    ids, mask = tok_lib.ByteTokenizer().encode(TEXTS, max_length)
    ref = ByT5Tokenizer()(TEXTS, padding="max_length", max_length=max_length, truncation=True)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == (len(TEXTS), max_length)
    np.testing.assert_array_equal(ids, np.array(ref["input_ids"]))
    np.testing.assert_array_equal(mask, np.array(ref["attention_mask"], bool))


def test_byte_tokenizer_layout_and_decode():
    tok = tok_lib.ByteTokenizer()
    ids, mask = tok.encode(["hé"], 6)
    want = [b + 3 for b in "hé".encode()] + [tok_lib.EOS_ID]
    assert ids[0].tolist() == want + [tok_lib.PAD_ID] * (6 - len(want))
    assert mask[0].tolist() == [True] * len(want) + [False] * (6 - len(want))
    assert tok.decode(tok.encode(TEXTS, 200)[0]) == TEXTS
    # truncation keeps eos last and fills the row
    ids, mask = tok.encode([TEXTS[3]], 8)
    assert ids[0, -1] == tok_lib.EOS_ID and mask.all()


def test_word_tokenizer_layout_truncation_and_pickling():
    tok = tok_lib.WordTokenizer(2048)
    ids, mask = tok.encode(["The red square slides LEFT, the blue disc rises.", ""], 12)
    words = ["the", "red", "square", "slides", "left", ",", "the", "blue", "disc", "rises", "."]
    want = [3 + zlib.crc32(w.encode()) % (2048 - 3) for w in words]
    assert ids[0].tolist() == want + [tok_lib.EOS_ID] and mask[0].all()
    assert ids[1].tolist() == [tok_lib.EOS_ID] + [tok_lib.PAD_ID] * 11 and mask[1].sum() == 1
    assert ids[0, 0] == ids[0, 6]  # one word, one id wherever it stands (case folded: "LEFT" is "left")
    assert ids.max() < tok.vocab_size and ids[mask].min() >= tok_lib.EOS_ID
    short, _ = tok.encode(["the red square slides left"], 3)
    assert short[0].tolist() == want[:2] + [tok_lib.EOS_ID]  # cut to max_length - 1 words, eos last
    again = pickle.loads(pickle.dumps(tok))
    np.testing.assert_array_equal(again.encode(TEXTS, 16)[0], tok.encode(TEXTS, 16)[0])
    with pytest.raises(ValueError, match="vocab_size: 10.*at least 64"):
        tok_lib.WordTokenizer(10)


def test_word_tokenizer_keeps_the_synthetic_prompts_words_apart():
    """The tiny configs' table size gives every word of the synthetic captions and prompts its own id; a table half
    that size would merge "up" and "down" (the collision check sees it)."""
    cfg = config_lib.build(1, "tiny").text_encoder
    tok = tok_lib.make_tokenizer(cfg)
    words = set()
    for i in range(500):
        entry = synthetic.caption_entry("v", synthetic.sample_scene(0, i, height=32, width=32, frames=48))
        for text in [entry["caption"], entry["motion_prompt"], *entry["local_prompts"].values()]:
            words.update(tok.words(text))
            assert len(tok.words(text)) < (cfg.local_max_length if text in entry["local_prompts"].values()
                                           else cfg.max_length)  # never truncated
    assert {"up", "down", "left", "right", "red", "blue", "still"} <= words
    assert tok.collisions(sorted(words)) == {}
    assert tok_lib.WordTokenizer(1024).collisions(sorted(words)) != {}


def test_sentencepiece_matches_transformers_t5tokenizer(sp_dir):
    tok = tok_lib.SentencePieceTokenizer(str(sp_dir))
    hf = T5Tokenizer.from_pretrained(str(sp_dir), extra_ids=0)
    for max_length in (3, 24):
        ids, mask = tok.encode(TEXTS, max_length)
        ref = hf(TEXTS, padding="max_length", max_length=max_length, truncation=True)
        np.testing.assert_array_equal(ids, np.array(ref["input_ids"]))
        np.testing.assert_array_equal(mask, np.array(ref["attention_mask"], bool))
    # and the pieces are sentencepiece's own, ending with eos
    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "spiece.model"))
    ids, mask = tok.encode(TEXTS[:1], 24)
    assert ids[0, : mask[0].sum()].tolist() == sp.encode(TEXTS[0]) + [sp.eos_id()]
    assert tok.decode(ids) == [TEXTS[0]]


def test_sentencepiece_accepts_model_file_and_pickles(sp_dir, tmp_path):
    tok = tok_lib.SentencePieceTokenizer(str(sp_dir / "spiece.model"))
    (tmp_path / "tokenizer").mkdir()  # a diffusers pipeline folder
    (tmp_path / "tokenizer" / "spiece.model").write_bytes((sp_dir / "spiece.model").read_bytes())
    np.testing.assert_array_equal(tok_lib.SentencePieceTokenizer(str(tmp_path)).encode(TEXTS, 9)[0],
                                  tok.encode(TEXTS, 9)[0])
    again = pickle.loads(pickle.dumps(tok))  # data-loader workers receive it pickled
    for a, b in zip(tok.encode(TEXTS, 16), again.encode(TEXTS, 16), strict=True):
        np.testing.assert_array_equal(a, b)


def test_make_tokenizer_from_config_and_errors(sp_dir, tmp_path):
    cfg = config_lib.build(2, "tiny").text_encoder
    assert isinstance(tok_lib.make_tokenizer(cfg), tok_lib.WordTokenizer)
    cfg.tokenizer = "byte"
    assert isinstance(tok_lib.make_tokenizer(cfg), tok_lib.ByteTokenizer)
    cfg.tokenizer = "sentencepiece"
    cfg.tokenizer_path = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"tokenizer_path: SentencePiece model .*missing does not exist"):
        tok_lib.make_tokenizer(cfg)
    cfg.tokenizer_path = str(sp_dir)
    cfg.vocab_size = 10
    with pytest.raises(ValueError, match=r"vocab_size: 10 is smaller.*set it to at least"):
        tok_lib.make_tokenizer(cfg)
    cfg.vocab_size = 384
    assert isinstance(tok_lib.make_tokenizer(cfg), tok_lib.SentencePieceTokenizer)
    with pytest.raises(TypeError, match="sequence of strings"):
        tok_lib.ByteTokenizer().encode("one text", 4)
