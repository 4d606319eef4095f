"""Torch graph (``runtime.graphs``) → ONNX, then optimum-style validation against torch.

The exporter is torch's dynamo exporter (``torch.export``), without its graph optimiser, so every
weight stays an initializer named as in the graph module's ``state_dict`` (weight sync and
TensorRT refit address weights by those names). Axes: batch is dynamic; CPnet's height and width
are dynamic multiples of 16 (equal for the square teacher graph); Cellpose-SAM's tile is fixed.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from selfadapt_deploy.errors import SaDeployError
from selfadapt_deploy.manifest import ONNX_METADATA_KEY
from selfadapt_deploy.models.base import ModelSpec, SegmentationNet
from selfadapt_deploy.runtime.base import GraphIO
from selfadapt_deploy.runtime.graphs import check_precision, graph_module

DEFAULT_OPSET = 18
BF16_OPSET = 22  # the first opset whose Conv (and most ops) accept bfloat16
#: validation tolerance per precision, relative to the output's largest magnitude (at least 1):
#: fp32 on the CPU 1e-4 — flows differ by ≤ 5e-6, but cell-probability logits of real Cellpose 3
#: nets reach 50-90 and differ there by 7.6e-5 (cyto0) and 1.4e-4 (an H&E adaptation), a few
#: float32 ulps at that magnitude; fp16 keeps ~3 decimal digits, bf16 ~2; GPUs' fp32 kernels sum
#: in other orders (TF32 is switched off in our runners)
ATOL = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
GPU_FP32_RTOL = 1e-3


def tolerance(precision: str, device: torch.device) -> float:
    """The largest |Δ| an exported graph may show against torch, as a fraction of the reference
    output's largest magnitude (at least 1)."""
    if precision == "fp32":
        return ATOL["fp32"] if device.type == "cpu" else GPU_FP32_RTOL
    return ATOL[precision]


class ExportValidationError(SaDeployError):
    """An exported graph disagrees with its torch reference (names, shapes or values)."""


def opset_for(precision: str, opset: int | None) -> int:
    check_precision(precision)
    if precision == "bf16":
        if opset is not None and opset < BF16_OPSET:
            raise SaDeployError(f"--precision bf16 needs --opset {BF16_OPSET} or later (bfloat16 "
                                f"Conv); got {opset}")
        return opset or BF16_OPSET
    return opset or DEFAULT_OPSET


def export_onnx(net: SegmentationNet, graph: GraphIO, precision: str = "fp32", opset: int | None = None,
                metadata: dict | None = None) -> onnx.ModelProto:
    """The ONNX model of ``graph`` computed by ``net`` (on the CPU) at ``precision``: float32 input
    and outputs, reduced precision inside; bf16 ops that ONNX does not define run as float32."""
    net = _cpu_eval(net)
    module = graph_module(net, graph, precision)
    opset = opset_for(precision, opset)
    example = torch.zeros(2, net.nchan, net.tile_size, net.tile_size)
    batch = torch.export.Dim("batch", min=1)
    axes = {0: batch}
    if not net.fixed_tile:
        side = 16 * torch.export.Dim("side16", min=1)
        axes.update({2: side, 3: side} if graph.square else
                    {2: 16 * torch.export.Dim("height16", min=1),
                     3: 16 * torch.export.Dim("width16", min=1)})
    # the exporter narrates to stdout and warns about its internals: keep the user's console clean
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(module, (example,), input_names=[graph.input],
                                        output_names=graph.output_names, opset_version=opset,
                                        dynamic_shapes={"tiles": axes}, dynamo=True, optimize=False,
                                        verbose=False)
        except Exception as exc:  # torch.export raises many types; each means "cannot export"
            raise SaDeployError(f"exporting the {graph.name} graph of this {net.family} network "
                                f"failed: {type(exc).__name__}: {str(exc)[:500]}") from exc
    model = program.model_proto
    _name_axes(model, graph)
    if precision == "bf16":
        model = fp32_islands(model)
    _strip_trace_metadata(model)
    model.producer_name = "sa-deploy"
    if metadata is not None:
        onnx.helper.set_model_props(model, {ONNX_METADATA_KEY: json.dumps(metadata)})
    onnx.checker.check_model(model, full_check=True)
    return model


