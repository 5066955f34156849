"""A fake NDIF server on 127.0.0.1 for the remote-fault tests (tests/test_remote_faults.py).

Run as a script (`python tests/fake_ndif.py <port file> <model key>`): it loads
the model the key names, listens on a free port of 127.0.0.1 only, writes the
port to <port file>, and serves nnsight
0.8.1's protocol as a real server does: GET /ping; a websocket on /subscribe
that sends the session id, then each job's status; POST /request (the envelope
and the serialized trace); GET /result/<id>. It runs each trace for real, on
the checkpoint its model key names (loaded once), so a run through it gives
the results a local run gives.

Faults are switched by GET /_fault?mode=<mode>&after=<n>: the first n requests
are served, every later one fails as `mode` says until the mode changes:
`hang_post` (the submission is read and never answered), `hang_download` (the
job completes, its result never arrives), `http_503`, `close` (the connection
is closed without an answer), `job_error` (the server runs the job and reports
an error), `unsafe` (a result whose unpickling would run code), `ok`.
GET /_log returns when each fault was served (for the tests' timing).

The test that starts it stops it by its PID.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import socket
import struct
import sys
import threading
import time
import uuid
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import torch
import zstandard
from nnsight.modeling.mixins.remotable import Remotable
from nnsight.schema.request import RequestModel
from nnsight.schema.response import ResponseModel, Status
from nnsight.tracing import tracer as nnsight_tracer

_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455


class Marker:
    """Unpickled, it would write a file: the proof a client ran a server's code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path(self.path).write_text, ("the client ran code from the server",))


class State:
    def __init__(self) -> None:
        self.mode, self.after, self.served = "ok", 0, 0
        self.log: list[tuple[float, str]] = []
        self.sockets: dict[str, tuple[socket.socket, threading.Lock]] = {}
        self.results: dict[str, bytes] = {}
        self.models: dict[str, object] = {}
        self.run_lock = threading.Lock()
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def fault(self) -> str:
        """The fault for the next request ('ok' while the first `after` are served)."""
        with self.lock:
            self.served += 1
            mode = self.mode if self.served > self.after else "ok"
            if mode != "ok":
                self.log.append((time.time(), mode))
            return mode


STATE = State()


def _frame(payload: bytes, binary: bool) -> bytes:
    head = bytes([0x80 | (0x2 if binary else 0x1)])
    n = len(payload)
    if n < 126:
        return head + bytes([n]) + payload
    if n < 1 << 16:
        return head + bytes([126]) + struct.pack(">H", n) + payload
    return head + bytes([127]) + struct.pack(">Q", n) + payload


def _send(session: str, response: ResponseModel) -> None:
    if session not in STATE.sockets:  # the client has gone (its deadline passed)
        return
    sock, lock = STATE.sockets[session]
    with lock:
        sock.sendall(_frame(response.model_dump_json().encode(), binary=False))


def _execute(envelope: dict, blob: bytes) -> dict:
    """Run a trace as a server does: the model its key names, the trace deserialized
    against it, and what the trace saved."""
    with STATE.run_lock:
        model = _model(envelope["model_key"])
        model._remoteable_set_env(envelope.get("env") or {})
        tracer = RequestModel.deserialize(blob, model._remoteable_persistent_objects(), envelope.get("compress", False))
        nnsight_tracer.inc()  # the outermost trace: only what it saves comes back
        try:
            tracer.execute(tracer.info.code)
            return {k: v for k, v in tracer.info.frame.f_locals.items() if id(v) in nnsight_tracer._saves()}
        finally:
            nnsight_tracer.dec()  # (which forgets what was saved)


def _model(key: str):
    if key not in STATE.models:
        STATE.models[key] = Remotable.from_model_key(key, dispatch=True)
        STATE.models[key]._module.requires_grad_(False)  # as a server's model actor loads it
    return STATE.models[key]


