"""Continuous batching (runtime/scheduler.py) against offline sampling: random traffic over several programs, each
request's samples equal to Sampler.sample for its (seed, first_sample, num) bit for bit (a likelihood program's
log p to Sampler.log_likelihood); joins and leaves at step boundaries; one graph per call; padding that never touches
real rows; cancellation, a full queue, NaN; the row-invariance probe, and a backend that fails it."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import small_conv
from vpsde.export import VPSDE, export_bundle, load_model
from vpsde.runtime import Sampler
from vpsde.runtime.backends import open_backend
from vpsde.runtime.errors import InputError, NonFiniteError
from vpsde.runtime.loop import OpenBackend
from vpsde.runtime.request import check_request
from vpsde.runtime.scheduler import QueueFull, StepScheduler, batch_shapes, probe_row_invariance

PROGRAMS = {  # the digits UNet: row-invariant on ONNX Runtime's CPU kernels (the probe says so; the mixture's is not)
    "em": {"sampler": "em", "steps": 5, "grid": "uniform"},
    "pc": {"sampler": "pc", "steps": 3, "corrector_steps": 2, "grid": "uniform"},  # two graphs, a repeated call
    "unipc": {"sampler": "unipc", "steps": 4},                                     # four states
    "inpaint": {"sampler": "inpaint", "steps": 4, "grid": "uniform"},              # conditioning per row
}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("sched")
    return {name: export_bundle(load_model("digits", VPSDE()), root / name, log=lambda _: None, **kw)
            for name, kw in PROGRAMS.items()}


def _scheduler(bundle, **kw) -> StepScheduler:
    return StepScheduler(bundle.manifest, open_backend("onnxruntime", bundle, "cpu", 1), **kw)


def _conditioning(bundle, num, rng):
    if not bundle.manifest.sampler.conditioning:
        return None
    shape = tuple(bundle.manifest.model.sample_shape)
    return {"known": rng.uniform(-1, 1, (num, *shape)).astype(np.float32),
            "mask": (rng.random(shape) < 0.5).astype(np.float32)}  # one mask shared by the request's samples


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_random_traffic_equals_offline_sampling(bundles, name):
    """Requests of random seeds, offsets and sizes join at random ticks while others run; each result equals
    Sampler.sample bit for bit, and every tick runs one graph over at most the largest shape."""
    bundle = bundles[name]
    rng = np.random.default_rng()
    sched = _scheduler(bundle, slots=8, shapes=(1, 4, 8))
    probe = probe_row_invariance(bundle.manifest, OpenBackend(sched.device, sched.runners), sched.shapes)
    assert probe is None, probe  # the premise of the comparison below
    sampler = Sampler(bundle, progress=False, threads=1)
    num_jobs = 8
    pending = [(int(rng.integers(2**64, dtype=np.uint64)), int(rng.integers(0, 2**40)), int(rng.integers(1, 7)))
               for _ in range(num_jobs)]
    jobs, shapes_seen, graphs = [], set(), set()
    while pending or not sched.idle:
        if pending and rng.random() < 0.4:
            seed, first, num = pending.pop()
            cond = _conditioning(bundle, num, rng)
            jobs.append((sched.submit(check_request(bundle.manifest, seed, first, num, cond)), cond))
        sched.tick()
        if sched.last_tick is not None:
            assert sched.last_tick.rows <= sched.last_tick.shape <= 8 and sched.busy <= 8
            shapes_seen.add(sched.last_tick.shape)
            graphs.add(sched.last_tick.graph)
    assert graphs == set(bundle.manifest.graphs)
    for job, cond in jobs:
        r = job.request
        assert job.done and job.error is None
        want = sampler.sample(r.num, r.seed, first_sample=r.first_sample, conditioning=cond)
        np.testing.assert_array_equal(job.result, want)


@pytest.fixture(scope="module")
def likelihood_bundle(tmp_path_factory):
    return export_bundle(small_conv(), tmp_path_factory.mktemp("sched") / "lik", sampler="likelihood", steps=5,
                         value_range=(-1, 1), log=lambda _: None)


def test_likelihood_traffic_equals_offline_log_likelihoods(likelihood_bundle):
    """A likelihood program's rows start at their data points and share calls with other requests' rows at other
    steps; each request's log p equals Sampler.log_likelihood bit for bit (its Hutchinson probes drawn per row from
    (seed, sample index), each row summed in float64 as offline)."""
    bundle = likelihood_bundle
    rng = np.random.default_rng()
    sched = _scheduler(bundle, slots=8, shapes=(1, 4, 8))
    probe = probe_row_invariance(bundle.manifest, OpenBackend(sched.device, sched.runners), sched.shapes)
    assert probe is None, probe
    sampler = Sampler(bundle, progress=False, threads=1)
    pending = [(int(rng.integers(2**64, dtype=np.uint64)), int(rng.integers(0, 2**40)), int(rng.integers(1, 7)))
               for _ in range(8)]
    jobs, steps_together = [], 0
    while pending or not sched.idle:
        if pending and rng.random() < 0.4:
            seed, first, num = pending.pop()
            data = rng.uniform(-1, 1, (num, 1, 8, 8)).astype(np.float32)
            jobs.append((sched.submit(check_request(bundle.manifest, seed, first, num), data=data), data))
        sched.tick()
        if sched.last_tick is not None:
            steps_together = max(steps_together, len(sched.last_tick.steps))
    assert steps_together > 1  # rows at different steps shared a call
    for job, data in jobs:
        r = job.request
        assert job.done and job.error is None and job.result.dtype == np.float64 and job.result.shape == (r.num,)
        np.testing.assert_array_equal(job.result, sampler.log_likelihood(data, r.seed, first_sample=r.first_sample))


def test_data_goes_with_likelihood_programs_only(bundles, likelihood_bundle):
    points = np.zeros((2, 1, 8, 8), np.float32)
    sched = _scheduler(likelihood_bundle, slots=2)
    request = check_request(likelihood_bundle.manifest, 0, 0, 2)
    with pytest.raises(InputError, match="scores data points"):
        sched.submit(request)
    with pytest.raises(InputError, match=r"data: expected float32 \[2, 1, 8, 8\], got float32 \[3, 1, 8, 8\]"):
        sched.submit(request, data=np.zeros((3, 1, 8, 8), np.float32))
    with pytest.raises(InputError, match="a sample program takes no data"):
        _scheduler(bundles["em"], slots=2).submit(check_request(bundles["em"].manifest, 0, 0, 2), data=points)
    assert sched.idle and not sched.jobs


def test_rows_join_when_slots_free_and_leave_when_done(bundles):
    bundle = bundles["em"]
    sched = _scheduler(bundle, slots=4, shapes=(4,))
    steps = bundle.manifest.sampler.steps
    a = sched.submit(check_request(bundle.manifest, 1, 0, 3))
    sched.tick()
    b = sched.submit(check_request(bundle.manifest, 2, 0, 3))  # one slot free: one row joins, two wait
    sched.tick()
    assert (sched.busy, sched.queued) == (4, 2) and sched.last_tick.steps == (0, 1)  # rows at two steps share a call
    for _ in range(steps - 3):  # a's rows are at step 2 of 0..steps-1
        assert sched.tick() == []
    assert sched.tick() == [a] and a.done and sched.busy == 1  # a's rows left after their last step; b's wait
    sched.tick()
    assert sched.queued == 0 and sched.busy == 2  # ... joined at the next tick, as b's first row made its last step
    assert sched.last_tick.rows == 3 and sched.last_tick.steps == (0, 4)
    sched.run_until_idle()
    assert b.done and sched.idle
    sampler = Sampler(bundle, progress=False, threads=1)
    np.testing.assert_array_equal(a.result, sampler.sample(3, 1))
    np.testing.assert_array_equal(b.result, sampler.sample(3, 2))


def test_a_small_request_is_not_stuck_behind_a_large_one(bundles):
    """A freed slot goes to the waiting request with the fewest rows running: the one-sample request submitted after
    an eight-sample one runs from the first tick and finishes after `steps` ticks, not after the large one."""
    bundle = bundles["em"]
    sched = _scheduler(bundle, slots=4)
    large = sched.submit(check_request(bundle.manifest, 1, 0, 8))
    small = sched.submit(check_request(bundle.manifest, 2, 0, 1))
    finished = [sched.tick() for _ in range(bundle.manifest.sampler.steps)]
    assert finished[-1] == [small] and large.remaining == 5 and (sched.busy, sched.queued) == (0, 5)
    sched.run_until_idle()
    sampler = Sampler(bundle, progress=False, threads=1)
    np.testing.assert_array_equal(small.result, sampler.sample(1, 2))
    np.testing.assert_array_equal(large.result, sampler.sample(8, 1))


def test_requests_behind_more_requests_than_slots_take_turns(bundles):
    """Six three-sample requests and then a one-sample one, two slots: rows finish together, and the freed slots go
    round robin (requests never admitted first), so the small request runs in the fourth round, not after every
    large request is done (the tenth round, if ties always went to the oldest request)."""
    bundle = bundles["em"]
    steps = bundle.manifest.sampler.steps
    sched = _scheduler(bundle, slots=2)
    large = [sched.submit(check_request(bundle.manifest, k, 0, 3)) for k in range(6)]
    small = sched.submit(check_request(bundle.manifest, 9, 0, 1))
    finished_at = {}
    tick = 0
    while not sched.idle:
        for job in sched.tick():
            finished_at[id(job)] = tick
        tick += 1
    assert finished_at[id(small)] == 4 * steps - 1
    assert [finished_at[id(j)] // steps for j in large] == [6, 7, 7, 8, 8, 9]  # A: rounds 1, 4, 7; B: 1, 5, 8; ...
    sampler = Sampler(bundle, progress=False, threads=1)
    np.testing.assert_array_equal(small.result, sampler.sample(1, 9))


def test_a_multi_graph_program_groups_rows_by_graph(bundles):
    bundle = bundles["pc"]
    sched = _scheduler(bundle, slots=8)
    sched.submit(check_request(bundle.manifest, 0, 0, 2))
    sched.tick()  # the first rows' corrector call
    sched.submit(check_request(bundle.manifest, 1, 0, 2))
    seen = []
    while not sched.idle:
        sched.tick()
        seen.append((sched.last_tick.graph, sched.last_tick.rows))
    # the new rows start with a corrector call while the first ones make their second: one call; the predictor apart
    assert {g for g, _ in seen} == {"langevin", "reverse_diffusion"} and ("langevin", 4) in seen


def test_cancel_queue_full_and_nan(bundles, tmp_path):
    bundle = bundles["em"]
    sched = _scheduler(bundle, slots=2, max_queued=2)
    a = sched.submit(check_request(bundle.manifest, 0, 0, 3))
    b = sched.submit(check_request(bundle.manifest, 1, 0, 1))
    with pytest.raises(QueueFull, match="max_queued 2"):
        sched.submit(check_request(bundle.manifest, 2, 0, 1))
    sched.tick()
    sched.cancel(a)
    finished = []
    sched.run_until_idle(finished.append)
    assert finished == [b] and a.cancelled and sched.idle
    np.testing.assert_array_equal(b.result, Sampler(bundle, progress=False, threads=1).sample(1, 1))

    marker = {}

    def poison(buffers):  # the graph's real outputs, with sample index 5's x_next made NaN
        x_in = buffers["x"].numpy()
        hit = (x_in == marker["x"]).reshape(len(x_in), -1).all(axis=1)
        buffers["x_next"].numpy()[hit] = np.nan

    opened = open_backend("onnxruntime", bundle, "cpu", 1)
    sched = StepScheduler(bundle.manifest, _tampered(opened, poison), slots=4)
    bad = sched.submit(check_request(bundle.manifest, 3, 4, 3))
    good = sched.submit(check_request(bundle.manifest, 4, 0, 2))
    marker["x"] = sched.waiting[bad][1].values["x"]  # sample 5's prior: poisoned at its first call
    finished = []
    sched.run_until_idle(finished.append)
    assert isinstance(bad.error, NonFiniteError) and "in sample 5" in str(bad.error) and "step 0" in str(bad.error)
    assert good in finished and good.error is None
    # the failed and the finished rows gave their slots back: all four run in one call again
    again = sched.submit(check_request(bundle.manifest, 6, 0, 4))
    sched.tick()
    assert sched.last_tick.rows == 4 and sched.busy == 4
    sched.run_until_idle()
    np.testing.assert_array_equal(again.result, Sampler(bundle, progress=False, threads=1).sample(4, 6))


def test_the_probe_catches_a_backend_that_is_not_row_invariant(bundles):
    bundle = bundles["em"]
    opened = open_backend("onnxruntime", bundle, "cpu", 1)
    assert probe_row_invariance(bundle.manifest, opened, batch_shapes(8)) is None

    def by_position(buffers):  # rounds like a kernel whose result depends on the row's position in the batch
        x = buffers["x_next"].numpy()
        x[1::2] = np.nextafter(x[1::2], np.inf)

    shifted = _tampered(opened, by_position)
    message = probe_row_invariance(bundle.manifest, shifted, batch_shapes(8))
    assert message is not None and "'x_next'" in message and "position" in message


def test_open_probes_the_backend(bundles):
    sched, problem = StepScheduler.open(bundles["em"].root, threads=1, slots=4)
    assert problem is None and sched.shapes == (1, 2, 4)
    job = sched.submit(check_request(bundles["em"].manifest, 8, 2, 3))
    sched.run_until_idle()
    np.testing.assert_array_equal(job.result, Sampler(bundles["em"], progress=False, threads=1).sample(3, 8, first_sample=2))


def _tampered(opened: OpenBackend, edit) -> OpenBackend:
    """``opened`` with ``edit(buffers)`` applied after every graph call (CPU: ``.numpy()`` views the buffers)."""
    class Runner:
        def __init__(self, runner):
            self.runner = runner

        def bind(self, buffers):
            launch = self.runner.bind(buffers)

            def run():
                launch()
                edit(buffers)
            return run

    return OpenBackend(opened.device, {k: Runner(r) for k, r in opened.runners.items()})


def test_batch_shapes():
    assert batch_shapes(16) == (1, 2, 4, 8, 16) and batch_shapes(6) == (1, 2, 4, 6) and batch_shapes(1) == (1,)


def test_the_serving_loop_answers_each_request_once_and_a_full_queue_at_once(bundles):
    """serving/continuous.py: requests handed in from several threads each get their samples (equal to offline
    sampling) or, past max_queued, the scheduler's one-line QueueFull, through their reply callback; a reply that
    raises (a client gone mid-send) does not stop the loop; the tick callback sees the scheduler's status."""
    import threading

    from vpsde.serving.continuous import ContinuousLoop

    bundle = bundles["em"]
    sampler = Sampler(bundle, progress=False, threads=1)
    ticks: list[dict[str, int]] = []
    loop = ContinuousLoop(_scheduler(bundle, slots=4, max_queued=3), on_tick=ticks.append)
    answers: dict[int, tuple] = {}
    done = threading.Event()

    def reply_for(k: int):
        def reply(samples, message):
            answers[k] = (None if samples is None else samples.copy(), message)
            if k == 0:
                raise ConnectionError("the client went away")
            if len(answers) == 8:
                done.set()
        return reply

    requests = [check_request(bundle.manifest, 10 + k, 3 * k, 1 + k % 3) for k in range(8)]
    threads = [threading.Thread(target=loop.submit, args=(requests[k], reply_for(k))) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert done.wait(120), f"answers for {sorted(answers)} only"
    loop.close()
    full = [k for k, (_, message) in answers.items() if message is not None]
    assert full and all("max_queued 3" in answers[k][1] for k in full)
    for k, (samples, message) in answers.items():
        if message is None:
            r = requests[k]
            np.testing.assert_array_equal(samples, sampler.sample(r.num, r.seed, first_sample=r.first_sample))
    assert ticks and max(t["busy"] for t in ticks) <= 4 and ticks[-1] == {"slots": 4, "busy": 0, "queued": 0}


@pytest.mark.parametrize("model", ["gmm", "gmm:dim=4,components=5,full=1"])
def test_row_invariance_diagnostic_agrees_with_the_probe(model, tmp_path):
    """bench/row_invariance.py names the nodes where a row's bits start to depend on its batch; it finds some
    exactly where the probe fails (the default mixture: ONNX Runtime's Log on 6 values a row), none where it
    passes (the rotated mixture's EM graph)."""
    import importlib.util
    from pathlib import Path

    import onnx

    spec = importlib.util.spec_from_file_location("row_invariance",
                                                  Path(__file__).parent.parent / "bench" / "row_invariance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    bundle = export_bundle(load_model(model, VPSDE()), tmp_path / "b", steps=10, log=lambda _: None)
    probe = probe_row_invariance(bundle.manifest, open_backend("onnxruntime", bundle, "cpu", 1), batch_shapes(8))
    origins = module.row_variant_origins(bundle.root / bundle.manifest.graphs["em"].file, batch=8)
    assert bool(origins) == (probe is not None), (origins, probe)
    for origin in origins:
        assert origin["max_abs"] > 0 and origin["shape"][0] == 8
    # and in a graph whose rows depend on their batch-mates by construction (x - the batch mean, a [1, 4] value
    # that is no row's) it names the first node whose rows change: the subtraction; x's shape, whose first axis
    # is the batch at batch 2, is no row's either and is left out
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["s"], name="shape"),
         helper.make_node("Relu", ["x"], ["r"], name="relu"),
         helper.make_node("ReduceMean", ["r"], ["m"], name="batch_mean", axes=[0], keepdims=1),
         helper.make_node("Sub", ["r", "m"], ["y"], name="centre")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "mean.onnx")
    for batch in (2, 8):
        origins = module.row_variant_origins(tmp_path / "mean.onnx", batch=batch)
        assert [o["node"] for o in origins] == ["centre"], batch
