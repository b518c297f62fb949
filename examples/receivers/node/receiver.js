#!/usr/bin/env node
// A CitaPro webhook receiver that uses only Node's standard library.
//
// Serve:   PORT=8000 WEBHOOK_SECRET=<secret> node receiver.js
// Check the published test vectors:
//          node receiver.js verify [path/to/signature-test-vectors.json]
//
// The server accepts POST /webhook, verifies X-CitaPro-Signature over the raw
// body, responds with 204 to a valid delivery (also to a repeated delivery id)
// and with 401 to a missing or wrong signature. It prints one line per delivery.
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const http = require('node:http');
const path = require('node:path');

const MAX_BODY_BYTES = 1024 * 1024;
const DEFAULT_VECTORS_PATH = path.join(__dirname, '..', '..', '..', 'docs', 'signature-test-vectors.json');

// The key is the UTF-8 encoding of the secret string as given (64 hex
// characters), not the bytes that the hex digits would decode to.
function signBody(secret, body) {
  return crypto.createHmac('sha256', Buffer.from(secret, 'utf8')).update(body).digest('hex');
}

function signStandard(secret, deliveryId, timestamp, body) {
  const digest = crypto
    .createHmac('sha256', Buffer.from(secret, 'utf8'))
    .update(`${deliveryId}.${timestamp}.`, 'utf8')
    .update(body)
    .digest('base64');
  return `v1,${digest}`;
}

// Compares the received signature with the expected one in constant time.
// timingSafeEqual throws on buffers of different lengths, and the length of a
// signature is no secret, so it is checked first.
function signatureMatches(secret, body, header) {
  if (typeof header !== 'string') {
    return false;
  }
  const expected = Buffer.from(signBody(secret, body), 'utf8');
  const received = Buffer.from(header.trim(), 'utf8');
  return expected.length === received.length && crypto.timingSafeEqual(expected, received);
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
  const port = Number(process.env.PORT || 8000);
  const host = process.env.HOST || '127.0.0.1';
  // NOTE: the ids live in memory only, so they are forgotten on restart and the
  // set grows without bound. A production receiver stores them in its database
  // with a unique key and removes old ones after a few days.
  const processedDeliveryIds = new Set();

  const server = http.createServer((request, response) => {
    if (request.url !== '/webhook') {
      respond(response, 404);
      return;
    }
    if (request.method !== 'POST') {
      response.setHeader('Allow', 'POST');
      respond(response, 405);
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
      const deliveryId = request.headers['x-citapro-delivery-id'] || '-';
      if (received > MAX_BODY_BYTES) {
        console.log(`rejected delivery=${deliveryId}: body of ${received} bytes exceeds ${MAX_BODY_BYTES}`);
        respond(response, 413);
        return;
      }
      // The raw bytes are what was signed. Parse them only after verifying.
      const body = Buffer.concat(chunks);
      if (!signatureMatches(secret, body, request.headers['x-citapro-signature'])) {
        console.log(`rejected delivery=${deliveryId}: invalid X-CitaPro-Signature`);
        respond(response, 401);
        return;
      }
      let payload;
      try {
        payload = JSON.parse(body.toString('utf8'));
      } catch (error) {
        console.log(`rejected delivery=${deliveryId}: body is not valid JSON: ${error.message}`);
        respond(response, 400);
        return;
      }
      if (processedDeliveryIds.has(deliveryId)) {
        console.log(`duplicate delivery=${deliveryId}: already processed`);
        respond(response, 204);
        return;
      }
      processedDeliveryIds.add(deliveryId);

      // Respond first, so the sender's 10 s timeout never runs out while the
      // work runs. A real receiver queues the payload here.
      respond(response, 204);
      const changes = payload.data && payload.data.changes;
      const changesText = changes === undefined ? 'none' : JSON.stringify(changes);
      console.log(`received ${payload.event} delivery=${deliveryId} changes=${changesText}`);
    });
  });
  server.listen(port, host, () => {
    console.log(`listening on http://${host}:${port}/webhook`);
  });
  return undefined;
}

// Checks every published test vector and returns the process exit status.
function verifyVectors(vectorsPath) {
  const cases = JSON.parse(fs.readFileSync(vectorsPath, 'utf8'));
  let failed = 0;
  for (const testCase of cases) {
    const body = Buffer.from(testCase.body, 'utf8');
    const signature = signBody(testCase.secret, body);
    const standard = signStandard(testCase.secret, testCase.deliveryId, testCase.timestamp, body);
    if (signature !== testCase.signature) {
      failed += 1;
      console.log(`FAIL ${testCase.name}: signature ${signature}, expected ${testCase.signature}`);
    } else if (standard !== testCase.standardSignature) {
      failed += 1;
      console.log(`FAIL ${testCase.name}: standard signature ${standard}, expected ${testCase.standardSignature}`);
    } else if (!signatureMatches(testCase.secret, body, testCase.signature)) {
      failed += 1;
      console.log(`FAIL ${testCase.name}: signatureMatches rejects the expected signature`);
    } else {
      console.log(`ok   ${testCase.name}`);
    }
  }
  console.log(`node: ${cases.length - failed} of ${cases.length} test vectors match`);
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
