"""CLIP's text tower as the frozen text encoder of a stage (`config.text_encoder.name = "clip"`): SD 1.5's and
AnimateDiff's CLIP ViT-L/14 text encoder, whose `last_hidden_state` `[B, L, 768]` the U-Net cross-attends to.

    TEXT_ENCODERS.register("clip", TextEncoder(build=build, is_source_folder=is_source_folder, load=load))

- `build(config.text_encoder) -> CLIPTextEncoder`: `(ids [B, L] int32, mask [B, L] bool) -> [B, L, d_model]`, the
  hidden states after the final LayerNorm under the causal mask alone, as SD 1.5's pipeline calls its text encoder
  (no attention mask: padding positions see the prompt and are cross-attended to like any other token). Its shape
  comes from the folder's `config.json` when `config.text_encoder.path` is a transformers folder, else from the config
  fields (`d_model`, `num_layers`, `num_heads`, `d_ff`, `vocab_size`, positions `max(max_length, local_max_length)`):
  random init, or an Orbax checkpoint of converted params.
- `load(config.text_encoder, path) -> params`: the text tower of a transformers `CLIPTextModel` / `CLIPModel` folder
  or a diffusers pipeline's `text_encoder/` (`weights/clip.py`), streamed; a `CLIPModel`'s vision tower and the
  projections are skipped unread. The config fields are checked against the folder's `config.json` first.
- Tokens: `config.text_encoder.tokenizer = "clip"` (`models/tokenizer.py:ClipTokenizer`, the folder's BPE files).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from etils import epath

from ttm_jax import cli
from ttm_jax.models import clip as clip_model
from ttm_jax.weights import clip as clip_weights
from ttm_jax.weights import rulebook as rb
from ttm_jax.weights import safetensors_io


class CLIPTextEncoder(clip_model.CLIP):
    """`CLIP(spec)` (text tower only) called as a text encoder: `(ids [B, L], mask [B, L]) -> [B, L, D]`; `mask` is
    accepted for the interface and not used (SD 1.5 encodes prompts without one). Params: `text_model/...`."""

    def __call__(self, ids: jax.Array, mask: jax.Array | None = None, images: jax.Array | None = None) -> jax.Array:
        del mask, images
        return self.text_hidden_states(ids, None)


def is_source_folder(path: str) -> bool:
    """True for a transformers CLIP folder (or a diffusers pipeline folder with `text_encoder/`)."""
    return bool(path) and (epath.Path(clip_weights.checkpoint_dir(path)) / "config.json").exists()


def _text_only(spec: clip_model.CLIPSpec) -> clip_model.CLIPSpec:
    return dataclasses.replace(spec, vision=None, projection_dim=None)


def _config_spec(config: Any) -> clip_model.CLIPSpec:
    tower = clip_model.TowerSpec(hidden_size=int(config.d_model), intermediate_size=int(config.d_ff),
                                 num_layers=int(config.num_layers), num_heads=int(config.num_heads))
    text = clip_model.TextSpec(tower, vocab_size=int(config.vocab_size),
                               max_positions=max(int(config.max_length), int(config.local_max_length)),
                               eos_token_id=int(config.vocab_size) - 1)
    return clip_model.CLIPSpec(text=text, dtype=config.get("dtype", "float32"),
                               param_dtype=config.get("param_dtype", "float32"))


def spec_of(config: Any) -> clip_model.CLIPSpec:
    """The text-only `CLIPSpec` of `config.text_encoder`: from the folder at `path` (checked against the config
    fields, see `check`) or from the fields alone."""
    path = config.get("path", "")
    if not is_source_folder(path):
        return _config_spec(config)
    spec = _text_only(clip_weights.read_spec(path, dtype=config.get("dtype", "float32"),
                                             param_dtype=config.get("param_dtype", "float32")))
    check(config, spec, str(epath.Path(clip_weights.checkpoint_dir(path)) / "config.json"))
    return spec


def check(config: Any, spec: clip_model.CLIPSpec, where: str) -> None:
    """Raises naming the `config.text_encoder` field whose value differs from the folder's `config.json`."""
    t = spec.text
    for field, name, want in (("d_model", "hidden_size", t.tower.hidden_size),
                              ("num_layers", "num_hidden_layers", t.tower.num_layers),
                              ("num_heads", "num_attention_heads", t.tower.num_heads),
                              ("d_ff", "intermediate_size", t.tower.intermediate_size),
                              ("vocab_size", "vocab_size", t.vocab_size)):
        if int(config[field]) != want:
            raise cli.BadInput(f"config.text_encoder.{field}: {config[field]}, but {where} has {name}={want}; set "
                             f"config.text_encoder.{field}={want}")
    for field in ("max_length", "local_max_length"):
        if int(config[field]) > t.max_positions:
            raise cli.BadInput(f"config.text_encoder.{field}: {config[field]} tokens, but {where} has "
                             f"max_position_embeddings={t.max_positions}; set it to <= {t.max_positions}")


def build(config: Any) -> CLIPTextEncoder:
    """The Flax text encoder of `config.text_encoder` (name "clip")."""
    return CLIPTextEncoder(spec_of(config))


def load(config: Any, path: str) -> dict[str, Any]:
    """The text tower's params (numpy) from the transformers CLIP folder `path`, streamed tensor by tensor; a
    missing or mis-shaped tensor raises `rulebook.ConversionError` naming the file(s) and every offending key."""
    folder = clip_weights.checkpoint_dir(path)
    full = clip_weights.read_spec(folder, dtype=config.get("dtype", "float32"),
                                  param_dtype=config.get("param_dtype", "float32"))
    spec = _text_only(full)
    check(config, spec, str(epath.Path(folder) / "config.json"))
    reader = safetensors_io.SafetensorsReader(folder)
    book = clip_weights.rulebook(spec, clip_weights.text_prefix_of(reader.specs, full))
    skipped = [rb.Ignore(p, "not the text tower") for p in ("vision_model.*", "visual_projection.*",
                                                             "text_projection.*", "logit_scale")]
    book = rb.RuleBook(book.name + "(text tower)", [*book.rules, *book.ignores, *skipped])
    try:
        return rb.stream_to_flax(book, reader, clip_weights.param_template(spec))
    except rb.ConversionError as e:
        raise rb.ConversionError(f"{', '.join(reader.files)}: not the CLIP text tower that {folder}/config.json "
                                 f"describes: {e}") from e
