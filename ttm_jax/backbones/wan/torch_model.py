"""TTM's stage DiT in PyTorch: diffusers' `WanTransformer3DModel` plus the masked layers of
`ttm_jax.backbones.wan.model`.

`TTMWanTransformer3DModel` subclasses `WanTransformer3DModel` (so its backbone weights, `config` and key names are
diffusers' own) and adds, to each of the first `ttm_layers` blocks, TTM's two layers, exactly as the Flax DiT
(`ttm_jax/models/ttm_layers.py`: `MaskedSelfAttention`, `MaskedCrossAttention`):

  x += gate * attn1(norm1(x) * (1 + scale) + shift)                       diffusers' block, self-attention
  x  = x + masked_self_attn.attn(masked_self_attn.norm(x), rope)          token i attends j iff token_ids equal
  x += attn2(norm2(x), caption)                                           diffusers' block, cross-attention
  x  = x + masked_cross_attn.attn(masked_cross_attn.norm(x), local)       token i attends local token j iff
                                                                          sanitize(cross_token_ids)[i] == local_ids[j]
  x += c_gate * ffn(norm3(x) * (1 + c_scale) + c_shift)                   diffusers' block, feed-forward

Each added layer is an affine `FP32LayerNorm` (`norm`) and a diffusers `WanAttention` (`attn`: `to_q/to_k/to_v`,
`to_out.0`, RMS-normed q/k across heads; RoPE in the self one), so torch keys are
`blocks.{i}.masked_self_attn.{norm,attn}.*` and `blocks.{i}.masked_cross_attn.{norm,attn}.*`
(`ttm_jax/convert/export.py` maps them to the Flax tree). Masks are built from object ids (`ttm_jax/models/masks.py`
semantics): background 0, objects 1..K, local-prompt padding -1; a video token whose id has no local-prompt token
attends slot 0 (the caption), so no row is empty. `ttm_masked=False` is the unmasked TI2V twin (only padding masked).

Note: the masks are materialised densely (`[B, 1, N, N]` booleans for self-attention), as torch's SDPA takes them;
that is fine for parity checks and small videos, not for Wan's full 32k-token latents.

Folder layout (`save_pretrained` / `from_pretrained`, the same as `python -m ttm_jax.convert export` writes):
  config.json                          the backbone's `WanTransformer3DModel` config (in_channels = 3 * latent for
                                       stage models), so `WanTransformer3DModel.from_pretrained` loads the backbone
  diffusion_pytorch_model.safetensors  backbone weights, diffusers' keys
  ttm_layers.safetensors               the added layers' weights (absent when ttm_layers = 0)
  ttm_config.json                      {ttm_layers, ttm_masked, in_channels, latent_channels, stage, ...}
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor
from safetensors.torch import load_file, save_file

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
TTM_CONFIG_FILE = "ttm_config.json"
TTM_WEIGHTS_FILE = "ttm_layers.safetensors"
TTM_MODULES = ("masked_self_attn", "masked_cross_attn")


def is_ttm_key(key: str) -> bool:
    """True for the state-dict keys of the added layers (they go to `ttm_layers.safetensors`)."""
    return any(f".{m}." in key for m in TTM_MODULES)


class MaskedAttentionLayer(torch.nn.Module):
    """`x + attn(norm(x))`: TTM's added (masked) self- or cross-attention, zero-initialised at `attn.to_out.0`.

    x `[B, N, D]`; context `[B, Lk, D]` (None: self-attention); mask bool `[B, 1, N, Lk]` (True = may attend) or None.
    """

    def __init__(self, dim: int, num_heads: int, eps: float, cross: bool):
        super().__init__()
        head_dim = dim // num_heads
        self.norm = FP32LayerNorm(dim, eps, elementwise_affine=True)
        self.attn = WanAttention(dim=dim, heads=num_heads, dim_head=head_dim, eps=eps,
                                 cross_attention_dim_head=head_dim if cross else None, processor=WanAttnProcessor())
        torch.nn.init.zeros_(self.attn.to_out[0].weight)
        torch.nn.init.zeros_(self.attn.to_out[0].bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        h = self.norm(x.float()).type_as(x)
        return x + self.attn(h, context, mask, rotary_emb).type_as(x)


def sanitize_query_ids(q_ids: torch.Tensor, kv_ids: torch.Tensor) -> torch.Tensor:
    """`[B, Lq]`, `[B, Lk]` -> `[B, Lq]`: a query whose id has no key (or is negative) becomes 0, as
    `ttm_jax.models.masks.sanitize_query_ids` (dense comparison here)."""
    has = ((q_ids[:, :, None] == kv_ids[:, None, :]).any(-1)) & (q_ids >= 0)
    return torch.where(has, q_ids, torch.zeros_like(q_ids))


def allowed(q_ids: torch.Tensor, kv_ids: torch.Tensor) -> torch.Tensor:
    """bool `[B, 1, Lq, Lk]`: `q == kv and kv >= 0` (`ttm_jax.models.masks.allowed`, with a head axis)."""
    kv = kv_ids[:, None, :]
    return ((q_ids[:, :, None] == kv) & (kv >= 0))[:, None]


class TTMWanTransformer3DModel(WanTransformer3DModel):
    """diffusers' Wan transformer with TTM's masked layers in its first `ttm_layers` blocks (module docstring).

    Args: the `WanTransformer3DModel` config (`in_channels` = 3 * `latent_channels` for a stage model), plus
      ttm_layers: blocks 0..ttm_layers-1 get `masked_self_attn` and `masked_cross_attn`;
      ttm_masked: False drops the object masks of both added layers ("no masked attention"), keeping only
        local-prompt padding out; ttm_masked_self / ttm_masked_cross: False drops one of them (Table 3's rows);
      latent_channels, stage, condition_frames, self_condition: recorded in `ttm_config` (`save_pretrained` writes
        them), not used by the math; `condition_frames` says how the stage input's first-frame channels fill the
        latent frames (`first`: frame 0 then zeros, `all`: every frame, `indexed`: every frame plus a frame-place
        channel); `self_condition` that the input carries the previous sampling step's clean estimate right after
        the noisy latent (zeros at the first step).
    """

    def __init__(self, *, ttm_layers: int = 0, ttm_masked: bool = True, ttm_masked_self: bool = True,
                 ttm_masked_cross: bool = True, latent_channels: int | None = None, stage: int | None = None,
                 condition_frames: str | None = None, self_condition: bool | None = None, **wan_config: Any):
        super().__init__(**wan_config)
        cfg = self.config
        num_layers = int(cfg.num_layers)
        if not 0 <= ttm_layers <= num_layers:
            raise ValueError(f"TTMWanTransformer3DModel: ttm_layers={ttm_layers} must be in [0, num_layers="
                             f"{num_layers}] ({TTM_CONFIG_FILE}: ttm_layers)")
        if cfg.added_kv_proj_dim is not None or cfg.image_dim is not None:
            raise ValueError(f"TTMWanTransformer3DModel: image_dim / added_kv_proj_dim are set ({CONFIG_FILE}); TTM "
                             f"extends the T2V transformer, set them to null")
        dim = int(cfg.num_attention_heads) * int(cfg.attention_head_dim)
        for i in range(ttm_layers):
            block = self.blocks[i]
            block.masked_self_attn = MaskedAttentionLayer(dim, int(cfg.num_attention_heads), float(cfg.eps), False)
            block.masked_cross_attn = MaskedAttentionLayer(dim, int(cfg.num_attention_heads), float(cfg.eps), True)
        self.ttm_config = {"ttm_layers": int(ttm_layers), "ttm_masked": bool(ttm_masked),
                           "ttm_masked_self": bool(ttm_masked_self), "ttm_masked_cross": bool(ttm_masked_cross),
                           "in_channels": int(cfg.in_channels), "latent_channels": latent_channels,
                           "out_channels": int(cfg.out_channels), "stage": stage,
                           "condition_frames": condition_frames, "self_condition": self_condition}

    @property
    def ttm_layers(self) -> int:
        return int(self.ttm_config["ttm_layers"])

    # ------------------------------------------------------------------------------------------------- forward

    def _check(self, name: str, x: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
        if x is None:
            raise ValueError(f"TTMWanTransformer3DModel.forward: ttm_layers={self.ttm_layers} with masked added "
                             f"layers needs {name} {list(shape)} (ttm_jax/models/masks.py builds the ids)")
        if tuple(x.shape) != shape:
            raise ValueError(f"TTMWanTransformer3DModel.forward: {name} must be {list(shape)}, got {list(x.shape)}")
        return x

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                local_hidden_states: torch.Tensor | None = None, token_ids: torch.Tensor | None = None,
                cross_token_ids: torch.Tensor | None = None, local_ids: torch.Tensor | None = None,
                return_dict: bool = True, **unused: Any) -> Any:
        """hidden_states `[B, C_in, T', H', W']` (torch layout; the stage's channel-concatenated input), timestep
        `[B]` (0..1000), encoder_hidden_states `[B, Lc, text_dim]`; local_hidden_states `[B, S*Lp, text_dim]` (local
        prompts, slot 0 = caption), token_ids / cross_token_ids int `[B, N]` (N = tokens in (t, h, w) order),
        local_ids int `[B, S*Lp]` (-1 = padding) -> `[B, C_out, T', H', W']` (`.sample` unless return_dict=False)."""
        if unused.get("encoder_hidden_states_image") is not None:
            raise ValueError("TTMWanTransformer3DModel.forward: encoder_hidden_states_image is not supported (T2V)")
        b, _, t, h, w = hidden_states.shape
        pt, ph, pw = self.config.patch_size
        f, gh, gw = t // pt, h // ph, w // pw
        n = f * gh * gw
        k = self.ttm_layers
        masked = bool(self.ttm_config["ttm_masked"])
        mask_self = masked and bool(self.ttm_config.get("ttm_masked_self", True))
        mask_cross = masked and bool(self.ttm_config.get("ttm_masked_cross", True))

        rotary_emb = self.rope(hidden_states)
        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
        temb, timestep_proj, context, _ = self.condition_embedder(timestep, encoder_hidden_states, None)
        timestep_proj = timestep_proj.unflatten(1, (6, -1))

        local = self_mask = cross_mask = None
        if k:
            if local_hidden_states is None:
                raise ValueError(f"TTMWanTransformer3DModel.forward: ttm_layers={k} needs local_hidden_states "
                                 f"[B, S*Lp, text_dim] (local prompt embeddings, slot 0 = caption)")
            local = self.condition_embedder.text_embedder(local_hidden_states)
            ll = local_hidden_states.shape[1]
            if mask_self:
                token_ids = self._check("token_ids", token_ids, (b, n))
                self_mask = allowed(token_ids, token_ids)
            if mask_cross:
                cross_token_ids = self._check("cross_token_ids", cross_token_ids, (b, n))
                local_ids = self._check("local_ids", local_ids, (b, ll))
                cross_mask = allowed(sanitize_query_ids(cross_token_ids, local_ids), local_ids)
            elif local_ids is not None:
                cross_mask = (local_ids >= 0)[:, None, None, :].expand(b, 1, n, ll)

        for i, block in enumerate(self.blocks):
            if i < k:
                x = self._ttm_block(block, x, context, timestep_proj, rotary_emb, local, self_mask, cross_mask)
            else:
                x = block(x, context, timestep_proj, rotary_emb)

        shift, scale = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (self.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = self.proj_out(x)
        x = x.reshape(b, f, gh, gw, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    @staticmethod
    def _ttm_block(block: torch.nn.Module, x: torch.Tensor, context: torch.Tensor, temb: torch.Tensor,
                   rotary_emb: Any, local: torch.Tensor, self_mask: torch.Tensor | None,
                   cross_mask: torch.Tensor | None) -> torch.Tensor:
        """diffusers' `WanTransformerBlock.forward` (Wan 2.1 `[B, 6, D]` modulation) with the two layers inserted."""
        shift, scale, gate, c_shift, c_scale, c_gate = (block.scale_shift_table + temb.float()).chunk(6, dim=1)
        hn = (block.norm1(x.float()) * (1 + scale) + shift).type_as(x)
        x = (x.float() + block.attn1(hn, None, None, rotary_emb) * gate).type_as(x)
        x = block.masked_self_attn(x, None, self_mask, rotary_emb)
        hn = block.norm2(x.float()).type_as(x)
        x = x + block.attn2(hn, context, None, None)
        x = block.masked_cross_attn(x, local, cross_mask, None)
        hn = (block.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
        return (x.float() + block.ffn(hn).float() * c_gate).type_as(x)

    # ------------------------------------------------------------------------------------------------ folders

    def wan_config(self) -> dict[str, Any]:
        """The backbone's `WanTransformer3DModel` config dict (what `config.json` holds)."""
        names = inspect.signature(WanTransformer3DModel.__init__).parameters
        cfg = {k: v for k, v in dict(self.config).items() if k in names}
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
        return {"_class_name": "WanTransformer3DModel", **cfg}

    def save_pretrained(self, save_directory: str, **unused: Any) -> None:  # noqa: D102 - module docstring
        os.makedirs(save_directory, exist_ok=True)
        state = {key: v.detach().contiguous() for key, v in self.state_dict().items()}
        backbone = {key: v for key, v in state.items() if not is_ttm_key(key)}
        ttm = {key: v for key, v in state.items() if is_ttm_key(key)}
        with open(os.path.join(save_directory, CONFIG_FILE), "w") as fh:
            json.dump(self.wan_config(), fh, indent=2)
        save_file(backbone, os.path.join(save_directory, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(save_directory, TTM_CONFIG_FILE), "w") as fh:
            json.dump(self.ttm_config, fh, indent=2)
        if ttm:
            save_file(ttm, os.path.join(save_directory, TTM_WEIGHTS_FILE), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, torch_dtype: torch.dtype | None = None,
                        **unused: Any) -> TTMWanTransformer3DModel:
        """Loads an exported folder (module docstring); every tensor must be present (strict)."""
        folder = str(pretrained_model_name_or_path)
        cfg_file = os.path.join(folder, CONFIG_FILE)
        if not os.path.isfile(cfg_file):
            raise FileNotFoundError(f"{cfg_file}: not found; export a TTM checkpoint first "
                                    f"(python -m ttm_jax.convert export --from=workdir:DIR --to=torch:{folder})")
        with open(cfg_file) as fh:
            wan = json.load(fh)
        names = inspect.signature(WanTransformer3DModel.__init__).parameters
        wan = {k: v for k, v in wan.items() if k in names and k != "self"}
        ttm: dict[str, Any] = {}
        ttm_file = os.path.join(folder, TTM_CONFIG_FILE)
        if os.path.isfile(ttm_file):
            with open(ttm_file) as fh:
                ttm = json.load(fh)
            if ttm.get("in_channels") is not None and int(ttm["in_channels"]) != int(wan.get("in_channels", 16)):
                raise ValueError(f"{ttm_file}: in_channels={ttm['in_channels']} but {cfg_file} has "
                                 f"in_channels={wan.get('in_channels')}; re-export the folder")
        model = cls(ttm_layers=int(ttm.get("ttm_layers", 0)), ttm_masked=bool(ttm.get("ttm_masked", True)),
                    ttm_masked_self=bool(ttm.get("ttm_masked_self", True)),
                    ttm_masked_cross=bool(ttm.get("ttm_masked_cross", True)),
                    latent_channels=ttm.get("latent_channels"), stage=ttm.get("stage"),
                    condition_frames=ttm.get("condition_frames"), self_condition=ttm.get("self_condition"), **wan)
        state = load_file(os.path.join(folder, WEIGHTS_FILE))
        if model.ttm_layers:
            state.update(load_file(os.path.join(folder, TTM_WEIGHTS_FILE)))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{folder}: weights do not match the config: missing {sorted(missing)[:10]}, "
                             f"unexpected {sorted(unexpected)[:10]}")
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        return model.eval()
