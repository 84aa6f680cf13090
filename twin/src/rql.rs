//! Ditto's RQL expressions, as its `condition` header (conditional requests) and its SSE
//! `filter` parameter use them: `eq(attributes/room,"hall")`, `and(gt(_revision,3),
//! exists(features/lamp))`, `like(thingId,"org.acme:*")`.
//!
//! Supported: `and`, `or`, `not`, `eq`, `ne`, `gt`, `ge`, `lt`, `le`, `in`, `like` (`*` any
//! run, `?` one character), `ilike` (the same, case-insensitive), `exists`. Properties are JSON
//! pointers without the leading `/`; values are JSON strings (double quotes), numbers, `true`,
//! `false`, `null`. Evaluation is pure: on a JSON value given by the caller, which decides what
//! the requester may see of it (a property it cannot read is absent).

use std::cmp::Ordering;

use serde_json::Value;

use crate::entity::path_segments;
use crate::error::DittoError;

/// A parsed expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Rql {
    And(Vec<Rql>),
    Or(Vec<Rql>),
    Not(Box<Rql>),
    Compare(Op, String, Value),
    In(String, Vec<Value>),
    Like {
        property: String,
        pattern: String,
        case_insensitive: bool,
    },
    Exists(String),
}

/// A comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
}

fn invalid(text: &str, why: impl std::fmt::Display) -> DittoError {
    DittoError::new(
        400,
        "rql.expression.invalid",
        format!("the RQL expression `{text}` is invalid: {why}"),
    )
    .with_description("E.g. `and(eq(attributes/room,\"hall\"),gt(_revision,2))`.")
}

/// Deepest nesting accepted (an expression is attacker input).
const MAX_DEPTH: usize = 32;

impl Rql {
    /// Parses `text` (400 `rql.expression.invalid` with what is wrong).
    pub fn parse(text: &str) -> Result<Rql, DittoError> {
        let mut parser = Parser { text, pos: 0 };
        let rql = parser.expression(0)?;
        parser.skip_spaces();
        if parser.pos != text.len() {
            return Err(invalid(text, format!("unexpected text at {}", parser.pos)));
        }
        Ok(rql)
    }

    /// Whether `value` satisfies the expression.
    pub fn matches(&self, value: &Value) -> bool {
        match self {
            Rql::And(all) => all.iter().all(|q| q.matches(value)),
            Rql::Or(any) => any.iter().any(|q| q.matches(value)),
            Rql::Not(q) => !q.matches(value),
            Rql::Exists(property) => lookup(value, property).is_some(),
            Rql::In(property, values) => {
                lookup(value, property).is_some_and(|v| values.iter().any(|w| equal(v, w)))
            }
            Rql::Like {
                property,
                pattern,
                case_insensitive,
            } => lookup(value, property)
                .and_then(Value::as_str)
                .is_some_and(|s| {
                    if *case_insensitive {
                        like(&s.to_lowercase(), &pattern.to_lowercase())
                    } else {
                        like(s, pattern)
                    }
                }),
            Rql::Compare(op, property, expected) => {
                let Some(actual) = lookup(value, property) else {
                    return *op == Op::Ne;
                };
                match op {
                    Op::Eq => equal(actual, expected),
                    Op::Ne => !equal(actual, expected),
                    Op::Gt => order(actual, expected) == Some(Ordering::Greater),
                    Op::Ge => matches!(
                        order(actual, expected),
                        Some(Ordering::Greater | Ordering::Equal)
                    ),
                    Op::Lt => order(actual, expected) == Some(Ordering::Less),
                    Op::Le => matches!(
                        order(actual, expected),
                        Some(Ordering::Less | Ordering::Equal)
                    ),
                }
            }
        }
    }
}

fn lookup<'v>(value: &'v Value, property: &str) -> Option<&'v Value> {
    let mut at = value;
    for segment in path_segments(property) {
        at = at.as_object()?.get(segment.as_ref())?;
    }
    Some(at)
}

