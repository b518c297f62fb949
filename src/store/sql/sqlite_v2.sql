-- Purging finds old rows by their id: event and delivery ids are UUID v7,
-- whose text sorts by creation time, so the primary keys replace the
-- time indexes and every insert updates two fewer indexes.
DROP INDEX events_by_time;
DROP INDEX deliveries_by_time;

-- The claim skips the webhooks whose local queue is full. With the webhook
-- in the index it does so without reading their rows, which matters when
-- one webhook has a long run of due deliveries ahead of the others.
DROP INDEX deliveries_due;
CREATE INDEX deliveries_due ON deliveries (due_at, webhook_id) WHERE due_at IS NOT NULL;
