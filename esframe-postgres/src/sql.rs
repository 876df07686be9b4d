//! The SQL text of every statement, built once per schema.
//!
//! The schema name is the only formatted part (validated by [`SchemaName`]); values are always
//! bound parameters.

use std::sync::Arc;

use crate::SchemaName;

/// Bits of `global_position` below the transaction id: at most 2^16 events per append, the
/// contract's limit.
pub(crate) const POSITION_SHIFT: u32 = 16;

const _: () = assert!(esframe_core::limits::MAX_EVENTS_PER_APPEND == 1 << POSITION_SHIFT);

/// Columns of a stored event, in the order [`crate::rows`] reads them.
pub(crate) const EVENT_COLUMNS: &str = "global_position, event_id, aggregate_id, stream_version, aggregate_type, \
     event_type, schema_version, payload, correlation_id, causation_id, metadata, recorded_at";

/// The exclusive upper bound of readable positions: every transaction with a smaller id has
/// finished, so no row below it can still appear.
pub(crate) const HORIZON: &str = "(pg_snapshot_xmin(pg_current_snapshot())::text::bigint << 16)";

/// The statements. Those of one stream name it by `$1 aggregate_type, $2 aggregate_id`; the
/// appends keep their own order (see [`append_sql`]).
#[derive(Debug)]
pub(crate) struct Queries {
    /// The plain append: one `INSERT ... SELECT` returning a row per stored event, none when the
    /// expectation does not hold. Parameters $1 to $11 as in [`append_sql`].
    pub(crate) append: Arc<str>,
    /// The plain append of exactly one event, with scalar parameters instead of arrays (the
    /// common case of a command emitting one event: no array to build, send and unnest).
    /// Parameters $1 to $11 as in [`append_sql`], each a single value.
    pub(crate) append_one: Arc<str>,
    pub(crate) append_with_snapshot: Arc<str>,
    /// The append with an in-transaction `NOTIFY`, for appends inside the caller's transaction
    /// (whose commit the store cannot see).
    pub(crate) append_notify: Arc<str>,
    pub(crate) find_event_ids: Arc<str>,
    pub(crate) read_stream: Arc<str>,
    /// The columns of a stream a state load reads (`rows::StateRows` from column 0).
    pub(crate) read_stream_for_state: Arc<str>,
    /// A snapshot row (part 0) and the state columns of the events from its version on
    /// (part 1, `rows::StateRows` from column 1), in one statement. No outer `ORDER BY`, which
    /// would sort every row: the reader tells the parts apart by the first column and puts the
    /// events in version order if they do not arrive in it.
    pub(crate) load_snapshot_and_stream: Arc<str>,
    pub(crate) stream_version: Arc<str>,
    pub(crate) read_all: Arc<str>,
    pub(crate) readiness: Arc<str>,
    pub(crate) count_after: Arc<str>,
    /// For an append that updates an inline projection: takes its lease lock shared (if no
    /// rebuild holds it) and tells whether a rebuild of it was left unfinished.
    pub(crate) inline_guard: Arc<str>,
    /// Reads an inline projection's checkpoint row again, once its lock is held.
    pub(crate) inline_recheck: Arc<str>,
    /// Records an inline projection's version in its checkpoint row if it has none.
    pub(crate) register_inline: Arc<str>,
    /// Creates an inline projection's lease row (free), which appends lock `FOR SHARE`.
    pub(crate) register_inline_lease: Arc<str>,
    pub(crate) head: Arc<str>,
    pub(crate) save_snapshot: Arc<str>,
    pub(crate) load_snapshot: Arc<str>,
    pub(crate) delete_snapshot: Arc<str>,
    /// Counts one partition's events after `$1`: `$2` its buckets.
    pub(crate) count_partition_after: Arc<str>,
    /// The reads of one partition, by its number of buckets ([`read_partition_sql`]).
    partition_reads: std::sync::Mutex<std::collections::HashMap<usize, Arc<str>>>,
    schema: String,
}

