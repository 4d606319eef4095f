"""The HTTP front of ``sa-deploy serve``: clients reach it, it reaches Triton.

Triton's JSON parser allocates the size an input's ``shape`` claims before it reads the values,
so a ~100-byte request claiming ``[100000, 100000, 1]`` makes it abort. The front answers such a
request with HTTP 400 and one line before Triton sees it — a JSON body cannot carry more values
than it has bytes — and forwards everything else unchanged (binary-protocol requests too: Triton
checks their declared sizes itself). Triton's HTTP 500 for a body it cannot parse becomes the
400 it is (the client's mistake). While Triton is down (a restart) it answers 503.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SHAPE = re.compile(rb'"shape"\s*:\s*\[([^\]]*)\]')
BINARY_HEADER = "Inference-Header-Content-Length"
#: Triton answers these parse errors of the client's request with HTTP 500
TRITON_PARSE_ERRORS = (b"failed to parse the request JSON buffer", b"Unable to parse ")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "expect",
              "proxy-authorization", "proxy-authenticate"}


def claimed_too_much(header: bytes, body_bytes: int) -> str:
    """Why an inference request's JSON (``header``: the whole body, or a binary request's JSON
    header) declares more values than its ``body_bytes`` could hold — every value takes at least
    a byte, in JSON and in binary alike ("" if it does not)."""
    for match in SHAPE.finditer(header):
        try:
            dims = [int(d) for d in match.group(1).split(b",") if d.strip()]
        except ValueError:
            return f"shape [{match.group(1).decode(errors='replace')}] is not a list of integers"
        if any(d < 0 for d in dims):
            return f"shape {dims} has a negative dimension"
        if math.prod(dims) > body_bytes:
            return (f"shape {dims} declares {math.prod(dims)} values, but the request's {body_bytes}-byte "
                    "body cannot hold that many")
    return ""


class Front(ThreadingHTTPServer):
    """``host:port`` for clients, forwarding to Triton's HTTP endpoint at ``upstream`` (loopback)."""

    daemon_threads = True

    def __init__(self, host: str, port: int, upstream: tuple[str, int]):
        self.upstream = upstream
        super().__init__((host, port), _Handler)
        self.thread = threading.Thread(target=self.serve_forever, name="sa-deploy-front", daemon=True)

    def start(self) -> Front:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Triton's clients expect
    server: Front

    def log_message(self, *args) -> None:  # requests are Triton's to log
        pass

    def _answer(self, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _forward(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._answer(411, "send the request with a Content-Length (chunked bodies are not "
                                "accepted)")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return self._answer(400, "Content-Length is not a number")
        body = self.rfile.read(length)
        if self.command == "POST" and self.path.endswith("/infer"):
            try:  # binary protocol: the JSON header is the first part of the body
                header = body[:int(self.headers.get(BINARY_HEADER) or len(body))]
            except ValueError:
                return self._answer(400, f"{BINARY_HEADER} is not a number")
            if why := claimed_too_much(header, len(body)):
                return self._answer(400, f"refused before inference: {why}")
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        connection = getattr(self, "_upstream", None)
        for attempt in (0, 1):  # a kept-alive connection Triton closed is opened once more
            if connection is None:
                connection = http.client.HTTPConnection(*self.server.upstream, timeout=600)
            try:
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                break
            except (ConnectionError, http.client.HTTPException, OSError):
                connection.close()
                connection = None
                if attempt:
                    self._upstream = None
                    return self._answer(503, "the inference server is restarting; retry in a few seconds")
        self._upstream = connection
        status, reason = response.status, response.reason
        if status == 500 and any(e in payload for e in TRITON_PARSE_ERRORS):  # the client's bad JSON
            status, reason = 400, "Bad Request"
        self.send_response(status, reason)
        for key, value in response.getheaders():
            if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _forward
