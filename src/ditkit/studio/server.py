"""The studio's HTTP server (standard library only): one static page and a small JSON API.

    GET  /                              the page (static/index.html, static/app.js; no CDN)
    GET  /api/info                      model facts, defaults and limits
    POST /api/jobs                      queue a request -> 202 {"id", "position"}; 400 bad input, 429 busy
    GET  /api/jobs/ID                   status: queued/running/done/error/cancelled, step i of n, progress, URLs
    POST /api/jobs/ID/cancel            stop a queued or running job -> 200 status; 409 if it has finished
    GET  /api/jobs/ID/preview.png       the latest denoised estimate while sampling
    GET  /api/jobs/ID/grid.png          the result grid
    GET  /api/jobs/ID/images/K.png      one result image

Every error is a JSON object {"error": message} with a 4xx status (5xx only for bugs, whose details
go to the server log, never to the page, and for a text-conditioned checkpoint whose text encoder
cannot be loaded, with a message saying what to install).

The server listens on IPv4 or IPv6 as the host asks (`::1`, `127.0.0.1`, a name). On a loopback
address it answers only requests whose Host header names a loopback address or `localhost`. `serve`
takes the port before it loads the checkpoint, so a busy port is refused at once (a ValueError naming
host and port), and closes the studio when it stops.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import re
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

from .jobs import Limits, Studio, StudioError

__all__ = ["make_server", "serve", "STATIC_FILES"]

log = logging.getLogger(__name__)

STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8"}
MAX_BODY = 16 * 1024 * 1024
"""Largest request body accepted (an uploaded image travels as base64 inside the JSON)."""

_JOB = re.compile(r"^/api/jobs/(\d+)(?:/(preview\.png|grid\.png|images/(\d+)\.png))?$")
_CANCEL = re.compile(r"^/api/jobs/(\d+)/cancel$")


def _static(name: str) -> bytes:
    return resources.files("ditkit.studio").joinpath("static", name).read_bytes()


class _Handler(BaseHTTPRequestHandler):
    studio: Studio  # set on the subclass made by make_server
    server_version = "ditkit-studio"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, body: bytes, content_type: str, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _guard(self, action) -> None:
        try:
            action()
        except StudioError as err:
            self._error(err.status, str(err))
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception:
            log.exception("studio request %s %s failed", self.command, self.path)
            self._error(500, "internal server error (details are in the server log)")

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        self._guard(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._guard(self._post)

    def _check_host(self) -> None:
        """On a loopback address, answer only requests addressed to it: a web page elsewhere that makes
        its name resolve to 127.0.0.1 (DNS rebinding) could otherwise read the studio."""
        if not self.server.loopback:
            return
        host = host_of(self.headers.get("Host") or "")
        if host != "localhost" and not is_loopback(host):
            raise StudioError(f"requests must be addressed to this machine, not {host[:100]!r}", 403)

    def _get(self) -> None:
        self._check_host()
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            return self._send(200, _static("index.html"), STATIC_FILES["index.html"])
        if path.startswith("/static/") and path[len("/static/") :] in STATIC_FILES:
            name = path[len("/static/") :]
            return self._send(200, _static(name), STATIC_FILES[name])
        if path == "/api/info":
            return self._json(200, self.studio.info())
        match = _JOB.match(path)
        if match is None:
            raise StudioError(f"no such page: {path}", 404)
        job = self.studio.get(match.group(1))
        what = match.group(2)
        if what is None:
            return self._json(200, self.studio.status(job))
        if what == "preview.png":
            return self._send(200, job.png("preview"), "image/png")
        if what == "grid.png":
            return self._send(200, job.png("grid"), "image/png", cache=True)
        return self._send(200, job.png("image", int(match.group(3))), "image/png", cache=True)

    def _post(self) -> None:
        self._check_host()
        path = self.path.split("?", 1)[0]
        cancel = _CANCEL.match(path)
        if path != "/api/jobs" and cancel is None:
            raise StudioError(f"cannot POST to {self.path}", 404)
        # JSON only: a cross-site form cannot send this content type without a CORS preflight,
        # which the studio never grants.
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            raise StudioError("send the request as JSON (Content-Type: application/json)", 415)
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise StudioError("bad Content-Length header") from None
        if length > MAX_BODY:
            raise StudioError(f"request body too large ({length} bytes; the limit is {MAX_BODY})", 413)
        body = self.rfile.read(length) if length > 0 else b""
        try:
            payload = json.loads(body or b"{}")
        # ValueError: also an integer of over 4300 digits; RecursionError: nesting too deep.
        except (ValueError, RecursionError) as err:
            raise StudioError(f"the request body is not valid JSON ({str(err)[:200]})") from None
        if cancel is not None:
            job = self.studio.cancel(self.studio.get(cancel.group(1)))
            return self._json(200, self.studio.status(job))
        job = self.studio.submit(payload)
        self._json(HTTPStatus.ACCEPTED, {"id": job.id, "position": self.studio.position(job)})


def host_of(header: str) -> str:
    """The host of a Host header, lower-case, without its port: '[::1]:8000' -> '::1', 'a:80' -> 'a'."""
    header = header.strip().lower()
    if header.startswith("["):  # an IPv6 literal (RFC 3986): [addr] or [addr]:port
        addr, bracket, rest = header[1:].partition("]")
        return addr if bracket and (not rest or rest.startswith(":")) else header
    if header.count(":") == 1:  # name:port or v4:port; more colons: a bare IPv6 address, no port
        return header.split(":", 1)[0]
    return header


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback IP address (127.0.0.0/8, ::1, ::ffff:127.x.x.x); names are not."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])  # without an IPv6 zone (fe80::1%eth0)
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    loopback = False
    """Whether the server listens on a loopback address only (then Host headers are checked)."""


class _Server6(_Server):
    address_family = socket.AF_INET6


def _family(host: str, port: int) -> socket.AddressFamily:
    """IPv4 or IPv6, as `host` (an address or a name) asks; IPv4 when a name has both."""
    if not host:
        return socket.AF_INET  # "": every IPv4 interface, as the standard library's servers take it
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host.split("%", 1)[0]).version == 6 else socket.AF_INET
    except ValueError:
        pass
    try:
        families = [info[0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
    except socket.gaierror as err:
        raise ValueError(f"cannot listen on host {host!r}: {err}") from None
    if socket.AF_INET in families or not families:
        return socket.AF_INET
    return families[0]


def _listen(host: str, port: int) -> _Server:
    """A server bound to host:port and listening, whose requests wait until a studio is attached
    (`_attach`). ValueError, naming host and port, when the port is taken or the host is not this machine's."""
    host = host.strip("[]")  # "[::1]" as written in URLs
    server_class = _Server6 if _family(host, port) == socket.AF_INET6 else _Server
    try:
        server = server_class((host, port), _Handler)  # closes its socket itself when binding fails
    except OSError as err:
        where = f"[{host}]:{port}" if ":" in host else f"{host or '0.0.0.0'}:{port}"
        if err.errno == errno.EADDRNOTAVAIL:
            hint = "--host must be an address of this machine (127.0.0.1, ::1, 0.0.0.0, ...)"
        else:
            hint = "choose another --port (0 picks a free one)"
        raise ValueError(f"cannot listen on {where}: {err.strerror or err}; {hint}") from None
    server.loopback = is_loopback(server.server_address[0])
    return server


