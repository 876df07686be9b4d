//! The limits of the store contract: what every esframe store accepts.
//!
//! They are checked once, here in esframe-core, before a request reaches any backend, so every
//! store refuses exactly the same input with the same [`InvalidInput`](crate::InvalidInput)
//! error, and anything a store accepts can be read back by every store. The limits follow what
//! PostgreSQL can hold (a `BIGINT` version, an `INTEGER` schema version, no NUL in `text` or
//! `jsonb`) and what can be decoded again (JSON nesting well below `serde_json`'s limit of 128).

use serde_json::{Map, Value};

use crate::InputProblem;

/// The most events one append may carry (the PostgreSQL store numbers them in 16 bits).
pub const MAX_EVENTS_PER_APPEND: usize = 1 << 16;

/// The largest stream version (and expected version) a store can hold: `i64::MAX`.
pub const MAX_VERSION: u64 = i64::MAX as u64;

/// The largest schema version of an event or snapshot: `i32::MAX`. Schema versions start at 1.
pub const MAX_SCHEMA_VERSION: u32 = i32::MAX as u32;

/// The longest event type or aggregate type name, in bytes.
pub const MAX_NAME_LEN: usize = 256;

/// The deepest nesting of JSON arrays and objects in a payload, metadata or snapshot state.
pub const MAX_JSON_DEPTH: usize = 64;

/// Checks a type name: not empty, at most [`MAX_NAME_LEN`] bytes, no control character.
pub(crate) fn check_name(field: &'static str, name: &str) -> Result<(), InputProblem> {
    // The common case: printable ASCII. A fold without early exit, which the compiler turns
    // into vector code.
    if !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name
            .bytes()
            .fold(false, |bad, b| bad | !(0x20..0x7f).contains(&b))
    {
        return Ok(());
    }
    let reason = if name.is_empty() {
        "is empty".to_owned()
    } else if name.len() > MAX_NAME_LEN {
        format!("is {} bytes long; the limit is {MAX_NAME_LEN}", name.len())
    } else if let Some((at, ch)) = name.char_indices().find(|(_, c)| c.is_control()) {
        format!("contains the control character {ch:?} at byte {at}")
    } else {
        return Ok(());
    };
    Err(InputProblem::InvalidName { field, reason })
}

/// Checks a number against `min..=max`.
pub(crate) fn check_range(
    field: &'static str,
    value: u64,
    min: u64,
    max: u64,
) -> Result<(), InputProblem> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(InputProblem::OutOfRange {
            field,
            value,
            min,
            max,
        })
    }
}

/// Checks a JSON value: no NUL character in any string or key, at most [`MAX_JSON_DEPTH`]
/// levels of arrays and objects. Recursion is bounded by the depth limit, so any value, however
/// deep, is checked without overflowing the stack.
pub(crate) fn check_json(field: &'static str, value: &Value) -> Result<(), InputProblem> {
    if clean(value, 0) {
        return Ok(());
    }
    walk(value, 0).map_err(|found| found.into_problem(field))
}

/// [`check_json`] for an object given as its map (event metadata).
pub(crate) fn check_json_map(
    field: &'static str,
    map: &Map<String, Value>,
) -> Result<(), InputProblem> {
    if clean_map(map, 0) {
        return Ok(());
    }
    walk_map(map, 0).map_err(|found| found.into_problem(field))
}

/// The fast pass of every append: whether `value` is fine, without noting where it is not
/// (then [`walk`] finds the place). Recursion is bounded by the depth limit.
fn clean(value: &Value, depth: usize) -> bool {
    match value {
        Value::String(text) => !text.as_bytes().contains(&0),
        Value::Array(items) => {
            depth < MAX_JSON_DEPTH && items.iter().all(|item| clean(item, depth + 1))
        }
        Value::Object(map) => clean_map(map, depth),
        _ => true,
    }
}

fn clean_map(map: &Map<String, Value>, depth: usize) -> bool {
    depth < MAX_JSON_DEPTH
        && map
            .iter()
            .all(|(key, item)| !key.as_bytes().contains(&0) && clean(item, depth + 1))
}

/// What a walk found; the path is collected on the way out, innermost segment first.
enum Found {
    TooDeep,
    Nul(Vec<String>),
}

impl Found {
    fn within(self, segment: impl FnOnce() -> String) -> Self {
        match self {
            Self::Nul(mut path) => {
                path.push(segment());
                Self::Nul(path)
            }
            too_deep => too_deep,
        }
    }

