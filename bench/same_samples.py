"""Sample digests of every sampler, for running two versions of vpsde side by side (a refactor keeps samples
byte-identical): exports the bundles once into --bundles (digits; the mixture; colorize on a 3-D mixture), then
samples each at several batch sizes and offsets and prints one JSON object, case -> sha256 of the float32
samples. Run it under both versions against the same --bundles and diff the outputs:

    python bench/same_samples.py --bundles /tmp/ss --out new.json
    PYTHONPATH=/path/to/old/tree/as/vpsde python bench/same_samples.py --bundles /tmp/ss --out old.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

CASES = {  # name: (model, sampler, steps, grid, options)
    "digits-em": ("digits", "em", 12, None, {}),
    "digits-pc": ("digits", "pc", 24, None, {"corrector_steps": 2}),
    "digits-ancestral": ("digits", "ancestral", 24, None, {}),
    "digits-ode-euler": ("digits", "ode-euler", 6, None, {}),
    "digits-ode-heun": ("digits", "ode-heun", 6, None, {}),
    "digits-dpmpp-2m": ("digits", "dpmpp-2m", 8, None, {}),
    "digits-dpmpp-3m": ("digits", "dpmpp-3m", 8, None, {}),
    "digits-dpmpp-2m-sde": ("digits", "dpmpp-2m-sde", 8, None, {}),
    "digits-edm-heun": ("digits", "edm-heun", 6, None, {}),
    "digits-ipndm": ("digits", "ipndm", 6, None, {}),
    "digits-unipc": ("digits", "unipc", 6, None, {}),
    "digits-inpaint": ("digits", "inpaint", 12, None, {}),
    "digits-em-int8": ("digits", "em", 12, None, {"precision": "int8", "calibration_samples": 4}),
    "gmm-em": ("gmm:dim=4,components=5,full=1", "em", 30, "uniform", {}),
    "gmm-pc": ("gmm:dim=4,components=5,full=1", "pc", 30, "uniform", {}),
    "gmm-dpmpp-3m": ("gmm:dim=4,components=5,full=1", "dpmpp-3m", 10, None, {}),
    "gmm-dpmpp-2m-sde": ("gmm:dim=4,components=5,full=1", "dpmpp-2m-sde", 10, None, {}),
    "gmm-colorize": ("gmm:dim=3,components=2,seed=4", "colorize", 12, None, {}),
}
RUNS = [(7, 0, 7), (7, 0, 3), (5, 11, 2)]  # (num, first_sample, batch_size)


def export_all(root: Path) -> None:
    from vpsde.export import VPSDE, export_bundle, load_model

    for name, (spec, sampler, steps, grid, options) in CASES.items():
        if (root / name / "manifest.json").exists():
            continue
        print(f"exporting {name}", file=sys.stderr)
        export_bundle(load_model(spec, VPSDE()), root / name, sampler=sampler, steps=steps, grid=grid,
                      log=lambda _: None, **options)


def digests(root: Path) -> dict[str, str]:
    from vpsde.runtime import Sampler

    out = {}
    for name in CASES:
        sampler = Sampler(root / name, progress=False, threads=1)
        shape = tuple(sampler.manifest.model.sample_shape)
        for num, first, batch in RUNS:
            rng = np.random.default_rng(first)
            cond = {k: (rng.random(shape) < 0.5).astype(np.float32) if k == "mask" else
                    rng.uniform(-1, 1, (num, *shape)).astype(np.float32) for k in sampler.manifest.sampler.conditioning}
            samples = sampler.sample(num, seed=3, first_sample=first, batch_size=batch, conditioning=cond or None)
            out[f"{name} num={num} first={first} batch={batch}"] = hashlib.sha256(samples.tobytes()).hexdigest()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundles", type=Path, required=True, help="where the bundles are (exported if missing)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    args = parser.parse_args()
    export_all(args.bundles)
    result = digests(args.bundles)
    text = json.dumps(result, indent=1, sort_keys=True)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