def _cpu_eval(net: SegmentationNet) -> SegmentationNet:
    """``net`` when it is on the CPU in eval mode, else such a copy: the caller's network keeps
    its device and mode (a training student, an EMA teacher on the GPU)."""
    if net.device.type == "cpu" and not net.training:
        return net
    return copy.deepcopy(net).cpu().eval()


def _name_axes(model: onnx.ModelProto, graph: GraphIO) -> None:
    """Readable names for the dynamic axes (batch, height, width) on inputs and outputs."""
    names = {1: None, 0: "batch", 2: "height" if not graph.square else "size",
             3: "width" if not graph.square else "size"}
    for value in [*model.graph.input, *model.graph.output]:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_param") and names.get(axis):
                dim.dim_param = names[axis]


def _strip_trace_metadata(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node provenance (source paths, stack traces): half the file's size
    for a small network, and nothing a runtime reads."""
    for item in [*model.graph.node, *model.graph.value_info, *model.graph.input, *model.graph.output,
                 *model.graph.initializer]:
        del item.metadata_props[:]
        item.doc_string = ""
    del model.metadata_props[:]


def structure_sha256(onnx_bytes: bytes) -> str:
    """sha256 of a graph without its weights' values: two exports with the same structure_sha256
    differ only in weights, so an engine of one can be refit with the other's."""
    model = onnx.load_from_string(onnx_bytes)
    for init in model.graph.initializer:
        init.ClearField("raw_data")
        for name in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            init.ClearField(name)
    del model.metadata_props[:]
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


# ---- bf16: float32 islands for ops ONNX does not define in bfloat16 ---------------------------------
def fp32_islands(model: onnx.ModelProto) -> onnx.ModelProto:
    """Wrap every node whose schema refuses bfloat16 for a bf16 input (e.g. Einsum in the
    Cellpose-SAM attention) in Casts to float32 and back, so the graph is valid ONNX and the
    op runs in float32 — what ModelOpt AutoCast does for such nodes."""
    bf16, fp32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    types = {v.name: v.type.tensor_type.elem_type for v in
             [*model.graph.input, *model.graph.value_info, *model.graph.output]}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    nodes = []
    for node in model.graph.node:
        refused = _refuses_bf16(node, opset, types)
        if not refused:
            nodes.append(node)
            continue
        for i, name in enumerate(node.input):
            if i in refused:
                cast = f"{name}__fp32_for_{node.name or node.op_type}"
                nodes.append(onnx.helper.make_node("Cast", [name], [cast], to=fp32))
                node.input[i] = cast
        outputs = list(node.output)
        for j, name in enumerate(outputs):
            if types.get(name) == bf16:
                node.output[j] = f"{name}__fp32"
        nodes.append(node)
        for name in outputs:
            if types.get(name) == bf16:
                nodes.append(onnx.helper.make_node("Cast", [f"{name}__fp32"], [name], to=bf16))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _refuses_bf16(node: onnx.NodeProto, opset: int, types: dict[str, int]) -> set[int]:
    """Indices of bf16 inputs that ``node``'s schema does not accept in bfloat16."""
    if node.domain not in ("", "ai.onnx"):
        return set()
    schema = onnx.defs.get_schema(node.op_type, opset)
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    refused = set()
    for i, name in enumerate(node.input):
        if not name or types.get(name) != onnx.TensorProto.BFLOAT16:
            continue
        formal = schema.inputs[min(i, len(schema.inputs) - 1)]
        if "tensor(bfloat16)" not in allowed.get(formal.type_str, {formal.type_str}):
            refused.add(i)
    return refused


# ---- validation (optimum's order: names, shapes, values; every failure listed) ----------------------
@dataclass(frozen=True)
class Validation:
    status: str  # passed | skipped
    provider: str = ""
    atol: float = 0.0  # the tolerance, relative to the reference output's largest magnitude (≥ 1)
    max_abs_diff: dict | None = None  # per output, against torch at the graph's precision
    max_abs_diff_fp32: dict | None = None  # per output, against torch at fp32 (information)
    reason: str = ""

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, "")}

    def describe(self) -> str:
        if self.status != "passed":
            return f"written, NOT validated: {self.reason}"
        worst = max(self.max_abs_diff.values())
        return f"validated with {self.provider}: max |Δ| vs torch {worst:.2e} (tolerance {self.atol:g})"


