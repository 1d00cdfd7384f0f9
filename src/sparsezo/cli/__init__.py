"""``sparsezo`` command line: thin wrappers over the API, one module per command.

Progress bars and logs go to stderr; ``--json`` makes a reporting command print exactly one
JSON object on stdout. :func:`main` is the one error boundary: any failure caused by the
user's input, files, disk or environment (a :class:`SparseZOError`, an :class:`OSError`, out of
memory) becomes one ``sparsezo: error: <what>, <where>, <how to fix>`` line and exit code 2,
with nothing half-written; anything else is a bug in sparsezo and keeps its traceback.
SIGTERM and SIGHUP unwind like Ctrl-C, so a run stopped by a scheduler keeps its checkpoints.

A command is one module with ``register(subparsers)`` (its options, ``func=run``) and one entry
in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import signal
import sys
import threading
import traceback
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

from ..dtypes import AUTO, resolve_dtype
from ..errors import Interrupted, SparseZOError, from_os_error, os_errno_in, os_hint
from ..hints import cli_style
from ..resources import start_memory_tracking
from . import bench, demo, eval, export, info, mask, merge, plot, quantize, replay, train
from .options import HelpFormatter

DESCRIPTION = ("Fine-tune language models with zeroth-order (forward-pass-only) optimisation on a sparse set of "
               "sensitive weights. Start with 'sparsezo demo'; 'sparsezo COMMAND --help' lists a command's options "
               "with their defaults.")
COMMANDS = (train, eval, demo, quantize, replay, merge, export, info, plot, bench, mask)  # in --help's order


def package_version() -> str:
    """The installed distribution's version ("0+unknown" for a source tree on PYTHONPATH)."""
    try:
        return version("sparsezo")
    except PackageNotFoundError:
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsezo", description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug-level logs on stderr")
    parser.add_argument("--version", action="version", version=f"sparsezo {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


_SIGNALS = ("SIGTERM", "SIGHUP")  # what schedulers, `timeout` and a closed terminal send: unwind like Ctrl-C


@contextlib.contextmanager
def _signals_unwind() -> Any:
    """While a command runs, SIGTERM/SIGHUP raise :class:`Interrupted` (clean-up and checkpoints as for Ctrl-C).

    Signal handlers can only be installed from the main thread (main() may be called from others)."""
    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum, signal.Signals(signum).name)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for name in _SIGNALS:
            if hasattr(signal, name):
                previous[name] = signal.signal(getattr(signal, name), handler)
    try:
        yield
    finally:
        for name, old in previous.items():
            signal.signal(getattr(signal, name), old)


def _user_failure(e: BaseException) -> str | None:
    """The one-line message for a failure caused by the environment rather than by sparsezo, else None."""
    if isinstance(e, SparseZOError):
        return " ".join(str(e).split("\n"))
    if isinstance(e, OSError):
        return str(from_os_error(e))
    if isinstance(e, MemoryError) or isinstance(e, getattr(torch, "OutOfMemoryError", MemoryError)):
        return ("out of memory (" + (" ".join(str(e).split())[:120] or type(e).__name__) + "); lower --batch-size or "
                "--eval-batch-size, use --dtype bfloat16 or --quant nf4, or a machine with more memory")
    code = os_errno_in(str(e)) if type(e).__name__ == "SafetensorError" else None
    if code is not None:  # safetensors reports I/O failures in its own exception type
        return f"cannot read or write a safetensors file ({os.strerror(code)}); {os_hint(code)}"
    return None


def _parse_args(argv: list[str] | None) -> argparse.Namespace | None:
    """Parsed arguments, or None after argparse's error has been shown as the one ``sparsezo: error:`` line.

    argparse prints the whole usage block and its own ``sparsezo CMD: error:`` prefix; a bad flag
    is bad input like any other, so it gets the same one line (naming --help for the usage).
    ``--help`` and warnings printed while parsing pass through unchanged.
    """
    if not (sys.argv[1:] if argv is None else argv):  # a bare `sparsezo`: the help, not a usage error
        build_parser().print_help()
        return None
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            args = build_parser().parse_args(argv)
    except SystemExit as e:
        errors = [line for line in captured.getvalue().splitlines() if ": error: " in line]
        if e.code != 2 or not errors:
            sys.stderr.write(captured.getvalue())
            raise
        prog, message = errors[-1].split(": error: ", 1)
        sys.stderr.write(f"sparsezo: error: {message}; see `{prog} --help`\n")
        return None
    sys.stderr.write(captured.getvalue())
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one command: 0 on success, 2 on a user-caused failure (one line), 130/143/129 when interrupted,
    1 on an internal bug (with its traceback)."""
    args = _parse_args(argv)
    if args is None:
        return 2
    if getattr(args, "dtype", None) == AUTO:
        args.dtype = resolve_dtype(args.dtype, args.device)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    # the gguf library logs at INFO what is no news to a user (its endianness, its write plan naming our temporary
    # file): at the root's INFO it would print between sparsezo's lines; its warnings and errors still show
    logging.getLogger("gguf").setLevel(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging  # after the line above: read when its logging starts

    hf_logging.disable_progress_bar()  # sub-second loads; keeps stderr to our own bars and one-line errors
    start_memory_tracking()  # peak anonymous memory, for the reports of mask compute, bench, quantize, merge
    try:
        with _signals_unwind(), cli_style():  # library warnings name CLI flags, not API fields
            args.func(args)
    except (KeyboardInterrupt, Interrupted) as e:
        name = e.name if isinstance(e, Interrupted) else "SIGINT"
        sys.stderr.write(f"sparsezo: interrupted ({name})\n")
        return 128 + (e.signum if isinstance(e, Interrupted) else signal.SIGINT)
    except Exception as e:
        message = _user_failure(e)
        if message is None:
            traceback.print_exc()
            sys.stderr.write("sparsezo: internal error: this is a bug in sparsezo, not a problem with your input; "
                             "please report it with the traceback above\n")
            return 1
        sys.stderr.write(f"sparsezo: error: {message}\n")
        return 2
    return 0
