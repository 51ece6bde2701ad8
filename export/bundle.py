"""Write a bundle directory: the step graph(s), then manifest.json; built in a temporary directory beside the
target and renamed into place, so a failed export leaves nothing half-written."""

from __future__ import annotations

import shutil
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import onnx
import torch

from vpsde.export.grids import GRIDS, time_grid
from vpsde.export.onnx_export import DEFAULT_OPSET, export_step_graph
from vpsde.models.sde import VPSDE
from vpsde.export.steps import EulerMaruyamaStep
from vpsde.models.base import ScoreModel
from vpsde.runtime.bundle import Bundle, sha256_file
from vpsde.runtime.manifest import (FORMAT, SCHEMA_VERSION, GraphSpec, Manifest, ModelSpec, NoiseSpec,
                                    ProgramCall, SamplerSpec, ScheduleSpec, SDESpec)
from vpsde.runtime.noise import GENERATORS, PHILOX_ID

SAMPLERS = {"em": ("euler-maruyama", EulerMaruyamaStep)}


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "unknown"


def export_bundle(model: ScoreModel, out: str | Path, *, sampler: str = "em", steps: int = 1000,
                  grid: str = "diffusers", sde: VPSDE | None = None, noise: str = PHILOX_ID,
                  opset: int = DEFAULT_OPSET, value_range: tuple[float, float] | None = None,
                  source: str = "", overwrite: bool = False, log=None) -> Bundle:
    """Export ``model`` with the ``sampler`` step into the bundle directory ``out``.

    ``sde`` defaults to the paper's VP-SDE; its std formula defaults to diffusers' for the "diffusers" grid
    (bit parity with ``ScoreSdeVpScheduler``) and to the stable expm1 form otherwise.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; expected one of {GRIDS}")
    if noise not in GENERATORS:
        raise ValueError(f"unknown noise generator {noise!r}; expected one of {GENERATORS}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    sde = sde or VPSDE(std_formula="diffusers" if grid == "diffusers" else "expm1")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--force) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)

    sampler_name, step_cls = SAMPLERS[sampler]
    step = step_cls(model, sde).eval()
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    tmp.chmod(0o755)
    try:
        graph_file = f"{step.kind}.onnx"
        log(f"exporting {sampler_name} step of {model.name} to ONNX (opset {opset})...")
        inputs, outputs = export_step_graph(step, tuple(model.sample_shape), tmp / graph_file, opset)
        t, dt, sqrt_neg_dt = time_grid(grid, steps, sde.sampling_eps)
        manifest = Manifest(
            format=FORMAT,
            schema_version=SCHEMA_VERSION,
            sde=SDESpec(kind="vp", beta_min=sde.beta_min, beta_max=sde.beta_max, sampling_eps=sde.sampling_eps,
                        num_train_timesteps=sde.num_train_timesteps, std_formula=sde.std_formula),
            model=ModelSpec(name=model.name, sample_shape=list(model.sample_shape), time_label=model.time_label,
                            weights_sha256=model.weights_sha256, source=source or model.name,
                            value_range=list(value_range) if value_range else None),
            sampler=SamplerSpec(name=sampler_name, steps=steps, grid=grid, program=[ProgramCall(step.kind)],
                                final="x_mean"),
            schedule=ScheduleSpec(t=t.tolist(), dt=dt.tolist(), sqrt_neg_dt=sqrt_neg_dt.tolist()),
            graphs={step.kind: GraphSpec(file=graph_file, sha256=sha256_file(tmp / graph_file), opset=opset,
                                         inputs=inputs, outputs=outputs)},
            noise=NoiseSpec(generator=noise),
            producer={"vpsde": _version("vpsde"), "torch": torch.__version__, "onnx": onnx.__version__},
        )
        manifest.write(tmp / "manifest.json")
        Bundle.load(tmp)  # the bundle must read back before it replaces anything
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote bundle {out} ({steps} steps, {grid} grid, noise {noise})")
    return Bundle.load(out)
