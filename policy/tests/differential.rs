//! The compiled enforcer against the naive reference evaluator (`tests/reference`), on random
//! policies, subject sets, namespaces, paths and JSON values.
//!
//! Policies are generated as JSON text and go through `policy::parse_policy`, so the parser is
//! exercised too. Paths and keys come from a tiny alphabet so that resources of different entries
//! and subjects collide on the same nodes, above and below each other, as often as possible. The
//! alphabet holds the corner cases of rule 7: `~` and `~0` are the same segment, `~1` is not
//! decoded, `a` does not cover `ab`, segments are case-sensitive; paths are spelled with and
//! without leading, trailing and doubled `/`.
//!
//! Each subject, resource, path and JSON value is drawn as one random number and decoded
//! (`decode_*`, `write_*`): in a debug build proptest's cost grows with the number of strategies,
//! and `vec` shrinking still drops whole entries, subjects, resources and values. The RNG is
//! XorShift because the default ChaCha dominates the run time of a debug build. What dominates
//! now is parsing and compiling the policy of each case.
//!
//! # How many cases
//! Counted as generated proptest cases; one case is one policy, one subject set and one thing
//! namespace:
//! - `compiled_checks_agree_with_the_reference`: [`CHECK_CASES`] = 45,000 cases, each checking up
//!   to 4 paths (random ones and ones next to the policy's resources) × 4 permissions × 2 modes
//!   through `check` (and `check_key`, `check_resource` for one permission and mode per path);
//! - `compiled_partial_views_agree_with_the_reference`: [`VIEW_CASES`] = 55,000 cases, each one
//!   partial view of a JSON thing of up to 17 values, and half of them a retrieve with fields;
//!   half the views are for READ, the others for a random set of permissions (Ditto's
//!   `buildJsonView(permissions)`: READ+WRITE in a quarter of them, the empty set in 1 in 32);
//!
//! 100,000 cases in all. Three more tests check that the generators produce the shapes promised
//! above. `PROPTEST_CASES=<n>` runs n cases per test instead (a soak run); seeds are random on
//! each run and `PROPTEST_RNG_SEED=<n>` replays one. Failures are not persisted (that would write
//! into the source tree): the failure message carries the policy JSON, the subjects, the
//! namespace, the path and both answers.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod reference;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::Arc;

