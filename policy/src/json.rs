//! Policy JSON in and out.
//!
//! Parsing walks a `serde_json::Value` by hand so that every refusal names the JSON pointer of the
//! offending value and the reason. It never panics: nesting is bounded by serde_json's recursion
//! limit and every lookup is checked.

use std::fmt;

use indexmap::IndexMap;
use serde_json::{Map, Value};

use crate::model::{
    Effects, IdError, Importable, Label, NamespacePattern, Permission, Permissions, Policy,
    PolicyEntry, PolicyId, PolicyImport, ResourceKey, ResourceKeyError, Subject, SubjectId,
};
use crate::timestamp::Timestamp;

/// Why a policy document was refused, and where (`path` is a JSON pointer).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}{reason}", at(path))]
pub struct PolicyJsonError {
    /// JSON pointer to the refused value (`""` is the document itself).
    pub path: String,
    pub reason: Reason,
}

fn at(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!("at `{path}`: ")
    }
}

/// The reason part of a [`PolicyJsonError`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Reason {
    #[error("invalid JSON: {0}")]
    Syntax(String),
    #[error("expected {expected}, found {found}")]
    WrongType {
        expected: &'static str,
        found: &'static str,
    },
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    #[error("unknown field `{field}` (expected one of {expected})")]
    UnknownField {
        field: String,
        expected: &'static str,
    },
    #[error("unknown permission `{0}` (expected READ, WRITE, EXECUTE or CREATE)")]
    UnknownPermission(String),
    #[error("unknown importable `{0}` (expected implicit, explicit or never)")]
    UnknownImportable(String),
    #[error(transparent)]
    Resource(#[from] ResourceKeyError),
    #[error("resource `{this}` is the same resource as `{earlier}` in this entry")]
    DuplicateResource { this: String, earlier: String },
    #[error(transparent)]
    Id(#[from] IdError),
    #[error("invalid expiry `{text}`: {reason} (expected RFC 3339, e.g. `2026-12-31T23:59:59Z`)")]
    Expiry { text: String, reason: String },
    #[error("`_revision` must be a non-negative integer")]
    Revision,
}

type Result<T> = std::result::Result<T, PolicyJsonError>;

/// A JSON pointer under construction (`~` and `/` in keys escaped as RFC 6901 says).
#[derive(Clone, Copy)]
struct Path<'a> {
    parent: Option<&'a Path<'a>>,
    key: &'a str,
}

impl<'a> Path<'a> {
    const ROOT: Path<'static> = Path {
        parent: None,
        key: "",
    };

    fn child(&'a self, key: &'a str) -> Path<'a> {
        Path {
            parent: Some(self),
            key,
        }
    }

    fn error(&self, reason: impl Into<Reason>) -> PolicyJsonError {
        PolicyJsonError {
            path: self.to_string(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(parent) = self.parent {
            parent.fmt(f)?;
            write!(f, "/{}", self.key.replace('~', "~0").replace('/', "~1"))?;
        }
        Ok(())
    }
}

/// How an error names the JSON type it found, with its article: "null", "a boolean",
/// "a number", "a string", "an array", "an object". Shared with `twin`, whose errors word JSON
/// types the same way.
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn object<'v>(v: &'v Value, path: &Path) -> Result<&'v Map<String, Value>> {
    v.as_object().ok_or_else(|| {
        path.error(Reason::WrongType {
            expected: "an object",
            found: type_name(v),
        })
    })
}

fn array<'v>(v: &'v Value, path: &Path) -> Result<&'v Vec<Value>> {
    v.as_array().ok_or_else(|| {
        path.error(Reason::WrongType {
            expected: "an array",
            found: type_name(v),
        })
    })
}

fn string<'v>(v: &'v Value, path: &Path) -> Result<&'v str> {
    v.as_str().ok_or_else(|| {
        path.error(Reason::WrongType {
            expected: "a string",
            found: type_name(v),
        })
    })
}

