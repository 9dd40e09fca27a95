"""`preflight(config, workdir)`: the checks of a training run that need the devices or the file system.

`config.validate` checks the values of a config on their own; what it cannot see is whether they fit this machine:
the mesh shape against the device count, the global batch against the batch shards of that mesh, the attention kernel
against the platform, whether the files the run will read exist, and whether the workdir's checkpoints can be resumed
with it (`loop.check_resumable`, which `loop.train` runs again). `python -m ttm_jax.main` runs these checks after
`validate` and before `loop.train`, so that a user error stops the run before anything is written into the workdir.
Every failure is a `ConfigError` (`MeshError` for the mesh shape, a subclass) naming the field and the fix.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import ml_collections
from absl import logging
from etils import epath

from ttm_jax.config import ConfigError
from ttm_jax.data import loader, records
from ttm_jax.runtime import checkpoint as checkpoint_lib
from ttm_jax.runtime import mesh as mesh_lib
from ttm_jax.train import loop


def _is_local(path: str) -> bool:
    """True for a local file system path (a `gs://...` or other URL is left to the reader that opens it)."""
    return "://" not in path


def _check_exists(field: str, path: str, fix: str) -> None:
    if path and _is_local(path) and not epath.Path(path).exists():
        raise ConfigError(f"config.{field}: {path!r} does not exist; {fix}")


def check_paths(config: ml_collections.ConfigDict, workdir: str | None = None) -> None:
    """Every file or folder the run will read exists (local paths): the data (`data.prepared_path`, else
    `data.sav_path` + `data.captions` unless `<workdir>/prepared` already holds them), `train.init_from`, the Wan VAE
    folder, the text encoder's weights and sentencepiece model."""
    d, t = config.data, config.train
    if d.prepared_path:
        _check_exists("data.prepared_path", d.prepared_path,
                      "set it to a folder made by `python -m ttm_jax.data.prepare` (or leave it empty for the "
                      "synthetic default)")
        if d.cached:  # the folder holds the cached latents and embeddings of this config's encoders
            try:
                loader.check_cached(config)
            except ValueError as e:
                raise ConfigError(f"config.data.cached: {e}") from None
    elif d.sav_path:
        prepared = workdir is not None and os.path.exists(os.path.join(workdir, "prepared", records.MANIFEST))
        if not prepared:
            _check_exists("data.sav_path", d.sav_path, "set it to SA-V tar shards or the folder they unpack to")
            if not d.captions:
                raise ConfigError("config.data.captions: empty but config.data.sav_path is set; give the captions "
                                  "sidecar JSONL (SA-V ships no captions)")
            _check_exists("data.captions", d.captions, "set it to the captions sidecar JSONL of config.data.sav_path")
    _check_exists("train.init_from", t.init_from,
                  "set it to an Orbax params checkpoint (python -m ttm_jax.convert --to=orbax:DIR writes DIR/params)")
    a, te = config.autoencoder, config.text_encoder
    if a.name == "wan":
        _check_exists("autoencoder.path", a.path,
                      "set it to a diffusers AutoencoderKLWan folder (<Wan2.1-T2V-1.3B-Diffusers>/vae)")
    _check_exists("text_encoder.path", te.get("path", ""), "set it to the converted text encoder weights")
    if te.tokenizer == "sentencepiece":
        if not te.get("tokenizer_path", ""):
            raise ConfigError("config.text_encoder.tokenizer_path: empty, but text_encoder.tokenizer='sentencepiece' "
                              "reads its model from there; set it to the sentencepiece model file of the text encoder "
                              "(e.g. <umt5-xxl>/spiece.model)")
        _check_exists("text_encoder.tokenizer_path", te.get("tokenizer_path", ""),
                      "set it to the sentencepiece model file of the text encoder")


def check_devices(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> None:
    """The mesh shape fits the devices (`MeshError`), the global batch splits over the mesh's batch shards and the
    processes, and `model.attention` runs on the devices' platform. Starts `jax.distributed` first when the
    environment asks for it (`mesh.initialize_distributed`), as the run would."""
    mesh_lib.initialize_distributed(config.mesh)
    devices = list(jax.devices() if devices is None else devices)
    # mesh.shape's sizes fill devices // mesh.context (the MeshError names mesh.context when it does not divide)
    sizes = mesh_lib.resolve_shape(config.mesh.shape, len(devices), config.mesh.context)
    shards = sizes["data"] * sizes["fsdp"]
    batch, processes = int(config.train.batch_size), jax.process_count()
    if batch % shards or batch % processes:
        need = math.lcm(shards, processes)
        raise ConfigError(f"config.train.batch_size: {batch} does not split over the {shards} batch shards of the "
                          f"mesh {sizes} ({len(devices)} devices) and the {processes} process(es); set "
                          f"--config.train.batch_size to a multiple of {need}, or mesh.shape so that data x fsdp "
                          f"divides {batch}")
    check_attention(config, devices)


def check_attention(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> None:
    """`model.attention` runs on the devices' platform: the splash kernel needs a TPU."""
    platform = (list(devices) if devices is not None else jax.devices())[0].platform
    if config.model.attention == "splash" and platform != "tpu":
        raise ConfigError(f"config.model.attention: 'splash' is a TPU kernel but the devices are {platform}; set "
                          f"--config.model.attention=xla" + (" (or gpu)" if platform == "gpu" else ""))


def checkpoint_config(workdir: str) -> ml_collections.ConfigDict | None:
    """The config of the newest checkpoint in `workdir` whose config reads (as `loop.train` picks it), None without
    checkpoints. Reads only (no folder is created)."""
    if not checkpoint_lib.checkpoint_dir(workdir).exists():
        return None
    ckpt = checkpoint_lib.Checkpointer(workdir, async_save=False)
    try:
        for step in sorted(ckpt.all_steps(), reverse=True):
            try:
                return ckpt.restore_config(step)
            except Exception as e:  # noqa: BLE001 - an unusable step is loop.train's to report and set aside
                logging.info("%s: step %d: config unreadable (%s); trying an older step", workdir, step, e)
        return None
    finally:
        ckpt.close()


def check_resume(config: ml_collections.ConfigDict, workdir: str) -> None:
    """A workdir with checkpoints resumes only if `config` keeps every field that shapes the checkpointed state
    (`loop.check_resumable`); the refusal is a `ConfigError` naming the fields and the fix."""
    saved = checkpoint_config(workdir)
    if saved is None:
        return
    try:
        loop.check_resumable(saved, config, workdir)
    except ValueError as e:  # check_resumable's refusal: a user error
        raise ConfigError(str(e)) from None


def preflight(config: ml_collections.ConfigDict, workdir: str | None = None,
              devices: Sequence[jax.Device] | None = None) -> ml_collections.ConfigDict:
    """`check_paths`, `check_devices`, then (with a workdir) `check_resume`; returns the config. Writes nothing."""
    check_paths(config, workdir)
    check_devices(config, devices)
    if workdir is not None:
        check_resume(config, workdir)
    return config
