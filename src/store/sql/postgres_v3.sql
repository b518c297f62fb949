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

-- The other keys of the tables written for every event get the "C"
-- collation too. Their values are UUIDs and fixed names, which need no
-- language rules, and comparing bytes costs less than the database's
-- default collation in every index insert and lookup. Each ALTER rebuilds
-- the indexes on its column, but not the table.
ALTER TABLE events ALTER COLUMN id TYPE TEXT COLLATE "C";
ALTER TABLE deliveries ALTER COLUMN event_id TYPE TEXT COLLATE "C";
ALTER TABLE attempts ALTER COLUMN delivery_id TYPE TEXT COLLATE "C";
ALTER TABLE aggregate_states
    ALTER COLUMN business_id TYPE TEXT COLLATE "C",
    ALTER COLUMN entity TYPE TEXT COLLATE "C",
    ALTER COLUMN aggregate_id TYPE TEXT COLLATE "C";
