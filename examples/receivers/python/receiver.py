#!/usr/bin/env python3
"""A CitaPro webhook receiver that uses only Python's standard library.

Serve:   PORT=8000 WEBHOOK_SECRET=<secret> python3 receiver.py
Check the published test vectors:
         python3 receiver.py verify [path/to/signature-test-vectors.json]

The server accepts POST /webhook, verifies X-CitaPro-Signature over the raw
body, responds with 204 to a valid delivery (also to a repeated delivery id)
and with 401 to a missing or wrong signature. It prints one line per delivery.
"""

import base64
import hashlib
import hmac
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MAX_BODY_BYTES = 1024 * 1024
DEFAULT_VECTORS_PATH = Path(__file__).resolve().parents[3] / "docs" / "signature-test-vectors.json"


def sign_body(secret: str, body: bytes) -> str:
    """Return the X-CitaPro-Signature value for a body.

    The key is the UTF-8 encoding of the secret string as given (64 hex
    characters), not the bytes that the hex digits would decode to.
    """
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def sign_standard(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """Return the Standard Webhooks webhook-signature value for a delivery."""
    signed = f"{delivery_id}.{timestamp}.".encode("utf-8") + body
    digest = hmac.new(secret.encode("utf-8"), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def signature_matches(secret: str, body: bytes, header: str | None) -> bool:
    """Compare the received signature with the expected one in constant time."""
    if header is None:
        return False
    return hmac.compare_digest(sign_body(secret, body).encode("ascii"), header.strip().encode("utf-8"))


class DeliveryLog:
    """Delivery ids already processed, shared by all request threads.

    NOTE: the ids live in memory only, so they are forgotten on restart and the
    set grows without bound. A production receiver stores them in its database
    with a unique key and removes old ones after a few days.
    """

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def add(self, delivery_id: str) -> bool:
        """Record a delivery id and return False if it was already recorded."""
        with self._lock:
            if delivery_id in self._ids:
                return False
            self._ids.add(delivery_id)
            return True


class WebhookHandler(BaseHTTPRequestHandler):
    secret = ""
    deliveries = DeliveryLog()

    def do_POST(self) -> None:
        if self.path != "/webhook":
            self.send_response_only_status(404)
            return
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            print("rejected request: chunked body, Content-Length required", flush=True)
            self.send_response_only_status(411)
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            print("rejected request: missing or invalid Content-Length", flush=True)
            self.send_response_only_status(411)
            return
        if length < 0 or length > MAX_BODY_BYTES:
            print(f"rejected request: Content-Length {length} exceeds {MAX_BODY_BYTES} bytes", flush=True)
            self.send_response_only_status(413)
            return
        # The raw bytes are what was signed. Parse them only after verifying.
        body = self.rfile.read(length)
        delivery_id = self.headers.get("X-CitaPro-Delivery-Id", "-")

        if not signature_matches(self.secret, body, self.headers.get("X-CitaPro-Signature")):
            print(f"rejected delivery={delivery_id}: invalid X-CitaPro-Signature", flush=True)
            self.send_response_only_status(401)
            return
        try:
            payload = json.loads(body)
        except ValueError as error:
            print(f"rejected delivery={delivery_id}: body is not valid JSON: {error}", flush=True)
            self.send_response_only_status(400)
            return
        if not self.deliveries.add(delivery_id):
            print(f"duplicate delivery={delivery_id}: already processed", flush=True)
            self.send_response_only_status(204)
            return

        # Respond first, so the sender's 10 s timeout never runs out while the
        # work runs. A real receiver queues the payload here.
        self.send_response_only_status(204)
        data = payload.get("data") or {}
        changes = data.get("changes")
        changes_text = "none" if changes is None else json.dumps(changes, ensure_ascii=False, separators=(",", ":"))
        print(f"received {payload.get('event')} delivery={delivery_id} changes={changes_text}", flush=True)

    def send_response_only_status(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args) -> None:
        # The handler prints its own line per delivery, so the default access
        # log would only repeat it.
        pass


def serve() -> int:
    secret = os.environ.get("WEBHOOK_SECRET", "")
    if not secret:
        print("WEBHOOK_SECRET is missing: set it to the secret returned by POST /v1/webhooks", file=sys.stderr)
        return 2
    port = int(os.environ.get("PORT", "8000"))
    host = os.environ.get("HOST", "127.0.0.1")
    WebhookHandler.secret = secret
    server = ThreadingHTTPServer((host, port), WebhookHandler)
    print(f"listening on http://{host}:{port}/webhook", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


def verify_vectors(path: Path) -> int:
    """Check every published test vector and return the process exit status."""
    cases = json.loads(path.read_text(encoding="utf-8"))
    failed = 0
    for case in cases:
        body = case["body"].encode("utf-8")
        signature = sign_body(case["secret"], body)
        standard = sign_standard(case["secret"], case["deliveryId"], str(case["timestamp"]), body)
        if signature != case["signature"]:
            failed += 1
            print(f"FAIL {case['name']}: signature {signature}, expected {case['signature']}")
        elif standard != case["standardSignature"]:
            failed += 1
            print(f"FAIL {case['name']}: standard signature {standard}, expected {case['standardSignature']}")
        elif not signature_matches(case["secret"], body, case["signature"]):
            failed += 1
            print(f"FAIL {case['name']}: signature_matches rejects the expected signature")
        else:
            print(f"ok   {case['name']}")
    print(f"python: {len(cases) - failed} of {len(cases)} test vectors match")
    return 1 if failed or not cases else 0


def main() -> int:
    if len(sys.argv) >= 2 and sys.argv[1] == "verify":
        path = Path(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_VECTORS_PATH
        return verify_vectors(path)
    if len(sys.argv) > 1:
        print(f"usage: {sys.argv[0]} [verify [VECTORS_JSON]]", file=sys.stderr)
        return 2
    return serve()


if __name__ == "__main__":
    sys.exit(main())
