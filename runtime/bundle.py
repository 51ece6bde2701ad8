"""A bundle on disk: ``manifest.json`` plus the graph files it names, checked on load."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from vpsde.runtime.errors import BundleError
from vpsde.runtime.manifest import MANIFEST_NAME, GraphSpec, Manifest

def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A validated bundle: ``root`` directory and its :class:`Manifest`."""

    root: Path
    manifest: Manifest

    @classmethod
    def load(cls, path: str | os.PathLike, verify_sha256: bool = True) -> "Bundle":
        """Read and check a bundle directory: manifest fields, graph files present, sha256 (when
        ``verify_sha256``), and graph IO shapes consistent with ``model.sample_shape``."""
        root = Path(path)
        if not root.is_dir():
            raise BundleError(f"{root}: not a directory; a bundle is a directory holding {MANIFEST_NAME}")
        manifest = Manifest.read(root / MANIFEST_NAME)
        bundle = cls(root, manifest)
        for key, graph in manifest.graphs.items():
            bundle._check_graph(key, graph, verify_sha256)
        return bundle

    def graph_path(self, key: str) -> Path:
        return self.root / self.manifest.graphs[key].file

    def _check_graph(self, key: str, graph: GraphSpec, verify_sha256: bool) -> None:
        source = self.root / MANIFEST_NAME
        path = self.graph_path(key)
        if Path(graph.file).is_absolute() or ".." in Path(graph.file).parts:
            raise BundleError(f"{source}: field 'graphs.{key}.file': expected a path inside the bundle, got {graph.file!r}")
        if not path.is_file():
            raise BundleError(f"{path}: graph file named by 'graphs.{key}.file' in {source} is missing")
        if verify_sha256:
            actual = sha256_file(path)
            if actual != graph.sha256:
                raise BundleError(f"{path}: sha256 is {actual}, but 'graphs.{key}.sha256' in {source} says "
                                  f"{graph.sha256}; the file was modified or the manifest edited — re-export the bundle")
        sample = list(self.manifest.model.sample_shape)
        for i, spec in enumerate(graph.inputs):
            # schedule scalars are [batch]; every other input (x, noise, state, conditioning) is [batch, *sample]
            expected = [] if self.manifest.input_role(spec.name) == "schedule" else sample
            if len(spec.shape) != len(expected) + 1 or list(spec.shape[1:]) != expected:
                raise BundleError(f"{source}: field 'graphs.{key}.inputs[{i}].shape': expected [batch, "
                                  f"{', '.join(map(str, expected))}] for input {spec.name!r} (model.sample_shape is "
                                  f"{sample}), got {spec.shape}")
