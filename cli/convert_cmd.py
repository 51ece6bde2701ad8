"""``vpsde convert``: a score_sde_pytorch checkpoint into safetensors + a JSON config (what ``--model weights:``
reads), so that the pickle is opened once, on the machine that converts it (needs torch)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vpsde.cli.common import UsageError


def register(sub, fmt) -> None:
    p = sub.add_parser("convert", help="convert a score_sde_pytorch checkpoint to safetensors + config (needs torch)",
                       formatter_class=fmt,
                       description="Read a score_sde_pytorch checkpoint (torch.load with weights_only=True and only the "
                       "numpy scalar globals its optimizer state needs) and write NAME.safetensors and NAME.json, "
                       "which `vpsde export --model weights:DIR/NAME.json` loads without unpickling anything.")
    p.add_argument("source", help="score_sde:PATH[,config=NAME|JSON][,ema=true|false] (config presets: "
                                  "cifar10_ddpmpp_continuous (default), cifar10_ddpmpp_deep_continuous, "
                                  "cifar10_ddpm_continuous)")
    p.add_argument("--out", required=True, type=Path, help="directory for NAME.safetensors and NAME.json")
    p.add_argument("--name", default=None, help="file stem and model name (default: the checkpoint's file stem)")
    p.add_argument("--force", action="store_true", help="replace NAME.safetensors / NAME.json if they exist")


def run(args: argparse.Namespace) -> None:
    from vpsde.export.sources import ModelSpecError, load_model, parse_score_sde_spec
    from vpsde.models.score_sde import parameter_count
    from vpsde.models.sde import VPSDE
    from vpsde.models.shipped import save_weights
    from vpsde.runtime.confine import is_plain_name

    kind, _, rest = args.source.partition(":")
    if kind != "score_sde":
        raise UsageError(f"convert reads score_sde:PATH[,...] checkpoints, got {args.source!r}")
    try:
        path, _, ema = parse_score_sde_spec(rest)
        model = load_model(args.source, VPSDE())
    except ModelSpecError as e:  # the spec loader names export's flag; convert takes the checkpoint positionally
        raise UsageError(str(e).removeprefix("--model ")) from None
    name = args.name or Path(path).stem
    if not is_plain_name(name):
        raise UsageError(f"--name {name!r}: expected a plain file stem (no '/')")
    targets = [args.out / f"{name}.safetensors", args.out / f"{name}.json"]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not args.force:
        raise UsageError(f"{', '.join(existing)} exist; pass --force to replace them")
    net = model.net
    meta = {"name": name, "architecture": "ScoreSdeNet", "score_sde": net.config.to_dict(), "time_label": "999t",
            "value_range": list(model.value_range), "source": f"score_sde checkpoint {Path(path).name}, "
                                                                f"{'EMA' if ema else 'raw'} weights"}
    save_weights(net, meta, args.out)
    print(f"wrote {targets[0]} and {targets[1]} ({net.config.family}, "
          f"{parameter_count(net) / 1e6:.1f} M parameters, {'EMA' if ema else 'raw'} weights); "
          f"export it with --model weights:{targets[1]}", file=sys.stderr)
