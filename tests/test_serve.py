"""``sa-deploy serve`` on loopback: a real tritonserver answering like ``sa-deploy segment``, under
concurrency, refusing bad requests while it keeps serving, and stopping cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from typer.testing import CliRunner

from selfadapt_deploy.cli import app
from selfadapt_deploy.errors import SaDeployError, ServeError
from selfadapt_deploy.runner_choice import open_runner
from selfadapt_deploy.serving.client import TritonHTTPClient
from selfadapt_deploy.serving.server import Ports, ServeSettings, TritonServer, find_tritonserver
from selfadapt_deploy.synthetic import random_labels, render

MAX_PIXELS = 160 * 160


def tritonserver_or_skip() -> None:
    try:
        find_tritonserver()
    except ServeError as exc:
        pytest.skip(str(exc))


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def cells(seed: int, shape=(80, 72)) -> np.ndarray:
    return (render(random_labels(shape, 8, seed=seed), seed=seed) * 1000).astype(np.uint16)


@pytest.fixture(scope="module")
def server(trained_cpnet_path):
    tritonserver_or_skip()
    settings = ServeSettings(str(trained_cpnet_path), device="cpu", max_batch=4,
                             max_image_pixels=MAX_PIXELS)
    runner, _ = open_runner(trained_cpnet_path, "auto", "cpu")
    with TritonServer(settings, runner.spec, Ports("127.0.0.1", *free_ports(3))) as running:
        yield running


def segment_cli(tmp_path, weights, images: list[np.ndarray], *args: str) -> list[np.ndarray]:
    tmp_path.mkdir(exist_ok=True)
    paths = []
    for k, img in enumerate(images):
        paths.append(str(tmp_path / f"img{k}.tif"))
        tifffile.imwrite(paths[-1], img)
    result = CliRunner().invoke(app, ["segment", *paths, "--model", str(weights), "--device", "cpu",
                                      "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 0, result.output
    return [tifffile.imread(tmp_path / "out" / f"img{k}_masks.tif") for k in range(len(images))]


def test_served_labels_equal_segment_and_survive_concurrency(server, tmp_path, trained_cpnet_path):
    images = [cells(k) for k in range(4)]
    expected = segment_cli(tmp_path, trained_cpnet_path, images, "--flow-threshold", "0.6")
    assert all(e.max() > 2 for e in expected), "a trained model finds cells here"

    def client_run(worker: int) -> int:
        client = TritonHTTPClient(server.url)
        done = 0
        for i in range(20):
            k = (worker + i) % len(images)
            image = images[k][..., None] if i % 2 else images[k].astype(np.float32)[..., None]
            name = "image_uint16" if i % 2 else "image"
            labels = client.infer("segment", {name: image, "flow_threshold": np.array([0.6], np.float32)},
                                  ["labels"])["labels"]
            np.testing.assert_array_equal(labels, expected[k])
            done += 1
        client.close()
        return done

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(client_run, range(8))) == 160
    metrics = urllib.request.urlopen(server.url.replace(str(server.ports.http), str(server.ports.metrics))
                                     + "/metrics").read().decode()
    served = re.search(r'nv_inference_request_success\{model="segment",version="1"\} (\d+)', metrics)
    assert served and int(served.group(1)) >= 160


def test_network_model_is_the_graph_and_batches(server, trained_cpnet_path):
    runner, _ = open_runner(trained_cpnet_path, "torch", "cpu")
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(n, 2, 64, 48)).astype(np.float32) for n in (1, 2, 3, 1)]
    with runner:
        expected = [runner.infer(torch.from_numpy(b)).numpy() for b in batches]

    def call(k: int) -> np.ndarray:
        client = TritonHTTPClient(server.url)
        try:
            return client.infer("network", {"tiles": batches[k]}, ["flows_cellprob"])["flows_cellprob"]
        finally:
            client.close()

    with ThreadPoolExecutor(4) as pool:  # concurrent requests: Triton may batch them together
        for got, want in zip(pool.map(call, range(4)), expected, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("inputs, message", [
    ({"image": np.zeros((64, 64, 1), np.int32)}, "data-type"),  # Triton's own check
    ({"image": np.zeros((64, 64), np.float32)}, "shape"),
    ({"image": np.full((64, 64, 1), np.nan, np.float32)}, "NaN"),
    ({"image_uint8": np.zeros((200, 200, 1), np.uint8)}, "--max-image-pixels"),
    ({"image": np.zeros((64, 64, 1), np.float32), "image_uint8": np.zeros((64, 64, 1), np.uint8)},
     "exactly one"),
    ({"image": np.zeros((64, 64, 3), np.float32)}, "--channels"),
    ({"image_uint16": np.zeros((64, 64, 1), np.uint16), "diameter": np.array([np.inf], np.float32)},
     "NaN or infinite"),
])
def test_bad_requests_get_an_error_and_the_server_keeps_serving(server, inputs, message):
    client = TritonHTTPClient(server.url)
    with pytest.raises(ServeError, match=message):
        client.infer("segment", inputs, ["labels"])
    assert client.ready("segment")
    labels = client.infer("segment", {"image_uint16": cells(9)[..., None]}, ["labels"])["labels"]
    assert labels.shape == (80, 72) and labels.max() > 0
    client.close()


def test_serve_cli_stops_cleanly_on_sigterm(trained_cpnet_path):
    tritonserver_or_skip()
    http, grpc, metrics = free_ports(3)
    proc = subprocess.Popen([sys.executable, "-m", "selfadapt_deploy", "serve", str(trained_cpnet_path),
                             "--host", "127.0.0.1", "--http-port", str(http), "--grpc-port", str(grpc),
                             "--metrics-port", str(metrics), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client, deadline = TritonHTTPClient(f"http://127.0.0.1:{http}"), time.monotonic() + 300
    while not client.ready():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    assert "serving segment and network" in out and "stopped" in out
    assert not client.ready()
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout
    assert children == ""


def test_serve_refuses_a_bad_model_before_starting(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(os.urandom(64))
    result = CliRunner().invoke(app, ["serve", str(bad), "--device", "cpu"])
    assert result.exit_code == 1
    assert "not a readable PyTorch" in result.output and len(result.output.strip().splitlines()) == 1


def test_a_missing_tritonserver_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(SaDeployError, match="nvidia-pytriton"):
        find_tritonserver()


def test_segment_with_the_network_on_the_server_equals_local_segment(server, tmp_path,
                                                                      trained_cpnet_path):
    images = [cells(20, (150, 130)), cells(21, (300, 260))]  # the second spans several tiles
    local = segment_cli(tmp_path / "local", trained_cpnet_path, images)
    paths = [str(tmp_path / "local" / f"img{k}.tif") for k in range(len(images))]
    result = CliRunner().invoke(app, ["segment", *paths, "--triton", server.url,
                                      "--out", str(tmp_path / "remote"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "Triton server" in result.output
    for k, want in enumerate(local):
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "remote" / f"img{k}_masks.tif"), want)


def test_segment_triton_without_a_server_is_one_error(tmp_path):
    image = tmp_path / "a.tif"
    tifffile.imwrite(image, cells(0))
    (port,) = free_ports(1)
    result = CliRunner().invoke(app, ["segment", str(image), "--triton", f"http://127.0.0.1:{port}",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "no server answers" in result.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_plain_json_requests_work_as_with_curl(server):
    image = cells(5).astype(np.float32)
    body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [*image.shape, 1],
                        "data": image.ravel().tolist()}]}
    request = urllib.request.Request(f"{server.url}/v2/models/segment/infer",
                                     data=json.dumps(body).encode(), method="POST")
    answer = json.loads(urllib.request.urlopen(request).read())
    (labels,) = answer["outputs"]
    assert labels["name"] == "labels" and labels["shape"] == list(image.shape)
    client = TritonHTTPClient(server.url)
    expected = client.infer("segment", {"image": image[..., None]}, ["labels"])["labels"]
    client.close()
    np.testing.assert_array_equal(np.array(labels["data"]).reshape(image.shape), expected)


def _raw(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """POST ``body`` as given (any bytes, any headers) on a fresh connection; (status, answer)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        connection.putrequest("POST", parts.path)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            connection.putheader(key, value)
        connection.endheaders(body)
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def _fuzz_requests() -> list[tuple[str, bytes, dict[str, str]]]:
    """(model, body, headers): malformed JSON, wrong shapes and dtypes, huge claimed shapes (JSON
    and binary), NaN, a bad Content-Length — each must be answered with an error."""
    def j(inputs) -> bytes:
        return json.dumps({"inputs": inputs}).encode()

    image = {"name": "image", "datatype": "FP32"}
    binary_header = json.dumps({"inputs": [{**image, "shape": [100000, 100000, 1],
                                            "parameters": {"binary_data_size": 16}}]}).encode()
    return [
        ("segment", b"{not json", {}),
        ("segment", b"", {}),
        ("segment", j([{**image, "shape": [100000, 100000, 1], "data": [0, 1, 2, 3]}]), {}),
        ("network", j([{"name": "tiles", "datatype": "FP32", "shape": [100000, 2, 224, 224],
                        "data": [0, 1]}]), {}),
        ("segment", j([{**image, "shape": [-1, 4, 1], "data": [0, 1, 2, 3]}]), {}),
        ("segment", j([{**image, "shape": ["a", 2, 1], "data": [0, 1]}]), {}),
        ("segment", j([{**image, "shape": [2, 2, 1], "data": ["x", "y", "z", "w"]}]), {}),
        ("segment", j([{**image, "datatype": "INT8", "shape": [2, 2, 1], "data": [0, 1, 2, 3]}]), {}),
        ("segment", j([{**image, "shape": [2, 2], "data": [0, 1, 2, 3]}]), {}),
        ("segment", j([{**image, "shape": [8, 8, 1], "data": [float("nan")] * 64}]).replace(b"NaN", b"1e999"),
         {}),
        ("segment", j([{**image, "shape": [0, 0, 1], "data": []}]), {}),
        ("segment", binary_header + bytes(16), {"Inference-Header-Content-Length": str(len(binary_header))}),
        ("segment", b"{}", {"Inference-Header-Content-Length": "many"}),
    ]


