"""The one entry point: `python -m ttm_jax.main --config=configs/stage2.py[:variant] --workdir=DIR [--mode=...]`.

Modes:
  train     (default for stage configs) train stage 1 or 2; resumes from the workdir's latest checkpoint
  describe  build the model with `jax.eval_shape` (no parameter memory): per-module parameter table, totals,
            FLOPs per training step from the compiled cost analysis, and the memory per device on config.mesh
            (`--describe_devices=N`; e.g. `--config.mesh.shape.fsdp=2 --config.mesh.context=4`)
  sample    (default for `configs/sample.py`) two-stage generation from trained workdirs
  (eval)    `configs/eval.py` (job "eval"): generate an SA-V-128 benchmark's videos and score them (Table 1)

Overrides: `--config.train.total_steps=500`, `--config.model.attention=splash`, ..., typed by the config file's values.

Resuming: without `--config`, a workdir that holds a run restarts from the config that run saved (the latest
checkpoint's, else `config.json`: `checkpoint.load_config`), and the `--config.x.y=v` overrides apply on top of it
(`--workdir=DIR --config.train.total_steps=2000` trains further). With `--config`, the given config is the run's; a
change of a field that shapes the checkpointed state is refused by `loop.train` before anything is written.

User errors (a bad value, an unknown override key, a missing config file or data path, a mesh or batch that does not
fit the devices, the splash kernel off TPU, a refused resume) print one line `error: ...` naming the field and the fix
and exit with status 2, leaving the workdir as it was; tracebacks are for bugs. The checks that need the devices or
the file system run before training (`ttm_jax/train/preflight.py`).

Console: the project's own lines (progress, `wrote <path>`) and library warnings and errors. Library INFO logs (absl,
Orbax, Grain, JAX) go to `<workdir>/logs/ttm_jax.<host>.<pid>.log` (`--log_dir` moves them); `--verbosity=0` (or
`--logtostderr` / `--alsologtostderr`) puts them back on the console.
"""

from __future__ import annotations

import difflib
import importlib.util
import io
import os
import re
import socket
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from ttm_jax import cli, describe
from ttm_jax import config as config_lib
from ttm_jax.eval import run as eval_run
from ttm_jax.inference import run as sample_run
from ttm_jax.runtime import checkpoint as checkpoint_lib
from ttm_jax.train import loop
from ttm_jax.train import preflight as preflight_lib

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "stage2.py")

_STATE: dict[str, Any] = {"config_given": False}
_CONFIG_ARG = re.compile(r"^--?config(=|$)")
_OVERRIDE_ARG = re.compile(r"^--?(?:no)?config\.([^=]+)")
LOG_DIR = "logs"  # <workdir>/logs: the library INFO logs of every process


# --------------------------------------------------------------------------------------------------- command line


def config_spec(argv: Sequence[str]) -> str | None:
    """The `--config` value on the command line (`--config=F[:A]` or `--config F[:A]`), None when it is absent."""
    for i, arg in enumerate(argv):
        m = _CONFIG_ARG.match(arg)
        if m:
            if m.group(1) == "=":
                return arg.split("=", 1)[1]
            return argv[i + 1] if i + 1 < len(argv) else ""
    return None


