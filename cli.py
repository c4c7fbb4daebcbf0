"""What every script shares and none of the stages owns: options from a dataclass, one-sentence errors,
atomic writes, subcommands, and a plot's boilerplate.

    from cli import BadInput, exit_on_bad_input, parse_options

    @dataclass
    class Options:
        steps: Annotated[int, "optimizer steps"] = 100

    def main():
        opts = parse_options(Options)   # --steps N, with --help listing it and its default
        ...

    if __name__ == "__main__":
        exit_on_bad_input(main)         # a BadInput is one line on stderr and exit status 2
"""
import argparse
import os
import sys
import types
import typing
from pathlib import Path


class BadInput(Exception):
    """Something the user gave us is wrong (a path, a file, a flag). Scripts print it and exit 2."""


def parse_options(cls, gpu_defaults=None, argv=None, doc=None):
    """A script's options dataclass -> its command line: one flag per field, with the help and default
    stated once, in the dataclass (`field: Annotated[type, "help"] = default`). gpu_defaults replace
    the defaults the user didn't give when a GPU is present. A field typed `X | None` with default None
    takes its value from elsewhere when not given (its help says from where)."""
    import torch  # here, not at the top: `--help` and error paths stay quick to start

    p = argparse.ArgumentParser(description=doc or sys.modules[cls.__module__].__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu_defaults = gpu_defaults or {}
    for name, hint in typing.get_type_hints(cls, include_extras=True).items():
        kind, help_ = hint.__origin__, hint.__metadata__[0]
        if isinstance(kind, types.UnionType):  # int | None: parse as int; None = not given
            kind = next(k for k in typing.get_args(kind) if k is not type(None))
        default = cls.__dataclass_fields__[name].default
        gpu = f"; on a GPU: {gpu_defaults[name]}" if name in gpu_defaults else ""
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            p.add_argument(flag, action="store_true", default=None, help=help_)
        elif default is None or default == "":  # the help text says what not giving it means
            p.add_argument(flag, type=kind, default=None, help=help_ + (f" ({gpu[2:]})" if gpu else ""))
        else:
            p.add_argument(flag, type=kind, default=None, help=f"{help_} (default: {default}{gpu})")
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    return cls(**{**(gpu_defaults if torch.cuda.is_available() else {}), **given})


def command(argv: list[str], commands: tuple[str, ...], script: str) -> tuple[str, list[str]]:
    """`python tda.py index --flags` -> ("index", ["--flags"]): the first argument names a command."""
    name = argv[0] if argv and not argv[0].startswith("-") else ""
    if name not in commands:
        raise BadInput(f"the first argument names the command: {', '.join(commands)} (got {name!r}); "
                       f"e.g. python {script} {commands[0]}")
    return name, argv[1:]


def exit_on_bad_input(main):
    """Run a script's main(); a BadInput becomes one sentence on stderr and exit status 2."""
    try:
        main()
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def write_atomically(path, write):
    """write(tmp) a temporary file next to path, then rename it over path: a run killed mid-save
    (training checkpoints save often) leaves the previous file intact instead of a truncated one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def pyplot():
    """matplotlib's pyplot, drawing to files only (no screen needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, dpi=100):
    """Write a figure as PNG, atomically, making its folder; then free it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    pyplot().close(fig)
