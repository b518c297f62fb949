-- Deliveries are keyed by (webhook_id, id), and a delivery's created_at
-- becomes the time held in its UUID v7 id: the milliseconds of the id's
-- first 48 bits (12 hexadecimal digits), stored in microseconds like every
-- time. Ordering a webhook's deliveries by (created_at, id) is then the
-- order of the primary key, and the index by (webhook_id, created_at, id)
-- is no longer read. Each new delivery, and each update of its due time,
-- writes one index entry fewer. Times move by at most the wait between
-- accepting an event and storing its deliveries.
DROP INDEX deliveries_by_webhook;
UPDATE deliveries
SET created_at = ('x' || substr(id, 1, 8) || substr(id, 10, 4))::bit(48)::bigint * 1000
WHERE id ~ '^[0-9a-f]{8}-[0-9a-f]{4}-7';
ALTER TABLE deliveries DROP CONSTRAINT deliveries_pkey;
ALTER TABLE deliveries ADD PRIMARY KEY (webhook_id, id);
