"""CLIP against transformers' CLIPModel / CLIPTextModel (tiny random models saved with save_pretrained), the folder
loader and its errors, and the CLIP-Frame / CLIP-Text metrics against the same computation in torch."""

import json

import jax
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ttm_jax.eval import clip_score
from ttm_jax.models import clip as clip_model
from ttm_jax.weights import clip as clip_weights
from ttm_jax.weights import rulebook as rb
from ttm_jax.weights import safetensors_io

VOCAB, BOS, EOS, PAD = 100, 98, 99, 1
TEXT_KW = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=16, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
VISION_KW = dict(hidden_size=40, intermediate_size=52, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                 patch_size=8)
LENGTHS = (12, 5, 2)  # real tokens per row (BOS ... EOS), then padding
L = 12


def _perturb_norms(model):
    with torch.no_grad():  # LayerNorms away from their init (1, 0), so a misplaced scale or bias shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))


def _ids(pad=PAD, eos=EOS):
    rng = np.random.default_rng(0)
    ids = np.full((len(LENGTHS), L), pad, np.int32)
    for r, n in enumerate(LENGTHS):
        ids[r, 0], ids[r, 1:n - 1], ids[r, n - 1] = BOS, rng.integers(2, 90, n - 2), eos
    return ids, np.arange(L)[None, :] < np.array(LENGTHS)[:, None]


def _tokenize(texts):
    """A stand-in tokenizer for the tiny vocabulary: BOS, one id per word, EOS, padded with PAD to L."""
    ids = np.full((len(texts), L), PAD, np.int32)
    for r, text in enumerate(texts):
        words = [2 + sum(map(ord, w)) % 88 for w in text.split()][:L - 2]
        ids[r, :len(words) + 2] = [BOS, *words, EOS]
    return ids, ids != PAD


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=TEXT_KW, vision_config=VISION_KW, projection_dim=24, attn_implementation="eager")
    model = CLIPModel(cfg).eval()
    _perturb_norms(model)
    folder = tmp_path_factory.mktemp("clip") / "model"
    model.save_pretrained(folder)
    spec, params = clip_weights.load(str(folder))
    return model, folder, spec, params


@pytest.fixture(scope="module")
def apply():
    return jax.jit(lambda spec, params, method, *args: clip_model.CLIP(spec).apply({"params": params}, *args,
                                                                                   method=method),
                   static_argnums=(0, 2))


@pytest.fixture(scope="module")
def scorer(saved):
    _, _, spec, params = saved
    return clip_score.ClipScorer(spec, params, _tokenize, batch_size=4)


def _torch_text(model, ids, mask):
    with torch.no_grad():
        out = model.get_text_features(input_ids=torch.from_numpy(ids).long(),
                                      attention_mask=torch.from_numpy(mask).long())
    return out.pooler_output.numpy(), out.last_hidden_state.numpy()


def _torch_images(model, pixels):
    with torch.no_grad():
        out = model.get_image_features(pixel_values=torch.from_numpy(np.array(pixels)).permute(0, 3, 1, 2))
    return out.pooler_output.numpy()


def test_spec_from_config(saved):
    _, folder, spec, params = saved
    assert spec.text.eos_token_id == EOS and spec.text.tower.hidden_act == "quick_gelu"
    assert spec.vision.tower.hidden_size == 40 and spec.vision.grid == 4 and spec.projection_dim == 24
    assert params["text_model"]["encoder"]["layers"]["self_attn"]["q_proj"]["kernel"].shape == (2, 32, 32)
    assert params["vision_model"]["patch_embedding"]["kernel"].shape == (8, 8, 3, 40)
    assert params["visual_projection"]["kernel"].shape == (40, 24)
    bad = json.loads((folder / "config.json").read_text())
    bad["text_config"]["hidden_act"] = "relu"
    with pytest.raises(ValueError, match=r"x.json: text_config: hidden_act 'relu' is not supported"):
        clip_model.CLIPSpec.from_hf(bad, where="x.json")
    with pytest.raises(ValueError, match=r"model_type 't5' is not a CLIP model"):
        clip_model.CLIPSpec.from_hf({"model_type": "t5"})