fn required<'v>(
    obj: &'v Map<String, Value>,
    field: &'static str,
    path: &Path,
) -> Result<&'v Value> {
    obj.get(field)
        .ok_or_else(|| path.error(Reason::MissingField(field)))
}

fn known_fields(
    obj: &Map<String, Value>,
    allowed: &[&str],
    expected: &'static str,
    path: &Path,
) -> Result<()> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(field) => Err(path.error(Reason::UnknownField {
            field: field.clone(),
            expected,
        })),
        None => Ok(()),
    }
}

/// Parses policy JSON text.
pub fn parse_policy(text: &str) -> Result<Policy> {
    let value: Value = serde_json::from_str(text).map_err(|e| PolicyJsonError {
        path: String::new(),
        reason: Reason::Syntax(e.to_string()),
    })?;
    policy_from_value(&value)
}

/// Builds a policy from parsed JSON.
pub fn policy_from_value(value: &Value) -> Result<Policy> {
    let root = Path::ROOT;
    let obj = object(value, &root)?;
    let mut policy = Policy::default();
    for (field, v) in obj {
        let path = root.child(field);
        match field.as_str() {
            "policyId" => {
                policy.policy_id =
                    Some(PolicyId::parse(string(v, &path)?).map_err(|e| path.error(e))?)
            }
            "entries" => {
                for (label, entry) in object(v, &path)? {
                    let entry_path = path.child(label);
                    let label = Label::parse(label).map_err(|e| entry_path.error(e))?;
                    policy
                        .entries
                        .insert(label, entry_from_value(entry, &entry_path)?);
                }
            }
            "imports" => {
                for (id, import) in object(v, &path)? {
                    let import_path = path.child(id);
                    let id = PolicyId::parse(id).map_err(|e| import_path.error(e))?;
                    policy
                        .imports
                        .insert(id, import_from_value(import, &import_path)?);
                }
            }
            "_revision" => {
                policy.revision = Some(v.as_u64().ok_or_else(|| path.error(Reason::Revision))?);
            }
            other if other.starts_with('_') => {
                policy.metadata.insert(other.to_owned(), v.clone());
            }
            other => {
                return Err(root.error(Reason::UnknownField {
                    field: other.to_owned(),
                    expected: "policyId, entries, imports or `_`-prefixed fields",
                }));
            }
        }
    }
    if !obj.contains_key("entries") {
        return Err(root.error(Reason::MissingField("entries")));
    }
    Ok(policy)
}

fn entry_from_value(value: &Value, path: &Path) -> Result<PolicyEntry> {
    let obj = object(value, path)?;
    known_fields(
        obj,
        &["subjects", "resources", "namespaces", "importable"],
        "subjects, resources, namespaces or importable",
        path,
    )?;
    let mut entry = PolicyEntry::default();

    let subjects_path = path.child("subjects");
    for (id, subject) in object(required(obj, "subjects", path)?, &subjects_path)? {
        let subject_path = subjects_path.child(id);
        let id = SubjectId::parse(id).map_err(|e| subject_path.error(e))?;
        entry
            .subjects
            .insert(id, subject_from_value(subject, &subject_path)?);
    }

    let resources_path = path.child("resources");
    let mut spelled: IndexMap<ResourceKey, &str> = IndexMap::new();
    for (key, effects) in object(required(obj, "resources", path)?, &resources_path)? {
        let resource_path = resources_path.child(key);
        let parsed = ResourceKey::parse(key).map_err(|e| resource_path.error(e))?;
        if let Some(earlier) = spelled.insert(parsed.clone(), key) {
            return Err(resource_path.error(Reason::DuplicateResource {
                this: key.clone(),
                earlier: earlier.to_owned(),
            }));
        }
        entry
            .resources
            .insert(parsed, effects_from_value(effects, &resource_path)?);
    }

    if let Some(v) = obj.get("namespaces") {
        let ns_path = path.child("namespaces");
        let mut patterns = Vec::new();
        for (i, p) in array(v, &ns_path)?.iter().enumerate() {
            let index = i.to_string();
            let p_path = ns_path.child(&index);
            patterns
                .push(NamespacePattern::parse(string(p, &p_path)?).map_err(|e| p_path.error(e))?);
        }
        entry.namespaces = Some(patterns);
    }
    if let Some(v) = obj.get("importable") {
        let imp_path = path.child("importable");
        let text = string(v, &imp_path)?;
        entry.importable = Importable::parse(text)
            .ok_or_else(|| imp_path.error(Reason::UnknownImportable(text.to_owned())))?;
    }
    Ok(entry)
}

