"""`upgrade(saved)`: a config saved by an older version of this code, completed so that today's code reads every field
as an attribute and reproduces the saved run.

`UPGRADES` lists, section by section, each field added after runs had been saved, with the value that gives the
behaviour those runs had before it existed (what the code read in its absence). That is not always today's default:
`data.min_object_area` was 0 (every object could be chosen) before the 0.002 floor, `data.synthetic_rung` the full set
(4) before the ladder, `text_encoder.name` "t5" before the CLIP text tower. `runtime/checkpoint.py` applies it to every
config it reads back (a checkpoint's, `config.json`), so nothing downstream needs `config.get(field, default)`.
A new field is one entry here when the runs saved before it must keep behaving as they did.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from ttm_jax.config.schema import SYNTHETIC_FULL_RUNG

# section -> field -> the value a config saved before the field existed ran with
UPGRADES: dict[str, dict[str, Any]] = {
    "model": {
        "backbone": "dit",  # the DiT was the only backbone
        "condition_frames": "first",  # latent frame 0 only (Wan I2V); stage 1 configs saved it as "all"
        "self_condition": False,
        "stage1_later_ids": "background",  # later latent frames read slot 0 (the background's prompt)
        "attention_sparse": False,
        "context_impl": "ulysses",  # (unused unless mesh.context > 1, which did not exist either)
        "scan_unroll": 0,  # per backend
    },
    "autoencoder": {
        "path": "",
        "dtype": "float32",
        "chunk_frames": 1,
        "scaling_factor": 1.0,  # the raw latents (`IDENTITY_LATENT_NORM`)
        "shift_factor": 0.0,
    },
    "text_encoder": {
        "name": "t5",  # a T5 (the tokenizer chose ByT5 / word / sentencepiece) before the CLIP tower
        "feed_forward": "gated-gelu",
        "dtype": "float32",
        "param_dtype": "float32",
        "tokenizer_path": "",
        "path": "",
    },
    "data": {
        "synthetic_rung": SYNTHETIC_FULL_RUNG,  # the full synthetic set, before the ladder of rungs
        "cached": False,
        "read_threads": 4,
        "missing_captions": "skip",
        "annotation": "manual",
        "crop": "center",
        "min_object_area": 0.0,  # no floor on an object's first-frame area (today's default: 0.002)
        "motion_weight": 1.0,
    },
    "train": {
        "async_checkpointing": True,
        "compiler_options": {},  # XLA's defaults
        "init_from": "",
        "tensorboard": True,
    },
    "optim": {
        "cooldown_steps": 0,  # constant learning rate after the warm-up
        "cooldown_fraction": 0.0,
        "ema_decay": 0.0,
    },
    "objective": {
        "name": "rectified_flow",  # the only objective before DDIM v-prediction; its fields below are DDIM's
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "rescale_zero_terminal_snr": True,
        "timestep_spacing": "trailing",
    },
    "mesh": {
        "distributed": "auto",
        "context": 1,  # no context parallelism
        "shard_unannotated": True,
    },
    "sample": {
        "shift": 1.0,  # training samples on the unshifted time grid
    },
}


def upgrade(saved: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`saved` with every `UPGRADES` field it lacks set to its backward-compatible value, in place; returns it.
    Fields it has are never touched; a section it lacks entirely is left absent (not a run config's section)."""
    with saved.unlocked():
        for section, fields in UPGRADES.items():
            if section not in saved:
                continue
            sec = saved[section]
            for field, value in fields.items():
                if field not in sec:
                    sec[field] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    return saved
