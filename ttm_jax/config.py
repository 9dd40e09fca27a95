"""The run configuration: one `ml_collections.ConfigDict` is the whole truth of a run.

`configs/stage1.py` and `configs/stage2.py` call `build(stage, arg)`; the argument picks a variant:

  tiny     (default) seconds to minutes on a 2-core CPU, synthetic SA-V data, `space_to_depth` autoencoder
  mid      between tiny and wan1.3b, for benchmarks
  wan1.3b  the shapes of Wan2.1-T2V-1.3B (dim 1536, 30 layers, 12 heads of 128, FFN 8960, text dim 4096)

`arg` is either a bare variant name (`tiny`) or comma-separated `key=value` pairs (`variant=tiny,stage=1`).
`validate(config)` checks every value and raises `ConfigError` naming the field and the fix; `main` calls it before
any compute is spent.
"""

from __future__ import annotations

import ml_collections

VARIANTS = ("tiny", "mid", "wan1.3b")
ATTENTION_IMPLS = ("xla", "splash", "gpu")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")
AUTOENCODERS = ("space_to_depth", "wan")
CROSS_IDS_FROM = ("bbox", "mask")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and the fix."""


def parse_arg(arg: str | None) -> dict[str, str]:
    """`"tiny"` -> {"variant": "tiny"}; `"variant=mid,foo=1"` -> {"variant": "mid", "foo": "1"}."""
    out: dict[str, str] = {}
    if not arg:
        return out
    for part in arg.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
        else:
            out["variant"] = part
    unknown = set(out) - {"variant", "runlocal"}
    if unknown:
        raise ConfigError(f"config argument: unknown key(s) {sorted(unknown)}; use e.g. `configs/stage2.py:tiny` "
                          f"or `configs/stage2.py:variant=mid`")
    return out


def _model(variant: str) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    if variant == "tiny":
        m.dim, m.num_layers, m.num_heads, m.ffn_dim = 128, 2, 2, 256
        m.text_dim, m.freq_dim = 32, 32
        m.ttm_layers = 1
    elif variant == "mid":
        m.dim, m.num_layers, m.num_heads, m.ffn_dim = 512, 8, 4, 1536
        m.text_dim, m.freq_dim = 256, 256
        m.ttm_layers = 3
    elif variant == "wan1.3b":
        m.dim, m.num_layers, m.num_heads, m.ffn_dim = 1536, 30, 12, 8960
        m.text_dim, m.freq_dim = 4096, 256
        # The paper adds masked layers to 10 of 40 DiT blocks; the same quarter of Wan-1.3B's 30 is 8.
        m.ttm_layers = 8
    else:
        raise ConfigError(f"config argument: unknown variant {variant!r}; choose one of {VARIANTS}")
    # A token must carry fewer values (latent channels x patch volume) than the model has dims, or the output head
    # is a bottleneck that cannot represent the per-pixel noise it must remove (Wan: 64 values, dim 1536). The tiny
    # config's exact space_to_depth latent has 48 channels, so it patchifies 1x1x1 (48 values, dim 128).
    m.patch_size = (1, 1, 1) if variant == "tiny" else (1, 2, 2)
    m.rope_max_seq_len = 1024
    m.eps = 1e-6
    m.qk_norm = True  # RMSNorm across heads on q and k, as Wan 2.1
    m.cross_attn_norm = True  # affine LayerNorm before cross-attention, as Wan 2.1
    # TTM added layers in the first `ttm_layers` blocks; `ttm_masked=False` is the paper's TI2V baseline (same
    # layers, no masks, no trajectory).
    m.ttm_masked = True
    m.cross_ids_from = "bbox"  # per-token ids for masked cross-attention: objects' boxes (paper) or masks
    m.attention = "xla"  # xla (reference) | splash (TPU) | gpu (Pallas Triton)
    m.scan_layers = True
    m.remat_policy = "none"
    m.dtype = "float32"  # compute dtype; bfloat16 on accelerators
    m.param_dtype = "float32"
    return m


def _autoencoder(variant: str) -> ml_collections.ConfigDict:
    a = ml_collections.ConfigDict()
    if variant == "wan1.3b":
        a.name = "wan"
        a.latent_channels, a.time_factor, a.space_factor = 16, 4, 8
    else:
        # exact, parameter-free: pixels (s x s x t patches) become channels
        a.name = "space_to_depth"
        a.time_factor, a.space_factor = 4, (2 if variant == "tiny" else 4)
        a.latent_channels = 3 * a.space_factor**2 * a.time_factor
    a.path = ""  # Wan VAE: a diffusers AutoencoderKLWan folder (config.json + safetensors); unused by space_to_depth
    a.dtype = "float32"  # Wan VAE compute dtype (params stay float32); bfloat16 on accelerators
    a.chunk_frames = 1  # Wan VAE: latent frames per causal time chunk (memory ~ chunk); 0: whole clip in one pass
    return a


def _text_encoder(variant: str) -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    if variant == "wan1.3b":
        # umT5-XXL encoder, as Wan 2.1
        t.name = "umt5"
        t.vocab_size, t.d_model, t.num_layers, t.num_heads, t.d_kv, t.d_ff = 256384, 4096, 24, 64, 64, 10240
        t.per_layer_bias = True
        t.tokenizer = "sentencepiece"
        t.max_length = 512
    else:
        # small, randomly initialised and frozen; ByT5's byte tokenizer needs no files
        t.name = "t5"
        t.vocab_size = 384
        t.d_model = 32 if variant == "tiny" else 256
        t.num_layers = 2
        t.num_heads = 2 if variant == "tiny" else 4
        t.d_kv = 16 if variant == "tiny" else 64
        t.d_ff = 64 if variant == "tiny" else 512
        t.per_layer_bias = False
        t.tokenizer = "byte"
        # bytes: the synthetic captions run to ~300, motion prompts ~240, local prompts ~90
        t.max_length = 256
    t.relative_attention_num_buckets = 32
    t.relative_attention_max_distance = 128
    t.feed_forward = "gated-gelu"
    t.eps = 1e-6
    t.tokenizer_path = ""  # sentencepiece model file, for tokenizer=sentencepiece
    t.path = ""  # converted weights; empty: random init from `seed` (tiny configs)
    # tokens per local prompt (bytes for the byte tokenizer: "the red square: the square slides left" ~ 40-90)
    t.local_max_length = 96 if t.tokenizer == "byte" else 32
    # compute dtype (norms and softmax stay float32); parameters are stored in param_dtype
    t.dtype = "bfloat16" if variant == "wan1.3b" else "float32"
    t.param_dtype = "float32"
    return t


def _data(variant: str) -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    if variant == "wan1.3b":
        d.num_frames, d.height, d.width = 81, 480, 832
    elif variant == "mid":
        d.num_frames, d.height, d.width = 17, 128, 128
    else:
        d.num_frames, d.height, d.width = 9, 32, 32  # latent 3 x 16 x 16 x 48: 768 tokens
    d.fps = 12.0  # clip frame rate sampled from SA-V's 24 fps videos
    d.max_objects = 4  # K: objects per clip (background is id 0 and not counted)
    d.annotation = "manual"  # manual | auto | both
    d.sav_path = ""  # SA-V train shards or folders; empty: synthetic SA-V in `synthetic_dir`
    d.captions = ""  # captions sidecar JSONL
    d.prepared_path = ""  # ArrayRecord shards from `python -m ttm_jax.data.prepare`
    d.synthetic_dir = ""  # empty: <workdir>/../synthetic_sav cache
    d.synthetic_num_videos = 64
    d.missing_captions = "skip"  # skip | error
    d.crop = "center"  # center | random: where the crop box of the output aspect sits in the source frame
    d.min_object_area = 0.002  # an object must cover this fraction of the clip's first frame to be chosen
    d.motion_weight = 1.0  # object choice score = mean area x (1 + motion_weight x (1 - consecutive-frame IoU))
    d.shuffle_seed = 0
    d.num_workers = 0  # Grain worker processes (mp_prefetch); 0: decode in the training process
    d.read_threads = 4  # Grain threads reading and decoding records in each process
    return d


def _train(variant: str) -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    t.batch_size = 32 if variant == "wan1.3b" else (8 if variant == "mid" else 4)  # global batch
    t.grad_accum_steps = 1
    # tiny: ~2 minutes on a 2-core CPU (the README's first command)
    t.total_steps = {"tiny": 600, "mid": 2000}.get(variant, 50_000)
    t.checkpoint_every_steps = 1000 if variant == "wan1.3b" else 100
    t.keep_checkpoints = 3  # keep the last N ...
    t.keep_period = 10_000  # ... and every M-th step
    t.log_every_steps = 10
    t.sample_every_steps = 5000 if variant == "wan1.3b" else 300  # sample videos (mp4) at intervals; 0: never
    t.init_from = ""  # Orbax checkpoint (e.g. from `python -m ttm_jax.convert`) to start the weights from
    t.async_checkpointing = True  # Orbax writes while training continues
    t.tensorboard = True  # scalars under <workdir>/tensorboard (tensorboardX)
    # XLA options for the compiled step, e.g. {"xla_backend_optimization_level": 0}: much faster CPU compiles
    t.compiler_options = ml_collections.ConfigDict()
    return t


def _optim(variant: str) -> ml_collections.ConfigDict:
    o = ml_collections.ConfigDict()
    # paper: constant LR 2e-5 after 2,000 warm-up steps; tiny runs learn faster with a larger one
    o.learning_rate = 2e-5 if variant == "wan1.3b" else 1e-3
    o.warmup_steps = 2000 if variant == "wan1.3b" else 20
    o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8
    o.weight_decay = 0.0
    o.grad_clip_norm = 1.0
    o.ema_decay = 0.0  # 0: no EMA
    return o


def _objective(variant: str) -> ml_collections.ConfigDict:
    j = ml_collections.ConfigDict()
    j.t_sampling = "logit_normal"  # logit_normal | uniform
    j.logit_mean, j.logit_std = 0.0, 1.0
    j.shift = 1.0 if variant == "tiny" else 3.0  # timestep shift t' = s t / (1 + (s - 1) t)
    # condition dropout for InstructPix2Pix guidance
    j.drop_image_prob = 0.05
    j.drop_text_prob = 0.05
    j.drop_both_prob = 0.05
    return j


def _mesh(variant: str) -> ml_collections.ConfigDict:
    h = ml_collections.ConfigDict()
    # one size may be -1: "all remaining devices"
    h.shape = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    h.distributed = "auto"  # auto | skip  (jax.distributed.initialize from the environment)
    # logical axis name -> mesh axes, in priority order (ttm_jax/runtime/sharding.py); params' `embed` is FSDP-sharded,
    # heads and FFN hidden are tensor-parallel, the batch is split over data x fsdp
    h.rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"),
               ("text_embed", None), ("in_channels", None), ("out_channels", None), ("modulation", None),
               ("layers", None), ("length", None), ("kv_length", None))
    h.shard_unannotated = True  # params without logical names: FSDP-shard the large ones on their largest dim
    return h


def _sample(variant: str) -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.num_steps = 50 if variant == "wan1.3b" else 20
    s.schedule = "linear_quadratic"  # linear_quadratic (Movie Gen) | uniform
    s.image_scale = 1.5
    s.text_scale = 5.0 if variant == "wan1.3b" else 3.0
    s.seed = 0
    return s


def build(stage: int, arg: str | None = None) -> ml_collections.ConfigDict:
    """The full default config of `stage` (1: image-to-motion, 2: motion-to-video) for the variant in `arg`."""
    args = parse_arg(arg)
    variant = args.get("variant", "tiny")
    if variant not in VARIANTS:
        raise ConfigError(f"config argument: unknown variant {variant!r}; choose one of {VARIANTS}")
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.variant = variant
    c.seed = 0
    c.model = _model(variant)
    c.autoencoder = _autoencoder(variant)
    c.text_encoder = _text_encoder(variant)
    c.data = _data(variant)
    c.train = _train(variant)
    c.optim = _optim(variant)
    c.objective = _objective(variant)
    c.mesh = _mesh(variant)
    c.sample = _sample(variant)
    if stage == 1:
        # stage 1 sees no local prompts: the added masked layers are a stage-2 feature
        c.model.ttm_layers = 0
    return c


def latent_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int, int]:
    """(T', H', W', C) of one clip's latent under the config's autoencoder (causal time compression)."""
    a, d = config.autoencoder, config.data
    t = 1 + (d.num_frames - 1) // a.time_factor
    return t, d.height // a.space_factor, d.width // a.space_factor, a.latent_channels


def in_channels(config: ml_collections.ConfigDict) -> int:
    """Channels into the DiT: the noisy latent plus two conditions (both stages), each `latent_channels` wide."""
    return 3 * config.autoencoder.latent_channels


def _check(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config.{field}: {msg}")


def _check_training(config: ml_collections.ConfigDict) -> None:
    """train / optim / objective / mesh sections (ttm_jax/train, ttm_jax/diffusion/flow.py)."""
    tr, o, j, h = config.train, config.optim, config.objective, config.mesh
    for name in ("batch_size", "grad_accum_steps", "total_steps", "checkpoint_every_steps", "log_every_steps"):
        _check(isinstance(tr[name], int) and tr[name] > 0, f"train.{name}", f"{tr[name]!r} must be a positive int")
    _check(tr.batch_size % tr.grad_accum_steps == 0, "train.grad_accum_steps",
           f"{tr.grad_accum_steps} does not divide train.batch_size={tr.batch_size}; pick a divisor")
    _check(tr.sample_every_steps >= 0, "train.sample_every_steps", f"{tr.sample_every_steps} must be >= 0 (0: never)")
    _check(o.learning_rate > 0, "optim.learning_rate", f"{o.learning_rate} must be > 0")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", f"{o.warmup_steps} must be >= 0")
    _check(0.0 <= o.ema_decay < 1.0, "optim.ema_decay", f"{o.ema_decay} must be in [0, 1) (0: no EMA)")
    _check(o.grad_clip_norm >= 0, "optim.grad_clip_norm", f"{o.grad_clip_norm} must be >= 0 (0: no clipping)")
    _check(j.t_sampling in ("logit_normal", "uniform"), "objective.t_sampling",
           f"{j.t_sampling!r}; choose logit_normal or uniform")
    _check(j.shift > 0, "objective.shift", f"{j.shift} must be > 0 (1: no shift)")
    probs = (j.drop_image_prob, j.drop_text_prob, j.drop_both_prob)
    _check(all(0 <= p <= 1 for p in probs) and sum(probs) <= 1, "objective.drop_image_prob",
           f"condition dropout rates {probs} (image, text, both) must be in [0, 1] and sum to <= 1")
    _check(h.distributed in ("auto", "skip"), "mesh.distributed", f"{h.distributed!r}; choose auto or skip")
    sizes = dict(h.shape)
    _check(set(sizes) <= {"data", "fsdp", "tensor"}, "mesh.shape", f"{sorted(sizes)}: the axes are data, fsdp, tensor")
    _check(sum(1 for v in sizes.values() if v == -1) <= 1 and all(v == -1 or v > 0 for v in sizes.values()),
           "mesh.shape", f"{sizes}: sizes must be positive, at most one -1 (all remaining devices)")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Check every value that could otherwise fail after compute has been spent; returns the config."""
    _check(config.stage in (1, 2), "stage", f"{config.stage!r} is not 1 or 2")
    m, a, t, d = config.model, config.autoencoder, config.text_encoder, config.data
    for name in ("dim", "num_layers", "num_heads", "ffn_dim", "text_dim", "freq_dim"):
        _check(isinstance(m[name], int) and m[name] > 0, f"model.{name}", f"{m[name]!r} must be a positive int")
    _check(m.dim % m.num_heads == 0, "model.dim",
           f"{m.dim} is not divisible by model.num_heads={m.num_heads}; pick a dim that is")
    head_dim = m.dim // m.num_heads
    _check(head_dim % 2 == 0 and head_dim >= 6, "model.num_heads",
           f"head dim {head_dim} (dim/num_heads) must be even and >= 6 for 3D RoPE")
    _check(m.freq_dim % 2 == 0, "model.freq_dim", f"{m.freq_dim} must be even (sin and cos halves)")
    _check(0 <= m.ttm_layers <= m.num_layers, "model.ttm_layers",
           f"{m.ttm_layers} must be in [0, model.num_layers={m.num_layers}]")
    _check(len(tuple(m.patch_size)) == 3 and all(int(p) > 0 for p in m.patch_size), "model.patch_size",
           f"{m.patch_size!r} must be three positive ints (t, h, w)")
    _check(m.attention in ATTENTION_IMPLS, "model.attention", f"{m.attention!r}; choose one of {ATTENTION_IMPLS}")
    _check(m.remat_policy in REMAT_POLICIES, "model.remat_policy",
           f"{m.remat_policy!r}; choose one of {REMAT_POLICIES}")
    _check(m.dtype in DTYPES, "model.dtype", f"{m.dtype!r}; choose one of {DTYPES}")
    _check(m.param_dtype in DTYPES, "model.param_dtype", f"{m.param_dtype!r}; choose one of {DTYPES}")
    _check(m.cross_ids_from in CROSS_IDS_FROM, "model.cross_ids_from",
           f"{m.cross_ids_from!r}; choose one of {CROSS_IDS_FROM}")
    _check(config.stage == 2 or m.ttm_layers == 0, "model.ttm_layers",
           f"{m.ttm_layers} but stage 1 has no local prompts or object ids for the masked layers; set 0")
    _check(m.text_dim == t.d_model, "model.text_dim",
           f"{m.text_dim} but text_encoder.d_model={t.d_model}; the DiT's text embedder reads the encoder's output, "
           f"set model.text_dim={t.d_model}")
    _check(a.name in AUTOENCODERS, "autoencoder.name", f"{a.name!r}; choose one of {AUTOENCODERS}")
    _check(a.get("dtype", "float32") in DTYPES, "autoencoder.dtype", f"{a.get('dtype')!r}; choose one of {DTYPES}")
    _check(isinstance(a.get("chunk_frames", 1), int) and a.get("chunk_frames", 1) >= 0, "autoencoder.chunk_frames",
           f"{a.get('chunk_frames')!r} must be an int >= 0 (0: the whole clip in one pass)")
    if a.name == "wan":
        _check(a.latent_channels > 0 and a.time_factor > 0 and a.space_factor > 0, "autoencoder",
               "latent_channels, time_factor and space_factor must be positive (Wan 2.1: 16, 4, 8); the weights' "
               "config.json is checked against them when the VAE loads")
    if a.name == "space_to_depth":
        want = 3 * a.space_factor**2 * a.time_factor
        _check(a.latent_channels == want, "autoencoder.latent_channels",
               f"{a.latent_channels} but space_to_depth with space_factor={a.space_factor}, "
               f"time_factor={a.time_factor} makes {want}; set it to {want}")
    _check(d.num_frames >= 1 and (d.num_frames - 1) % a.time_factor == 0, "data.num_frames",
           f"{d.num_frames} must be 1 + a multiple of autoencoder.time_factor={a.time_factor} "
           f"(e.g. {1 + a.time_factor * max(1, (d.num_frames - 1) // a.time_factor)})")
    step = a.space_factor * m.patch_size[1]
    _check(d.height % step == 0, "data.height",
           f"{d.height} must be a multiple of autoencoder.space_factor x patch = {step}")
    step = a.space_factor * m.patch_size[2]
    _check(d.width % step == 0, "data.width",
           f"{d.width} must be a multiple of autoencoder.space_factor x patch = {step}")
    lt = 1 + (d.num_frames - 1) // a.time_factor
    _check(lt % m.patch_size[0] == 0, "model.patch_size",
           f"latent frames {lt} are not divisible by the time patch {m.patch_size[0]}")
    _check(d.max_objects >= 0, "data.max_objects", f"{d.max_objects} must be >= 0")
    _check(d.annotation in ("manual", "auto", "both"), "data.annotation",
           f"{d.annotation!r}; choose manual, auto or both")
    _check(d.missing_captions in ("skip", "error"), "data.missing_captions",
           f"{d.missing_captions!r}; choose skip or error")
    _check(d.crop in ("center", "random"), "data.crop", f"{d.crop!r}; choose center or random")
    _check(0.0 < d.fps <= 24.0, "data.fps", f"{d.fps} must be in (0, 24] (SA-V videos are 24 fps)")
    _check(d.max_objects <= 26, "data.max_objects", f"{d.max_objects} exceeds the 26-colour trajectory palette "
           "(ttm_jax/data/trajectory.py); use <= 26")
    _check(0.0 <= d.min_object_area < 1.0, "data.min_object_area", f"{d.min_object_area} must be in [0, 1)")
    _check(isinstance(d.num_workers, int) and d.num_workers >= 0, "data.num_workers",
           f"{d.num_workers!r} must be an int >= 0 (0: no worker processes)")
    _check(isinstance(d.read_threads, int) and d.read_threads >= 1, "data.read_threads",
           f"{d.read_threads!r} must be an int >= 1")
    _check(0 <= d.shuffle_seed < 2**32, "data.shuffle_seed", f"{d.shuffle_seed} must be in [0, 2**32) (Grain's range)")
    _check(d.synthetic_num_videos >= 1, "data.synthetic_num_videos", f"{d.synthetic_num_videos} must be >= 1")
    _check(t.d_model > 0 and t.num_layers > 0, "text_encoder", "d_model and num_layers must be positive")
    _check(t.tokenizer in ("byte", "sentencepiece"), "text_encoder.tokenizer",
           f"{t.tokenizer!r}; choose byte or sentencepiece")
    for name in ("vocab_size", "num_heads", "d_kv", "d_ff", "relative_attention_num_buckets",
                 "relative_attention_max_distance", "max_length", "local_max_length"):
        _check(isinstance(t[name], int) and t[name] > 0, f"text_encoder.{name}", f"{t[name]!r} must be a positive int")
    _check(t.relative_attention_num_buckets % 4 == 0 and t.relative_attention_max_distance
           > t.relative_attention_num_buckets // 4, "text_encoder.relative_attention_num_buckets",
           f"{t.relative_attention_num_buckets} must be a multiple of 4 and relative_attention_max_distance="
           f"{t.relative_attention_max_distance} larger than a quarter of it (T5 uses 32 and 128)")
    _check(t.tokenizer != "byte" or t.vocab_size >= 259, "text_encoder.vocab_size",
           f"{t.vocab_size} is too small for the byte tokenizer's 259 ids (ByT5 uses 384); set it to >= 259")
    _check(t.get("feed_forward", "gated-gelu") == "gated-gelu", "text_encoder.feed_forward",
           f"{t.get('feed_forward')!r}; only gated-gelu (T5 v1.1, ByT5, umT5) is implemented")
    _check(t.get("dtype", "float32") in DTYPES, "text_encoder.dtype", f"{t.get('dtype')!r}; choose one of {DTYPES}")
    _check(t.get("param_dtype", "float32") in DTYPES, "text_encoder.param_dtype",
           f"{t.get('param_dtype')!r}; choose one of {DTYPES}")
    s = config.sample
    _check(isinstance(s.num_steps, int) and s.num_steps >= 1, "sample.num_steps",
           f"{s.num_steps!r} must be an int >= 1")
    _check(s.schedule in ("linear_quadratic", "uniform"), "sample.schedule",
           f"{s.schedule!r}; choose linear_quadratic (Movie Gen) or uniform")
    _check(s.image_scale >= 0 and s.text_scale >= 0, "sample.image_scale",
           f"image_scale={s.image_scale}, text_scale={s.text_scale} must be >= 0 (1 and 1: no guidance)")
    _check_training(config)
    if t.tokenizer == "sentencepiece" and not t.tokenizer_path and not t.path:
        # describe mode builds shapes only and needs no tokenizer; main checks this again before training
        pass
    return config
