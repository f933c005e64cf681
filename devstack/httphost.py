"""The HTTP functions behind a real socket on 127.0.0.1, routed as the Functions host routes them.

Not the Functions host (no bindings, no queue triggers): a stand-in for tools that speak HTTP
(schemathesis in the tests, curl in `run-local.sh --stack-only` where `func` cannot be installed).
Each request becomes a func.HttpRequest handed to the function's own entry point, and its
func.HttpResponse goes back whole. With `keys=True`, like the host in Azure, it answers 401 with an
empty body to a FUNCTION- or ADMIN-level route without the right x-functions-key (FUNCTION_KEY, or
ADMIN_KEY for admin routes); without, like `func start` locally, it checks none.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import azure.functions as func

from devstack.invocation import Context
from triggers import alerts_http, followups_http, http_intake, ops

FUNCTION_KEY = "test-function-key"
ADMIN_KEY = "test-admin-key"
ROUTES: dict[tuple[str, str], Any] = {
    ("POST", "/api/cases"): http_intake.create_case, ("POST", "/api/leads"): http_intake.create_lead,
    ("GET", "/api/health"): ops.health, ("GET", "/api/openapi.json"): ops.openapi,
    ("GET", "/api/diagnostics"): ops.diagnostics,
    ("POST", "/api/cases/notes"): followups_http.case_note, ("POST", "/api/leads/notes"): followups_http.lead_note,
    ("POST", "/api/cases/resolve"): followups_http.resolve_case,
    ("POST", "/api/cases/cancel"): followups_http.cancel_case,
    ("POST", "/api/cases/update"): followups_http.update_case, ("POST", "/api/alerts"): alerts_http.alert,
}


class _Handler(BaseHTTPRequestHandler):
    check_keys = True

    def _serve(self) -> None:
        path = self.path.split("?", 1)[0]
        fn = ROUTES.get((self.command, path))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if fn is None:
            self.send_response(405 if any(p == path for _, p in ROUTES) else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        level = str(getattr(fn.build().get_trigger().auth_level, "value", "")).lower()
        allowed = {"anonymous": None, "function": {FUNCTION_KEY, ADMIN_KEY}, "admin": {ADMIN_KEY}}.get(level, set())
        if self.check_keys and allowed is not None and self.headers.get("x-functions-key") not in allowed:
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        req = func.HttpRequest(method=self.command, url=f"http://localhost{self.path}",
                               headers=dict(self.headers.items()), body=body)
        user_fn = fn.build().get_user_function()
        try:
            resp = user_fn(req, Context())
        except TypeError:  # health and openapi take no context
            resp = user_fn(req)
        payload = resp.get_body()
        self.send_response(resp.status_code)
        for name, value in resp.headers.items():
            if name.lower() not in ("content-length", "content-type"):
                self.send_header(name, value)
        self.send_header("Content-Type", resp.mimetype or "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_HEAD = _serve

    def log_message(self, *args: Any) -> None:  # the functions log; the socket layer stays quiet
        pass


@contextmanager
def serve(port: int = 0, *, keys: bool = True) -> Iterator[str]:
    """Serve the functions (port 0: any free one); yields the base URL (http://127.0.0.1:<port>/api)."""
    handler = type("Handler", (_Handler,), {"check_keys": keys})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
