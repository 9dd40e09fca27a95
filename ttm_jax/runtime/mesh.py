"""The named device mesh (`data`, `fsdp`, `context`, `tensor`) and multi-process start-up.

`config.mesh.shape` gives one size per axis but `context`; one of them may be -1 ("all remaining devices", of the
devices divided by `config.mesh.context`). Axes:
  data     pure data parallelism (parameters replicated across it)
  fsdp     data parallelism with parameters and optimizer state sharded across it (ZeRO-3 / FSDP)
  context  the video tokens split across it (`config.mesh.context`, default 1; ttm_jax/models/context_parallel.py);
           parameters replicated, every device of it sees the same examples
  tensor   model parallelism over heads and the FFN hidden size

`initialize_distributed(config.mesh)` starts `jax.distributed` from the environment before any device is touched:
  - explicit: JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES, JAX_PROCESS_ID (and optional
    JAX_LOCAL_DEVICE_IDS) -- local multi-process runs, any cluster;
  - SLURM (SLURM_JOB_ID with SLURM_NTASKS > 1) and Cloud TPU pods (TPU_WORKER_HOSTNAMES with more than one host):
    `jax.distributed.initialize()` auto-detects coordinator, process count and id;
  - otherwise a single process: nothing to do.
`config.mesh.distributed = "skip"` never initializes (tests, notebooks, a process that already did).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from ttm_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "context", "tensor")


class MeshError(ConfigError):
    """A mesh shape that does not fit the devices (or a distributed set-up the environment gets wrong); the message
    names the field and the fix. A user error: a `ConfigError` (and so a `ValueError`), which `python -m ttm_jax.main`
    prints as one line."""


def _detected_cluster() -> str | None:
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "explicit"
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1"))) > 1:
        return "slurm"
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if hosts and len([h for h in hosts.split(",") if h]) > 1:
        return "tpu"
    return None


def initialize_distributed(mesh_config: ml_collections.ConfigDict) -> str | None:
    """Start `jax.distributed` per `mesh_config.distributed` (auto | skip); returns the cluster kind used or None."""
    mode = mesh_config.distributed
    if mode == "skip":
        return None
    if mode != "auto":
        raise MeshError(f"config.mesh.distributed: {mode!r}; choose auto or skip")
    if jax.distributed.is_initialized():
        return "already"
    kind = _detected_cluster()
    if kind is None:
        return None
    if kind == "explicit":
        env = os.environ
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not env.get(k)]
        if missing:
            raise MeshError(f"environment: JAX_COORDINATOR_ADDRESS is set but {missing} are not; export them "
                            f"(see launch/local_multiprocess.sh) or unset JAX_COORDINATOR_ADDRESS")
        local = env.get("JAX_LOCAL_DEVICE_IDS")
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
            local_device_ids=[int(i) for i in local.split(",")] if local else None,
        )
    else:
        jax.distributed.initialize()
    logging.info("jax.distributed (%s): process %d of %d, %d local / %d global devices", kind, jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return kind


def resolve_shape(shape: dict[str, int] | ml_collections.ConfigDict, num_devices: int,
                  context: int = 1) -> dict[str, int]:
    """Sizes for (data, fsdp, context, tensor): `context` as given, the one -1 of `shape` (data, fsdp, tensor) filled
    in; checks that context divides `num_devices` and the others multiply to `num_devices // context`."""
    shape = dict(shape)
    if "context" in shape:
        raise MeshError(f"config.mesh.shape: {dict(shape)} names 'context'; its size is config.mesh.context "
                        f"(--config.mesh.context=N), not a mesh.shape entry")
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise MeshError(f"config.mesh.shape: unknown axes {sorted(unknown)}; the axes are "
                        f"{tuple(a for a in MESH_AXES if a != 'context')} (and config.mesh.context)")
    context = int(context)
    if context < 1 or num_devices % context:
        raise MeshError(f"config.mesh.context: {context} does not divide the {num_devices} devices; choose a "
                        f"divisor of {num_devices} (1: the video tokens are not split)")
    where = f" (config.mesh.context={context} of the {num_devices} devices)" if context > 1 else ""
    num_devices //= context
    sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES if a != "context"}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise MeshError(f"config.mesh.shape: {free} are all -1; at most one axis may be -1")
    bad = [a for a, s in sizes.items() if s == 0 or s < -1]
    if bad:
        raise MeshError(f"config.mesh.shape: {bad} must be positive (or one of them -1)")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise MeshError(f"config.mesh.shape: {dict(shape)} fixes {fixed} devices, which does not divide the "
                            f"{num_devices} devices{where}; change the fixed sizes")
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise MeshError(f"config.mesh.shape: {dict(shape)} has {fixed} devices but {num_devices} are "
                        f"available{where}; set one axis to -1 or make the sizes multiply to {num_devices}")
    sizes["context"] = context
    return {a: sizes[a] for a in MESH_AXES}


def make_mesh(mesh_config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A `jax.sharding.Mesh` with axes (data, fsdp, context, tensor) over `devices` (default: all devices of all
    processes); `context` is `mesh_config.context` (1 when absent, as in configs saved before it existed)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_shape(mesh_config.shape, len(devices), mesh_config.get("context", 1))  # a shape alone: 1
    shape = tuple(sizes[a] for a in MESH_AXES)
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == jax.device_count():
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    # a subset of devices (tests, benchmarks): keep their order
    return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def batch_axes(mesh: jax.sharding.Mesh) -> tuple[str, ...]:
    """Mesh axes the global batch is split over (data and fsdp; context- and tensor-parallel devices see the same
    examples)."""
    return tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)


def batch_parallelism(mesh: jax.sharding.Mesh) -> int:
    """How many ways the global batch is split."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))