use policy::{
    Enforcer, Mode, Permission, Permissions, ResourceKey, ResourceType, Timestamp, parse_policy,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::test_runner::{RngAlgorithm, TestCaseError};
use serde_json::{Value, json};

use reference::{Reference, decode_path};

const CHECK_CASES: u32 = 45_000;
const VIEW_CASES: u32 = 55_000;

const NOW: &str = "2026-01-01T00:00:00Z";
/// Expiries just before `NOW`, exactly `NOW` (already expired) and just after.
const EXPIRIES: [&str; 3] = [
    "2025-12-31T23:59:59.999Z",
    "2026-01-01T00:00:00Z",
    "2026-01-01T00:00:00.001Z",
];
const POLICY_SUBJECTS: [&str; 5] = ["google:a", "google:b", "google:c", "google:d", "google:e"];
/// Who asks: the policy's subjects, plus some the policy never names.
const ASKING_SUBJECTS: [&str; 7] = [
    "google:a", "google:b", "google:c", "google:d", "google:e", "google:f", "other:a",
];
/// Raw (encoded) path segments: `~` and `~0` decode alike; `~1` stays `~1`.
const RAW_SEGMENTS: [&str; 7] = ["a", "ab", "b", "A", "~", "~0", "~1"];
/// JSON object keys are literal: `~0` here is the segment a policy spells `~00`, and the empty
/// key is a segment no policy can name.
const JSON_KEYS: [&str; 8] = ["a", "ab", "b", "A", "~", "~0", "~1", ""];
const NAMESPACE_PATTERNS: [&str; 6] = ["a", "a.b", "a.*", "a.b.*", "x", "x.*"];
const THING_NAMESPACES: [Option<&str>; 5] =
    [None, Some("a"), Some("a.b"), Some("a.b.c"), Some("x")];
/// Top-level fields a retrieve returns with partial READ on the root.
const FIELDS: [&str; 2] = ["thingId", "_revision"];

fn now() -> Timestamp {
    Timestamp::parse_rfc3339(NOW).unwrap()
}

/// Takes a choice among `n` from a seed (and consumes it).
fn take(seed: &mut u64, n: u64) -> u64 {
    let choice = *seed % n;
    *seed /= n;
    choice
}

/// Mostly `thing`, sometimes `policy` (whose grants must never leak into `thing`), rarely
/// `message`.
fn decode_kind(seed: &mut u64) -> ResourceType {
    match take(seed, 11) {
        0..=7 => ResourceType::Thing,
        8 | 9 => ResourceType::Policy,
        _ => ResourceType::Message,
    }
}

/// A raw path of up to `max_depth` segments, spelled in one of eight equivalent ways (with or
/// without a leading `/`, a doubled `/`, a trailing `/`).
fn decode_path_text(seed: &mut u64, max_depth: u64) -> String {
    // Shallow paths are likelier (the smaller of two draws), so that resources nest often.
    let depth = take(seed, max_depth + 1).min(take(seed, max_depth + 1));
    let segments: Vec<&str> = (0..max_depth)
        .map(|_| RAW_SEGMENTS[take(seed, RAW_SEGMENTS.len() as u64) as usize])
        .take(depth as usize)
        .collect();
    let style = take(seed, 8);
    let mut out = String::new();
    for (i, segment) in segments.iter().enumerate() {
        if i > 0 || style & 1 == 0 {
            out.push('/');
        }
        if i == 1 && style & 2 != 0 {
            out.push('/');
        }
        out.push_str(segment);
    }
    if style & 4 != 0 {
        out.push('/');
    }
    out
}

/// The permissions a view asks for: READ alone half the time (retrieves and events), otherwise
/// any of the 16 sets, each permission in half of them (so READ+WRITE in a quarter, and the
/// empty set, which sees nothing, in 1 of 32 views).
fn decode_permissions(seed: &mut u64) -> Permissions {
    if take(seed, 2) == 0 {
        return Permission::Read.into();
    }
    Permission::ALL
        .into_iter()
        .filter(|_| take(seed, 2) == 1)
        .collect()
}

/// Appends a permission list: READ and WRITE half the time each, EXECUTE and CREATE a quarter.
fn write_permissions(out: &mut String, seed: &mut u64) -> bool {
    out.push('[');
    let mut empty = true;
    for (name, odds) in [("READ", 2), ("WRITE", 2), ("EXECUTE", 4), ("CREATE", 4)] {
        if take(seed, odds) == 0 {
            if !empty {
                out.push(',');
            }
            out.push('"');
            out.push_str(name);
            out.push('"');
            empty = false;
        }
    }
    out.push(']');
    !empty
}

/// Appends one resource of an entry (`"kind:path":{"grant":…,"revoke":…}`) unless an earlier
/// one of the entry normalizes to the same resource (the parser refuses that). A third of the
/// resources revoke; empty lists are sometimes left out.
fn write_resource(
    out: &mut String,
    mut seed: u64,
    seen: &mut BTreeSet<(ResourceType, Vec<String>)>,
) {
    let kind = decode_kind(&mut seed);
    let path = decode_path_text(&mut seed, 6);
    if !seen.insert((kind, decode_path(&path))) {
        return;
    }
    if !out.ends_with('{') {
        out.push(',');
    }
    let omit_empty = take(&mut seed, 2) == 1;
    let revokes = take(&mut seed, 3) == 2;
    let _ = write!(out, "\"{kind}:{path}\":{{\"grant\":");
    let mark = out.len();
    if !write_permissions(out, &mut seed) && omit_empty {
        out.truncate(mark - "\"grant\":".len());
    }
    if revokes {
        if !out.ends_with('{') {
            out.push(',');
        }
        out.push_str("\"revoke\":");
        write_permissions(out, &mut seed);
    } else if !omit_empty {
        if !out.ends_with('{') {
            out.push(',');
        }
        out.push_str("\"revoke\":[]");
    }
    out.push('}');
}

/// Appends a subject of an entry (unless the entry has it already): one of [`POLICY_SUBJECTS`],
/// a quarter of them with an expiry.
fn write_subject(out: &mut String, mut seed: u64, seen: &mut BTreeSet<&'static str>) {
    let id = POLICY_SUBJECTS[take(&mut seed, POLICY_SUBJECTS.len() as u64) as usize];
    if !seen.insert(id) {
        return;
    }
    if !out.ends_with('{') {
        out.push(',');
    }
    let _ = write!(out, "\"{id}\":{{\"type\":\"generated\"");
    if let n @ 9.. = take(&mut seed, 12) {
        let _ = write!(out, ",\"expiry\":\"{}\"", EXPIRIES[(n - 9) as usize]);
    }
    out.push('}');
}

/// Appends an entry made from its subject and resource seeds; `shape` decides its `namespaces`
/// and, rarely, drops its subjects or its resources (such entries must be ignored).
fn write_entry(out: &mut String, subjects: &[u64], resources: &[u64], mut shape: u64) {
    let left_out = take(&mut shape, 16);
    out.push_str("{\"subjects\":{");
    if left_out != 15 {
        let mut seen = BTreeSet::new();
        for &s in subjects {
            write_subject(out, s, &mut seen);
        }
    }
    out.push_str("},\"resources\":{");
    if left_out != 14 {
        let mut seen = BTreeSet::new();
        for &r in resources {
            write_resource(out, r, &mut seen);
        }
    }
    out.push('}');
    if take(&mut shape, 7) >= 5 {
        out.push_str(",\"namespaces\":[");
        for i in 0..take(&mut shape, 3) {
            if i > 0 {
                out.push(',');
            }
            let pattern =
                NAMESPACE_PATTERNS[take(&mut shape, NAMESPACE_PATTERNS.len() as u64) as usize];
            let _ = write!(out, "\"{pattern}\"");
        }
        out.push(']');
    }
    out.push('}');
}

/// Policy JSON text, shown as it is (not as an escaped string) when proptest reports an input.
#[derive(Clone)]
struct PolicyJson(String);

impl std::fmt::Debug for PolicyJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Policy JSON text with 1–12 entries of 1–4 subjects and 1–4 resources each. Mostly 1–3
/// entries (most disagreements need few, and parsing dominates the cost of a case); one policy in
/// five adds 1–9 more. Shrinking drops the extra ones first, then entries one by one.
fn policy_json() -> impl Strategy<Value = PolicyJson> {
    let entry = || {
        (
            vec(any::<u64>(), 1..=4),
            vec(any::<u64>(), 1..=4),
            any::<u64>(),
        )
    };
    let more = prop_oneof![4 => Just(Vec::new()), 1 => vec(entry(), 1..=9)];
    (vec(entry(), 1..=3), more).prop_map(|(first, more)| {
        let mut out = String::with_capacity(2048);
        out.push_str("{\"policyId\":\"a.b:p\",\"entries\":{");
        for (i, (subjects, resources, shape)) in first.iter().chain(&more).enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "\"E{i}\":");
            write_entry(&mut out, subjects, resources, *shape);
        }
        out.push_str("}}");
        PolicyJson(out)
    })
}

