"""`python -m ttm_jax.main`: user errors are one line and exit 2 with the workdir left as it was; a run resumes from its
workdir with the saved config and the command line's overrides on top; library INFO logs go to `<workdir>/logs`."""

from __future__ import annotations

import json
import logging as std_logging
import os
import re
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from absl import flags
from absl import logging as absl_logging

from ttm_jax import config as config_lib
from ttm_jax import main as main_lib
from ttm_jax.runtime import checkpoint as checkpoint_lib
from ttm_jax.runtime import mesh as mesh_lib
from ttm_jax.train import preflight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE2 = os.path.join(ROOT, "configs", "stage2.py")
INFO_LINE = re.compile(r"^I\d{4} ", re.M)  # absl's INFO prefix


def _main(*args: str, devices: int = 8, **env_vars: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               **env_vars)
    return subprocess.run([sys.executable, "-m", "ttm_jax.main", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def _snapshot(root) -> dict[str, bytes | None]:
    """Every path under `root` -> its bytes (None for a folder): the workdir "exactly as it was"."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in filenames:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    return lines[0]


# ------------------------------------------------------------------------------------------------ in-process checks


def test_command_line_checks_name_the_fix():
    """Missing config file, unknown variant, unknown override keys (with the closest key) fail before absl parses."""
    with pytest.raises(config_lib.ConfigError, match=r"--config=configs/nope.py: no such file"):
        main_lib.check_command_line(["--config=configs/nope.py"])
    with pytest.raises(config_lib.ConfigError, match="unknown variant 'huge'"):
        main_lib.check_command_line([f"--config={STAGE2}:huge"])
    with pytest.raises(config_lib.ConfigError,
                       match=r"--config.train.total_step: unknown key 'total_step' in config.train; did you mean "
                             r"--config.train.total_steps\?"):
        main_lib.check_command_line([f"--config={STAGE2}", "--config.train.total_step=5"])
    with pytest.raises(config_lib.ConfigError, match=r"unknown key 'trian' in the config; did you mean "
                                                     r"--config.train.total_steps\?"):
        main_lib.check_command_line(["--config.trian.total_steps=5"])  # the default config file
    with pytest.raises(config_lib.ConfigError, match=r"unknown key 'zzz' in config.mesh.shape; the keys of "
                                                     r"config.mesh.shape are \['data', 'fsdp', 'tensor'\]"):
        main_lib.check_command_line([f"--config={STAGE2}", "--config.mesh.shape.zzz=2"])
    with pytest.raises(config_lib.ConfigError, match=r"did you mean --config\.optim\.learning_rate\?"):
        main_lib.check_command_line([f"--config={STAGE2}", "--config.train.learning_rate=1e-4"])
    assert main_lib.check_command_line([f"--config={STAGE2}:mid", "--config.mesh.shape.fsdp=2",
                                        "--noconfig.train.tensorboard"]) is True
    assert main_lib.check_command_line(["--workdir=/x", "--config.train.total_steps=5"]) is False


def test_preflight_fits_the_devices_and_finds_the_files(tmp_path):
    """Mesh vs devices, batch vs batch shards, splash off TPU and missing data paths: `ConfigError`s naming the
    field and the fix (8 simulated CPU devices)."""
    devices = jax.devices()
    assert len(devices) == 8 and issubclass(mesh_lib.MeshError, config_lib.ConfigError)

    def fails(match: str, **changes) -> None:
        c = config_lib.build(2, "tiny")
        c.train.batch_size = 8
        for key, value in changes.items():
            section, name = key.split("__")
            c[section][name] = value
        with pytest.raises(config_lib.ConfigError, match=match):
            preflight.preflight(c, str(tmp_path), devices)

    c = config_lib.build(2, "tiny")
    c.train.batch_size = 8
    assert preflight.preflight(c, str(tmp_path), devices) is c
    c.mesh.shape = {"data": 1, "fsdp": 3, "tensor": 1}
    with pytest.raises(mesh_lib.MeshError, match=r"^config\.mesh\.shape: .* has 3 devices but 8 are available"):
        preflight.preflight(c, str(tmp_path), devices)
    fails(r"^config\.train\.batch_size: 4 does not split over the 8 batch shards .* multiple of 8", train__batch_size=4)
    fails(r"^config\.model\.attention: 'splash' is a TPU kernel but the devices are cpu; set "
          r"--config\.model\.attention=xla", model__attention="splash")
    fails(r"^config\.data\.prepared_path: '/nonexistent/prepared' does not exist; set it to a folder made by",
          data__prepared_path="/nonexistent/prepared")
    fails(r"^config\.data\.sav_path: '/nonexistent/sav' does not exist", data__sav_path="/nonexistent/sav",
          data__captions=str(tmp_path))
    fails(r"^config\.data\.captions: empty but config\.data\.sav_path is set", data__sav_path=str(tmp_path))
    fails(r"^config\.data\.captions: '/nonexistent/c.jsonl' does not exist", data__sav_path=str(tmp_path),
          data__captions="/nonexistent/c.jsonl")
    fails(r"^config\.train\.init_from: '/nonexistent/params' does not exist", train__init_from="/nonexistent/params")
    assert not os.listdir(tmp_path)  # preflight writes nothing


def _saved_run(workdir, config: ml_collections.ConfigDict) -> None:
    """A checkpoint of `config` at step 3 (a real Orbax step folder with a small state), as a run leaves it."""
    ckpt = checkpoint_lib.Checkpointer(str(workdir), async_save=False)
    ckpt.save(3, {"w": np.arange(4, dtype=np.float32)}, None, config)
    ckpt.close()


def test_resume_takes_the_checkpoint_config_and_the_overrides(tmp_path, tmp_path_factory):
    """Without --config: the latest checkpoint's config (not config.json) with the overrides on top, typed as the
    saved values; an override the saved config lacks is a user error unless today's config of the run's stage and
    variant has it (a newer field); with --config the given config wins; the workdir is only read."""
    saved = config_lib.build(1, "tiny")
    saved.train.total_steps = 7
    saved.data.synthetic_num_videos = 3
    saved.data.prepared_path = "/data/prepared"
    _saved_run(tmp_path, saved)
    stale = config_lib.build(2, "tiny")  # config.json can be stale or wrong: the checkpoint is the truth
    (tmp_path / "config.json").write_text(stale.to_json())
    before = _snapshot(tmp_path)
    default = config_lib.build(2, "tiny")

    got = main_lib.resolve_config(False, default, str(tmp_path), {"train.total_steps": 9, "optim.learning_rate": 1})
    assert got.stage == 1 and got.train.total_steps == 9 and got.data.synthetic_num_videos == 3
    assert got.data.prepared_path == "/data/prepared" and got.model.ttm_masked_self is False  # stage 1's
    assert got.optim.learning_rate == 1.0 and isinstance(got.optim.learning_rate, float)
    assert not got.is_locked  # the run may still set fields (as a config from --config)
    with pytest.raises(config_lib.ConfigError, match=r"^config\.train\.nope: not a field of the config saved in"):
        main_lib.resolve_config(False, default, str(tmp_path), {"train.nope": 1})
    with pytest.raises(config_lib.ConfigError, match=r"^config\.train\.total_steps: 'x' does not fit"):
        main_lib.resolve_config(False, default, str(tmp_path), {"train.total_steps": "x"})
    assert main_lib.resolve_config(True, default, str(tmp_path), {"train.total_steps": 9}) is default
    # a field newer than the saved run (its config lacks it, the current defaults have it) is added with the value
    # given, typed as the default; the run's other fields stay as saved
    with saved.unlocked():
        del saved.optim["cooldown_steps"]
    older = tmp_path_factory.mktemp("older")
    _saved_run(older, saved)
    got = main_lib.resolve_config(False, default, str(older), {"optim.cooldown_steps": 3})
    assert got.optim.cooldown_steps == 3 and isinstance(got.optim.cooldown_steps, int)
    with pytest.raises(config_lib.ConfigError, match=r"^config\.optim\.cooldown_steps: 2\.5 does not fit"):
        main_lib.resolve_config(False, default, str(older), {"optim.cooldown_steps": 2.5})
    # a field of another variant is not "newer": a U-Net run refuses the DiT's model.patch_size, although the
    # default config file (a DiT) has it
    unet_run = tmp_path_factory.mktemp("unet_run")
    _saved_run(unet_run, config_lib.build(1, "tiny_unet"))
    assert "patch_size" in default.model
    with pytest.raises(config_lib.ConfigError, match=r"^config\.model\.patch_size: not a field"):
        main_lib.resolve_config(False, default, str(unet_run), {"model.patch_size": (1, 2, 2)})
    assert got.train.total_steps == 7 and got.stage == 1
    # without an override the field newer than the run comes back with the value the run had (`config.upgrade`:
    # checkpoint.load_config completes the saved config), not today's default
    assert main_lib.resolve_config(False, default, str(older), {}).optim.cooldown_steps == 0
    with pytest.raises(config_lib.ConfigError, match=r"^config\.optim\.nope: not a field"):
        main_lib.resolve_config(False, default, str(older), {"optim.nope": 1})
    empty = tmp_path / "new"
    assert main_lib.resolve_config(False, default, str(empty), {"train.total_steps": 9}) is default
    # a config that changes a field shaping the checkpointed state is refused before anything is written
    preflight.check_resume(got, str(tmp_path))
    got.model.dim = 64
    with pytest.raises(config_lib.ConfigError, match=r"cannot resume.*config\.model\.dim: checkpoint 128, now 64"):
        preflight.check_resume(got, str(tmp_path))
    assert _snapshot(tmp_path) == before


def test_library_logs_go_to_the_workdir_warnings_to_the_console(tmp_path, capfd):
    """INFO is held, then written to `<workdir>/logs/ttm_jax.<host>.<pid>.log`; warnings reach stderr at once;
    `undo` (a user error after the file was started) removes the file and the folders it made."""
    handler = absl_logging.get_absl_handler()
    root = std_logging.getLogger()
    had = handler in root.handlers
    stream, threshold, verbosity = handler.python_handler.stream, flags.FLAGS.stderrthreshold, flags.FLAGS.verbosity
    absl_logging.use_absl_handler()
    flags.FLAGS.verbosity = 0
    try:
        logs = main_lib.LibraryLogs()
        absl_logging.info("held info line")
        absl_logging.warning("a warning line")
        workdir = tmp_path / "run"
        path = logs.to_file(str(workdir))
        absl_logging.info("later info line")
        assert os.path.dirname(path) == str(workdir / "logs")
        assert re.fullmatch(rf"ttm_jax\..+\.{os.getpid()}\.log", os.path.basename(path))
        handler.flush()
        text = open(path).read()
        assert "held info line" in text and "a warning line" in text and "later info line" in text
        err = capfd.readouterr().err
        assert "a warning line" in err and "info line" not in err
        logs.undo()
        assert not workdir.exists()  # made by to_file, removed by undo
        absl_logging.info("dropped info line")
        assert "info line" not in capfd.readouterr().err
    finally:
        handler.python_handler.stream = stream
        flags.FLAGS.stderrthreshold = threshold
        flags.FLAGS.verbosity = verbosity
        if not had:
            root.removeHandler(handler)


# ----------------------------------------------------------------------------------------------- the command line


@pytest.mark.slow  # a subprocess (10 s); the suite keeps the in-process check (test_command_line_checks_name_the_fix)
def test_unknown_override_key_is_one_line(tmp_path):  # and the one-line subprocess errors below
    r = _main(f"--config={STAGE2}", f"--workdir={tmp_path}", "--config.train.total_step=5")
    line = _one_error_line(r)
    assert "--config.train.total_step" in line and "did you mean --config.train.total_steps?" in line
    assert not os.listdir(tmp_path)


def test_resumed_config_errors_leave_the_workdir_as_it_was(tmp_path):
    """`--workdir=W --config.data.sav_path=<exists>` on a run whose saved config names captions that do not exist:
    the override applies on top of the saved config (the sav_path error is gone, the saved captions are named), the
    error is one line, exit 2, and W is byte for byte what it was (no config.json rewrite, no logs)."""
    saved = config_lib.build(1, "tiny")
    saved.data.sav_path = "/nonexistent/sav"
    saved.data.captions = "/nonexistent/captions.jsonl"
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(saved.to_json(indent=2))
    before = _snapshot(workdir)
    r = _main(f"--workdir={workdir}", f"--config.data.sav_path={tmp_path}", devices=1)
    line = _one_error_line(r)
    assert line.startswith("error: config.data.captions: '/nonexistent/captions.jsonl' does not exist"), line
    assert _snapshot(workdir) == before


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> dict:
    """Run 1: a fresh 1-step tiny run. Then config.json is deleted and run 2 is `--workdir=W
    --config.train.total_steps=2` alone (one device each)."""
    root = tmp_path_factory.mktemp("cli")
    workdir = root / "run"
    cache = {"JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache")}  # the second run reuses the first one's compiles
    first = _main(f"--config={STAGE2}:runlocal", f"--workdir={workdir}", "--config.train.total_steps=1",
                  "--config.data.synthetic_num_videos=2", "--config.train.sample_every_steps=0",
                  "--config.train.tensorboard=false", devices=1, **cache)
    first_logs = sorted(os.listdir(workdir / "logs")) if (workdir / "logs").exists() else []
    if (workdir / "config.json").exists():
        os.remove(workdir / "config.json")
    second = _main(f"--workdir={workdir}", "--config.train.total_steps=2", devices=1, **cache)
    return {"workdir": workdir, "first": first, "second": second, "first_logs": first_logs}


# The three `two_runs` tests (two training subprocesses, ~55 s of the suite) run with the slow ones; the suite keeps
# their in-process siblings: test_library_logs_go_to_the_workdir_warnings_to_the_console (console vs log file),
# test_resume_takes_the_checkpoint_config_and_the_overrides (checkpoint config + overrides, refused resume, workdir
# untouched) and test_resumed_config_errors_leave_the_workdir_as_it_was (a resume refused from the command line).
@pytest.mark.slow
def test_console_carries_the_project_lines_library_info_goes_to_the_log(two_runs):
    first = two_runs["first"]
    assert first.returncode == 0, first.stderr[-3000:]
    assert "step 1/1" in first.stdout
    assert not INFO_LINE.search(first.stderr), first.stderr[-3000:]
    assert "INFO" not in first.stderr
    (log,) = two_runs["first_logs"]
    text = (two_runs["workdir"] / "logs" / log).read_text()
    assert INFO_LINE.search(text)  # absl / Orbax INFO lines are kept, in the file
    assert not INFO_LINE.search(two_runs["second"].stderr)


@pytest.mark.slow  # see above
def test_resume_from_the_workdir_alone_applies_the_overrides(two_runs):
    """config.json is gone: the checkpoint's config is used (its synthetic_num_videos=2, runlocal shapes) and
    `--config.train.total_steps=2` applies on top, so the run trains step 2 instead of saying there is nothing to do."""
    second, workdir = two_runs["second"], two_runs["workdir"]
    assert two_runs["first"].returncode == 0 and second.returncode == 0, second.stderr[-3000:]
    assert f"using the config saved in {workdir} with train.total_steps=2" in second.stdout
    assert "resuming from step 1" in second.stdout and "step 2/2" in second.stdout
    ckpt = checkpoint_lib.Checkpointer(str(workdir), async_save=False)
    try:
        assert ckpt.all_steps() == [1, 2]
        config = ckpt.restore_config(2)
    finally:
        ckpt.close()
    assert config.train.total_steps == 2 and config.data.synthetic_num_videos == 2
    assert config.data.height == 32 and not config.train.tensorboard
    assert json.loads((workdir / "config.json").read_text())["train"]["total_steps"] == 2


@pytest.mark.slow  # see above
def test_refused_resume_writes_nothing(two_runs):
    """`--workdir=W --config.model.dim=64` on W's checkpoints: one line naming the field, exit 2, W unchanged (no
    config.json rewrite, no new log file)."""
    workdir = two_runs["workdir"]
    before = _snapshot(workdir)
    r = _main(f"--workdir={workdir}", "--config.model.dim=64", devices=1)
    line = _one_error_line(r)
    assert "cannot resume" in line and "config.model.dim: checkpoint 128, now 64" in line
    assert _snapshot(workdir) == before
