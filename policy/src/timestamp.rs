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
        // Rounds down (towards the past), also before 1970.
        let millis = parsed.unix_timestamp_nanos().div_euclid(1_000_000);
        let timestamp = i64::try_from(millis)
            .map(Timestamp)
            .map_err(|_| "date is out of range".to_owned())?;
        // An offset can move a valid local time outside the years RFC 3339 can write in UTC
        // (`0000-01-01T00:00:00+23:59`); such an instant could not be written back.
        if timestamp.to_rfc3339().is_none() {
            return Err("date is out of range (years 0000 to 9999 in UTC)".to_owned());
        }
        Ok(timestamp)
    }

    fn to_rfc3339(self) -> Option<String> {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1_000_000)
            .ok()
            .and_then(|d| d.format(&Rfc3339).ok())
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
        match self.to_rfc3339() {
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
    fn instants_that_cannot_be_written_back_are_refused() {
        for text in ["0000-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59"] {
            assert!(Timestamp::parse_rfc3339(text).is_err(), "{text} accepted");
        }
        let before_1970 = Timestamp::parse_rfc3339("1969-12-31T23:59:59.9995Z").unwrap();
        assert_eq!(before_1970.to_string(), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(Timestamp::parse_rfc3339("yesterday").is_err());
    }
}
