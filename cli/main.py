"""``vpsde``: one command, a module per subcommand (``cli/*_cmd.py``: ``register`` adds its options, ``run``
does the work); this module dispatches and is the error boundary: every failure is one line and exit 2, no
tracebacks unless --verbose."""

from __future__ import annotations

import argparse
import difflib
import errno
import os
import re
import signal
import sys
import threading

from vpsde.cli import (bench_cmd, build_cmd, convert_cmd, doctor_cmd, export_cmd, inspect_cmd, likelihood_cmd, parity_cmd,
                       sample_cmd, serve_cmd)
from vpsde.cli.common import CREATED_DIRS, HelpFormatter, printable, remove_empty_created_dirs
from vpsde.cli.export_cmd import SAMPLER_IDS  # noqa: F401  (re-exported: the CLI's sampler ids)
from vpsde.runtime.atomic import STOPPING, Stopped
from vpsde.runtime.errors import VpsdeError


EXAMPLES = """examples:
  vpsde export --model gmm --steps 1000 --out build/gmm-em
  vpsde sample build/gmm-em --num 64 --seed 0 --out out/gmm
  vpsde inspect build/gmm-em
  vpsde parity build/gmm-em --against eager --report out/parity          # trajectory parity, per call and step
  vpsde bench build/gmm-em --batch 1,16,64                                # ms/step, loop overhead, RSS
  vpsde convert score_sde:checkpoint_26.pth --out models/cifar10          # score_sde_pytorch -> safetensors
  vpsde export --model weights:models/cifar10/checkpoint_26.json --sampler dpmpp-3m --out build/cifar-dpm
  vpsde build build/gmm-em --batch 1:16:64 --target-cc SM86      # TensorRT engines (TensorRT for RTX on CPU)
  vpsde sample build/gmm-em --backend tensorrt --cuda-graph       # on an NVIDIA GPU
  vpsde doctor                                                    # what this machine can run
  vpsde export --model digits --sampler dpmpp-2m --steps 20 --out build/digits-dpm20
  vpsde export --model digits --sampler inpaint --out build/digits-inpaint
  vpsde sample build/digits-inpaint --known docs/examples/digit.png --mask docs/examples/mask.png --num 16 --out out/inpaint
  vpsde sample build/digits-em1000 --num 100000 --ray ray://head:10001 --out out/digits-100k   # on a Ray cluster
  vpsde export --model gmm --sampler likelihood --divergence exact --out build/gmm-likelihood
  vpsde likelihood build/gmm-likelihood --data points.npy --out out/likelihood   # nll and bits/dim per point
  vpsde serve build/gmm-em --http-port 8000 --grpc-port 8001       # Triton (from an env with vpsde[serve])
  vpsde request 127.0.0.1:8000 --num 16 --seed 0 --out out/served
"""


COMMANDS = {"export": export_cmd.run, "sample": sample_cmd.run, "likelihood": likelihood_cmd.run, "inspect": inspect_cmd.run, "build": build_cmd.run,
            "triton": serve_cmd.cmd_triton, "serve": serve_cmd.cmd_serve, "request": serve_cmd.cmd_request,
            "parity": parity_cmd.run, "bench": bench_cmd.run, "convert": convert_cmd.run, "doctor": doctor_cmd.run}


class Parser(argparse.ArgumentParser):
    """argparse with a nearest-match hint on a mistyped flag or choice ("did you mean --num?")."""

    def error(self, message: str):
        super().error(message + _did_you_mean(self, message))


def _did_you_mean(parser: argparse.ArgumentParser, message: str) -> str:
    choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if choice:
        options = re.findall(r"'([^']*)'", choice.group(2)) or [c.strip() for c in choice.group(2).split(",")]
        close = difflib.get_close_matches(choice.group(1), options, n=1, cutoff=0.5)
        return f"; did you mean {close[0]!r}?" if close else ""
    unknown = re.search(r"unrecognized arguments: (.*)", message)
    if unknown:
        flags = [f for f in parser._option_string_actions if f.startswith("--")]
        hints = [f"{close[0]} (not {arg})" for arg in unknown.group(1).split() if arg.startswith("-")
                 for close in [difflib.get_close_matches(arg.split("=")[0], flags, n=1, cutoff=0.6)] if close]
        return f"; did you mean {', '.join(hints)}?" if hints else ""
    return ""


