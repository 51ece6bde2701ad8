"""The vpsde command: export -> inspect -> sample end to end, --help, and errors without tracebacks."""

import subprocess
import sys

import numpy as np
import pytest

from vpsde.cli.main import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "vpsde.cli.main", *args], capture_output=True, text=True, timeout=600)


def test_export_inspect_sample_end_to_end(tmp_path, capsys):
    b = tmp_path / "gmm"
    assert main(["export", "--model", "gmm:dim=3,components=2", "--steps", "20", "--grid", "uniform", "--out", str(b)]) == 0
    assert main(["inspect", str(b)]) == 0
    assert "euler-maruyama  20 steps  uniform grid" in capsys.readouterr().out
    assert main(["sample", str(b), "--num", "5", "--seed", "3", "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    with np.load(tmp_path / "o" / "samples.npz") as f:
        assert f["samples"].shape == (5, 3) and np.isfinite(f["samples"]).all() and int(f["seed"]) == 3


def test_sample_writes_png_grid_for_images(unet_bundle, tmp_path):
    from PIL import Image

    r = run_cli("sample", str(unet_bundle.root), "--num", "4", "--out", str(tmp_path), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "grid.png" in r.stdout
    img = Image.open(tmp_path / "grid.png")
    assert img.size == (2 * 65 + 1, 2 * 65 + 1)  # 2x2 tiles of 16*4 px, 1 px padding


@pytest.mark.parametrize("args, message", [
    (["sample", "/no/such/bundle"], "not a directory"),
    (["sample", ".", "--num", "0"], "expected an integer >= 1"),
    (["export", "--model", "nope", "--out", "{tmp}/x"], "unknown model 'nope'"),
    (["export", "--model", "gmm:dims=3", "--out", "{tmp}/x"], "model option 'dims=3'"),
    (["export", "--model", "gmm:dim=0", "--out", "{tmp}/x"], "needs dim >= 1 and components >= 1, got 0, 3"),  # was an IndexError
    (["export", "--model", "gmm:dim=100000", "--out", "{tmp}/x"], "components x dim^2 = 30000000000 floats"),  # "out of memory"
    (["sample", ".", "--seed", "-1"], "expected 0 <= seed < 2^64"),
])
def test_errors_are_messages_not_tracebacks(args, message, tmp_path):
    r = run_cli(*(a.replace("{tmp}", str(tmp_path)) for a in args))
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_an_output_directory_that_is_a_file_is_named_with_what_it_would_hold(gmm_bundle, tmp_path):
    """Each command's directory flag names what goes there; parity checks --report before comparing (a file there
    failed only once the comparison had run)."""
    from vpsde.export import VPSDE, export_bundle, load_model

    (tmp_path / "file").write_text("mine")
    lik = tmp_path / "lik"
    export_bundle(load_model("gmm", VPSDE()), lik, sampler="likelihood", steps=2, log=lambda _: None)
    np.save(tmp_path / "points.npy", np.random.default_rng().standard_normal((3, 2)).astype(np.float32))
    for args, said in [(["sample", gmm_bundle.root, "--num", "2", "--out"], "--out {}: exists and is not a directory; "
                        "--out names the directory for samples.npz"),
                       (["likelihood", lik, "--data", tmp_path / "points.npy", "--out"],
                        "--out {}: exists and is not a directory; --out names the directory for likelihood.json"),
                       (["parity", gmm_bundle.root, "--against", "eager", "--no-progress", "--report"],
                        "--report {}: exists and is not a directory; --report names the directory for report.json")]:
        r = run_cli(*map(str, args), str(tmp_path / "file"))
        assert r.returncode == 2 and r.stderr.strip().endswith(said.format(tmp_path / "file")), r.stderr
        assert r.stdout == ""  # nothing sampled, scored or compared
    assert (tmp_path / "file").read_text() == "mine"


def test_help_shows_defaults():
    r = run_cli("sample", "--help")
    assert r.returncode == 0 and "(default: 64)" in r.stdout


def test_sampler_ids_match_export():
    from vpsde.cli.main import SAMPLER_IDS
    from vpsde.export import SAMPLERS

    assert tuple(SAMPLERS) == SAMPLER_IDS


def test_export_other_samplers(tmp_path, capsys):
    b = tmp_path / "dpm"
    assert main(["export", "--model", "gmm", "--sampler", "dpmpp-2m", "--nfe", "10", "--out", str(b)]) == 0
    assert main(["inspect", str(b)]) == 0
    out = capsys.readouterr().out
    assert "dpm-solver++(2m)  10 steps  logsnr grid  final x_next" in out and "state       x0_prev <- x0" in out
    pc = tmp_path / "pc"
    assert main(["export", "--model", "gmm", "--sampler", "pc", "--nfe", "60", "--corrector-steps", "2",
                 "--snr", "0.1", "--coupling", "batch", "--out", str(pc)]) == 0
    assert main(["inspect", str(pc)]) == 0
    out = capsys.readouterr().out
    assert "20 steps" in out and "langevinx2 -> reverse_diffusionx1" in out and "coupling=batch" in out
    assert main(["sample", str(pc), "--num", "6", "--out", str(tmp_path / "o"), "--no-progress"]) == 0


def test_inpainting_from_the_command_line(tmp_path, capsys):
    b = tmp_path / "inp"
    assert main(["export", "--model", "gmm:dim=2", "--sampler", "inpaint", "--steps", "50", "--out", str(b)]) == 0
    np.save(tmp_path / "known.npy", np.array([1.5, -0.5], np.float32))
    np.save(tmp_path / "mask.npy", np.array([1.0, 0.0], np.float32))
    assert main(["sample", str(b), "--num", "8", "--known", str(tmp_path / "known.npy"), "--mask",
                 str(tmp_path / "mask.npy"), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    with np.load(tmp_path / "o" / "samples.npz") as f:
        x = f["samples"]
    assert np.allclose(x[:, 0], 1.5, atol=1e-3) and x[:, 1].std() > 0.1  # known coordinate kept, the other sampled
    r = run_cli("sample", str(b), "--num", "2", "--out", str(tmp_path / "o2"))
    assert r.returncode == 2 and "pass --known and --mask" in r.stderr
    r = run_cli("sample", str(b), "--num", "2", "--known", str(tmp_path / "known.png"), "--mask",
                str(tmp_path / "mask.npy"), "--out", str(tmp_path / "o2"))
    assert r.returncode == 2 and "known.png" in r.stderr and "pass a .npy" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--sampler", "ode-heun", "--grid", "diffusers"], "runs on the grids"),
    (["--steps", "10", "--nfe", "10"], "not both"),
    (["--sampler", "ode-heun", "--nfe", "1"], "--nfe 1: one ode-heun step costs 2 model evaluations; expected "
                                               "--nfe >= 2"),  # was 1 step: 2 evaluations, over the budget
    (["--sampler", "em", "--denoise-final"], "denoise_final is an option of dpmpp-2m"),
    (["--sampler", "em", "--snr", "0.2"], "snr, corrector_steps and coupling are options of pc"),
    (["--opset", "30"], "opset 30: the installed onnx"),
    (["--value-range", "1", "0"], "value_range: expected finite LO < HI, got [1.0, 0.0]"),
    (["--sample-shape", "3"], "--sample-shape 3: --model 'gmm' makes samples [2]"),  # was ignored
])
def test_export_option_errors(tmp_path, args, message):
    r = run_cli("export", "--model", "gmm", "--out", str(tmp_path / "b"), *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "b").exists()


def test_doctor_reports_what_this_machine_can_run(capsys):
    import onnxruntime

    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert f"onnxruntime {onnxruntime.__version__}" in out and "CPUExecutionProvider" in out
    assert all(f"\n{k}" in out for k in ("tensorrt ", "gpu ", "export "))


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available")  # the fall-back
def test_doctor_says_when_a_listed_gpu_provider_cannot_start(capsys, monkeypatch):
    """A provider ONNX Runtime lists but cannot start (here the CPU build made to list CUDA: the real session falls
    back as it does without cuDNN) is reported as such, not as available."""
    import onnxruntime

    listed = onnxruntime.get_available_providers()
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", *listed])
    assert main(["doctor"]) == 0
    assert "CUDAExecutionProvider: listed, but cannot start (ONNX Runtime fell back to the CPU" in capsys.readouterr().out


def test_typos_get_the_subcommands_usage_and_the_nearest_name(capsys):
    import pytest

    for argv, usage, hint in ((["sample", "b", "--nmu", "4"], "usage: vpsde sample", "did you mean --num (not --nmu)?"),
                              (["export", "--sampler", "dpmpp2m"], "usage: vpsde export", "did you mean 'dpmpp-2m'?"),
                              (["sampel", "b"], "usage: vpsde ", "did you mean 'sample'?")):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and usage in err and hint in err, err


def test_ray_missing_is_one_line(gmm_bundle, tmp_path):
    """`vpsde sample --ray` where Ray is not installed: one line naming the extra, not ModuleNotFoundError."""
    code = ("import sys; sys.modules['ray'] = None\n"  # import ray raises ImportError, as where it is not installed
            "from vpsde.cli.main import main\n"
            f"sys.exit(main(['sample', {str(gmm_bundle.root)!r}, '--num', '2', '--ray', 'local', '--out', "
            f"{str(tmp_path / 'o')!r}]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "vpsde sample: error: --ray needs Ray: pip install 'vpsde[ray]' (make install has it)"], run.stderr


def test_request_urls_take_a_scheme():
    from vpsde.runtime.errors import BackendUnavailable
    from vpsde.serving.client import split_url

    assert split_url("127.0.0.1:8000", "http") == ("127.0.0.1:8000", "http")
    assert split_url("http://127.0.0.1:8000/", "grpc") == ("127.0.0.1:8000", "http")
    assert split_url("grpc://host:8001", "http") == ("host:8001", "grpc")
    with pytest.raises(BackendUnavailable, match="expected HOST:PORT"):
        split_url("ftp://host:1", "http")


def test_long_runs_report_progress_off_a_terminal():
    """Off a TTY (CI logs, pipes) a long run prints a plain line every ~10 s, a short one nothing."""
    import io

    from vpsde.runtime.progress import LineProgress

    clock = [0.0]
    import vpsde.runtime.progress as progress_module

    real = progress_module.time.monotonic
    progress_module.time.monotonic = lambda: clock[0]
    try:
        quiet, loud = io.StringIO(), io.StringIO()
        with LineProgress(100, "sampling", "step", quiet) as bar:
            for _ in range(100):
                clock[0] += 0.01  # 1 s in all
                bar.update()
        assert quiet.getvalue() == ""
        with LineProgress(100, "sampling", "step", loud) as bar:
            for _ in range(100):
                clock[0] += 0.5  # 50 s in all
                bar.update()
    finally:
        progress_module.time.monotonic = real
    lines = loud.getvalue().splitlines()
    assert len(lines) == 5 and lines[0] == "sampling: 20/100 steps (20%), 10 s elapsed, about 40 s left", lines
    assert lines[-1].startswith("sampling: 100/100 steps (100%), 50 s elapsed")


def test_engine_builds_and_calibration_report_progress_as_lines_off_a_terminal(monkeypatch, capsys):
    """`tracked` (vpsde build's graphs, export's int8 calibration) goes through the same progress as sampling: off a
    TTY plain lines, never tqdm's carriage-return bar in a log; every item comes through, in order."""
    import vpsde.runtime.progress as progress_module

    clock = [0.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    seen = []
    for item in progress_module.tracked(iter("abcd"), 4, "building engines", "graph"):
        clock[0] += 6.0  # 24 s in all
        seen.append(item)
    err = capsys.readouterr().err
    assert seen == list("abcd") and "\r" not in err
    assert err.splitlines() == ["building engines: 2/4 graphs (50%), 12 s elapsed, about 12 s left",
                                "building engines: 4/4 graphs (100%), 24 s elapsed, about 0 s left"], err
    assert list(progress_module.tracked(range(3), 3, "calibration", "step", enabled=False)) == [0, 1, 2]


def test_py_models_from_the_working_directory_or_a_file_with_their_time_label(tmp_path):
    """`--model py:mymodel:make_net` run from the module's directory failed with "No module named 'mymodel'"
    (a console script's sys.path has no working directory); a file path works too, and --time-label-scale is
    recorded and used by the eager parity side."""
    import json
    import re
    from pathlib import Path

    page = (Path(__file__).parent.parent / "docs" / "python-api.md").read_text()
    (tmp_path / "mymodel.py").write_text(re.findall(r"```python\n(.*?)```", page, re.S)[-1])  # the docs' example
    vpsde = str(Path(sys.executable).parent / "vpsde")
    for spec, scale in (("py:mymodel:make_net", "999"), (f"py:{tmp_path / 'mymodel.py'}:make_net", "1")):
        out = tmp_path / f"b{scale}"
        run = subprocess.run([vpsde, "export", "--model", spec, "--sample-shape", "1,8,8", "--sampler", "dpmpp-2m",
                              "--steps", "4", "--time-label-scale", scale, "--out", str(out)], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-1500:]
        model = json.loads((out / "manifest.json").read_text())["model"]
        assert model["time_label"] == f"{scale}t" and len(model["weights_sha256"]) == 64
        run = subprocess.run([vpsde, "parity", str(out), "--against", "eager", "--model", spec, "--num", "2"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0 and "  ok" in run.stdout, run.stdout + run.stderr[-1500:]


def test_a_model_torch_cannot_export_is_one_line_and_leaves_nothing(tmp_path):
    """A model whose forward branches on its data cannot be traced by torch.export: `vpsde export` printed some
    300 lines of torch's logging and traceback, exit 1. Now the last line says what torch refused, exit 2, no
    traceback, no bundle directory; --verbose still shows torch's trace."""
    from pathlib import Path

    (tmp_path / "branchy.py").write_text(
        "import torch\nfrom torch import nn\n\n\nclass Branchy(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.conv = nn.Conv2d(1, 1, 3, padding=1)\n\n"
        "    def forward(self, x, label):\n"
        "        return self.conv(x) if float(x.sum()) > 0 else -self.conv(x)\n\n\n"
        "def make_net():\n    return Branchy()\n")
    vpsde = str(Path(sys.executable).parent / "vpsde")
    argv = [vpsde, "export", "--model", f"py:{tmp_path / 'branchy.py'}:make_net", "--sample-shape", "1,8,8",
            "--steps", "4", "--grid", "uniform", "--out", str(tmp_path / "b")]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert lines[-1].startswith("vpsde export: error: torch could not export the model inside the sampler step: ")
    assert len(lines) <= 3, lines  # the "exporting ..." progress line and the error
    assert not (tmp_path / "b").exists()
    run = subprocess.run([vpsde, "--verbose", *argv[1:]], capture_output=True, text=True, timeout=600)
    assert run.returncode == 1 and "Traceback" in run.stderr and "ExportError" in run.stderr
