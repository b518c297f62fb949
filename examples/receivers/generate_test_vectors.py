#!/usr/bin/env python3
"""Write docs/signature-test-vectors.json, or check that it is up to date.

The expected signatures are computed here with Python's hmac module, so they
do not depend on the service's Rust code. Each body is the exact text that is
signed, and its UTF-8 bytes are the HMAC input.

Usage:
    python3 generate_test_vectors.py           # rewrite the JSON file
    python3 generate_test_vectors.py --check   # exit 1 if the file differs
"""

import base64
import hashlib
import hmac
import json
import sys
from pathlib import Path

VECTORS_PATH = Path(__file__).resolve().parents[2] / "docs" / "signature-test-vectors.json"

SECRET_A = "97d51e84191afb705d24c6fc5324fc06b6c35432f6d0dfe6647a288cce833fc5"
SECRET_B = "b809f5245a5b7242204b3e6366f9607116180b80b15b4bc5141c7430b4e6b0d2"
SECRET_C = "0a7f61fc1a815ced1fd8a5eb9d924cdc6112fa1e7aa13ea55cba274f74eb210c"

# 2026-03-05 14:30:00 UTC.
TIMESTAMP = 1772721000

# (name, secret, delivery id, timestamp, body). Bodies are written in the
# compact form that the service sends: non-ASCII text as raw UTF-8, "/" not
# escaped, and numbers in the producer's form (75.0 stays 75.0).
CASES = [
    (
        "booking.updated payload from the reference",
        SECRET_A,
        "3dc0f137-9c2c-4132-8573-003bcc1357dd",
        TIMESTAMP,
        '{"event":"booking.updated","aggregate_id":"550e8400-e29b-41d4-a716-446655440000",'
        '"occurred_on":"2026-03-05 14:30:00","data":{"startTime":"2026-04-01 14:00:00",'
        '"endTime":"2026-04-01 15:00:00","status":"confirmed","internalNote":null,'
        '"clientNote":null,"payment_status":null,"isFromWeb":false,"isFromAgent":false,'
        '"isFromApi":false,"amount":75.0,"clientId":"550e8400-e29b-41d4-a716-446655440001",'
        '"locationId":"550e8400-e29b-41d4-a716-446655440002",'
        '"serviceId":"550e8400-e29b-41d4-a716-446655440003",'
        '"personId":"550e8400-e29b-41d4-a716-446655440004","paymentId":null,'
        '"businessAccountId":"550e8400-e29b-41d4-a716-446655440005","notifyClient":true,'
        '"lastUpdatedBy":null,"repeatGroupId":null,"changes":{"status":{"old":"pending",'
        '"new":"confirmed"},"amount":{"old":50.0,"new":75.0}}}}',
    ),
    (
        "non-ASCII letters é and ñ",
        SECRET_A,
        "f52c7819-46e9-4ad4-a41e-b07c92230d75",
        TIMESTAMP,
        '{"event":"client.updated","aggregate_id":"7d1f5a52-33c8-4c1e-9a57-0e2b8f6c1a10",'
        '"occurred_on":"2026-03-05 14:30:00","data":{"firstname":"José","lastname":"Peña Muñoz",'
        '"city":"Bogotá","country":"España","changes":{"lastname":{"old":"Pena Munoz",'
        '"new":"Peña Muñoz"},"city":{"old":"Medellín","new":"Bogotá"}}}}',
    ),
    (
        "emoji, including a ZWJ sequence",
        SECRET_B,
        "947be2ae-5e09-4e30-8fa1-a927b2f0d9c2",
        TIMESTAMP + 7,
        '{"event":"booking.updated","aggregate_id":"550e8400-e29b-41d4-a716-446655440000",'
        '"occurred_on":"2026-03-05 14:30:00","data":{"status":"confirmed",'
        '"clientNote":"Cumpleaños de Zoë 🎂🎉 👩‍👩‍👧","changes":{"clientNote":'
        '{"old":null,"new":"Cumpleaños de Zoë 🎂🎉 👩‍👩‍👧"}}}}',
    ),
    (
        "escaped quote, backslash and newline",
        SECRET_B,
        "cd0b8d8b-38a4-4df3-ae7e-ede836e33446",
        TIMESTAMP,
        '{"event":"booking.updated","aggregate_id":"550e8400-e29b-41d4-a716-446655440000",'
        '"occurred_on":"2026-03-05 14:30:00","data":{"internalNote":"Dijo \\"sí\\" \\\\ '
        'carpeta C:\\\\citas\\nsegunda línea\\ttab","changes":{"internalNote":{"old":null,'
        '"new":"Dijo \\"sí\\" \\\\ carpeta C:\\\\citas\\nsegunda línea\\ttab"}}}}',
    ),
    (
        "slash left unescaped",
        SECRET_C,
        "6f300861-4c57-4c08-a048-40d9adea6a6d",
        TIMESTAMP,
        '{"event":"service.updated","aggregate_id":"2b6f0e7a-9f2d-4a43-b1f5-6c0d3e8a7b21",'
        '"occurred_on":"2026-03-05 14:30:00","data":{"name":"Corte / peinado",'
        '"description":"Detalles en https://example.com/servicios/corte?x=1&y=2",'
        '"changes":{"name":{"old":"Corte","new":"Corte / peinado"}}}}',
    ),
    (
        "numbers keep their form",
        SECRET_C,
        "114e8fe7-bf45-451f-aba9-89a2db127f52",
        TIMESTAMP,
        '{"event":"service.updated","aggregate_id":"2b6f0e7a-9f2d-4a43-b1f5-6c0d3e8a7b21",'
        '"occurred_on":"2026-03-05 14:30:00","data":{"price":19.99,"duration":60,'
        '"deposit":75.0,"discount":0.1,"sessions":null,"changes":{"price":{"old":75.0,'
        '"new":19.99},"duration":{"old":45,"new":60}}}}',
    ),
    (
        "escape sequences signed exactly as sent",
        SECRET_A,
        "467a702b-c4ed-40d3-8751-35d409d3d346",
        TIMESTAMP,
        '{"event":"client.updated","aggregate_id":"7d1f5a52-33c8-4c1e-9a57-0e2b8f6c1a10",'
        '"occurred_on":"2026-03-05 14:30:00","data":{"firstname":"Jos\\u00e9",'
        '"address":"Calle 5 \\/ 3 \\u0026 Co","changes":{}}}',
    ),
    (
        "status update with empty changes",
        SECRET_B,
        "233a0611-2c50-44fc-bec5-4630c682c58d",
        TIMESTAMP + 300,
        '{"event":"booking.status.updated","aggregate_id":"550e8400-e29b-41d4-a716-446655440000",'
        '"occurred_on":"2026-03-05 14:35:00","data":{"status":"confirmed","amount":75.0,'
        '"changes":{}}}',
    ),
    (
        "empty JSON object",
        SECRET_C,
        "0192f3a4-5b6c-7d8e-9f00-112233445566",
        1,
        "{}",
    ),
]