def build_parser() -> argparse.ArgumentParser:
    fmt = HelpFormatter
    parser = Parser(prog="vpsde", description="Deploy VP-SDE score-model samplers as ONNX bundles.",
                    epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"vpsde {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}",
                                parser_class=Parser)
    for register in (export_cmd.register, sample_cmd.register, likelihood_cmd.register, build_cmd.register, serve_cmd.register_triton,
                     serve_cmd.register_serve, serve_cmd.register_request, parity_cmd.register, bench_cmd.register, convert_cmd.register,
                     doctor_cmd.register,
                     inspect_cmd.register):
        register(sub, fmt)
    for command in sub.choices.values():  # --verbose after the subcommand too (SUPPRESS: no False default)
        command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="show tracebacks on errors")
    parser.commands = sub.choices  # type: ignore[attr-defined]  # main() reports unknown flags on the subcommand
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vpsde")
    except PackageNotFoundError:
        return "(not installed)"


def _on_sigterm(signum, frame) -> None:
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that every temporary is removed; and
    remembered, so that nothing is committed after it even where the code it lands in swallows or converts it."""
    STOPPING.set()
    raise Stopped()


OS_HINTS = {errno.ENOSPC: "the disk is full: free space and run again (nothing half-written was left)",
            errno.EDQUOT: "the disk quota is exceeded: free space and run again (nothing half-written was left)",
            errno.EFBIG: "the file size limit was reached (nothing half-written was left)",
            errno.EROFS: "that file system is read-only: use a writable location (copy the bundle there)",
            errno.EACCES: "permission denied: use a location you can write, or fix its permissions",
            errno.EPERM: "not permitted: use a location you can write",
            errno.EISDIR: "a directory is in the way: choose another path",
            errno.ENOTDIR: "a file is in the way: choose another path"}


def _os_error_message(e: OSError) -> str:
    where = e.filename or "a file"
    hint = OS_HINTS.get(e.errno or 0)
    return f"{where}: {e.strerror or e}" + (f"; {hint}" if hint else "")


SMALLER = {"bench": "smaller --batch sizes", "parity": "a smaller --num"}
"""What to make smaller when a command runs out of memory, where it is not --num or --batch-size."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    args.argv_from_command_line = argv is None  # `vpsde serve` may re-run this command line in .venv-serve
    if extras:  # the subcommand's usage and a hint, not the top-level usage
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extras)}")
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() \
        else None
    CREATED_DIRS.clear()
    completed = False
    try:
        try:
            status = COMMANDS[args.command](args)  # None: success; an int: the exit status (parity: 1 = differs)
        except BaseException:
            if STOPPING.is_set():  # whatever the signal turned into where it landed (torch wraps it in its own errors)
                raise Stopped() from None
            raise
        if STOPPING.is_set():  # swallowed where it landed; no commit ran after it
            raise Stopped()
        completed = True
    except BrokenPipeError:  # `vpsde inspect | head`: the reader left; say nothing more
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 141
    except (VpsdeError, OSError, MemoryError) as e:
        if args.verbose:
            raise
        message = _os_error_message(e) if isinstance(e, OSError) and not isinstance(e, VpsdeError) else \
            f"out of memory: use {SMALLER.get(args.command, 'a smaller --num or --batch-size')}" \
            if isinstance(e, MemoryError) else str(e)
        print(printable(f"vpsde {args.command}: error: {message}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Stopped:
        print("terminated", file=sys.stderr)
        return 143
    finally:
        if not completed:  # a failed command leaves no empty --out behind
            remove_empty_created_dirs()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        STOPPING.clear()  # main() may run again in this process (tests, embedding hosts)
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
