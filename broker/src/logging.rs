//! The server's log (stderr): `THINGSGATE_LOG` (or `RUST_LOG`) filters, default `info`;
//! `THINGSGATE_LOG_FORMAT` is `text` (default) or `json` (one JSON object per line).
//!
//! Clients choose many of the values that get logged — client IDs, user names, topics, the
//! protocol name of a CONNECT, reason strings, bytes of a malformed packet in an error. None may
//! end a line or forge one (CWE-117), or drive a terminal: in the text format every field value
//! is written through [`Escaping`], which turns control characters (newlines, carriage returns,
//! ANSI escapes, …) and Unicode line and bidirectional-override characters into `\u{…}`; the JSON
//! format escapes control characters as JSON does (the Unicode line and bidi characters stay
//! string content there: no JSON reader takes them for a line end). Invalid UTF-8 never reaches a field: the codec refuses it,
//! and what is shown of raw bytes is shown lossily.

use std::fmt::{self, Write};

use tracing_subscriber::field::MakeExt;
use tracing_subscriber::fmt::format::{Writer, debug_fn};

/// The log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    /// From `THINGSGATE_LOG_FORMAT`; anything else is an error naming the choices.
    pub fn from_env() -> Result<Self, String> {
        match std::env::var("THINGSGATE_LOG_FORMAT").as_deref() {
            Err(_) | Ok("" | "text") => Ok(LogFormat::Text),
            Ok("json") => Ok(LogFormat::Json),
            Ok(other) => Err(format!(
                "THINGSGATE_LOG_FORMAT is `{}`: expected `text` or `json`",
                other.escape_debug()
            )),
        }
    }
}

/// Installs the global subscriber (once; later calls do nothing).
pub fn init(format: LogFormat) {
    let filter = std::env::var("THINGSGATE_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_owned());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .fmt_fields(
                debug_fn(|writer: &mut Writer<'_>, field, value| {
                    if field.name() != "message" {
                        write!(writer, "{}=", field.name())?;
                    }
                    write!(Escaping(writer), "{value:?}")
                })
                .delimited(" "),
            )
            .try_init(),
    };
}

/// A writer that escapes every character that could break a log line or drive a terminal.
#[derive(Debug)]
pub struct Escaping<W>(pub W);

/// Whether `c` is written escaped: control characters (C0, DEL, C1), the Unicode line and
/// paragraph separators, and the bidirectional marks, embeddings, overrides and isolates (they
/// reorder what a reader sees).
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
        )
}

impl<W: Write> Write for Escaping<W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let mut rest = text;
        while let Some((at, c)) = rest.char_indices().find(|&(_, c)| needs_escape(c)) {
            let (clean, tail) = rest.split_at(at);
            self.0.write_str(clean)?;
            write!(self.0, "\\u{{{:x}}}", u32::from(c))?;
            rest = tail.get(c.len_utf8()..).unwrap_or_default();
        }
        self.0.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Write;

    use super::Escaping;

    fn escaped(text: &str) -> String {
        let mut out = String::new();
        let _ = Escaping(&mut out).write_str(text);
        out
    }

    #[test]
    fn control_characters_and_line_breaks_are_escaped() {
        assert_eq!(escaped("dev-1"), "dev-1");
        assert_eq!(
            escaped("a\nb\r\u{1b}[31mc\u{7f}\u{85}"),
            "a\\u{a}b\\u{d}\\u{1b}[31mc\\u{7f}\\u{85}"
        );
        assert_eq!(escaped("x\u{2028}y\u{202e}z"), "x\\u{2028}y\\u{202e}z");
        assert_eq!(escaped("grüße ✓"), "grüße ✓");
    }
}