def override_keys(argv: Sequence[str]) -> list[str]:
    """The dotted keys of the `--config.x.y=v` (and `--noconfig.x.y`) overrides, in command-line order."""
    return [m.group(1) for m in (_OVERRIDE_ARG.match(a) for a in argv) if m]


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`FILE[:ARG]` -> `FILE`'s `get_config(ARG)`, as `--config` loads it; `ConfigError` for a missing file (and
    from `get_config`, e.g. an unknown variant)."""
    path, sep, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise config_lib.ConfigError(f"--config={spec}: no such file {path!r}; give a config file such as "
                                     f"configs/stage2.py[:tiny|mid|wan1.3b] or configs/sample.py")
    module_spec = importlib.util.spec_from_file_location("ttm_main_config", path)
    if module_spec is None or module_spec.loader is None:
        raise config_lib.ConfigError(f"--config={spec}: {path!r} is not a Python config file with get_config()")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if sep else module.get_config()


def _keys(c: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    out = []
    for k, v in c.items():
        out.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            out += _keys(v, f"{prefix}{k}.")
    return out


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node[part]
    return node


def check_override_keys(config: ml_collections.ConfigDict, keys: Sequence[str]) -> None:
    """Every override key names a field of `config`; else `ConfigError` with the closest key ("did you mean")."""
    known = _keys(config)
    for key in keys:
        if key in known:
            continue
        parts = key.split(".")
        depth = next(i for i in range(len(parts)) if ".".join(parts[:i + 1]) not in known)
        section, name = ".".join(parts[:depth]), parts[depth]
        where = f"config.{section}" if section else "the config"
        if section and not isinstance(_get(config, section), ml_collections.ConfigDict):
            raise config_lib.ConfigError(f"--config.{key}: config.{section} is a value, not a section; override it "
                                         f"as --config.{section}=...")
        siblings = sorted(k.rsplit(".", 1)[-1] for k in known if k.rpartition(".")[0] == section)
        close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
        if close:  # a typo: the closest key of the same section, the rest of the key kept
            guess = ".".join([*parts[:depth], close[0], *parts[depth + 1:]])
        else:  # the right key in another section (train.learning_rate -> optim.learning_rate)
            guess = next((k for k in known if k.rsplit(".", 1)[-1] == parts[-1] and k != key), "")
        hint = f"did you mean --config.{guess}?" if guess else f"the keys of {where} are {siblings}"
        raise config_lib.ConfigError(f"--config.{key}: unknown key {name!r} in {where}; {hint}")


def check_command_line(argv: Sequence[str]) -> bool:
    """The checks that must come before the flag parser: the config file exists and loads (variant, arguments), and
    every override key exists in it. Raises `ConfigError`; returns whether `--config` was given."""
    spec = config_spec(argv)
    config = load_config_file(_DEFAULT_CONFIG if spec is None else spec)
    check_override_keys(config, override_keys(argv))
    return spec is not None


def parse_flags(argv: list[str]) -> list[str]:
    """`app.run`'s flags parser: `check_command_line`, then absl (`--config=<default>` added when `--config` is
    absent, so that overrides are typed by the default file); a user error prints one line and exits 2."""
    try:
        argv = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)  # --flagfile may hold --config
        given = check_command_line(argv[1:])
        if not given:
            argv = [argv[0], f"--config={_DEFAULT_CONFIG}", *argv[1:]]
            sys.argv = list(argv)  # config_flags reads the overrides from sys.argv
        _STATE["config_given"] = given
        return flags.FLAGS(argv)
    except (cli.UserError, flags.Error) as e:
        cli.fail(e)


# ------------------------------------------------------------------------------------------------------- resuming


def _lookup(config: ml_collections.ConfigDict, key: str) -> tuple[bool, Any]:
    """(found, value) of the dotted `key` in `config` (`_get`, which raises for a missing key)."""
    try:
        return True, _get(config, key)
    except (KeyError, AttributeError, TypeError):
        return False, None


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any], where: str,
                    defaults: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """`config` with the flat `overrides` (`{"train.total_steps": 6}`) set in place, each cast to the type of the
    value it replaces (ConfigDict's rules); `ConfigError` naming `where` for a key `config` lacks or a value that
    does not cast. A key `config` lacks whose section it has and `defaults` (today's config of the saved run's own
    stage and variant) knows is a field newer than the saved run (`optim.cooldown_steps` on a run saved before it
    existed): it is added, cast to the type of the default's value."""
    config.lock()
    try:
        for key, value in overrides.items():
            section, _, leaf = key.rpartition(".")
            has_section, node = _lookup(config, section) if section else (True, config)
            known, default = _lookup(defaults, key) if defaults is not None else (False, None)
            if (has_section and isinstance(node, ml_collections.ConfigDict) and leaf not in node and known
                    and not isinstance(default, ml_collections.ConfigDict)):
                with node.unlocked():
                    node[leaf] = default
                print(f"config.{key}: not in the config saved in {where} (a field newer than the run); added",
                      flush=True)
            try:
                config.update_from_flattened_dict({key: value})
            except (KeyError, AttributeError):
                raise config_lib.ConfigError(f"config.{key}: not a field of the config saved in {where}; drop the "
                                             f"override or give --config") from None
            except TypeError as e:
                raise config_lib.ConfigError(f"config.{key}: {value!r} does not fit the saved value ({e})") from None
    finally:
        config.unlock()
    return config


def resolve_config(config_flag_present: bool, config: ml_collections.ConfigDict, workdir: str | None,
                   overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """The config of the run: `config` (from `--config`, overrides applied) when `--config` was given; else the config
    saved in `workdir` (`checkpoint.load_config`: the latest checkpoint's, else `config.json`) with `overrides` (the
    flat `--config.x.y=v` values) applied on top; else `config` (the default file, overrides applied). Reads only."""
    if config_flag_present or not workdir:
        return config
    try:
        saved = checkpoint_lib.load_config(workdir)
    except FileNotFoundError:
        return config
    try:  # today's defaults of the run's own stage and variant: which of its missing fields are newer than it
        defaults = config_lib.build(int(saved.stage), str(saved.variant))
    except (AttributeError, KeyError, ValueError, config_lib.ConfigError):
        defaults = None
    apply_overrides(saved, overrides or {}, workdir, defaults=defaults)
    given = ", ".join(f"{k}={v!r}" for k, v in (overrides or {}).items())
    print(f"using the config saved in {workdir}" + (f" with {given}" if given else ""), flush=True)
    return saved


# -------------------------------------------------------------------------------------------------------- console


class LibraryLogs:
    """Where the library INFO logs go: held in memory until the run's checks pass, then into
    `<workdir>/logs/ttm_jax.<host>.<pid>.log` (or `--log_dir`); warnings and errors also go to the console throughout.
    Inactive (logging as absl sets it up) when `--verbosity`, `--logtostderr` or `--alsologtostderr` is given."""

    def __init__(self) -> None:
        f = flags.FLAGS
        self.active = not (f["verbosity"].present or f["logtostderr"].value or f["alsologtostderr"].value)
        self.path: str | None = None
        self._created: list[str] = []
        if not self.active:
            return
        if not f["stderrthreshold"].present:
            f.stderrthreshold = "warning"
        self._swap(io.StringIO())

    @staticmethod
    def _handler() -> Any:
        return logging.get_absl_handler().python_handler

    def _swap(self, stream: Any) -> Any:
        handler = self._handler()
        handler.acquire()
        try:
            old, handler.stream = handler.stream, stream
        finally:
            handler.release()
        return old

    def to_file(self, workdir: str) -> str | None:
        """Start the log file (the held lines first); returns its path (None when inactive)."""
        if not self.active or self.path is not None:
            return self.path
        given = flags.FLAGS["log_dir"].present and flags.FLAGS.log_dir
        log_dir = flags.FLAGS.log_dir if given else os.path.join(workdir, LOG_DIR)
        if "://" in log_dir:  # a gs:// workdir: an object store holds no file to append to, so a local folder
            log_dir = os.path.join(tempfile.gettempdir(), "ttm_jax_logs")
            print(f"library logs: {log_dir} (the workdir is not a local folder; --log_dir=DIR moves them)", flush=True)
        missing = []
        d = os.path.abspath(log_dir)
        while not os.path.exists(d):
            missing.append(d)
            d = os.path.dirname(d)
        os.makedirs(log_dir, exist_ok=True)
        self._created = missing  # deepest first
        self.path = os.path.join(log_dir, f"ttm_jax.{socket.gethostname()}.{os.getpid()}.log")
        fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - the log handler owns it until exit
        held = self._swap(fh)
        fh.write(held.getvalue() if isinstance(held, io.StringIO) else "")
        fh.flush()
        return self.path

    def discard(self) -> None:
        """Drop the held lines and keep dropping INFO (describe without a workdir)."""
        if self.active and self.path is None:
            self._swap(open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115

    def undo(self) -> None:
        """After a user error: remove the log file and the folders `to_file` made (the workdir as it was)."""
        if not self.active:
            return
        old = self._swap(open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115
        if self.path is None:
            return
        old.close()
        if os.path.exists(self.path):
            os.remove(self.path)
        for d in self._created:
            try:
                os.rmdir(d)
            except OSError:
                break  # not empty: something else wrote there


# ----------------------------------------------------------------------------------------------------------- main


def run_job(config: ml_collections.ConfigDict, workdir: str | None, mode: str | None, logs: LibraryLogs) -> None:
    """Check `config` (and, for training, the devices and files: `preflight`), then sample, describe or train."""
    job = config.get("job", "train")
    mode = mode or ("sample" if job == "sample" else "train")
    if job == "eval":
        if workdir is None:
            raise app.UsageError("--workdir is required: the folder where the videos and results are written")
        eval_run.validate(config)
        logs.to_file(workdir)
        eval_run.evaluate(config, workdir)
        return
    if mode == "sample" or job == "sample":
        if workdir is None:
            raise app.UsageError("--workdir is required: the folder where the videos are written")
        sample_run.validate(config)
        logs.to_file(workdir)
        sample_run.sample(config, workdir)
        return
    # A bad config fails here, before any compute is spent and before anything is written.
    config_lib.validate(config)
    if mode == "describe":
        logs.discard()
        preflight_lib.check_attention(config)  # describe compiles the step: the kernel must run here
        describe.describe(config, devices=flags.FLAGS.describe_devices)
        return
    if workdir is None:
        raise app.UsageError("--workdir is required for training: checkpoints, metrics and samples go there")
    preflight_lib.preflight(config, workdir)
    logs.to_file(workdir)
    loop.train(config, workdir)


def main(argv: Sequence[str]) -> None:
    """absl main: resolve the config (`resolve_config`), run the job; a user error prints one line and exits 2."""
    logs = LibraryLogs()
    try:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {list(argv[1:])}; overrides are flags: "
                                 f"--config.train.total_steps=10")
        overrides = config_flags.get_override_values(flags.FLAGS["config"])
        f = flags.FLAGS
        config = resolve_config(_STATE["config_given"], f.config, f.workdir, overrides)
        run_job(config, f.workdir, f.mode, logs)
    except (cli.UserError, app.UsageError) as e:  # ConfigError, MeshError, WorkdirLocked, NoUsableCheckpoint, ...
        if not getattr(e, "mid_run", False):  # refused before the run wrote anything: leave the workdir as it was
            logs.undo()
        cli.fail(e)


def define_flags() -> None:
    """The flags of `main` (defined only when this module runs, so importing it defines nothing). `--config` has no
    default: a default would be parsed, with the command line's overrides, when the flag is defined, where a bad
    override cannot be reported. `parse_flags` gives `--config=<default>` to the flag parser when `--config` is
    absent, and remembers that it was (`_STATE["config_given"]`)."""
    config_flags.DEFINE_config_file(
        "config", None, "Config file, `path.py[:arg]`; default: configs/stage2.py (tiny), or, with --workdir of a "
        "run, the config that run saved.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Where checkpoints, metrics, samples, logs and the config go.")
    flags.DEFINE_enum("mode", None, ["train", "describe", "sample"], "What to do; default from the config.")
    flags.DEFINE_integer(
        "describe_devices", None, "--mode=describe: plan the memory per device for this many devices on config.mesh "
        "(default: the mesh's product when no size is -1, else this host's devices); nothing runs on them.")


if __name__ == "__main__":
    define_flags()
    cli.run(main, flags_parser=parse_flags)
