//! Type names read back from rows, shared. An application has few event and aggregate types,
//! so each distinct name is allocated once per process and then handed out as a borrowed
//! `&'static str`, instead of one allocation per row. The set is bounded: past
//! [`MAX_SHARED`] names, or for a name longer than the contract allows (only rows written
//! around esframe have those), names are allocated per row as before.

use std::{
    borrow::Cow,
    collections::HashSet,
    sync::{Mutex, PoisonError},
};

/// How many distinct names are kept for the life of the process.
const MAX_SHARED: usize = 4096;

/// Longer names (only rows written around esframe have them) are never shared.
const MAX_SHARED_LEN: usize = esframe_core::limits::MAX_NAME_LEN;

/// How many names one reader remembers without asking the shared set.
const PER_READER: usize = 16;

static SHARED: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);

/// Names one reader has seen, looked up before the shared set (no lock for a stream's usual
/// handful of types).
#[derive(Default)]
pub(crate) struct Names {
    seen: Vec<&'static str>,
}

impl Names {
    /// `text` as a shared name, or owned once the shared set is full.
    pub(crate) fn get(&mut self, text: &str) -> Cow<'static, str> {
        if let Some(name) = self.seen.iter().find(|name| **name == text) {
            return Cow::Borrowed(name);
        }
        match shared(text) {
            Some(name) => {
                if self.seen.len() < PER_READER {
                    self.seen.push(name);
                }
                Cow::Borrowed(name)
            }
            None => Cow::Owned(text.to_owned()),
        }
    }
}

fn shared(text: &str) -> Option<&'static str> {
    if text.len() > MAX_SHARED_LEN {
        return None;
    }
    let mut set = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
    let set = set.get_or_insert_with(HashSet::new);
    if let Some(name) = set.get(text) {
        return Some(name);
    }
    if set.len() >= MAX_SHARED {
        return None;
    }
    // Kept for the life of the process, by design: bounded by MAX_SHARED.
    let name: &'static str = Box::leak(text.into());
    set.insert(name);
    Some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_names_share_one_allocation() {
        let (mut a, mut b) = (Names::default(), Names::default());
        let first = a.get("MoneyDeposited-names-test");
        let again = b.get(&String::from("MoneyDeposited-names-test"));
        match (first, again) {
            (Cow::Borrowed(x), Cow::Borrowed(y)) => assert!(std::ptr::eq(x, y)),
            other => panic!("expected shared names, got {other:?}"),
        }
        assert_eq!(a.get("Other-names-test"), "Other-names-test");
    }
}