def test_a_fuzz_of_bad_requests_is_answered_and_the_server_keeps_serving(server):
    """Every malformed request — among them the ~100-byte claims of a [100000, 100000, 1] image and
    of 100000 tiles that make Triton's JSON parser abort — is answered with a 4xx error (the front
    refuses the claims before Triton parses them), concurrently; then the server is ready and
    answers correctly."""
    client = TritonHTTPClient(server.url)
    expected = client.infer("segment", {"image_uint16": cells(3)[..., None]}, ["labels"])["labels"]
    requests = _fuzz_requests() * 3
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda r: _raw(f"{server.url}/v2/models/{r[0]}/infer", r[1], r[2]),
                                requests))
    assert all(400 <= status < 500 for status, _ in answers), [
        (a, r[1][:80]) for a, r in zip(answers, requests, strict=True) if not 400 <= a[0] < 500]
    claims = [body for (status, body), (_, sent, _) in zip(answers, requests, strict=True)
              if b"100000" in sent]
    assert claims and all(b"cannot hold that many" in body for body in claims)
    assert server.process.poll() is None and client.ready()
    again = client.infer("segment", {"image_uint16": cells(3)[..., None]}, ["labels"])["labels"]
    np.testing.assert_array_equal(again, expected)
    client.close()


def _start_serve(weights, ports) -> tuple[subprocess.Popen, TritonHTTPClient]:
    http, grpc, metrics = ports
    proc = subprocess.Popen([sys.executable, "-m", "selfadapt_deploy", "serve", str(weights),
                             "--host", "127.0.0.1", "--http-port", str(http), "--grpc-port", str(grpc),
                             "--metrics-port", str(metrics), "--device", "cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client, deadline = TritonHTTPClient(f"http://127.0.0.1:{http}"), time.monotonic() + 300
    while not client.ready():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.5)
    return proc, client


def _descendants(pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(c) for c in children] + [g for c in children for g in _descendants(int(c))]


@pytest.mark.slow
def test_kill_9_of_serve_takes_tritonserver_and_its_stubs_along(trained_cpnet_path):
    """The children die with their parent (parent-death signal), the same ports serve again, and
    the killed server's temporary model repository is removed by the next start."""
    import tempfile

    from selfadapt_deploy.serving.server import OWNER_FILE, TMP_PREFIX

    tritonserver_or_skip()
    ports = free_ports(3)
    proc, client = _start_serve(trained_cpnet_path, ports)
    family = _descendants(proc.pid)
    assert family  # tritonserver and its Python-backend stubs
    repos = [d for d in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*")
             if (d / OWNER_FILE).is_file() and (d / OWNER_FILE).read_text() == str(proc.pid)]
    assert len(repos) == 1
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 60
    while any(_pid_running(p) for p in family):
        assert time.monotonic() < deadline, "tritonserver or a stub outlived its killed parent"
        time.sleep(0.5)
    again, client = _start_serve(trained_cpnet_path, ports)  # the same ports are free again
    try:
        assert client.ready() and not repos[0].exists()
    finally:
        again.send_signal(signal.SIGTERM)
        again.wait(timeout=90)


def _pid_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited


def test_stale_repositories_of_dead_servers_are_removed_and_live_ones_kept(tmp_path):
    from selfadapt_deploy.serving.server import OWNER_FILE, TMP_PREFIX, remove_stale_repositories

    dead = subprocess.Popen(["true"])
    dead.wait()
    for name, pid in (("dead", dead.pid), ("alive", os.getpid())):
        (tmp_path / f"{TMP_PREFIX}{name}").mkdir()
        (tmp_path / f"{TMP_PREFIX}{name}" / OWNER_FILE).write_text(str(pid))
    (tmp_path / f"{TMP_PREFIX}unowned").mkdir()
    assert remove_stale_repositories(tmp_path) == [tmp_path / f"{TMP_PREFIX}dead"]
    assert (tmp_path / f"{TMP_PREFIX}alive").exists() and (tmp_path / f"{TMP_PREFIX}unowned").exists()


def _post(url: str, body: dict) -> tuple[int, str]:
    status, answer = _raw(url, json.dumps(body).encode())
    return status, answer.decode()


def test_a_clients_mistake_is_400_with_one_line_and_counted_as_refused(server):
    """An empty image (shape [0, 0, 1]) is the client's mistake: HTTP 400, one line, no traceback or
    server paths; the refusal shows in the metrics; the server keeps serving."""
    url = f"{server.url}/v2/models/segment/infer"
    for _ in range(2):
        status, body = _post(url, {"inputs": [{"name": "image", "datatype": "FP32", "shape": [0, 0, 1],
                                               "data": []}]})
        assert status == 400, body
        message = json.loads(body)["error"]
        assert "non-empty Y×X×C image" in message and "\n" not in message
        assert "Traceback" not in message and "/site-packages/" not in message
    p = server.ports
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{p.metrics}/metrics").read().decode()
    refused = re.search(r'sa_deploy_refused_requests\{model="segment"\} (\d+)', metrics)
    assert refused and int(refused.group(1)) >= 2, [m for m in metrics.splitlines() if "sa_deploy" in m]
    client = TritonHTTPClient(server.url)
    assert client.infer("segment", {"image_uint16": cells(3)[..., None]}, ["labels"])["labels"].max() > 0
    client.close()


def stand_in_backend(monkeypatch) -> None:
    """Triton's ``triton_python_backend_utils`` as the models use it: error codes, responses
    holding their outputs or error, tensors and inputs as plain arrays (requests are dicts)."""
    import types

    class TritonError:
        INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

        def __init__(self, message, code=None):
            self.message, self.code = message, code

    def response(output_tensors, error=None):
        return types.SimpleNamespace(outputs=output_tensors, error=error)

    pb = types.SimpleNamespace(TritonError=TritonError, InferenceResponse=response,
                               Tensor=types.SimpleNamespace(from_dlpack=lambda name, a: a),
                               get_input_tensor_by_name=lambda request, name: request.get(name))
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)


