#!/bin/sh
# Start the PHP receiver on PHP's built-in server, at HOST:PORT from the environment.
# WEBHOOK_SECRET (required) and DEDUP_DIR (optional) pass through to receiver.php.
exec php -S "${HOST:-127.0.0.1}:${PORT:-8000}" "$(dirname "$0")/receiver.php"
