//! Policy test vectors: one JSON object per line, each a decision the enforcer must reproduce.
//!
//! The format is the one of the shared test vectors (`kind` `check` or `view`; see the README
//! beside `ditto-policy.jsonl`). A `permission` is one name or a list: a check then needs each
//! permission on its own, a view keeps what the subjects hold every permission of the list on.
//! Users write such files to test their own policies, and `thingsgate policy test FILE.jsonl`
//! runs them through [`run_vectors`].

use std::fmt;
use std::sync::Arc;

use serde_json::Value;

use crate::enforcer::{Enforcer, Mode};
use crate::json::{PolicyJsonError, policy_from_value};
use crate::model::{Permission, Permissions, ResourceKey, ResourceKeyError};
use crate::timestamp::Timestamp;

/// The top-level fields a thing retrieve returns whenever the requester has partial READ on
/// `thing:/`, whatever the policy says about them (Ditto's allowlist).
pub const THING_RESPONSE_FIELDS: [&str; 5] = [
    "thingId",
    "_namespace",
    "_revision",
    "_modified",
    "_created",
];

/// Why a vector line could not be run at all.
#[derive(Debug, thiserror::Error)]
pub enum VectorError {
    #[error("not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("field `{field}`: {reason}")]
    Field { field: &'static str, reason: String },
    #[error("field `policy`: {0}")]
    Policy(#[from] PolicyJsonError),
    #[error("field `resource`: {0}")]
    Resource(#[from] ResourceKeyError),
}

fn field_error(field: &'static str, reason: impl Into<String>) -> VectorError {
    VectorError::Field {
        field,
        reason: reason.into(),
    }
}

/// The result of one vector that could be run.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Pass,
    Fail { expected: String, actual: String },
}

/// One line's result.
#[derive(Debug)]
pub struct VectorResult {
    /// 1-based line number in the file.
    pub line: usize,
    /// The vector's `id` (or `line N` when it has none).
    pub id: String,
    pub outcome: Result<Outcome, VectorError>,
}

impl VectorResult {
    pub fn passed(&self) -> bool {
        matches!(self.outcome, Ok(Outcome::Pass))
    }
}

impl fmt::Display for VectorResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            Ok(Outcome::Pass) => write!(f, "ok line {}: {}", self.line, self.id),
            Ok(Outcome::Fail { expected, actual }) => write!(
                f,
                "FAIL line {}: {}: expected {expected}, got {actual}",
                self.line, self.id
            ),
            Err(e) => write!(f, "ERROR line {}: {}: {e}", self.line, self.id),
        }
    }
}

/// Runs every non-blank line of a vector file. `now` decides subject expiry.
pub fn run_vectors(text: &str, now: Timestamp) -> Vec<VectorResult> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            let parsed: Result<Value, _> = serde_json::from_str(line);
            let id = parsed
                .as_ref()
                .ok()
                .and_then(|v| v.get("id"))
                .and_then(Value::as_str)
                .map_or_else(|| format!("line {}", i + 1), str::to_owned);
            VectorResult {
                line: i + 1,
                id,
                outcome: parsed
                    .map_err(VectorError::from)
                    .and_then(|v| run_vector(&v, now)),
            }
        })
        .collect()
}

fn str_field<'v>(v: &'v Value, field: &'static str) -> Result<&'v str, VectorError> {
    v.get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| field_error(field, "missing or not a string"))
}

