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
        let mut text = String::with_capacity(24);
        self.write_rfc3339(&mut text).ok()?;
        Some(text)
    }

    /// Writes the instant as RFC 3339 in UTC (`2026-01-31T12:00:00Z`, `….25Z` with
    /// milliseconds, trailing zeros dropped, as the `time` crate writes it). `Err` (nothing
    /// written) outside the years 0000 to 9999. Written by hand: it is part of every event's
    /// envelope, and formatting through `time` cost an allocation and a format-description
    /// interpreter per event.
    pub fn write_rfc3339(self, out: &mut impl fmt::Write) -> fmt::Result {
        const MILLIS_PER_DAY: i64 = 86_400_000;
        let days = self.0.div_euclid(MILLIS_PER_DAY);
        let in_day = self.0.rem_euclid(MILLIS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        if !(0..=9999).contains(&year) {
            return Err(fmt::Error);
        }
        let seconds = in_day / 1000;
        let millis = in_day % 1000;
        // Digits by hand: `write!` with padding went through the formatter per field.
        let mut text = [0u8; 24];
        let digits = |n: i64, width: usize, at: &mut usize, text: &mut [u8; 24]| {
            let mut n = n;
            for i in (0..width).rev() {
                if let Some(slot) = text.get_mut(*at + i) {
                    *slot = b'0' + (n % 10) as u8;
                }
                n /= 10;
            }
            *at += width;
        };
        let put = |byte: u8, at: &mut usize, text: &mut [u8; 24]| {
            if let Some(slot) = text.get_mut(*at) {
                *slot = byte;
            }
            *at += 1;
        };
        let mut at = 0;
        digits(year, 4, &mut at, &mut text);
        put(b'-', &mut at, &mut text);
        digits(i64::from(month), 2, &mut at, &mut text);
        put(b'-', &mut at, &mut text);
        digits(i64::from(day), 2, &mut at, &mut text);
        put(b'T', &mut at, &mut text);
        digits(seconds / 3600, 2, &mut at, &mut text);
        put(b':', &mut at, &mut text);
        digits(seconds / 60 % 60, 2, &mut at, &mut text);
        put(b':', &mut at, &mut text);
        digits(seconds % 60, 2, &mut at, &mut text);
        // Milliseconds without their trailing zeros (`.25`, not `.250`).
        if millis != 0 {
            put(b'.', &mut at, &mut text);
            let (value, width) = match millis {
                m if m % 100 == 0 => (m / 100, 1),
                m if m % 10 == 0 => (m / 10, 2),
                m => (m, 3),
            };
            digits(value, width, &mut at, &mut text);
        }
        put(b'Z', &mut at, &mut text);
        // ASCII digits and separators only.
        out.write_str(
            std::str::from_utf8(text.get(..at).unwrap_or_default()).map_err(|_| fmt::Error)?,
        )
    }
}

/// The proleptic Gregorian date of `days` since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, exact for every `i64` day count this type can produce).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // Both are in range by construction (1..=31, 1..=12).
    (
        year,
        u32::try_from(month).unwrap_or_default(),
        u32::try_from(day).unwrap_or_default(),
    )
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
        let mut text = String::with_capacity(24);
        match self.write_rfc3339(&mut text) {
            Ok(()) => f.write_str(&text),
            Err(_) => write!(f, "@{}ms", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The writer is the `time` crate's RFC 3339 formatting, without its cost.
    fn time_crate_rfc3339(t: Timestamp) -> Option<String> {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(t.0) * 1_000_000)
            .ok()
            .and_then(|d| d.format(&Rfc3339).ok())
    }

    #[test]
    fn rfc3339_is_written_exactly_as_the_time_crate_writes_it() {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut samples = vec![
            0,
            -1,
            1,
            250,
            951_782_400_000,   // 2000-02-29
            4_107_542_400_000, // 2100-02-28
            -62_167_219_200_000,
            -62_167_219_200_001,
            253_402_300_799_999,
            253_402_300_800_000,
            i64::MIN,
            i64::MAX,
        ];
        for _ in 0..20_000 {
            // xorshift: instants spread over years 0000 to 9999 and beyond
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let spread = (state % 700_000_000_000_000) as i64 - 200_000_000_000_000;
            samples.push(spread);
            samples.push(spread - spread.rem_euclid(1000) + (state % 4) as i64 * 10);
        }
        for millis in samples {
            let t = Timestamp(millis);
            assert_eq!(t.to_rfc3339(), time_crate_rfc3339(t), "{millis}");
        }
    }

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
