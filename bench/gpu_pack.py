"""Pack what the GPU check needs on a device that reaches no package index into parts that fit one device call
each (docs/gpu.md, "The GPU check in one lease").

The device image has torch (CUDA 13), numpy, onnx and the CPU onnxruntime; the check also needs onnxruntime-gpu
(the CUDA 13 build, for the device's Python) and a few pure-Python packages. This downloads their wheels from
PyPI, unpacks them into one site tree, packs it as tar.xz (the wheel's zip deflate leaves room: xz needs fewer
parts), and cuts that into parts of --part-mib: ``OUT/partNN/chunk`` plus ``OUT/manifest.json`` (sha256 of the
whole and of each part). ``bench/gpu_unpack.py`` reverses it on the device with the standard library alone.

    python bench/gpu_pack.py                      # .gpucheck/: onnxruntime-gpu for cp312 and the check's packages
    python bench/gpu_pack.py --standin cpu --out /tmp/dry   # CI's dry run: this Python's CPU onnxruntime
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ORT_GPU = "onnxruntime-gpu==1.31.1"
EXTRAS = ["polygraphy", "safetensors", "tqdm", "pytest", "pluggy", "iniconfig", "onnxscript", "onnx_ir",
          "ml_dtypes", "diffusers", "huggingface_hub", "filelock", "fsspec", "regex", "requests", "certifi", "idna",
          "urllib3", "charset_normalizer", "pyyaml", "typing_extensions", "importlib_metadata", "zipp", "pillow",
          "hf-xet"]
"""What the check imports beyond the device image (torch, numpy, onnx): vpsde's runtime and parity, pytest, the
dynamo ONNX exporter's packages, and diffusers for the eager baseline (with its imports)."""
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "any"]


def download(packages: list[str], into: Path, python: str | None) -> list[Path]:
    """Wheels of ``packages`` (no dependencies) for ``python`` ("3.12": manylinux x86-64 binaries) or this one."""
    target = ["--python-version", python, "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)]] \
        if python else []
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", *target,
                    *packages, "-d", str(into)], check=True)
    return sorted(into.glob("*.whl"))


def site_tar(wheels: list[Path]) -> bytes:
    """Every wheel unpacked into one site tree (its files at their site-packages paths), as an uncompressed tar."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        seen: set[str] = set()
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as z:
                for info in z.infolist():
                    if info.is_dir() or info.filename in seen or info.filename.split("/", 1)[0].endswith(".data"):
                        continue  # scripts and headers in NAME.data/ are not needed on the device
                    seen.add(info.filename)
                    data = z.read(info)
                    entry = tarfile.TarInfo(info.filename)
                    entry.size, entry.mode = len(data), 0o755 if info.external_attr >> 16 & 0o111 else 0o644
                    tar.addfile(entry, io.BytesIO(data))
    return buffer.getvalue()


def pack(out: Path, wheels: list[Path], part_mib: int, preset: int = 6) -> dict:
    """Compress (xz ``preset``) and cut; returns what manifest.json holds."""
    blob = lzma.compress(site_tar(wheels), preset=preset)
    size = part_mib << 20
    parts = []
    for k in range(0, len(blob), size):
        chunk = blob[k:k + size]
        folder = out / f"part{k // size:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "chunk").write_bytes(chunk)
        parts.append({"name": folder.name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    manifest = {"format": "vpsde-gpucheck", "version": 1, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
                "wheels": [w.name for w in wheels], "parts": parts}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(".gpucheck"), help="where the parts go (default: .gpucheck)")
    parser.add_argument("--python", default="3.12", help="the device's Python (default: 3.12, the H200 image's)")
    parser.add_argument("--part-mib", type=int, default=56,
                        help="part size in MiB: 64 MiB travel per call, the repository included (default: 56)")
    parser.add_argument("--xz-preset", type=int, default=6, choices=range(10), metavar="0..9",
                        help="xz compression level (default: 6; 0 is fast, for the dry run)")
    parser.add_argument("--standin", choices=["cpu"], default=None,
                        help="cpu: pack this Python's CPU onnxruntime and tqdm instead (the CI dry run)")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out} is not empty: remove it first (it holds parts of an earlier pack)")
    with tempfile.TemporaryDirectory() as tmp:
        if args.standin == "cpu":
            import onnxruntime

            wheels = download([f"onnxruntime=={onnxruntime.__version__}", "tqdm"], Path(tmp), None)
        else:
            wheels = download([ORT_GPU, *EXTRAS], Path(tmp), args.python)
        args.out.mkdir(parents=True, exist_ok=True)
        manifest = pack(args.out, wheels, args.part_mib, args.xz_preset)
    exclude = Path(".git/info/exclude")
    if args.out == Path(".gpucheck") and exclude.parent.is_dir():
        lines = exclude.read_text().splitlines() if exclude.exists() else []
        if "/.gpucheck/" not in lines:
            exclude.write_text("\n".join([*lines, "/.gpucheck/"]) + "\n")
    print(f"{len(manifest['wheels'])} wheels -> {manifest['bytes'] / 2**20:.1f} MiB xz in {len(manifest['parts'])} "
          f"part(s) under {args.out}; sha256 {manifest['sha256']}")


if __name__ == "__main__":
    main()
