//! What each command needs from the policy, and retrieve answers cut to the requester's view.
//!
//! Every command states its [`Requirement`]s (DESIGN.md §1, rules 4–6):
//! - create, modify, delete: WRITE, unrestricted, at the command's path;
//! - merge: WRITE, unrestricted, at every leaf the patch touches (a non-object value or `null`
//!   at its full path; an empty object patch is a leaf at its own path; a patch that is not an
//!   object is one leaf at the command's path), so a merge may change exactly what the
//!   requester could change with one modify per leaf;
//! - retrieve: READ, partial, at the path — the answer is then cut to the requester's view
//!   ([`cut_to_view`]), and nothing visible answers 404.
//!
//! Denials answer as Ditto does: 403 `things:<level>.notmodifiable` for changes, and for
//! retrieves 404 `things:<level>.notfound` — the same answer as for a missing resource, so a
//! requester learns nothing about what it may not read. Policy commands need the same on
//! `policy:` resources, answered with `policies:policy.notmodifiable` / `policies:policy.notfound`.
//!
//! Which policy's view to use, and the solution-level checks made before (namespace ownership,
//! CREATE on `thing:/`), are the caller's business.

use policy::{Mode, Permission, ResourceType, SubjectView};
use serde_json::Value;

use crate::command::{Action, PolicyCommand, ThingCommand};
use crate::error::DittoError;
use crate::path::ThingPath;
use crate::thing;

/// One permission a command needs on one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    /// `thing` for thing commands, `policy` for policy commands.
    pub kind: ResourceType,
    /// The resource path within `kind`, as [`ThingPath`]'s `Display` writes it (`/` for the root,
    /// `~` as `~0`), or the policy command's path.
    pub resource: String,
    pub permission: Permission,
    pub mode: Mode,
}

impl Requirement {
    fn write(kind: ResourceType, resource: String) -> Self {
        Requirement {
            kind,
            resource,
            permission: Permission::Write,
            mode: Mode::Unrestricted,
        }
    }

    fn read(kind: ResourceType, resource: String) -> Self {
        Requirement {
            kind,
            resource,
            permission: Permission::Read,
            mode: Mode::Partial,
        }
    }

    /// Whether `view` grants it.
    pub fn is_met(&self, view: &SubjectView) -> bool {
        view.check(self.kind, &self.resource, self.permission, self.mode)
    }
}

/// Pushes one WRITE requirement per leaf of `patch` below `base` (`""` is the root).
fn merge_leaves(base: String, patch: &Value, out: &mut Vec<Requirement>) {
    // An explicit stack: a patch's depth is the sender's choice.
    let mut stack = vec![(base, patch)];
    while let Some((path, value)) = stack.pop() {
        match value {
            Value::Object(map) if !map.is_empty() => {
                // Reversed, so that leaves come out in key order.
                for (key, child) in map.iter().rev() {
                    stack.push((format!("{path}/{}", key.replace('~', "~0")), child));
                }
            }
            _ => {
                let resource = if path.is_empty() {
                    "/".to_owned()
                } else {
                    path
                };
                out.push(Requirement::write(ResourceType::Thing, resource));
            }
        }
    }
}

/// The requirements of a thing command (see the module docs).
pub fn required_permissions(cmd: &ThingCommand) -> Vec<Requirement> {
    match cmd.action {
        Action::Retrieve => vec![Requirement::read(ResourceType::Thing, cmd.path.to_string())],
        Action::Create | Action::Modify | Action::Delete => vec![Requirement::write(
            ResourceType::Thing,
            cmd.path.to_string(),
        )],
        Action::Merge => {
            let base = if cmd.path.is_root() {
                String::new()
            } else {
                cmd.path.to_string()
            };
            let mut out = Vec::new();
            merge_leaves(base, cmd.value.as_ref().unwrap_or(&Value::Null), &mut out);
            out
        }
    }
}

/// A policy command's path as a `policy:` resource path (always starting with `/`).
fn policy_resource(path: &str) -> String {
    if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    }
}

/// The requirements of a policy command: WRITE unrestricted at its path for changes (a merge
/// included: unrestricted WRITE at the path covers every leaf below it), READ partial for
/// retrieves.
pub fn required_policy_permissions(cmd: &PolicyCommand) -> Vec<Requirement> {
    let resource = policy_resource(&cmd.path);
    match cmd.action {
        Action::Retrieve => vec![Requirement::read(ResourceType::Policy, resource)],
        _ => vec![Requirement::write(ResourceType::Policy, resource)],
    }
}

/// Whether `view` grants a thing command, decided without allocating: `Some` for every
/// command with one requirement (all but merges) whose path has no `~` (its segments are
/// then their own JSON-pointer encoding); `None`: use [`required_permissions`].
pub fn grants_without_allocation(view: &SubjectView, cmd: &ThingCommand) -> Option<bool> {
    let (permission, mode) = match cmd.action {
        Action::Retrieve => (Permission::Read, Mode::Partial),
        Action::Create | Action::Modify | Action::Delete => (Permission::Write, Mode::Unrestricted),
        Action::Merge => return None,
    };
    if cmd.path.segments().iter().any(|s| s.contains('~')) {
        return None;
    }
    let segments = cmd.path.segments().iter().map(String::as_str);
    Some(view.check_segments(ResourceType::Thing, segments, permission, mode))
}

