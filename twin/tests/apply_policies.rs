//! Policy commands: on the whole policy and on its entries, subjects, resources and imports;
//! every result re-parsed by the policy crate and checked for lockout.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use serde_json::{Value, json};
use twin::apply::{Applied, apply_policy_command};
use twin::command::{Action, CommandHeaders, EntityTags, PolicyCommand};
use twin::entity::pointer;
use twin::policy::Timestamp;
use twin::thing::Limits;
use twin::{DittoError, Entity, EventAction, PolicyId};

const ID: &str = "org.acme:policy-1";

fn cmd(action: Action, path: &str, value: Option<Value>) -> PolicyCommand {
    PolicyCommand {
        policy_id: PolicyId::parse(ID).unwrap(),
        action,
        path: path.to_owned(),
        value,
        headers: CommandHeaders::default(),
    }
}

fn policy() -> Value {
    json!({
        "entries": {
            "owner": {
                "subjects": {"issuer:owner": {"type": "user"}},
                "resources": {
                    "policy:/": {"grant": ["READ", "WRITE"], "revoke": []},
                    "thing:/": {"grant": ["READ", "WRITE"], "revoke": []}
                }
            },
            "reader": {
                "subjects": {"issuer:reader": {"type": "user"}},
                "resources": {"thing:/features": {"grant": ["READ"], "revoke": []}}
            }
        }
    })
}

struct Store {
    state: Option<Entity>,
    clock: i64,
}

impl Store {
    fn with(doc: Value) -> Self {
        let mut store = Store {
            state: None,
            clock: 0,
        };
        store.ok(cmd(Action::Create, "/", Some(doc)));
        store
    }

    fn run(&mut self, c: PolicyCommand) -> Result<Applied, DittoError> {
        self.clock += 1;
        let now = Timestamp::from_unix_millis(self.clock);
        let applied = apply_policy_command(self.state.as_ref(), &c, now, &Limits::default())?;
        if let Applied::Change(change) = &applied {
            let state = Entity::apply(self.state.clone(), &change.event).unwrap();
            assert_eq!(
                change.event.revision,
                self.state.as_ref().map_or(1, |e| e.revision + 1)
            );
            if let Some(state) = &state {
                let parsed = twin::policy::policy_from_value(&state.doc).unwrap();
                assert_eq!(
                    parsed.revision, None,
                    "the stored document has no _revision"
                );
                assert_eq!(parsed.policy_id.as_ref().unwrap().as_str(), ID);
                twin::policy::check_lockout(&parsed).unwrap();
            }
            self.state = state;
        }
        Ok(applied)
    }

    fn ok(&mut self, c: PolicyCommand) -> Applied {
        let text = format!("{c:?}");
        self.run(c)
            .unwrap_or_else(|e| panic!("{text} was refused: {e}"))
    }

    fn err(&mut self, c: PolicyCommand) -> DittoError {
        let before = self.state.clone();
        let text = format!("{c:?}");
        let e = match self.run(c) {
            Ok(applied) => panic!("{text} was accepted: {applied:?}"),
            Err(e) => e,
        };
        assert_eq!(self.state, before);
        e
    }

    fn doc(&self) -> &Value {
        &self.state.as_ref().unwrap().doc
    }
}

fn code(e: &DittoError) -> (u16, &str) {
    (e.status, e.error)
}

#[test]
fn create_answers_201_and_stores_the_policy_with_its_id_and_without_revision() {
    let mut body = policy();
    body["_revision"] = json!(9);
    let mut store = Store {
        state: None,
        clock: 0,
    };
    let applied = store.ok(cmd(Action::Create, "/", Some(body)));
    let mut expected = policy();
    expected["policyId"] = json!(ID);
    assert_eq!(applied.status(), 201);
    assert_eq!(applied.response().value.as_ref(), Some(&expected));
    assert_eq!(applied.event().unwrap().action, EventAction::Created);
    assert_eq!(store.doc(), &expected);
    let e = store.err(cmd(Action::Create, "/", Some(policy())));
    assert_eq!(code(&e), (409, "policies:policy.conflict"));
}

#[test]
fn a_body_naming_another_policy_is_refused() {
    let mut body = policy();
    body["policyId"] = json!("org.acme:other");
    let mut store = Store {
        state: None,
        clock: 0,
    };
    let e = store.err(cmd(Action::Create, "/", Some(body)));
    assert_eq!(code(&e), (400, "policies:id.notsettable"));
}

