"""`python -m ttm_jax`: the list of the project's commands (`cli.COMMANDS`), one line each; each is run as
`python -m ttm_jax.<module>` and takes --help."""

from __future__ import annotations

from collections.abc import Sequence

from absl import app

from ttm_jax import cli

_HELP = ("--help", "-h", "-?", "--helpshort", "--helpfull")


def main(argv: Sequence[str]) -> None:
    """Prints the commands."""
    if len(argv) > 1:
        raise app.UsageError(f"python -m ttm_jax takes no arguments (got {list(argv[1:])}); run a command as "
                             f"python -m ttm_jax.<module>, e.g. python -m ttm_jax.main --help")
    print(cli.command_list())


def define_flags() -> None:
    """None: the list is the whole command."""


def parse_flags(argv: list[str]) -> list[str]:
    """`--help` prints the list too (absl's would print its own flags)."""
    return cli.parse_flags(argv[:1] if any(a in _HELP for a in argv[1:]) else argv)


if __name__ == "__main__":
    define_flags()
    cli.run(main, flags_parser=parse_flags)
