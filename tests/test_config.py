"""Configs: every variant validates; bad values fail at start-up naming the field and the fix."""

import importlib.util
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from ttm_jax import config as config_lib
from ttm_jax import main as main_lib
from ttm_jax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What `runlocal` sets, for every variant; everything else stays the variant's.
RUNLOCAL = {
    "data.num_frames": 5, "data.height": 32, "data.width": 32, "data.synthetic_num_videos": 8,
    "train.batch_size": 2, "train.total_steps": 8, "train.checkpoint_every_steps": 4, "train.log_every_steps": 1,
    "train.sample_every_steps": 8, "train.compiler_options": {"xla_backend_optimization_level": 0},
    "optim.warmup_steps": 2, "sample.num_steps": 2,
}
# ... except the clip shape where the variant's grid needs another: the SD VAE has no time compression (2 latent
# frames = 2 frames) and the SD 1.5 U-Net halves 8-cell latents three times (64 pixels)
# runlocal's clip is the shortest with motion: 2 latent frames (tiny_unet's latent is per frame: 2 frames)
RUNLOCAL_SHAPE = {"animatediff": {"data.num_frames": 2, "data.height": 64, "data.width": 64},
                  "tiny_unet": {"data.num_frames": 2},
                  # the tiny stages' per-frame latent (2 frames); their LR's fall is a share of the run, so it shrinks
                  # with it
                  "tiny": {"data.num_frames": 2}}


def _flat(c: ml_collections.ConfigDict) -> dict:
    """`section.key` -> value of a stage config (top-level scalars under their own name)."""
    out = {}
    for name, value in c.to_dict().items():
        if isinstance(value, dict):
            out.update({f"{name}.{k}": v for k, v in value.items()})
        else:
            out[name] = value
    return out


def _sample_config(arg=None) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("sample_config", os.path.join(ROOT, "configs", "sample.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("variant", config_lib.VARIANTS)
def test_variants_validate(stage, variant):
    c = config_lib.validate(config_lib.build(stage, variant))
    assert c.stage == stage and c.variant == variant
    # stage 1 is the paper's (motion prompt only, no added layers) except the tiny one, whose added layers give each
    # object's starting place its local prompt (docs/results.md); its added self-attention is never masked
    assert (c.model.ttm_layers == 0) == (stage == 1 and variant != "tiny")
    assert stage == 2 or not c.model.ttm_masked_self


def test_wan13b_shapes():
    m = config_lib.build(2, "wan1.3b").model
    assert (m.dim, m.num_layers, m.num_heads, m.ffn_dim, m.text_dim, m.freq_dim) == (1536, 30, 12, 8960, 4096, 256)
    assert tuple(m.patch_size) == (1, 2, 2)
    assert config_lib.build(2, "wan1.3b").autoencoder.latent_channels == 16


def test_latent_normalisation_is_space_to_depth_only():
    c = config_lib.build(2, "wan1.3b")
    assert (c.autoencoder.scaling_factor, c.autoencoder.shift_factor) == (1.0, 0.0)
    c.autoencoder.shift_factor = 0.5
    with pytest.raises(config_lib.ConfigError, match=r"config\.autoencoder\.scaling_factor: 1\.0 \(shift_factor 0\.5\) "
                                                     r"but the wan VAE"):
        config_lib.validate(c)


def test_arg_forms_agree():
    assert config_lib.build(2, "mid").to_dict() == config_lib.build(2, "variant=mid").to_dict()
    assert config_lib.build(2, None).variant == "tiny"


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("model.num_heads", 3, "config.model.dim"),
        ("model.attention", "flash", "config.model.attention"),
        ("model.ttm_layers", 9, "config.model.ttm_layers"),
        ("data.num_frames", 0, "config.data.num_frames"),
        ("data.height", 61, "config.data.height"),
        ("model.remat_policy", "some", "config.model.remat_policy"),
        ("autoencoder.latent_channels", 7, "config.autoencoder.latent_channels"),
        ("autoencoder.scaling_factor", 0.0, "config.autoencoder.scaling_factor"),
        ("data.annotation", "both_", "config.data.annotation"),
    ],
)
def test_bad_values_name_the_field(field, value, needle):
    c = config_lib.build(2, "tiny")
    section, key = field.split(".")
    c[section][key] = value
    with pytest.raises(config_lib.ConfigError, match=needle.replace(".", r"\.")):
        config_lib.validate(c)