#[test]
fn modify_of_the_whole_policy_creates_or_replaces_it() {
    let mut store = Store {
        state: None,
        clock: 0,
    };
    assert_eq!(
        store.ok(cmd(Action::Modify, "/", Some(policy()))).status(),
        201
    );
    let mut smaller = policy();
    smaller["entries"].as_object_mut().unwrap().remove("reader");
    let applied = store.ok(cmd(Action::Modify, "/", Some(smaller)));
    assert_eq!(applied.status(), 204);
    assert_eq!(applied.event().unwrap().action, EventAction::Modified);
    assert!(pointer(store.doc(), "/entries/reader").is_none());
}

#[test]
fn retrieve_answers_each_part_of_the_policy() {
    let mut store = Store::with(policy());
    let doc = store.doc().clone();
    for (path, expected) in [
        ("/", Some(&doc)),
        ("/entries", pointer(&doc, "/entries")),
        ("/entries/owner", pointer(&doc, "/entries/owner")),
        (
            "/entries/owner/subjects",
            pointer(&doc, "/entries/owner/subjects"),
        ),
        (
            "/entries/owner/subjects/issuer:owner",
            Some(&json!({"type": "user"})),
        ),
        (
            "/entries/owner/resources",
            pointer(&doc, "/entries/owner/resources"),
        ),
        (
            "/entries/reader/resources/thing:/features",
            Some(&json!({"grant": ["READ"], "revoke": []})),
        ),
        // Another spelling of a stored resource finds it.
        (
            "/entries/owner/resources/thing:",
            Some(&json!({"grant": ["READ", "WRITE"], "revoke": []})),
        ),
        ("/imports", Some(&json!({}))),
    ] {
        let applied = store.ok(cmd(Action::Retrieve, path, None));
        assert_eq!(applied.status(), 200, "{path}");
        assert_eq!(applied.response().value.as_ref(), expected, "{path}");
    }
    let fields = store.ok(PolicyCommand {
        headers: CommandHeaders {
            fields: Some("policyId,_revision".into()),
            ..CommandHeaders::default()
        },
        ..cmd(Action::Retrieve, "/", None)
    });
    assert_eq!(
        fields.response().value,
        Some(json!({"policyId": ID, "_revision": 1}))
    );
}

#[test]
fn retrieve_and_delete_of_missing_parts_answer_dittos_not_found_codes() {
    let mut store = Store::with(policy());
    for (path, error) in [
        ("/entries/nobody", "policies:entry.notfound"),
        ("/entries/nobody/subjects", "policies:entry.notfound"),
        (
            "/entries/nobody/resources/thing:/",
            "policies:entry.notfound",
        ),
        (
            "/entries/owner/subjects/issuer:nobody",
            "policies:subject.notfound",
        ),
        (
            "/entries/owner/resources/thing:/attributes",
            "policies:resource.notfound",
        ),
        ("/imports/org.acme:other", "policies:import.notfound"),
    ] {
        let e = store.err(cmd(Action::Retrieve, path, None));
        assert_eq!(code(&e), (404, error), "retrieve {path}");
        let e = store.err(cmd(Action::Delete, path, None));
        assert_eq!(code(&e), (404, error), "delete {path}");
    }
    let mut missing = Store {
        state: None,
        clock: 0,
    };
    for action in [Action::Retrieve, Action::Delete] {
        let e = missing.err(cmd(action, "/", None));
        assert_eq!(code(&e), (404, "policies:policy.notfound"));
    }
    let e = missing.err(cmd(Action::Modify, "/entries/owner", Some(json!({}))));
    assert_eq!(code(&e), (404, "policies:policy.notfound"));
}

#[test]
fn modify_of_an_entry_creates_it_with_201_then_replaces_it_with_204() {
    let mut store = Store::with(policy());
    let entry = json!({
        "subjects": {"issuer:ops": {"type": "group"}},
        "resources": {"thing:/attributes": {"grant": ["READ"], "revoke": []}}
    });
    let applied = store.ok(cmd(Action::Modify, "/entries/ops", Some(entry.clone())));
    assert_eq!(applied.status(), 201);
    assert_eq!(applied.response().value.as_ref(), Some(&entry));
    let event = applied.event().unwrap();
    assert_eq!(
        (event.action, event.path.as_str()),
        (EventAction::Modified, "/entries/ops")
    );
    let applied = store.ok(cmd(Action::Modify, "/entries/ops", Some(entry)));
    assert_eq!(applied.status(), 204);
}