def test_text_matches_transformers_with_padding(saved, apply):
    model, _, spec, params = saved
    ids, mask = _ids()
    feats = np.asarray(apply(spec, params, "get_text_features", ids, mask))
    hidden = np.asarray(apply(spec, params, "text_hidden_states", ids, mask))
    want_feats, want_hidden = _torch_text(model, ids, mask)
    assert feats.shape == (3, 24) and hidden.shape == (3, L, 32)
    err_f, err_h = np.abs(feats - want_feats).max(), np.abs(hidden - want_hidden).max()
    print(f"max abs diff: text features {err_f:.2e}, text last_hidden_state {err_h:.2e}")
    assert err_f <= 1e-5 and err_h <= 1e-5, (err_f, err_h)
    # padded with EOS itself (OpenAI's tokenizer pads with <|endoftext|>): the first EOS is pooled
    ids_eos = np.where(mask, ids, EOS).astype(np.int32)
    got = np.asarray(apply(spec, params, "get_text_features", ids_eos, mask))
    assert np.abs(got - _torch_text(model, ids_eos, mask)[0]).max() <= 1e-5
    np.testing.assert_allclose(got, feats, atol=1e-6)
    # the pooled row is each sequence's EOS: other tokens after it change nothing, the EOS row does
    ids2 = np.where(mask, ids, 7).astype(np.int32)
    np.testing.assert_allclose(np.asarray(apply(spec, params, "get_text_features", ids2, mask)), feats, atol=1e-6)
    # no mask (as SD 1.5 calls its encoder): causal only, so real rows are unchanged, padding rows differ
    nomask = np.asarray(apply(spec, params, "text_hidden_states", ids, None))
    np.testing.assert_allclose(nomask[mask], hidden[mask], atol=1e-6)
    with torch.no_grad():
        want = model.text_model(input_ids=torch.from_numpy(ids).long()).last_hidden_state.numpy()
    assert np.abs(nomask - want).max() <= 1e-5


def test_image_matches_transformers(saved, apply):
    model, _, spec, params = saved
    pixels = np.random.default_rng(1).normal(size=(3, 32, 32, 3)).astype(np.float32)
    got = np.asarray(apply(spec, params, "get_image_features", pixels))
    err = np.abs(got - _torch_images(model, pixels)).max()
    print(f"max abs diff: image features {err:.2e}")
    assert got.shape == (3, 24) and err <= 1e-5, err
    with pytest.raises(ValueError, match=r"images are 24x24x3, the model takes 32x32x3"):
        apply(spec, params, "get_image_features", pixels[:, :24, :24])


def test_round_trip_is_bit_identical(saved):
    model, _, spec, params = saved
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    back = clip_weights.to_torch(params, spec, sd)
    assert set(back) == set(sd)
    for k, v in back.items():
        assert v.dtype == sd[k].dtype and v.tobytes() == sd[k].tobytes(), k
    jax.tree.map(np.testing.assert_array_equal, clip_weights.from_torch(sd, spec), params)