def test_variant_table_entries_set_the_same_keys():
    # a variant is one entry of the table: every entry sets the same sections and keys
    # (the model section's keys are the backbone's: DiT variants set the DiT's fields, U-Net variants `backbone`,
    # `ttm_layers` and the `unet` sub-section, whose keys are the same in every U-Net variant)
    table = config_lib._VARIANT_TABLE
    assert config_lib.VARIANTS == tuple(table) == ("tiny", "mid", "wan1.3b", "wan14b", "tiny_unet", "animatediff")
    shape = {v: {section: sorted(values) for section, values in row.items()} for v, row in table.items()}
    first = {}
    for v, s in shape.items():
        backbone = table[v]["model"].get("backbone", "dit")
        assert s == shape[first.setdefault(backbone, v)]
        assert {k: x for k, x in s.items() if k != "model"} == {k: x for k, x in shape["tiny"].items() if k != "model"}
    units = [sorted(table[v]["model"]["unet"]) for v in ("tiny_unet", "animatediff")]
    assert units[0] == units[1]


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("variant", config_lib.VARIANTS)
def test_runlocal_shrinks_the_run_not_the_model(stage, variant):
    full = _flat(config_lib.build(stage, variant))
    local = config_lib.validate(config_lib.build(stage, f"{variant},runlocal"))
    assert _flat(local) == {**full, **RUNLOCAL, **RUNLOCAL_SHAPE.get(variant, {})}
    assert local.variant == variant
    # the other spellings agree; runlocal=0 is no runlocal
    for arg in (f"runlocal,{variant}", f"variant={variant},runlocal=1", f"variant={variant},runlocal=True"):
        assert config_lib.build(stage, arg).to_dict() == local.to_dict()
    assert config_lib.build(stage, f"{variant},runlocal=0").to_dict() == config_lib.build(stage, variant).to_dict()


def test_parse_arg():
    assert config_lib.parse_arg(None) == {"variant": "tiny", "runlocal": False}
    assert config_lib.parse_arg(" mid , runlocal ") == {"variant": "mid", "runlocal": True}
    spec = {"n": 3, "x": 1.5, "flag": False, "name": ""}
    assert config_lib.parse_arg("n=7,x=2,flag=yes,name=a=b", spec, bare_key=None) == {
        "n": 7, "x": 2.0, "flag": True, "name": "a=b"}
    assert config_lib.parse_arg("flag", spec, bare_key=None)["flag"] is True
    with pytest.raises(config_lib.ConfigError, match=r"^here: n='x' does not parse as int"):
        config_lib.parse_arg("n=x", spec, where="here")
    with pytest.raises(config_lib.ConfigError, match=r"argument 'word' is not key=value"):
        config_lib.parse_arg("word", spec, bare_key=None)


def test_sample_config_arg():
    default = _sample_config()
    c = _sample_config("num_steps=50, schedule=uniform,shift=2,ema=no,anchor_first_frame=1,caption=a cat")
    s = c.sample
    assert (s.num_steps, s.schedule, s.shift, s.ema, s.anchor_first_frame, s.caption) == (
        50, "uniform", 2.0, False, True, "a cat")
    assert isinstance(s.num_steps, int) and isinstance(s.shift, float)
    # nothing else moved
    changed = {k for k in s if s[k] != default.sample[k]}
    assert changed == {"num_steps", "schedule", "shift", "ema", "caption"}
    with pytest.raises(ValueError, match=r"configs/sample\.py: unknown key 'steps'; choose from \[.*'num_steps'"):
        _sample_config("steps=50")
    with pytest.raises(ValueError, match=r"configs/sample\.py: argument 'uniform' is not key=value"):
        _sample_config("uniform")


