//! Ditto's errors: `{status, error, message, description}`, with Ditto's error codes.

use std::fmt;

use serde_json::{Value, json};

/// An error as the Ditto protocol carries it (in an error response's `value`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DittoError {
    /// HTTP-like status: 400, 403, 404, 409, 412, 413, …
    pub status: u16,
    /// Ditto's error code, e.g. `things:feature.property.notmodifiable`.
    pub error: &'static str,
    pub message: String,
    pub description: Option<String>,
}

impl DittoError {
    pub fn new(status: u16, error: &'static str, message: impl Into<String>) -> Self {
        DittoError {
            status,
            error,
            message: message.into(),
            description: None,
        }
    }

    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }

    /// 400 `things:json.invalid`.
    pub fn json_invalid(message: impl Into<String>) -> Self {
        DittoError::new(400, "things:json.invalid", message)
    }

    /// 400 `things:id.invalid`.
    pub fn id_invalid(message: impl Into<String>) -> Self {
        DittoError::new(400, "things:id.invalid", message)
    }

    /// 412 `things:condition.failed` (a conditional header did not hold).
    pub fn condition_failed(message: impl Into<String>) -> Self {
        DittoError::new(412, "things:condition.failed", message)
    }

    /// 413 `things:thing.toolarge`.
    pub fn too_large(message: impl Into<String>) -> Self {
        DittoError::new(413, "things:thing.toolarge", message)
    }

    /// The error as JSON, as Ditto writes it.
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::Map::new();
        v.insert("status".into(), json!(self.status));
        v.insert("error".into(), json!(self.error));
        v.insert("message".into(), json!(self.message));
        if let Some(d) = &self.description {
            v.insert("description".into(), json!(d));
        }
        Value::Object(v)
    }
}

impl fmt::Display for DittoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.status, self.error, self.message)
    }
}

impl std::error::Error for DittoError {}