/// The first requirement `view` does not grant, if any.
pub fn first_denied<'r>(
    view: &SubjectView,
    requirements: &'r [Requirement],
) -> Option<&'r Requirement> {
    requirements.iter().find(|r| !r.is_met(view))
}

/// The error for a thing command denied `requirement`: 404 `things:<level>.notfound` for a
/// retrieve (at the command's level), 403 `things:<level>.notmodifiable` for a change (at the
/// level of the denied resource, e.g. one leaf of a merge).
pub fn denied(cmd: &ThingCommand, requirement: &Requirement) -> DittoError {
    if cmd.action == Action::Retrieve {
        return thing::not_found(&cmd.thing_id, &cmd.path);
    }
    let denied_path = ThingPath::parse(&requirement.resource).unwrap_or_else(|_| cmd.path.clone());
    thing::not_modifiable(&cmd.thing_id, &denied_path, &requirement.resource)
}

/// The error for a policy command denied `requirement`: 404 `policies:policy.notfound` for a
/// retrieve, 403 `policies:policy.notmodifiable` for a change.
pub fn policy_denied(cmd: &PolicyCommand, requirement: &Requirement) -> DittoError {
    let id = &cmd.policy_id;
    if cmd.action == Action::Retrieve {
        return DittoError::new(
            404,
            "policies:policy.notfound",
            format!(
                "the policy `{id}` could not be found or the requester had insufficient permissions to access it"
            ),
        )
        .with_description(
            "Check if the ID of the policy was correct and you have sufficient permissions.",
        );
    }
    DittoError::new(
        403,
        "policies:policy.notmodifiable",
        format!(
            "the policy `{id}` could not be modified as the requester had insufficient permissions to modify it (`WRITE` on `policy:{}` is required)",
            requirement.resource
        ),
    )
    .with_description("Check if you have sufficient permissions.")
}

/// Checks every requirement of a thing command; the error of the first denied one.
pub fn authorize_thing_command(view: &SubjectView, cmd: &ThingCommand) -> Result<(), DittoError> {
    match first_denied(view, &required_permissions(cmd)) {
        None => Ok(()),
        Some(requirement) => Err(denied(cmd, requirement)),
    }
}

/// Checks every requirement of a policy command; the error of the first denied one.
pub fn authorize_policy_command(view: &SubjectView, cmd: &PolicyCommand) -> Result<(), DittoError> {
    match first_denied(view, &required_policy_permissions(cmd)) {
        None => Ok(()),
        Some(requirement) => Err(policy_denied(cmd, requirement)),
    }
}

/// A thing retrieve's answer (`value`, found at `path`) cut to what `view` may READ: at the
/// root with `thingId` and the `_` pseudo-fields kept whenever the view has partial READ on
/// `thing:/` (Ditto's allowlist). `None`: nothing is visible, answer 404 ([`denied`]).
pub fn cut_to_view(view: &SubjectView, path: &ThingPath, value: &Value) -> Option<Value> {
    if path.is_root() {
        view.partial_view_with_fields(
            ResourceType::Thing,
            value,
            &policy::vectors::THING_RESPONSE_FIELDS,
        )
    } else {
        view.partial_view(ResourceType::Thing, &path.to_string(), value)
    }
}

/// A thing event's value cut to what `view` may READ, for its delivery: a retrieve's cut
/// ([`cut_to_view`]: a whole-thing value keeps `thingId`), except that a root patch (a merge)
/// of which nothing is visible is `None`, not `{}` — such an event is not delivered at all.
pub fn cut_event_to_view(view: &SubjectView, path: &ThingPath, value: &Value) -> Option<Value> {
    if path.is_root()
        && value.get("thingId").is_none()
        && view.partial_view(ResourceType::Thing, "/", value).is_none()
    {
        return None;
    }
    cut_to_view(view, path, value)
}

/// The fields of a policy answer kept whenever the view has partial READ on `policy:/`.
pub const POLICY_RESPONSE_FIELDS: [&str; 5] = [
    "policyId",
    "_namespace",
    "_revision",
    "_modified",
    "_created",
];

