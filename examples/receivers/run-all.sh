#!/usr/bin/env bash
# Check every example receiver against the signature test vectors and against
# a live citapro-webhooks server on 127.0.0.1.
#
# Usage: examples/receivers/run-all.sh
#
# Environment:
#   CITAPRO_BIN  the citapro-webhooks binary to test. Default: run `cargo build`
#                and use target/debug/citapro-webhooks.
#   KEEP_TMP=1   keep the temporary folder with the database and the logs. It
#                is always kept when a check fails.
#
# Missing php, ruby and go are installed with apt-get (Debian packages php-cli,
# ruby, golang-go). The standardwebhooks packages are installed from PyPI into
# standardwebhooks/.venv and from npm into standardwebhooks/node_modules.
# Every process that this script starts is stopped by its pid on exit. The last
# line of output is "N passed, M failed", and the exit status is 1 if any check
# failed.

set -uo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "$script_dir/../.." && pwd)
vectors="$repo_root/docs/signature-test-vectors.json"
library_dir="$script_dir/standardwebhooks"

# Maximum seconds to wait for a server to listen or for a delivery to arrive.
wait_seconds=30

passed=0
failed=0
started_pids=()
tmp_dir=$(mktemp -d "${TMPDIR:-/tmp}/citapro-receivers.XXXXXX")

pass() {
    passed=$((passed + 1))
    echo "ok   $1"
}

fail() {
    failed=$((failed + 1))
    echo "FAIL $1"
}

stop_started_processes() {
    local pid
    for pid in "${started_pids[@]}"; do
        kill "$pid" 2>/dev/null
    done
    for pid in "${started_pids[@]}"; do
        wait "$pid" 2>/dev/null
    done
    started_pids=()
}

finish() {
    stop_started_processes
    if ((failed > 0)) || [[ "${KEEP_TMP:-}" == 1 ]]; then
        echo "logs and database kept in $tmp_dir"
    else
        rm -rf "$tmp_dir"
    fi
    echo "$passed passed, $failed failed"
    if ((failed > 0)); then
        exit 1
    fi
}
trap finish EXIT
trap 'fail "interrupted"; exit 1' INT TERM

# Runs a command with its output in a log file. On failure, prints the end of
# the log under the FAIL line.
check_command() {
    local name=$1
    shift
    local log="$tmp_dir/check-${name//[^A-Za-z0-9_.-]/_}.log"
    if "$@" >"$log" 2>&1; then
        pass "$name"
    else
        fail "$name (exit status $?, output below)"
        tail -n 20 "$log" | sed 's/^/    /'
    fi
}

run_as_root() {
    if ((EUID == 0)); then
        "$@"
    else
        sudo "$@"
    fi
}