fn asking_subjects() -> impl Strategy<Value = Vec<String>> {
    vec(select(&ASKING_SUBJECTS[..]).prop_map(str::to_owned), 0..=4)
}

fn thing_namespace() -> impl Strategy<Value = Option<&'static str>> {
    select(&THING_NAMESPACES[..])
}

/// A JSON object (a thing) built from one number per value: which earlier object or array the
/// value goes into, under which key (from [`JSON_KEYS`]), and what it is: null, a boolean, a
/// number, a string, an object or an array. Containers nest at most 5 levels below the top.
/// Shrinking the numbers away removes values one by one.
fn decode_json(seeds: &[u32]) -> Value {
    #[derive(Clone, Copy)]
    struct Node {
        parent: usize,
        key: &'static str,
        scalar: Option<u32>,
        array: bool,
        depth: u32,
    }
    let mut nodes = vec![Node {
        parent: 0,
        key: "",
        scalar: None,
        array: false,
        depth: 0,
    }];
    let mut containers = vec![0];
    for &seed in seeds {
        let mut seed = u64::from(seed);
        // Half the values go into the latest container, so that nesting gets deep.
        let parent = match take(&mut seed, 2) {
            0 => containers[containers.len() - 1],
            _ => containers[take(&mut seed, containers.len() as u64) as usize],
        };
        let key = JSON_KEYS[take(&mut seed, JSON_KEYS.len() as u64) as usize];
        let depth = nodes[parent].depth + 1;
        let what = take(&mut seed, 8) as u32;
        let container = what >= 5 && depth < 6;
        nodes.push(Node {
            parent,
            key,
            scalar: (!container).then_some(what.min(4)),
            array: what == 7,
            depth,
        });
        if container {
            containers.push(nodes.len() - 1);
        }
    }
    fn build(nodes: &[Node], at: usize) -> Value {
        let node = nodes[at];
        let children = (at + 1..nodes.len()).filter(|&i| nodes[i].parent == at);
        match node.scalar {
            Some(0) => Value::Null,
            Some(1) => Value::Bool(at.is_multiple_of(2)),
            Some(2) => Value::from(at),
            Some(_) => Value::from("x"),
            None if node.array => Value::Array(children.map(|i| build(nodes, i)).collect()),
            None => Value::Object(
                children
                    .map(|i| (nodes[i].key.to_owned(), build(nodes, i)))
                    .collect(),
            ),
        }
    }
    build(&nodes, 0)
}