def sign_body(secret: str, body: bytes) -> str:
    """Return the X-CitaPro-Signature value: lowercase hex HMAC-SHA256 of the body."""
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def sign_standard(secret: str, delivery_id: str, timestamp: int, body: bytes) -> str:
    """Return the webhook-signature value: v1, then base64 HMAC-SHA256 of id.timestamp.body."""
    signed = f"{delivery_id}.{timestamp}.".encode("utf-8") + body
    digest = hmac.new(secret.encode("utf-8"), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def build_vectors() -> list[dict]:
    vectors = []
    for name, secret, delivery_id, timestamp, body in CASES:
        json.loads(body)  # Every body must be valid JSON.
        body_bytes = body.encode("utf-8")
        vectors.append(
            {
                "name": name,
                "secret": secret,
                "body": body,
                "deliveryId": delivery_id,
                "timestamp": timestamp,
                "signature": sign_body(secret, body_bytes),
                "standardSignature": sign_standard(secret, delivery_id, timestamp, body_bytes),
            }
        )
    return vectors


def main() -> int:
    text = json.dumps(build_vectors(), ensure_ascii=False, indent=2) + "\n"
    if sys.argv[1:] == ["--check"]:
        if VECTORS_PATH.read_text(encoding="utf-8") != text:
            print(f"{VECTORS_PATH} is out of date: run {sys.argv[0]} without --check", file=sys.stderr)
            return 1
        print(f"{VECTORS_PATH} is up to date")
        return 0
    if sys.argv[1:]:
        print(f"usage: {sys.argv[0]} [--check]", file=sys.stderr)
        return 2
    VECTORS_PATH.write_text(text, encoding="utf-8")
    print(f"wrote {len(CASES)} cases to {VECTORS_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
