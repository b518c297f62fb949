#!/usr/bin/env ruby
# frozen_string_literal: true

# A CitaPro webhook receiver that uses only Ruby's standard library.
#
# Serve:   PORT=8000 WEBHOOK_SECRET=<secret> ruby receiver.rb
# Check the published test vectors:
#          ruby receiver.rb verify [path/to/signature-test-vectors.json]
#
# The server accepts POST /webhook, verifies X-CitaPro-Signature over the raw
# body, responds with 204 to a valid delivery (also to a repeated delivery id)
# and with 401 to a missing or wrong signature. It prints one line per delivery.
#
# WEBrick left the standard library in Ruby 3.0, so this file speaks the small
# part of HTTP/1.1 that a webhook needs over a plain TCPServer: one request per
# connection, a Content-Length body, and no chunked transfer encoding.

require 'base64'
require 'io/wait'
require 'json'
require 'openssl'
require 'set'
require 'socket'

MAX_BODY_BYTES = 1024 * 1024
MAX_HEADER_BYTES = 16 * 1024
READ_TIMEOUT_SECONDS = 10
DEFAULT_VECTORS_PATH = File.expand_path('../../../docs/signature-test-vectors.json', __dir__)
STATUS_TEXT = {
  204 => 'No Content', 400 => 'Bad Request', 401 => 'Unauthorized', 404 => 'Not Found',
  405 => 'Method Not Allowed', 408 => 'Request Timeout', 411 => 'Length Required',
  413 => 'Content Too Large', 431 => 'Request Header Fields Too Large'
}.freeze

# Returns the X-CitaPro-Signature value for a body. The key is the secret
# string as given (64 hex characters), not the bytes that the hex digits would
# decode to.
def sign_body(secret, body)
  OpenSSL::HMAC.hexdigest('SHA256', secret, body)
end

def sign_standard(secret, delivery_id, timestamp, body)
  signed = "#{delivery_id}.#{timestamp}.".b + body.b
  "v1,#{Base64.strict_encode64(OpenSSL::HMAC.digest('SHA256', secret, signed))}"
end

# Compares the received signature with the expected one in constant time.
def signature_matches?(secret, body, header)
  return false if header.nil?

  expected = sign_body(secret, body)
  received = header.strip
  expected.bytesize == received.bytesize && OpenSSL.fixed_length_secure_compare(expected, received)
end

# An HTTP request error that ends the connection with a status code.
class RequestError < StandardError
  attr_reader :status

  def initialize(status, message)
    super(message)
    @status = status
  end
end

# Reads until the byte count is reached. Raises EOFError if the client closes
# the connection first, and RequestError after READ_TIMEOUT_SECONDS without
# data, so a stalled client cannot hold a thread forever.
def read_exactly(client, byte_count)
  data = +''.b
  while data.bytesize < byte_count
    raise RequestError.new(408, 'timed out reading the request') unless client.wait_readable(READ_TIMEOUT_SECONDS)

    chunk = client.read_nonblock(byte_count - data.bytesize, exception: false)
    raise EOFError, 'connection closed before the request was complete' if chunk.nil?
    next if chunk == :wait_readable

    data << chunk
  end
  data
end

# Reads the request line and headers. Returns the method, path and a hash of
# lowercase header names to values.
def read_head(client)
  head = +''.b
  until head.end_with?("\r\n\r\n")
    raise RequestError.new(431, 'request headers too large') if head.bytesize > MAX_HEADER_BYTES

    head << read_exactly(client, 1)
  end
  request_line, *header_lines = head.force_encoding(Encoding::UTF_8).split("\r\n")
  method, path, = request_line.to_s.split(' ', 3)
  headers = {}
  header_lines.each do |line|
    name, value = line.split(':', 2)
    headers[name.strip.downcase] = value.to_s.strip if value
  end
  [method, path, headers]
end

def write_response(client, status)
  client.write("HTTP/1.1 #{status} #{STATUS_TEXT.fetch(status)}\r\n" \
               "Content-Length: 0\r\nConnection: close\r\n\r\n")
end

