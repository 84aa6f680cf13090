//! Writing JSON text piece by piece into a reusable buffer (`fmt::Write`), so that envelopes can
//! be written from borrowed parts (an event, a partial view) without building a `Value` first.

use std::fmt::{self, Write};

use serde_json::{Map, Value};

/// A `fmt::Write` adapter that escapes what passes through as JSON string content: `write!`
/// through it produces the inside of a JSON string from pieces (`{ns}/{name}/…`).
pub(crate) struct Escaped<'w, W: Write>(pub(crate) &'w mut W);

impl<W: Write> Write for Escaped<'_, W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        // Byte by byte: every character that needs escaping is ASCII, so each cut falls on a
        // character boundary (the bytes of a multi-byte character are all ≥ 0x80).
        let mut run_start = 0;
        for (at, &byte) in text.as_bytes().iter().enumerate() {
            let escape = match byte {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                b if b < b' ' => "",
                _ => continue,
            };
            self.0
                .write_str(text.get(run_start..at).unwrap_or_default())?;
            if escape.is_empty() {
                write!(self.0, "\\u{:04x}", byte)?;
            } else {
                self.0.write_str(escape)?;
            }
            run_start = at + 1;
        }
        self.0.write_str(text.get(run_start..).unwrap_or_default())
    }
}

/// Writes `text` as a JSON string (quotes included).
pub(crate) fn write_str(out: &mut impl Write, text: &str) -> fmt::Result {
    out.write_char('"')?;
    Escaped(out).write_str(text)?;
    out.write_char('"')
}

/// Writes what `value` displays as a JSON string (quotes included).
pub(crate) fn write_display(out: &mut impl Write, value: &impl fmt::Display) -> fmt::Result {
    out.write_char('"')?;
    write!(Escaped(out), "{value}")?;
    out.write_char('"')
}

/// Writes a JSON object from a borrowed map.
pub(crate) fn write_object(out: &mut impl Write, object: &Map<String, Value>) -> fmt::Result {
    out.write_char('{')?;
    for (i, (key, value)) in object.iter().enumerate() {
        if i > 0 {
            out.write_char(',')?;
        }
        write_str(out, key)?;
        // `Value`'s `Display` is its compact JSON text.
        write!(out, ":{value}")?;
    }
    out.write_char('}')
}

/// Writes the members of one JSON object, adding the commas between them.
pub(crate) struct ObjectWriter<'w, W: Write> {
    out: &'w mut W,
    empty: bool,
}

impl<'w, W: Write> ObjectWriter<'w, W> {
    pub(crate) fn open(out: &'w mut W) -> Result<Self, fmt::Error> {
        out.write_char('{')?;
        Ok(ObjectWriter { out, empty: true })
    }

    /// Starts a member: writes the separator and `"name":`, then returns the buffer for the
    /// member's value. Member names are the envelope's own field names, literals with nothing
    /// to escape (written as they are: this runs several times per event delivered).
    pub(crate) fn member(&mut self, name: &'static str) -> Result<&mut W, fmt::Error> {
        debug_assert!(name.bytes().all(|b| b >= b' ' && b != b'"' && b != b'\\'));
        if !self.empty {
            self.out.write_char(',')?;
        }
        self.empty = false;
        self.out.write_char('"')?;
        self.out.write_str(name)?;
        self.out.write_str("\":")?;
        Ok(self.out)
    }

    pub(crate) fn close(self) -> fmt::Result {
        self.out.write_char('}')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_text_reads_back_as_the_same_json_string() {
        for text in [
            "plain",
            "q\"uo\\te",
            "line\nfeed\t\r",
            "bell\u{7}",
            "é€😀",
            "",
        ] {
            let mut out = String::new();
            write_str(&mut out, text).unwrap();
            let back: String = serde_json::from_str(&out).unwrap();
            assert_eq!(back, text);
        }
    }
}
