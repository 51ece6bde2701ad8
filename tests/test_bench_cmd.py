"""`vpsde bench`: the table and JSON it writes, and its argument checks. (Figures are not asserted: a timed unit
test proves nothing on a shared machine. What is checked is that every row is a real, finite measurement of
the batch it names.)"""

from __future__ import annotations

import json
import math

from vpsde.cli.main import main as cli


def test_bench_makes_the_json_directory_first_and_refuses_a_path_it_cannot_write_before_timing(gmm_bundle, tmp_path,
                                                                                                  capsys):
    """--json out/sub/bench.json: the directories are made (it failed after the whole bench, naming a temporary
    file); a file where a directory must be is one line before anything is timed; a failed run leaves no
    directory it made."""
    out = tmp_path / "new" / "sub" / "bench.json"
    assert cli(["bench", str(gmm_bundle.root), "--batch", "1", "--steps", "2", "--iters", "1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["rows"][0]["batch"] == 1
    capsys.readouterr()
    (tmp_path / "file").write_text("mine")
    assert cli(["bench", str(gmm_bundle.root), "--batch", "1", "--json", str(tmp_path / "file" / "b.json")]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"vpsde bench: error: --json {tmp_path / 'file' / 'b.json'}: {tmp_path / 'file'} " \
        "is a file, not a directory" and captured.out == ""
    assert cli(["bench", str(gmm_bundle.root), "--batch", "1", "--backend", "tensorrt", "--json",
                str(tmp_path / "gone" / "b.json")]) == 2
    assert not (tmp_path / "gone").exists()


def test_bench_writes_rows_for_each_batch(gmm_bundle, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli(["bench", str(gmm_bundle.root), "--batch", "1,8", "--steps", "5", "--iters", "2", "--threads", "1",
                "--json", str(out), "--plot", str(tmp_path / "bench.png")]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "bench.png").size[0] > 500  # the ms/step-vs-batch plot was drawn
    text = capsys.readouterr().out
    assert "ms/step" in text and "bundle load" in text
    data = json.loads(out.read_text())
    assert data["digest"] == gmm_bundle.digest
    rows = data["rows"]
    assert [r["batch"] for r in rows] == [1, 8] and all(r["steps_timed"] == 5 for r in rows)
    for r in rows:
        for key in ("ms_per_step", "bare_ms_per_step", "samples_per_s", "first_call_ms", "peak_rss_mb"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)


def test_bench_refuses_bad_batches(gmm_bundle, capsys):
    assert cli(["bench", str(gmm_bundle.root), "--batch", "0,4"]) == 2
    assert "--batch" in capsys.readouterr().err
    assert cli(["bench", str(gmm_bundle.root), "--batch", "a"]) == 2


def test_the_bare_calls_replay_the_loops_own_calls(gmm_bundle, tmp_path):
    """ReplayedCalls (the CPU's bare calls) stages the inputs the loop fed each call: replayed, the last call
    writes the loop's own sample, bit for bit, and there is one launch per graph call of the steps timed."""
    import numpy as np

    from vpsde.export import VPSDE, export_bundle, load_model
    from vpsde.runtime import Sampler
    from vpsde.runtime.benchmark import ReplayedCalls

    gmm = load_model("gmm:dim=3,components=2,seed=4", VPSDE())
    pc = export_bundle(gmm, tmp_path / "pc", sampler="pc", steps=6, grid="uniform", corrector_steps=2,
                       log=lambda _: None)
    for bundle, steps, calls_per_step in ((gmm_bundle, 5, 1), (pc, 6, 3)):
        sampler = Sampler(bundle, progress=False, threads=1)
        want = sampler.sample(3, seed=0, stop_after_steps=steps)
        replay = ReplayedCalls(sampler, 3, steps)
        assert len(replay.launches) == steps * calls_per_step
        assert replay.seconds() > 0
        got = replay.device.peek(replay.sync)
        assert np.isfinite(got).all()
        np.testing.assert_array_equal(got, want)
        # the loop still runs on its own runners afterwards
        np.testing.assert_array_equal(sampler.sample(3, seed=0, stop_after_steps=steps), want)


def test_bench_times_a_likelihood_program(tmp_path, capsys):
    """A likelihood bundle is timed from seeded points (bench_points): the table's rate is inputs/s, and the bare
    calls replay the loop's own calls: their last output, summed per row, is the loop's result bit for bit."""
    import numpy as np

    from vpsde.export import VPSDE, export_bundle, load_model
    from vpsde.runtime import Sampler
    from vpsde.runtime.benchmark import ReplayedCalls, bench_points
    from vpsde.runtime.likelihood import row_log_likelihood

    bundle = export_bundle(load_model("gmm:dim=3,components=2,seed=5", VPSDE()), tmp_path / "lik",
                           sampler="likelihood", steps=5, log=lambda _: None)
    out = tmp_path / "bench.json"
    assert cli(["bench", str(bundle.root), "--batch", "2", "--steps", "3", "--iters", "2", "--threads", "1",
                "--json", str(out)]) == 0
    assert "inputs/s" in capsys.readouterr().out
    (row,) = json.loads(out.read_text())["rows"]
    assert row["steps_timed"] == 3
    assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("ms_per_step", "samples_per_s"))

    sampler = Sampler(bundle, progress=False, threads=1)
    points = bench_points(bundle.manifest, 4)
    assert points.shape == (4, 3) and np.isfinite(points).all() and points.std() > 0.5
    want = sampler.log_likelihood(points, seed=0, stop_after_steps=3)
    assert np.isfinite(want).all() and not np.array_equal(want, sampler.log_likelihood(points, seed=0))
    np.testing.assert_array_equal(sampler.log_likelihood(points, stop_after_steps=99), sampler.log_likelihood(points))
    replay = ReplayedCalls(sampler, 4, 3)
    assert len(replay.launches) == 3 and replay.seconds() > 0
    np.testing.assert_array_equal(row_log_likelihood(replay.device.peek(replay.sync)), want)


def test_bench_times_a_conditioned_bundle(gmm_bundle, tmp_path, capsys):
    """Inpainting and colorization bundles are timed with bench_conditioning (one known sample in the value range;
    inpainting keeps the first half of the last axis): the conditioning the loop gets steers the samples."""
    import numpy as np

    from vpsde.export import VPSDE, export_bundle, load_model
    from vpsde.runtime import Sampler
    from vpsde.runtime.benchmark import bench_conditioning, program_run

    model = load_model("gmm:dim=4,components=2,seed=3", VPSDE())
    bundle = export_bundle(model, tmp_path / "inpaint", sampler="inpaint", steps=30, log=lambda _: None)
    out = tmp_path / "bench.json"
    assert cli(["bench", str(bundle.root), "--batch", "1,3", "--steps", "4", "--iters", "2", "--threads", "1",
                "--json", str(out)]) == 0, capsys.readouterr().err
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 3] and all(math.isfinite(r["ms_per_step"]) for r in rows)
    cond = bench_conditioning(bundle.manifest)
    assert sorted(cond) == ["known", "mask"] and cond["mask"].tolist() == [1, 1, 0, 0]
    assert np.isfinite(cond["known"]).all() and cond["known"].std() > 0.1
    samples = program_run(Sampler(bundle, progress=False, threads=1), 5, 30)()
    np.testing.assert_allclose(samples[:, :2], np.broadcast_to(cond["known"][:2], (5, 2)), atol=0.05)
    assert bench_conditioning(gmm_bundle.manifest) is None  # an unconditioned bundle gets none


def test_a_backend_that_cannot_open_does_not_hide_the_others(gmm_bundle, tmp_path, capsys):
    """`--backend onnxruntime,tensorrt` where TensorRT cannot open (no GPU here; no engines built on a GPU): the
    onnxruntime rows still come, the tensorrt line says why it did not run, the JSON records it, exit status 1.
    With no backend that opens, the first one's error is the command's (exit 2); a misspelled name is refused
    before anything runs."""
    out = tmp_path / "bench.json"
    assert cli(["bench", str(gmm_bundle.root), "--backend", "onnxruntime,tensorrt", "--batch", "1,2", "--steps", "3",
                "--iters", "1", "--threads", "1", "--json", str(out)]) == 1
    text = capsys.readouterr().out
    assert "onnxruntime/cpu" in text
    not_run = [line for line in text.splitlines() if line.startswith("tensorrt")]
    assert len(not_run) == 1 and not_run[0].startswith("tensorrt: not run: ") and len(not_run[0]) > 40, text
    data = json.loads(out.read_text())
    assert [r["backend"] for r in data["rows"]] == ["onnxruntime", "onnxruntime"]
    assert list(data["not_run"]) == ["tensorrt"] and data["not_run"]["tensorrt"] in not_run[0]

    assert cli(["bench", str(gmm_bundle.root), "--backend", "tensorrt", "--batch", "1", "--steps", "2"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("vpsde bench: error: ")
    assert cli(["bench", str(gmm_bundle.root), "--backend", "onnxruntime,onnxruntim", "--batch", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "unknown backend 'onnxruntim'" in captured.err
