"""score_sde_pytorch's networks and checkpoints (models/score_sde.py, models/score_sde_checkpoint.py).

Oracles independent of the code under test:
- ``tests/data/score_sde_state_dict_keys.json``: every state-dict key, shape and dtype (in order) of score_sde_pytorch's
  own NCSNpp (DDPM++ cifar10 continuous) and DDPM (cifar10 continuous), recorded by instantiating their code (their
  models/ at commit cb1f359, with a stub for the unused FIR CUDA op). The same session also loaded identical random
  weights into both and compared the outputs: 1.5e-7 (DDPM++) and 0.0 (DDPM) max abs on outputs of ~0.4;
- the building blocks against their mathematical definitions on fresh inputs (attention, NIN, the embedding,
  GroupNorm groups, skip rescale), written here with plain tensor ops;
- the parameter counts of the published configs (DDPM++ 61.8 M, DDPM 35.2 M).
Every weight is perturbed before a forward test: their initialiser zeroes the last conv of each branch, which would
hide most of the network.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vpsde.cli.main import main as cli
from vpsde.export import VPSDE, export_bundle, load_model
from vpsde.export.sources import ModelSpecError
from vpsde.models.score_sde import PRESETS, AttnBlock, NIN, ResBlock, ScoreSdeConfig, ScoreSdeNet, timestep_embedding
from vpsde.models.score_sde_checkpoint import CheckpointError, load_score_sde, read_checkpoint
from vpsde.runtime import Sampler

KEYS = json.loads((Path(__file__).parent / "data" / "score_sde_state_dict_keys.json").read_text())
SMALL = ScoreSdeConfig(nf=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), image_size=16)


def perturb(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fresh random values in every parameter (fan-in scaled), so no branch is zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) * (fan_in ** -0.5 if p.dim() > 1 else 0.1))
    return net


def write_checkpoint(path: Path, net: ScoreSdeNet, shadow: list[torch.Tensor] | None = None,
                     numpy1_names: bool = False) -> None:
    """A checkpoint in score_sde_pytorch's save_checkpoint layout: DataParallel state dict, Adam state with a numpy
    float64 lr (their training code sets it through numpy), EMA dict with a shadow list in parameter order, step."""
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)
    opt.zero_grad()
    sum(p.sum() for p in net.parameters()).backward()
    opt.step()
    for group in opt.param_groups:
        group["lr"] = np.float64(2e-4)
    shadow = shadow if shadow is not None else [p.detach().clone() for p in net.parameters()]
    state = {"optimizer": opt.state_dict(), "model": torch.nn.DataParallel(net).state_dict(),
             "ema": {"decay": 0.9999, "num_updates": 7, "shadow_params": shadow}, "step": 7}
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    if numpy1_names:  # rewrite the pickle's numpy module name as numpy 1.x wrote it
        zin, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zout:
            for info in zin.infolist():
                blob = zin.read(info.filename)
                if info.filename.endswith("data.pkl"):
                    assert b"numpy._core.multiarray" in blob
                    blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
                zout.writestr(info, blob)
        data = out.getvalue()
    path.write_bytes(data)


@pytest.mark.parametrize("preset", ["cifar10_ddpmpp_continuous", "cifar10_ddpm_continuous"])
def test_state_dict_matches_score_sde_pytorch_key_for_key(preset):
    net = ScoreSdeNet(PRESETS[preset])
    ours = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in net.state_dict().items()]
    assert ours == KEYS[preset]
    n = sum(p.numel() for p in net.parameters())
    assert abs(n / 1e6 - {"cifar10_ddpmpp_continuous": 61.8, "cifar10_ddpm_continuous": 35.2}[preset]) < 0.05


def test_blocks_against_their_definitions():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 32, 8, 8, generator=g)
    nin = perturb(NIN(32, 16))
    want = (x.permute(0, 2, 3, 1) @ nin.W + nin.b).permute(0, 3, 1, 2)  # x . W over channels, W [in, out]
    torch.testing.assert_close(nin(x), want, rtol=1e-5, atol=1e-5)

    attn = perturb(AttnBlock(32, None, rescale=True), seed=1)
    h = F.group_norm(x, 8, attn.GroupNorm_0.weight, attn.GroupNorm_0.bias, eps=1e-6)  # min(32 // 4, 32) = 8 groups
    q, k, v = (m(h).reshape(2, 32, 64) for m in (attn.NIN_0, attn.NIN_1, attn.NIN_2))
    out = torch.zeros(2, 32, 64)
    for b in range(2):
        for i in range(64):  # one query position at a time, softmax over the 64 keys
            w = torch.softmax(torch.stack([q[b, :, i] @ k[b, :, j] for j in range(64)]) / math.sqrt(32), 0)
            out[b, :, i] = (v[b] * w[None, :]).sum(1)
    want = (x + attn.NIN_3(out.reshape(2, 32, 8, 8))) / math.sqrt(2)
    torch.testing.assert_close(attn(x), want, rtol=1e-4, atol=1e-5)

    labels = torch.tensor([0.0, 17.5, 998.0])
    emb = timestep_embedding(labels, 8)
    for r, lab in enumerate(labels.tolist()):
        freqs = [math.exp(-math.log(10000) * j / 3) for j in range(4)]
        want = [math.sin(lab * f) for f in freqs] + [math.cos(lab * f) for f in freqs]
        np.testing.assert_allclose(emb[r].numpy(), want, rtol=1e-5, atol=1e-5)

    block = perturb(ResBlock("biggan", 32, 64, 128, 0.0, down=True), seed=2).eval()
    temb = torch.randn(2, 128, generator=g)
    hh = F.silu(F.group_norm(x, 8, block.GroupNorm_0.weight, block.GroupNorm_0.bias, eps=1e-6))
    hh = F.avg_pool2d(hh, 2)
    hh = F.conv2d(hh, block.Conv_0.weight, block.Conv_0.bias, padding=1) + \
        (F.silu(temb) @ block.Dense_0.weight.T + block.Dense_0.bias)[:, :, None, None]
    hh = F.silu(F.group_norm(hh, 16, block.GroupNorm_1.weight, block.GroupNorm_1.bias, eps=1e-6))
    hh = F.conv2d(hh, block.Conv_1.weight, block.Conv_1.bias, padding=1)
    skip = F.conv2d(F.avg_pool2d(x, 2), block.Conv_2.weight, block.Conv_2.bias)
    torch.testing.assert_close(block(x, temb), (skip + hh) / math.sqrt(2), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["ddpmpp", "ddpm"])
def test_network_invariants(family):
    cfg = ScoreSdeConfig(**{**SMALL.to_dict(), "family": family, "ch_mult": (1, 2), "dropout": 0.1})
    net = perturb(ScoreSdeNet(cfg)).eval()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 3, 16, 16, generator=g)
    labels = torch.tensor([5.0, 400.0, 990.0])
    with torch.no_grad():
        y = net(x, labels)
        assert y.shape == x.shape and torch.isfinite(y).all()
        torch.testing.assert_close(net(x, labels), y)  # eval: dropout off, deterministic
        moved = net(x, labels + 50.0)
        assert (moved - y).abs().mean() > 1e-3 * y.abs().mean()  # the time embedding reaches the output
        per_sample = torch.cat([net(x[i:i + 1], labels[i:i + 1]) for i in range(3)])
        torch.testing.assert_close(per_sample, y, rtol=1e-4, atol=1e-5)  # no mixing across the batch
    # skip rescale: DDPM++ blocks return (x + h) / sqrt(2); DDPM ones x + h. Zero every branch's last conv and a
    # block becomes its shortcut scaled by exactly that factor.
    block = net.all_modules[3]
    with torch.no_grad():
        block.Conv_1.weight.zero_()
        block.Conv_1.bias.zero_()
        inp = torch.randn(2, block.GroupNorm_0.num_channels, 16, 16, generator=g)
        temb = torch.randn(2, 4 * cfg.nf, generator=g)
        shortcut = inp if not block.shortcut else (block.NIN_0(inp) if family == "ddpm" else block.Conv_2(inp))
        scale = 1 / math.sqrt(2) if family == "ddpmpp" else 1.0
        torch.testing.assert_close(block(inp, temb), shortcut * scale)


def test_checkpoint_loads_every_key_and_tells_ema_from_raw(tmp_path):
    net = perturb(ScoreSdeNet(SMALL))
    shadow = [p.detach().clone() * 0.5 + 0.01 for p in net.parameters()]  # the EMA differs from the raw weights
    ckpt = tmp_path / "checkpoint_7.pth"
    write_checkpoint(ckpt, net, shadow)
    raw = load_score_sde(ckpt, SMALL, ema=False)
    ema = load_score_sde(ckpt, SMALL, ema=True)
    for (name, p), r, e, s in zip(net.named_parameters(), raw.parameters(), ema.parameters(), shadow):
        assert torch.equal(r, p), name
        assert torch.equal(e, s), name
    assert torch.equal(raw.sigmas, net.sigmas) and raw.sigmas.dtype == torch.float64
    x, lab = torch.randn(2, 3, 16, 16), torch.tensor([10.0, 500.0])
    with torch.no_grad():
        assert not torch.allclose(raw(x, lab), ema(x, lab))


def test_numpy1_module_names_are_accepted(tmp_path):
    net = perturb(ScoreSdeNet(SMALL))
    ckpt = tmp_path / "old.pth"
    write_checkpoint(ckpt, net, numpy1_names=True)
    assert isinstance(read_checkpoint(ckpt)["optimizer"]["param_groups"][0]["lr"], np.floating)
    load_score_sde(ckpt, SMALL, ema=False)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoints_that_are_not_plain_state_are_refused(tmp_path, capsys):
    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": Evil()}, evil)
    with pytest.raises(CheckpointError, match="builtins.print"):
        read_checkpoint(evil)
    assert "pwned" not in capsys.readouterr().out
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps({"model": {}}, protocol=2))
    with pytest.raises(CheckpointError, match="legacy.pth"):
        read_checkpoint(legacy)
    notdict = tmp_path / "list.pth"
    torch.save([1, 2], notdict)
    with pytest.raises(CheckpointError, match="expected score_sde's checkpoint dict"):
        read_checkpoint(notdict)


def _scalar_bomb(path, dtype: bytes, count: int) -> None:
    """A torch zip checkpoint whose pickle is a list of ``count`` numpy scalars of ``dtype`` made with no data:
    allow-listed globals only (numpy's scalar constructor and numpy.dtype, as score_sde's lr needs), and numpy
    allocates the dtype's itemsize for each."""
    import zipfile

    torch.save({"model": {}}, path)
    module = b"numpy._core.multiarray" if hasattr(np, "_core") else b"numpy.core.multiarray"
    one = (b"c" + module + b"\nscalar\ncnumpy\ndtype\nX" + len(dtype).to_bytes(4, "little") + dtype
           + b"\x85R\x85Ra")  # scalar(dtype(name)), appended to the list
    body = b"\x80\x02]" + one * count + b"."
    with zipfile.ZipFile(path) as z:
        records = [(info, z.read(info)) for info in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for info, data in records:
            z.writestr(info, body if info.filename.endswith("data.pkl") else data)


@pytest.mark.parametrize("dtype", [b"V2000000000", b"U100000000", b"S300000000", b"O"])
def test_a_small_checkpoint_cannot_allocate_gigabytes(tmp_path, dtype):
    """A 1 kB checkpoint made numpy allocate 2 GB per scalar before 0.4.2 (N of them: the OOM killer)."""
    import resource

    ckpt = tmp_path / "bomb.pth"
    _scalar_bomb(ckpt, dtype, 2)
    assert ckpt.stat().st_size < 2000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match="bomb.pth: refused: numpy dtype"):
        read_checkpoint(ckpt)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB: no 2 GB spike