/// A policy retrieve's answer cut to what `view` may READ (see [`cut_to_view`]).
pub fn cut_policy_to_view(view: &SubjectView, path: &str, value: &Value) -> Option<Value> {
    let resource = policy_resource(path);
    if resource.split('/').all(str::is_empty) {
        view.partial_view_with_fields(ResourceType::Policy, value, &POLICY_RESPONSE_FIELDS)
    } else {
        view.partial_view(ResourceType::Policy, &resource, value)
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )]

    use super::*;
    use crate::command::CommandHeaders;
    use crate::id::ThingId;
    use serde_json::json;

    fn merge(path: &str, patch: Value) -> ThingCommand {
        ThingCommand {
            thing_id: ThingId::parse("ns:t").unwrap(),
            action: Action::Merge,
            path: ThingPath::parse(path).unwrap(),
            value: Some(patch),
            headers: CommandHeaders::default(),
        }
    }

    fn resources(reqs: &[Requirement]) -> Vec<&str> {
        reqs.iter().map(|r| r.resource.as_str()).collect()
    }

    #[test]
    fn an_event_cut_to_nothing_is_not_delivered_but_a_whole_thing_keeps_its_id() {
        let policy = policy::policy_from_value(&json!({"policyId": "ns:p", "entries": {"e": {
            "subjects": {"s:a": {"type": "t"}},
            "resources": {"thing:/features": {"grant": ["READ"], "revoke": []}}
        }}}))
        .unwrap();
        let view = std::sync::Arc::new(policy::Enforcer::compile(&policy)).for_subjects(
            &["s:a"],
            Some("ns"),
            policy::Timestamp::from_unix_millis(0),
        );
        let root = ThingPath::parse("/").unwrap();
        // A merge patch touching only attributes: nothing to deliver (a retrieve's cut is `{}`).
        let patch = json!({"attributes": {"a": 2}});
        assert_eq!(cut_to_view(&view, &root, &patch), Some(json!({})));
        assert_eq!(cut_event_to_view(&view, &root, &patch), None);
        // A patch touching features: the visible part.
        let patch = json!({"attributes": {"a": 2}, "features": {"f": {"properties": {"x": 1}}}});
        assert_eq!(
            cut_event_to_view(&view, &root, &patch),
            Some(json!({"features": {"f": {"properties": {"x": 1}}}}))
        );
        // A whole thing (created/modified at the root) keeps its ID, as a retrieve does.
        let thing = json!({"thingId": "ns:t", "attributes": {"a": 1}});
        assert_eq!(
            cut_event_to_view(&view, &root, &thing),
            Some(json!({"thingId": "ns:t"}))
        );
    }

    #[test]
    fn the_allocation_free_check_agrees_with_the_requirements() {
        let policy = policy::policy_from_value(&json!({"policyId": "ns:p", "entries": {"e": {
            "subjects": {"s:a": {"type": "t"}},
            "resources": {
                "thing:/attributes": {"grant": ["READ", "WRITE"], "revoke": []},
                "thing:/attributes/secret": {"grant": [], "revoke": ["READ", "WRITE"]},
                "thing:/features/f/properties": {"grant": ["READ"], "revoke": []}
            }
        }}}))
        .unwrap();
        let view = std::sync::Arc::new(policy::Enforcer::compile(&policy)).for_subjects(
            &["s:a"],
            Some("ns"),
            policy::Timestamp::from_unix_millis(0),
        );
        let paths = [
            "/",
            "/attributes",
            "/attributes/x",
            "/attributes/secret",
            "/attributes/secret/y",
            "/features",
            "/features/f",
            "/features/f/properties/p",
            "/attributes/a~1b",
        ];
        let mut decided = 0;
        for action in [
            Action::Retrieve,
            Action::Create,
            Action::Modify,
            Action::Delete,
            Action::Merge,
        ] {
            for path in paths {
                let mut cmd = merge(path, json!(1));
                cmd.action = action;
                let general = first_denied(&view, &required_permissions(&cmd)).is_none();
                if let Some(fast) = grants_without_allocation(&view, &cmd) {
                    assert_eq!(fast, general, "{action:?} {path}");
                    decided += 1;
                }
            }
        }
        assert_eq!(decided, 4 * (paths.len() - 1));
    }

    #[test]
    fn a_merge_needs_write_on_every_leaf_it_touches() {
        let reqs = required_permissions(&merge(
            "/",
            json!({"attributes": {"a": 1, "b": {"c": null, "d": {}}}, "features": {"f~x": {"properties": {"on": [1]}}}}),
        ));
        assert_eq!(
            resources(&reqs),
            vec![
                "/attributes/a",
                "/attributes/b/c",
                "/attributes/b/d",
                "/features/f~0x/properties/on"
            ]
        );
        assert!(reqs.iter().all(|r| r.kind == ResourceType::Thing
            && r.permission == Permission::Write
            && r.mode == Mode::Unrestricted));
        assert_eq!(
            resources(&required_permissions(&merge("/attributes/a", json!(5)))),
            vec!["/attributes/a"]
        );
        assert_eq!(
            resources(&required_permissions(&merge("/attributes", json!({})))),
            vec!["/attributes"]
        );
        assert_eq!(
            resources(&required_permissions(&merge("/", json!({})))),
            vec!["/"]
        );
        assert_eq!(
            resources(&required_permissions(&merge("/attributes/a", Value::Null))),
            vec!["/attributes/a"]
        );
    }
}
