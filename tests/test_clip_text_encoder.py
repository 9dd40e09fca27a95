"""The CLIP text encoder option (`text_encoder.name="clip"`, `tokenizer="clip"`): built by name from a config, its
weights and BPE tokenizer read from a tiny random transformers `CLIPTextModel` folder, its output equal to
transformers' `last_hidden_state` as SD 1.5's pipeline calls it (no attention mask)."""

from __future__ import annotations

import json
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ttm_jax import config as config_lib
from ttm_jax.assembly import frozen as frozen_lib
from ttm_jax.assembly import modules as modules_lib
from ttm_jax.assembly import registry
from ttm_jax.models import tokenizer as tokenizer_lib
from ttm_jax.runtime import mesh as mesh_lib
from ttm_jax.runtime import sharding as sharding_lib
from ttm_jax.weights import rulebook as rb

LETTERS = "abcdefghijklmnopqrstuvwxyz"
# CLIP's BPE over letters plus two merges ("c a", "ca t</w>"): ids 0-25 letters, 26-51 word-final letters, 52 "ca",
# 53 "cat</w>", 54 start, 55 end (also unknown and padding, as SD 1.5's tokenizer)
VOCAB = {**{c: i for i, c in enumerate(LETTERS)}, **{c + "</w>": 26 + i for i, c in enumerate(LETTERS)}, "ca": 52,
         "cat</w>": 53, "<|startoftext|>": 54, "<|endoftext|>": 55}
START, END = 54, 55
TEXT_KW = dict(vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=20, bos_token_id=START, eos_token_id=END, pad_token_id=END)
MAX_LENGTH, LOCAL_MAX_LENGTH = 16, 8
TEXTS = ["a cat", "dogs run far away over the hill", ""]
TOL = 1e-5


def _save_tokenizer(folder) -> None:
    """SD 1.5's tokenizer folder layout: vocab.json and merges.txt only."""
    (folder / "vocab.json").write_text(json.dumps(VOCAB))
    (folder / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(**TEXT_KW, attn_implementation="eager")).eval()
    with torch.no_grad():  # LayerNorms away from (1, 0), so a misplaced scale or bias shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("clip_text") / "text_encoder"
    model.save_pretrained(folder)
    _save_tokenizer(folder)
    return model, folder


def _config(folder: str = "", **overrides):
    config = config_lib.build(2, "tiny")
    t = config.text_encoder
    t.update(dict(name="clip", tokenizer="clip", path=str(folder), d_model=32, num_layers=2, num_heads=4, d_kv=8,
                  d_ff=37, vocab_size=64, max_length=MAX_LENGTH, local_max_length=LOCAL_MAX_LENGTH))
    t.update(overrides)
    config.model.text_dim = 32
    return config_lib.validate(config)


@pytest.fixture(scope="module")
def built(saved):
    _, folder = saved
    config = _config(folder)
    entry = registry.text_encoder(config)
    module = entry.build(config.text_encoder)
    assert entry.is_source_folder(str(folder))
    params = entry.load(config.text_encoder, str(folder))
    tok = tokenizer_lib.make_tokenizer(config.text_encoder)
    apply = jax.jit(lambda p, ids, mask: module.apply({"params": p}, ids, mask))
    return config, module, params, tok, apply


def test_tokenizer_is_the_folders_clip_bpe(built, saved):
    _, folder = saved
    _, _, _, tok, _ = built
    ids, mask = tok.encode(TEXTS, MAX_LENGTH)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == (3, MAX_LENGTH)
    # "a cat": start, "a</w>", the merged "cat</w>", end, then end-token padding
    assert ids[0].tolist() == [START, 26, 53, END] + [END] * (MAX_LENGTH - 4) and mask[0].sum() == 4
    assert ids[2, :2].tolist() == [START, END] and mask[2].sum() == 2  # "": start, end
    assert mask[1].all() and ids[1, -1] == END  # truncated to MAX_LENGTH, still ending with the end token
    want = CLIPTokenizer.from_pretrained(str(folder))(TEXTS, padding="max_length", truncation=True,
                                                      max_length=MAX_LENGTH)
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, np.asarray(want["attention_mask"], bool))
    # it pickles (data-loader workers) and comes back the same
    again = pickle.loads(pickle.dumps(tok))
    np.testing.assert_array_equal(again.encode(TEXTS, LOCAL_MAX_LENGTH)[0], tok.encode(TEXTS, LOCAL_MAX_LENGTH)[0])


