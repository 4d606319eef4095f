"""Benchmark: tiles/s of every runner and precision available here, both families, one run; and
the masks' agreement of each with fp32 torch.

What is measured
    **Speed.** For each family — ``cpnet``: a cyto3-size Cellpose 3 U-Net (``CPnet()``, nbase
    2,32,64,128,256, 224² tiles, 31 GFLOP/tile); ``cpsam``: a Cellpose-SAM-family ViT (``--cpsam
    small``: embed 256, depth 6, 256² tiles, patch 8; ``--cpsam vitl``: the released ViT-L size,
    727 GFLOP/tile — for GPUs) — with seeded random weights (speed does not depend on them), the
    same batch of ``--batch`` tiles goes through every runner this machine can build: torch at
    fp32/fp16/bf16 (precision cast into the graph, ``runtime.graphs``), onnxruntime at fp32 and
    fp16 on the CPU provider, and with a GPU the CUDA provider (I/O binding on torch memory) and,
    where TensorRT is installed, native TensorRT engines. Each runner is warmed up, then the
    median wall time of ``--repeats`` calls gives tiles/s (inputs and outputs stay on the runner's
    device, synchronised before the clock stops). ``max|Δ|`` is the largest output difference to
    torch fp32 on those tiles.

    **Masks.** Small *trained* networks of each family (the trained CPnet fixture
    ``tests/fixtures/cellpose3/tiny_cyto.pth``; a small Cellpose-SAM ViT trained here on
    generated cells for ``--cpsam-train`` steps) segment a real image (``../shared/data``, series 0
    of each file, channel 0; skipped when absent) and a generated one through each runner; the
    table gives AP@0.5 of each runner's masks against torch fp32's masks (1.0 = the same objects).

Output
    Both tables; last line ``ratio=<onnxruntime tiles/s ÷ torch tiles/s>`` for the cyto3-size
    CPnet at fp32 on the CPU (the goal is ≥ 1.5; ``nan`` with ``--device cuda``, whose rows are
    torch and onnxruntime on the GPU, and TensorRT).

Run (repository root)::

    python benchmarks/runtime_speed.py                       # 2 CPU threads, batch 8 (~3 min)
    python benchmarks/runtime_speed.py --cpsam vitl --batch 32   # on a GPU machine
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from selfadapt_deploy.export.onnx_export import export_onnx
from selfadapt_deploy.io.readers import read_images, select_channels
from selfadapt_deploy.metrics import average_precision
from selfadapt_deploy.models import CPnet, build_cpsam, load_model
from selfadapt_deploy.runtime import MODEL_GRAPH, OrtRunner, Runner, TorchRunner
from selfadapt_deploy.segment import segment_image
from selfadapt_deploy.synthetic import SOURCE, random_labels, render

ROOT = Path(__file__).resolve().parents[1]
TRAINED_CPNET = ROOT / "tests" / "fixtures" / "cellpose3" / "tiny_cyto.pth"
DATA = ROOT.parent / "shared" / "data" / "bbbc047"
CPSAM_SIZES = {"small": dict(embed_dim=256, depth=6, num_heads=8, out_chans=128, bsize=256),
               "vitl": None}


def speed_networks(cpsam: str) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    nets = {"cpnet-cyto3": CPnet().eval()}
    if CPSAM_SIZES[cpsam] is None:
        from selfadapt_deploy.models.cpsam import CellposeSAM, _cpsam_class

        nets["cpsam-vitl"] = CellposeSAM(_cpsam_class()(dtype=torch.float32)).eval()
    else:
        nets[f"cpsam-{cpsam}"] = build_cpsam(**CPSAM_SIZES[cpsam]).eval()
    return nets


def runners(net, device: torch.device) -> list[tuple[str, str, Runner]]:
    """(runner, precision, inactive runner) for everything this machine can run."""
    out = [("torch", p, TorchRunner(net, device, p)) for p in ("fp32", "fp16", "bf16")]
    spec = net.spec
    for precision in ("fp32", "fp16"):
        graph = export_onnx(net, MODEL_GRAPH, precision).SerializeToString()
        if device.type == "cpu":
            out.append(("onnxruntime cpu", precision, OrtRunner(graph, spec)))
        else:
            out.append(("onnxruntime cuda", precision, OrtRunner(graph, spec, device=device)))
    if device.type == "cuda":
        out += tensorrt_runners(net, device)
    return out


def tensorrt_runners(net, device: torch.device) -> list[tuple[str, str, Runner]]:
    try:
        from selfadapt_deploy.export.tensorrt import build_engine, needs_fp32_graph
        from selfadapt_deploy.runtime.trt_runner import TrtRunner, import_tensorrt

        import_tensorrt()
    except Exception as exc:  # the trt extra is optional: say why the rows are missing
        print(f"(no TensorRT rows: {str(exc).splitlines()[0]})")
        return []
    import tempfile

    out = []
    for precision in ("fp32", "fp16", "bf16"):
        graph = export_onnx(net, MODEL_GRAPH, "fp32" if needs_fp32_graph(precision) else precision)
        folder = Path(tempfile.mkdtemp())
        build = build_engine(graph.SerializeToString(), MODEL_GRAPH, net.spec, net.nchan,
                             precision, 32, folder / "timing.cache", device)
        (folder / "model.plan").write_bytes(build.plan)
        out.append(("tensorrt", precision, TrtRunner(folder / "model.plan", net.spec,
                                                     device=device, record=build.record)))
    return out


def tiles_per_second(runner: Runner, x: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    x = x.to(runner.device)

    def once() -> torch.Tensor:
        y = runner.infer(x)
        if y.device.type == "cuda":
            torch.cuda.synchronize(y.device)
        return y

    y = once()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return x.shape[0] / statistics.median(times), y.float().cpu()


def speed_table(args, device: torch.device) -> float:
    print(f"\nspeed: batch {args.batch}, device {device}, {torch.get_num_threads()} CPU threads; "
          f"median of {args.repeats}")
    print(f"{'network':<14}{'tile':>5}  {'runner':<18}{'precision':<10}{'tiles/s':>9}"
          f"{'vs torch fp32':>15}{'max|Δ| vs fp32':>16}")
    ratio = float("nan")
    for name, net in speed_networks(args.cpsam).items():
        x = torch.rand(args.batch, net.nchan, net.tile_size, net.tile_size)
        base = reference = None
        for runner_name, precision, runner in runners(net, device):
            try:
                with runner:
                    speed, y = tiles_per_second(runner, x, args.repeats)
            except Exception as exc:  # a provider without kernels for this precision, say
                print(f"{name:<14}{net.tile_size:>5}  {runner_name:<18}{precision:<10}"
                      f"  not runnable here: {str(exc).splitlines()[0][:70]}")
                continue
            if base is None:
                base, reference = speed, y
            diff = float((y - reference).abs().max())
            print(f"{name:<14}{net.tile_size:>5}  {runner_name:<18}{precision:<10}{speed:>9.2f}"
                  f"{speed / base:>15.2f}{diff:>16.2e}")
            if name == "cpnet-cyto3" and runner_name == "onnxruntime cpu" and precision == "fp32":
                ratio = speed / base
    return ratio


def agreement_networks(cpsam_steps: int) -> dict[str, torch.nn.Module]:
    from selfadapt_deploy.trainer.demo import DIAMETER
    from selfadapt_deploy.trainer.source import SourceConfig, train_source

    nets = {}
    if TRAINED_CPNET.is_file():
        nets["cpnet (tiny_cyto)"] = load_model(TRAINED_CPNET)
    sam = build_cpsam(embed_dim=64, depth=4, num_heads=4, bsize=64)
    sam.net.diam_mean.data[:] = DIAMETER
    pairs = SOURCE.sample(8, (192, 192), seed=0)
    train_source(sam, [im for im, _ in pairs], [lab for _, lab in pairs],
                 SourceConfig(iterations=cpsam_steps, tile=64, batch_size=16, lr=2e-3))
    nets["cpsam (small, trained here)"] = sam.eval()
    return nets


def agreement_images(net) -> dict[str, np.ndarray]:
    """A generated image and real ones, with the network's channels."""
    radius = (0.35 * net.default_diameter, 0.55 * net.default_diameter)
    labels = random_labels((384, 384), int(384**2 / (3 * net.default_diameter**2)), radius, seed=11)
    images = {"generated": render(labels, seed=11)[None]}
    for path in sorted(DATA.glob("*.ome.tif")):
        image = read_images(path, series=0)[0]
        images[image.name] = image.data
    pad = net.pads_missing_channels
    return {k: select_channels(v, [0], net.nchan, k, pad) for k, v in images.items()}


