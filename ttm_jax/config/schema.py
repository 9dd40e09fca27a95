"""The schema of a run's config: its sections' builders (every value common to all variants), the named choices the
checks and the modules share, `ConfigError` and `parse_arg` (every config-file argument).

Each builder takes its section of a variant's row (`variants._VARIANT_TABLE`, with the stage's `_STAGE_ROWS`) and adds
the values common to all variants. A module adds the keys it needs to its own section's builder (`_model`, `_data`,
...); a key that configs saved before it existed lack gets its backward-compatible value in `upgrade.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from ttm_jax import cli

ATTENTION_IMPLS = ("xla", "splash", "gpu")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")
AUTOENCODERS = ("space_to_depth", "wan", "sd")
# the latent normalisation that leaves an autoencoder's latents as they are: space_to_depth's default, a cache
# manifest's before the fields existed, and the only one the Wan / SD VAEs take here (theirs: their config.json's)
IDENTITY_LATENT_NORM = {"scaling_factor": 1.0, "shift_factor": 0.0}
CROSS_IDS_FROM = ("bbox", "mask")
# model.condition_frames: how the first-frame conditions fill the latent frames (ttm_jax/models/conditioning.py)
CONDITION_FRAMES = ("first", "all", "indexed")
STAGE1_LATER_IDS = ("background", "start")
# The keys of a stage config's argument and their defaults (`parse_arg`).
STAGE_ARGS: dict[str, Any] = {"variant": "tiny", "runlocal": False}
_TRUE = ("1", "true", "yes")


ConfigError = cli.ConfigError  # a config value that cannot work (defined in `cli` for the backbones' config.py)


def parse_arg(arg: str | None, defaults: Mapping[str, Any] | None = None, *, bare_key: str | None = "variant",
              where: str = "config argument") -> dict[str, Any]:
    """`defaults` (default `STAGE_ARGS`) updated by `arg`, comma-separated `key=value` pairs and bare words.

    A value takes the type of its key's default (a bool is true for 1/true/yes, any case). A bare word is `True` for a
    bool key (`runlocal`), else the value of `bare_key` (`"mid"` -> variant=mid); without `bare_key` it is an error.
    A key not in `defaults` raises `ConfigError` naming it and the choices; `where` starts every message.
    """
    defaults = STAGE_ARGS if defaults is None else defaults
    out = dict(defaults)
    for part in (arg or "").split(","):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            key, value = (x.strip() for x in part.split("=", 1))
        elif isinstance(defaults.get(part), bool):
            key, value = part, "true"
        elif bare_key is not None:
            key, value = bare_key, part
        else:
            raise ConfigError(f"{where}: argument {part!r} is not key=value; keys: {sorted(defaults)}")
        if key not in defaults:
            raise ConfigError(f"{where}: unknown key {key!r}; choose from {sorted(defaults)}")
        default = defaults[key]
        if isinstance(default, bool):
            out[key] = value.lower() in _TRUE
            continue
        try:
            out[key] = type(default)(value)
        except ValueError:
            raise ConfigError(f"{where}: {key}={value!r} does not parse as {type(default).__name__} "
                              f"(default {default!r})") from None
    return out



# the synthetic generator's ladder rungs (ttm_jax/data/synthetic.py RUNGS; a test keeps the two equal)
SYNTHETIC_RUNGS = (1, 2, 3, 4)
SYNTHETIC_FULL_RUNG = 4


# ---------------------------------------------------------------------------------------------- section builders
# Each takes its section of a `_VARIANT_TABLE` entry and adds the values common to all variants.


def _model(v: Mapping[str, Any]) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict(dict(v))
    m.backbone = v.get("backbone", "dit")  # the trained model, by name (assembly/registry.py: BACKBONES)
    m.rope_max_seq_len = 1024
    m.eps = 1e-6
    m.qk_norm = True  # RMSNorm across heads on q and k, as Wan 2.1
    m.cross_attn_norm = True  # affine LayerNorm before cross-attention, as Wan 2.1
    # TTM added layers in the first `ttm_layers` blocks, and which of them are masked (the paper's Table 3 rows):
    # both (TTM); ttm_masked=False: neither ("no masked attention"); ttm_masked_self=False: "masked cross-attention
    # only"; ttm_masked_cross=False: "masked self-attention only". The single-stage TI2V baseline is stage 0.
    m.ttm_masked = True
    m.ttm_masked_self = True
    m.ttm_masked_cross = True
    # first-frame conditions in latent frame 0 only (Wan I2V), in every frame (SVD: all), or in every frame with a
    # channel holding the frame's place (indexed); stage 1: all (build)
    m.condition_frames = "first"
    # self-conditioning (Chen et al. 2023, "Analog Bits"): the model also reads its own clean estimate of the previous
    # sampling step (training: of a first, gradient-free pass on half the examples; zeros otherwise), in
    # `latent_channels` more input channels after the noisy latent
    m.self_condition = False
    # stage 1 (`stages.STAGES[1].model_defaults`): which local prompt its added layers give the tokens of latent frames
    # 1+, "background" (slot 0) or "start" (each object's first-frame place in every frame); other stages ignore it
    m.stage1_later_ids = v.get("stage1_later_ids", "background")
    m.cross_ids_from = "bbox"  # per-token ids for masked cross-attention: objects' boxes (paper) or masks
    m.attention = "xla"  # xla (reference) | splash (TPU) | gpu (Pallas Triton)
    # masked self-attention over tokens sorted by object id, only the (query block, key block) pairs of one object:
    # exact, work sum_k n_k^2 instead of N^2 (ttm_jax/models/sparse_attention.py); any backend
    m.attention_sparse = False
    # attention with the video tokens sharded over mesh.context > 1 (ttm_jax/models/context_parallel.py): ulysses
    # (all-to-all to head groups; heads per tensor shard divisible by mesh.context) | ring (any head count)
    m.context_impl = "ulysses"
    m.scan_layers = True
    # scanned blocks per loop iteration; 0: per backend (all of them on CPU, no loop; 1 on GPU / TPU): dit.unroll_for
    m.scan_unroll = 0
    m.remat_policy = "none"
    m.dtype = "float32"  # compute dtype; bfloat16 on accelerators
    m.param_dtype = "float32"
    return m


def _autoencoder(v: Mapping[str, Any]) -> ml_collections.ConfigDict:
    a = ml_collections.ConfigDict(dict(v))
    a.path = ""  # Wan / SD VAE: a diffusers AutoencoderKLWan / AutoencoderKL folder; unused by space_to_depth
    a.dtype = "float32"  # Wan VAE compute dtype (params stay float32); bfloat16 on accelerators
    a.chunk_frames = 1  # Wan VAE: latent frames per causal time chunk (memory ~ chunk); 0: whole clip in one pass
    # `scaling_factor`, `shift_factor` (the table's): space_to_depth latent = (pixels - shift_factor) *
    # scaling_factor (diffusers' names); the SD and Wan VAEs normalise as their weights' config.json says (1 and 0)
    return a


def _text_encoder(v: Mapping[str, Any]) -> ml_collections.ConfigDict:
    # `dtype`: compute dtype (norms and softmax stay float32); parameters are stored in param_dtype
    t = ml_collections.ConfigDict(dict(v))
    t.relative_attention_num_buckets = 32
    t.relative_attention_max_distance = 128
    t.feed_forward = "gated-gelu"
    t.eps = 1e-6
    t.tokenizer_path = ""  # sentencepiece model file, for tokenizer=sentencepiece
    t.path = ""  # converted weights; empty: random init from `seed` (tiny configs)
    # tokens per local prompt (words: "the red striped square drifts up and to the left while growing" ~ 14)
    t.local_max_length = v["local_max_length"]
    t.param_dtype = "float32"
    return t


def _data(v: Mapping[str, Any]) -> ml_collections.ConfigDict:
    # `fps`: clip frame rate sampled from SA-V's 24 fps videos (6: every frame an annotated one); `synthetic_rung`:
    # the synthetic data's rung on the ladder of difficulty (ttm_jax/data/synthetic.py RUNGS): 1 one plain object at
    # a prompted speed, 2 at a random speed, 3 two or three objects with their own directions (binding), 4 the full set
    d = ml_collections.ConfigDict(dict(v))
    d.max_objects = 4  # K: objects per clip (background is id 0 and not counted)
    d.annotation = "manual"  # manual | auto | both
    d.sav_path = ""  # SA-V train shards or folders; empty: synthetic SA-V in `synthetic_dir`
    d.captions = ""  # captions sidecar JSONL
    d.prepared_path = ""  # ArrayRecord shards from `python -m ttm_jax.data.prepare`
    d.synthetic_dir = ""  # empty: <workdir>/../synthetic_sav cache
    d.missing_captions = "skip"  # skip | error
    d.crop = "center"  # center | random: where the crop box of the output aspect sits in the source frame
    d.min_object_area = 0.002  # an object must cover this fraction of the clip's first frame to be chosen
    d.motion_weight = 1.0  # object choice score = mean area x (1 + motion_weight x (1 - consecutive-frame IoU))
    d.shuffle_seed = 0
    d.num_workers = 0  # Grain worker processes (mp_prefetch); 0: decode in the training process
    d.read_threads = 4  # Grain threads reading and decoding records in each process (0: the main thread, no read-ahead)
    # True: `prepared_path` is a folder of `python -m ttm_jax.data.encode` (cached VAE latents and text embeddings);
    # the train step then runs neither the autoencoder's encoder nor the text encoder (not even loaded)
    d.cached = False
    return d


def _train(v: Mapping[str, Any]) -> ml_collections.ConfigDict:
    # `batch_size`: global batch; `sample_every_steps`: sample videos (mp4) at intervals, 0: never
    t = ml_collections.ConfigDict(dict(v))
    t.grad_accum_steps = 1
    t.keep_checkpoints = 3  # keep the last N ...
    t.keep_period = 10_000  # ... and every M-th step
    t.log_every_steps = 10
    t.init_from = ""  # Orbax checkpoint (e.g. from `python -m ttm_jax.convert`) to start the weights from
    t.async_checkpointing = True  # Orbax writes while training continues
    t.tensorboard = True  # scalars under <workdir>/tensorboard (tensorboardX)
    # XLA options for the compiled step, e.g. {"xla_backend_optimization_level": 0}: much faster CPU compiles
    t.compiler_options = ml_collections.ConfigDict()
    return t


def _optim(v: Mapping[str, Any]) -> ml_collections.ConfigDict:
    o = ml_collections.ConfigDict(dict(v))
    o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8
    o.weight_decay = 0.0
    o.grad_clip_norm = 1.0
    o.ema_decay = 0.0  # 0: no EMA
    # warmup-stable-decay: the learning rate falls linearly to 0 over the last `cooldown_steps` of train.total_steps
    # (0: constant to the end). To cool down a finished constant-LR run, resume it with total_steps raised by N and
    # cooldown_steps=N: the fall then starts at the step it resumes from (the loop prints the LR it resumes at).
    o.cooldown_steps = v.get("cooldown_steps", 0)
    # or, when cooldown_steps is 0, the fall as a share of train.total_steps (the tiny stages: 0.5), so a run
    # shortened or lengthened on the command line keeps it; `cooldown_steps(optim, total_steps)` resolves the two
    o.cooldown_fraction = v.get("cooldown_fraction", 0.0)
    return o


def cooldown_steps(optim: ml_collections.ConfigDict, total_steps: int) -> int:
    """The steps over which the learning rate falls to 0 (`config.optim`): `cooldown_steps`, else `cooldown_fraction`
    of `total_steps` (`train.total_steps`), kept after the warm-up."""
    if optim.cooldown_steps:
        return int(optim.cooldown_steps)
    share = float(optim.cooldown_fraction)
    return min(round(share * int(total_steps)), max(0, int(total_steps) - int(optim.warmup_steps))) if share else 0


def _objective(v: Mapping[str, Any]) -> ml_collections.ConfigDict:
    # `shift`: timestep shift t' = s t / (1 + (s - 1) t)
    j = ml_collections.ConfigDict(dict(v))
    j.name = v.get("name", "rectified_flow")  # the objective, by name (assembly/objectives.py: OBJECTIVES)
    # rectified_flow: training times and the time shift
    j.t_sampling = "logit_normal"  # logit_normal | uniform
    j.logit_mean, j.logit_std = 0.0, 1.0
    # ddim_v (ttm_jax/diffusion/ddim.py): DDPM betas, zero terminal SNR, DDIM timestep spacing (AnimateDiff / SD 1.5)
    j.num_train_timesteps = 1000
    j.beta_start, j.beta_end = 0.00085, 0.012
    j.beta_schedule = "scaled_linear"  # scaled_linear | linear
    j.rescale_zero_terminal_snr = True
    j.timestep_spacing = "trailing"  # trailing | leading | linspace
    # condition dropout for InstructPix2Pix guidance
    j.drop_image_prob = 0.05
    j.drop_text_prob = 0.05
    j.drop_both_prob = 0.05
    return j


def _mesh(v: Mapping[str, Any]) -> ml_collections.ConfigDict:
    h = ml_collections.ConfigDict(dict(v))
    # one size may be -1: "all remaining devices"
    h.shape = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    h.distributed = "auto"  # auto | skip  (jax.distributed.initialize from the environment)
    # devices the video tokens are split over: the mesh's `context` axis (context parallelism, model.context_impl);
    # mesh.shape's sizes then fill devices // context. 1: none
    h.context = 1
    # logical axis name -> mesh axes, in priority order (ttm_jax/runtime/sharding.py); params' `embed` is sharded over
    # fsdp and context (the devices that split the sequence hold a share of the weights too; context 1: fsdp alone),
    # heads and FFN hidden are tensor-parallel, the batch is split over data x fsdp, the video tokens over context
    # (text and local prompts, kv_length, replicated)
    h.rules = (("batch", ("data", "fsdp")), ("embed", ("fsdp", "context")), ("heads", "tensor"), ("mlp", "tensor"),
               ("text_embed", None), ("in_channels", None), ("out_channels", None), ("modulation", None),
               ("layers", None), ("length", "context"), ("kv_length", None))
    h.shard_unannotated = True  # params without logical names: FSDP-shard the large ones on their largest dim
    return h


def _sample(v: Mapping[str, Any]) -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict(dict(v))
    s.schedule = "linear_quadratic"  # linear_quadratic (Movie Gen) | uniform
    s.image_scale = 1.5
    s.shift = 1.0  # time shift of the training samples' grid (1: none)
    s.seed = 0
    return s


# section name -> builder, in the config's order
_SECTIONS: dict[str, Callable[[Mapping[str, Any]], ml_collections.ConfigDict]] = {
    "model": _model, "autoencoder": _autoencoder, "text_encoder": _text_encoder, "data": _data, "train": _train,
    "optim": _optim, "objective": _objective, "mesh": _mesh, "sample": _sample,
}