impl Queries {
    pub(crate) fn new(schema: &SchemaName) -> Self {
        let s = schema.quoted();
        Self {
            append: format!(
                "INSERT INTO {s}.events (global_position, event_id, aggregate_id, stream_version,
                     aggregate_type, event_type, schema_version, payload, correlation_id,
                     causation_id, metadata)
                 SELECT (pg_current_xact_id()::text::bigint << {POSITION_SHIFT}) + e.ord - 1,
                        e.event_id, $1, cur.v + e.ord, $3::text, e.event_type,
                        e.schema_version, e.payload, e.correlation_id, e.causation_id, e.metadata
                 FROM (SELECT coalesce(max(stream_version), 0) AS v
                       FROM {s}.events WHERE aggregate_type = $3 AND aggregate_id = $1) cur,
                      unnest($2::uuid[], $4::text[], $5::int4[], $6::jsonb[],
                             $7::uuid[], $8::uuid[], $9::jsonb[])
                      WITH ORDINALITY AS e(event_id, event_type, schema_version,
                                           payload, correlation_id, causation_id, metadata, ord)
                 WHERE CASE $10::int4
                     WHEN 0 THEN true
                     WHEN 1 THEN cur.v = 0
                     WHEN 2 THEN cur.v > 0
                     ELSE cur.v = $11::int8 END
                 RETURNING global_position, stream_version, recorded_at"
            )
            .into(),
            append_one: format!(
                "INSERT INTO {s}.events (global_position, event_id, aggregate_id, stream_version,
                     aggregate_type, event_type, schema_version, payload, correlation_id,
                     causation_id, metadata)
                 SELECT pg_current_xact_id()::text::bigint << {POSITION_SHIFT},
                        $2::uuid, $1, cur.v + 1, $3::text, $4::text, $5::int4, $6::jsonb,
                        $7::uuid, $8::uuid, $9::jsonb
                 FROM (SELECT coalesce(max(stream_version), 0) AS v
                       FROM {s}.events WHERE aggregate_type = $3 AND aggregate_id = $1) cur
                 WHERE CASE $10::int4
                     WHEN 0 THEN true
                     WHEN 1 THEN cur.v = 0
                     WHEN 2 THEN cur.v > 0
                     ELSE cur.v = $11::int8 END
                 RETURNING global_position, stream_version, recorded_at"
            )
            .into(),
            append_with_snapshot: append_sql(&s, false, true).into(),
            append_notify: append_sql(&s, true, false).into(),
            find_event_ids: format!(
                "SELECT {EVENT_COLUMNS} FROM {s}.events WHERE event_id = ANY($1::uuid[])"
            )
            .into(),
            read_stream: format!(
                "SELECT {EVENT_COLUMNS} FROM {s}.events
                 WHERE aggregate_type = $1 AND aggregate_id = $2 AND stream_version >= $3
                 ORDER BY stream_version"
            )
            .into(),
            read_stream_for_state: format!(
                "SELECT stream_version, event_type, schema_version, payload
                 FROM {s}.events
                 WHERE aggregate_type = $1 AND aggregate_id = $2 AND stream_version >= $3
                 ORDER BY stream_version"
            )
            .into(),
            load_snapshot_and_stream: format!(
                "WITH snap AS (
                     SELECT version, schema_version, state, taken_at
                     FROM {s}.snapshots WHERE aggregate_type = $1 AND aggregate_id = $2
                 )
                 SELECT 0 AS part, version, NULL::text, schema_version, state, taken_at
                 FROM snap
                 UNION ALL
                 (SELECT 1, stream_version, event_type, schema_version, payload,
                         NULL::timestamptz
                  FROM {s}.events
                  WHERE aggregate_type = $1 AND aggregate_id = $2
                    AND stream_version >= coalesce((SELECT version FROM snap), 1)
                  ORDER BY stream_version)"
            )
            .into(),
            stream_version: format!(
                "SELECT max(stream_version) FROM {s}.events
                 WHERE aggregate_type = $1 AND aggregate_id = $2"
            )
            .into(),
            read_all: format!(
                "SELECT {EVENT_COLUMNS} FROM {s}.events
                 WHERE global_position > $1 AND global_position < {HORIZON}
                 ORDER BY global_position LIMIT $2"
            )
            .into(),
            readiness: format!(
                "SELECT EXISTS (SELECT 1 FROM {s}.events
                                WHERE global_position > $1 AND global_position < h.horizon) AS ready,
                        (SELECT max(global_position) FROM {s}.events) AS head,
                        h.horizon
                 FROM (SELECT {HORIZON} AS horizon) h"
            )
            .into(),
            head: format!("SELECT max(global_position) FROM {s}.events").into(),
            // The lease row is read `FOR SHARE`, which sees its latest committed version (not
            // the statement's snapshot) and holds a takeover back until the append ends; the
            // row exists from the projection's registration on.
            inline_guard: format!(
                "SELECT pg_try_advisory_xact_lock_shared(hashtextextended($1, 0))
                            AND NOT coalesce((SELECT l.holder IS NOT NULL AND l.expires_at > now()
                                              FROM {s}.projection_leases l
                                              WHERE l.projection = $2 AND l.partition = $3
                                              FOR SHARE), false) AS free,
                        cp.replay_until IS NOT NULL AS unfinished, cp.version
                 FROM (SELECT 1) one
                 LEFT JOIN {s}.projection_checkpoints cp
                        ON cp.projection = $2 AND cp.partition = $3"
            )
            .into(),
            register_inline_lease: format!(
                "INSERT INTO {s}.projection_leases (projection, partition, holder, token, expires_at)
                 VALUES ($1, $2, NULL, 0, now())
                 ON CONFLICT (projection, partition) DO NOTHING"
            )
            .into(),
            inline_recheck: format!(
                "SELECT replay_until IS NOT NULL AS unfinished, version
                 FROM {s}.projection_checkpoints WHERE projection = $1 AND partition = $2"
            )
            .into(),
            register_inline: format!(
                "INSERT INTO {s}.projection_checkpoints (projection, partition, version, position)
                 SELECT $1, $2, $3, coalesce(max(global_position), 0) FROM {s}.events
                 ON CONFLICT (projection, partition) DO NOTHING"
            )
            .into(),
            count_after: format!("SELECT count(*) FROM {s}.events WHERE global_position > $1")
                .into(),
            save_snapshot: format!(
                "INSERT INTO {s}.snapshots AS old
                     (aggregate_type, aggregate_id, version, schema_version, state, taken_at)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET
                     version = excluded.version, schema_version = excluded.schema_version,
                     state = excluded.state, taken_at = excluded.taken_at
                 WHERE old.version <= excluded.version"
            )
            .into(),
            load_snapshot: format!(
                "SELECT version, schema_version, state, taken_at
                 FROM {s}.snapshots WHERE aggregate_type = $1 AND aggregate_id = $2"
            )
            .into(),
            delete_snapshot: format!(
                "DELETE FROM {s}.snapshots
                 WHERE aggregate_type = $1 AND aggregate_id = $2 AND version = $3"
            )
            .into(),
            count_partition_after: format!(
                "SELECT count(*) FROM {s}.events
                 WHERE stream_bucket = ANY($2::int2[]) AND global_position > $1"
            )
            .into(),
            partition_reads: std::sync::Mutex::default(),
            schema: s,
        }
    }

    /// The read of a partition of `buckets` buckets ([`read_partition_sql`]), built once.
    pub(crate) fn read_partition(&self, buckets: usize) -> Arc<str> {
        let mut reads = self
            .partition_reads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(
            reads
                .entry(buckets)
                .or_insert_with(|| read_partition_sql(&self.schema, buckets).into()),
        )
    }
}

