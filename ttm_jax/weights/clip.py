"""transformers CLIP checkpoints <-> `ttm_jax.models.clip.CLIP`, through one rulebook.

A checkpoint is a transformers folder: `config.json` plus `model.safetensors` (or sharded safetensors with an index):

- a `CLIPModel` (`model_type` "clip", e.g. `openai/clip-vit-large-patch14`): both towers, both projections and
  `logit_scale`;
- a `CLIPTextModel` (`model_type` "clip_text_model", e.g. the `text_encoder/` of SD 1.5; a diffusers pipeline
  folder means its `text_encoder/`): the text tower alone, `text_projection` too for `CLIPTextModelWithProjection`.
  Its keys carry a `text_model.` prefix (older saves, SD 1.5's files) or none (transformers 5's `save_pretrained`);
  both load.

    spec, params = clip.load("<folder>")                  # numpy params; spec read from config.json
    state_dict = clip.to_torch(params, spec)              # and back: {torch key: numpy array}

Saved `position_ids` buffers (older checkpoints) are ignored: the model recomputes them.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from etils import epath

from ttm_jax import cli
from ttm_jax.models import clip as clip_model
from ttm_jax.weights import rulebook as rb
from ttm_jax.weights import safetensors_io

TEXT_PREFIX = "text_model."


def _tower_rules(torch_prefix: str, flax_prefix: str) -> list[rb.Rule]:
    layer = torch_prefix + "encoder.layers.{i}."
    flax_layer = flax_prefix + "encoder/layers/"
    rules = []
    for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
        rules += [rb.Rule(layer + f"self_attn.{n}.weight", flax_layer + f"self_attn/{n}/kernel", rb.LINEAR, stack="i"),
                  rb.Rule(layer + f"self_attn.{n}.bias", flax_layer + f"self_attn/{n}/bias", stack="i")]
    for n in ("fc1", "fc2"):
        rules += [rb.Rule(layer + f"mlp.{n}.weight", flax_layer + f"{n}/kernel", rb.LINEAR, stack="i"),
                  rb.Rule(layer + f"mlp.{n}.bias", flax_layer + f"{n}/bias", stack="i")]
    for n in ("layer_norm1", "layer_norm2"):
        rules += _layer_norm(layer + n, flax_layer + n, stack="i")
    return rules


def _layer_norm(torch_key: str, flax_path: str, stack: str | None = None) -> list[rb.Rule]:
    return [rb.Rule(f"{torch_key}.weight", f"{flax_path}/scale", stack=stack),
            rb.Rule(f"{torch_key}.bias", f"{flax_path}/bias", stack=stack)]


def rulebook(spec: clip_model.CLIPSpec, text_prefix: str = TEXT_PREFIX) -> rb.RuleBook:
    """The rules for `spec`'s parts; `text_prefix`: the text tower's torch key prefix ("text_model." in a
    CLIPModel; "text_model." or "" in a CLIPTextModel folder, see `text_prefix_of`)."""
    t = text_prefix
    rules: list[rb.Rule | rb.Ignore] = [
        rb.Rule(t + "embeddings.token_embedding.weight", "text_model/token_embedding/embedding"),
        rb.Rule(t + "embeddings.position_embedding.weight", "text_model/position_embedding/embedding"),
        *_tower_rules(t, "text_model/"),
        *_layer_norm(t + "final_layer_norm", "text_model/final_layer_norm"),
        rb.Ignore(t + "embeddings.position_ids", "recomputed"),
    ]
    if spec.projection_dim is not None:
        rules.append(rb.Rule("text_projection.weight", "text_projection/kernel", rb.LINEAR))
    if spec.vision is not None:
        v = "vision_model."
        rules += [
            rb.Rule(v + "embeddings.class_embedding", "vision_model/class_embedding"),
            rb.Rule(v + "embeddings.patch_embedding.weight", "vision_model/patch_embedding/kernel", rb.CONV2D),
            rb.Rule(v + "embeddings.position_embedding.weight", "vision_model/position_embedding/embedding"),
            *_layer_norm(v + "pre_layrnorm", "vision_model/pre_layrnorm"),
            *_tower_rules(v, "vision_model/"),
            *_layer_norm(v + "post_layernorm", "vision_model/post_layernorm"),
            rb.Ignore(v + "embeddings.position_ids", "recomputed"),
            rb.Rule("visual_projection.weight", "visual_projection/kernel", rb.LINEAR),
            rb.Rule("logit_scale", "logit_scale"),
        ]
    kind = "clip" if spec.vision is not None else "clip_text"
    return rb.RuleBook(kind if t == TEXT_PREFIX else kind + "(unprefixed)", rules)


def text_prefix_of(keys: Any, spec: clip_model.CLIPSpec) -> str:
    """The text tower's key prefix in a checkpoint with torch `keys`: always "text_model." for a CLIPModel; for a
    text-only folder "text_model." when its keys carry it, else ""."""
    if spec.vision is not None or any(k.startswith(TEXT_PREFIX) for k in keys):
        return TEXT_PREFIX
    return ""


def checkpoint_dir(path: str) -> str:
    """`path` itself, or `path/text_encoder` for a diffusers pipeline folder (e.g. SD 1.5's)."""
    p = epath.Path(path)
    if not (p / "config.json").exists() and (p / "text_encoder" / "config.json").exists():
        p = p / "text_encoder"
    return str(p)


def read_spec(path: str, **kw) -> clip_model.CLIPSpec:
    """`CLIPSpec` of the folder `path` (see `checkpoint_dir`) from its `config.json`; `kw`: dtype, param_dtype."""
    p = epath.Path(checkpoint_dir(path)) / "config.json"
    if not p.exists():
        raise cli.MissingInput(f"{p} does not exist; point the path at a transformers CLIPModel or CLIPTextModel "
                                f"folder (config.json + model.safetensors), e.g. openai/clip-vit-large-patch14")
    return clip_model.CLIPSpec.from_hf(json.loads(p.read_text()), where=str(p), **kw)


def param_template(spec: clip_model.CLIPSpec) -> dict:
    """`jax.ShapeDtypeStruct` tree of `CLIP(spec)`'s params (unboxed)."""
    ids, mask, images = clip_model.init_inputs(spec)
    variables = jax.eval_shape(clip_model.CLIP(spec).init, jax.random.key(0), ids, mask, images)
    return rb.unflatten(rb.flatten(variables["params"]))  # flatten unboxes the logical-partitioning metadata


def from_torch(state_dict: dict[str, Any], spec: clip_model.CLIPSpec) -> dict:
    """A transformers CLIP state dict ({key: numpy array}) -> `CLIP(spec)` params (numpy, float32 by default)."""
    book = rulebook(spec, text_prefix_of(state_dict, spec))
    return book.to_flax(state_dict, param_template(spec))


def to_torch(params: dict, spec: clip_model.CLIPSpec, torch_specs: dict[str, Any] | None = None,
             text_prefix: str = TEXT_PREFIX) -> dict[str, np.ndarray]:
    """`CLIP(spec)` params -> a transformers state dict of numpy arrays (with `torch_specs`, e.g. the target model's
    `state_dict()`, every key, shape and dtype is checked and the text prefix follows its keys)."""
    if torch_specs is not None:
        text_prefix = text_prefix_of(torch_specs, spec)
    return rulebook(spec, text_prefix).to_torch(params, torch_specs)


def load(path: str, *, dtype: str = "float32", param_dtype: str = "float32") -> tuple[clip_model.CLIPSpec, dict]:
    """`(spec, params)` of the transformers CLIP folder `path` (a diffusers pipeline folder means its
    `text_encoder/`), streamed tensor by tensor from the safetensors files. A missing, unexpected or mis-shaped
    tensor raises `rulebook.ConversionError` naming the file(s) and every offending key."""
    path = checkpoint_dir(path)
    spec = read_spec(path, dtype=dtype, param_dtype=param_dtype)
    try:
        reader = safetensors_io.SafetensorsReader(path)
    except FileNotFoundError as e:
        raise cli.MissingInput(f"{e} (PyTorch .bin checkpoints: re-save them with save_pretrained(..., "
                                f"safe_serialization=True))") from e
    book = rulebook(spec, text_prefix_of(reader.specs, spec))
    try:
        return spec, rb.stream_to_flax(book, reader, param_template(spec))
    except rb.ConversionError as e:
        raise rb.ConversionError(f"{', '.join(reader.files)}: not the CLIP model that {path}/config.json describes: "
                                 f"{e}") from e