/// Runs one vector.
pub fn run_vector(vector: &Value, now: Timestamp) -> Result<Outcome, VectorError> {
    let policy = policy_from_value(
        vector
            .get("policy")
            .ok_or_else(|| field_error("policy", "missing"))?,
    )?;
    let subjects: Vec<&str> = vector
        .get("subjects")
        .and_then(Value::as_array)
        .ok_or_else(|| field_error("subjects", "missing or not an array"))?
        .iter()
        .map(|s| {
            s.as_str()
                .ok_or_else(|| field_error("subjects", "every subject must be a string"))
        })
        .collect::<Result<_, _>>()?;
    let resource = ResourceKey::parse(str_field(vector, "resource")?)?;
    let namespace = vector.get("thing_namespace").and_then(Value::as_str);
    let permissions = permissions(vector)?;
    let enforcer = Arc::new(Enforcer::compile(&policy));
    let view = enforcer.for_subjects(&subjects, namespace, now);

    match str_field(vector, "kind")? {
        "check" => {
            let mode = match str_field(vector, "mode")? {
                "unrestricted" => Mode::Unrestricted,
                "partial" => Mode::Partial,
                other => {
                    return Err(field_error(
                        "mode",
                        format!("`{other}` is neither unrestricted nor partial"),
                    ));
                }
            };
            let expect = vector
                .get("expect")
                .and_then(Value::as_bool)
                .ok_or_else(|| field_error("expect", "missing or not a boolean"))?;
            let actual = permissions
                .iter()
                .all(|&p| view.check_key(&resource, p, mode));
            Ok(if actual == expect {
                Outcome::Pass
            } else {
                let word = |b: bool| if b { "granted" } else { "denied" };
                let mode = match mode {
                    Mode::Unrestricted => "unrestricted",
                    Mode::Partial => "partial",
                };
                let asked: Vec<&str> = permissions.iter().map(|p| p.as_str()).collect();
                Outcome::Fail {
                    expected: format!(
                        "{} ({mode} {} on {resource})",
                        word(expect),
                        asked.join("+")
                    ),
                    actual: word(actual).to_owned(),
                }
            })
        }
        "view" => {
            // A view with several permissions keeps what the subjects hold all of them on.
            let permissions: Permissions = permissions.iter().copied().collect();
            let whole = vector
                .get("thing")
                .ok_or_else(|| field_error("thing", "missing"))?;
            // `thing` is the JSON at `resource`, or a whole thing that holds it (as Ditto's
            // view tests give it): when the resource's path exists in it, that part is used.
            let thing = resource
                .segments()
                .try_fold(whole, |v, s| v.get(s))
                .unwrap_or(whole);
            let expect = vector
                .get("expect_view")
                .ok_or_else(|| field_error("expect_view", "missing"))?;
            let path = resource
                .segments()
                .fold(String::new(), |acc, s| acc + "/" + &s.replace('~', "~0"));
            let actual = match vector
                .get("layer")
                .and_then(Value::as_str)
                .unwrap_or("enforcer")
            {
                "enforcer" => view.partial_view_for(resource.kind(), &path, thing, permissions),
                "thing-query-response" if path.is_empty() => view.partial_view_with_fields_for(
                    resource.kind(),
                    thing,
                    &THING_RESPONSE_FIELDS,
                    permissions,
                ),
                "thing-query-response" => {
                    view.partial_view_for(resource.kind(), &path, thing, permissions)
                }
                other => return Err(field_error("layer", format!("unknown layer `{other}`"))),
            };
            // `{}` in a vector means "nothing visible".
            let actual = actual.unwrap_or_else(|| Value::Object(serde_json::Map::new()));
            Ok(if &actual == expect {
                Outcome::Pass
            } else {
                Outcome::Fail {
                    expected: expect.to_string(),
                    actual: actual.to_string(),
                }
            })
        }
        other => Err(field_error(
            "kind",
            format!("`{other}` is neither check nor view"),
        )),
    }
}

fn permissions(vector: &Value) -> Result<Vec<Permission>, VectorError> {
    let parse = |v: &Value| {
        v.as_str().and_then(Permission::parse).ok_or_else(|| {
            field_error(
                "permission",
                format!("{v} is not READ, WRITE, EXECUTE or CREATE"),
            )
        })
    };
    match vector.get("permission") {
        Some(Value::Array(list)) if !list.is_empty() => list.iter().map(parse).collect(),
        Some(v @ Value::String(_)) => Ok(vec![parse(v)?]),
        _ => Err(field_error(
            "permission",
            "missing, or neither a string nor a non-empty list",
        )),
    }
}
