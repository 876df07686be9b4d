//! [`Interest`]: which events a projection wants.

use std::borrow::Cow;

use crate::{Event, RecordedEvent};

/// Which events a projection handles: by aggregate type, by event type, or both (an event must
/// match each list that is set). Events outside it are skipped without calling the handler; the
/// checkpoint still moves past them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Interest {
    aggregate_types: Option<Vec<Cow<'static, str>>>,
    event_types: Option<Vec<Cow<'static, str>>>,
}

impl Interest {
    /// Every event.
    pub fn all() -> Self {
        Self::default()
    }

    /// Only events of streams of these aggregate types.
    pub fn aggregates<I, T>(types: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<Cow<'static, str>>,
    {
        Self::all().and_aggregates(types)
    }

    /// Only events of these event types.
    pub fn event_types<I, T>(types: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<Cow<'static, str>>,
    {
        Self::all().and_event_types(types)
    }

    /// Only the event types that `E` (an `#[derive(Event)]` enum) can hold.
    pub fn events_of<E: Event>() -> Self {
        Self::event_types(E::event_types().iter().map(|t| t.name))
    }

    /// Adds aggregate types to the aggregate filter.
    #[must_use]
    pub fn and_aggregates<I, T>(mut self, types: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<Cow<'static, str>>,
    {
        self.aggregate_types
            .get_or_insert_with(Vec::new)
            .extend(types.into_iter().map(Into::into));
        self
    }

    /// Adds event types to the event-type filter.
    #[must_use]
    pub fn and_event_types<I, T>(mut self, types: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<Cow<'static, str>>,
    {
        self.event_types
            .get_or_insert_with(Vec::new)
            .extend(types.into_iter().map(Into::into));
        self
    }

    /// Whether the projection wants `event`.
    pub fn matches(&self, event: &RecordedEvent) -> bool {
        let wanted = |list: &Option<Vec<Cow<'static, str>>>, value: &str| {
            list.as_ref().is_none_or(|l| l.iter().any(|t| t == value))
        };
        wanted(&self.aggregate_types, event.aggregate_type())
            && wanted(&self.event_types, &event.event_type)
    }
}