def test_our_own_failure_is_500_without_internals_and_the_clients_is_400(monkeypatch, capsys):
    """Inside Triton's backend (a stand-in module here): a bug of ours answers INTERNAL (HTTP 500)
    with one generic line — the traceback goes to the server's log (stderr) — while a
    SaDeployError answers INVALID_ARG (HTTP 400) with its own line."""
    import types

    from selfadapt_deploy.serving import models

    stand_in_backend(monkeypatch)
    model = models.SegmentModel()
    model.metrics, model.max_pixels = models.ServeMetrics("segment"), 10**6

    class Broken:
        runner = types.SimpleNamespace(spec=types.SimpleNamespace(diam_mean=30.0, default_diameter=30.0))

        def segment(self, *a, **k):
            raise RuntimeError("boom in /secret/path/models.py")

    model.segmenter = Broken()
    ours = model._answer({"image": np.zeros((8, 8, 1), np.float32)})
    assert ours.error.code == "INTERNAL" and ours.error.message == models.INTERNAL_MESSAGE.format(
        model="segment")
    assert "boom in /secret/path" in capsys.readouterr().err  # in the server's log only
    theirs = model._answer({"image": np.zeros((0, 0, 1), np.float32)})
    assert theirs.error.code == "INVALID_ARG" and "non-empty Y×X×C image" in theirs.error.message


