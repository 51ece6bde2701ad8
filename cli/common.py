"""What the subcommands share: argument types, the usage error, and small output helpers."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from vpsde.runtime.errors import VpsdeError


def add_expect_digest(p: argparse.ArgumentParser) -> None:
    """``--expect-digest SHA256``: the same option, with the same meaning, on every command that reads a bundle."""
    p.add_argument("--expect-digest", default=None, metavar="SHA256",
                   help="refuse the bundle unless its digest (the sha256 of its SHA256SUMS, which covers the manifest "
                        "and every graph; `vpsde inspect` prints it) is this one: pin the bundle you reviewed")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to an option's help unless the help already says its default or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


class UsageError(VpsdeError):
    """A bad command-line argument."""


def shape_arg(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes like 1,16,16, got {text!r}") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return shape


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def port_arg(text: str) -> int:
    """A TCP port, 1..65535."""
    value = positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 1..65535, got {value}")
    return value


def threads_arg(text: str) -> int:
    from vpsde.runtime.backends import MAX_THREADS

    value = positive(text)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"expected 1..{MAX_THREADS}, got {value}")
    return value


def u64(what: str):
    """An argparse type: an integer in [0, 2^64) (decimal or 0x hex), named ``what`` in its error."""
    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not 0 <= value < 2**64:
            raise argparse.ArgumentTypeError(f"expected 0 <= {what} < 2^64, got {value}")
        return value

    return parse


def check_last_index(first_sample: int, count: int, counted: str) -> None:
    """Samples (or inputs) ``first_sample .. first_sample + count - 1`` must stay below 2^64; ``counted`` names the
    count in the error ("--num 8", "5 inputs")."""
    if first_sample > 2**64 - count:
        raise UsageError(f"--first-sample {first_sample} + {counted} passes the last sample index 2^64 - 1")


def noise_id(name: str | None) -> str | None:
    from vpsde.runtime.noise import PHILOX_ID, TORCH_ID

    return {None: None, "philox": PHILOX_ID, "torch": TORCH_ID}[name]


def printable(text: str) -> str:
    """``text`` with control characters (other than newlines) escaped: a manifest's strings reach the terminal."""
    return "".join(ch if ch == "\n" or ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


CREATED_DIRS: list[Path] = []
"""The directories :func:`prepare_out_dir` created in this command, deepest first: the error boundary
(``cli/main.py``) removes those still empty when the command fails (:func:`remove_empty_created_dirs`)."""


def prepare_out_dir(out: Path, holds: str = "samples.npz", flag: str = "--out") -> None:
    """Create ``out`` (the ``flag`` directory that will hold ``holds``) and prove it writable (a file is made and
    removed there), so that a bad directory fails before the work, not after."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {out}: exists and is not a directory; {flag} names the directory for {holds}")
    CREATED_DIRS[:0] = [p for p in (out, *out.parents) if not p.exists() and not p.is_symlink()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out, prefix=".vpsde-probe-"):
            pass
    except OSError as e:  # name --out, not the probe file
        raise OSError(e.errno, e.strerror, str(out)) from None


def prepare_out_file(path: Path, flag: str) -> None:
    """Make the directory of the file ``path`` (the ``flag`` output, written after the work) as
    :func:`prepare_out_dir` makes one, so that a bad path fails before the work, not after."""
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a directory; give the path of a file to write")
    if path.parent.exists() and not path.parent.is_dir():
        raise UsageError(f"{flag} {path}: {path.parent} is a file, not a directory")
    prepare_out_dir(path.parent, path.name, flag)


def remove_empty_created_dirs() -> None:
    """After a failed command: remove the directories it created that hold nothing, deepest first (a failed run
    leaves no empty --out behind; one that holds anything, such as resumable Ray shards, stays)."""
    while CREATED_DIRS:
        try:
            CREATED_DIRS.pop(0).rmdir()
        except OSError:  # not empty, or gone: nothing above it is empty either
            CREATED_DIRS.clear()


def resources_arg(text: str) -> float:
    """A Ray resource amount: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def add_ray_args(p: argparse.ArgumentParser, rows: str, shard_size: int, description: str) -> None:
    """The scale-out options (--ray, --shard-size, --workers, --worker-cpus, --worker-gpus); ``rows`` names what
    a shard holds ("samples", "inputs")."""
    g = p.add_argument_group("scale-out on Ray (needs vpsde[ray])", description)
    g.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help=f"shard the {rows} over Ray workers: alone, a local Ray instance; or a cluster address "
                        "(auto, HOST:PORT, ray://HOST:10001)")
    g.add_argument("--shard-size", type=positive, default=shard_size, help=f"{rows} per shard file")
    g.add_argument("--workers", type=positive, default=2, help="Ray actors, each with its own Sampler")
    g.add_argument("--worker-cpus", type=resources_arg, default=1.0, help="CPUs Ray reserves per worker (>= 0)")
    g.add_argument("--worker-gpus", type=resources_arg, default=0.0, help="GPUs Ray reserves per worker (>= 0)")


def ray_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of vpsde.scale's drivers from the options :func:`add_ray_args` added."""
    return {"shard_size": args.shard_size, "workers": args.workers, "worker_cpus": args.worker_cpus,
            "worker_gpus": args.worker_gpus, "address": None if args.ray == "local" else args.ray}


def backend_list(text: str, flag: str) -> list[str]:
    """``--backend(s) a,b``: the names in order, each once; a list naming none, or a name no backend has, is a usage
    error before anything runs."""
    from vpsde.runtime.backends import BACKENDS

    names = list(dict.fromkeys(b.strip() for b in text.split(",") if b.strip()))
    if not names:
        raise UsageError(f"{flag} {text!r}: expected one or more backend names, comma-separated")
    unknown = [b for b in names if b not in BACKENDS]
    if unknown:
        raise UsageError(f"{flag}: unknown backend {unknown[0]!r}; expected names from: {', '.join(BACKENDS)}")
    return names


def report_not_run(not_run: dict[str, VpsdeError]) -> int | None:
    """Under the results of a command that opened several backends: one line per backend that could not open, and
    exit status 1 if there was one (a command where none opened raises the first one's error instead)."""
    for backend, error in not_run.items():
        print(f"{backend}: not run: {error}")
    return 1 if not_run else None