def agreement_table(args, device: torch.device) -> None:
    print("\nmasks: AP@0.5 against torch fp32's masks (trained small networks)")
    for name, net in agreement_networks(args.cpsam_train).items():
        images = agreement_images(net)
        reference = None
        print(f"{name}: images {', '.join(images)}")
        for runner_name, precision, runner in runners(net, device):
            try:
                with runner:
                    masks = [segment_image(runner, img, device=device).masks for img in images.values()]
            except Exception as exc:
                why = str(exc).splitlines()[0][:70]
                print(f"  {runner_name:<18}{precision:<10} not runnable here: {why}")
                continue
            if reference is None:
                reference = masks
            aps = [average_precision(r, m).ap[0] for r, m in zip(reference, masks, strict=True)]
            counts = "/".join(str(int(m.max())) for m in masks)
            print(f"  {runner_name:<18}{precision:<10} AP@0.5 {' '.join(f'{a:.4f}' for a in aps)}"
                  f"   masks {counts}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cpsam", choices=sorted(CPSAM_SIZES), default="small")
    parser.add_argument("--cpsam-train", type=int, default=400, help="training steps of the small "
                        "Cellpose-SAM used for the masks' agreement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ratio = speed_table(args, device)
    agreement_table(args, device)
    print(f"ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
