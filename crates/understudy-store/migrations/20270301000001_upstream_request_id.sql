-- The upstream's id for a call (its `x-request-id` answer header), to trace
-- a call with the provider. NULL for calls no HTTP upstream answered and for
-- calls recorded before the column existed.
ALTER TABLE calls ADD COLUMN upstream_request_id TEXT;
