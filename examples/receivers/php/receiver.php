<?php
// A CitaPro webhook receiver that uses only PHP's standard library.
//
// Serve (router script of PHP's built-in server):
//     PORT=8000 WEBHOOK_SECRET=<secret> php -S 127.0.0.1:8000 receiver.php
// Check the published test vectors:
//     php receiver.php verify [path/to/signature-test-vectors.json]
//
// The server accepts POST /webhook, verifies X-CitaPro-Signature over the raw
// body, responds with 204 to a valid delivery (also to a repeated delivery id)
// and with 401 to a missing or wrong signature. It prints one line per delivery.
//
// PHP keeps no memory between requests, so this receiver records processed
// delivery ids as empty files in DEDUP_DIR (default: a folder under the
// system's temporary directory). A production receiver uses a database table
// with a unique key on the delivery id instead.

declare(strict_types=1);

const MAX_BODY_BYTES = 1024 * 1024;
const UUID_PATTERN = '/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/';

// The key is the secret string as given (64 hex characters), not the bytes
// that the hex digits would decode to.
function sign_body(string $secret, string $body): string
{
    return hash_hmac('sha256', $body, $secret);
}

function sign_standard(string $secret, string $deliveryId, string $timestamp, string $body): string
{
    $digest = hash_hmac('sha256', "{$deliveryId}.{$timestamp}.{$body}", $secret, true);
    return 'v1,' . base64_encode($digest);
}

// Compares the received signature with the expected one in constant time.
function signature_matches(string $secret, string $body, ?string $header): bool
{
    if ($header === null) {
        return false;
    }
    return hash_equals(sign_body($secret, $body), trim($header));
}

function print_line(string $line): void
{
    file_put_contents('php://stdout', $line . "\n");
}

function respond(int $status): void
{
    http_response_code($status);
    header('Content-Length: 0');
}

// Records a delivery id and returns false if it was already recorded.
// Opening with mode 'x' creates the file only if it does not exist, atomically,
// so two concurrent requests with the same id cannot both succeed.
function record_delivery(string $directory, string $deliveryId): bool
{
    if (!is_dir($directory) && !@mkdir($directory, 0700, true) && !is_dir($directory)) {
        throw new RuntimeException("cannot create the deduplication folder {$directory}");
    }
    $handle = @fopen($directory . '/' . $deliveryId, 'x');
    if ($handle === false) {
        return false;
    }
    fclose($handle);
    return true;
}

function handle_request(): void
{
    $secret = getenv('WEBHOOK_SECRET');
    if ($secret === false || $secret === '') {
        error_log('WEBHOOK_SECRET is missing: set it to the secret returned by POST /v1/webhooks');
        respond(500);
        return;
    }
    $path = parse_url($_SERVER['REQUEST_URI'] ?? '/', PHP_URL_PATH);
    if ($path !== '/webhook') {
        respond(404);
        return;
    }
    if ($_SERVER['REQUEST_METHOD'] !== 'POST') {
        header('Allow: POST');
        respond(405);
        return;
    }
    $contentLength = (int) ($_SERVER['CONTENT_LENGTH'] ?? 0);
    if ($contentLength > MAX_BODY_BYTES) {
        print_line("rejected request: Content-Length {$contentLength} exceeds " . MAX_BODY_BYTES . ' bytes');
        respond(413);
        return;
    }

    // The raw bytes are what was signed. Parse them only after verifying.
    $body = file_get_contents('php://input');
    $deliveryId = $_SERVER['HTTP_X_CITAPRO_DELIVERY_ID'] ?? '-';
    if (!signature_matches($secret, $body, $_SERVER['HTTP_X_CITAPRO_SIGNATURE'] ?? null)) {
        print_line("rejected delivery={$deliveryId}: invalid X-CitaPro-Signature");
        respond(401);
        return;
    }
    try {
        $payload = json_decode($body, true, 512, JSON_THROW_ON_ERROR);
    } catch (JsonException $error) {
        print_line("rejected delivery={$deliveryId}: body is not valid JSON: {$error->getMessage()}");
        respond(400);
        return;
    }
    // The id becomes a file name, so it must be a plain UUID.
    if (preg_match(UUID_PATTERN, $deliveryId) !== 1) {
        print_line("rejected delivery={$deliveryId}: X-CitaPro-Delivery-Id is not a UUID");
        respond(400);
        return;
    }
    $dedupDirectory = getenv('DEDUP_DIR') ?: sys_get_temp_dir() . '/citapro-webhook-deliveries';
    if (!record_delivery($dedupDirectory, $deliveryId)) {
        print_line("duplicate delivery={$deliveryId}: already processed");
        respond(204);
        return;
    }

    respond(204);
    $changes = $payload['data']['changes'] ?? null;
    $changesText = $changes === null
        ? 'none'
        : json_encode($changes, JSON_UNESCAPED_UNICODE | JSON_UNESCAPED_SLASHES | JSON_PRESERVE_ZERO_FRACTION);
    $event = $payload['event'] ?? '-';
    print_line("received {$event} delivery={$deliveryId} changes={$changesText}");
}

// Checks every published test vector and returns the process exit status.
function verify_vectors(string $path): int
{
    $cases = json_decode((string) file_get_contents($path), true, 512, JSON_THROW_ON_ERROR);
    $failed = 0;
    foreach ($cases as $case) {
        $body = $case['body'];
        $signature = sign_body($case['secret'], $body);
        $standard = sign_standard($case['secret'], $case['deliveryId'], (string) $case['timestamp'], $body);
        if ($signature !== $case['signature']) {
            $failed++;
            echo "FAIL {$case['name']}: signature {$signature}, expected {$case['signature']}\n";
        } elseif ($standard !== $case['standardSignature']) {
            $failed++;
            echo "FAIL {$case['name']}: standard signature {$standard}, expected {$case['standardSignature']}\n";
        } elseif (!signature_matches($case['secret'], $body, $case['signature'])) {
            $failed++;
            echo "FAIL {$case['name']}: signature_matches rejects the expected signature\n";
        } else {
            echo "ok   {$case['name']}\n";
        }
    }
    $total = count($cases);
    $matched = $total - $failed;
    echo "php: {$matched} of {$total} test vectors match\n";
    return ($failed > 0 || $total === 0) ? 1 : 0;
}

if (PHP_SAPI === 'cli-server') {
    handle_request();
    return true;
}

$arguments = array_slice($argv, 1);
if (($arguments[0] ?? null) === 'verify') {
    exit(verify_vectors($arguments[1] ?? __DIR__ . '/../../../docs/signature-test-vectors.json'));
}
fwrite(STDERR, "usage: php receiver.php verify [VECTORS_JSON]\n"
    . "   or: php -S 127.0.0.1:PORT receiver.php\n");
exit(2);
