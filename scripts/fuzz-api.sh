#!/usr/bin/env bash
# Fuzzes the HTTP API with schemathesis against a live server built from this
# checkout, using the OpenAPI document that the server serves.
#
# Fails on any 5xx and on any response that the document does not allow
# (status, content type, headers or body). Needs root, or CAP_SYS_ADMIN,
# because the server and schemathesis run in a private network namespace
# that has only a loopback interface: fuzzed webhook URLs point anywhere,
# and test pings and deliveries to them must not leave this machine.
#
# Environment:
#   FUZZ_MAX_EXAMPLES  test cases per operation and phase (default 100)
#   FUZZ_TIME_LIMIT    seconds before schemathesis is stopped (default 300)
#   FUZZ_SEED          seed of a previous run, to repeat it
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=target/fuzz-venv
SCHEMATHESIS_REQUIREMENT='schemathesis>=4.32,<5'
BINARY=target/debug/citapro-webhooks
MAX_EXAMPLES=${FUZZ_MAX_EXAMPLES:-100}
TIME_LIMIT=${FUZZ_TIME_LIMIT:-300}
# schemathesis and hypothesis keep their caches in the working directory.
WORK_DIR=target/fuzz-work

if [[ -z "${CITAPRO_FUZZ_IN_NETNS:-}" ]]; then
    # Outside the namespace: install and build, which need the registries.
    if ! "$VENV/bin/python" -c 'import schemathesis' 2>/dev/null; then
        echo "fuzz-api: installing $SCHEMATHESIS_REQUIREMENT into $VENV" >&2
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install --quiet --disable-pip-version-check "$SCHEMATHESIS_REQUIREMENT"
    fi
    cargo build --quiet --bin citapro-webhooks
    if ! unshare --net true 2>/dev/null; then
        echo "fuzz-api: cannot create a network namespace (unshare --net failed);" \
            "run as root or with CAP_SYS_ADMIN" >&2
        exit 1
    fi
    exec unshare --net env CITAPRO_FUZZ_IN_NETNS=1 bash "$0" "$@"
fi

# Inside the namespace: only the loopback interface exists.
ip link set lo up

RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/citapro-fuzz.XXXXXX")
DATABASE_URL="sqlite://$RUN_DIR/webhooks.db"
SERVER_PID=""

stop_server() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID"
        wait "$SERVER_PID" || true
    fi
    rm -rf "$RUN_DIR"
}
trap stop_server EXIT

BUSINESS=$(python3 -c 'import uuid; print(uuid.uuid4())')
"$BINARY" migrate --database-url "$DATABASE_URL"
CITAPRO_FUZZ_API_KEY=$("$BINARY" api-key create --business "$BUSINESS" \
    --database-url "$DATABASE_URL" | head -n 1)
CITAPRO_FUZZ_PRODUCER_TOKEN=$("$BINARY" producer-token create --name fuzz \
    --database-url "$DATABASE_URL" | head -n 1)
export CITAPRO_FUZZ_API_KEY CITAPRO_FUZZ_PRODUCER_TOKEN

PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
BASE_URL="http://127.0.0.1:$PORT"

# The short retry schedule and timeout keep deliveries to fuzzed URLs, which
# fail quickly in this namespace, from piling up during the run.
RUST_LOG=warn "$BINARY" serve \
    --listen "127.0.0.1:$PORT" \
    --database-url "$DATABASE_URL" \
    --allow-http \
    --allow-private-targets \
    --retry-schedule 1s \
    --request-timeout 2s \
    >"$RUN_DIR/server.log" 2>&1 &
SERVER_PID=$!

for _ in $(seq 100); do
    if curl --silent --fail --output /dev/null "$BASE_URL/healthz"; then
        break
    fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "fuzz-api: the server stopped during start-up:" >&2
        cat "$RUN_DIR/server.log" >&2
        exit 1
    fi
    sleep 0.1
done

echo "fuzz-api: fuzzing $BASE_URL with up to $MAX_EXAMPLES cases per operation" >&2
mkdir -p "$WORK_DIR"
ROOT=$PWD
status=0
(
    cd "$WORK_DIR"
    timeout --signal=INT --kill-after=30 "$TIME_LIMIT" \
        "$ROOT/$VENV/bin/st" --config-file "$ROOT/scripts/fuzz-api.toml" \
        run "$BASE_URL/openapi.json" \
        --checks all \
        --max-examples "$MAX_EXAMPLES" \
        --request-timeout 10 \
        ${FUZZ_SEED:+--seed "$FUZZ_SEED"}
) || status=$?

if ((status != 0)); then
    echo "fuzz-api: schemathesis failed with exit status $status; server log:" >&2
    tail -n 50 "$RUN_DIR/server.log" >&2
fi
exit "$status"
