"""On the device: reassemble the parts bench/gpu_pack.py cut (copied to one folder by earlier calls), check every
sha256, and unpack the site tree into a private directory; standard library only (the device has no index).

    python3 bench/gpu_unpack.py --parts /tmp/gpucheck --manifest .gpucheck/manifest.json --site /tmp/gpucheck/site
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import sys
import tarfile
from pathlib import Path


def unpack(parts: Path, manifest_path: Path, site: Path) -> dict:
    manifest = json.loads(manifest_path.read_text())
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
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=Path, required=True, help="the folder the partNN/chunk files were copied to")
    parser.add_argument("--manifest", type=Path, required=True, help="manifest.json written by gpu_pack.py")
    parser.add_argument("--site", type=Path, required=True, help="where to unpack (put it first on PYTHONPATH)")
    args = parser.parse_args()
    manifest = unpack(args.parts, args.manifest, args.site)
    print(f"unpacked {len(manifest['wheels'])} wheels into {args.site} (sha256 {manifest['sha256'][:16]}... checked)",
          file=sys.stderr)


if __name__ == "__main__":
    main()
