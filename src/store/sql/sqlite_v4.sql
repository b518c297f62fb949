-- Every lookup of a delivery now names its webhook too, and purging walks
-- each webhook's deliveries through the primary key (webhook_id, id), so
-- the unique index on id alone is no longer read. Dropping it saves an
-- index insert for every new delivery.
DROP INDEX deliveries_by_id;