def _job(job: str, envelope: dict, blob: bytes, mode: str, port: int) -> None:
    session = envelope["session_id"]
    _send(session, ResponseModel(id=job, status=Status.RUNNING, description="running"))
    if mode == "job_error":
        _send(session, ResponseModel(id=job, status=Status.ERROR, description="RuntimeError: the trace failed on the server"))
        return
    try:
        saves = _execute(envelope, blob) if mode != "unsafe" else {"x": Marker(envelope["marker"])}
    except Exception as err:  # noqa: BLE001 - reported to the client, as a server does
        _send(session, ResponseModel(id=job, status=Status.ERROR, description=f"{type(err).__name__}: {err}"))
        return
    buffer = io.BytesIO()
    torch.save(saves, buffer)
    data = buffer.getvalue()
    if envelope.get("compress"):
        data = zstandard.ZstdCompressor(level=6).compress(data)
    STATE.results[job] = data
    url = f"http://127.0.0.1:{port}/result/{job}" + ("?hang=1" if mode == "hang_download" else "")
    _send(session, ResponseModel(id=job, status=Status.COMPLETED, description="done", data=url))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        return

    def _answer(self, code: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _hang(self) -> None:
        """Keep the connection open, saying nothing, until the client goes or the server stops."""
        self.connection.settimeout(0.2)
        while not STATE.stop.is_set():
            try:
                if not self.connection.recv(1 << 16):
                    return
            except TimeoutError:
                continue
            except OSError:
                return

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        url = urlparse(self.path)
        if url.path == "/ping":
            self._answer(200, b'"pong"')
        elif url.path == "/status":
            self._answer(200, b"{}")  # names no deployment: nothing is refused for not being hosted
        elif url.path == "/subscribe":
            self._subscribe()
        elif url.path.startswith("/result/"):
            if parse_qs(url.query).get("hang"):
                self._hang()
                return
            self._answer(200, STATE.results.pop(url.path.rsplit("/", 1)[1], b""), "application/octet-stream")
        elif url.path == "/_fault":
            query = parse_qs(url.query)
            with STATE.lock:
                STATE.mode, STATE.after, STATE.served = query["mode"][0], int(query.get("after", ["0"])[0]), 0
                STATE.marker = query.get("marker", [""])[0]
                STATE.log = []
            self._answer(200, b"{}")
        elif url.path == "/_log":
            self._answer(200, json.dumps(STATE.log).encode())
        else:
            self._answer(404, b'{"detail": "not found"}')

    def _subscribe(self) -> None:
        accept = base64.b64encode(hashlib.sha1((self.headers["Sec-WebSocket-Key"] + _WS_GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        session = uuid.uuid4().hex
        STATE.sockets[session] = (self.connection, threading.Lock())
        with STATE.sockets[session][1]:
            self.connection.sendall(_frame(json.dumps({"session_id": session}).encode(), binary=False))
        self._hang()  # the client's frames (its close) are read and dropped
        STATE.sockets.pop(session, None)
        self.close_connection = True

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        mode = STATE.fault()
        if mode == "hang_post":
            self._hang()
            self.close_connection = True
            return
        if mode == "close":
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        if mode == "http_503":
            self._answer(503, b'{"detail": "the service is overloaded"}')
            return
        form = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + body)
        parts = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True) for part in form.iter_parts()}
        envelope = json.loads(parts["data"])
        envelope["marker"] = getattr(STATE, "marker", "")
        job = uuid.uuid4().hex
        self._answer(200, ResponseModel(id=job, status=Status.RECEIVED, description="received").model_dump_json().encode())
        port = self.server.server_address[1]
        threading.Thread(target=_job, args=(job, envelope, parts["blob"], mode, port), daemon=True).start()


def main() -> None:
    _model(sys.argv[2])  # loaded before the port is known: no request waits for it
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    Path(sys.argv[1]).write_text(str(server.server_address[1]))
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        STATE.stop.set()


if __name__ == "__main__":
    main()
