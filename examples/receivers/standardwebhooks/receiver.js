#!/usr/bin/env node
// A receiver that verifies webhook-signature with the standardwebhooks package from npm.
//
// Install: npm install --no-package-lock
// Serve:   PORT=8000 WEBHOOK_SECRET=<secret> node receiver.js
// Check the published test vectors with the package's signer:
//          node receiver.js verify [path/to/signature-test-vectors.json]
//
// WEBHOOK_SECRET is the 64-character secret as returned by POST /v1/webhooks.
// The package expects "whsec_" followed by the base64 of the key bytes, and
// the key bytes are the UTF-8 bytes of that secret string.
'use strict';

const fs = require('node:fs');
const http = require('node:http');
const path = require('node:path');
const { Webhook, WebhookVerificationError } = require('standardwebhooks');

const MAX_BODY_BYTES = 1024 * 1024;
const DEFAULT_VECTORS_PATH = path.join(__dirname, '..', '..', '..', 'docs', 'signature-test-vectors.json');
const LIBRARY = `standardwebhooks ${require('standardwebhooks/package.json').version} (npm)`;

function standardSecret(secret) {
  return `whsec_${Buffer.from(secret, 'utf8').toString('base64')}`;
}

function respond(response, status) {
  response.writeHead(status, { 'Content-Length': '0' });
  response.end();
}

function serve() {
  const secret = process.env.WEBHOOK_SECRET;
  if (!secret) {
    console.error('WEBHOOK_SECRET is missing: set it to the secret returned by POST /v1/webhooks');
    return 2;
  }
  const host = process.env.HOST || '127.0.0.1';
  const port = Number(process.env.PORT || 8000);
  const webhook = new Webhook(standardSecret(secret));

  const server = http.createServer((request, response) => {
    if (request.url !== '/webhook' || request.method !== 'POST') {
      respond(response, 404);
      return;
    }
    const chunks = [];
    let received = 0;
    request.on('data', (chunk) => {
      received += chunk.length;
      if (received <= MAX_BODY_BYTES) {
        chunks.push(chunk);
      }
    });
    request.on('end', () => {
      const deliveryId = request.headers['webhook-id'] || '-';
      if (received > MAX_BODY_BYTES) {
        console.log(`rejected delivery=${deliveryId}: body of ${received} bytes exceeds ${MAX_BODY_BYTES}`);
        respond(response, 413);
        return;
      }
      const body = Buffer.concat(chunks);
      let payload;
      try {
        // verify() also rejects a webhook-timestamp more than 5 minutes away
        // from this machine's clock.
        payload = webhook.verify(body, request.headers);
      } catch (error) {
        if (!(error instanceof WebhookVerificationError)) {
          throw error;
        }
        console.log(`rejected delivery=${deliveryId}: ${LIBRARY}: ${error.message}`);
        respond(response, 401);
        return;
      }
      respond(response, 204);
      console.log(`received ${payload.event} delivery=${deliveryId} verified by ${LIBRARY}`);
    });
  });
  server.listen(port, host, () => {
    console.log(`listening on http://${host}:${port}/webhook`);
  });
  return undefined;
}

// Signs every test vector with the package and compares with standardSignature.
// verify() would reject these fixed, old timestamps, so this checks sign()
// with the same key conversion that the server uses.
function verifyVectors(vectorsPath) {
  const cases = JSON.parse(fs.readFileSync(vectorsPath, 'utf8'));
  let failed = 0;
  for (const testCase of cases) {
    const webhook = new Webhook(standardSecret(testCase.secret));
    const timestamp = new Date(testCase.timestamp * 1000);
    const body = Buffer.from(testCase.body, 'utf8');
    const signature = webhook.sign(testCase.deliveryId, timestamp, body);
    if (signature === testCase.standardSignature) {
      console.log(`ok   ${testCase.name}`);
    } else {
      failed += 1;
      console.log(`FAIL ${testCase.name}: ${signature}, expected ${testCase.standardSignature}`);
    }
  }
  console.log(`${LIBRARY}: ${cases.length - failed} of ${cases.length} test vectors match`);
  return failed > 0 || cases.length === 0 ? 1 : 0;
}

function main(args) {
  if (args[0] === 'verify') {
    return verifyVectors(args[1] || DEFAULT_VECTORS_PATH);
  }
  if (args.length > 0) {
    console.error('usage: node receiver.js [verify [VECTORS_JSON]]');
    return 2;
  }
  return serve();
}

const status = main(process.argv.slice(2));
if (status !== undefined) {
  process.exitCode = status;
}