fn subject_from_value(value: &Value, path: &Path) -> Result<Subject> {
    let obj = object(value, path)?;
    known_fields(
        obj,
        &["type", "expiry", "announcement"],
        "type, expiry or announcement",
        path,
    )?;
    let type_path = path.child("type");
    let kind = string(required(obj, "type", path)?, &type_path)?.to_owned();
    let expiry = match obj.get("expiry") {
        None => None,
        Some(v) => {
            let expiry_path = path.child("expiry");
            let text = string(v, &expiry_path)?;
            Some(Timestamp::parse_rfc3339(text).map_err(|reason| {
                expiry_path.error(Reason::Expiry {
                    text: text.to_owned(),
                    reason,
                })
            })?)
        }
    };
    Ok(Subject {
        kind,
        expiry,
        announcement: obj.get("announcement").cloned(),
    })
}

fn effects_from_value(value: &Value, path: &Path) -> Result<Effects> {
    let obj = object(value, path)?;
    known_fields(obj, &["grant", "revoke"], "grant or revoke", path)?;
    let list = |field: &'static str| -> Result<Permissions> {
        let list_path = path.child(field);
        let Some(v) = obj.get(field) else {
            return Ok(Permissions::NONE);
        };
        let mut set = Permissions::NONE;
        for (i, p) in array(v, &list_path)?.iter().enumerate() {
            let index = i.to_string();
            let p_path = list_path.child(&index);
            let text = string(p, &p_path)?;
            set.insert(
                Permission::parse(text)
                    .ok_or_else(|| p_path.error(Reason::UnknownPermission(text.to_owned())))?,
            );
        }
        Ok(set)
    };
    Ok(Effects {
        grant: list("grant")?,
        revoke: list("revoke")?,
    })
}

fn import_from_value(value: &Value, path: &Path) -> Result<PolicyImport> {
    let obj = object(value, path)?;
    known_fields(obj, &["entries"], "entries", path)?;
    let mut import = PolicyImport::default();
    if let Some(v) = obj.get("entries") {
        let entries_path = path.child("entries");
        for (i, label) in array(v, &entries_path)?.iter().enumerate() {
            let index = i.to_string();
            let label_path = entries_path.child(&index);
            import
                .entries
                .push(Label::parse(string(label, &label_path)?).map_err(|e| label_path.error(e))?);
        }
    }
    Ok(import)
}

fn permissions_to_value(set: Permissions) -> Value {
    Value::Array(set.iter().map(|p| Value::from(p.as_str())).collect())
}

/// Writes a policy as Ditto JSON; [`policy_from_value`] of the result gives the same policy.
pub fn policy_to_value(policy: &Policy) -> Value {
    let mut root = Map::new();
    if let Some(id) = &policy.policy_id {
        root.insert("policyId".into(), Value::from(id.as_str()));
    }
    if !policy.imports.is_empty() {
        let imports = policy
            .imports
            .iter()
            .map(|(id, import)| {
                let labels = import
                    .entries
                    .iter()
                    .map(|l| Value::from(l.as_str()))
                    .collect();
                let mut obj = Map::new();
                obj.insert("entries".into(), Value::Array(labels));
                (id.as_str().to_owned(), Value::Object(obj))
            })
            .collect();
        root.insert("imports".into(), Value::Object(imports));
    }
    let entries = policy
        .entries
        .iter()
        .map(|(label, entry)| (label.as_str().to_owned(), entry_to_value(entry)))
        .collect();
    root.insert("entries".into(), Value::Object(entries));
    if let Some(revision) = policy.revision {
        root.insert("_revision".into(), Value::from(revision));
    }
    for (field, v) in &policy.metadata {
        root.insert(field.clone(), v.clone());
    }
    Value::Object(root)
}