def test_first_error_is_reported_in_section_order():
    # validate checks model, autoencoder, data, text_encoder, sample, train, optim, objective, mesh in that order
    bad = [("mesh", "distributed", "x"), ("objective", "shift", 0.0), ("optim", "learning_rate", 0.0),
           ("train", "total_steps", 0), ("sample", "schedule", "x"), ("text_encoder", "tokenizer", "x"),
           ("data", "crop", "x"), ("autoencoder", "dtype", "x"), ("model", "dtype", "x")]
    c = config_lib.build(2, "tiny")
    for section, key, value in bad:
        c[section][key] = value
        with pytest.raises(config_lib.ConfigError, match=rf"^config\.{section}\.{key}:"):
            config_lib.validate(c)


def test_unknown_variant_and_arg_key():
    with pytest.raises(config_lib.ConfigError, match="unknown variant 'huge'"):
        config_lib.build(2, "huge")
    with pytest.raises(config_lib.ConfigError, match="unknown key"):
        config_lib.build(2, "variant=tiny,size=3")


def _main(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "ttm_jax.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_main_rejects_bad_value_before_compute(tmp_path):
    r = _main("--config=configs/stage2.py", f"--workdir={tmp_path}", "--config.model.attention=flash")
    assert r.returncode != 0
    assert "config.model.attention" in r.stderr and "choose one of" in r.stderr
    assert not os.listdir(tmp_path)  # nothing was written: no compute spent


def test_main_rejects_unknown_key(tmp_path):
    r = _main("--config=configs/stage2.py", f"--workdir={tmp_path}", "--config.model.nope=1")
    assert r.returncode != 0
    assert "nope" in r.stderr


def test_config_restored_from_workdir(tmp_path):
    c = config_lib.build(1, "tiny")
    c.train.total_steps = 7
    (tmp_path / "config.json").write_text(json.dumps(c.to_dict()))
    got = main_lib.resolve_config(False, config_lib.build(2, "tiny"), str(tmp_path))
    assert got.stage == 1 and got.train.total_steps == 7
    # an explicit --config wins over the saved one
    explicit = config_lib.build(2, "tiny")
    assert main_lib.resolve_config(True, explicit, str(tmp_path)) is explicit
    assert isinstance(got, ml_collections.ConfigDict)


def test_tiny_stage1_has_its_own_row_and_both_stages_share_the_data():
    """The tiny stages are the configurations that climbed the ladder (docs/results.md): a per-frame latent with 2x2
    patches, ddim_v trained at high noise, the LR falling over the second half; stage 1 with 6 layers at shift 12,
    stage 2 and TI2V with 4 at shift 4.
    Both stages read the same clips (6 fps, the binding rung, 1,000 videos), so stage 2 learns from the trajectories
    stage 1 generates; other variants keep 12 fps and the full set. `runlocal` keeps the fall of the LR (half the
    run) and a validated config."""
    s1, s2 = config_lib.build(1, "tiny"), config_lib.build(2, "tiny")
    assert (s1.model.num_layers, tuple(s1.model.patch_size), s1.autoencoder.time_factor,
            s1.autoencoder.latent_channels) == (6, (1, 2, 2), 1, 12)
    assert (s1.objective.name, s1.objective.shift, config_lib.cooldown_steps(s1.optim, s1.train.total_steps),
            s1.train.total_steps) == ("ddim_v", 12.0, 1000, 2000)
    t0 = config_lib.build(0, "tiny")
    for c in (s2, t0):  # stage 2 and the TI2V baseline: the same backbone (Table 3 compares them)
        assert (c.model.num_layers, tuple(c.model.patch_size), c.autoencoder.time_factor, c.objective.name,
                c.objective.shift, config_lib.cooldown_steps(c.optim, c.train.total_steps), c.train.total_steps) == (
                    4, (1, 2, 2), 1, "ddim_v", 4.0, 750, 1500)
    assert s2.autoencoder.to_dict() == s1.autoencoder.to_dict()
    assert config_lib.build(2, "tiny_unet").objective.shift == 1.0  # the rows are tiny's only
    for c in (s1, s2, config_lib.build(0, "tiny")):
        assert (c.data.fps, c.data.synthetic_rung, c.data.synthetic_num_videos) == (6.0, 3, 1000)
        assert 24.0 / c.data.fps == 4  # every clip frame an annotated SA-V frame: no staircase targets
    for v in ("mid", "tiny_unet"):
        d = config_lib.build(1, v).data
        assert (d.fps, d.synthetic_rung) == (12.0, 4)
    assert config_lib.build(1, "mid").objective.name == "rectified_flow"  # the stage-1 row is tiny's only
    c = config_lib.build(2, "tiny")  # a time-grouping latent: frames must be 1 + a multiple of its factor
    c.autoencoder.update(time_factor=4, latent_channels=48)
    c.data.num_frames = 10
    with pytest.raises(config_lib.ConfigError, match=r"config\.data\.num_frames: 10 must be 1 \+ a multiple"):
        config_lib.validate(c)
    r = config_lib.validate(config_lib.build(1, "tiny,runlocal"))
    assert config_lib.cooldown_steps(r.optim, r.train.total_steps) == r.train.total_steps // 2 > 0
    m = config_lib.validate(config_lib.build(2, "mid,runlocal"))
    assert config_lib.cooldown_steps(m.optim, m.train.total_steps) == 0  # none: none


def test_the_tiny_cooldown_is_a_share_of_the_run_so_a_changed_total_steps_keeps_it():
    """`--config.train.total_steps=N` on a tiny stage: the LR falls over the second half of the N steps (after the
    warm-up), and the config validates; an absolute `cooldown_steps` beside the share is refused."""
    for steps, want in ((3000, 1500), (1000, 500), (30, 10), (5, 0)):
        c = config_lib.build(1, "tiny")  # warm-up 20
        c.train.total_steps = steps
        config_lib.validate(c)
        assert config_lib.cooldown_steps(c.optim, steps) == want
        lr = state_lib.learning_rate_schedule(c.optim, steps)
        if want:  # full rate where the fall starts, 0 at the end
            assert (float(lr(steps - want)), float(lr(steps))) == pytest.approx((c.optim.learning_rate, 0.0))
        else:  # a run inside the warm-up has no fall
            assert float(lr(steps)) == pytest.approx(c.optim.learning_rate * steps / 20)
    c = config_lib.build(1, "tiny")
    c.optim.cooldown_steps = 100  # an absolute cooldown set on the command line wins over the share
    assert config_lib.cooldown_steps(config_lib.validate(c).optim, 2000) == 100
    c.optim.cooldown_fraction = 1.5
    with pytest.raises(config_lib.ConfigError, match=r"optim\.cooldown_fraction: 1\.5 must be in \[0, 1\]"):
        config_lib.validate(c)


def test_set_total_steps_keeps_the_cooldown_inside_the_run():
    """A shortened run (the notebook's step override, reproduce.py's presets) keeps a fall of the LR that fits: at most
    half the run and after the warm-up; a run without one gets none."""
    for steps, want in ((3000, 1000), (1000, 500), (30, 10), (5, 0)):
        c = config_lib.build(1, "tiny")  # warm-up 20; an absolute cooldown of 1,000
        c.optim.update(cooldown_steps=1000, cooldown_fraction=0.0)
        config_lib.set_total_steps(c, steps)
        assert (c.train.total_steps, c.optim.cooldown_steps) == (steps, want)
        config_lib.validate(c)
    c = config_lib.build(2, "mid")
    config_lib.set_total_steps(c, 100)
    assert c.optim.cooldown_steps == 0