def test_output_is_transformers_last_hidden_state(built, saved):
    model, _ = saved
    _, _, params, tok, apply = built
    for length in (MAX_LENGTH, LOCAL_MAX_LENGTH):
        ids, mask = tok.encode(TEXTS, length)
        got = np.asarray(apply(params, jnp.asarray(ids), jnp.asarray(mask)))
        with torch.no_grad():  # as SD 1.5's pipeline: input ids only, no attention mask
            want = model(input_ids=torch.from_numpy(ids).long()).last_hidden_state.numpy()
        assert got.shape == (3, length, 32)
        print(f"max abs diff: last_hidden_state L={length} {np.abs(got - want).max():.2e}")
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_init_matches_loaded_tree_and_random_config_spec(built):
    config, module, params, tok, _ = built
    ids, mask = tok.encode([""], MAX_LENGTH)
    fresh = jax.eval_shape(module.init, jax.random.key(0), jnp.asarray(ids), jnp.asarray(mask))["params"]
    shapes = {k: v.shape for k, v in rb.flatten(fresh).items()}
    assert shapes == {k: v.shape for k, v in rb.flatten(params).items()}
    # no folder: the same tree from the config fields alone (random init / an Orbax checkpoint of converted params)
    random_cfg = _config("", tokenizer_path=str(config.text_encoder.path))
    alone = registry.text_encoder(random_cfg).build(random_cfg.text_encoder)
    fresh = jax.eval_shape(alone.init, jax.random.key(0), jnp.asarray(ids), jnp.asarray(mask))["params"]
    assert {k: v.shape for k, v in rb.flatten(fresh).items()}.keys() == shapes.keys()


def test_clip_model_folder_loads_the_text_tower_only(saved, built, tmp_path):
    model, _ = saved
    _, _, params, _, _ = built
    torch.manual_seed(1)
    from transformers import CLIPConfig

    full = CLIPModel(CLIPConfig(text_config=TEXT_KW, vision_config=dict(hidden_size=16, intermediate_size=20,
                                                                        num_hidden_layers=1, num_attention_heads=2,
                                                                        image_size=16, patch_size=8),
                                projection_dim=8))
    full.text_model.load_state_dict(model.state_dict())  # transformers 5: CLIPTextModel is the tower
    full.save_pretrained(tmp_path)
    config = _config(tmp_path, tokenizer_path="unused")
    loaded = registry.text_encoder(config).load(config.text_encoder, str(tmp_path))
    assert set(loaded) == {"text_model"}
    for k, v in rb.flatten(params).items():
        np.testing.assert_array_equal(rb.flatten(loaded)[k], v, err_msg=k)


def test_errors_name_the_field(saved):
    _, folder = saved
    config = _config(folder, d_ff=64)
    with pytest.raises(ValueError, match=r"config\.text_encoder\.d_ff: 64, but .*config\.json has "
                                         r"intermediate_size=37; set config\.text_encoder\.d_ff=37"):
        registry.text_encoder(config).build(config.text_encoder)
    config = _config(folder, max_length=32)
    with pytest.raises(ValueError, match=r"config\.text_encoder\.max_length: 32 tokens, but .*"
                                         r"max_position_embeddings=20"):
        registry.text_encoder(config).load(config.text_encoder, str(folder))
    config = _config(folder, tokenizer_path="/nonexistent")
    with pytest.raises(FileNotFoundError, match=r"config\.text_encoder\.tokenizer_path: .*vocab\.json does not exist"):
        tokenizer_lib.make_tokenizer(config.text_encoder)
    with pytest.raises(config_lib.ConfigError, match=r"config\.text_encoder\.tokenizer: 'word' with "
                                                     r"text_encoder\.name='clip'"):
        _config(folder, tokenizer="word")


def test_stage_frozen_inputs_use_the_clip_encoder(saved):
    """The stage's own path (`build_modules` -> `init_frozen`: the folder converted on the fly, placed on the mesh):
    the empty prompt's context is transformers' `last_hidden_state` of the tokenized "", padding positions included
    (the `clip` entry's `zero_padding=False`: `inputs.encode_text` keeps them, as SD 1.5's pipeline does)."""
    model, folder = saved
    config = _config(folder)
    modules = modules_lib.build_modules(config)
    mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
    frozen, _ = frozen_lib.init_frozen(config, modules, mesh, sharding_lib.rules_from_config(config.mesh))
    ids, mask = modules.tokenizer.encode([""], MAX_LENGTH)
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids).long()).last_hidden_state.numpy()
    assert not mask.all() and np.abs(want[~mask]).max() > 0.1  # the padding positions carry real values
    np.testing.assert_allclose(np.asarray(frozen["empty_context"]), want, atol=TOL, rtol=0)
    assert frozen["empty_local_context"].shape == (1, LOCAL_MAX_LENGTH, 32)