fn entry_to_value(entry: &PolicyEntry) -> Value {
    let subjects = entry
        .subjects
        .iter()
        .map(|(id, s)| {
            let mut obj = Map::new();
            obj.insert("type".into(), Value::from(s.kind.as_str()));
            if let Some(expiry) = s.expiry {
                obj.insert("expiry".into(), Value::from(expiry.to_string()));
            }
            if let Some(announcement) = &s.announcement {
                obj.insert("announcement".into(), announcement.clone());
            }
            (id.as_str().to_owned(), Value::Object(obj))
        })
        .collect();
    let resources = entry
        .resources
        .iter()
        .map(|(key, effects)| {
            let mut obj = Map::new();
            obj.insert("grant".into(), permissions_to_value(effects.grant));
            obj.insert("revoke".into(), permissions_to_value(effects.revoke));
            (key.to_string(), Value::Object(obj))
        })
        .collect();
    let mut obj = Map::new();
    obj.insert("subjects".into(), Value::Object(subjects));
    obj.insert("resources".into(), Value::Object(resources));
    if let Some(patterns) = &entry.namespaces {
        let list = patterns
            .iter()
            .map(|p| Value::from(p.to_string()))
            .collect();
        obj.insert("namespaces".into(), Value::Array(list));
    }
    if entry.importable != Importable::Implicit {
        obj.insert("importable".into(), Value::from(entry.importable.as_str()));
    }
    Value::Object(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> PolicyJsonError {
        parse_policy(text).unwrap_err()
    }

    #[test]
    fn json_types_are_named_with_their_article_for_error_messages() {
        let names: Vec<&str> = ["null", "true", "1.5", "\"x\"", "[]", "{}"]
            .iter()
            .map(|text| type_name(&serde_json::from_str(text).unwrap()))
            .collect();
        assert_eq!(
            names,
            [
                "null",
                "a boolean",
                "a number",
                "a string",
                "an array",
                "an object"
            ]
        );
        let e = err(r#"{"entries":{"e":{"subjects":[],"resources":{}}}}"#);
        assert!(e.to_string().contains("found an array"), "{e}");
    }

    #[test]
    fn unknown_permission_names_its_json_path() {
        let e = err(r#"{"entries":{"owner":{"subjects":{"g:a":{"type":"t"}},
            "resources":{"thing:/":{"grant":["READ","REED"],"revoke":[]}}}}}"#);
        assert_eq!(e.path, "/entries/owner/resources/thing:~1/grant/1");
        assert_eq!(e.reason, Reason::UnknownPermission("REED".into()));
        assert!(e.to_string().contains("unknown permission `REED`"), "{e}");
    }

    #[test]
    fn resource_without_type_is_refused() {
        let e = err(r#"{"entries":{"e":{"subjects":{},"resources":{"/features":{"grant":[]}}}}}"#);
        assert_eq!(e.path, "/entries/e/resources/~1features");
        assert!(matches!(
            e.reason,
            Reason::Resource(ResourceKeyError::MissingType(_))
        ));
        let e = err(r#"{"entries":{"e":{"subjects":{},"resources":{":/x":{"grant":[]}}}}}"#);
        assert!(matches!(
            e.reason,
            Reason::Resource(ResourceKeyError::MissingType(_))
        ));
        let e = err(r#"{"entries":{"e":{"subjects":{},"resources":{"thingy:/x":{"grant":[]}}}}}"#);
        assert!(matches!(
            e.reason,
            Reason::Resource(ResourceKeyError::UnknownType { .. })
        ));
    }

    #[test]
    fn bad_ids_are_refused() {
        let e = err(r#"{"policyId":"no-colon","entries":{}}"#);
        assert_eq!(e.path, "/policyId");
        assert!(matches!(e.reason, Reason::Id(IdError::NoSeparator(_))));
        let e = err(r#"{"policyId":"1ns:x","entries":{}}"#);
        assert!(matches!(e.reason, Reason::Id(IdError::BadNamespace(_))));
        let e = err(r#"{"policyId":"ns:a/b","entries":{}}"#);
        assert!(matches!(e.reason, Reason::Id(IdError::BadName(_))));
        let e = err(r#"{"policyId":"ns:a+b","entries":{}}"#);
        assert!(matches!(e.reason, Reason::Id(IdError::BadName(_))));
        let e = err(r#"{"entries":{"e":{"subjects":{"nobody":{"type":"t"}},"resources":{}}}}"#);
        assert_eq!(e.path, "/entries/e/subjects/nobody");
        assert!(matches!(e.reason, Reason::Id(IdError::BadSubject(_))));
    }

    #[test]
    fn non_object_entry_is_refused() {
        let e = err(r#"{"entries":{"e":[]}}"#);
        assert_eq!(e.path, "/entries/e");
        assert_eq!(
            e.reason,
            Reason::WrongType {
                expected: "an object",
                found: "an array"
            }
        );
    }

    #[test]
    fn missing_and_unknown_fields_are_refused() {
        assert_eq!(
            err(r#"{"policyId":"a:b"}"#).reason,
            Reason::MissingField("entries")
        );
        let e = err(r#"{"entries":{"e":{"resources":{}}}}"#);
        assert_eq!(
            (e.path.as_str(), e.reason),
            ("/entries/e", Reason::MissingField("subjects"))
        );
        let e = err(r#"{"entires":{}}"#);
        assert!(matches!(e.reason, Reason::UnknownField { .. }), "{e}");
        let e = err(
            r#"{"entries":{"e":{"subjects":{"a:b":{"type":"t","expiry":"soon"}},"resources":{}}}}"#,
        );
        assert_eq!(e.path, "/entries/e/subjects/a:b/expiry");
        assert!(matches!(e.reason, Reason::Expiry { .. }));
    }

    #[test]
    fn keys_that_normalize_alike_are_refused_as_duplicates() {
        let e = err(r#"{"entries":{"e":{"subjects":{},"resources":{"thing:":{},"thing:/":{}}}}}"#);
        assert!(matches!(e.reason, Reason::DuplicateResource { .. }), "{e}");
    }

    #[test]
    fn syntax_errors_say_where() {
        let e = err("{\"entries\": ");
        assert!(matches!(e.reason, Reason::Syntax(_)));
        assert!(e.to_string().contains("line 1"), "{e}");
    }

    #[test]
    fn a_full_policy_round_trips() {
        let text = r#"{"policyId":"org.acme:p","_revision":7,"_created":"2026-01-01T00:00:00Z",
          "imports":{"org.acme:base":{"entries":["EXTRA"]}},
          "entries":{"owner":{"subjects":{"google:a":{"type":"user","expiry":"2030-01-01T00:00:00.5Z"}},
             "resources":{"thing:":{"grant":["WRITE","READ","READ"],"revoke":[]},
                          "thing:/attributes/a~0b//c/":{"grant":[],"revoke":["READ"]},
                          "policy:/":{"grant":["READ","WRITE"],"revoke":[]}},
             "namespaces":["org.acme","org.acme.*"],"importable":"explicit"}}}"#;
        let policy = parse_policy(text).unwrap();
        let written = policy_to_value(&policy);
        let again = policy_from_value(&written).unwrap();
        assert_eq!(policy, again);
        assert_eq!(
            written["entries"]["owner"]["resources"]["thing:/"]["grant"],
            serde_json::json!(["READ", "WRITE"])
        );
        assert!(
            written["entries"]["owner"]["resources"]
                .get("thing:/attributes/a~0b/c")
                .is_some()
        );
    }
}
