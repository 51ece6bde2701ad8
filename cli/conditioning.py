"""--known/--mask: the conditioning an inpainting (known, mask) or colorization (known) bundle takes, for the
commands that run one (sample, parity) or ask a server for samples (request)."""

from __future__ import annotations

import argparse
from pathlib import Path

from vpsde.cli.common import UsageError


def add_conditioning_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--known", type=Path, default=None,
                   help="inpainting and colorization bundles: known data, an image file (pixels 0..255 map to the model's value "
                        "range) or .npy [*sample_shape] / [num, *sample_shape] in the value range")
    p.add_argument("--mask", type=Path, default=None,
                   help="inpainting bundles: 1 where --known is kept; image (pixel > 127 = known) or .npy")


def conditioning_from_args(args: argparse.Namespace, bundle) -> dict | None:
    """--known/--mask -> the conditioning arrays an inpainting (known, mask) or colorization (known) bundle takes
    (clear errors otherwise)."""
    m = bundle.manifest
    return conditioning_for(args, m.sampler.conditioning, m.model.sample_shape, m.model.value_range,
                            f"{args.bundle} ({m.sampler.name})")


def conditioning_for(args: argparse.Namespace, conditioning, sample_shape, value_range, what: str,
                     noun: str = "bundle") -> dict | None:
    """--known/--mask -> the arrays of the ``conditioning`` inputs (names) of ``what`` (a ``noun``: a bundle, or a
    served model) for samples of ``sample_shape`` in ``value_range``: [*sample_shape] or [num, *sample_shape] each."""
    from vpsde.runtime.images import load_image, load_mask

    wanted = set(conditioning)
    given = {k for k in ("known", "mask") if getattr(args, k) is not None}
    if not wanted:
        if given:
            raise UsageError(f"{what} takes no --known/--mask; export with --sampler inpaint or colorize")
        return None
    if wanted not in ({"known", "mask"}, {"known"}):
        raise UsageError(f"{what}: conditioning inputs {sorted(wanted)} are not supported by this CLI")
    if given != wanted:
        kind = f"an inpainting {noun}: pass --known and --mask" if "mask" in wanted else \
            f"a colorization {noun}: pass --known (the gray image; its channel mean is kept) and no --mask"
        raise UsageError(f"{what} is {kind}")
    shape = tuple(sample_shape)
    value_range = tuple(value_range) if value_range else None
    cond = {"known": load_image(args.known, shape, value_range, "known data")}
    if "mask" in wanted:
        cond["mask"] = load_mask(args.mask, shape)
    return cond
