"""Write a bundle directory: the step graph(s), manifest.json, then SHA256SUMS; built in a temporary directory
beside the target and moved into place in one atomic step, so a failed or killed export leaves nothing
half-written, and ``--force`` replaces only a bundle vpsde wrote."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import onnx
import torch

from vpsde.export.onnx_export import DEFAULT_OPSET, export_step_graph
from vpsde.export.precision import MIN_OPSET, with_precision
from vpsde.export.quantize import DEFAULT_CALIBRATION_SAMPLES
from vpsde.export.samplers import SAMPLERS, SamplerRecipe, build_sampler, check_options, default_grid
from vpsde.export.tuning import TUNED, Tuning, tuned_edges
from vpsde.models.base import ScoreModel
from vpsde.models.sde import VPSDE
from vpsde.runtime.atomic import TMP_TAG, atomic_dir, directory_lock, replace_dir
from vpsde.runtime.bundle import Bundle, sha256_file, write_sums
from vpsde.runtime.digest import SUMS_NAME
from vpsde.runtime.manifest import (FORMAT, SCHEMA_VERSION, TASKS, GraphSpec, Manifest, ModelSpec, NoiseSpec,
                                    SamplerSpec, SDESpec, valid_value_range)
from vpsde.runtime.noise import GENERATORS, PHILOX_ID


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "unknown"


def export_bundle(model: ScoreModel, out: str | Path, *, sampler: str = "em", steps: int = 1000,
                  grid: str | None = None, sde: VPSDE | None = None, noise: str = PHILOX_ID,
                  opset: int | None = None, value_range: tuple[float, float] | None = None,
                  source: str = "", overwrite: bool = False, precision: str = "fp32", log=None,
                  calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES, tuning: Tuning | None = None,
                  **sampler_options) -> Bundle:
    """Export ``model`` with the ``sampler``'s step graphs into the bundle directory ``out``.

    ``grid`` defaults to the sampler's (``samplers.DEFINITIONS``). ``sde`` defaults to the paper's VP-SDE
    with :func:`default_std_formula`. ``precision`` "fp16" / "bf16" runs the network in float16 / bfloat16 inside
    the graphs (SDE arithmetic and graph IO stay float32; see ``export/precision.py``); "int8" quantizes the
    network's convolutions, calibrated on ``calibration_samples`` fp32 trajectories (``export/quantize.py``).
    ``opset`` defaults to 18 (22 for bf16, the first with bfloat16 Conv). ``grid="tuned"`` tunes the grid to
    ``model`` first (``export/tuning.py``; ``tuning`` sets teacher samples, seed and candidates, recorded in
    ``sampler.params``). ``sampler_options`` go to :func:`build_sampler` (snr, corrector_steps, coupling,
    denoise_final, order, variant).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    grid = grid or default_grid(sampler)
    if noise not in GENERATORS:
        raise ValueError(f"unknown noise generator {noise!r}; expected one of {GENERATORS}")
    sde = sde or VPSDE(std_formula=default_std_formula(sampler, grid))
    opset = check_opset(opset, precision)
    if value_range is not None and not valid_value_range(value_range):
        raise ValueError(f"value_range: expected finite LO < HI, got {list(value_range)}")
    if sampler == "likelihood" and precision != "fp32":
        raise ValueError(f"likelihood bundles are fp32 (the divergence's JVP is checked in fp32 only), not {precision}")
    if precision == "int8" and not 1 <= calibration_samples <= 4096:
        raise ValueError(f"calibration_samples: expected 1..4096 trajectories, got {calibration_samples}")
    if grid == TUNED:
        check_options(sampler, steps, grid, **sampler_options)  # before the tuning's cost
        tuning = tuning or Tuning()
        log(f"tuning a {steps}-step grid to {model.name} ({tuning.samples} teacher trajectories, seed {tuning.seed})...")
        sampler_options["edges"] = tuned_edges(model, sde, steps - int(sampler_options.get("denoise_final", False)),
                                               tuning)
    elif tuning is not None:
        raise ValueError("tuning applies to grid='tuned'")
    recipe = build_sampler(sampler, with_precision(model, precision), sde, steps, grid, **sampler_options)
    if grid == TUNED:
        recipe.params.update(tuning.params())
    out = Path(out)
    check_replaceable(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        graphs = {}
        middle_row = {name: float(values[len(values) // 2]) for name, values in recipe.schedule.items()}
        for key, step in recipe.graphs.items():
            graph_file = f"{key}.onnx"
            log(f"exporting {recipe.name} graph {key!r} of {model.name} to ONNX (opset {opset})...")
            started = time.monotonic()
            inputs, outputs = export_step_graph(step.eval(), tuple(model.sample_shape), tmp / graph_file, middle_row,
                                                recipe.conditioning, opset, log)
            kilobytes = (tmp / graph_file).stat().st_size / 1e3
            log(f"  {graph_file}: {kilobytes:,.0f} kB in {time.monotonic() - started:.0f} s")
            graphs[key] = GraphSpec(file=graph_file, sha256=sha256_file(tmp / graph_file), opset=opset,
                                    inputs=inputs, outputs=outputs)
        manifest = Manifest(
            format=FORMAT,
            schema_version=max(SCHEMA_VERSION, TASKS[recipe.task]),
            sde=SDESpec(kind="vp", beta_min=sde.beta_min, beta_max=sde.beta_max, sampling_eps=sde.sampling_eps,
                        num_train_timesteps=sde.num_train_timesteps, std_formula=sde.std_formula),
            model=ModelSpec(name=model.name, sample_shape=list(model.sample_shape), time_label=model.time_label,
                            weights_sha256=model.weights_sha256,
                            source=source or getattr(model, "spec", None) or model.name,
                            value_range=list(value_range) if value_range else None, precision=precision),
            sampler=_sampler_spec(recipe),
            schedule={name: values.float().tolist() for name, values in recipe.schedule.items()},
            graphs=graphs,
            noise=NoiseSpec(generator=noise, inputs=list(recipe.noise_inputs)),
            producer={"vpsde": _version("vpsde"), "torch": torch.__version__, "onnx": onnx.__version__},
        )
        if precision == "int8":
            manifest = _quantize(manifest, tmp, calibration_samples, log)
        manifest.write(tmp / "manifest.json")
        write_sums(tmp)
        Bundle.load(tmp)  # the bundle must read back before it replaces anything
        with directory_lock(out.parent):  # concurrent exports to one --out take turns to swap
            check_replaceable(out, overwrite)
            replace_dir(tmp, out)
    log(f"wrote bundle {out} ({recipe.name}, {steps} steps, {recipe.nfe} NFE, {grid} grid, {precision}, noise {noise})")
    return Bundle.load(out)


def _quantize(manifest: Manifest, root: Path, samples: int, log) -> Manifest:
    """Replace the fp32 graphs under ``root`` by their int8 versions (``export/quantize.py``); the manifest with
    their new digests."""
    from vpsde.export.quantize import calibration_feeds, int8_convs, quantize_graph
    from vpsde.runtime.progress import tracked

    for spec in manifest.graphs.values():
        int8_convs(root / spec.file, manifest.model.sample_shape[0])  # refuse before calibrating
    manifest.write(root / "manifest.json")  # the fp32 graphs, read back as a bundle: calibration opens it as any host does
    write_sums(root)
    log(f"calibrating int8 on {samples} fp32 trajectories of {manifest.sampler.steps} steps...")
    bar = lambda it, total: tracked(it, total, "calibration", "step")  # noqa: E731
    feeds = calibration_feeds(Bundle.load(root), samples, progress=bar)
    graphs = {}
    for key, spec in manifest.graphs.items():
        path = root / spec.file
        int8 = path.with_name(path.stem + ".int8.onnx")
        count = quantize_graph(path, int8, feeds[key], manifest.model.sample_shape[0])
        os.replace(int8, path)
        log(f"graph {key!r}: {count} convolutions in int8 ({len(feeds[key])} calibration calls)")
        graphs[key] = dataclasses.replace(spec, sha256=sha256_file(path))
    return dataclasses.replace(manifest, graphs=graphs)


def check_opset(opset: int | None, precision: str) -> int:
    """The opset to export ``precision`` graphs at (``opset``, or the default for ``precision``) once torch.onnx
    writes it (18 or later), the precision has it (bf16 Conv: 22) and the installed onnx knows it; else ValueError."""
    least, newest = MIN_OPSET.get(precision, DEFAULT_OPSET), onnx.defs.onnx_opset_version()
    opset = opset or max(DEFAULT_OPSET, least)
    if opset < DEFAULT_OPSET:
        raise ValueError(f"opset {opset}: torch.onnx exports opset {DEFAULT_OPSET} or later")
    if opset < least:
        raise ValueError(f"precision {precision} needs opset {least} or later (ONNX Conv has no {precision} before "
                         f"it), got {opset}")
    if opset > newest:
        raise ValueError(f"opset {opset}: the installed onnx {onnx.__version__} knows opsets up to {newest}")
    return opset


def check_replaceable(out: Path, overwrite: bool) -> None:
    """Refuse to replace anything but a bundle vpsde wrote: ``out`` may be missing, or (with ``overwrite``) an
    empty directory or a bundle directory holding only what export and build write."""
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace the bundle there")
    if out.is_symlink() or not out.is_dir():
        raise FileExistsError(f"{out} is {'a symlink' if out.is_symlink() else 'not a directory'}; only a bundle "
                              "directory vpsde wrote is replaced: choose another output directory")
    entries = sorted(os.listdir(out))
    if not entries:
        return
    try:
        data = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        ours = {"manifest.json", SUMS_NAME, "engines", *(g["file"] for g in data["graphs"].values())}
        is_bundle = data.get("format") == FORMAT
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        is_bundle = False
    if not is_bundle:
        raise FileExistsError(f"{out} is not a vpsde bundle (no manifest.json of format {FORMAT!r}); only a bundle "
                              "vpsde wrote is replaced: choose another output directory, or empty it yourself")
    foreign = [e for e in entries if e not in ours and TMP_TAG not in e]
    if foreign:
        raise FileExistsError(f"{out} holds files a bundle does not ({', '.join(foreign[:5])}"
                              f"{' ...' if len(foreign) > 5 else ''}); only what vpsde wrote is replaced: move "
                              "them out first")


def default_std_formula(sampler: str, grid: str | None) -> str:
    """diffusers' sqrt(1 - exp(2 lmc)) for EM on the diffusers grid (bit parity with ``ScoreSdeVpScheduler``);
    the stable expm1 form everywhere else (diffusers' loses ~1e-3 of std^2 to cancellation at t = 1e-3 in
    float32, which the score amplifies by 1/std)."""
    return "diffusers" if sampler == "em" and (grid or default_grid(sampler)) == "diffusers" else "expm1"


def _sampler_spec(recipe: SamplerRecipe) -> SamplerSpec:
    return SamplerSpec(name=recipe.name, steps=recipe.steps, grid=recipe.grid, program=recipe.program,
                       final=recipe.final, state=recipe.state, conditioning=recipe.conditioning,
                       params={"id": recipe.sampler, **recipe.params}, task=recipe.task)
