"""transformers T5 / mT5 / umT5 encoders <-> `ttm_jax.models.text_encoder.T5Encoder`, through one rulebook.

A checkpoint is a transformers folder: `config.json` plus `model.safetensors` or sharded
`model-0000k-of-0000n.safetensors` with `model.safetensors.index.json` (e.g. the `text_encoder/` folder of
`Wan-AI/Wan2.1-T2V-1.3B-Diffusers`, a umT5-XXL encoder, or any `T5EncoderModel.save_pretrained`). Full seq2seq
checkpoints load too: their decoder and LM head are ignored.

    params = t5.load_params(config.text_encoder, "<folder>")  # numpy params, config.json checked against the config
    state_dict = t5.to_torch(params, config.text_encoder)    # and back: {torch key: numpy array}
    params = t5.load_or_init(config.text_encoder, seed)       # path empty: random (tiny configs)

`config.text_encoder.path` may name such a folder or an Orbax checkpoint of converted params; training and sampling
read it in `ttm_jax.assembly.frozen.load_text_encoder` (`is_transformers_checkpoint` tells the two apart).
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from ttm_jax import cli
from ttm_jax.models import text_encoder
from ttm_jax.weights import rulebook as rb
from ttm_jax.weights import safetensors_io

_BLOCK = "encoder.block.{i}.layer."


def rulebook(per_layer_bias: bool) -> rb.RuleBook:
    """The rules for a T5-family encoder; `per_layer_bias` (umT5): a relative-position bias in every layer."""
    rules: list[rb.Rule | rb.Ignore] = [
        # T5EncoderModel's state dict holds the tied embedding twice
        rb.Rule("shared.weight", "embedding/embedding", aliases=("encoder.embed_tokens.weight",)),
        rb.Rule(_BLOCK + "0.layer_norm.weight", "layers/attention_norm/scale", stack="i"),
        *[rb.Rule(_BLOCK + f"0.SelfAttention.{n}.weight", f"layers/attention/{n}/kernel", rb.LINEAR, stack="i")
          for n in "qkvo"],
        rb.Rule(_BLOCK + "1.layer_norm.weight", "layers/ffn_norm/scale", stack="i"),
        *[rb.Rule(_BLOCK + f"1.DenseReluDense.{n}.weight", f"layers/ffn/{n}/kernel", rb.LINEAR, stack="i")
          for n in ("wi_0", "wi_1", "wo")],
        rb.Rule("encoder.final_layer_norm.weight", "final_norm/scale"),
        rb.Ignore("decoder.*", "encoder only"),
        rb.Ignore("lm_head.weight", "encoder only"),
    ]
    if per_layer_bias:
        rules.append(rb.Rule(_BLOCK + "0.SelfAttention.relative_attention_bias.weight",
                             "layers/relative_bias/embedding", stack="i"))
    else:
        rules.append(rb.Rule("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                             "relative_bias/embedding"))
    return rb.RuleBook("umt5" if per_layer_bias else "t5", rules)


# transformers config.json field -> config.text_encoder field
_FIELDS = {"vocab_size": "vocab_size", "d_model": "d_model", "num_layers": "num_layers", "num_heads": "num_heads",
           "d_kv": "d_kv", "d_ff": "d_ff", "relative_attention_num_buckets": "relative_attention_num_buckets",
           "relative_attention_max_distance": "relative_attention_max_distance", "layer_norm_epsilon": "eps"}


def checkpoint_dir(path: str) -> str:
    """`path` itself, or `path/text_encoder` for a diffusers pipeline folder (e.g. Wan2.1-T2V-1.3B-Diffusers)."""
    p = epath.Path(path)
    if not (p / "config.json").exists() and (p / "text_encoder" / "config.json").exists():
        p = p / "text_encoder"
    return str(p)


def is_transformers_checkpoint(path: str) -> bool:
    """Whether `path` is a transformers encoder folder (or a diffusers pipeline folder holding one)."""
    return bool(path) and (epath.Path(checkpoint_dir(path)) / "config.json").exists()


def read_hf_config(path: str) -> dict:
    """`<path>/config.json` of a transformers T5-family checkpoint (see `checkpoint_dir`)."""
    p = epath.Path(checkpoint_dir(path)) / "config.json"
    if not p.exists():
        raise cli.MissingInput(f"config.text_encoder.path: {p} does not exist; point the path at a transformers "
                                f"encoder folder (config.json + *.safetensors), e.g. <Wan2.1-Diffusers>/text_encoder")
    return json.loads(p.read_text())


def config_from_hf(hf: dict, base: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """`config.text_encoder` fields for a transformers config dict (`base`'s other fields kept)."""
    kind = hf.get("model_type")
    if kind not in ("t5", "mt5", "umt5"):
        raise cli.BadInput(f"config.json: model_type {kind!r} is not a T5-family encoder (t5, mt5, umt5)")
    ff = hf.get("feed_forward_proj", "relu")
    if ff != "gated-gelu":
        raise cli.BadInput(f"config.json: feed_forward_proj {ff!r}; only 'gated-gelu' encoders (T5 v1.1, mT5, ByT5, "
                         f"umT5) are supported, not the original T5's ReLU FFN")
    out = ml_collections.ConfigDict(base.to_dict() if base is not None else {})
    for src, dst in _FIELDS.items():
        out[dst] = hf[src]
    out.name = kind
    out.per_layer_bias = kind == "umt5"
    out.feed_forward = "gated-gelu"
    return out


def check_config(config: ml_collections.ConfigDict, hf: dict, where: str = "config.json") -> None:
    """Raise naming each `config.text_encoder` field that disagrees with the checkpoint's `config.json`."""
    want = config_from_hf(hf)
    bad = [f"config.text_encoder.{f}={config[f]!r} but {where} has {want[f]!r}"
           for f in (*_FIELDS.values(), "per_layer_bias") if config[f] != want[f]]
    if bad:
        raise cli.BadInput("text encoder checkpoint does not match the config: " + "; ".join(bad) +
                         "; set these fields to the checkpoint's values")


def param_template(config: Any) -> dict:
    """`jax.ShapeDtypeStruct` tree of `T5Encoder(config)`'s params (unboxed)."""
    model = text_encoder.T5Encoder(config)
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    mask = jax.ShapeDtypeStruct((1, 8), jnp.bool_)
    variables = jax.eval_shape(model.init, jax.random.key(0), ids, mask)
    return rb.unflatten(rb.flatten(variables["params"]))  # flatten unboxes the logical-partitioning metadata


def from_torch(state_dict: dict[str, Any], config: Any) -> dict:
    """A transformers encoder state dict ({key: numpy array}) -> `T5Encoder` params (numpy, template dtypes)."""
    spec = text_encoder.T5Spec.from_config(config)
    return rulebook(spec.per_layer_bias).to_flax(state_dict, param_template(config))


def to_torch(params: dict, config: Any, torch_specs: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """`T5Encoder` params -> transformers encoder state dict of numpy arrays (with `torch_specs`, e.g. the target
    model's `state_dict()`, every key, shape and dtype is checked)."""
    spec = text_encoder.T5Spec.from_config(config)
    return rulebook(spec.per_layer_bias).to_torch(params, torch_specs)


def load_params(config: ml_collections.ConfigDict, path: str) -> dict:
    """Params for `config.text_encoder` from the transformers folder `path` (a diffusers pipeline folder means its
    `text_encoder/`), streamed tensor by tensor from memory-mapped safetensors; `config.json` must agree with the
    config."""
    path = checkpoint_dir(path)
    hf = read_hf_config(path)
    check_config(config, hf, f"{path}/config.json")
    try:
        reader = safetensors_io.SafetensorsReader(path)
    except FileNotFoundError as e:
        raise cli.MissingInput(f"config.text_encoder.path: {e} (PyTorch .bin checkpoints: re-save them with "
                                f"save_pretrained(..., safe_serialization=True))") from e
    return rb.stream_to_flax(rulebook(bool(config.per_layer_bias)), reader, param_template(config))


def load_or_init(config: ml_collections.ConfigDict, seed: int) -> dict:
    """The frozen encoder's params: converted from the transformers folder `config.path`, or random from `seed`
    when the path is empty."""
    path = config.get("path", "")
    if not path:
        return text_encoder.init_params(config, jax.random.key(seed))
    if not is_transformers_checkpoint(path):
        raise cli.BadInput(f"config.text_encoder.path: {path} has no config.json, so it is not a transformers encoder "
                         f"folder; load an Orbax checkpoint of converted params with Orbax, or point the path at "
                         f"the transformers folder")
    return load_params(config, path)
