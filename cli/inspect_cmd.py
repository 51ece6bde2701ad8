"""``vpsde inspect``: validate a bundle, print its digest, its contract and its cached engines."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vpsde.cli.common import add_expect_digest, printable
from vpsde.runtime.errors import VpsdeError


def register(sub, fmt) -> None:
    """Add the subcommand to ``sub`` (argparse subparsers); ``fmt``: the help formatter."""
    p = sub.add_parser("inspect", help="validate a bundle and print its manifest summary and cached engines",
                       description="Check a bundle (SHA256SUMS, manifest, graphs) and print its digest, sampler, "
                       "schedule, graphs and the TensorRT engines cached in it with their state.",
                       formatter_class=fmt)
    p.add_argument("bundle", type=Path, help="bundle directory")
    add_expect_digest(p)
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")


def run(args: argparse.Namespace) -> None:
    from vpsde.runtime import Bundle

    bundle = Bundle.load(args.bundle, expect_digest=args.expect_digest)
    m = bundle.manifest
    if args.json:
        print(json.dumps({**m.to_dict(), "digest": bundle.digest}, indent=2))
        return
    print(printable(_inspect_text(bundle)))
    _print_engines(bundle)


def _inspect_text(bundle) -> str:
    m = bundle.manifest
    lines = [f"bundle      {bundle.root}  (schema v{m.schema_version})",
             f"digest      {bundle.digest}  (sha256 of SHA256SUMS: manifest and graphs verified)"]
    lines.append(f"model       {m.model.name}  sample {m.model.sample_shape}  time label {m.model.time_label}  "
                 f"precision {m.model.precision}")
    lines.append(f"source      {m.model.source or '(not recorded)'}  (what the bundle says it was exported from; "
                 "never run from the bundle)")
    lines.append(f"weights     sha256 {m.model.weights_sha256 or '(not recorded)'}")
    lines.append(f"sde         VP beta [{m.sde.beta_min}, {m.sde.beta_max}]  eps {m.sde.sampling_eps}  std {m.sde.std_formula}")
    task = "" if m.sampler.task == "sample" else f"  task {m.sampler.task} (starts at the data; row sum of {m.sampler.final} = log p, nats)"
    lines.append(f"sampler     {m.sampler.name}  {m.sampler.steps} steps  {m.sampler.grid} grid  final {m.sampler.final}{task}")
    if m.sampler.params:
        lines.append(f"params      {', '.join(f'{k}={v}' for k, v in m.sampler.params.items())}")
    lines.append(f"program     {' -> '.join(f'{c.graph}x{c.repeat}' for c in m.sampler.program)}")
    lines.append(f"schedule    {', '.join(m.schedule)}")
    for st in m.sampler.state:
        lines.append(f"state       {st.input} <- {st.output} (init {st.init})")
    if m.sampler.conditioning:
        lines.append(f"condition   {', '.join(m.sampler.conditioning)}")
    start = "the prior" if m.sampler.task == "sample" else "the data"
    lines.append(f"noise       {m.noise.generator}  inputs {m.noise.inputs or f'none (deterministic after {start})'}")
    for key, g in m.graphs.items():
        io = lambda specs: ", ".join(f"{s.name}:{s.dtype}{s.shape}" for s in specs)  # noqa: E731
        lines.append(f"graph {key:<5} {g.file} opset {g.opset}\n  in  {io(g.inputs)}\n  out {io(g.outputs)}")
    lines.append(f"producer    {', '.join(f'{k} {v}' for k, v in m.producer.items())}")
    return "\n".join(lines)


def _print_engines(bundle) -> None:
    """The TensorRT engines cached in BUNDLE/engines, each with whether it still fits its graph and is intact."""
    from vpsde.runtime.tensorrt.cache import cached_keys, check_engine

    for graph, spec in bundle.manifest.graphs.items():
        for key, plan in cached_keys(bundle, graph):
            if key.graph_sha256 != spec.sha256 or key.precision != bundle.manifest.model.precision:
                state = "stale: built from another version of the graph"
            else:
                try:
                    check_engine(plan, key)
                    state = "ok"
                except VpsdeError as e:
                    state = f"unusable: {str(e).split(': ', 1)[-1]}"
            print(printable(f"engine      {plan.name}  {key.flavor} {key.version}  {','.join(key.targets)}  "
                             f"batch {key.profile}  {state}"))