/// The read of one partition of the log: at most `$2` events after `$1` below the horizon, of
/// the buckets `$3, $4, ...` (`buckets` of them). One index scan per bucket on
/// `(stream_bucket, global_position)`, each in position order, merged by the planner (Merge
/// Append, which pulls from each scan only as far as the limit needs) so that only the rows
/// returned, plus one per bucket, are read. Each scan carries the limit too: without it the
/// planner prefers bitmap scans that read each bucket to its end (see
/// `PgEventStore::load_partition_rows`).
///
/// The horizon is applied above the scans, not in them. Inside, `global_position > $1 AND
/// global_position < h.horizon` is a range with an unknown end, which the planner prices at a
/// fixed 0.5% of the bucket: on that guess a custom plan (a connection's first five
/// executions, or all of them when the generic plan looks dearer) takes a bitmap scan and a
/// sort of every row of each bucket after `$1`, 10 ms and more per read during a catch-up.
/// Filtering after each scan's limit is the same read: the horizon only cuts a suffix of each
/// scan, which is in position order.
///
/// Columns: `EVENT_COLUMNS`, then the horizon; with no event, one row of NULLs and the horizon,
/// so that the reader knows how far it has looked.
fn read_partition_sql(s: &str, buckets: usize) -> String {
    let branches: Vec<String> = (0..buckets)
        .map(|i| {
            format!(
                "(SELECT {EVENT_COLUMNS} FROM {s}.events
                  WHERE stream_bucket = ${}::int2 AND global_position > $1
                  ORDER BY global_position LIMIT $2)",
                i + 3
            )
        })
        .collect();
    format!(
        "WITH h AS MATERIALIZED (SELECT {HORIZON} AS horizon)
         SELECT e.*, h.horizon FROM h
         LEFT JOIN LATERAL (
             SELECT * FROM ({}) AS u WHERE u.global_position < h.horizon
             ORDER BY global_position LIMIT $2
         ) AS e ON true",
        branches.join(" UNION ALL ")
    )
}

