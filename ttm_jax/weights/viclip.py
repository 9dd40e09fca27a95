"""InternVideo ViCLIP checkpoints -> `ttm_jax.models.viclip.ViCLIP`, through one rulebook.

The checkpoint is the public release of `OpenGVLab/InternVideo: Data/InternVid/viclip` (e.g.
`ViClip-InternVid-10M-FLT.pth`, ViCLIP-L/14), at a path the user gives; nothing is downloaded. Accepted files:

- a torch pickle (`.pth` / `.pt` / `.bin`) holding the state dict, or a dict with it under `"model"` (the release's
  layout: the reference loads `torch.load(path)["model"]`) or `"state_dict"`; read with `torch.load(...,
  weights_only=True)` (no code runs), so a pickle with other objects needs `allow_pickle=True` (trusted files only);
- a safetensors file (or a folder holding one), e.g. the state dict re-saved with `safetensors.torch.save_file`.

Keys (the reference `ViCLIP` module's `state_dict()`; `{i}` a layer index):

    temp                                                   -> temp
    vision_encoder.conv1.weight [D, 3, kt, p, p]          -> vision_encoder/conv1/kernel (CONV3D)
    vision_encoder.{class_embedding, positional_embedding, temporal_positional_embedding, proj}
    vision_encoder.{ln_pre, ln_post}.{weight, bias}        -> .../{scale, bias}
    text_encoder.{token_embedding.weight, positional_embedding, text_projection}, text_encoder.ln_final.*
    <tower>.transformer.resblocks.{i}.attn.in_proj_{weight,bias}  -> .../self_attn/{q,k,v}_proj (split in 3)
    <tower>.transformer.resblocks.{i}.attn.out_proj.*, mlp.c_fc.*, mlp.c_proj.*, ln_1.*, ln_2.*
                                                           -> .../self_attn/out_proj, fc1, fc2, layer_norm1/2

`proj` and `text_projection` are `[width, embed_dim]` matrices used as `x @ proj`: they are Dense kernels as they
are (no transpose). The spec (widths, layers, patch size, frames, vocabulary, context length) is read from the
tensor shapes; the head count, which shapes do not give, is `width // head_dim` (64 in every released ViCLIP).

    spec, params = viclip.load("<ViClip-InternVid-10M-FLT.pth>")
    state_dict = viclip.to_torch(params, spec)            # and back: {torch key: numpy array}

A missing, unexpected or mis-shaped tensor raises `rulebook.ConversionError` naming the file and every offending
key, before any tensor is converted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import ml_dtypes
import numpy as np
from etils import epath

from ttm_jax import cli
from ttm_jax.models import clip as clip_model
from ttm_jax.models import viclip as viclip_model
from ttm_jax.weights import rulebook as rb
from ttm_jax.weights import safetensors_io

VISION, TEXT = "vision_encoder.", "text_encoder."
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def _layer_norm(torch_key: str, flax_path: str, stack: str | None = None) -> list[rb.Rule]:
    return [rb.Rule(f"{torch_key}.weight", f"{flax_path}/scale", stack=stack),
            rb.Rule(f"{torch_key}.bias", f"{flax_path}/bias", stack=stack)]


def _tower_rules(torch_prefix: str, flax_prefix: str) -> list[rb.Rule]:
    layer = torch_prefix + "transformer.resblocks.{i}."
    fl = flax_prefix + "transformer/layers/"
    qkv = tuple(fl + f"self_attn/{n}_proj/" for n in "qkv")
    return [
        # nn.MultiheadAttention's fused input projection: rows [q; k; v]
        rb.Rule(layer + "attn.in_proj_weight", tuple(p + "kernel" for p in qkv), rb.LINEAR, stack="i", fuse_axis=0),
        rb.Rule(layer + "attn.in_proj_bias", tuple(p + "bias" for p in qkv), stack="i", fuse_axis=0),
        rb.Rule(layer + "attn.out_proj.weight", fl + "self_attn/out_proj/kernel", rb.LINEAR, stack="i"),
        rb.Rule(layer + "attn.out_proj.bias", fl + "self_attn/out_proj/bias", stack="i"),
        rb.Rule(layer + "mlp.c_fc.weight", fl + "fc1/kernel", rb.LINEAR, stack="i"),
        rb.Rule(layer + "mlp.c_fc.bias", fl + "fc1/bias", stack="i"),
        rb.Rule(layer + "mlp.c_proj.weight", fl + "fc2/kernel", rb.LINEAR, stack="i"),
        rb.Rule(layer + "mlp.c_proj.bias", fl + "fc2/bias", stack="i"),
        *_layer_norm(layer + "ln_1", fl + "layer_norm1", stack="i"),
        *_layer_norm(layer + "ln_2", fl + "layer_norm2", stack="i"),
    ]


def rulebook() -> rb.RuleBook:
    """The ViCLIP conversion table (the same for every size: shapes come from the spec's template)."""
    v, t = VISION, TEXT
    return rb.RuleBook("viclip", [
        rb.Rule("temp", "temp"),
        rb.Rule(v + "conv1.weight", "vision_encoder/conv1/kernel", rb.CONV3D),
        rb.Rule(v + "class_embedding", "vision_encoder/class_embedding"),
        rb.Rule(v + "positional_embedding", "vision_encoder/positional_embedding"),
        rb.Rule(v + "temporal_positional_embedding", "vision_encoder/temporal_positional_embedding"),
        *_layer_norm(v + "ln_pre", "vision_encoder/ln_pre"),
        *_tower_rules(v, "vision_encoder/"),
        *_layer_norm(v + "ln_post", "vision_encoder/ln_post"),
        rb.Rule(v + "proj", "vision_encoder/proj/kernel"),
        rb.Rule(t + "token_embedding.weight", "text_encoder/token_embedding/embedding"),
        rb.Rule(t + "positional_embedding", "text_encoder/positional_embedding"),
        *_tower_rules(t, "text_encoder/"),
        *_layer_norm(t + "ln_final", "text_encoder/ln_final"),
        rb.Rule(t + "text_projection", "text_encoder/text_projection/kernel"),
    ])


def _num_layers(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> int:
    rx = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    found = {int(m.group(1)) for k in shapes if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def read_spec(shapes: Mapping[str, Any], *, where: str = "state dict", head_dim: int = 64,
              dtype: str = "float32", param_dtype: str = "float32") -> viclip_model.ViCLIPSpec:
    """The `ViCLIPSpec` of a state dict, from its tensor shapes (`shapes`: {key: array, torch tensor or shape});
    heads = width // `head_dim`. Raises `rulebook.ConversionError` naming `where` and the key that is missing or
    mis-shaped."""
    shapes = {k: rb.spec_of(v)[0] for k, v in shapes.items()}

    def get(key: str, ndim: int) -> tuple[int, ...]:
        if key not in shapes:
            raise rb.ConversionError(f"{where}: missing key {key!r}; is this an InternVideo ViCLIP checkpoint (keys "
                                     f"'vision_encoder.*', 'text_encoder.*', 'temp')?")
        if len(shapes[key]) != ndim:
            raise rb.ConversionError(f"{where}: key {key!r} has shape {shapes[key]}, expected a {ndim}-d tensor "
                                     f"(InternVideo ViCLIP layout)")
        return shapes[key]

    def tower(prefix: str, width: int) -> clip_model.TowerSpec:
        layers = _num_layers(shapes, prefix)
        if not layers:
            raise rb.ConversionError(f"{where}: no '{prefix}transformer.resblocks.<i>.*' keys; is this an InternVideo "
                                     f"ViCLIP checkpoint?")
        hidden = get(f"{prefix}transformer.resblocks.0.mlp.c_fc.weight", 2)[0]
        if width % head_dim:
            raise rb.ConversionError(f"{where}: {prefix[:-1]} width {width} is not a multiple of head_dim {head_dim}; "
                                     f"pass the checkpoint's head_dim")
        return clip_model.TowerSpec(hidden_size=width, intermediate_size=hidden, num_layers=layers,
                                    num_heads=width // head_dim, hidden_act="quick_gelu", eps=1e-5)

    conv = get(VISION + "conv1.weight", 5)  # [D, 3, kt, p, p]
    pos = get(VISION + "positional_embedding", 2)
    temporal = get(VISION + "temporal_positional_embedding", 3)
    proj = get(VISION + "proj", 2)
    width, patch = conv[0], conv[-1]
    grid = round((pos[0] - 1) ** 0.5)
    if grid * grid + 1 != pos[0]:
        raise rb.ConversionError(f"{where}: key {VISION}positional_embedding has {pos[0]} rows, not 1 + a square "
                                 f"number of patches")
    vision = viclip_model.VisionSpec(tower(VISION, width), image_size=grid * patch, patch_size=patch,
                                     num_frames=temporal[1], kernel_size=conv[2])
    tok = get(TEXT + "token_embedding.weight", 2)
    text_pos = get(TEXT + "positional_embedding", 2)
    text_proj = get(TEXT + "text_projection", 2)
    text = viclip_model.TextSpec(tower(TEXT, tok[1]), vocab_size=tok[0], context_length=text_pos[0])
    if proj[1] != text_proj[1]:
        raise rb.ConversionError(f"{where}: {VISION}proj ends in {proj[1]} features, {TEXT}text_projection in "
                                 f"{text_proj[1]}; the two embeddings must have one width")
    return viclip_model.ViCLIPSpec(vision=vision, text=text, embed_dim=proj[1], dtype=dtype, param_dtype=param_dtype)


def param_template(spec: viclip_model.ViCLIPSpec) -> dict:
    """`jax.ShapeDtypeStruct` tree of `ViCLIP(spec)`'s params (unboxed)."""
    frames, ids = viclip_model.init_inputs(spec)
    variables = jax.eval_shape(viclip_model.ViCLIP(spec).init, jax.random.key(0), frames, ids)
    return rb.unflatten(rb.flatten(variables["params"]))  # flatten unboxes the logical-partitioning metadata


def from_torch(state_dict: Mapping[str, Any], spec: viclip_model.ViCLIPSpec) -> dict:
    """A ViCLIP state dict ({key: numpy array}) -> `ViCLIP(spec)` params (numpy, in the spec's param dtype)."""
    return rulebook().to_flax(state_dict, param_template(spec))


def to_torch(params: dict, spec: viclip_model.ViCLIPSpec,
             torch_specs: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """`ViCLIP(spec)` params -> the reference state dict as numpy arrays (with `torch_specs`, e.g. the reference
    model's `state_dict()`, every key, shape and dtype is checked)."""
    del spec  # the rules are size-independent; kept for symmetry with from_torch
    out = rulebook().to_torch(params, torch_specs)
    out["temp"] = out["temp"].reshape(())  # a 0-d tensor (the rulebook's contiguous copy makes it 1-d)
    return out


def _to_numpy(x: Any) -> np.ndarray:
    if getattr(x, "dtype", None) is not None and str(x.dtype) == "torch.bfloat16":
        import torch  # the tensor is a torch one already: torch is loaded

        return x.detach().cpu().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return rb.as_numpy(x)


def read_state_dict(path: str, *, allow_pickle: bool = False) -> Mapping[str, Any]:
    """The state dict in the file `path`: a torch pickle (its `"model"` / `"state_dict"` entry when wrapped) or
    safetensors (a file or a folder holding one). Values are torch tensors or (lazy) numpy arrays."""
    p = epath.Path(path)
    if not p.exists():
        raise cli.MissingInput(f"{p} does not exist; point the path at the InternVideo ViCLIP checkpoint, e.g. "
                                f"ViClip-InternVid-10M-FLT.pth (a torch .pth or a safetensors file)")
    if p.is_dir() or p.suffix == ".safetensors":
        return safetensors_io.SafetensorsReader(str(p))
    if p.suffix not in PICKLE_SUFFIXES:
        raise cli.BadInput(f"{p}: unknown checkpoint format {p.suffix!r}; expected a torch pickle "
                         f"({', '.join(PICKLE_SUFFIXES)}) or .safetensors")
    import torch  # optional dependency: only to read torch pickles

    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=not allow_pickle, mmap=True)
    except RuntimeError:  # an old (non-zip) pickle cannot be memory-mapped
        obj = torch.load(str(p), map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:
        if allow_pickle:
            raise
        raise cli.BadInput(f"{p}: torch.load(weights_only=True) refused it ({type(e).__name__}: {e}); if you trust the "
                         f"file pass allow_pickle=True, or re-save its state dict with safetensors") from e
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping):
        raise cli.BadInput(f"{p}: holds a {type(obj).__name__}, not a state dict (a dict of tensors, or one under "
                         f"'model')")
    return obj


def load(path: str, *, head_dim: int = 64, allow_pickle: bool = False, dtype: str = "float32",
         param_dtype: str = "float32") -> tuple[viclip_model.ViCLIPSpec, dict]:
    """`(spec, params)` of the ViCLIP checkpoint at `path` (see the module docstring); the spec comes from the
    tensor shapes. Every key must be consumed and every shape match, or `rulebook.ConversionError` names them."""
    state = read_state_dict(path, allow_pickle=allow_pickle)
    specs = getattr(state, "specs", None)
    if specs is None:
        specs = {k: rb.spec_of(v) for k, v in state.items()}
    spec = read_spec(specs, where=str(path), head_dim=head_dim, dtype=dtype, param_dtype=param_dtype)
    try:
        params = rb.stream_to_flax(rulebook(), {k: _to_numpy(v) for k, v in state.items()}
                                   if not hasattr(state, "specs") else state, param_template(spec), specs)
    except rb.ConversionError as e:
        raise rb.ConversionError(f"{path}: not an InternVideo ViCLIP checkpoint of the shapes its own tensors give "
                                 f"({spec.vision.tower.num_layers} vision / {spec.text.tower.num_layers} text layers):"
                                 f" {e}") from e
    return spec, params
