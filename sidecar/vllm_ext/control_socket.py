"""A JSON-lines Unix socket served from a daemon thread inside a vLLM process.

The KV connector's scheduler half and the `--scheduler-cls` scheduler both live in vLLM's
EngineCore process, which no HTTP route reaches (`/collective_rpc` goes to the workers only), so
the sidecar talks to each of them over one of these sockets. One request per line, one JSON object
back per line; a failing command answers its error and the thread serves the next line, so a bad
command never takes the engine down.
"""

from __future__ import annotations

import contextlib
import json
import os
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vllm.logger import init_logger

logger = init_logger(__name__)

Handler = Callable[[dict[str, Any]], dict[str, Any]]
ErrorReply = Callable[[Exception], dict[str, Any]]


class _LineHandler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        for line in self.rfile:
            try:
                command = json.loads(line)
                if not isinstance(command, dict):
                    raise ValueError("each line must be a JSON object")
                reply = self.server.handler(command)
            except Exception as e:  # every failure goes back to the caller, the thread lives on
                # A refused argument (ValueError, e.g. unparsable JSON) is the caller's mistake;
                # anything else is ours and needs its traceback in the engine's log.
                if not isinstance(e, ValueError | self.server.expected):
                    logger.exception("slofleet control command failed on %s", self.server.server_address)
                reply = self.server.error_reply(e)
            self.wfile.write(json.dumps(reply).encode() + b"\n")
            self.wfile.flush()


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    handler: Handler
    error_reply: ErrorReply
    expected: type[Exception]


class ControlSocket:
    """A served socket; `close()` stops it and removes the path."""

    def __init__(
        self,
        path: str,
        handler: Handler,
        *,
        error_reply: ErrorReply,
        expected: type[Exception] = ValueError,
        name: str,
    ) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).unlink(missing_ok=True)
        server = _Server(path, _LineHandler)
        server.handler, server.error_reply, server.expected = handler, error_reply, expected
        # Owner and group: the sidecar container may run as another user that shares the pod's
        # volume group (fsGroup); nobody else on the host.
        os.chmod(path, 0o660)
        threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
        logger.info("%s control socket at %s", name, path)
        self._server: _Server | None = server
        self.path = path

    def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with contextlib.suppress(OSError):
            Path(self.path).unlink()
