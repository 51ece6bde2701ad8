"""The runtime never imports torch: proven in a subprocess where importing torch raises."""

import subprocess
import sys
import textwrap


def test_runtime_samples_with_torch_blocked(unet_bundle):
    code = textwrap.dedent(f"""
        import sys
        class BlockTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, BlockTorch())
        from vpsde.runtime import Sampler
        from vpsde.runtime.images import image_grid
        import vpsde.runtime.loop, vpsde.runtime.tensorrt.runner, vpsde.runtime.tensorrt.cuda  # GPU paths too
        x = Sampler({str(unet_bundle.root)!r}, progress=False).sample(2, seed=0)
        image_grid(x, (-1, 1))
        assert x.shape == (2, 1, 16, 16), x.shape
        leaked = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        assert not leaked, leaked
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_torch_noise_without_torch_is_a_clear_error():
    code = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None  # import torch -> ImportError
        from vpsde.runtime.noise import make_noise
        from vpsde.runtime.errors import BackendUnavailable
        try:
            make_noise("torch", 0)
        except BackendUnavailable as e:
            assert "philox" in str(e); print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "ok", r.stderr[-2000:]
