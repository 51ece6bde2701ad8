"""On the device: reassemble the parts bench/gpu_pack.py cut (copied to one folder by earlier calls), check every
sha256, and unpack the site tree into a private directory; then map this repository as the ``vpsde`` package
(its pyproject.toml's package-dir, as an editable install maps it) under --namespace. Standard library only (the
device has no index).

    python3 bench/gpu_unpack.py --parts /tmp/gpucheck --manifest .gpucheck/manifest.json --site /tmp/gpucheck/site \
        --namespace /tmp/gpucheck/ns       # then PYTHONPATH=/tmp/gpucheck/site:/tmp/gpucheck/ns
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def unpack(parts: Path, manifest_path: Path, site: Path) -> tuple[dict, bool]:
    """Reassemble, check and extract into ``site`` -> (the manifest, whether it extracted). A site this manifest
    already filled (its marker file holds the manifest's sha256) is kept as it is: a rerun on the same machine
    skips the work."""
    manifest = json.loads(manifest_path.read_text())
    marker = site / ".vpsde-unpacked"
    if marker.is_file() and marker.read_text() == manifest["sha256"]:
        return manifest, False
    blob = bytearray()
    for part in manifest["parts"]:
        path = parts / part["name"] / "chunk"
        if not path.is_file():
            path = parts / f"{part['name']}.chunk"  # copied flat
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != part["sha256"]:
            raise SystemExit(f"{path}: sha256 differs from {manifest_path}: copy that part again")
        blob += data
    if hashlib.sha256(blob).hexdigest() != manifest["sha256"]:
        raise SystemExit(f"{parts}: the reassembled parts' sha256 differs from {manifest_path}")
    site.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(bytes(blob))), mode="r") as tar:
        tar.extractall(site, filter="data")
    marker.write_text(manifest["sha256"])
    return manifest, True


def map_repository(ns: Path) -> list[str]:
    """Symlinks ns/vpsde/X -> ROOT/DIR for each top-level ``vpsde.X = DIR`` of pyproject.toml's package-dir (the
    nested ones live inside those folders); returns the package names, checked to import from ``ns``."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    top = {name: folder for name, folder in package_dir.items() if name.count(".") == 1}
    (ns / "vpsde").mkdir(parents=True, exist_ok=True)
    for name, folder in top.items():
        link = ns / "vpsde" / name.split(".")[1]
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(ROOT / folder, target_is_directory=True)
    probe = ("import importlib.util, sys\n"
             "for name in sys.argv[2:]:\n"
             "    where = list(importlib.util.find_spec(name).submodule_search_locations)\n"
             "    assert where[0].startswith(sys.argv[1]), f'{name} imports from {where[0]}, not from {sys.argv[1]}'")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ns), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-c", probe, str(ns), *top], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"mapping the repository under {ns}: {r.stderr.strip().splitlines()[-1]}")
    return sorted(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=Path, required=True, help="the folder the partNN/chunk files were copied to")
    parser.add_argument("--manifest", type=Path, required=True, help="manifest.json written by gpu_pack.py")
    parser.add_argument("--site", type=Path, required=True, help="where to unpack (put it first on PYTHONPATH)")
    parser.add_argument("--namespace", type=Path, help="map this repository as the vpsde package here (PYTHONPATH)")
    args = parser.parse_args()
    manifest, extracted = unpack(args.parts, args.manifest, args.site)
    sha = manifest["sha256"][:16]
    print(f"unpacked {len(manifest['wheels'])} wheels into {args.site} (sha256 {sha}... checked)" if extracted else
          f"{args.site} already holds these {len(manifest['wheels'])} wheels (sha256 {sha}...): kept", file=sys.stderr)
    if args.namespace:
        packages = map_repository(args.namespace)
        print(f"mapped {', '.join(packages)} under {args.namespace}", file=sys.stderr)


if __name__ == "__main__":
    main()