def test_empty_and_oversized_checkpoints_are_one_line_errors(tmp_path, monkeypatch):
    import vpsde.models.score_sde_checkpoint as ckpt_module

    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pth: not a torch checkpoint"):
        read_checkpoint(empty)
    big = tmp_path / "big.pth"
    torch.save({"model": {"w": torch.ones(1000)}}, big)
    monkeypatch.setattr(ckpt_module, "MAX_CHECKPOINT_BYTES", 1000)
    with pytest.raises(CheckpointError, match="at most 1000 are accepted"):
        read_checkpoint(big)


def test_wrong_shapes_and_missing_keys_name_the_key(tmp_path):
    net = perturb(ScoreSdeNet(SMALL))
    ckpt = tmp_path / "c.pth"
    write_checkpoint(ckpt, net)
    bigger = ScoreSdeConfig(**{**SMALL.to_dict(), "nf": 64})
    with pytest.raises(CheckpointError, match=r"all_modules\.0\.weight.*shape"):
        load_score_sde(ckpt, bigger, ema=False)
    state = torch.load(ckpt, weights_only=False)
    del state["model"]["module.all_modules.3.Conv_1.bias"]
    torch.save(state, ckpt)
    with pytest.raises(CheckpointError, match=r"missing all_modules\.3\.Conv_1\.bias"):
        load_score_sde(ckpt, SMALL, ema=False)
    write_checkpoint(ckpt, net)
    state = torch.load(ckpt, weights_only=False)
    state["ema"]["shadow_params"] = state["ema"]["shadow_params"][1:]
    torch.save(state, ckpt)
    with pytest.raises(CheckpointError, match="'ema.shadow_params' has"):
        load_score_sde(ckpt, SMALL, ema=True)
    load_score_sde(ckpt, SMALL, ema=False)  # the raw weights are still whole


