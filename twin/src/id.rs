//! Thing IDs (policy IDs come from the policy crate and follow the same rules).

use std::fmt;

pub use policy::PolicyId;
use policy::model::{IdError, split_entity_id};

/// A thing ID, `namespace:name`: namespace `a.b.c` (parts start with a letter, then letters,
/// digits, `_`), name without `/`, `+`, `#` or control characters, at most 256 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ThingId(String);

impl ThingId {
    pub fn parse(text: &str) -> Result<Self, IdError> {
        split_entity_id(text)?;
        Ok(ThingId(text.to_owned()))
    }

    /// Builds `namespace:name` from its parts (as they come from an MQTT topic).
    pub fn from_parts(namespace: &str, name: &str) -> Result<Self, IdError> {
        let mut id = String::with_capacity(namespace.len() + 1 + name.len());
        id.push_str(namespace);
        id.push(':');
        id.push_str(name);
        split_entity_id(&id)?;
        Ok(ThingId(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn namespace(&self) -> &str {
        self.0.split_once(':').map_or("", |(ns, _)| ns)
    }

    pub fn name(&self) -> &str {
        self.0.split_once(':').map_or("", |(_, name)| name)
    }
}

impl fmt::Display for ThingId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_dittos_rules_and_refuse_mqtt_wildcards() {
        let id = ThingId::parse("org.acme.fleet:sensor-1").unwrap();
        assert_eq!((id.namespace(), id.name()), ("org.acme.fleet", "sensor-1"));
        for bad in [
            "nocolon",
            ":name",
            "1ns:x",
            "ns:",
            "ns:a/b",
            "ns:a+b",
            "ns:a#b",
            "ns:a\u{7}b",
            "org..acme:x",
        ] {
            assert!(ThingId::parse(bad).is_err(), "{bad} accepted");
        }
        assert!(ThingId::parse(&format!("ns:{}", "x".repeat(300))).is_err());
    }
}
