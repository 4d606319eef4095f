"""The graph cache: a model exported once to an ONNX graph, reused by every later run.

``--runtime auto`` on the CPU runs a plain weights file, Cellpose name or adaptation run in
onnxruntime (its CPU provider is faster than torch's on the same graph) through an entry here.
An entry is an export directory (``exporter.export_into``: the weights, one validated graph,
``manifest.json``) named by its key: the sha256 of the weights' values, the graph, opset,
precision and the sa-deploy / torch / onnx / onnxruntime versions, so a new version of any of
them makes a new entry and never reuses a stale one. Entries are assembled under a temporary
name and renamed into place: two processes filling the same entry both finish, one rename wins
and the other uses the winner's. An entry that fails its manifest's checks (a damaged or
truncated file) is removed and made again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from selfadapt_deploy.caches import cache_dir
from selfadapt_deploy.errors import ArtifactError, SaDeployError
from selfadapt_deploy.manifest import MANIFEST, open_export_dir
from selfadapt_deploy.models.base import SegmentationNet
from selfadapt_deploy.runtime.base import GraphIO

from .exporter import export_into, tool_versions, validation_images
from .onnx_export import opset_for

KEY_FILE = "key.json"  # what the entry's name is the hash of, for `sa-deploy cache list`
_STAGING = ".staging-"


def weights_sha256(net: SegmentationNet) -> str:
    """The sha256 of the network's weights (names, dtypes, shapes, values), whatever file or
    format they came from."""
    digest = hashlib.sha256()
    for name, tensor in net.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(net: SegmentationNet, graph: GraphIO, precision: str) -> dict:
    versions = tool_versions()
    return {"weights_sha256": weights_sha256(net), "family": net.family, "graph": graph.name,
            "opset": opset_for(precision, None), "precision": precision,
            **{k: versions[k] for k in ("sa_deploy", "torch", "onnx", "onnxruntime")}}


def entry_name(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class GraphEntry:
    key: dict  # what the name is the hash of
    path: Path  # where the entry is, or would be made


def graph_entry(net: SegmentationNet, graph: GraphIO, precision: str = "fp32",
                root: Path | None = None) -> GraphEntry:
    """Where ``net``'s ``graph`` at ``precision`` lives in the cache (hashing the weights once)."""
    key = cache_key(net, graph, precision)
    return GraphEntry(key, (Path(root) if root is not None else cache_dir("graphs")) / entry_name(key))


@dataclass(frozen=True)
class CachedGraph:
    path: Path  # the entry (an export directory)
    made: bool  # exported by this call (False: found in the cache)
    seconds: float  # what making it took (0 when found)


def cached_graph(net: SegmentationNet, model: str, graph: GraphIO, precision: str = "fp32",
                 root: Path | None = None, report: Callable[[str], None] | None = None,
                 where: GraphEntry | None = None) -> CachedGraph:
    """The cache entry holding ``net``'s ``graph`` at ``precision`` (``where`` it is, when the caller
    has it already): found and checked, or exported and validated now (``report`` is told before
    the export starts)."""
    where = where or graph_entry(net, graph, precision, root)
    key, entry = where.key, where.path
    root = entry.parent
    if _usable(entry, report):
        return CachedGraph(entry, False, 0.0)
    if report:
        report(f"first use of these weights: exporting the {graph.name} graph to ONNX once "
               f"(into {entry})")
    tic = time.perf_counter()
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING}{entry.name}.", dir=root))
    except OSError as exc:
        raise SaDeployError(f"{root}: cannot write the graph cache here ({exc.strerror}); set "
                            "SA_DEPLOY_CACHE to a writable folder or use --runtime torch") from exc
    try:
        manifest = export_into(staging, net, model, precision, key["opset"], 8, None, validation_images(net),
                               lambda _: None, None, graphs=(graph,))
        (staging / MANIFEST).write_text(manifest.to_json())
        (staging / KEY_FILE).write_text(json.dumps(key, indent=1))
        os.chmod(staging, 0o755)
        try:
            os.rename(staging, entry)
        except OSError:  # another process made it first (or an unusable one is in the way)
            if not _usable(entry, None):
                _remove(entry)
                os.rename(staging, entry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return CachedGraph(entry, True, time.perf_counter() - tic)


def _usable(entry: Path, report: Callable[[str], None] | None) -> bool:
    """Whether ``entry`` is a complete entry whose files all match its manifest; a damaged one is
    removed (and said)."""
    if not entry.exists():
        return False
    try:
        open_export_dir(entry)
        return True
    except ArtifactError as exc:
        if report:
            report(f"cached graph {entry.name} is damaged ({str(exc)[:160]}); making it again")
        _remove(entry)
        return False


def _remove(entry: Path) -> None:
    """Move ``entry`` aside, then delete it: a reader never sees half an entry."""
    trash = entry.with_name(f"{_STAGING}{entry.name}.removed-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(entry, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


@dataclass(frozen=True)
class Entry:
    name: str
    key: dict  # empty when unreadable
    bytes: int
    modified: float


def list_entries(root: Path | None = None) -> list[Entry]:
    """The cache's entries (leftover staging folders of killed exports included: they are
    ``.staging-*``), newest first."""
    root = Path(root) if root is not None else cache_dir("graphs")
    if not root.is_dir():
        return []
    out = []
    for path in root.iterdir():
        if not path.is_dir():
            continue
        try:
            key = json.loads((path / KEY_FILE).read_text())
        except (OSError, ValueError):
            key = {}
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        out.append(Entry(path.name, key, size, path.stat().st_mtime))
    return sorted(out, key=lambda e: -e.modified)


def clear(root: Path | None = None) -> tuple[int, int]:
    """Remove every entry; (entries removed, bytes freed)."""
    root = Path(root) if root is not None else cache_dir("graphs")
    entries = list_entries(root)
    for e in entries:
        _remove(root / e.name)
    return len(entries), sum(e.bytes for e in entries)