/// One statement that checks the expected version, inserts every event with one
/// `INSERT ... SELECT FROM unnest(...)`, and optionally stores a snapshot and notifies listeners
/// at commit. A reused event id fails on the `event_id` unique constraint; the store then looks
/// the ids up (the idempotency path), so the common case pays no extra lookup.
///
/// Parameters: $1 aggregate id and $3 aggregate type (the stream), $2 event ids,
/// $4 event types, $5 schema versions, $6 payloads, $7 correlation ids, $8 causation ids,
/// $9 metadata, $10 expectation kind (0 any, 1 no stream, 2 stream exists, 3 exact), $11 exact
/// version, $12 notify channel; with a snapshot also $13 version, $14 schema version, $15 state,
/// $16 taken at.
fn append_sql(s: &str, notify: bool, snapshot: bool) -> String {
    let notify_cte = if notify {
        ", notified AS (SELECT pg_notify($12, '') FROM ins LIMIT 1)"
    } else {
        ", notified AS (SELECT $12::text WHERE false)"
    };
    let snapshot_cte = if snapshot {
        format!(
            ", snap AS (
                 INSERT INTO {s}.snapshots AS old
                     (aggregate_id, aggregate_type, version, schema_version, state, taken_at)
                 SELECT $1, $3, $13, $14, $15, $16
                 WHERE (SELECT count(*) FROM ins) > 0
                   AND (SELECT v FROM ok) + cardinality($2::uuid[]) = $13
                 ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET
                     version = excluded.version, schema_version = excluded.schema_version,
                     state = excluded.state, taken_at = excluded.taken_at
                 WHERE old.version <= excluded.version
                 RETURNING 1)"
        )
    } else {
        String::new()
    };
    format!(
        "WITH cur AS (
             SELECT coalesce(max(stream_version), 0) AS v FROM {s}.events
             WHERE aggregate_type = $3 AND aggregate_id = $1
         ), ok AS (
             SELECT cur.v FROM cur
             WHERE CASE $10::int4
                 WHEN 0 THEN true
                 WHEN 1 THEN cur.v = 0
                 WHEN 2 THEN cur.v > 0
                 ELSE cur.v = $11::int8 END
         ), ins AS (
             INSERT INTO {s}.events (global_position, event_id, aggregate_id, stream_version,
                 aggregate_type, event_type, schema_version, payload, correlation_id, causation_id,
                 metadata)
             SELECT (pg_current_xact_id()::text::bigint << {POSITION_SHIFT}) + e.ord - 1,
                    e.event_id, $1, ok.v + e.ord, $3::text, e.event_type,
                    e.schema_version, e.payload, e.correlation_id, e.causation_id, e.metadata
             FROM ok, unnest($2::uuid[], $4::text[], $5::int4[], $6::jsonb[],
                             $7::uuid[], $8::uuid[], $9::jsonb[])
                  WITH ORDINALITY AS e(event_id, event_type, schema_version,
                                       payload, correlation_id, causation_id, metadata, ord)
             RETURNING global_position, recorded_at
         ){notify_cte}{snapshot_cte}
         SELECT (SELECT v FROM cur) AS current_version,
                (SELECT count(*) FROM ok) AS accepted,
                coalesce((SELECT array_agg(global_position ORDER BY global_position) FROM ins),
                         '{{}}'::int8[]) AS positions,
                (SELECT max(recorded_at) FROM ins) AS recorded_at,
                (SELECT count(*) FROM notified) AS notified"
    )
}
