"""Shared pieces of the training tests (imported by tests/test_train_*.py and their subprocesses).

- `tiny_config(stage)`: the real config, shrunk to 5 frames of 16x16 (8 video tokens), a 2-layer DiT of width 32;
- `make_modules(config)`: the real autoencoder, tokenizer and T5 encoder; the real DiT or `StandInDiT`;
- `make_iterator`: a real Grain `IterDataset` pipeline of synthetic examples in the batch contract of
  CONTRIBUTING.md, each carrying its `example_id`, split across processes exactly as a global batch is split across
  devices (process p gets rows [p B/P, (p+1) B/P) of the global batch);
- `RecordingIterator`: a Grain `DatasetIterator` that appends the example ids of every batch it hands out to a file,
  so a test can prove which examples a (killed, resumed) run consumed.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ttm_jax import config as config_lib
from ttm_jax.assembly import modules as modules_lib
from ttm_jax.assembly import registry
from ttm_jax.backbones.wan import model as dit
from ttm_jax.models import text_encoder, tokenizer

NUM_EXAMPLES = 64


def tiny_config(stage: int = 2, **overrides: Any) -> ml_collections.ConfigDict:
    c = config_lib.build(stage, "tiny")
    c.model.update(dim=32, num_layers=2, num_heads=2, ffn_dim=64, text_dim=16, freq_dim=16)
    c.model.ttm_layers = 1 if stage == 2 else 0
    c.text_encoder.update(d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32, max_length=8, local_max_length=4)
    c.data.update(num_frames=5, height=16, width=16, max_objects=2)
    # 8 video tokens: space_to_depth 4x4x4 (192 channels) and 1x2x2 patches, whatever the tiny default's geometry
    c.autoencoder.update(time_factor=4, space_factor=4, latent_channels=192, scaling_factor=1.0, shift_factor=0.0)
    c.model.patch_size = (1, 2, 2)
    # the same objective and schedule for every stage (the tiny stage 1's own ddim_v / cooldown are tested apart)
    c.objective.update(name="rectified_flow", shift=1.0)
    c.optim.cooldown_steps = 0
    c.optim.cooldown_fraction = 0.0
    c.data.synthetic_num_videos = 64
    c.train.update(batch_size=8, total_steps=3, checkpoint_every_steps=100, log_every_steps=1, sample_every_steps=0,
                   tensorboard=False)
    c.optim.update(learning_rate=1e-3, warmup_steps=2)
    c.mesh.distributed = "skip"
    # LLVM -O0: compiles several times faster on CPU; these tests are about values, not speed
    c.train.compiler_options = {"xla_backend_optimization_level": 0}
    for k, v in overrides.items():
        section, key = k.split(".")
        c[section][key] = v
    return config_lib.validate(c)


class StandInDiT(nn.Module):
    """The DiT's call signature and logical axis names in a model that compiles in a second: patchify conv, a
    timestep + pooled-text modulation, one residual MLP with an object-id embedding, unpatchify."""

    config: Any
    in_channels: int
    out_channels: int

    @nn.compact
    def __call__(self, x, timestep, context, *, local_context=None, token_ids=None, cross_token_ids=None,
                 local_ids=None):
        c = self.config
        d = int(c.dim)
        pt, ph, pw = (int(p) for p in c.patch_size)
        b, t, h, w, _ = x.shape
        li = nn.with_logical_partitioning
        x = nn.Conv(d, (pt, ph, pw), strides=(pt, ph, pw), padding="VALID", name="patch_embedding",
                    kernel_init=li(nn.initializers.lecun_normal(), (None, None, None, "in_channels", "embed")))(x)
        x = x.reshape(b, -1, d)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        freqs = jnp.exp(-jnp.arange(8) / 8.0 * jnp.log(1000.0))
        temb = jnp.concatenate([jnp.sin(timestep[:, None] * freqs), jnp.cos(timestep[:, None] * freqs)], -1)
        cond = nn.Dense(d, name="time", kernel_init=li(nn.initializers.lecun_normal(), (None, "embed")))(temb)
        txt = nn.Dense(d, name="text", kernel_init=li(nn.initializers.lecun_normal(), ("text_embed", "embed")))(
            context.mean(axis=1))
        x = x + (cond + txt)[:, None]
        if token_ids is not None:
            x = x + nn.Embed(8, d, name="ids")(jnp.clip(token_ids, 0, 7))
        if local_context is not None:
            x = x + nn.Dense(d, name="local", kernel_init=li(nn.initializers.lecun_normal(), ("text_embed", "embed")))(
                local_context.mean(axis=1))[:, None]
        y = nn.Dense(int(c.ffn_dim), name="ffn_in", kernel_init=li(nn.initializers.lecun_normal(), ("embed", "mlp")))(
            nn.LayerNorm(name="norm")(x))
        y = nn.with_logical_constraint(jax.nn.gelu(y), ("batch", "length", "mlp"))
        x = x + nn.Dense(d, name="ffn_out", kernel_init=li(nn.initializers.lecun_normal(), ("mlp", "embed")))(y)
        out = nn.Dense(pt * ph * pw * self.out_channels, name="proj_out",
                       kernel_init=li(nn.initializers.zeros_init(), ("embed", "out_channels")))(x)
        f, gh, gw = t // pt, h // ph, w // pw
        out = out.reshape(b, f, gh, gw, pt, ph, pw, self.out_channels)
        return out.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, t, h, w, self.out_channels)


def make_modules(config: ml_collections.ConfigDict, *, real_model: bool = False) -> modules_lib.Modules:
    """Real autoencoder, tokenizer and T5 encoder; the real DiT when `real_model`, else `StandInDiT`."""
    model_cls = dit.DiT if real_model else StandInDiT
    return modules_lib.Modules(
        model=model_cls(config.model, config_lib.in_channels(config), config.autoencoder.latent_channels),
        text_encoder=text_encoder.T5Encoder(config.text_encoder),
        autoencoder=registry.make_autoencoder(config.autoencoder),
        tokenizer=tokenizer.make_tokenizer(config.text_encoder))


_WORDS = ["a", "red", "dog", "runs", "left", "ball", "rolls", "cat", "jumps", "up", "car", "moves"]


def _text(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(_WORDS, size=n))


def synthetic_example(index: int, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """One example in the batch contract (uint8 videos, bool masks, token ids), a pure function of `index`."""
    d, t = config.data, config.text_encoder
    rng = np.random.default_rng(index)
    f, h, w, k = d.num_frames, d.height, d.width, d.max_objects
    masks = np.zeros((f, h, w, k), bool)
    n_obj = int(rng.integers(1, k + 1))
    for j in range(n_obj):
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        dy, dx = rng.integers(-1, 2), rng.integers(-1, 2)
        for i in range(f):
            yy, xx = int(np.clip(y + dy * i, 0, h - 4)), int(np.clip(x + dx * i, 0, w - 4))
            masks[i, yy:yy + h // 3, xx:xx + w // 3, j] = True
    palette = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200]], np.uint8)
    ids = np.where(masks.any(-1), masks.argmax(-1) + 1, 0)
    trajectory = palette[ids]
    base = rng.integers(0, 256, size=(1, h, w, 3)).astype(np.float32)
    video = np.clip(base + 20 * ids[..., None] + rng.normal(0, 8, (f, h, w, 3)), 0, 255).astype(np.uint8)
    tok = tokenizer.make_tokenizer(t)
    cap_ids, cap_mask = tok.encode([_text(rng, 4)], int(t.max_length))
    mot_ids, mot_mask = tok.encode([_text(rng, 3)], int(t.max_length))
    local = [_text(rng, 2) if 0 < j <= n_obj else "" for j in range(k + 1)]
    local[0] = _text(rng, 2)
    loc_ids, loc_mask = tok.encode(local, int(t.local_max_length))
    return {"video": video, "trajectory": trajectory, "object_masks": masks, "num_objects": np.int32(n_obj),
            "caption_tokens": cap_ids[0].astype(np.int32), "caption_mask": cap_mask[0].astype(bool),
            "motion_tokens": mot_ids[0].astype(np.int32), "motion_mask": mot_mask[0].astype(bool),
            "local_tokens": loc_ids.astype(np.int32), "local_mask": loc_mask.astype(bool),
            "example_id": np.int32(index)}


def make_dataset(config: ml_collections.ConfigDict, *, process_index: int = 0, process_count: int = 1):
    """Shuffled, repeated Grain pipeline of synthetic examples; this process's rows of each global batch."""
    b = int(config.train.batch_size)
    per = b // process_count
    ds = (grain.MapDataset.range(NUM_EXAMPLES).shuffle(seed=int(config.data.shuffle_seed)).repeat()
          .map(lambda i: synthetic_example(int(i), config)).batch(b, drop_remainder=True)
          .map(lambda batch: {k: v[process_index * per:(process_index + 1) * per] for k, v in batch.items()}))
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))