fn equal(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) if a.is_number() && b.is_number() => x == y,
        _ => a == b,
    }
}

fn order(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

/// `*` matches any run of characters, `?` one.
fn like(text: &str, pattern: &str) -> bool {
    let t: Vec<char> = text.chars().collect();
    let p: Vec<char> = pattern.chars().collect();
    // Iterative wildcard matching with one backtrack point (linear in practice).
    let (mut ti, mut pi) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || t.get(ti) == Some(&c) => {
                ti += 1;
                pi += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p.get(pi..)
        .is_some_and(|rest| rest.iter().all(|&c| c == '*'))
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn rest(&self) -> &str {
        self.text.get(self.pos..).unwrap_or_default()
    }

    fn skip_spaces(&mut self) {
        let trimmed = self.rest().trim_start();
        self.pos = self.text.len() - trimmed.len();
    }

    fn expect(&mut self, c: char) -> Result<(), DittoError> {
        self.skip_spaces();
        if self.rest().starts_with(c) {
            self.pos += c.len_utf8();
            Ok(())
        } else {
            Err(invalid(
                self.text,
                format!("expected `{c}` at {}", self.pos),
            ))
        }
    }

    fn name(&mut self) -> &str {
        self.skip_spaces();
        let rest = self.rest();
        let len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let start = self.pos;
        self.pos += len;
        self.text.get(start..self.pos).unwrap_or_default()
    }

    fn property(&mut self) -> Result<String, DittoError> {
        self.skip_spaces();
        let rest = self.rest();
        let len = rest.find([',', ')']).unwrap_or(rest.len());
        let property = rest.get(..len).unwrap_or_default().trim().to_owned();
        if property.is_empty() {
            return Err(invalid(
                self.text,
                format!("a property is missing at {}", self.pos),
            ));
        }
        self.pos += len;
        Ok(property.trim_start_matches('/').to_owned())
    }

    fn value(&mut self) -> Result<Value, DittoError> {
        self.skip_spaces();
        let rest = self.rest();
        if rest.starts_with('"') {
            // A JSON string: up to the closing quote not escaped.
            let mut escaped = false;
            let end = rest
                .char_indices()
                .skip(1)
                .find(|&(_, c)| {
                    let close = c == '"' && !escaped;
                    escaped = c == '\\' && !escaped;
                    close
                })
                .map(|(i, _)| i)
                .ok_or_else(|| invalid(self.text, "a string is not closed"))?;
            let literal = rest.get(..=end).unwrap_or_default();
            let value = serde_json::from_str(literal).map_err(|e| invalid(self.text, e))?;
            self.pos += end + 1;
            return Ok(value);
        }
        let len = rest.find([',', ')']).unwrap_or(rest.len());
        let literal = rest.get(..len).unwrap_or_default().trim();
        let value: Value = serde_json::from_str(literal)
            .map_err(|_| invalid(self.text, format!("`{literal}` is not a value")))?;
        if value.is_object() || value.is_array() {
            return Err(invalid(
                self.text,
                "values are strings, numbers, booleans or null",
            ));
        }
        self.pos += len;
        Ok(value)
    }

    fn expression(&mut self, depth: usize) -> Result<Rql, DittoError> {
        if depth > MAX_DEPTH {
            return Err(invalid(self.text, "nested too deep"));
        }
        let name = self.name().to_owned();
        self.expect('(')?;
        let rql = match name.as_str() {
            "and" | "or" => {
                let mut parts = vec![self.expression(depth + 1)?];
                loop {
                    self.skip_spaces();
                    if self.rest().starts_with(',') {
                        self.pos += 1;
                        parts.push(self.expression(depth + 1)?);
                    } else {
                        break;
                    }
                }
                if name == "and" {
                    Rql::And(parts)
                } else {
                    Rql::Or(parts)
                }
            }
            "not" => Rql::Not(Box::new(self.expression(depth + 1)?)),
            "exists" => Rql::Exists(self.property()?),
            "eq" | "ne" | "gt" | "ge" | "lt" | "le" => {
                let property = self.property()?;
                self.expect(',')?;
                let value = self.value()?;
                let op = match name.as_str() {
                    "eq" => Op::Eq,
                    "ne" => Op::Ne,
                    "gt" => Op::Gt,
                    "ge" => Op::Ge,
                    "lt" => Op::Lt,
                    _ => Op::Le,
                };
                Rql::Compare(op, property, value)
            }
            "in" => {
                let property = self.property()?;
                let mut values = Vec::new();
                loop {
                    self.skip_spaces();
                    if !self.rest().starts_with(',') {
                        break;
                    }
                    self.pos += 1;
                    values.push(self.value()?);
                }
                if values.is_empty() {
                    return Err(invalid(self.text, "`in` needs at least one value"));
                }
                Rql::In(property, values)
            }
            "like" | "ilike" => {
                let property = self.property()?;
                self.expect(',')?;
                let Value::String(pattern) = self.value()? else {
                    return Err(invalid(self.text, "`like` takes a string pattern"));
                };
                Rql::Like {
                    property,
                    pattern,
                    case_insensitive: name == "ilike",
                }
            }
            other => return Err(invalid(self.text, format!("unknown operator `{other}`"))),
        };
        self.expect(')')?;
        Ok(rql)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::Rql;

    fn check(expression: &str) -> bool {
        let thing = json!({
            "thingId": "org.acme:lamp-1",
            "_revision": 4,
            "attributes": {"room": "hall", "floor": 2, "tags": ["a"], "on": true},
            "features": {"power": {"properties": {"watts": 12.5}}}
        });
        Rql::parse(expression).unwrap().matches(&thing)
    }

    #[test]
    fn comparisons_logic_and_patterns_evaluate_as_in_ditto() {
        assert!(check(r#"eq(attributes/room,"hall")"#));
        assert!(!check(r#"eq(attributes/room,"kitchen")"#));
        assert!(check(r#"ne(attributes/room,"kitchen")"#));
        assert!(check("ne(attributes/missing,1)"));
        assert!(check("eq(attributes/floor,2.0)"));
        assert!(check("gt(features/power/properties/watts,10)"));
        assert!(!check("lt(features/power/properties/watts,10)"));
        assert!(check("ge(_revision,4)") && check("le(_revision,4)"));
        assert!(check("eq(attributes/on,true)"));
        assert!(check(r#"in(attributes/room,"kitchen","hall")"#));
        assert!(check(r#"like(thingId,"org.acme:lamp-?")"#));
        assert!(check(r#"like(thingId,"*lamp*")"#));
        assert!(!check(r#"like(thingId,"lamp*")"#));
        assert!(check(r#"ilike(attributes/room,"HA*")"#));
        assert!(check("exists(features/power)"));
        assert!(!check("exists(features/heat)"));
        assert!(check(
            r#"and(eq(attributes/room,"hall"),not(exists(attributes/secret)))"#
        ));
        assert!(check(r#"or(eq(attributes/room,"x"), gt(_revision, 3))"#));
        assert!(
            !check(r#"gt(attributes/room,3)"#),
            "a string is not ordered against a number"
        );
    }

    #[test]
    fn malformed_expressions_are_refused_with_a_reason() {
        for bad in [
            "",
            "eq(a)",
            "eq(a,1",
            "foo(a,1)",
            "eq(a,{})",
            r#"eq(a,"open)"#,
            "and()",
            "in(a)",
            "eq(a,1) trailing",
            &"not(".repeat(40),
        ] {
            let e = Rql::parse(bad).unwrap_err();
            assert_eq!(
                (e.status, e.error),
                (400, "rql.expression.invalid"),
                "{bad}"
            );
        }
    }
}
