-- esframe migration 6: process managers. `{schema}` is replaced by the quoted schema name.
--
-- One row per instance of a process manager, and one per scheduled timer. Both are written in
-- the process manager's transaction, with the events of its commands and its checkpoint.
CREATE TABLE {schema}.process_instances (
    process        TEXT        NOT NULL,
    instance_id    TEXT        NOT NULL,
    status         TEXT        NOT NULL,
    state          JSONB       NOT NULL,
    state_version  INTEGER     NOT NULL,
    -- Bumped by every write: the compare-and-set that keeps two writers apart.
    version        BIGINT      NOT NULL,
    correlation_id UUID        NOT NULL,
    -- Global positions of the events folded into `state` (to rebuild it), the last input
    -- handled, and the events held while quarantined.
    events         BIGINT[]    NOT NULL,
    last_position  BIGINT      NOT NULL,
    held           BIGINT[]    NOT NULL,
    error          TEXT,
    attempts       INTEGER     NOT NULL,
    ignored        BIGINT      NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL,
    CONSTRAINT process_instances_pkey PRIMARY KEY (process, instance_id),
    CONSTRAINT process_instances_status_check
        CHECK (status IN ('active', 'completed', 'quarantined', 'discarded'))
);

CREATE INDEX process_instances_quarantined_idx ON {schema}.process_instances (process, instance_id)
    WHERE status = 'quarantined';

CREATE TABLE {schema}.process_timers (
    process     TEXT        NOT NULL,
    instance_id TEXT        NOT NULL,
    name        TEXT        NOT NULL,
    due_at      TIMESTAMPTZ NOT NULL,
    payload     JSONB       NOT NULL,
    timer_id    UUID        NOT NULL,
    CONSTRAINT process_timers_pkey PRIMARY KEY (process, instance_id, name)
);

CREATE INDEX process_timers_due_idx ON {schema}.process_timers (process, due_at);