fn parse(json: &str) -> Result<policy::Policy, TestCaseError> {
    parse_policy(json).map_err(|e| {
        TestCaseError::fail(format!(
            "the generated policy was refused: {e}\n{}",
            pretty(json)
        ))
    })
}

fn pretty(json: &str) -> String {
    serde_json::from_str::<Value>(json)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or_else(|_| json.to_owned())
}

fn show(view: &Option<Value>) -> String {
    view.as_ref()
        .map_or_else(|| "nothing".to_owned(), Value::to_string)
}

/// A path near one of the policy's resources: the resource itself, its parent, or a child (in
/// the trie or just off it), spelled canonically.
fn path_near(key: &ResourceKey, choice: u8) -> (ResourceType, String) {
    let text = key.to_string();
    let path = text
        .split_once(':')
        .map_or("", |(_, path)| path)
        .trim_end_matches('/');
    let near = match choice % 3 {
        0 => path.to_owned(),
        1 => path
            .rsplit_once('/')
            .map_or("", |(parent, _)| parent)
            .to_owned(),
        _ => format!(
            "{path}/{}",
            RAW_SEGMENTS[usize::from(choice) % RAW_SEGMENTS.len()]
        ),
    };
    (key.kind(), near)
}

/// `cases` unless `PROPTEST_CASES` asks for another number (for a longer soak run).
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        failure_persistence: None,
        rng_algorithm: RngAlgorithm::XorShift,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(CHECK_CASES))]

    #[test]
    fn compiled_checks_agree_with_the_reference(
        json in policy_json(),
        subjects in asking_subjects(),
        namespace in thing_namespace(),
        random_paths in vec(any::<u64>(), 1..=2),
        near_picks in vec((any::<Index>(), any::<u8>()), 2),
    ) {
        let json = json.0;
        let policy = parse(&json)?;
        let now = now();
        let enforcer = Arc::new(Enforcer::compile(&policy));
        let view = enforcer.for_subjects(&subjects, namespace, now);
        let reference = Reference { policy: &policy, subjects: &subjects, namespace, now };

        let random = random_paths.into_iter().map(|mut seed| {
            let kind = decode_kind(&mut seed);
            (kind, decode_path_text(&mut seed, 7))
        });
        let keys: Vec<&ResourceKey> =
            policy.entries.values().flat_map(|e| e.resources.keys()).collect();
        let picked = near_picks
            .iter()
            .filter(|_| !keys.is_empty())
            .map(|(i, choice)| path_near(i.get::<&ResourceKey>(&keys), *choice));
        let rotation: Vec<(Permission, Mode)> = Permission::ALL
            .into_iter()
            .flat_map(|p| [(p, Mode::Unrestricted), (p, Mode::Partial)])
            .collect();
        let mut checked = BTreeSet::new();
        for (kind, raw) in random.chain(picked) {
            let decoded = decode_path(&raw);
            if !checked.insert((kind, decoded.clone())) {
                continue;
            }
            let resource = format!("{kind}:{raw}");
            let key = ResourceKey::parse(&resource).unwrap();
            for permission in Permission::ALL {
                for mode in [Mode::Unrestricted, Mode::Partial] {
                    let expected = reference.check(kind, &decoded, permission, mode);
                    let mut answers = vec![("check", view.check(kind, &raw, permission, mode))];
                    // The other entry points differ from `check` only in how they find the
                    // node (not in the decision): one permission and mode per path suffices.
                    if (permission, mode) == rotation[checked.len() % rotation.len()] {
                        answers.push(("check_key", view.check_key(&key, permission, mode)));
                        answers.push((
                            "check_resource",
                            view.check_resource(&resource, permission, mode),
                        ));
                    }
                    for (api, answer) in answers {
                        prop_assert_eq!(
                            answer,
                            expected,
                            "{}: {} on `{}` ({:?}) for subjects {:?} in namespace {:?} at {}: \
                             enforcer says {}, reference says {}\npolicy:\n{}",
                            api, permission, resource, mode, subjects, namespace, NOW,
                            answer, expected, pretty(&json)
                        );
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(config(VIEW_CASES))]

    #[test]
    fn compiled_partial_views_agree_with_the_reference(
        json in policy_json(),
        subjects in asking_subjects(),
        namespace in thing_namespace(),
        place in any::<u64>(),
        value in vec(any::<u32>(), 0..=16).prop_map(|seeds| decode_json(&seeds)),
        with_fields in any::<bool>(),
    ) {
        let json = json.0;
        let policy = parse(&json)?;
        let now = now();
        let enforcer = Arc::new(Enforcer::compile(&policy));
        let view = enforcer.for_subjects(&subjects, namespace, now);
        let reference = Reference { policy: &policy, subjects: &subjects, namespace, now };

        // Mostly the whole thing (or policy) from its root, sometimes a part of it further down.
        let mut place = place;
        let kind = if take(&mut place, 6) == 0 { ResourceType::Policy } else { ResourceType::Thing };
        let at = if take(&mut place, 4) == 0 { decode_path_text(&mut place, 2) } else { String::new() };

        // Half the views are READ's (through the READ entry points), the others for any set of
        // permissions, the empty one included.
        let permissions = decode_permissions(&mut place);

        let expected = reference.partial_view(kind, &decode_path(&at), &value, permissions);
        let answer = if permissions == Permission::Read.into() {
            view.partial_view(kind, &at, &value)
        } else {
            view.partial_view_for(kind, &at, &value, permissions)
        };
        prop_assert_eq!(
            &answer,
            &expected,
            "partial view for {:?} at `{}:{}` of {} for subjects {:?} in namespace {:?} at {}: \
             enforcer shows {}, reference shows {}\npolicy:\n{}",
            permissions, kind, at, value, subjects, namespace, NOW, show(&answer),
            show(&expected), pretty(&json)
        );

        if with_fields {
            let mut value = value;
            if let Value::Object(map) = &mut value {
                map.insert("thingId".to_owned(), json!("a.b:t"));
                map.insert("_revision".to_owned(), json!(7));
            }
            let expected = reference.partial_view_with_fields(kind, &value, &FIELDS, permissions);
            let answer = if permissions == Permission::Read.into() {
                view.partial_view_with_fields(kind, &value, &FIELDS)
            } else {
                view.partial_view_with_fields_for(kind, &value, &FIELDS, permissions)
            };
            prop_assert_eq!(
                &answer,
                &expected,
                "retrieve for {:?} of `{}:/` with fields {:?} of {} for subjects {:?} in \
                 namespace {:?} at {}: enforcer shows {}, reference shows {}\npolicy:\n{}",
                permissions, kind, FIELDS, value, subjects, namespace, NOW, show(&answer),
                show(&expected), pretty(&json)
            );
        }
    }
}

/// A runner with a fixed seed, so that the generator tests below cannot be flaky.
fn fixed_runner() -> proptest::test_runner::TestRunner {
    use proptest::test_runner::{TestRng, TestRunner};
    TestRunner::new_with_rng(
        config(1),
        TestRng::deterministic_rng(RngAlgorithm::XorShift),
    )
}

/// The generators must produce what the header of this file promises; otherwise agreement would
/// be cheap.
#[test]
fn generated_policies_cover_the_interesting_shapes() {
    use proptest::strategy::ValueTree;

    let mut runner = fixed_runner();
    let strategy = policy_json();
    let mut seen = BTreeSet::new();
    for _ in 0..2_000 {
        let json = strategy.new_tree(&mut runner).unwrap().current().0;
        let policy = parse_policy(&json).unwrap();
        for entry in policy.entries.values() {
            if entry.namespaces.is_some() {
                seen.insert("namespaces");
            }
            if entry.subjects.is_empty() {
                seen.insert("entry without subjects");
            }
            if entry.resources.is_empty() {
                seen.insert("entry without resources");
            }
            for subject in entry.subjects.values() {
                match subject.expiry {
                    Some(e) if e <= now() => seen.insert("expired subject"),
                    Some(_) => seen.insert("subject expiring later"),
                    None => seen.insert("permanent subject"),
                };
            }
            for (key, effects) in &entry.resources {
                if key.kind() == ResourceType::Policy {
                    seen.insert("policy resource");
                }
                if key.depth() == 6 {
                    seen.insert("depth 6");
                }
                if key.segments().any(|s| s == "~") {
                    seen.insert("segment ~");
                }
                if !effects.revoke.is_empty() {
                    seen.insert("revoke");
                }
                if effects.grant.contains(Permission::Execute) {
                    seen.insert("EXECUTE");
                }
            }
        }
        match policy.entries.len() {
            1 => seen.insert("1 entry"),
            12 => seen.insert("12 entries"),
            _ => false,
        };
    }
    let wanted = [
        "namespaces",
        "entry without subjects",
        "entry without resources",
        "expired subject",
        "subject expiring later",
        "permanent subject",
        "policy resource",
        "depth 6",
        "segment ~",
        "revoke",
        "EXECUTE",
        "1 entry",
        "12 entries",
    ];
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|w| !seen.contains(w))
        .collect();
    assert!(missing.is_empty(), "never generated: {missing:?}");
}

#[test]
fn generated_things_cover_the_interesting_shapes() {
    use proptest::strategy::ValueTree;

    fn visit(value: &Value, depth: usize, in_array: bool, seen: &mut BTreeSet<String>) {
        match value {
            Value::Null => seen.insert("null".to_owned()),
            Value::Array(items) => {
                if items.is_empty() {
                    seen.insert("empty array".to_owned());
                }
                items.iter().for_each(|v| visit(v, depth + 1, true, seen));
                seen.insert("array".to_owned())
            }
            Value::Object(map) => {
                if in_array {
                    seen.insert("object in an array".to_owned());
                }
                if map.contains_key("") {
                    seen.insert("empty key".to_owned());
                }
                map.values().for_each(|v| visit(v, depth + 1, false, seen));
                seen.insert(format!("object at depth {depth}"))
            }
            _ => seen.insert("scalar".to_owned()),
        };
    }
    let mut runner = fixed_runner();
    let strategy = vec(any::<u32>(), 0..=16).prop_map(|seeds| decode_json(&seeds));
    let mut seen = BTreeSet::new();
    for _ in 0..300 {
        visit(
            &strategy.new_tree(&mut runner).unwrap().current(),
            0,
            false,
            &mut seen,
        );
    }
    let wanted = [
        "null",
        "scalar",
        "array",
        "empty array",
        "object in an array",
        "empty key",
        "object at depth 0",
        "object at depth 4",
        "object at depth 5",
    ];
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|w| !seen.contains(*w))
        .collect();
    assert!(
        missing.is_empty(),
        "never generated: {missing:?} (saw {seen:?})"
    );
}

#[test]
fn generated_view_permission_sets_cover_read_alone_read_and_write_and_the_empty_set() {
    let mut seen = BTreeSet::new();
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..1_000 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let mut seed = rng;
        seen.insert(format!("{:?}", decode_permissions(&mut seed)));
    }
    for wanted in [
        "{Read}",
        "{Read, Write}",
        "{}",
        "{Write}",
        "{Read, Write, Execute, Create}",
    ] {
        assert!(seen.contains(wanted), "never generated {wanted}: {seen:?}");
    }
    assert_eq!(seen.len(), 16, "{seen:?}");
}