def compare_outputs(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float,
                    relative: bool) -> tuple[dict[str, float], list[str]]:
    """Max |Δ| per output and the list of failures (missing names, shapes, values > tolerance)."""
    problems, diffs = [], {}
    if set(got) != set(want):
        problems.append(f"outputs {sorted(got)} ≠ expected {sorted(want)}")
    for name in sorted(set(got) & set(want)):
        a, b = got[name].float().cpu(), want[name].float().cpu()
        if a.shape != b.shape:
            problems.append(f"{name}: shape {tuple(a.shape)} ≠ {tuple(b.shape)}")
            continue
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        diffs[name] = diff
        bound = atol * max(1.0, float(b.abs().max())) if relative else atol
        if not diff <= bound:  # also catches NaN
            problems.append(f"{name}: max |Δ| {diff:.3g} > {bound:.3g}")
    return diffs, problems


def validate_runner(runner, net: SegmentationNet, graph: GraphIO, precision: str,
                    tiles: list[torch.Tensor], where: str) -> Validation:
    """Run ``runner`` (an active runner of the exported artefact) and torch on each batch of
    ``tiles``; raise :class:`ExportValidationError` listing every disagreement."""
    net = _cpu_eval(net)
    reference = graph_module(net, graph, precision)
    fp32 = graph_module(net, graph, "fp32") if precision != "fp32" else reference
    rtol = tolerance(precision, runner.device)
    diffs: dict[str, float] = {}
    diffs_fp32: dict[str, float] = {}
    problems: list[str] = []
    for x in tiles:
        got = runner.run(x)
        with torch.inference_mode():
            want = dict(zip(graph.output_names, reference(x), strict=True))
            want32 = dict(zip(graph.output_names, fp32(x), strict=True)) if fp32 is not reference \
                else want
        d, p = compare_outputs(got, want, rtol, relative=True)
        problems += [f"batch {tuple(x.shape)}: {m}" for m in p]
        d32, _ = compare_outputs(got, want32, 0.0, relative=False)
        for name in d:
            diffs[name] = max(diffs.get(name, 0.0), d[name])
            diffs_fp32[name] = max(diffs_fp32.get(name, 0.0), d32[name])
    if problems:
        raise ExportValidationError(f"{where} disagrees with torch ({precision}); not written:\n  "
                                    + "\n  ".join(problems))
    return Validation("passed", runner.name, rtol, diffs,
                      diffs_fp32 if precision != "fp32" else None)


def validation_batches(spec: ModelSpec, graph: GraphIO, channels: int,
                       images: list[np.ndarray]) -> list[torch.Tensor]:
    """Tiles to validate on: normalised crops of ``images`` (C×Y×X, network channels, at the
    network's scale) — a batch of 3 at the tile size for the model graph, of 1 for the teacher
    graph (8 views each) — and, for CPnet, a batch of 1 at another size (dynamic axes)."""
    t = spec.tile_size
    crops = []
    for k in range(1 if graph.square else 3):
        img = images[k % len(images)]
        y0 = (img.shape[1] - t) * k // 2 if img.shape[1] > t else 0
        x0 = (img.shape[2] - t) * (2 - k) // 2 if img.shape[2] > t else 0
        crop = np.zeros((channels, t, t), np.float32)
        part = img[:channels, y0 : y0 + t, x0 : x0 + t]
        crop[: part.shape[0], : part.shape[1], : part.shape[2]] = part
        crops.append(crop)
    batches = [torch.from_numpy(np.stack(crops))]
    if not spec.fixed_tile:
        small = t // 2 // 16 * 16
        other = (small, small) if graph.square else (small, small + 16)
        batches.append(batches[0][:1, :, : other[0], : other[1]].contiguous())
    return batches
