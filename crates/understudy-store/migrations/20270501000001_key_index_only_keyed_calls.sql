-- A key's spend in its budget period reads its calls since a time, and only
-- calls made with a key have one: with `auth = "none"` (or for calls that
-- came in before keys) every row held a NULL entry in this index, which cost
-- each write one more B-tree insert for a lookup that never finds them.
-- `key_id = ?` implies `key_id IS NOT NULL`, so both backends still use it.
DROP INDEX calls_key_created_at;
CREATE INDEX calls_keyed_created_at ON calls (key_id, created_at) WHERE key_id IS NOT NULL;
