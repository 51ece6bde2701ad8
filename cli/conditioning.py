"""--known/--mask: the conditioning an inpainting (known, mask) or colorization (known) bundle takes, for the
commands that run one (sample, parity)."""

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
    from vpsde.runtime.images import load_image, load_mask

    m = bundle.manifest
    wanted = set(m.sampler.conditioning)
    given = {k for k in ("known", "mask") if getattr(args, k) is not None}
    if not wanted:
        if given:
            raise UsageError(f"{args.bundle} ({m.sampler.name}) takes no --known/--mask; export with --sampler inpaint "
                             "or colorize")
        return None
    if wanted not in ({"known", "mask"}, {"known"}):
        raise UsageError(f"{args.bundle}: conditioning inputs {sorted(wanted)} are not supported by this CLI")
    if given != wanted:
        what = "an inpainting bundle: pass --known and --mask" if "mask" in wanted else \
            "a colorization bundle: pass --known (the gray image; its channel mean is kept) and no --mask"
        raise UsageError(f"{args.bundle} is {what} ({m.sampler.name})")
    shape = tuple(m.model.sample_shape)
    value_range = tuple(m.model.value_range) if m.model.value_range else None
    cond = {"known": load_image(args.known, shape, value_range, "known data")}
    if "mask" in wanted:
        cond["mask"] = load_mask(args.mask, shape)
    return cond
