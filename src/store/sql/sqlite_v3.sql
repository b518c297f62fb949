-- The due index is ordered by webhook first. A claim walks it one webhook
-- at a time. One seek finds the next webhook and its earliest due time,
-- and a webhook whose local queue is full is passed over after reading
-- only its first entry. Ordered by time first, a claim had to read every
-- due entry of the full webhooks on its way to the others.
DROP INDEX deliveries_due;
CREATE INDEX deliveries_due ON deliveries (webhook_id, due_at) WHERE due_at IS NOT NULL;
