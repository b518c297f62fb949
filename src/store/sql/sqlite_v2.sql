-- Purging finds old rows by their id: event and delivery ids are UUID v7,
-- whose text sorts by creation time, so the primary keys replace the
-- time indexes and every insert updates two fewer indexes.
DROP INDEX events_by_time;
DROP INDEX deliveries_by_time;
