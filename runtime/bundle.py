"""A bundle on disk: ``manifest.json``, ``SHA256SUMS`` and the graph files the manifest names, checked on load.

A bundle is untrusted input (docs/DESIGN.md, "Trust boundary"): every file is read once, inside the bundle
(:mod:`vpsde.runtime.confine`), checked against ``SHA256SUMS`` and the manifest's sha256, and the checked bytes,
never the path, are what ONNX Runtime and TensorRT receive.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from vpsde.runtime.confine import inside, read_regular
from vpsde.runtime.digest import SUMS_LIMIT, SUMS_NAME, check_digest_text, format_sums, parse_sums, sha256_hex
from vpsde.runtime.errors import BundleError, first_line
from vpsde.runtime.manifest import MANIFEST_LIMIT, MANIFEST_NAME, GraphSpec, Manifest

GRAPH_LIMIT = 2 << 30  # bytes: protobuf's limit for one ONNX file without external data


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_sums(root: Path, names: list[str] | None = None) -> str:
    """Write ``root/SHA256SUMS`` (atomically) for ``names``, by default the manifest and the graph files it
    names; return the bundle digest. Used by export, and by tools that produce bundles."""
    from vpsde.runtime.manifest import atomic_write_text

    if names is None:
        manifest = Manifest.read(root / MANIFEST_NAME)
        names = [MANIFEST_NAME, *sorted({g.file for g in manifest.graphs.values()})]
    data = format_sums({name: sha256_file(root / name) for name in names})
    atomic_write_text(root / SUMS_NAME, data.decode("ascii"))
    return sha256_hex(data)


@dataclass(frozen=True)
class Bundle:
    """A validated bundle: ``root`` directory, its :class:`Manifest` and its ``digest`` (sha256 of SHA256SUMS,
    64 hex digits)."""

    root: Path
    manifest: Manifest
    digest: str
    checked: Mapping[str, bytes] = field(default_factory=dict, repr=False, compare=False)
    """The manifest's and SHA256SUMS's bytes as they were checked (by file name)."""

    @classmethod
    def load(cls, path: str | os.PathLike, expect_digest: str | None = None) -> "Bundle":
        """Read and check a bundle directory: SHA256SUMS (and the digest against ``expect_digest`` when given),
        the manifest's bytes against it, manifest fields, each graph file (inside the bundle, a regular file, its
        sha256, no external data) and graph IO shapes consistent with ``model.sample_shape``."""
        root = Path(path)
        if not root.is_dir():
            raise BundleError(f"{root}: not a directory; a bundle is a directory holding {MANIFEST_NAME}")
        source = root / MANIFEST_NAME
        if not os.path.lexists(source):
            raise BundleError(f"{source}: no manifest here; a bundle is a directory with {MANIFEST_NAME}")
        manifest_bytes = read_regular(inside(root, MANIFEST_NAME, str(source)), MANIFEST_LIMIT, "the manifest")
        sums_path = root / SUMS_NAME
        if not os.path.lexists(sums_path):
            raise BundleError(f"{sums_path}: missing; a bundle lists the sha256 of its manifest and graphs in "
                              f"{SUMS_NAME} (vpsde 0.2 and later): re-export it with `vpsde export`")
        sums_bytes = read_regular(inside(root, SUMS_NAME, str(sums_path)), SUMS_LIMIT, SUMS_NAME)
        digest = sha256_hex(sums_bytes)
        if expect_digest is not None and digest != check_digest_text(expect_digest, "expected digest"):
            raise BundleError(f"{root}: bundle digest is {digest}, but {expect_digest.strip().lower()} was expected "
                              "(--expect-digest): this is not the bundle you pinned")
        sums = parse_sums(sums_bytes, sums_path)
        if sums.get(MANIFEST_NAME) != sha256_hex(manifest_bytes):
            raise BundleError(f"{source}: does not match its sha256 in {SUMS_NAME}; the manifest was edited after "
                              "export (or SHA256SUMS was): re-export the bundle")
        manifest = Manifest.parse(manifest_bytes, str(source))
        files = {MANIFEST_NAME, *(g.file for g in manifest.graphs.values())}
        if set(sums) != files:
            extra, missing = sorted(set(sums) - files), sorted(files - set(sums))
            raise BundleError(f"{sums_path}: lists {extra or 'no other files'} beyond the manifest's files and misses "
                              f"{missing or 'none'}; it must list exactly manifest.json and the graph files")
        bundle = cls(root, manifest, digest, {MANIFEST_NAME: manifest_bytes, SUMS_NAME: sums_bytes})
        for key, graph in manifest.graphs.items():
            if sums[graph.file] != graph.sha256:
                raise BundleError(f"{sums_path}: the sha256 of {graph.file} differs from 'graphs.{key}.sha256' in "
                                  f"{source}; re-export the bundle")
            check_self_contained(bundle.graph_bytes(key), root / graph.file, key)
            bundle._check_graph_shapes(key, graph)
        return bundle

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    def graph_path(self, key: str) -> Path:
        """Where graph ``key`` lies (for messages; loaders use :meth:`graph_bytes`)."""
        return self.root / self.manifest.graphs[key].file

    def graph_bytes(self, key: str) -> bytes:
        """The bytes of graph ``key``, read once from inside the bundle and checked against the manifest's sha256:
        hand these to ONNX Runtime or TensorRT, never the path (no check-then-reopen window)."""
        spec = self.manifest.graphs[key]
        where = f"'graphs.{key}.file' in {self.manifest_path}"
        data = read_regular(inside(self.root, spec.file, where), GRAPH_LIMIT, f"graph file named by {where}")
        if sha256_hex(data) != spec.sha256:
            raise BundleError(f"{self.graph_path(key)}: sha256 does not match 'graphs.{key}.sha256' in "
                              f"{self.manifest_path}; the file was modified or the manifest edited: re-export the bundle")
        return data

    def files(self) -> dict[str, bytes]:
        """Every file a host reads, by its name in the bundle, as checked bytes: what a copy of the bundle holds
        (a Ray worker's payload, a Triton repository's copy). Nothing is re-read by path unchecked."""
        return {**self.checked, **{g.file: self.graph_bytes(key) for key, g in self.manifest.graphs.items()}}

    def _check_graph_shapes(self, key: str, graph: GraphSpec) -> None:
        source = self.manifest_path
        sample = list(self.manifest.model.sample_shape)
        for i, spec in enumerate(graph.inputs):
            # schedule scalars are [batch]; every other input (x, noise, state, conditioning) is [batch, *sample]
            expected = [] if self.manifest.input_role(spec.name) == "schedule" else sample
            if len(spec.shape) != len(expected) + 1 or list(spec.shape[1:]) != expected:
                raise BundleError(f"{source}: field 'graphs.{key}.inputs[{i}].shape': expected [batch, "
                                  f"{', '.join(map(str, expected))}] for input {spec.name!r} (model.sample_shape is "
                                  f"{sample}), got {spec.shape}")


def check_self_contained(data: bytes, path: Path, key: str) -> None:
    """Refuse an ONNX graph that keeps any tensor outside itself (external data): such a tensor names a file that
    ONNX Runtime or TensorRT would read by path, outside every check. vpsde export never writes external data."""
    import onnx

    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:  # protobuf's DecodeError and friends
        raise BundleError(f"{path}: graph {key!r} is not an ONNX model ({type(e).__name__}: "
                          f"{first_line(e, 'unparsable')})") from None
    for name, tensor in _tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            location = {e.key: e.value for e in tensor.external_data}.get("location", "?")
            raise BundleError(f"{path}: graph {key!r} keeps tensor {name!r} as external data (location {location!r}); "
                              "a bundle's graphs must be self-contained: re-export the bundle")


def _tensors(model):
    """Every TensorProto of an ONNX model: initializers, sparse tensors and node attributes, in every subgraph
    and function."""
    def graph_tensors(graph):
        for t in graph.initializer:
            yield t.name, t
        for s in graph.sparse_initializer:
            yield s.values.name, s.values
            yield s.indices.name, s.indices
        yield from node_tensors(graph.node)

    def node_tensors(nodes):
        for node in nodes:
            for attr in node.attribute:
                where = f"{node.name or node.op_type}.{attr.name}"
                if attr.HasField("t"):
                    yield where, attr.t
                for t in attr.tensors:
                    yield where, t
                if attr.HasField("sparse_tensor"):
                    yield where, attr.sparse_tensor.values
                for s in attr.sparse_tensors:
                    yield where, s.values
                if attr.HasField("g"):
                    yield from graph_tensors(attr.g)
                for g in attr.graphs:
                    yield from graph_tensors(g)

    yield from graph_tensors(model.graph)
    for function in model.functions:
        yield from node_tensors(function.node)

