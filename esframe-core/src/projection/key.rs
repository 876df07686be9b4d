//! [`ProjectionKey`]: what checkpoints, leases and dead letters are kept under.

use std::{fmt, sync::Arc};

/// The longest projection name, in characters.
pub const MAX_PROJECTION_NAME_LEN: usize = 200;

/// Names one partition of a projection: its checkpoint, lease and dead letters are kept under
/// it. A projection that is not split has the single partition 0
/// ([`ProjectionKey::single`]); a projection split into N partitions has keys
/// `(name, 0..N)`, each with its own checkpoint and lease.
///
/// Guarantees: the name has 1 to [`MAX_PROJECTION_NAME_LEN`] characters and no control
/// character, so every checkpoint store can keep it. Cheap to clone.
///
/// ```
/// use esframe_core::projection::ProjectionKey;
/// let key = ProjectionKey::single("balances").unwrap();
/// assert_eq!((key.name(), key.partition()), ("balances", 0));
/// assert!(ProjectionKey::single("").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProjectionKey {
    name: Arc<str>,
    partition: u16,
}

/// Why a projection name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid projection name `{name}`: it {reason}")]
pub struct InvalidProjectionKey {
    /// The refused name (escaped and shortened to 64 characters).
    pub name: String,
    /// Why.
    pub reason: String,
}

impl ProjectionKey {
    /// Partition `partition` of projection `name`.
    pub fn new(name: impl AsRef<str>, partition: u16) -> Result<Self, InvalidProjectionKey> {
        let name = name.as_ref();
        let chars = name.chars().count();
        let reason = if chars == 0 {
            Some("is empty".to_owned())
        } else if chars > MAX_PROJECTION_NAME_LEN {
            Some(format!(
                "has {chars} characters; the limit is {MAX_PROJECTION_NAME_LEN}"
            ))
        } else {
            name.char_indices()
                .find(|(_, c)| c.is_control())
                .map(|(at, ch)| format!("contains the control character {ch:?} at byte {at}"))
        };
        match reason {
            Some(reason) => Err(InvalidProjectionKey {
                name: name
                    .chars()
                    .take(64)
                    .collect::<String>()
                    .escape_debug()
                    .to_string(),
                reason,
            }),
            None => Ok(Self {
                name: Arc::from(name),
                partition,
            }),
        }
    }

    /// Partition `partition` of the same projection (its name is valid already).
    pub(crate) fn with_partition(&self, partition: u16) -> Self {
        Self {
            name: Arc::clone(&self.name),
            partition,
        }
    }

    /// The only partition (0) of a projection that is not split.
    pub fn single(name: impl AsRef<str>) -> Result<Self, InvalidProjectionKey> {
        Self::new(name, 0)
    }

    /// The projection's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The partition, from 0.
    pub fn partition(&self) -> u16 {
        self.partition
    }
}

impl fmt::Debug for ProjectionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProjectionKey({:?}, {})", self.name, self.partition)
    }
}

/// `balances` for partition 0, `balances#3` for partition 3.
impl fmt::Display for ProjectionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if self.partition != 0 {
            write!(f, "#{}", self.partition)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(ProjectionKey::new("read-model v2 (ünïcode)", 7).is_ok());
        let long = "x".repeat(MAX_PROJECTION_NAME_LEN + 1);
        for bad in ["", "nul\0byte", "line\nbreak", long.as_str()] {
            let err = ProjectionKey::single(bad).unwrap_err();
            assert!(!err.name.contains('\0'), "{err:?}");
        }
        assert_eq!(
            ProjectionKey::single("a\0b").unwrap_err().to_string(),
            "invalid projection name `a\\0b`: it contains the control character '\\0' at byte 1"
        );
        assert_eq!(ProjectionKey::new("p", 3).unwrap().to_string(), "p#3");
        assert_eq!(ProjectionKey::single("p").unwrap().to_string(), "p");
    }
}
