//! The twin topic space (DESIGN.md §3), one rule for topic names and subscription filters: a
//! topic whose third level is `things` or `policies`, or whose first level is `ditto`, belongs to
//! the twin space (commands, events, responses, live messages); every other topic is plain.
//!
//! A filter is classified by what it can match: only twin topics ([`FilterSpace::Twin`]), only
//! plain topics ([`FilterSpace::Plain`]), or both because its wildcards reach the level that
//! decides ([`FilterSpace::Mixed`]: `org.acme/#`, `org.acme/+/+/…`). Strip a shared
//! subscription's `$share/{group}/` first.

/// Whether `topic` (a topic name, or a filter written out to its third level) belongs to the
/// twin topic space.
pub fn is_twin_topic(topic: &str) -> bool {
    let mut levels = topic.split('/');
    levels.next() == Some("ditto") || matches!(levels.nth(1), Some("things" | "policies"))
}

/// What a subscription filter can match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterSpace<'a> {
    /// Only plain topics.
    Plain,
    /// Only twin topics; `first` is the filter's first level as written: a namespace, a
    /// wildcard (`+`, `#`), or `ditto`.
    Twin { first: &'a str },
    /// Plain topics, and the twin topics of namespace `namespace` (the filter's literal first
    /// level), which its wildcards reach.
    Mixed { namespace: &'a str },
}

impl<'a> FilterSpace<'a> {
    pub fn of(filter: &'a str) -> Self {
        let mut levels = filter.split('/');
        let Some(first) = levels.next() else {
            return FilterSpace::Plain;
        };
        if is_twin_topic(filter) {
            return FilterSpace::Twin { first };
        }
        let reaches = matches!(
            (levels.next(), levels.next()),
            (Some("#"), _) | (Some(_), Some("#" | "+"))
        );
        if reaches && first != "+" && first != "#" {
            FilterSpace::Mixed { namespace: first }
        } else {
            FilterSpace::Plain
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{FilterSpace, is_twin_topic};

    #[test]
    fn twin_topics_and_filters_are_recognised() {
        assert!(is_twin_topic("org.acme/lamp/things/twin/events/#"));
        assert!(is_twin_topic("+/+/things/#"));
        assert!(is_twin_topic("org.acme/p/policies/commands/#"));
        assert!(is_twin_topic("ditto/#"));
        assert!(!is_twin_topic("#"));
        assert!(!is_twin_topic("sensors/+/temp"));
        assert!(!is_twin_topic("a/things"));
    }

    #[test]
    fn filters_are_classified_by_what_they_can_match() {
        let twin = |first| FilterSpace::Twin { first };
        assert_eq!(
            FilterSpace::of("org.acme/+/things/twin/events/#"),
            twin("org.acme")
        );
        assert_eq!(FilterSpace::of("+/+/things/twin/events/#"), twin("+"));
        assert_eq!(FilterSpace::of("ditto/responses"), twin("ditto"));
        let mixed = |namespace| FilterSpace::Mixed { namespace };
        assert_eq!(FilterSpace::of("org.acme/#"), mixed("org.acme"));
        assert_eq!(FilterSpace::of("org.acme/+/+/twin"), mixed("org.acme"));
        assert_eq!(FilterSpace::of("org.acme/x/#"), mixed("org.acme"));
        assert_eq!(FilterSpace::of("#"), FilterSpace::Plain);
        assert_eq!(FilterSpace::of("+/#"), FilterSpace::Plain);
        assert_eq!(FilterSpace::of("sensors/+/temp"), FilterSpace::Plain);
        assert_eq!(FilterSpace::of("sensors/s1/temp/#"), FilterSpace::Plain);
    }
}