def test_the_rescaled_image_is_bounded_by_max_image_pixels_too(monkeypatch):
    """A 128² image at diameter 1 (×30 for a diam_mean-30 model: 3840²) is refused with one line
    naming the diameter, the sizes and the limit; at its own diameter it is segmented."""
    import types

    from selfadapt_deploy.models.base import ModelSpec
    from selfadapt_deploy.serving import models

    stand_in_backend(monkeypatch)
    spec = ModelSpec(nchan=1, tile_size=224, fixed_tile=False, diam_mean=30.0, default_diameter=30.0)
    model = models.SegmentModel()
    model.metrics, model.max_pixels = models.ServeMetrics("segment"), 256 * 256
    model.segmenter = types.SimpleNamespace(runner=types.SimpleNamespace(spec=spec),
                                            segment=lambda img, **k: np.ones(img.shape[:2], np.uint32))
    image = np.zeros((128, 128, 1), np.float32)
    tiny = model._answer({"image": image, "diameter": np.array([1.0], np.float32)})
    assert tiny.error.code == "INVALID_ARG"
    assert tiny.error.message.startswith("diameter 1 would rescale image of 128×128 pixels 30× to 3840×3840")
    fine = model._answer({"image": image, "diameter": np.array([30.0], np.float32)})
    assert fine.error is None and fine.outputs[0].shape == (128, 128)


