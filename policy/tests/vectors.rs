//! Every decision of the shared test vectors (taken from Eclipse Ditto's tests, code and docs).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use policy::Timestamp;
use policy::vectors::run_vectors;

#[test]
fn every_ditto_vector_passes() {
    let text = include_str!("data/ditto-policy.jsonl");
    let results = run_vectors(text, Timestamp::from(std::time::SystemTime::now()));
    assert!(results.len() >= 100, "only {} vectors", results.len());
    let failures: Vec<String> = results
        .iter()
        .filter(|r| !r.passed())
        .map(ToString::to_string)
        .collect();
    assert!(
        failures.is_empty(),
        "{} failing vectors:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn a_wrong_expectation_is_reported_as_a_failure() {
    let line = r#"{"id":"wrong","kind":"check","mode":"unrestricted","subjects":["g:a"],"resource":"thing:/","permission":"READ","expect":true,"policy":{"entries":{"e":{"subjects":{"g:a":{"type":"t"}},"resources":{"thing:/":{"grant":[],"revoke":["READ"]}}}}}}"#;
    let results = run_vectors(line, Timestamp::MIN);
    assert_eq!(results.len(), 1);
    assert!(!results[0].passed());
    assert!(
        results[0].to_string().contains("expected granted"),
        "{}",
        results[0]
    );
}

#[test]
fn a_malformed_vector_is_an_error_naming_the_field() {
    let results = run_vectors(
        "{\"id\":\"x\",\"kind\":\"check\",\"subjects\":[],\"resource\":\"thing:/\",\"permission\":\"READ\",\"policy\":{\"entries\":{}}}\nnot json\n",
        Timestamp::MIN,
    );
    assert_eq!(results.len(), 2);
    assert!(
        results[0].to_string().contains("field `mode`"),
        "{}",
        results[0]
    );
    assert!(
        results[1].to_string().contains("not JSON"),
        "{}",
        results[1]
    );
    assert_eq!(results[1].line, 2);
}

/// The project's views for READ+WRITE (`V…` lines) are worth having only if the set matters:
/// each must fail when asked with READ alone or with WRITE alone.
#[test]
fn every_permission_set_view_vector_depends_on_the_whole_set() {
    let text = include_str!("data/ditto-policy.jsonl");
    let sets: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter(|v| v["kind"] == "view" && v["permission"].is_array())
        .collect();
    assert!(
        sets.len() >= 5,
        "only {} views with a permission set",
        sets.len()
    );
    for vector in sets {
        assert_eq!(vector["permission"], serde_json::json!(["READ", "WRITE"]));
        let alone = ["READ", "WRITE"].map(|p| {
            let mut one = vector.clone();
            one["permission"] = serde_json::json!(p);
            run_vectors(&one.to_string(), Timestamp::MIN)[0].passed()
        });
        assert_ne!(
            alone,
            [true, true],
            "{}: READ alone and WRITE alone give the same view as READ+WRITE",
            vector["id"]
        );
    }
}