#[test]
fn subjects_and_resources_can_be_added_changed_and_removed() {
    let mut store = Store::with(policy());
    let applied = store.ok(cmd(
        Action::Modify,
        "/entries/reader/subjects/issuer:second",
        Some(json!({"type": "user", "expiry": "2030-01-01T00:00:00Z"})),
    ));
    assert_eq!(applied.status(), 201);
    assert_eq!(
        applied.event().unwrap().path,
        "/entries/reader/subjects/issuer:second"
    );
    // A resource key holds `/`: the event is the whole new resources object of the entry.
    let applied = store.ok(cmd(
        Action::Modify,
        "/entries/reader/resources/thing:/attributes/public",
        Some(json!({"grant": ["READ"], "revoke": []})),
    ));
    assert_eq!(applied.status(), 201);
    let event = applied.event().unwrap();
    assert_eq!(
        (event.action, event.path.as_str()),
        (EventAction::Modified, "/entries/reader/resources")
    );
    assert_eq!(
        pointer(store.doc(), "/entries/reader/resources").unwrap(),
        &json!({
            "thing:/features": {"grant": ["READ"], "revoke": []},
            "thing:/attributes/public": {"grant": ["READ"], "revoke": []}
        })
    );
    // Another spelling of a stored key changes the stored key.
    let applied = store.ok(cmd(
        Action::Modify,
        "/entries/reader/resources/thing:features/",
        Some(json!({"grant": ["READ"], "revoke": ["WRITE"]})),
    ));
    assert_eq!(applied.status(), 204);
    assert_eq!(
        pointer(store.doc(), "/entries/reader/resources")
            .unwrap()
            .as_object()
            .unwrap()
            .len(),
        2
    );
    store.ok(cmd(
        Action::Delete,
        "/entries/reader/resources/thing:/features",
        None,
    ));
    store.ok(cmd(
        Action::Delete,
        "/entries/reader/subjects/issuer:second",
        None,
    ));
    assert_eq!(
        pointer(store.doc(), "/entries/reader").unwrap(),
        &json!({
            "subjects": {"issuer:reader": {"type": "user"}},
            "resources": {"thing:/attributes/public": {"grant": ["READ"], "revoke": []}}
        })
    );
    // Subject IDs may hold `/` too.
    let applied = store.ok(cmd(
        Action::Modify,
        "/entries/reader/subjects/issuer:a/b@c",
        Some(json!({"type": "scope"})),
    ));
    assert_eq!(applied.event().unwrap().path, "/entries/reader/subjects");
    store.ok(cmd(
        Action::Delete,
        "/entries/reader/subjects/issuer:a/b@c",
        None,
    ));
    assert!(pointer(store.doc(), "/entries/reader/subjects/issuer:a~1b@c").is_none());
    store.ok(cmd(Action::Delete, "/entries/reader", None));
    assert!(pointer(store.doc(), "/entries/reader").is_none());
}

#[test]
fn an_invalid_resource_key_is_refused_with_the_json_path_of_the_problem() {
    let mut store = Store::with(policy());
    let e = store.err(cmd(
        Action::Modify,
        "/entries/reader/resources/things:/features",
        Some(json!({"grant": ["READ"], "revoke": []})),
    ));
    assert_eq!(code(&e), (400, "policies:policy.invalid"));
    assert!(
        e.message
            .contains("at `/entries/reader/resources/things:~1features`: resource `things:/features` has unknown type `things`"),
        "{e}"
    );
    let e = store.err(cmd(
        Action::Modify,
        "/entries/reader/resources/thing:/x",
        Some(json!({"grant": ["READ", "FLY"]})),
    ));
    assert!(
        e.message
            .contains("`/entries/reader/resources/thing:~1x/grant/1`"),
        "{e}"
    );
    let e = store.err(cmd(
        Action::Modify,
        "/entries/reader/subjects",
        Some(json!({"nocolon": {"type": "user"}})),
    ));
    assert!(
        e.message.contains("`/entries/reader/subjects/nocolon`"),
        "{e}"
    );
}

