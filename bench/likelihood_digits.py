"""What a user sees from a digits likelihood bundle: bits/dim of held-out digits against out-of-distribution inputs
(the separation as AUROC, the histograms as a picture), the bundle against an eager torch loop with the same probes
(float64: agreement; float32 autograd: cost), and the likelihood graph's cost against a plain sampling step graph.

    .venv/bin/python bench/likelihood_digits.py [--bundle DIR] [--per-set 100] [--png docs/likelihood_digits.png]

Without --bundle it exports one (vpsde export --model digits --sampler likelihood: Hutchinson, one Rademacher probe,
32 RK4 steps; about 5 minutes on 2 cores). Data sets, all uint8 16 x 16 images dequantized as `vpsde likelihood`
does (seed 0): the 297 held-out digits (never trained on), training digits, uniform noise, the held-out digits
inverted (255 - k), and grey 16 x 16 patches of scikit-learn's two sample photographs (block means of 64 x 64 crops).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vpsde.export import VPSDE, export_bundle, load_model
from vpsde.models.digits_data import train_heldout_split
from vpsde.runtime import Sampler
from vpsde.runtime.likelihood import bits_per_dim, dequantize
from vpsde.runtime.noise import make_noise

VALUE_RANGE = (-1.0, 1.0)


def to_pixels(x: np.ndarray) -> np.ndarray:
    """float [N, 1, 16, 16] in [-1, 1] -> uint8 bins k = floor(256 (x + 1) / 2), clipped to 0..255."""
    return np.clip(np.floor((x.astype(np.float64) + 1.0) * 128.0), 0, 255).astype(np.uint8)


def photo_patches(n: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [n, 1, 16, 16]: grey block means (4 x 4) of random 64 x 64 crops of scikit-learn's sample photographs."""
    from sklearn.datasets import load_sample_images

    photos = [img.astype(np.float64).mean(axis=2) for img in load_sample_images().images]
    out = np.empty((n, 1, 16, 16), np.uint8)
    for i in range(n):
        img = photos[i % len(photos)]
        r, c = rng.integers(0, img.shape[0] - 64), rng.integers(0, img.shape[1] - 64)
        out[i, 0] = np.round(img[r:r + 64, c:c + 64].reshape(16, 4, 16, 4).mean(axis=(1, 3)))
    return out


