"""What an export directory holds: ``manifest.json``, written by ``sa-deploy export`` and read by
the runtimes and by ``--model`` loading. One dataclass per record, one source of truth per field
(``dataclasses.fields``); unknown or missing keys, a newer format, a file whose sha256 differs
from the record: each is one clear error, never a guess.

The manifest's core (everything but the artefact list) is also embedded in every ONNX file's
``metadata_props`` under :data:`ONNX_METADATA_KEY`, so a graph carries its own description.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from selfadapt_deploy.errors import ArtifactError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
ONNX_METADATA_KEY = "sa_deploy.manifest"
REEXPORT = "re-run `sa-deploy export` to rebuild the directory"


@dataclass(frozen=True)
class Artifact:
    """One file of the export: an ONNX graph or a TensorRT engine of one graph."""

    file: str
    graph: str  # "model" | "teacher_tta"
    format: str  # "onnx" | "tensorrt"
    precision: str  # fp32 | fp16 | bf16: the arithmetic inside; inputs and outputs are float32
    sha256: str
    validation: dict  # status passed|skipped, provider, atol, max_abs_diff per output, reason
    engine: dict | None = None  # TensorRT: gpu, compute_capability, tensorrt, refittable, ...
    graph_sha256: str | None = None  # ONNX: the graph without its weights' values (refit identity)


@dataclass(frozen=True)
class Manifest:
    """An export directory's description (``manifest.json``)."""

    family: str  # cpnet | cpsam
    spec: dict  # runtime.base.ModelSpec fields: channels, tile geometry, diam_mean, default diameter
    graph_channels: int  # channels the graphs take (Cellpose-SAM: 3; fewer are zero-padded)
    normalization: dict  # how images are normalised before the network
    opset: int
    precision: str
    max_batch: int  # the TensorRT profile's largest batch (ONNX graphs take any batch)
    source: dict  # model (as given), file (the weights copied beside the graphs), sha256
    versions: dict  # sa_deploy, torch, onnx, onnxruntime, cellpose, tensorrt
    artifacts: tuple[Artifact, ...] = ()
    format_version: int = FORMAT_VERSION

    # ---- (de)serialisation -------------------------------------------------------------------
    def core(self) -> dict:
        """Everything but the artefact list (what each ONNX file embeds)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "artifacts"}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{where}: not valid JSON ({exc}); {REEXPORT}") from None
        version = data.get("format_version") if isinstance(data, dict) else None
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise ArtifactError(f"{where}: written by a newer sa-deploy (format {version}, this "
                                f"one reads {FORMAT_VERSION}); upgrade sa-deploy or {REEXPORT}")
        data = _strict(cls, data, where)
        artifacts = tuple(Artifact(**_strict(Artifact, a, f"{where} artifacts"))
                          for a in data.pop("artifacts", ()))
        return cls(**data, artifacts=artifacts)

    def with_artifact(self, artifact: Artifact) -> Manifest:
        kept = tuple(a for a in self.artifacts if a.file != artifact.file)
        return dataclasses.replace(self, artifacts=(*kept, artifact))

    def artifact(self, graph: str, fmt: str) -> Artifact | None:
        return next((a for a in self.artifacts if a.graph == graph and a.format == fmt), None)


def _strict(cls, data, where: str) -> dict:
    """The keys of ``cls``'s fields exactly (optional ones may be absent), else an error."""
    if not isinstance(data, dict):
        raise ArtifactError(f"{where}: expected a JSON object; {REEXPORT}")
    names = {f.name for f in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    unknown, missing = sorted(set(data) - names), sorted(required - set(data))
    if unknown or missing:
        raise ArtifactError(f"{where}: " + "; ".join(
            part for part in (f"unknown keys {unknown}" if unknown else "",
                              f"missing keys {missing}" if missing else "") if part) + f"; {REEXPORT}")
    return dict(data)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


ARTIFACT_SUFFIX = {"onnx": ".onnx", "tensorrt": ".plan"}  # the file of each artefact format


def artifact_file(graph: str, fmt: str) -> str:
    """The file name of ``graph``'s artefact in format ``fmt`` (``model.onnx``, ``teacher_tta.plan``)."""
    return graph + ARTIFACT_SUFFIX[fmt]


def is_export_dir(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def refuse_unlisted_artifacts(directory: Path) -> None:
    """A directory holding export artefacts but no manifest cannot be checked: an error, never a
    plain weights directory with its graphs ignored."""
    directory = Path(directory)
    if (directory / MANIFEST).is_file():
        return
    found = sorted(p.name for p in directory.iterdir() if p.suffix in ARTIFACT_SUFFIX.values())
    if found:
        raise ArtifactError(f"{directory} holds export artefacts ({', '.join(found)}) but no {MANIFEST}, "
                            f"so nothing in it can be checked; {REEXPORT}")


def read_manifest(directory: Path) -> Manifest:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory}: no {MANIFEST}; it is not an export directory ({REEXPORT})")
    return Manifest.from_json(path.read_text(), str(path))


def open_export_dir(directory: Path) -> Manifest:
    """The manifest, after checking every file it lists — the weights and every artefact — so a
    directory is used whole or not at all, whichever of its files a runtime then reads."""
    manifest = read_manifest(directory)
    verified_file(directory, manifest.source["file"], manifest.source["sha256"])
    for artifact in manifest.artifacts:
        verified_file(directory, artifact.file, artifact.sha256)
    return manifest


_VERIFIED: dict[tuple[str, int, int], str] = {}  # (file, size, mtime_ns) → its sha256, this process


def verified_file(directory: Path, name: str, sha256: str) -> Path:
    """``directory/name`` after checking it is there and unchanged since export (hashed once per
    process while its size and modification time stay the same)."""
    path = Path(directory) / name
    if not path.is_file():
        raise ArtifactError(f"{path}: listed in {MANIFEST} but missing; {REEXPORT}")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    actual = _VERIFIED.get(key) or sha256_file(path)
    if actual != sha256:
        raise ArtifactError(f"{path}: sha256 {actual[:12]}… differs from {sha256[:12]}… recorded in "
                            f"{MANIFEST}; the file was changed or replaced after export — {REEXPORT}")
    _VERIFIED[key] = actual
    return path