install_missing_tools() {
    local packages=()
    command -v php >/dev/null || packages+=(php-cli)
    command -v ruby >/dev/null || packages+=(ruby)
    command -v go >/dev/null || packages+=(golang-go)
    if ((${#packages[@]} == 0)); then
        return
    fi
    echo "installing ${packages[*]} with apt-get"
    local log="$tmp_dir/apt-get.log"
    if run_as_root apt-get update >"$log" 2>&1 &&
        DEBIAN_FRONTEND=noninteractive run_as_root apt-get install -y "${packages[@]}" >>"$log" 2>&1; then
        pass "apt-get install ${packages[*]}"
    else
        fail "apt-get install ${packages[*]} (output below)"
        tail -n 20 "$log" | sed 's/^/    /'
    fi
}

# Installs the standardwebhooks packages. A failed install is a failed check,
# and the receivers that need that package are then skipped.
pypi_library_ready=0
npm_library_ready=0
install_standardwebhooks() {
    local log="$tmp_dir/pip-install.log"
    if { [[ -x "$library_dir/.venv/bin/python" ]] || python3 -m venv "$library_dir/.venv"; } >"$log" 2>&1 &&
        "$library_dir/.venv/bin/pip" install --disable-pip-version-check -r "$library_dir/requirements.txt" >>"$log" 2>&1; then
        pass "pip install standardwebhooks"
        pypi_library_ready=1
    else
        fail "pip install standardwebhooks (output below)"
        tail -n 20 "$log" | sed 's/^/    /'
    fi
    log="$tmp_dir/npm-install.log"
    if (cd "$library_dir" && npm install --no-package-lock --no-audit --no-fund) >"$log" 2>&1; then
        pass "npm install standardwebhooks"
        npm_library_ready=1
    else
        fail "npm install standardwebhooks (output below)"
        tail -n 20 "$log" | sed 's/^/    /'
    fi
}

# Prints the given number of distinct free TCP ports on 127.0.0.1. All sockets
# stay open until every port is chosen, so no port is printed twice.
free_ports() {
    python3 - "$1" <<'EOF'
import socket
import sys

sockets = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    sockets.append(s)
print(" ".join(str(s.getsockname()[1]) for s in sockets))
EOF
}

# Returns 0 once something listens on 127.0.0.1:PORT, or 1 after wait_seconds.
wait_for_port() {
    local port=$1
    local deadline=$((SECONDS + wait_seconds))
    while ((SECONDS < deadline)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.2
    done
    return 1
}

# Returns 0 once the file contains a line matching the extended regular
# expression at least COUNT times, or 1 after wait_seconds.
wait_for_lines() {
    local file=$1 pattern=$2 count=$3
    local deadline=$((SECONDS + wait_seconds))
    while ((SECONDS < deadline)); do
        if (($(grep -cE -- "$pattern" "$file" 2>/dev/null || true) >= count)); then
            return 0
        fi
        sleep 0.2
    done
    return 1
}

# Prints the string value of a top-level field of the JSON object on stdin.
json_field() {
    python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"
}

random_hex_secret() {
    python3 -c 'import secrets; print(secrets.token_hex(32))'
}

random_uuid() {
    python3 -c 'import uuid; print(uuid.uuid4())'
}

# Part 1: tools and test vectors.

install_missing_tools
for tool in node python3 php ruby go curl; do
    if ! command -v "$tool" >/dev/null; then
        fail "$tool is not installed"
    fi
done

check_command "test vectors match generate_test_vectors.py" \
    python3 "$script_dir/generate_test_vectors.py" --check
check_command "node test vectors" node "$script_dir/node/receiver.js" verify "$vectors"
check_command "python test vectors" python3 "$script_dir/python/receiver.py" verify "$vectors"
check_command "php test vectors" php "$script_dir/php/receiver.php" verify "$vectors"
check_command "ruby test vectors" ruby "$script_dir/ruby/receiver.rb" verify "$vectors"
go_receiver="$tmp_dir/go-receiver"
build_go_receiver() (cd "$script_dir/go" && go build -o "$go_receiver" .)
check_command "go build" build_go_receiver
check_command "go test vectors" "$go_receiver" verify "$vectors"

install_standardwebhooks
if ((pypi_library_ready)); then
    check_command "standardwebhooks (PyPI) test vectors" \
        "$library_dir/.venv/bin/python" "$library_dir/receiver.py" verify "$vectors"
fi
if ((npm_library_ready)); then
    check_command "standardwebhooks (npm) test vectors" node "$library_dir/receiver.js" verify "$vectors"
fi

# Part 2: live deliveries from citapro-webhooks.

if [[ -n "${CITAPRO_BIN:-}" ]]; then
    citapro_bin=$CITAPRO_BIN
else
    echo "building citapro-webhooks with cargo build"
    build_citapro() (cd "$repo_root" && cargo build --bin citapro-webhooks)
    check_command "cargo build" build_citapro
    citapro_bin="$repo_root/target/debug/citapro-webhooks"
fi
if [[ ! -x "$citapro_bin" ]]; then
    fail "citapro-webhooks binary not found at $citapro_bin: build it or set CITAPRO_BIN"
    exit 1
fi

# The service's own verify command must accept every test vector and reject
# each one with a space appended to its body.
check_verify_command() {
    python3 - "$citapro_bin" "$vectors" <<'EOF'
import json
import subprocess
import sys

binary, vectors_path = sys.argv[1], sys.argv[2]
failures = 0
with open(vectors_path, encoding="utf-8") as vectors_file:
    cases = json.load(vectors_file)
for case in cases:
    for body, expected_status in ((case["body"], 0), (case["body"] + " ", 1)):
        result = subprocess.run(
            [binary, "verify", "--secret", case["secret"], "--signature", case["signature"]],
            input=body.encode("utf-8"),
            capture_output=True,
        )
        if result.returncode != expected_status:
            failures += 1
            print(f"{case['name']!r}: exit status {result.returncode}, expected {expected_status}")
sys.exit(1 if failures else 0)
EOF
}
check_command "citapro-webhooks verify on the test vectors" check_verify_command

# Each receiver: name, expected outcome (accept or reject), command.
receiver_names=(node python php ruby go)
receiver_commands=(
    "node $script_dir/node/receiver.js"
    "python3 $script_dir/python/receiver.py"
    "$script_dir/php/serve.sh"
    "ruby $script_dir/ruby/receiver.rb"
    "$go_receiver"
)
receiver_outcomes=(accept accept accept accept accept)
receiver_names+=(python-wrong-secret)
receiver_commands+=("python3 $script_dir/python/receiver.py")
receiver_outcomes+=(reject)
if ((pypi_library_ready)); then
    receiver_names+=(standardwebhooks-pypi)
    receiver_commands+=("$library_dir/.venv/bin/python $library_dir/receiver.py")
    receiver_outcomes+=(accept)
fi
if ((npm_library_ready)); then
    receiver_names+=(standardwebhooks-npm standardwebhooks-npm-wrong-secret)
    receiver_commands+=("node $library_dir/receiver.js" "node $library_dir/receiver.js")
    receiver_outcomes+=(accept reject)
fi
receiver_count=${#receiver_names[@]}

read -r -a ports <<<"$(free_ports $((receiver_count + 1)))"
server_port=${ports[0]}
server_url="http://127.0.0.1:$server_port"
database_url="sqlite://$tmp_dir/x.db"

"$citapro_bin" serve --listen "127.0.0.1:$server_port" --database-url "$database_url" \
    --allow-http --allow-private-targets --retry-schedule 1s >"$tmp_dir/server.log" 2>&1 &
started_pids+=($!)
if wait_for_port "$server_port"; then
    pass "citapro-webhooks serve listens on $server_url"
else
    fail "citapro-webhooks serve did not listen on $server_url within ${wait_seconds}s (log below)"
    tail -n 20 "$tmp_dir/server.log" | sed 's/^/    /'
    exit 1
fi

business_id=$(random_uuid)
api_key=$("$citapro_bin" api-key create --business "$business_id" --database-url "$database_url" 2>>"$tmp_dir/admin.log" | head -n 1)
producer_token=$("$citapro_bin" producer-token create --name run-all --database-url "$database_url" 2>>"$tmp_dir/admin.log" | head -n 1)
if [[ -z "$api_key" || -z "$producer_token" ]]; then
    fail "api-key create or producer-token create printed no key (log below)"
    sed 's/^/    /' "$tmp_dir/admin.log"
    exit 1
fi

secrets=()
webhook_ids=()
for ((i = 0; i < receiver_count; i++)); do
    name=${receiver_names[i]}
    port=${ports[i + 1]}
    response=$(curl -sS --max-time 10 -X POST "$server_url/v1/webhooks" \
        -H "Authorization: Bearer $api_key" -H 'Content-Type: application/json' \
        --data-binary "{\"url\":\"http://127.0.0.1:$port/webhook\",\"events\":[\"booking.updated\"]}")
    secret=$(json_field secret <<<"$response" 2>/dev/null)
    if [[ ! "$secret" =~ ^[0-9a-f]{64}$ ]]; then
        fail "POST /v1/webhooks for $name returned no 64-character hex secret: $response"
        exit 1
    fi
    secrets+=("$secret")
    webhook_ids+=("$(json_field id <<<"$response")")
    receiver_secret=$secret
    if [[ ${receiver_outcomes[i]} == reject ]]; then
        receiver_secret=$(random_hex_secret)
    fi
    # The command strings contain only paths of this repository and the
    # temporary folder, so word splitting is safe here.
    # shellcheck disable=SC2086
    PORT=$port WEBHOOK_SECRET=$receiver_secret DEDUP_DIR="$tmp_dir/php-deliveries" \
        ${receiver_commands[i]} >"$tmp_dir/$name.log" 2>&1 &
    started_pids+=($!)
done
for ((i = 0; i < receiver_count; i++)); do
    if ! wait_for_port "${ports[i + 1]}"; then
        fail "receiver ${receiver_names[i]} did not listen on port ${ports[i + 1]} (log below)"
        tail -n 20 "$tmp_dir/${receiver_names[i]}.log" | sed 's/^/    /'
    fi
done

# The client note is the marker that every accepting receiver must print in
# its changes, with its non-ASCII letters and emoji intact.
client_note='Señora Peña pidió café ☕ y pastel 🎂'
aggregate_id=$(random_uuid)
event_body=$(
    cat <<EOF
{"event":"booking.updated","business_account_id":"$business_id","aggregate_id":"$aggregate_id",
 "occurred_on":"2026-03-05 14:30:00",
 "data":{"startTime":"2026-04-01 14:00:00","endTime":"2026-04-01 15:00:00","status":"confirmed",
   "internalNote":"Llamar antes / \"urgente\"","clientNote":"$client_note","payment_status":null,
   "isFromWeb":false,"isFromAgent":false,"isFromApi":true,"amount":75.0,
   "clientId":"550e8400-e29b-41d4-a716-446655440001","locationId":"550e8400-e29b-41d4-a716-446655440002",
   "serviceId":"550e8400-e29b-41d4-a716-446655440003","personId":null,"paymentId":null,
   "businessAccountId":"$business_id","notifyClient":true,"lastUpdatedBy":null,"repeatGroupId":null},
 "previous":{"startTime":"2026-04-01 14:00:00","endTime":"2026-04-01 15:00:00","status":"pending",
   "internalNote":null,"clientNote":null,"payment_status":null,"amount":50.0,
   "clientId":"550e8400-e29b-41d4-a716-446655440001","locationId":"550e8400-e29b-41d4-a716-446655440002",
   "serviceId":"550e8400-e29b-41d4-a716-446655440003","personId":null,"paymentId":null}}
EOF
)
event_response=$(curl -sS --max-time 10 -w '\n%{http_code}' -X POST "$server_url/v1/events" \
    -H "Authorization: Bearer $producer_token" -H 'Content-Type: application/json' \
    --data-binary "$event_body")
event_status=${event_response##*$'\n'}
event_response=${event_response%$'\n'*}
deliveries=$(json_field deliveries <<<"$event_response" 2>/dev/null)
if [[ "$event_status" == 202 && "$deliveries" == "$receiver_count" ]]; then
    pass "POST /v1/events accepted with $deliveries deliveries"
else
    fail "POST /v1/events returned $event_status $event_response, expected 202 with $receiver_count deliveries"
fi

uuid_pattern='[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}'
for ((i = 0; i < receiver_count; i++)); do
    name=${receiver_names[i]}
    log="$tmp_dir/$name.log"
    if [[ ${receiver_outcomes[i]} == accept ]]; then
        if [[ $name == standardwebhooks-* ]]; then
            pattern="^received booking\.updated delivery=$uuid_pattern verified by standardwebhooks"
        else
            pattern="^received booking\.updated delivery=$uuid_pattern changes=.*\"new\":\"$client_note\""
        fi
        if wait_for_lines "$log" "$pattern" 1 && ! grep -q '^rejected delivery=' "$log"; then
            pass "$name received and verified the live delivery"
        else
            fail "$name did not print the live delivery with its changes (log below)"
            tail -n 20 "$log" | sed 's/^/    /'
        fi
    else
        # With --retry-schedule 1s the server makes 2 attempts, and both must
        # carry the same delivery id.
        pattern="^rejected delivery=$uuid_pattern"
        if wait_for_lines "$log" "$pattern" 2 &&
            (($(grep -E -- "$pattern" "$log" | cut -d: -f1 | sort -u | wc -l) == 1)) &&
            ! grep -q '^received' "$log"; then
            pass "$name rejected both attempts of the live delivery, same delivery id"
        else
            fail "$name did not reject 2 attempts with one delivery id (log below)"
            tail -n 20 "$log" | sed 's/^/    /'
        fi
    fi
done

# Part 3: redelivery through the service. A redelivery carries the same
# delivery id, so each hand-written receiver must report a duplicate.

for ((i = 0; i < receiver_count; i++)); do
    name=${receiver_names[i]}
    if [[ ${receiver_outcomes[i]} != accept || $name == standardwebhooks-* ]]; then
        continue
    fi
    log="$tmp_dir/$name.log"
    deliveries_url="$server_url/v1/webhooks/${webhook_ids[i]}/deliveries"
    delivery_id=$(curl -sS --max-time 10 -H "Authorization: Bearer $api_key" "$deliveries_url" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])' 2>/dev/null)
    if ! grep -q "^received booking\.updated delivery=$delivery_id " "$log"; then
        fail "$name did not print the delivery id '$delivery_id' that the delivery history lists (log below)"
        tail -n 20 "$log" | sed 's/^/    /'
        continue
    fi
    status=$(curl -sS --max-time 10 -o /dev/null -w '%{http_code}' -X POST \
        -H "Authorization: Bearer $api_key" "$deliveries_url/$delivery_id/redeliver")
    if [[ $status == 202 ]] &&
        wait_for_lines "$log" "^duplicate delivery=$delivery_id" 1 &&
        (($(grep -c "^received booking\.updated delivery=$delivery_id " "$log") == 1)); then
        pass "$name reports the redelivery of $delivery_id as a duplicate"
    else
        fail "$name redelivery: POST .../redeliver returned $status, expected 202 and one duplicate line (log below)"
        tail -n 20 "$log" | sed 's/^/    /'
    fi
done

# Part 4: deduplication and rejection, sent straight to each hand-written
# receiver: the same signed request twice, then one with a wrong signature.

signature_of() {
    python3 -c 'import hashlib, hmac, sys; print(hmac.new(sys.argv[1].encode(), sys.stdin.buffer.read(), hashlib.sha256).hexdigest())' "$1"
}

post_delivery() {
    local port=$1 delivery_id=$2 signature=$3 body_file=$4
    curl -sS --max-time 10 -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$port/webhook" \
        -H 'Content-Type: application/json' -H 'X-CitaPro-Event: booking.updated' \
        -H "X-CitaPro-Delivery-Id: $delivery_id" -H "X-CitaPro-Timestamp: $(date +%s)" \
        -H "X-CitaPro-Signature: $signature" --data-binary "@$body_file"
}

replay_body="$tmp_dir/replay-body.json"
printf '%s' '{"event":"booking.updated","aggregate_id":"550e8400-e29b-41d4-a716-446655440000","occurred_on":"2026-03-05 14:30:00","data":{"clientNote":"Zoë 🎉","changes":{"clientNote":{"old":null,"new":"Zoë 🎉"}}}}' >"$replay_body"
for ((i = 0; i < receiver_count; i++)); do
    name=${receiver_names[i]}
    if [[ ${receiver_outcomes[i]} != accept || $name == standardwebhooks-* ]]; then
        continue
    fi
    port=${ports[i + 1]}
    log="$tmp_dir/$name.log"
    delivery_id=$(random_uuid)
    signature=$(signature_of "${secrets[i]}" <"$replay_body")
    first=$(post_delivery "$port" "$delivery_id" "$signature" "$replay_body")
    second=$(post_delivery "$port" "$delivery_id" "$signature" "$replay_body")
    if [[ $first == 204 && $second == 204 ]] &&
        wait_for_lines "$log" "^duplicate delivery=$delivery_id" 1 &&
        (($(grep -c "^received booking.updated delivery=$delivery_id" "$log") == 1)); then
        pass "$name processes a repeated delivery id once"
    else
        fail "$name deduplication: responded with $first then $second, expected 204 twice and one received line (log below)"
        tail -n 20 "$log" | sed 's/^/    /'
    fi

    tampered_signature=$(signature_of "${secrets[i]}x" <"$replay_body")
    status=$(post_delivery "$port" "$(random_uuid)" "$tampered_signature" "$replay_body")
    if [[ $status == 401 ]]; then
        pass "$name responds with 401 to a wrong signature"
    else
        fail "$name responded with $status to a wrong signature, expected 401"
    fi
done

# No secret may appear in the server's log.
leaked=0
for secret in "${secrets[@]}" "$api_key" "$producer_token"; do
    if grep -qF -- "$secret" "$tmp_dir/server.log"; then
        leaked=1
    fi
done
if ((leaked)); then
    fail "the server log contains a webhook secret, API key or producer token"
else
    pass "the server log contains no secret, API key or producer token"
fi
