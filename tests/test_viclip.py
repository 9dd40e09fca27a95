"""ViCLIP (models/viclip.py, weights/viclip.py, eval/viclip_score.py) against a torch re-implementation of the
InternVideo reference forward (`Data/InternVid/viclip/viclip_vision.py`, `viclip_text.py`, `__init__.py`), written
here with the reference's module structure so that its `state_dict()` has the reference's key names and shapes.

A tiny random model of that layout is saved as a `.pth` (wrapped under "model", as the release is) and loaded
through `weights/viclip.py`; the torch model is the numerical oracle."""

import collections
import gzip
import math

import cv2
import jax
import numpy as np
import pytest
import torch
from torch import nn

from ttm_jax.eval import viclip_score
from ttm_jax.models import viclip as viclip_model
from ttm_jax.weights import rulebook as rb
from ttm_jax.weights import safetensors_io
from ttm_jax.weights import viclip as viclip_weights

# tiny dims (head_dim 8 in both towers); 8 frames of 4x4 patches: 1 + 16 * 8 = 129 vision tokens
V_WIDTH, V_LAYERS, V_HEADS, PATCH, IMAGE, FRAMES = 32, 2, 4, 4, 16, 8
T_WIDTH, T_LAYERS, T_HEADS, CTX = 24, 2, 3, 8
EMBED, HEAD_DIM = 16, 8
# the hand-built BPE vocabulary below: 512 byte units, 4 merges, <|startoftext|>, <|endoftext|>
MERGES = ["h e", "l o</w>", "he l", "hel lo</w>"]
VOCAB = 512 + len(MERGES) + 2
SOT, EOT, HELLO = VOCAB - 2, VOCAB - 1, 515


# ------------------------------------------------------------------------------ torch oracle (the reference forward)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model, n_head, attn_mask=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(collections.OrderedDict([
            ("c_fc", nn.Linear(d_model, d_model * 4)), ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(d_model * 4, d_model))]))
        self.ln_2 = nn.LayerNorm(d_model)
        self.attn_mask = attn_mask

    def forward(self, x):  # x [L, N, D] (sequence first, as the reference)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=self.attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, attn_mask=None):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, attn_mask) for _ in range(layers)])

    def forward(self, x):
        for blk in self.resblocks:
            x = blk(x)
        return x


class VisionTransformer(nn.Module):
    """viclip_vision.VisionTransformer at inference (no masking, no dropout)."""

    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim, kernel_size=1, num_frames=8):
        super().__init__()
        self.conv1 = nn.Conv3d(3, width, (kernel_size, patch_size, patch_size), (kernel_size, patch_size, patch_size),
                               (0, 0, 0), bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.temporal_positional_embedding = nn.Parameter(torch.zeros(1, num_frames, width))
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, output_dim))

    def forward(self, x):  # x [B, C, T, H, W]
        x = self.conv1(x)
        b, c, t, h, w = x.shape
        x = x.permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)
        x = torch.cat([self.class_embedding + torch.zeros(x.shape[0], 1, c), x], dim=1)
        x = x + self.positional_embedding
        cls_tokens = x[:b, :1, :]
        x = x[:, 1:]
        n = x.shape[1]
        x = x.reshape(b, t, n, c).permute(0, 2, 1, 3).reshape(b * n, t, c)  # '(b t) n m -> (b n) t m'
        if x.size(1) == 1:
            x = x + self.temporal_positional_embedding.mean(1)
        else:
            x = x + self.temporal_positional_embedding
        x = x.reshape(b, n * t, c)  # '(b n) t m -> b (n t) m'
        x = torch.cat((cls_tokens, x), dim=1)
        x = self.ln_pre(x).permute(1, 0, 2)
        x = self.ln_post(self.transformer(x))
        return x[0] @ self.proj


class CLIPText(nn.Module):
    """viclip_text.CLIP_TEXT's forward."""

    def __init__(self, embed_dim, context_length, vocab_size, width, heads, layers):
        super().__init__()
        mask = torch.empty(context_length, context_length).fill_(float("-inf")).triu_(1)
        self.transformer = Transformer(width, layers, heads, attn_mask=mask)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))

    def forward(self, text):
        x = self.token_embedding(text) + self.positional_embedding
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection


class RefViCLIP(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision_encoder = VisionTransformer(IMAGE, PATCH, V_WIDTH, V_LAYERS, V_HEADS, EMBED, num_frames=FRAMES)
        self.text_encoder = CLIPText(EMBED, CTX, VOCAB, T_WIDTH, T_HEADS, T_LAYERS)
        self.temp = nn.Parameter(torch.ones([]) / 100.0)


def _randomise(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight")):
                p.copy_(1 + 0.2 * noise)  # LayerNorms away from (1, 0), so a misplaced scale or bias shows
            elif name != "temp":
                p.copy_(noise / math.sqrt(p.shape[-1]) if p.ndim > 1 else 0.2 * noise)


def _oracle_video(model, frames):
    """normalised float `[B, T, S, S, 3]` -> unit `[B, E]` (ViCLIP.get_vid_features)."""
    with torch.no_grad():
        x = torch.from_numpy(np.asarray(frames, np.float32)).permute(0, 4, 1, 2, 3)  # -> [B, C, T, H, W]
        f = model.vision_encoder(x)
    return (f / f.norm(dim=-1, keepdim=True)).numpy()


def _oracle_text(model, ids):
    with torch.no_grad():
        f = model.text_encoder(torch.from_numpy(np.asarray(ids)).long())
    return (f / f.norm(dim=-1, keepdim=True)).numpy()


def _reference_frames(video):
    """The reference demo's `frames2tensor` on one RGB uint8 video `[T, H, W, 3]` -> `[1, 8, S, S, 3]` (channels
    last; the reference then moves channels before H, W)."""
    step = len(video) // FRAMES
    picked = list(video)[::step][:FRAMES]
    mean, std = np.array([0.485, 0.456, 0.406]).reshape(1, 1, 3), np.array([0.229, 0.224, 0.225]).reshape(1, 1, 3)
    return np.stack([(cv2.resize(f, (IMAGE, IMAGE)) / 255.0 - mean) / std for f in picked])[None].astype(np.float32)


# ---------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = RefViCLIP().eval()
    _randomise(model)
    folder = tmp_path_factory.mktemp("viclip")
    path = folder / "viclip.pth"
    torch.save({"model": model.state_dict()}, path)
    bpe = folder / "bpe.txt.gz"
    bpe.write_bytes(gzip.compress(("#version: 0.2\n" + "\n".join(MERGES) + "\n").encode()))
    return model, path, bpe


@pytest.fixture(scope="module")
def loaded(saved):
    _, path, _ = saved
    return viclip_weights.load(str(path), head_dim=HEAD_DIM)


@pytest.fixture(scope="module")
def scorer(saved):
    _, path, bpe = saved
    return viclip_score.ViClipScorer.from_checkpoint(str(path), bpe_path=str(bpe), head_dim=HEAD_DIM, batch_size=2)


@pytest.fixture(scope="module")
def apply():
    return jax.jit(lambda spec, params, method, *args: viclip_model.ViCLIP(spec).apply({"params": params}, *args,
                                                                                       method=method),
                   static_argnums=(0, 2))


# ------------------------------------------------------------------------------------------------------------- tests


def test_every_key_converts_with_its_shape(saved, loaded):
    model, _, _ = saved
    spec, params = loaded
    v, t = spec.vision, spec.text
    assert (v.image_size, v.patch_size, v.num_frames, v.kernel_size) == (IMAGE, PATCH, FRAMES, 1)
    assert (v.tower.hidden_size, v.tower.num_layers, v.tower.num_heads, v.tower.intermediate_size) == (
        V_WIDTH, V_LAYERS, V_HEADS, 4 * V_WIDTH)
    assert (t.tower.hidden_size, t.tower.num_layers, t.tower.num_heads, t.vocab_size, t.context_length) == (
        T_WIDTH, T_LAYERS, T_HEADS, VOCAB, CTX)
    assert spec.embed_dim == EMBED
    flat = rb.flatten(params)
    assert flat["vision_encoder/conv1/kernel"].shape == (1, PATCH, PATCH, 3, V_WIDTH)
    assert flat["vision_encoder/transformer/layers/self_attn/k_proj/kernel"].shape == (V_LAYERS, V_WIDTH, V_WIDTH)
    sd = {k: p.detach().numpy().copy() for k, p in model.state_dict().items()}
    # the fused q/k/v rows land in order, and the bare projections are not transposed
    w = sd["text_encoder.transformer.resblocks.1.attn.in_proj_weight"]
    np.testing.assert_array_equal(flat["text_encoder/transformer/layers/self_attn/k_proj/kernel"][1],
                                  w[T_WIDTH:2 * T_WIDTH].T)
    np.testing.assert_array_equal(flat["vision_encoder/proj/kernel"], sd["vision_encoder.proj"])
    # every reference key is consumed and produced back, bit for bit, with its shape and dtype
    back = viclip_weights.to_torch(params, spec, sd)
    assert set(back) == set(sd)
    for k, x in back.items():
        assert x.shape == sd[k].shape and x.dtype == sd[k].dtype and x.tobytes() == sd[k].tobytes(), k
    # the same state dict as safetensors loads to the same params
    st = saved[1].parent / "viclip.safetensors"
    safetensors_io.write_safetensors(str(st), {k: (x.shape, x.dtype) for k, x in sd.items()}, sd.items())
    jax.tree.map(np.testing.assert_array_equal, viclip_weights.load(str(st), head_dim=HEAD_DIM)[1], params)


def test_video_and_text_match_the_reference(saved, loaded, apply):
    model, _, _ = saved
    spec, params = loaded
    frames = np.random.default_rng(1).normal(size=(2, FRAMES, IMAGE, IMAGE, 3)).astype(np.float32)
    got = np.asarray(viclip_score._unit(apply(spec, params, "encode_vision", frames)))
    err_v = np.abs(got - _oracle_video(model, frames)).max()
    # one frame (an image): the reference adds the mean temporal embedding
    got1 = np.asarray(viclip_score._unit(apply(spec, params, "encode_vision", frames[:, :1])))
    err_1 = np.abs(got1 - _oracle_video(model, frames[:, :1])).max()
    ids = np.zeros((3, CTX), np.int32)
    ids[0, :5] = [SOT, 7, 300, HELLO, EOT]
    ids[1, :3] = [SOT, 100, EOT]
    ids[2] = [SOT, 1, 2, 3, 4, 5, 6, EOT]
    txt = np.asarray(viclip_score._unit(apply(spec, params, "encode_text", ids)))
    err_t = np.abs(txt - _oracle_text(model, ids)).max()
    print(f"max abs diff (unit embeddings): video {err_v:.2e}, image {err_1:.2e}, text {err_t:.2e}")
    assert err_v <= 1e-5 and err_1 <= 1e-5 and err_t <= 1e-5, (err_v, err_1, err_t)
    assert np.abs(got - got[::-1]).max() > 1e-2 and np.abs(txt[0] - txt[1]).max() > 1e-2  # not constant
    with pytest.raises(ValueError, match=r"3 frames give 3 temporal positions, but the model has 8"):
        apply(spec, params, "encode_vision", frames[:, :3])


def test_scorer_matches_the_reference_pipeline(saved, scorer):
    model, _, _ = saved
    rng = np.random.default_rng(2)
    videos = rng.integers(0, 256, (3, 17, 20, 28, 3), dtype=np.uint8)  # step 2; resized 20x28 -> 16x16
    want = np.concatenate([_oracle_video(model, _reference_frames(v)) for v in videos])
    got = scorer.video_embeddings(videos)
    err = np.abs(got - want).max()
    print(f"max abs diff: scorer video embeddings vs the reference pipeline {err:.2e}")
    assert got.shape == (3, EMBED) and err <= 1e-5, err
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-6)

    texts = ["Hello hello", "hello, HELLO!", "he"]
    ids, _ = scorer.tokenize(texts)
    t = scorer.viclip_t(videos, texts)
    want_t = np.sum(want.astype(np.float64) * _oracle_text(model, ids), axis=-1)
    assert t.name == "viclip_t" and np.abs(t.per_video - want_t).max() <= 1e-5, (t.per_video, want_t)

    same = scorer.viclip_v(videos, videos.copy())
    np.testing.assert_allclose(same.per_video, 1.0, atol=1e-6)
    other = scorer.viclip_v(videos, videos[::-1])
    want_v = np.sum(want.astype(np.float64) * want[::-1], axis=-1)
    assert np.abs(other.per_video - want_v).max() <= 1e-5 and other.per_video[0] < 0.999
    np.testing.assert_allclose(other.per_video[1], 1.0, atol=1e-6)  # the middle video is paired with itself
    assert same.as_dict()["metric"] == "viclip_v" and abs(same.mean_x100 - 100.0) < 1e-4

    with pytest.raises(ValueError, match=r"ViCLIP takes 8 frames per video, got T=5"):
        scorer.video_embeddings(videos[:, :5])
    with pytest.raises(ValueError, match=r"2 generated videos for 3 reference videos"):
        scorer.viclip_v(videos[:2], videos)
    with pytest.raises(ValueError, match=r"num_frames=16, but the checkpoint's temporal_positional_embedding holds 8"):
        viclip_score.ViClipScorer(scorer.spec, scorer.params, num_frames=16)


def test_bad_checkpoints_name_the_key(saved, tmp_path):
    model, _, _ = saved
    sd = dict(model.state_dict())
    missing = "vision_encoder.transformer.resblocks.1.attn.in_proj_bias"
    path = tmp_path / "missing.pth"
    torch.save({"model": {k: v for k, v in sd.items() if k != missing}}, path)
    with pytest.raises(rb.ConversionError, match=rf"(?s){path}: .*missing torch key '{missing}'"):
        viclip_score.ViClipScorer.from_checkpoint(str(path), head_dim=HEAD_DIM)
    path = tmp_path / "no_conv.pth"
    torch.save({k: v for k, v in sd.items() if k != "vision_encoder.conv1.weight"}, path)  # an unwrapped state dict
    with pytest.raises(rb.ConversionError, match=rf"{path}: missing key 'vision_encoder.conv1.weight'"):
        viclip_weights.load(str(path), head_dim=HEAD_DIM)
    path = tmp_path / "shape.pth"
    bad = dict(sd, **{"text_encoder.transformer.resblocks.0.mlp.c_proj.bias": torch.zeros(T_WIDTH + 1)})
    torch.save({"model": bad}, path)
    with pytest.raises(rb.ConversionError, match=r"shape mismatch: torch 'text_encoder.transformer.resblocks.0.mlp"
                                                 r".c_proj.bias' is \(25,\)"):
        viclip_weights.load(str(path), head_dim=HEAD_DIM)
    path = tmp_path / "extra.pth"
    torch.save({"model": dict(sd, extra=torch.zeros(2))}, path)
    with pytest.raises(rb.ConversionError, match=r"unmapped torch key 'extra'"):
        viclip_weights.load(str(path), head_dim=HEAD_DIM)
    with pytest.raises(rb.ConversionError, match=r"width 32 is not a multiple of head_dim 64"):
        viclip_weights.load(str(saved[1]))
    with pytest.raises(FileNotFoundError, match=r"nothing.pth does not exist"):
        viclip_weights.load(str(tmp_path / "nothing.pth"))


def test_clip_bpe_tokenizer(saved):
    _, _, bpe_path = saved
    bpe = viclip_score.ClipBPE(str(bpe_path))
    assert (bpe.sot, bpe.eot) == (SOT, EOT)
    # merges in rank order: (h,e), (l,o</w>), (he,l), (hel,lo</w>) -> "hello</w>" is merge 3 = id 515
    assert bpe.encode("hello") == [HELLO]
    # lower-cased; punctuation its own piece (',' = byte 44, the 12th printable unit: 256 + 11 with </w>)
    assert bpe.encode("  Hello,\n HELLO! ") == [HELLO, 267, HELLO, 256]
    assert bpe.encode("he") == [71, 324]  # no merge of (h, e</w>): 'h' unit 71, 'e</w>' 256 + 68
    assert bpe.encode("é") == [127, 358]  # two UTF-8 bytes, Latin-1 units 0xC3 and 0xA9 (</w>)
    assert bpe.encode("\x01") == [445]  # a control byte: the 2nd non-printable unit (256 + 188 + 1)
    assert bpe.encode("&amp;") == [256 + 5]  # HTML unescaped: '&' (byte 38), with </w>
    ids, mask = viclip_score.clip_bpe_tokenizer(str(bpe_path), CTX)(["hello", "hello " * 20])
    assert ids.dtype == np.int32 and ids.shape == (2, CTX)
    np.testing.assert_array_equal(ids[0], [SOT, HELLO, EOT, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(ids[1], [SOT] + [HELLO] * 6 + [EOT])  # cut, the end token kept
    np.testing.assert_array_equal(mask[0], [1, 1, 1, 0, 0, 0, 0, 0])
    with pytest.raises(FileNotFoundError, match=r"bpe_simple_vocab_16e6.txt.gz"):
        viclip_score.ClipBPE(str(bpe_path) + ".missing")
