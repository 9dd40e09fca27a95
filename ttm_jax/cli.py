"""The command lines: their one index (`COMMANDS`; `python -m ttm_jax` lists it) and their one rule.

Every command is `python -m ttm_jax.<module>` on absl flags, one pattern: the module's docstring gives the usage,
`define_flags()` defines its flags (only when it runs, so importing it defines nothing), `main(argv)` reads
`flags.FLAGS`, and `if __name__ == "__main__": define_flags(); cli.run(main)`. A new command is one row of `COMMANDS`
(tests/test_command_lines.py runs every row).

The rule: a user error prints one line `error: <what, naming the flag, field or file, and the fix>` on stderr and
exits with status 2, before anything is written where it can; a traceback means a bug.

A user error is an instance of `UserError`. The project's error classes for bad input derive from it (`ConfigError`,
`RecordError`, `CaptionsError`, `ConversionError`, `LLMError`, `NoUsableCheckpoint`, `WorkdirLocked`, the prompt
planner's), and so do `BadInput` (a flag's or argument's value; also a `ValueError`) and `MissingInput` (a path
the user gave that is not there; also a `FileNotFoundError`), which library code raises where the value came from the
user. absl's flag errors (unknown flag, missing required flag, a value of the wrong type) follow the same rule.
Layer 0: imports nothing of ours.
"""
from __future__ import annotations

import errno
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import app, flags

EXIT_USER_ERROR = 2

# every command line, `python -m <module>`: what it does, in one line (the order of a project: data, train, convert,
# evaluate)
COMMANDS = {
    "ttm_jax.data.synthetic": "synthetic SA-V: moving coloured shapes, their masklets, a captions sidecar",
    "ttm_jax.data.caption": "VLM captions of SA-V videos (OpenAI-compatible server) -> captions sidecar",
    "ttm_jax.data.label": "Grounding DINO + SAM2 tracking -> SA-V annotations of any folder of videos",
    "ttm_jax.data.prepare": "SA-V videos + captions sidecar -> training clips (ArrayRecord folder or TFDS)",
    "ttm_jax.data.encode": "prepared clips -> cached VAE latents and text embeddings",
    "ttm_jax.main": "train a stage, describe it (--mode), sample videos, or evaluate (configs/eval.py)",
    "ttm_jax.convert": "checkpoints --from=KIND:PATH --to=KIND:PATH (diffusers, orbax, workdir, torch)",
    "ttm_jax.eval.motion_bench": "the held-out synthetic motion benchmark (scenes, requests, masks)",
    "ttm_jax.eval.sav128": "the SA-V-128 benchmark built from SA-V val/test videos",
    "ttm_jax.eval.metrics": "FVD, CLIP-Frame/Text, ViCLIP-T/V, displacement of two folders of videos",
}


def command_list() -> str:
    """The `COMMANDS` table as text: one `python -m <module>` per line with what it does."""
    width = max(len(m) for m in COMMANDS) + len("python -m ")
    rows = [f"  {'python -m ' + m:<{width}}  {what}" for m, what in COMMANDS.items()]
    return "\n".join(["ttm-jax commands (each takes --help):", *rows])


class UserError(Exception):
    """Bad input from the user (a flag, a config field, a file's content): one line and exit 2 at a command line."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the field and the fix. Here, not in `ttm_jax.config`, so
    that a backbone family's `config.py` checks its fields without importing the config package that imports it
    (`ttm_jax.config.ConfigError` is this class)."""


def check_config(cond: bool, field: str, msg: str) -> None:
    """Raise `ConfigError("config.<field>: <msg>")` unless `cond`: every config check's one form."""
    if not cond:
        raise ConfigError(f"config.{field}: {msg}")


class BadInput(UserError, ValueError):
    """A value the user gave is wrong: a flag, a config field, or what a file of theirs holds; the message names it
    and the fix."""


class MissingInput(UserError, FileNotFoundError):
    """A path the user gave does not exist; the message names the flag and what should be there."""


class BadFile(UserError, OSError):
    """A file the user gave cannot be read to the end (truncated, unreadable); the message names it."""


# what the storage says when it refuses a write: the errno of an OSError, or these words in an error's text (tensorstore
# and Orbax report the OS error inside their own exception's message)
_STORAGE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EFBIG: "file too large (a file size limit)",
                   errno.EROFS: "read-only file system", errno.EDQUOT: "disk quota exceeded",
                   errno.EACCES: "permission denied"}
_STORAGE_WORDS = {"no space left on device": _STORAGE_ERRNOS[errno.ENOSPC],
                  "file too large": _STORAGE_ERRNOS[errno.EFBIG],
                  "read-only file system": _STORAGE_ERRNOS[errno.EROFS],
                  "disk quota exceeded": _STORAGE_ERRNOS[errno.EDQUOT],
                  "permission denied": _STORAGE_ERRNOS[errno.EACCES]}


def storage_failure(error: BaseException | str | None) -> str | None:
    """The storage's refusal behind `error` (its causes and contexts included), in words; None for anything else."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
            return _STORAGE_ERRNOS[error.errno]
        text = str(error).lower()
        for words, reason in _STORAGE_WORDS.items():
            if words in text:
                return reason
        if isinstance(error, str):
            return None
        error = error.__cause__ or error.__context__
    return None


class StorageRefused(UserError, OSError):
    """The storage refused a write (no space, a file size limit, read-only, no permission, quota); the message names
    the file, the cause and what was kept."""


def require_paths(flag: str, value: str, what: str, *, command: str) -> None:
    """Each comma-separated path of `--flag=value` exists (local or any `etils.epath` path, gs:// too), or a
    `MissingInput` naming the command, the flag and `what` should be there."""
    from etils import epath  # noqa: PLC0415 (etils imports slowly; only the commands that take paths need it)

    for path in [p.strip() for p in str(value).split(",") if p.strip()] or [str(value)]:
        if not epath.Path(path).exists():
            raise MissingInput(f"{command} {flag}={path}: no such file or folder; give {what}")


def one_line(error: BaseException | str) -> str:
    """`error: <message>` with the message's whitespace (newlines too) folded to single spaces."""
    return "error: " + " ".join(str(error).split())


def fail(error: BaseException | str) -> NoReturn:
    """Print `error: <message>` as one line on stderr and exit with status 2 (a user error: no traceback)."""
    sys.stdout.flush()
    print(one_line(error), file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def guarded(fn: Callable[..., Any], user_errors: Sequence[type[BaseException]] = ()) -> Callable[..., Any]:
    """`fn` with `UserError`, absl's flag errors and `user_errors` turned into `fail`."""
    errors = (UserError, flags.Error, app.UsageError, *user_errors)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except errors as e:
            fail(e)
    wrapped.__doc__ = fn.__doc__
    return wrapped


def parse_flags(argv: list[str]) -> list[str]:
    """`app.run`'s flags parser under the rule (absl's own prints a "FATAL Flags parsing error" block and exits 1)."""
    return guarded(flags.FLAGS)(argv)


def run(main: Callable[[Sequence[str]], Any], *, user_errors: Sequence[type[BaseException]] = (),
        flags_parser: Callable[[list[str]], list[str]] = parse_flags) -> None:
    """`absl.app.run(main)` under the rule: flag parsing and `main` both. `user_errors`: further exception types
    that are user errors for this command only."""
    app.run(guarded(main, user_errors), flags_parser=guarded(flags_parser, user_errors))

