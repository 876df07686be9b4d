-- esframe event store, version 5. `{schema}` is replaced by the quoted schema name.
--
-- Streams are namespaced by aggregate type: a stream is (aggregate_type, aggregate_id), so an
-- `order` "42" and an `inventory` "42" are two streams. Earlier versions keyed streams by the id
-- alone; their rows keep their id as `aggregate_id` and their aggregate type, so every stream
-- reads back unchanged. A stream that holds events of two aggregate types cannot be split
-- without renumbering its versions: the migration refuses it and changes nothing.
DO $$
DECLARE
    mixed TEXT;
BEGIN
    SELECT stream_id INTO mixed
    FROM {schema}.events
    GROUP BY stream_id
    HAVING count(DISTINCT aggregate_type) > 1
    LIMIT 1;
    IF mixed IS NOT NULL THEN
        RAISE EXCEPTION 'esframe migration 5 (namespaced streams): stream % holds events of more than one aggregate type; give each aggregate type its own stream ids, then migrate again (nothing was changed)',
            quote_literal(mixed);
    END IF;
END
$$;

ALTER TABLE {schema}.events RENAME COLUMN stream_id TO aggregate_id;
ALTER TABLE {schema}.events
    DROP CONSTRAINT events_stream_version_key,
    ADD CONSTRAINT events_stream_version_key UNIQUE (aggregate_type, aggregate_id, stream_version);

ALTER TABLE {schema}.snapshots RENAME COLUMN stream_id TO aggregate_id;
ALTER TABLE {schema}.snapshots
    DROP CONSTRAINT snapshots_pkey,
    ADD CONSTRAINT snapshots_pkey PRIMARY KEY (aggregate_type, aggregate_id);

-- Dead letters name their stream by both parts too; the event they park tells the type.
ALTER TABLE {schema}.projection_dead_letters RENAME COLUMN stream_id TO aggregate_id;
ALTER TABLE {schema}.projection_dead_letters ADD COLUMN aggregate_type TEXT;
UPDATE {schema}.projection_dead_letters dl
SET aggregate_type = e.aggregate_type
FROM {schema}.events e
WHERE e.event_id = dl.event_id;
ALTER TABLE {schema}.projection_dead_letters ALTER COLUMN aggregate_type SET NOT NULL;
