-- Purging finds old rows by their id: event and delivery ids are UUID v7,
-- whose text sorts by creation time, so the primary keys replace the time
-- indexes. An update that changes `due_at` writes an entry in every index
-- of `deliveries`, so each index fewer also makes every attempt cheaper.
DROP INDEX events_by_time;
DROP INDEX deliveries_by_time;
