-- The PostgreSQL schema, with the tables and columns of the SQLite one.
-- Instants are BIGINT microseconds since the Unix epoch; ids are UUID text.
-- Ids that pages are ordered by use the "C" collation, so they sort byte by
-- byte as in SQLite, whatever the database's default collation is.

CREATE TABLE api_keys (
    key_hash TEXT PRIMARY KEY,
    business_id TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE producer_tokens (
    token_hash TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE webhooks (
    id TEXT COLLATE "C" PRIMARY KEY,
    business_id TEXT NOT NULL,
    url TEXT NOT NULL,
    events TEXT NOT NULL,
    is_active BOOLEAN NOT NULL,
    secret TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX webhooks_by_business ON webhooks (business_id, created_at);

CREATE TABLE events (
    id TEXT PRIMARY KEY,
    business_id TEXT NOT NULL,
    event TEXT NOT NULL,
    aggregate_id TEXT NOT NULL,
    payload BYTEA NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX events_by_time ON events (created_at);

CREATE TABLE aggregate_states (
    business_id TEXT NOT NULL,
    entity TEXT NOT NULL,
    aggregate_id TEXT NOT NULL,
    state TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (business_id, entity, aggregate_id)
);

CREATE TABLE deliveries (
    id TEXT COLLATE "C" PRIMARY KEY,
    webhook_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    event TEXT NOT NULL,
    aggregate_id TEXT NOT NULL,
    status TEXT NOT NULL,
    attempt_count BIGINT NOT NULL DEFAULT 0,
    auto_attempts BIGINT NOT NULL DEFAULT 0,
    is_test BOOLEAN NOT NULL DEFAULT FALSE,
    created_at BIGINT NOT NULL,
    next_attempt_at BIGINT,
    due_at BIGINT,
    leased_by TEXT,
    last_attempt_at BIGINT,
    last_status_code INTEGER
);
CREATE INDEX deliveries_due ON deliveries (due_at) WHERE due_at IS NOT NULL;
CREATE INDEX deliveries_by_webhook ON deliveries (webhook_id, created_at, id);
CREATE INDEX deliveries_by_event ON deliveries (event_id);
CREATE INDEX deliveries_by_time ON deliveries (created_at);

CREATE TABLE attempts (
    delivery_id TEXT NOT NULL,
    number BIGINT NOT NULL,
    trigger TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    duration_ms BIGINT NOT NULL,
    status_code INTEGER,
    error_kind TEXT,
    response_body TEXT,
    PRIMARY KEY (delivery_id, number)
);
