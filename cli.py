"""What every script shares and none of the stages owns: options from a dataclass, one-sentence errors,
atomic writes, subcommands, progress bars, and a plot's boilerplate.

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
import contextlib
import json
import os
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


class BadInput(Exception):
    """Something the user gave us is wrong (a path, a file, a flag). Scripts print it and exit 2."""


@dataclass(frozen=True)
class Range:
    """The values a numeric option accepts, stated once beside its help and default:
    `steps: Annotated[int, "optimizer steps", Range(1)] = 100`."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: low itself is not allowed
    high_open: bool = False

    def __contains__(self, x) -> bool:
        return not ((self.low is not None and (x < self.low or (self.low_open and x == self.low)))
                    or (self.high is not None and (x > self.high or (self.high_open and x == self.high))))

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE = Range(0, low_open=True)  # > 0
FRACTION = Range(0, 1, low_open=True, high_open=True)  # strictly between 0 and 1


class Parser(argparse.ArgumentParser):
    """argparse, except that a bad command line is a BadInput (one sentence, exit 2) like every other
    mistake, not argparse's usage text."""

    def error(self, message):
        raise BadInput(f"{message} (see --help)")


def parse_options(cls, gpu_defaults=None, argv=None, doc=None):
    """A script's options dataclass -> its command line: one flag per field, with the help, default and
    valid range stated once, in the dataclass (`field: Annotated[type, "help", Range(...)] = default`).
    gpu_defaults replace the defaults the user didn't give when a GPU is present. A field typed
    `X | None` with default None takes its value from elsewhere when not given (its help says from
    where). A value outside its range is refused with one sentence naming the flag."""
    import torch  # here, not at the top: `--help` and error paths stay quick to start

    p = Parser(description=doc or sys.modules[cls.__module__].__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu_defaults = gpu_defaults or {}
    ranges = {}
    for name, hint in typing.get_type_hints(cls, include_extras=True).items():
        kind, help_ = hint.__origin__, hint.__metadata__[0]
        ranges[name] = next((m for m in hint.__metadata__[1:] if isinstance(m, Range)), None)
        if isinstance(kind, types.UnionType):  # int | None: parse as int; None = not given
            kind = next(k for k in typing.get_args(kind) if k is not type(None))
        default = cls.__dataclass_fields__[name].default
        gpu = f"; on a GPU: {gpu_defaults[name]}" if name in gpu_defaults else ""
        valid = f"; {ranges[name]}" if ranges[name] else ""
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            p.add_argument(flag, action="store_true", default=None, help=help_)
        elif default is None or default == "":  # the help text says what not giving it means
            extra = "; ".join(x for x in (gpu[2:], valid[2:]) if x)
            p.add_argument(flag, type=kind, default=None, help=help_ + (f" ({extra})" if extra else ""))
        else:
            p.add_argument(flag, type=kind, default=None, help=f"{help_} (default: {default}{gpu}{valid})")
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    for name, value in given.items():
        if ranges[name] is not None and (value != value or value not in ranges[name]):  # NaN is in no range
            raise BadInput(f"--{name.replace('_', '-')} {value}: must be {ranges[name]}")
    return cls(**{**(gpu_defaults if torch.cuda.is_available() else {}), **given})


def read_json(path, flag=""):
    """A JSON file the user gave us (a config, an adapter's settings, a data file) -> its value; a
    missing, unreadable or malformed file is one sentence naming it (and the flag, if given)."""
    path = Path(path)
    name = f"{flag} {path}" if flag else str(path)
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))  # -sig: some editors start with a BOM
    except FileNotFoundError:
        raise BadInput(f"{name}: no such file") from None
    except IsADirectoryError:
        raise BadInput(f"{name} is a folder, not a JSON file") from None
    except UnicodeDecodeError:
        raise BadInput(f"{name} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise BadInput(f"{name}:{e.lineno}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise BadInput(f"{name}: JSON nested too deeply to read") from None


def file_sha256(path) -> str:
    """The hash of a file's bytes (of the name itself for something that isn't a file, like 'chitchat')."""
    import hashlib

    path = Path(path)
    h = hashlib.sha256()
    if not path.is_file():
        h.update(str(path).encode())
        return h.hexdigest()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def command(argv: list[str], commands: tuple[str, ...], script: str) -> tuple[str, list[str]]:
    """`python tda.py index --flags` -> ("index", ["--flags"]): the first argument names a command.
    `python tda.py --help` prints the script's docstring, which shows each command, and exits 0."""
    if argv[:1] in (["-h"], ["--help"]):
        print(f"usage: python {script} {{{','.join(commands)}}} [flags]    (python {script} COMMAND --help: "
              f"its flags)\n\n{(sys.modules['__main__'].__doc__ or '').strip()}")
        raise SystemExit(0)
    name = argv[0] if argv and not argv[0].startswith("-") else ""
    if name not in commands:
        raise BadInput(f"the first argument names the command: {', '.join(commands)} (got {name!r}); "
                       f"e.g. python {script} {commands[0]}")
    return name, argv[1:]


def exit_on_bad_input(main):
    """Run a script's main(). A BadInput, or the system refusing a file (a path that is a folder, no
    permission, a full disk), becomes one sentence on stderr and exit status 2. A second Ctrl-C or
    SIGTERM, which quits a training loop at once (sft.stop_requests), is one sentence too, status 130."""
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted: stopped at once (a training run keeps its last checkpoint: continue with --resume)",
              file=sys.stderr)
        sys.exit(130)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.filename is None:  # not about a file the user named: a bug or the network, shown whole
            raise
        print(f"error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        sys.exit(2)


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read (by setting it) once: the permissions a file written by this process gets


def write_atomically(path, write):
    """write(tmp) a temporary file next to path, then rename it over path: a run killed mid-save
    (training checkpoints save often) or a full disk leaves the previous file intact instead of a
    truncated one. Makes path's folder if needed."""
    from safetensors import SafetensorError  # what safetensors raises when the disk refuses a write

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(21, "is a folder, not a file", str(path))
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # as a plain open() would make it (safetensors writes 0600)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        reason = getattr(e, "strerror", None) or " ".join(str(e).split())
        raise BadInput(f"could not write {path}: {reason}" + ("" if not path.exists() else
                                                             "; the previous file is left as it was")) from None


def progress(iterable=None, disable=False, **kw):
    """tqdm's bar on a terminal; none when stderr is a file or a pipe, where its carriage returns garble
    the log. Lines written with tqdm.write (each step's) print either way."""
    return tqdm(iterable, disable=True if disable else None, **kw)  # None: tqdm's "off unless a terminal"


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