class RecordingIterator(grain.DatasetIterator):
    """Hands out its parent's batches and appends `{"ids": [...]}` lines to `path` (one per batch)."""

    def __init__(self, parent: grain.DatasetIterator, path: str, on_batch=None):
        super().__init__(parent)
        self._path = path
        self._count = 0
        self._on_batch = on_batch

    def __next__(self):
        batch = next(self._parent)
        self._count += 1
        with open(self._path, "a") as f:
            f.write(json.dumps({"ids": batch["example_id"].tolist()}) + "\n")
        if self._on_batch is not None:
            self._on_batch(self._count)
        return batch

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


def iterator_factory(record_to: str | None = None, on_batch=None):
    """A `make_iterator` for `loop.train`."""

    def make(config, *, process_index, process_count, workdir):
        it = iter(make_dataset(config, process_index=process_index, process_count=process_count))
        if record_to is not None:
            it = RecordingIterator(it, os.path.join(workdir, record_to) if not os.path.isabs(record_to) else record_to,
                                   on_batch)
        return it

    return make


def read_records(path: str) -> list[list[int]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["ids"] for line in f if line.strip()]


def tiny_at_12fps(stage: int = 2) -> ml_collections.ConfigDict:
    """The tiny config with clips at 12 fps, the full set's rate: data-machinery tests whose synthetic videos are too
    short for the tiny default's 6 fps (9 frames span 33 video frames there, 17 here)."""
    c = config_lib.build(stage, "tiny")
    c.data.fps = 12.0
    return c