def data_sets(per_set: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    (x_train, _), (x_held, _) = train_heldout_split()
    held = to_pixels(x_held)
    return {"held-out digits": held,
            "training digits": to_pixels(x_train[rng.choice(len(x_train), per_set, replace=False)]),
            "uniform noise": rng.integers(0, 256, (per_set, 1, 16, 16), dtype=np.uint8),
            "inverted digits": 255 - held[:per_set],
            "photo patches": photo_patches(per_set, rng)}


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(bpd of an outside input > bpd of an inside one), ties half: the AUROC of bits/dim as an OOD score."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(inside)), np.ones(len(outside))], np.r_[inside, outside]))


def eager_log_likelihood(model, sde: VPSDE, manifest, points: np.ndarray, seed: int, first: int,
                         dtype: torch.dtype) -> np.ndarray:
    """score_sde's Hutchinson estimator as an eager loop: the bundle's RK4 steps and schedule, the same Rademacher
    probes (noise call 1 + step of each sample), the divergence by one autograd VJP per field evaluation
    (v . d(v . f)/dx, score_sde's way). -> log p float64 [N]."""
    sched = {k: torch.tensor(v, dtype=dtype) for k, v in manifest.schedule.items()}
    noise = make_noise(manifest.noise.generator, seed)
    x = torch.from_numpy(points).to(dtype)
    n = len(x)
    shape = tuple(points.shape[1:])
    model = model.to(dtype)

    def field(y: torch.Tensor, t: float, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = y.detach().requires_grad_(True)
        tv = torch.full((n,), t, dtype=dtype)
        with torch.enable_grad():
            half_beta = (0.5 * sde.beta(tv)).view(-1, 1, 1, 1)
            f = half_beta / sde.std(tv).view(-1, 1, 1, 1) * model(y, tv) - half_beta * y
            (vjp,) = torch.autograd.grad((f * v).sum(), y)
        return f.detach(), (vjp * v).flatten(1).sum(1)

    delta = torch.zeros(n, dtype=dtype)
    for i in range(manifest.sampler.steps):
        v = torch.from_numpy(np.where(noise(1 + i, first, n, shape) >= 0, 1.0, -1.0)).to(dtype)
        t, tm, tn, h = (float(sched[k][i]) for k in ("t", "t_mid", "t_next", "h"))
        k1, g1 = field(x, t, v)
        k2, g2 = field(x + 0.5 * h * k1, tm, v)
        k3, g3 = field(x + 0.5 * h * k2, tm, v)
        k4, g4 = field(x + h * k3, tn, v)
        x = x + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        delta = delta + h / 6.0 * (g1 + 2 * g2 + 2 * g3 + g4)
    prior = -0.5 * (x.flatten(1).pow(2).sum(1) + x[0].numel() * math.log(2 * math.pi))
    return (prior + delta).double().numpy()


def per_point_ms(fn, points: np.ndarray, batch: int, reps: int = 3) -> float:
    """Median over ``reps`` of the wall time of ``fn(points)`` per point, ms (after one warm-up)."""
    fn(points[:batch])
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(points[:batch])
        times.append((time.perf_counter() - t0) / batch)
    return 1000 * float(np.median(times))


def graph_call_ms(path: Path, feeds: dict[str, np.ndarray], reps: int = 10) -> float:
    """Median ms of one ONNX Runtime call of the graph at ``path`` on ``feeds``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in names}
    sess.run(None, feeds)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def histograms(bpd: dict[str, np.ndarray], aucs: dict[str, float], path: Path) -> None:
    from vpsde.runtime import plots

    plt = plots.pyplot("the histograms")
    fig, ax = plt.subplots(figsize=(7, 3.8))
    lo, hi = min(v.min() for v in bpd.values()), max(v.max() for v in bpd.values())
    bins = np.linspace(lo, hi, 60)
    for name, values in bpd.items():
        label = name + (f" (AUROC {aucs[name]:.3f})" if name in aucs else "")
        ax.hist(values, bins=bins, alpha=0.55, label=label)
    ax.set_xlabel("bits/dim (score_sde's offset 7 for [-1, 1])")
    ax.set_ylabel("inputs")
    ax.set_title("digits16 likelihood bundle: held-out digits vs out-of-distribution inputs")
    ax.legend(fontsize=8)
    plots.save(fig, [ax], path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None, help="a digits likelihood bundle (default: export one)")
    ap.add_argument("--per-set", type=int, default=100, help="inputs per out-of-distribution set")
    ap.add_argument("--png", type=Path, default=None, help="write the histograms here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        if args.bundle is None:
            t0 = time.perf_counter()
            args.bundle = export_bundle(load_model("digits", VPSDE()), Path(tmp) / "lik", sampler="likelihood",
                                        steps=32, log=lambda _: None).root
            print(f"exported the likelihood bundle in {time.perf_counter() - t0:.0f} s")
        sampler = Sampler(args.bundle, progress=False)
        m = sampler.manifest
        print(f"bundle {args.bundle}: {m.sampler.steps} RK4 steps, {m.sampler.params.get('divergence')} divergence, "
              f"{m.sampler.params.get('probes')} probe(s); seed {args.seed}")
        sets = data_sets(args.per_set, rng)
        bpd, points_of = {}, {}
        print(f"{'data':18s} {'inputs':>6s} {'bits/dim':>16s} {'median':>7s} {'AUROC vs held-out':>18s}")
        for name, pixels in sets.items():
            points = dequantize(pixels, VALUE_RANGE, args.seed, 0, m.noise.generator)
            points_of[name] = points
            logp = sampler.log_likelihood(points, args.seed)
            bpd[name] = bits_per_dim(-logp, 256, VALUE_RANGE, True)
        held = bpd["held-out digits"]
        aucs = {name: auroc(held, v) for name, v in bpd.items() if name != "held-out digits"}
        for name, v in bpd.items():
            auc = f"{aucs[name]:.3f}" if name in aucs else "-"
            print(f"{name:18s} {len(v):6d} {v.mean():8.3f} +- {v.std(ddof=1) / math.sqrt(len(v)):5.3f} "
                  f"{np.median(v):7.3f} {auc:>18s}")
        if args.png:
            histograms(bpd, aucs, args.png)
            print(f"wrote {args.png}")

        model, sde = load_model("digits", VPSDE()), VPSDE()
        few = points_of["held-out digits"][:8]
        ref = eager_log_likelihood(model, sde, m, few, args.seed, 0, torch.float64)
        got = sampler.log_likelihood(few, args.seed)
        print(f"bundle vs eager float64 loop with the same probes (8 held-out digits): max |d log p| "
              f"{np.abs(got - ref).max():.2e} nats (log p ~ {np.abs(ref).mean():.0f})")

        x = points_of["held-out digits"]
        print("cost per input, ms (this machine, all threads; median of 3):")
        for batch in (1, 64):
            onnx_ms = per_point_ms(lambda p: sampler.log_likelihood(p, args.seed, batch_size=len(p)), x, batch)
            eager_ms = per_point_ms(lambda p: eager_log_likelihood(model, sde, m, p, args.seed, 0, torch.float32), x,
                                    batch)
            print(f"  batch {batch:2d}: bundle (ONNX Runtime) {onnx_ms:8.1f}   eager torch autograd loop "
                  f"{eager_ms:8.1f}   ratio {eager_ms / onnx_ms:.2f}")

        plain = export_bundle(load_model("digits", VPSDE()), Path(tmp) / "ode", sampler="ode-euler", steps=4,
                              log=lambda _: None)
        b = 64
        feeds = {"x": x[:b], "logdet": np.zeros_like(x[:b]), "probe": rng.standard_normal(x[:b].shape).astype(np.float32),
                 **{k: np.full(b, m.schedule[k][10], np.float32) for k in m.schedule},
                 **{k: np.full(b, plain.manifest.schedule[k][1], np.float32) for k in plain.manifest.schedule}}
        lik_ms = graph_call_ms(Path(args.bundle) / m.graphs["likelihood"].file, feeds)
        (plain_key, plain_graph), = plain.manifest.graphs.items()
        step_ms = graph_call_ms(plain.root / plain_graph.file, feeds)
        print(f"one graph call at batch {b}: likelihood (4 model calls + 4 JVPs) {lik_ms:.1f} ms, plain "
              f"ode-euler step (1 model call) {step_ms:.1f} ms: {lik_ms / step_ms:.1f}x, "
              f"{lik_ms / (4 * step_ms):.2f}x per model evaluation")


if __name__ == "__main__":
    main()