#[test]
fn changes_that_would_lock_everyone_out_are_refused() {
    let mut store = Store::with(policy());
    for c in [
        cmd(Action::Delete, "/entries/owner", None),
        cmd(Action::Delete, "/entries/owner/resources/policy:/", None),
        cmd(
            Action::Modify,
            "/entries/owner/resources/policy:/",
            Some(json!({"grant": ["READ"], "revoke": []})),
        ),
        cmd(
            Action::Modify,
            "/entries/owner/resources/policy:/entries",
            Some(json!({"grant": [], "revoke": ["WRITE"]})),
        ),
        cmd(
            Action::Modify,
            "/entries/owner/subjects/issuer:owner",
            Some(json!({"type": "user", "expiry": "2030-01-01T00:00:00Z"})),
        ),
        cmd(Action::Modify, "/entries", Some(json!({}))),
    ] {
        let text = format!("{} {}", c.action.as_str(), c.path);
        let e = store.err(c);
        assert_eq!(
            code(&e),
            (403, "policies:policy.modificationinvalid"),
            "{text}"
        );
        assert!(e.message.contains("lock everyone out"), "{text}: {e}");
    }
    let e = Store {
        state: None,
        clock: 0,
    }
    .err(cmd(Action::Create, "/", Some(json!({"entries": {}}))));
    assert_eq!(code(&e), (403, "policies:policy.modificationinvalid"));
    // The whole policy can always be deleted.
    store.ok(cmd(Action::Delete, "/", None));
    assert!(store.state.is_none());
}

#[test]
fn imports_can_be_set_and_removed() {
    let mut store = Store::with(policy());
    let applied = store.ok(cmd(
        Action::Modify,
        "/imports/org.acme:shared",
        Some(json!({"entries": ["DEFAULT"]})),
    ));
    assert_eq!(applied.status(), 201);
    assert_eq!(
        store
            .ok(cmd(Action::Retrieve, "/imports", None))
            .response()
            .value,
        Some(json!({"org.acme:shared": {"entries": ["DEFAULT"]}}))
    );
    store.ok(cmd(Action::Delete, "/imports/org.acme:shared", None));
    let e = store.err(cmd(
        Action::Modify,
        "/imports/not-an-id",
        Some(json!({"entries": []})),
    ));
    assert_eq!(code(&e), (400, "policies:policy.invalid"));
}

#[test]
fn merge_applies_a_patch_to_the_policy_json() {
    let mut store = Store::with(policy());
    store.ok(cmd(
        Action::Merge,
        "/entries/reader",
        Some(json!({"subjects": {"issuer:reader": null, "issuer:new": {"type": "user"}}})),
    ));
    assert_eq!(
        pointer(store.doc(), "/entries/reader/subjects").unwrap(),
        &json!({"issuer:new": {"type": "user"}})
    );
    store.ok(cmd(
        Action::Merge,
        "/",
        Some(json!({"entries": {"reader": null}})),
    ));
    assert!(pointer(store.doc(), "/entries/reader").is_none());
    store.ok(cmd(
        Action::Merge,
        "/entries/owner/resources/thing:/attributes",
        Some(json!({"grant": [], "revoke": ["READ"]})),
    ));
    let e = store.err(cmd(Action::Merge, "/", Some(json!({"_revision": 3}))));
    assert_eq!(code(&e), (400, "policies:policy.invalid"));
}

#[test]
fn conditional_headers_guard_policy_changes() {
    let mut store = Store::with(policy());
    let mut c = cmd(Action::Delete, "/entries/reader", None);
    c.headers.if_match = EntityTags::parse("\"rev:5\"");
    assert_eq!(code(&store.err(c)), (412, "things:condition.failed"));
    let mut c = cmd(Action::Retrieve, "/", None);
    c.headers.if_none_match = EntityTags::parse("\"rev:1\"");
    assert_eq!(store.ok(c).status(), 304);
    let mut c = cmd(
        Action::Modify,
        "/entries/reader",
        Some(json!({"subjects": {}, "resources": {}})),
    );
    c.headers.if_none_match = EntityTags::parse("*");
    assert_eq!(store.err(c).status, 412);
}

#[test]
fn create_below_the_root_and_paths_outside_a_policy_are_refused() {
    let mut store = Store::with(policy());
    let e = store.err(cmd(Action::Create, "/entries/x", Some(json!({}))));
    assert_eq!(code(&e), (400, "policies:path.invalid"));
    let e = store.err(cmd(Action::Retrieve, "/policyId/x", None));
    assert_eq!(code(&e), (400, "policies:path.invalid"));
}

#[test]
fn a_policy_over_the_size_limit_is_refused_with_413() {
    let mut store = Store::with(policy());
    let subjects: serde_json::Map<String, Value> = (0..3000)
        .map(|i| (format!("issuer:subject-{i:05}"), json!({"type": "user"})))
        .collect();
    let e = store.err(cmd(
        Action::Modify,
        "/entries/reader/subjects",
        Some(Value::Object(subjects)),
    ));
    assert_eq!(code(&e), (413, "policies:policy.toolarge"));
}
