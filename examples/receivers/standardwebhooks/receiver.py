#!/usr/bin/env python3
"""A receiver that verifies webhook-signature with the standardwebhooks package from PyPI.

Install: python3 -m venv .venv && .venv/bin/pip install -r requirements.txt
Serve:   PORT=8000 WEBHOOK_SECRET=<secret> .venv/bin/python receiver.py
Check the published test vectors with the package's signer:
         .venv/bin/python receiver.py verify [path/to/signature-test-vectors.json]

WEBHOOK_SECRET is the 64-character secret as returned by POST /v1/webhooks.
The package expects "whsec_" followed by the base64 of the key bytes, and the
key bytes are the UTF-8 bytes of that secret string.
"""

import base64
import json
import os
import sys
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import version
from pathlib import Path

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

MAX_BODY_BYTES = 1024 * 1024
DEFAULT_VECTORS_PATH = Path(__file__).resolve().parents[3] / "docs" / "signature-test-vectors.json"
LIBRARY = f"standardwebhooks {version('standardwebhooks')} (PyPI)"


def standard_secret(secret: str) -> str:
    """Convert a CitaPro secret to the whsec_ form that Standard Webhooks libraries take."""
    return "whsec_" + base64.b64encode(secret.encode("utf-8")).decode("ascii")


class LibraryHandler(BaseHTTPRequestHandler):
    webhook: Webhook

    def do_POST(self) -> None:
        if self.path != "/webhook":
            self.send_status(404)
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            print("rejected request: missing or invalid Content-Length", flush=True)
            self.send_status(411)
            return
        if length < 0 or length > MAX_BODY_BYTES:
            print(f"rejected request: Content-Length {length} exceeds {MAX_BODY_BYTES} bytes", flush=True)
            self.send_status(413)
            return
        body = self.rfile.read(length)
        delivery_id = self.headers.get("webhook-id", "-")
        try:
            # verify() also rejects a webhook-timestamp more than 5 minutes
            # away from this machine's clock.
            payload = self.webhook.verify(body, dict(self.headers.items()))
        except WebhookVerificationError as error:
            print(f"rejected delivery={delivery_id}: {LIBRARY}: {error}", flush=True)
            self.send_status(401)
            return
        self.send_status(204)
        print(f"received {payload.get('event')} delivery={delivery_id} verified by {LIBRARY}", flush=True)

    def send_status(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args) -> None:
        pass


def serve() -> int:
    secret = os.environ.get("WEBHOOK_SECRET", "")
    if not secret:
        print("WEBHOOK_SECRET is missing: set it to the secret returned by POST /v1/webhooks", file=sys.stderr)
        return 2
    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ.get("PORT", "8000"))
    LibraryHandler.webhook = Webhook(standard_secret(secret))
    server = ThreadingHTTPServer((host, port), LibraryHandler)
    print(f"listening on http://{host}:{port}/webhook", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


def verify_vectors(path: Path) -> int:
    """Sign every test vector with the package and compare with standardSignature.

    verify() would reject these fixed, old timestamps, so this checks sign()
    with the same key conversion that the server uses.
    """
    cases = json.loads(path.read_text(encoding="utf-8"))
    failed = 0
    for case in cases:
        webhook = Webhook(standard_secret(case["secret"]))
        timestamp = datetime.fromtimestamp(case["timestamp"], tz=timezone.utc)
        signature = webhook.sign(case["deliveryId"], timestamp, case["body"].encode("utf-8"))
        if signature == case["standardSignature"]:
            print(f"ok   {case['name']}")
        else:
            failed += 1
            print(f"FAIL {case['name']}: {signature}, expected {case['standardSignature']}")
    print(f"{LIBRARY}: {len(cases) - failed} of {len(cases)} test vectors match")
    return 1 if failed or not cases else 0


def main() -> int:
    if len(sys.argv) >= 2 and sys.argv[1] == "verify":
        return verify_vectors(Path(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_VECTORS_PATH)
    if len(sys.argv) > 1:
        print(f"usage: {sys.argv[0]} [verify [VECTORS_JSON]]", file=sys.stderr)
        return 2
    return serve()


if __name__ == "__main__":
    sys.exit(main())