    fn into_problem(self, field: &'static str) -> InputProblem {
        match self {
            Self::TooDeep => InputProblem::TooDeep {
                field,
                max: MAX_JSON_DEPTH,
            },
            Self::Nul(path) => InputProblem::NulCharacter {
                field,
                at: path.iter().rev().fold(String::new(), |mut at, segment| {
                    at.push('/');
                    at.push_str(segment);
                    at
                }),
            },
        }
    }
}

/// A JSON pointer segment (`~` and `/` escaped), with control characters shown escaped.
fn segment(key: &str) -> String {
    key.replace('~', "~0")
        .replace('/', "~1")
        .escape_debug()
        .to_string()
}

/// `depth`: how many arrays and objects enclose `value`.
fn walk(value: &Value, depth: usize) -> Result<(), Found> {
    match value {
        Value::String(text) if text.contains('\0') => Err(Found::Nul(Vec::new())),
        Value::Array(items) => {
            if depth >= MAX_JSON_DEPTH {
                return Err(Found::TooDeep);
            }
            for (i, item) in items.iter().enumerate() {
                walk(item, depth + 1).map_err(|found| found.within(|| i.to_string()))?;
            }
            Ok(())
        }
        Value::Object(map) => walk_map(map, depth),
        _ => Ok(()),
    }
}

fn walk_map(map: &Map<String, Value>, depth: usize) -> Result<(), Found> {
    if depth >= MAX_JSON_DEPTH {
        return Err(Found::TooDeep);
    }
    for (key, item) in map {
        if key.contains('\0') {
            return Err(Found::Nul(vec![segment(key)]));
        }
        walk(item, depth + 1).map_err(|found| found.within(|| segment(key)))?;
    }
    Ok(())
}

/// Drops a JSON value of any depth without recursion (`Value`'s own drop recurses once per
/// level, which overflows the stack on values nested tens of thousands deep).
pub(crate) fn dismantle(value: Value) {
    let mut stack = vec![value];
    while let Some(value) = stack.pop() {
        match value {
            Value::Array(items) => stack.extend(items),
            Value::Object(map) => stack.extend(map.into_iter().map(|(_, v)| v)),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn nested(depth: usize) -> Value {
        let mut value = json!(1);
        for _ in 0..depth {
            value = json!([value]);
        }
        value
    }

    #[test]
    fn depth_is_limited_and_counted_by_containers() {
        assert!(check_json("payload", &nested(MAX_JSON_DEPTH)).is_ok());
        assert_eq!(
            check_json("payload", &nested(MAX_JSON_DEPTH + 1)),
            Err(InputProblem::TooDeep {
                field: "payload",
                max: MAX_JSON_DEPTH
            })
        );
        // Everything accepted reads back through serde_json's parser.
        let text = nested(MAX_JSON_DEPTH).to_string();
        assert!(serde_json::from_str::<Value>(&text).is_ok());
    }

    #[test]
    fn values_nested_far_beyond_the_stack_are_checked_and_dropped() {
        let mut value = json!(null);
        for _ in 0..200_000 {
            let mut map = Map::new();
            map.insert("a".into(), value);
            value = Value::Object(map);
        }
        assert!(matches!(
            check_json("payload", &value),
            Err(InputProblem::TooDeep { .. })
        ));
        dismantle(value);
    }

    #[test]
    fn nul_characters_are_found_with_their_path() {
        let value = json!({"items": [{"ok": "x"}, {"name": "a\u{0}b"}], "a/b": 1});
        assert_eq!(
            check_json("payload", &value),
            Err(InputProblem::NulCharacter {
                field: "payload",
                at: "/items/1/name".into()
            })
        );
        let key = json!({"a/~": {"b\u{0}": 1}});
        let Err(InputProblem::NulCharacter { at, .. }) = check_json("metadata", &key) else {
            panic!("a NUL in a key is found");
        };
        assert_eq!(at, "/a~1~0/b\\0");
        assert!(check_json("payload", &json!("\u{0}")).is_err());
        assert!(check_json("payload", &json!({"fine": "text", "n": 1.5})).is_ok());
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("event_type", "MoneyDeposited").is_ok());
        for bad in ["", "a\u{0}b", "tab\there", &"x".repeat(MAX_NAME_LEN + 1)] {
            assert!(check_name("event_type", bad).is_err(), "{bad:?}");
        }
    }
}