@pytest.mark.slow
def test_a_dead_tritonserver_is_restarted_and_the_crash_request_is_refused(trained_cpnet_path):
    """kill -9 of the tritonserver child: serve restarts it, it answers again within seconds, and
    the metrics count the restart; then the ~100-byte request whose claimed shape would make
    Triton's JSON parser abort is answered 400 by the front, and nothing restarts."""
    tritonserver_or_skip()
    ports = free_ports(3)
    http, grpc, metrics = ports
    proc = subprocess.Popen([sys.executable, "-m", "selfadapt_deploy", "serve", str(trained_cpnet_path),
                             "--host", "127.0.0.1", "--http-port", str(http), "--grpc-port", str(grpc),
                             "--metrics-port", str(metrics), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = TritonHTTPClient(f"http://127.0.0.1:{http}")

    def back_within(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not client.ready():
            assert proc.poll() is None and time.monotonic() < deadline, "serve did not come back"
            time.sleep(0.25)
        labels = client.infer("segment", {"image_uint16": cells(4)[..., None]}, ["labels"])["labels"]
        assert labels.max() > 0

    def restarts() -> int:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics").read().decode()
        found = re.search(r"^sa_deploy_server_restarts (\d+)", text, re.M)
        return int(found.group(1)) if found else -1

    try:
        back_within(300)
        assert restarts() == 0
        (triton,) = [p for p in _descendants(proc.pid)
                     if "tritonserver" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
        os.kill(triton, signal.SIGKILL)
        time.sleep(1)
        back_within(120)
        assert restarts() == 1
        crash = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [100000, 100000, 1],
                             "data": [0, 1, 2, 3]}]}  # answered by the front: Triton never parses it
        status, answer = _post(f"http://127.0.0.1:{http}/v2/models/segment/infer", crash)
        assert status == 400 and "cannot hold that many" in answer
        back_within(5)
        assert restarts() == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0 and "restarting it (restart 1)" in out and "stopped" in out, out
