//! [`LogPartition`]: one of N parts of the global log, split by stream.

use std::fmt;

use crate::StreamId;

/// How many buckets streams are hashed into. A partition is a set of buckets, so a log can be
/// split into at most this many partitions.
pub const PARTITION_BUCKETS: u16 = 256;

/// The most partitions a log can be split into ([`PARTITION_BUCKETS`]).
pub const MAX_PARTITIONS: u16 = PARTITION_BUCKETS;

/// Partition `index` of the global log split into `count` partitions.
///
/// Guarantees: every stream belongs to exactly one bucket, fixed for the life of the store (the
/// backend's hash of its aggregate type and id), and bucket `b` belongs to partition
/// `b % count`. So all events of a stream are in one partition, and the partitions of one count
/// are disjoint and together hold every event. [`LogPartition::ALL`] (`count` 1) is the whole
/// log.
///
/// ```
/// use esframe_core::LogPartition;
/// let p = LogPartition::new(3, 16).unwrap();
/// assert_eq!(p.buckets().count(), 16);
/// assert!(p.buckets().all(|b| b % 16 == 3));
/// assert!(LogPartition::new(16, 16).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LogPartition {
    index: u16,
    count: u16,
}

/// Why a partition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid log partition {index} of {count}: {reason}")]
pub struct InvalidPartition {
    /// The refused index.
    pub index: u16,
    /// The refused count.
    pub count: u16,
    /// Why.
    pub reason: &'static str,
}

impl LogPartition {
    /// The whole log: partition 0 of 1.
    pub const ALL: Self = Self { index: 0, count: 1 };

    /// Partition `index` (from 0) of `count` (1 to [`MAX_PARTITIONS`]).
    pub fn new(index: u16, count: u16) -> Result<Self, InvalidPartition> {
        let reason = if count == 0 {
            Some("the count must be at least 1")
        } else if count > MAX_PARTITIONS {
            Some("the count must be at most 256 (the number of stream buckets)")
        } else if index >= count {
            Some("the index must be below the count")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(InvalidPartition {
                index,
                count,
                reason,
            }),
            None => Ok(Self { index, count }),
        }
    }

    /// The partition's index, from 0.
    pub fn index(self) -> u16 {
        self.index
    }

    /// How many partitions the log is split into.
    pub fn count(self) -> u16 {
        self.count
    }

    /// Whether this is the whole log.
    pub fn is_all(self) -> bool {
        self.count == 1
    }

    /// The buckets of this partition, in increasing order.
    pub fn buckets(self) -> impl Iterator<Item = u16> {
        (self.index..PARTITION_BUCKETS).step_by(usize::from(self.count))
    }

    /// Whether bucket `bucket` belongs to this partition.
    pub fn holds_bucket(self, bucket: u16) -> bool {
        bucket % self.count == self.index
    }

    /// Whether `stream` belongs to this partition under [`stream_bucket`], the bucket function
    /// of backends that do not hash streams themselves (the memory store's). PostgreSQL hashes
    /// in SQL, with its own function.
    pub fn contains(self, stream: &StreamId) -> bool {
        self.holds_bucket(stream_bucket(stream))
    }
}

/// `3/16`.
impl fmt::Display for LogPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// The bucket of a stream for backends without a hash of their own: FNV-1a (64 bits) of the
/// aggregate type, a unit separator and the id, modulo [`PARTITION_BUCKETS`]. Stable across
/// versions and platforms.
pub fn stream_bucket(stream: &StreamId) -> u16 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let parts = [
        stream.aggregate_type().as_bytes(),
        &[0x1f],
        stream.id().as_bytes(),
    ];
    for byte in parts.into_iter().flatten() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % u64::from(PARTITION_BUCKETS)) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_of_one_count_split_the_buckets() {
        for count in [1, 2, 3, 7, 16, 256] {
            let mut seen = vec![0; usize::from(PARTITION_BUCKETS)];
            for index in 0..count {
                for bucket in LogPartition::new(index, count).unwrap().buckets() {
                    seen[usize::from(bucket)] += 1;
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "count {count}");
        }
        assert!(LogPartition::new(0, 0).is_err());
        assert!(LogPartition::new(0, 257).is_err());
        assert_eq!(
            LogPartition::new(4, 4).unwrap_err().to_string(),
            "invalid log partition 4 of 4: the index must be below the count"
        );
    }

    #[test]
    fn the_bucket_is_stable_and_spread() {
        let stream = StreamId::new("account", "42").unwrap();
        assert_eq!(stream_bucket(&stream), stream_bucket(&stream.clone()));
        let mut per_bucket = vec![0u32; usize::from(PARTITION_BUCKETS)];
        for i in 0..25_600 {
            let s = StreamId::new("account", format!("{i}")).unwrap();
            per_bucket[usize::from(stream_bucket(&s))] += 1;
        }
        // 100 per bucket on average; none empty or three times as full.
        assert!(per_bucket.iter().all(|&n| (30..300).contains(&n)));
    }
}
