//! Ditto-style placeholders in connection settings: `{{ header:device_id }}`,
//! `{{ thing:id }}`, `{{ thing:namespace }}`, `{{ thing:name }}`, `{{ topic:action }}`, … — parsed
//! once when a connection is stored (an unknown or misplaced placeholder is refused there, with
//! the setting it is in), resolved per message without parsing again.
//!
//! A placeholder that cannot be resolved for a message (the header is missing) makes the whole
//! template unresolvable: the caller refuses the message, it never guesses.

use std::fmt;

/// Where placeholders come from when a template is resolved.
pub trait Values {
    /// The value of an inbound message's header (names compare case-insensitively).
    fn header(&self, name: &str) -> Option<&str>;
    /// The thing a message addresses or an event is about: ID, namespace, name.
    fn thing(&self) -> Option<(&str, &str)>;
    /// A level of the Ditto topic (`channel`, `criterion`, `action`).
    fn topic(&self, part: TopicPart) -> Option<&str>;
}

/// The parts of a Ditto topic a placeholder can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicPart {
    /// `twin` or `live`.
    Channel,
    /// `commands`, `events`, `messages`.
    Criterion,
    /// `modified`, `created`, … (for a live message: its subject).
    Action,
    /// The whole topic (`org.acme/lamp-1/things/twin/events/modified`).
    Full,
}

/// Which kinds of placeholder a setting admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed {
    /// Inbound headers only (a source's authorization context, enforcement input).
    Headers,
    /// The addressed thing only (enforcement filters).
    Thing,
    /// The thing and the topic of an outbound message (target address and headers).
    ThingAndTopic,
    /// None: a fixed value (a target's authorization context).
    Nothing,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Header(String),
    ThingId,
    ThingNamespace,
    ThingName,
    Topic(TopicPart),
}

/// A string with placeholders, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    raw: String,
    parts: Vec<Part>,
}

/// Why a template was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("`{{{{` without a closing `}}}}`")]
    Unclosed,
    #[error(
        "unknown placeholder `{0}` (known: header:<name>, thing:id, thing:namespace, thing:name, topic:channel, topic:criterion, topic:action, topic:full)"
    )]
    Unknown(String),
    #[error("placeholder `{found}` is not available here ({allowed})")]
    NotHere {
        found: String,
        allowed: &'static str,
    },
}

