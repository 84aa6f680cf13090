//! Instants for subject expiry: milliseconds since the Unix epoch, RFC 3339 on the wire.
//!
//! The crate never reads a clock: every function that depends on time takes `now` from its
//! caller, so decisions are reproducible in tests.

use std::fmt;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// A point in time with millisecond precision (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    /// Earlier than every expiry: nothing has expired yet.
    pub const MIN: Timestamp = Timestamp(i64::MIN);
    /// Later than every expiry: every subject with an expiry has expired.
    pub const MAX: Timestamp = Timestamp(i64::MAX);

    pub const fn from_unix_millis(millis: i64) -> Self {
        Timestamp(millis)
    }

    pub const fn unix_millis(self) -> i64 {
        self.0
    }

    /// Parses an RFC 3339 date-time such as `2026-01-31T12:00:00Z` or `…+01:00`.
    pub fn parse_rfc3339(text: &str) -> Result<Self, String> {
        let parsed = OffsetDateTime::parse(text, &Rfc3339).map_err(|e| e.to_string())?;
        let millis = parsed.unix_timestamp_nanos() / 1_000_000;
        i64::try_from(millis)
            .map(Timestamp)
            .map_err(|_| "date is out of range".to_owned())
    }

    fn to_datetime(self) -> Option<OffsetDateTime> {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1_000_000).ok()
    }
}

impl From<std::time::SystemTime> for Timestamp {
    fn from(t: std::time::SystemTime) -> Self {
        let millis = match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            Err(e) => i64::try_from(e.duration().as_millis()).map_or(i64::MIN, |m| -m),
        };
        Timestamp(millis)
    }
}

impl fmt::Display for Timestamp {
    /// RFC 3339 in UTC (`2026-01-31T12:00:00Z`, with `.123` when there are milliseconds).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_datetime().and_then(|d| d.format(&Rfc3339).ok()) {
            Some(text) => f.write_str(&text),
            None => write!(f, "@{}ms", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_with_and_without_millis() {
        for text in ["2026-01-31T12:00:00Z", "2026-01-31T12:00:00.250Z"] {
            let t = Timestamp::parse_rfc3339(text).unwrap();
            assert_eq!(Timestamp::parse_rfc3339(&t.to_string()).unwrap(), t);
        }
        let offset = Timestamp::parse_rfc3339("2026-01-31T13:00:00+01:00").unwrap();
        assert_eq!(
            offset,
            Timestamp::parse_rfc3339("2026-01-31T12:00:00Z").unwrap()
        );
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(Timestamp::parse_rfc3339("yesterday").is_err());
    }
}
