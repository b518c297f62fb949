-- A delivery's created_at becomes the time in its UUID v7 id, as in SQLite:
-- the milliseconds of the id's first 48 bits (12 hexadecimal digits), in
-- microseconds. Ordering a webhook's deliveries by (created_at, id) is then
-- the order of the new primary key (webhook_id, id), which replaces both the
-- key on id alone and the index by (webhook_id, created_at, id). Every
-- delivery written and every attempt recorded then updates one index fewer.
-- Times move by at most the wait between accepting an event and storing its
-- deliveries.
UPDATE deliveries
SET created_at = ('x' || lpad(substr(id, 1, 8) || substr(id, 10, 4), 16, '0'))::bit(64)::bigint
    * 1000
WHERE id ~ '^[0-9a-f]{8}-[0-9a-f]{4}-7';
ALTER TABLE deliveries DROP CONSTRAINT deliveries_pkey;
DROP INDEX deliveries_by_webhook;
-- webhooks.id has the "C" collation, and a join on webhook_id = webhooks.id
-- compares in it. The key serves such joins only in that same collation.
ALTER TABLE deliveries ALTER COLUMN webhook_id TYPE TEXT COLLATE "C";
ALTER TABLE deliveries ADD PRIMARY KEY (webhook_id, id);
