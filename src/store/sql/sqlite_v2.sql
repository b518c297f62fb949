-- Purging finds old events by their id: event ids are UUID v7, whose text
-- sorts by creation time, so the primary key replaces the time index.
DROP INDEX events_by_time;

-- Deliveries are stored in (webhook_id, id) order, so the deliveries of
-- one webhook share pages. A recovery, a claim or a batch of outcomes then
-- touches a few pages per webhook instead of one page per delivery.
-- Deliveries are purged by id, like events, which replaces their time index.
CREATE TABLE deliveries_by_webhook_order (
    id TEXT NOT NULL,
    webhook_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    event TEXT NOT NULL,
    aggregate_id TEXT NOT NULL,
    status TEXT NOT NULL,
    attempt_count INTEGER NOT NULL DEFAULT 0,
    auto_attempts INTEGER NOT NULL DEFAULT 0,
    is_test INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    next_attempt_at INTEGER,
    due_at INTEGER,
    leased_by TEXT,
    last_attempt_at INTEGER,
    last_status_code INTEGER,
    PRIMARY KEY (webhook_id, id)
) WITHOUT ROWID;

INSERT INTO deliveries_by_webhook_order (id, webhook_id, event_id, event, aggregate_id,
    status, attempt_count, auto_attempts, is_test, created_at, next_attempt_at, due_at,
    leased_by, last_attempt_at, last_status_code)
SELECT id, webhook_id, event_id, event, aggregate_id, status, attempt_count, auto_attempts,
    is_test, created_at, next_attempt_at, due_at, leased_by, last_attempt_at, last_status_code
FROM deliveries;

DROP TABLE deliveries;
ALTER TABLE deliveries_by_webhook_order RENAME TO deliveries;

CREATE UNIQUE INDEX deliveries_by_id ON deliveries (id);
-- The claim skips the webhooks whose local queue is full. With the webhook
-- in the index, it does so without reading their rows.
CREATE INDEX deliveries_due ON deliveries (due_at, webhook_id) WHERE due_at IS NOT NULL;
CREATE INDEX deliveries_by_webhook ON deliveries (webhook_id, created_at, id);
CREATE INDEX deliveries_by_event ON deliveries (event_id);