def test_export_convert_and_onnx_parity(tmp_path, capsys):
    """score_sde:PATH exports; the ONNX step equals the eager step at a batch it was not traced with; convert writes
    safetensors + config that `weights:` loads to the same weights hash and bundle."""
    net = perturb(ScoreSdeNet(SMALL))
    ckpt = tmp_path / "checkpoint_3.pth"
    write_checkpoint(ckpt, net, [p.detach().clone() + 0.01 for p in net.parameters()])
    config = json.dumps(SMALL.to_dict()).replace(" ", "")
    spec = f"score_sde:{ckpt},config={config},ema=true"
    sde = VPSDE()
    model = load_model(spec, sde)
    assert model.time_label == "999t" and model.value_range == (-1.0, 1.0)
    bundle = export_bundle(model, tmp_path / "b", sampler="em", steps=4, grid="uniform", log=lambda _: None)
    m = bundle.manifest
    assert m.model.source == spec and m.model.weights_sha256 == model.weights_sha256
    from vpsde.export.eager import EagerSide
    from vpsde.verify.parity import BackendSide, compare

    report = compare(m, EagerSide(bundle, spec), BackendSide(bundle), num=3, seed=1, progress=False)  # traced at batch 2
    scale = max(1.0, float(np.abs(report.reference_sample).max()))
    assert report.passed and report.required_call_atol <= 1e-5 * scale, report.required_call_atol

    out = tmp_path / "conv"
    assert cli(["convert", f"score_sde:{ckpt},config={config}", "--out", str(out), "--name", "cifar-small"]) == 0
    meta = json.loads((out / "cifar-small.json").read_text())
    assert meta["architecture"] == "ScoreSdeNet" and meta["weights_sha256"] == model.weights_sha256
    converted = load_model(f"weights:{out / 'cifar-small.json'}", sde)
    for a, b in zip(converted.net.state_dict().values(), model.net.state_dict().values()):
        assert torch.equal(a, b)
    assert cli(["convert", f"score_sde:{ckpt},config={config}", "--out", str(out), "--name", "cifar-small"]) == 2
    assert "--force" in capsys.readouterr().err
    assert cli(["convert", f"score_sde:{tmp_path}/none.pth", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()  # the spec is quoted up to 80 characters; not "--model": convert has none
    assert err.startswith("vpsde convert: error: 'score_sde:") and err.endswith(f"{tmp_path}/none.pth: checkpoint "
                                                                                "not found") and "--model" not in err
    x = Sampler(bundle, progress=False).sample(2, seed=0)
    assert x.shape == (2, 3, 16, 16) and np.isfinite(x).all()


def test_bad_specs_are_one_line_errors(tmp_path):
    for spec, msg in [(f"score_sde:{tmp_path}/none.pth", "not found"), ("score_sde:x.pth,ema=maybe", "ema="),
                      ("score_sde:x.pth,config=nope", "preset"), ("score_sde:x.pth,config={\"nf\":", "unbalanced"),
                      ("score_sde:x.pth,colour=red", "config=NAME")]:
        with pytest.raises(ModelSpecError, match=msg):
            load_model(spec, VPSDE())


@pytest.mark.parametrize("sampler, steps", [("dpmpp-2m", 10), ("unipc", 10), ("inpaint", 50)])
def test_ddpmpp_bundles_of_steps_with_many_inputs_match_eager(sampler, steps, tmp_path):
    """DDPM++'s time embedding runs Linear layers, whose transposed weights torch's trace names "t", "t_1", ...: a
    step whose forward takes ``*inputs`` (DPM-Solver++, UniPC, the conditioned samplers) was traced with nothing
    holding the name "t", so the time input renamed "t" afterwards shared it with a weight and the export failed
    onnx.checker (0.5.7; EM, whose forward names t, did not). Exported from a spec whose JSON config holds commas,
    the graph's inputs are the manifest's, one of each, and the bundle's calls match eager torch (default bars)."""
    from vpsde.export.eager import EagerSide
    from vpsde.verify.parity import BackendSide, compare

    spec = f"score_sde-random:config={json.dumps(SMALL.to_dict()).replace(' ', '')},seed=1"
    bundle = export_bundle(load_model(spec, VPSDE()), tmp_path / sampler, sampler=sampler, steps=steps,
                           log=lambda _: None)
    import onnx

    for graph in bundle.manifest.graphs.values():
        model = onnx.load(str(bundle.root / graph.file))
        names = [v.name for v in model.graph.input]
        assert names == [spec_.name for spec_ in graph.inputs] and "t" in names
        assert "t" not in {init.name for init in model.graph.initializer}
    rng = np.random.default_rng()
    shape = (2, *bundle.manifest.model.sample_shape)
    cond = {"known": rng.uniform(-1, 1, shape).astype(np.float32),
            "mask": (rng.random(shape) < 0.5).astype(np.float32)} if sampler == "inpaint" else None
    report = compare(bundle.manifest, EagerSide(bundle, spec), BackendSide(bundle), num=2,
                     seed=int(rng.integers(2**32)), conditioning=cond, progress=False)
    assert report.passed, (report.first_failing_call, report.final_rel_l2)


@pytest.mark.slow
def test_cifar_scale_ddpmpp_exports_and_matches_eager(tmp_path):
    """The real DDPM++ cifar10 config (61.8 M parameters, random weights): export, then the ONNX graph vs the eager
    network on a batch it was not traced with, fp32 <= 1e-5 relative to the output's scale."""
    spec = "score_sde-random:config=cifar10_ddpmpp_continuous,seed=1"  # torch's default init: no zeroed branch
    model = load_model(spec, VPSDE())
    bundle = export_bundle(model, tmp_path / "cifar", sampler="em", steps=3, grid="uniform", log=lambda _: None)
    from vpsde.export.eager import EagerSide
    from vpsde.verify.parity import BackendSide, compare

    report = compare(bundle.manifest, EagerSide(bundle, spec),
                     BackendSide(bundle), num=3, seed=2, progress=False, call_atol=1e-5, call_rtol=1e-5)
    print(f"\nDDPM++ cifar10: per-call max abs {report.required_call_atol:.2e}, final rel L2 {report.final_rel_l2:.2e}")
    assert report.required_call_atol <= 1e-5 * max(1.0, float(np.abs(report.reference_sample).max()))
    # the TensorRT-for-RTX engine of the same graph builds here (no GPU needed to build; 8.7 s measured)
    from vpsde.runtime.errors import BackendUnavailable
    from vpsde.runtime.tensorrt.build import BatchProfile
    from vpsde.runtime.tensorrt.cache import build_cached
    from vpsde.runtime.tensorrt.flavor import load_flavor

    try:
        flavor = load_flavor("rtx")
    except BackendUnavailable as e:
        pytest.skip(f"TensorRT for RTX not installed ({e})")
    engine = build_cached(bundle, "em", flavor, BatchProfile(1, 16, 64), ["SM86"], 3, False, log=lambda _: None)
    assert engine.built and engine.plan.stat().st_size > 50 * 2**20  # the weights are in the plan
    print(f"DDPM++ cifar10: TensorRT-for-RTX engine (SM86, batch 1:16:64) built in {engine.seconds:.1f} s")


def test_fp16_export_runs_the_network_in_half_and_stays_close(tmp_path):
    from vpsde.export.sources import _wrap_score_sde
    from vpsde.verify.parity import BackendSide, compare

    model = _wrap_score_sde(perturb(ScoreSdeNet(SMALL), seed=6).eval(), "small")
    b32 = export_bundle(model, tmp_path / "fp32", steps=6, grid="uniform", log=lambda _: None)
    b16 = export_bundle(model, tmp_path / "fp16", steps=6, grid="uniform", precision="fp16", log=lambda _: None)
    report = compare(b16.manifest, BackendSide(b32, name="fp32"), BackendSide(b16, name="fp16"), num=3,
                     progress=False, precision="fp16")
    assert report.passed, (report.final_rel_l2, report.required_call_atol)
    assert 0 < report.final_rel_l2 < 1e-2  # half precision is visible, and bounded


def test_bf16_export_runs_attention_and_nin_in_bfloat16(tmp_path):
    """ONNX's Einsum takes no bfloat16, so the NIN layers and the attention products export as Conv and MatMul:
    the bf16 graph has no Einsum, its attention products are typed bfloat16, and one call run by ONNX's reference
    evaluator stays within the bf16 eps bound of tests/test_precision.py (8e-2) of the fp32 graph on ORT."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    from vpsde.export.sources import _wrap_score_sde
    from vpsde.runtime.backends.onnxruntime import OnnxRuntimeRunner, session_from_bundle

    model = _wrap_score_sde(perturb(ScoreSdeNet(SMALL), seed=7).eval(), "small")
    kw = dict(steps=6, grid="uniform", log=lambda _: None)
    b32 = export_bundle(model, tmp_path / "fp32", **kw)
    b16 = export_bundle(model, tmp_path / "bf16", precision="bf16", **kw)
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(b16.graph_path("em"))))
    types = {v.name: v.type.tensor_type.elem_type for v in graph.graph.value_info}
    ops = [n.op_type for n in graph.graph.node]
    assert "Einsum" not in ops
    matmuls = [n for n in graph.graph.node if n.op_type == "MatMul"]
    assert matmuls and all(types[n.output[0]] == onnx.TensorProto.BFLOAT16 for n in matmuls)  # 2 per attention

    m, sde, i = b32.manifest, VPSDE(), 3
    g = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31)))
    feed = {"x": torch.randn(2, 3, 16, 16, generator=g).numpy(), "t": np.full(2, m.schedule["t"][i], np.float32),
            "noise": torch.randn(2, 3, 16, 16, generator=g).numpy(),
            **{k: np.full(2, m.schedule[k][i], np.float32) for k in ("dt", "sqrt_neg_dt")}}
    want = OnnxRuntimeRunner(session_from_bundle(b32, "em", threads=1), b32, "em").infer(feed)["x_mean"]
    names = [s.name for s in b16.manifest.graphs["em"].outputs]
    got = dict(zip(names, ReferenceEvaluator(graph).run(None, feed)))["x_mean"]
    assert np.isfinite(got).all()
    t = torch.tensor(m.schedule["t"][i])
    to_eps = float(sde.beta(t) * -m.schedule["dt"][i] / sde.std(t))
    error = np.abs(got - want).max() / to_eps
    assert 0 < error <= 8e-2, error