@pytest.mark.parametrize("prefixed", [False, True])
def test_text_only_folder_legacy_eos_and_gelu(tmp_path, apply, prefixed):
    """A CLIPTextModel folder (SD 1.5's text_encoder): keys as transformers 5 saves them (no prefix) or as SD 1.5's
    files hold them (`text_model.` + a position_ids buffer); eos_token_id 2 pools at the largest id."""
    torch.manual_seed(2)
    model = CLIPTextModel(CLIPTextConfig(**{**TEXT_KW, "eos_token_id": 2, "hidden_act": "gelu"},
                                         attn_implementation="eager")).eval()
    _perturb_norms(model)
    folder = tmp_path / "pipeline" / "text_encoder"
    model.save_pretrained(folder)
    if prefixed:
        sd = {f"text_model.{k}": v.detach().numpy() for k, v in model.state_dict().items()}
        sd["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
        (folder / "model.safetensors").unlink()
        safetensors_io.write_safetensors(str(folder / "model.safetensors"), {k: rb.spec_of(v) for k, v in sd.items()},
                                         sd.items())
    spec, params = clip_weights.load(str(tmp_path / "pipeline"))  # a diffusers pipeline folder: its text_encoder/
    assert spec.vision is None and spec.projection_dim is None and spec.text.eos_token_id == 2
    assert set(params) == {"text_model"}
    ids, mask = _ids(pad=0, eos=VOCAB - 1)  # EOS the largest id, as the legacy rule assumes
    ids[1, 2] = VOCAB - 1  # ... and a repeat of it: the first one is pooled
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    hidden = np.asarray(apply(spec, params, "text_hidden_states", ids, mask))
    err = np.abs(hidden - out.last_hidden_state.numpy()).max()
    print(f"max abs diff: text-only last_hidden_state {err:.2e}")
    assert err <= 1e-5, err
    pooled = np.asarray(clip_model.eos_positions(ids, 2))
    np.testing.assert_array_equal(pooled, [11, 2, 1])
    np.testing.assert_allclose(hidden[np.arange(3), pooled], out.pooler_output.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match=r"no text_projection"):
        apply(spec, params, "get_text_features", ids, mask)


def _rewrite(folder, edit):
    path = folder / "model.safetensors"
    sd = {k: np.array(v) for k, v in safetensors_io.SafetensorsReader(str(path)).items()}
    edit(sd)
    path.unlink()
    safetensors_io.write_safetensors(str(path), {k: rb.spec_of(v) for k, v in sd.items()}, sd.items(),
                                     metadata={"format": "pt"})  # CLIPModel's logit_scale is 0-d
    return str(path)


def test_load_errors_name_file_and_key(saved, tmp_path):
    model, _, _, _ = saved
    cases = {
        "missing": (lambda sd: sd.pop("text_model.final_layer_norm.bias"),
                    r"missing torch key 'text_model\.final_layer_norm\.bias'"),
        "unexpected": (lambda sd: sd.__setitem__("vision_model.extra.weight", np.zeros(3, np.float32)),
                       r"unmapped torch key 'vision_model\.extra\.weight'"),
        "shape": (lambda sd: sd.__setitem__("visual_projection.weight", np.zeros((24, 41), np.float32)),
                  r"shape mismatch: torch 'visual_projection\.weight' is \(24, 41\)"),
    }
    for name, (edit, pattern) in cases.items():
        folder = tmp_path / name
        model.save_pretrained(folder)
        file = _rewrite(folder, edit)
        with pytest.raises(rb.ConversionError, match=pattern) as info:
            clip_weights.load(str(folder))
        assert str(info.value).startswith(file), str(info.value)[:200]
    with pytest.raises(FileNotFoundError, match=r"nothing/config.json does not exist"):
        clip_weights.load(str(tmp_path / "nothing"))


def test_preprocess_crop_resize_and_normalisation():
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)
    mean, std = np.array(clip_score.CLIP_MEAN), np.array(clip_score.CLIP_STD)
    got = np.asarray(clip_score.preprocess(frames, 32))  # shorter side already 32: a centre crop, no resampling
    np.testing.assert_allclose(got, (frames[:, :, 8:40] / 255.0 - mean) / std, atol=1e-5)
    assert clip_score.resized_size(40, 64, 32) == (32, 51) and clip_score.resized_size(90, 45, 30) == (60, 30)
    flat = np.full((1, 50, 70, 3), 200, np.uint8)  # resampled: a flat frame stays flat
    np.testing.assert_allclose(np.asarray(clip_score.preprocess(flat, 32)),
                               np.broadcast_to((200 / 255.0 - mean) / std, (1, 32, 32, 3)), atol=1e-5)
    # a left/right split frame: the centre crop of the resize keeps the split in the middle
    split = np.zeros((1, 64, 96, 3), np.uint8)
    split[:, :, 48:] = 255
    out = np.asarray(clip_score.preprocess(split, 32))[0, :, :, 0] * std[0] + mean[0]
    assert out[:, :14].max() < 0.01 and out[:, 18:].min() > 0.99


