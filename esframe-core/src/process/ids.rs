//! Deterministic ids: the same input of the same instance always sends the same commands and
//! schedules the same timers, so a repeat after a crash stores nothing twice.

use uuid::Uuid;

/// The namespace of every process-manager id (a fixed random UUID).
const NAMESPACE: Uuid = Uuid::from_u128(0x5f0c_2a8e_6b1d_4c3a_9e77_1d2f_8a40_b6c1);

fn derive(parts: &[&[u8]]) -> Uuid {
    let mut name = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for part in parts {
        // Length-prefixed, so no two lists of parts give the same bytes.
        name.extend_from_slice(&(part.len() as u64).to_be_bytes());
        name.extend_from_slice(part);
    }
    Uuid::new_v5(&NAMESPACE, &name)
}

/// The id of command number `index` that instance `instance` of `process` sent in reaction to
/// input `input`.
pub fn command_id(process: &str, instance: &str, input: Uuid, index: usize) -> Uuid {
    derive(&[
        process.as_bytes(),
        instance.as_bytes(),
        input.as_bytes(),
        &(index as u64).to_be_bytes(),
    ])
}

/// The event id of message number `index` that instance `instance` of `process` published in
/// reaction to input `input`.
pub fn message_id(process: &str, instance: &str, input: Uuid, index: usize) -> Uuid {
    derive(&[
        process.as_bytes(),
        instance.as_bytes(),
        input.as_bytes(),
        b"message",
        &(index as u64).to_be_bytes(),
    ])
}

/// The id of timer `name` that instance `instance` of `process` scheduled in reaction to input
/// `input`.
pub fn timer_id(process: &str, instance: &str, input: Uuid, name: &str) -> Uuid {
    derive(&[
        process.as_bytes(),
        instance.as_bytes(),
        input.as_bytes(),
        b"timer",
        name.as_bytes(),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_deterministic_and_distinct() {
        let input = Uuid::now_v7();
        assert_eq!(
            command_id("p", "i", input, 0),
            command_id("p", "i", input, 0)
        );
        assert_ne!(
            command_id("p", "i", input, 0),
            command_id("p", "i", input, 1)
        );
        assert_ne!(
            command_id("p", "i1", input, 0),
            command_id("p1", "i", input, 0)
        );
        assert_ne!(
            timer_id("p", "i", input, "a"),
            timer_id("p", "i", input, "b")
        );
    }
}