def _attach(server: ThreadingHTTPServer, studio: Studio) -> ThreadingHTTPServer:
    server.RequestHandlerClass = type("StudioHandler", (_Handler,), {"studio": studio})
    return server


def make_server(studio: Studio, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """An HTTP server for `studio` on `host` (IPv4 or IPv6); port 0 picks a free port (`server.server_address`).

    ValueError (naming host and port) when it cannot listen there, e.g. the port is in use."""
    return _attach(_listen(host, port), studio)


def serve(
    checkpoint: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    weights: str = "ema",
    limits: Limits | None = None,
    ready: threading.Event | None = None,
) -> None:
    """Load a checkpoint and serve the studio until interrupted; then cancel its jobs and end its worker.

    The port is taken first, so that a busy one is a ValueError at once, not after loading the model."""
    from ..train import load_model, resolve_device

    server = _listen(host, port)
    studio = None
    try:
        model, config = load_model(checkpoint, weights, resolve_device(device))
        studio = Studio(model, config, name=str(checkpoint), limits=limits)
        _attach(server, studio)
        bound = server.server_address[0]
        url_host = f"[{bound}]" if ":" in bound else bound
        print(f"ditkit studio: serving {checkpoint} at http://{url_host}:{server.server_address[1]}/ (Ctrl+C stops)")
        if not server.loopback:
            print(f"warning: listening on {host or bound}: anyone who can reach this machine can use the studio")
        if ready is not None:
            ready.set()
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    finally:
        server.server_close()
        if studio is not None:
            studio.close(timeout=10.0)