def _video(seed, n=2, t=5, h=40, w=36):
    return np.random.default_rng(seed).integers(0, 256, (n, t, h, w, 3), dtype=np.uint8)


def _torch_unit_image_embeddings(model, videos):
    n, t = videos.shape[:2]
    pixels = np.asarray(clip_score.preprocess(videos.reshape(n * t, *videos.shape[2:]), 32))
    e = torch.from_numpy(_torch_images(model, pixels)).double()
    return (e / e.norm(dim=-1, keepdim=True)).reshape(n, t, -1)


def test_clip_frame(saved, scorer):
    model, _, _, _ = saved
    const = np.repeat(_video(4, n=3, t=1), 4, axis=1)  # every frame the same
    score = scorer.clip_frame(const)
    np.testing.assert_allclose(score.per_video, 1.0, atol=1e-6)
    videos = _video(5)  # 10 frames in batches of 4: the last batch padded
    score = scorer.clip_frame(videos)
    e = _torch_unit_image_embeddings(model, videos)
    want = (e[:, 1:] * e[:, :-1]).sum(-1).mean(1).numpy()
    print(f"max abs diff: clip_frame {np.abs(score.per_video - want).max():.2e}")
    np.testing.assert_allclose(score.per_video, want, atol=1e-5)
    assert score.per_video.shape == (2,) and abs(score.mean - want.mean()) < 1e-5
    assert score.mean_x100 == pytest.approx(100 * score.mean) and score.as_dict()["metric"] == "clip_frame"
    assert np.all(score.per_video < 0.9999)  # random frames are not all alike
    with pytest.raises(ValueError, match=r"at least 2 frames"):
        scorer.clip_frame(videos[:, :1])
    with pytest.raises(ValueError, match=r"expected uint8 \[N, T, H, W, 3\], got float32"):
        scorer.clip_frame(videos.astype(np.float32))


def test_clip_text(saved, scorer):
    model, _, _, _ = saved
    videos = _video(6, n=3, t=3)
    texts = ["a red ball rolls left", "two cats", "the dog jumps over the fence slowly"]
    score = scorer.clip_text(videos, texts)
    e = _torch_unit_image_embeddings(model, videos)
    ids, mask = _tokenize(texts)
    txt = torch.from_numpy(_torch_text(model, ids, mask)[0]).double()
    txt = txt / txt.norm(dim=-1, keepdim=True)
    want = torch.einsum("ntd,nd->nt", e, txt).mean(1).numpy()
    print(f"max abs diff: clip_text {np.abs(score.per_video - want).max():.2e}")
    np.testing.assert_allclose(score.per_video, want, atol=1e-5)
    assert score.mean_x100 == pytest.approx(100 * want.mean(), abs=1e-3)
    # the text matters: swapping the texts between videos changes the scores
    swapped = scorer.clip_text(videos, texts[::-1])
    assert np.abs(swapped.per_video - score.per_video).max() > 1e-3
    with pytest.raises(ValueError, match=r"2 texts for 3 videos"):
        scorer.clip_text(videos, texts[:2])


def test_from_folder_uses_the_saved_tokenizer_padded_to_max_positions(saved):
    _, folder, spec, _ = saved
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {**{c: i for i, c in enumerate(letters)}, **{c + "</w>": 26 + i for i, c in enumerate(letters)},
             "<|startoftext|>": 52, "<|endoftext|>": 53}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt")).save_pretrained(folder)
    scorer = clip_score.ClipScorer.from_folder(str(folder), batch_size=2)
    texts = ["a cat", "dogs run far away"]
    ids, mask = scorer.tokenize(texts)
    want = AutoTokenizer.from_pretrained(str(folder))(texts, padding="max_length", max_length=spec.text.max_positions)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == (2, spec.text.max_positions)
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, np.asarray(want["attention_mask"], bool))
    assert scorer.text_embeddings(texts).shape == (2, 24)