# Receives one request and returns the response status.
def handle_request(client, secret, processed_ids, lock)
  method, path, headers = read_head(client)
  return 404 unless path == '/webhook'
  return 405 unless method == 'POST'
  if headers.fetch('transfer-encoding', '').downcase.include?('chunked') ||
     !headers['content-length']&.match?(/\A\d+\z/)
    raise RequestError.new(411, 'missing or invalid Content-Length')
  end

  length = headers['content-length'].to_i
  raise RequestError.new(413, "Content-Length #{length} exceeds #{MAX_BODY_BYTES} bytes") if length > MAX_BODY_BYTES

  # The raw bytes are what was signed. Parse them only after verifying.
  body = read_exactly(client, length)
  delivery_id = headers.fetch('x-citapro-delivery-id', '-')
  unless signature_matches?(secret, body, headers['x-citapro-signature'])
    puts "rejected delivery=#{delivery_id}: invalid X-CitaPro-Signature"
    return 401
  end
  begin
    payload = JSON.parse(body.force_encoding(Encoding::UTF_8))
  rescue JSON::ParserError => e
    puts "rejected delivery=#{delivery_id}: body is not valid JSON: #{e.message}"
    return 400
  end
  first_time = lock.synchronize { processed_ids.add?(delivery_id) }
  unless first_time
    puts "duplicate delivery=#{delivery_id}: already processed"
    return 204
  end

  changes = payload.is_a?(Hash) && payload['data'].is_a?(Hash) ? payload['data']['changes'] : nil
  changes_text = changes.nil? ? 'none' : JSON.generate(changes)
  puts "received #{payload['event']} delivery=#{delivery_id} changes=#{changes_text}"
  204
end

def serve
  secret = ENV.fetch('WEBHOOK_SECRET', '')
  if secret.empty?
    warn 'WEBHOOK_SECRET is missing: set it to the secret returned by POST /v1/webhooks'
    return 2
  end
  host = ENV.fetch('HOST', '127.0.0.1')
  port = Integer(ENV.fetch('PORT', '8000'))
  $stdout.sync = true
  # NOTE: the ids live in memory only, so they are forgotten on restart and the
  # set grows without bound. A production receiver stores them in its database
  # with a unique key and removes old ones after a few days.
  processed_ids = Set.new
  lock = Mutex.new
  server = TCPServer.new(host, port)
  puts "listening on http://#{host}:#{port}/webhook"
  loop do
    Thread.new(server.accept) do |client|
      status = begin
        handle_request(client, secret, processed_ids, lock)
      rescue RequestError => e
        puts "rejected request: #{e.message}"
        e.status
      end
      write_response(client, status)
    rescue IOError, SystemCallError => e
      warn "connection failed: #{e.class}: #{e.message}"
    ensure
      client.close
    end
  end
rescue Interrupt
  0
end

# Checks every published test vector and returns the process exit status.
def verify_vectors(path)
  cases = JSON.parse(File.read(path, encoding: 'UTF-8'))
  failed = 0
  cases.each do |test_case|
    body = test_case['body'].b
    secret = test_case['secret']
    signature = sign_body(secret, body)
    standard = sign_standard(secret, test_case['deliveryId'], test_case['timestamp'], body)
    if signature != test_case['signature']
      failed += 1
      puts "FAIL #{test_case['name']}: signature #{signature}, expected #{test_case['signature']}"
    elsif standard != test_case['standardSignature']
      failed += 1
      puts "FAIL #{test_case['name']}: standard signature #{standard}, expected #{test_case['standardSignature']}"
    elsif !signature_matches?(secret, body, test_case['signature'])
      failed += 1
      puts "FAIL #{test_case['name']}: signature_matches? rejects the expected signature"
    else
      puts "ok   #{test_case['name']}"
    end
  end
  puts "ruby: #{cases.size - failed} of #{cases.size} test vectors match"
  failed.positive? || cases.empty? ? 1 : 0
end

if ARGV.first == 'verify'
  exit verify_vectors(ARGV[1] || DEFAULT_VECTORS_PATH)
elsif ARGV.empty?
  exit serve
else
  warn 'usage: ruby receiver.rb [verify [VECTORS_JSON]]'
  exit 2
end
