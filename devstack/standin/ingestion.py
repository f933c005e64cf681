"""Application Insights ingestion stand-in: records what the Azure Monitor exporter sends.

The exporter posts JSON arrays of envelopes (optionally gzip) to {IngestionEndpoint}/v2.1/track and
expects {"itemsReceived", "itemsAccepted", "errors"}; this answers that and keeps every envelope.
"""

from __future__ import annotations

import gzip
import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Ingestion:
    """An HTTPS listener on 127.0.0.1 using the stand-in's certificate (trusted through REQUESTS_CA_BUNDLE)."""

    def __init__(self, cert_path: str, key_path: str) -> None:
        self.envelopes: list[dict[str, Any]] = []
        self.raw: list[str] = []  # every body as received (decoded), for the personal-data check
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding", "").lower() == "gzip":
                    data = gzip.decompress(data)
                text = data.decode("utf-8", "replace")
                items = json.loads(text) if self.path.startswith("/v2.1/track") else []
                items = items if isinstance(items, list) else [items]
                with owner._lock:
                    owner.raw.append(text)
                    owner.envelopes.extend(items)
                answer = json.dumps({"itemsReceived": len(items), "itemsAccepted": len(items), "errors": []})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer.encode())

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_path, key_path)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self._server.server_address[1]}/"

    def connection_string(self) -> str:
        return (f"InstrumentationKey=00000000-0000-0000-0000-000000000001;IngestionEndpoint={self.url};"
                f"LiveEndpoint={self.url}")

    def of_type(self, base_type: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.envelopes if e.get("data", {}).get("baseType") == base_type]

    def __enter__(self) -> Ingestion:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
