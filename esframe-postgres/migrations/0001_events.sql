-- esframe event store, version 1. `{schema}` is replaced by the quoted schema name.
--
-- global_position = (id of the writing transaction << 16) + index of the event in its append.
-- Readers only return rows whose transaction is older than every transaction still running, so
-- a position, once passed, can never be filled in later (see ARCHITECTURE.md, "The global log").
CREATE TABLE {schema}.events (
    global_position BIGINT      NOT NULL,
    event_id        UUID        NOT NULL,
    stream_id       TEXT        NOT NULL,
    stream_version  BIGINT      NOT NULL,
    aggregate_type  TEXT        NOT NULL,
    event_type      TEXT        NOT NULL,
    schema_version  INTEGER     NOT NULL,
    payload         JSONB       NOT NULL,
    correlation_id  UUID,
    causation_id    UUID,
    metadata        JSONB       NOT NULL,
    recorded_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT events_pkey PRIMARY KEY (global_position),
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, stream_version),
    CONSTRAINT events_event_id_key UNIQUE (event_id),
    CONSTRAINT events_stream_version_check CHECK (stream_version > 0)
);

CREATE INDEX events_correlation_id_idx ON {schema}.events (correlation_id)
    WHERE correlation_id IS NOT NULL;

CREATE TABLE {schema}.snapshots (
    stream_id      TEXT        NOT NULL,
    aggregate_type TEXT        NOT NULL,
    version        BIGINT      NOT NULL,
    schema_version INTEGER     NOT NULL,
    state          JSONB       NOT NULL,
    taken_at       TIMESTAMPTZ NOT NULL,
    CONSTRAINT snapshots_pkey PRIMARY KEY (stream_id)
);
