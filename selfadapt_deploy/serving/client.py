"""A small client of Triton's HTTP/REST protocol (KServe v2 + binary tensor extension), stdlib only.

What tests, benchmarks and scripts need: readiness, one inference with numpy arrays in and out.
Production clients can use ``tritonclient`` or curl against the same endpoints.
"""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import numpy as np

from selfadapt_deploy.errors import ServeError

#: KServe v2 datatypes of the numpy dtypes the server's models use
DATATYPES = {np.dtype(np.uint8): "UINT8", np.dtype(np.uint16): "UINT16", np.dtype(np.uint32): "UINT32",
             np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32"}
DTYPES = {name: dtype for dtype, name in DATATYPES.items()}


class TritonHTTPClient:
    """``url``: ``http://host:port`` of the server. One connection per client (not thread-safe:
    use one client per thread)."""

    def __init__(self, url: str, timeout: float = 120.0):
        parts = urlsplit(url if "://" in url else f"http://{url}")
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 8000
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def _request(self, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        for attempt in range(2):  # a kept-alive connection the server closed is reopened once
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self._conn.request(method, path, body, headers or {})
                response = self._conn.getresponse()
                return response.status, dict(response.getheaders()), response.read()
            except (ConnectionError, http.client.HTTPException, OSError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def ready(self, model: str | None = None) -> bool:
        """Server (or ``model``) readiness; False when nothing answers."""
        path = "/v2/health/ready" if model is None else f"/v2/models/{model}/ready"
        try:
            return self._request("GET", path)[0] == 200
        except OSError:
            return False
        finally:
            self.close()  # a polling client must not hold a connection a shutting-down server waits on

    def config(self, model: str) -> dict:
        """The model's configuration as the server holds it (JSON)."""
        try:
            status, _, body = self._request("GET", f"/v2/models/{model}/config")
        except OSError as exc:
            raise ServeError(f"{self.host}:{self.port}: no server answers ({exc})") from None
        if status != 200:
            reason = body[:200].decode(errors="replace")
            raise ServeError(f"{self.host}:{self.port}: no model '{model}' ({reason})")
        return json.loads(body)

    def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        """Run ``model`` on ``inputs``; the named outputs as arrays. An error answer raises
        :class:`ServeError` with the server's message."""
        header, blobs = {"inputs": [], "outputs": [{"name": n, "parameters": {"binary_data": True}}
                                                   for n in outputs]}, []
        for name, array in inputs.items():
            array = np.ascontiguousarray(array)
            if array.dtype not in DATATYPES:
                raise ServeError(f"input {name}: dtype {array.dtype} has no Triton datatype here")
            blobs.append(array.tobytes())
            header["inputs"].append({"name": name, "shape": list(array.shape),
                                     "datatype": DATATYPES[array.dtype],
                                     "parameters": {"binary_data_size": len(blobs[-1])}})
        head = json.dumps(header).encode()
        status, headers, body = self._request(
            "POST", f"/v2/models/{model}/infer", head + b"".join(blobs),
            {"Content-Type": "application/octet-stream",
             "Inference-Header-Content-Length": str(len(head))})
        size = int({k.lower(): v for k, v in headers.items()}.get("inference-header-content-length",
                                                                 len(body)))
        answer = json.loads(body[:size] or b"{}")
        if status != 200:
            raise ServeError(f"{model}: {answer.get('error', f'HTTP {status}')}")
        result, offset = {}, size
        for out in answer["outputs"]:
            n = out["parameters"]["binary_data_size"]
            data = np.frombuffer(body[offset:offset + n], DTYPES[out["datatype"]])
            result[out["name"]] = data.reshape(out["shape"])
            offset += n
        return result