impl Template {
    /// Parses `raw`, admitting the placeholders `allowed` names.
    pub fn parse(raw: &str, allowed: Allowed) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = raw;
        while let Some(start) = rest.find("{{") {
            let (text, after) = rest.split_at(start);
            if !text.is_empty() {
                parts.push(Part::Text(text.to_owned()));
            }
            let inner = after.get(2..).unwrap_or_default();
            let end = inner.find("}}").ok_or(TemplateError::Unclosed)?;
            let name = inner.get(..end).unwrap_or_default().trim();
            rest = inner.get(end + 2..).unwrap_or_default();
            let part = match name {
                "thing:id" => Part::ThingId,
                "thing:namespace" => Part::ThingNamespace,
                "thing:name" => Part::ThingName,
                "topic:channel" => Part::Topic(TopicPart::Channel),
                "topic:criterion" => Part::Topic(TopicPart::Criterion),
                "topic:action" | "topic:action-subject" => Part::Topic(TopicPart::Action),
                "topic:full" => Part::Topic(TopicPart::Full),
                _ => match name.strip_prefix("header:") {
                    Some(header) if !header.trim().is_empty() => {
                        Part::Header(header.trim().to_ascii_lowercase())
                    }
                    _ => return Err(TemplateError::Unknown(name.to_owned())),
                },
            };
            let admitted = matches!(
                (&part, allowed),
                (Part::Header(_), Allowed::Headers)
                    | (
                        Part::ThingId | Part::ThingNamespace | Part::ThingName,
                        Allowed::Thing
                    )
                    | (
                        Part::ThingId | Part::ThingNamespace | Part::ThingName | Part::Topic(_),
                        Allowed::ThingAndTopic,
                    )
            );
            if !admitted {
                return Err(TemplateError::NotHere {
                    found: name.to_owned(),
                    allowed: match allowed {
                        Allowed::Headers => "only {{ header:<name> }} of the consumed message",
                        Allowed::Thing => {
                            "only {{ thing:id }}, {{ thing:namespace }}, {{ thing:name }}"
                        }
                        Allowed::ThingAndTopic => "only {{ thing:… }} and {{ topic:… }}",
                        Allowed::Nothing => "no placeholder: a fixed value",
                    },
                });
            }
            parts.push(part);
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(Template {
            raw: raw.to_owned(),
            parts,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// Whether it has no placeholder.
    pub fn is_fixed(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Text(_)))
    }

    /// The value for one message, or `Err` naming the placeholder that could not be resolved.
    pub fn resolve(&self, values: &dyn Values) -> Result<String, Unresolved> {
        let mut out = String::with_capacity(self.raw.len() + 16);
        for part in &self.parts {
            let value = match part {
                Part::Text(text) => Some(text.as_str()),
                Part::Header(name) => values.header(name),
                Part::ThingId => {
                    if let Some((ns, name)) = values.thing() {
                        out.push_str(ns);
                        out.push(':');
                        out.push_str(name);
                        continue;
                    }
                    None
                }
                Part::ThingNamespace => values.thing().map(|(ns, _)| ns),
                Part::ThingName => values.thing().map(|(_, name)| name),
                Part::Topic(part) => values.topic(*part),
            };
            match value {
                Some(value) => out.push_str(value),
                None => {
                    return Err(Unresolved(self.placeholder_name(part)));
                }
            }
        }
        Ok(out)
    }

    fn placeholder_name(&self, part: &Part) -> String {
        match part {
            Part::Text(_) => String::new(),
            Part::Header(name) => format!("header:{name}"),
            Part::ThingId => "thing:id".into(),
            Part::ThingNamespace => "thing:namespace".into(),
            Part::ThingName => "thing:name".into(),
            Part::Topic(TopicPart::Channel) => "topic:channel".into(),
            Part::Topic(TopicPart::Criterion) => "topic:criterion".into(),
            Part::Topic(TopicPart::Action) => "topic:action".into(),
            Part::Topic(TopicPart::Full) => "topic:full".into(),
        }
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

/// A placeholder a message could not fill (its name, e.g. `header:device_id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unresolved(pub String);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;

    struct Msg<'a> {
        headers: &'a [(&'a str, &'a str)],
        thing: Option<(&'a str, &'a str)>,
    }

    impl Values for Msg<'_> {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| *v)
        }
        fn thing(&self) -> Option<(&str, &str)> {
            self.thing
        }
        fn topic(&self, part: TopicPart) -> Option<&str> {
            (part == TopicPart::Action).then_some("modified")
        }
    }

    #[test]
    fn headers_resolve_case_insensitively_and_a_missing_one_is_named() {
        let t = Template::parse("integration:{{ header:Device_ID }}", Allowed::Headers).unwrap();
        let msg = Msg {
            headers: &[("device_id", "org.acme:lamp-1")],
            thing: None,
        };
        assert_eq!(t.resolve(&msg).unwrap(), "integration:org.acme:lamp-1");
        let none = Msg {
            headers: &[],
            thing: None,
        };
        assert_eq!(t.resolve(&none), Err(Unresolved("header:device_id".into())));
    }

    #[test]
    fn thing_and_topic_placeholders_fill_an_address() {
        let t = Template::parse(
            "events/{{thing:namespace}}.{{ thing:name }}.{{ topic:action }}",
            Allowed::ThingAndTopic,
        )
        .unwrap();
        let msg = Msg {
            headers: &[],
            thing: Some(("org.acme", "lamp-1")),
        };
        assert_eq!(t.resolve(&msg).unwrap(), "events/org.acme.lamp-1.modified");
        let id = Template::parse("{{ thing:id }}", Allowed::Thing).unwrap();
        assert_eq!(id.resolve(&msg).unwrap(), "org.acme:lamp-1");
    }

    #[test]
    fn unknown_unclosed_and_misplaced_placeholders_are_refused() {
        assert_eq!(
            Template::parse("{{ header:x", Allowed::Headers),
            Err(TemplateError::Unclosed)
        );
        assert!(matches!(
            Template::parse("{{ jwt:sub }}", Allowed::Headers),
            Err(TemplateError::Unknown(_))
        ));
        assert!(matches!(
            Template::parse("{{ thing:id }}", Allowed::Headers),
            Err(TemplateError::NotHere { .. })
        ));
        assert!(matches!(
            Template::parse("integration:{{ header:a }}", Allowed::Nothing),
            Err(TemplateError::NotHere { .. })
        ));
        assert!(
            Template::parse("fixed", Allowed::Nothing)
                .unwrap()
                .is_fixed()
        );
    }
}
