//! The resource levels of a thing that commands address (`/attributes/a`, `/features/f/properties/p`, …).

use std::fmt;

use crate::error::DittoError;

/// The level a thing path addresses; borrowed from a [`ThingPath`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level<'a> {
    Thing,
    PolicyId,
    Definition,
    Attributes,
    /// An attribute at a non-empty JSON path below `/attributes`.
    Attribute(&'a [String]),
    Features,
    Feature(&'a str),
    FeatureDefinition(&'a str),
    FeatureProperties(&'a str),
    FeatureProperty(&'a str, &'a [String]),
    FeatureDesiredProperties(&'a str),
    FeatureDesiredProperty(&'a str, &'a [String]),
}

/// A validated path into a thing: decoded segments (`~0` → `~`), empty segments dropped.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct ThingPath {
    segments: Vec<String>,
}

/// The longest path (in bytes, as written) a command may address.
pub const MAX_PATH_LEN: usize = 1024;

/// What every command path must be, whatever it addresses: at most [`MAX_PATH_LEN`] bytes,
/// no control characters (400 `things:path.invalid`).
pub(crate) fn check_path_text(path: &str) -> Result<(), DittoError> {
    if path.len() > MAX_PATH_LEN {
        return Err(DittoError::new(
            400,
            "things:path.invalid",
            format!("the path is longer than {MAX_PATH_LEN} bytes"),
        ));
    }
    if path.chars().any(char::is_control) {
        return Err(DittoError::new(
            400,
            "things:path.invalid",
            "the path contains a control character",
        ));
    }
    Ok(())
}

impl ThingPath {
    /// The whole thing.
    pub fn root() -> Self {
        ThingPath::default()
    }

    /// Parses a JSON-pointer-like path (`/features/lamp/properties/on`). Refuses paths that do
    /// not address a level of a thing (400 `things:path.invalid`).
    pub fn parse(path: &str) -> Result<Self, DittoError> {
        check_path_text(path)?;
        let segments = crate::entity::path_segments(path)
            .map(|s| s.into_owned())
            .collect();
        let parsed = ThingPath { segments };
        parsed.check()?;
        Ok(parsed)
    }

    fn check(&self) -> Result<(), DittoError> {
        let invalid = || {
            DittoError::new(400, "things:path.invalid", format!("`{self}` does not address a part of a thing"))
                .with_description("Valid paths: /, /policyId, /definition, /attributes[/…], /features[/ID[/definition|/properties[/…]|/desiredProperties[/…]]]")
        };
        // Without collecting the segments as `&str` first (an allocation per command).
        let valid = match self.segments.as_slice() {
            [] => true,
            [a] => a == "policyId" || a == "definition" || a == "attributes" || a == "features",
            [a, ..] if a == "attributes" => true,
            [a, _] => a == "features",
            [a, _, b, rest @ ..] if a == "features" => {
                (b == "definition" && rest.is_empty())
                    || b == "properties"
                    || b == "desiredProperties"
            }
            _ => false,
        };
        if valid { Ok(()) } else { Err(invalid()) }
    }

    pub fn level(&self) -> Level<'_> {
        match self.segments.as_slice() {
            [] => Level::Thing,
            [a] if a == "policyId" => Level::PolicyId,
            [a] if a == "definition" => Level::Definition,
            [a] if a == "attributes" => Level::Attributes,
            [a, rest @ ..] if a == "attributes" => Level::Attribute(rest),
            [a] if a == "features" => Level::Features,
            [a, f] if a == "features" => Level::Feature(f),
            [a, f, b] if a == "features" && b == "definition" => Level::FeatureDefinition(f),
            [a, f, b] if a == "features" && b == "properties" => Level::FeatureProperties(f),
            [a, f, b, rest @ ..] if a == "features" && b == "properties" => {
                Level::FeatureProperty(f, rest)
            }
            [a, f, b] if a == "features" && b == "desiredProperties" => {
                Level::FeatureDesiredProperties(f)
            }
            [a, f, b, rest @ ..] if a == "features" && b == "desiredProperties" => {
                Level::FeatureDesiredProperty(f, rest)
            }
            // INVARIANT: a `ThingPath` is only built by `parse` (checked), `root` and `prefix`
            // (every prefix of a valid path is valid), so no other shape exists.
            _ => Level::Thing,
        }
    }

    /// The decoded segments.
    pub fn segments(&self) -> &[String] {
        &self.segments
    }

    pub fn is_root(&self) -> bool {
        self.segments.is_empty()
    }

    /// The first `n` segments of this path: still a valid thing path (every prefix of one is).
    pub fn prefix(&self, n: usize) -> ThingPath {
        ThingPath {
            segments: self.segments.iter().take(n).cloned().collect(),
        }
    }
}

impl fmt::Display for ThingPath {
    /// The path as a JSON pointer (`/` for the root; `~` written `~0`): the same string is the
    /// `thing:` resource it is authorized on.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.segments.is_empty() {
            return f.write_str("/");
        }
        for s in &self.segments {
            f.write_str("/")?;
            // Most segments hold no `~`: write them as they are, without a copy.
            for (i, part) in s.split('~').enumerate() {
                if i > 0 {
                    f.write_str("~0")?;
                }
                f.write_str(part)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_level_parses_and_others_are_refused() {
        let level = |p: &str| ThingPath::parse(p).map(|t| format!("{:?}", t.level()));
        assert_eq!(level("").unwrap(), "Thing");
        assert_eq!(level("/").unwrap(), "Thing");
        assert_eq!(level("/policyId").unwrap(), "PolicyId");
        assert_eq!(
            level("/attributes/a/b").unwrap(),
            r#"Attribute(["a", "b"])"#
        );
        assert_eq!(
            level("/features/f~0x/properties/p").unwrap(),
            r#"FeatureProperty("f~x", ["p"])"#
        );
        assert_eq!(
            level("/features/f/desiredProperties").unwrap(),
            r#"FeatureDesiredProperties("f")"#
        );
        for good in [
            "/definition",
            "/attributes",
            "/features",
            "/features/f",
            "/features/f/definition",
            "/features/f/properties",
            "/features/f/properties/a/b",
            "/features/f/desiredProperties/a",
        ] {
            assert!(ThingPath::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "/thingId",
            "/definition/x",
            "/features/f/other",
            "/features/f/other/x",
            "/features/f/definition/x",
            "/x",
            "/policyId/x",
        ] {
            let e = ThingPath::parse(bad).unwrap_err();
            assert_eq!((e.status, e.error), (400, "things:path.invalid"), "{bad}");
        }
        assert_eq!(
            ThingPath::parse("/attributes//a~0b/").unwrap().to_string(),
            "/attributes/a~0b"
        );
    }
}
