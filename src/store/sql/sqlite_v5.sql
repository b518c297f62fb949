-- A delivery's created_at becomes the time stored in its UUID v7 id: the
-- milliseconds of the id's first 48 bits (12 hexadecimal digits), stored in
-- microseconds like every time. Ordering a webhook's deliveries by
-- (created_at, id) is then the order of the primary key (webhook_id, id),
-- and the index by (webhook_id, created_at, id) is no longer read. Dropping
-- it saves an index insert for every new delivery. Times move by at most
-- the wait between accepting an event and storing its deliveries.
DROP INDEX deliveries_by_webhook;
UPDATE deliveries SET created_at = 1000 * (
      ((instr('0123456789abcdef', substr(id, 1, 1)) - 1) << 44)
    + ((instr('0123456789abcdef', substr(id, 2, 1)) - 1) << 40)
    + ((instr('0123456789abcdef', substr(id, 3, 1)) - 1) << 36)
    + ((instr('0123456789abcdef', substr(id, 4, 1)) - 1) << 32)
    + ((instr('0123456789abcdef', substr(id, 5, 1)) - 1) << 28)
    + ((instr('0123456789abcdef', substr(id, 6, 1)) - 1) << 24)
    + ((instr('0123456789abcdef', substr(id, 7, 1)) - 1) << 20)
    + ((instr('0123456789abcdef', substr(id, 8, 1)) - 1) << 16)
    + ((instr('0123456789abcdef', substr(id, 10, 1)) - 1) << 12)
    + ((instr('0123456789abcdef', substr(id, 11, 1)) - 1) << 8)
    + ((instr('0123456789abcdef', substr(id, 12, 1)) - 1) << 4)
    + (instr('0123456789abcdef', substr(id, 13, 1)) - 1))
WHERE id GLOB '[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]-7*';
