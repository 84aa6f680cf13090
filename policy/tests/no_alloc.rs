//! A check through a compiled subject view allocates nothing (DESIGN.md §4, §10).
//!
//! This file is its own test binary, so that it can install the counting global allocator;
//! only allocations on the measuring thread are counted (`alloc_counter`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::sync::Arc;

use alloc_counter::{CountingAllocator, allocations_during};
use policy::{Enforcer, Mode, Permission, ResourceKey, ResourceType, Timestamp, parse_policy};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

#[test]
fn checks_through_a_subject_view_allocate_nothing() {
    let policy = parse_policy(
        r#"{"policyId":"org.acme:p","entries":{
        "owner":{"subjects":{"g:owner":{"type":"t"}},"resources":{"thing:/":{"grant":["READ","WRITE"],"revoke":[]},"policy:/":{"grant":["READ","WRITE"],"revoke":[]}}},
        "device":{"subjects":{"g:dev":{"type":"t","expiry":"2099-01-01T00:00:00Z"}},"resources":{"thing:/features/telemetry":{"grant":["READ","WRITE"],"revoke":[]}}},
        "no-secret":{"subjects":{"g:owner":{"type":"t"},"g:dev":{"type":"t"}},"resources":{"thing:/features/secret":{"grant":[],"revoke":["READ"]},"thing:/attributes/a~0b":{"grant":["READ"],"revoke":[]}}},
        "topics":{"subjects":{"g:dev":{"type":"t"}},"resources":{"topic:/sensors":{"grant":["WRITE"],"revoke":[]}}}}}"#,
    )
    .unwrap();
    let enforcer = Arc::new(Enforcer::compile(&policy));
    let view = enforcer.for_subjects(
        &["g:owner", "g:dev", "g:unknown"],
        Some("org.acme"),
        Timestamp::MIN,
    );
    let key = ResourceKey::parse("thing:/features/telemetry/properties/temp").unwrap();
    let paths = [
        "/features/telemetry/properties/temp",
        "/features/secret/properties/pin",
        "/attributes/a~0b/c",
        "/attributes/a~b",
        "",
        "/features//x/",
        "/nowhere/at/all/deeper/than/the/policy",
    ];

    // The counter itself must work, or a zero below would prove nothing.
    assert_eq!(
        allocations_during(|| drop(std::hint::black_box(vec![1u8; 8]))),
        1,
        "the counting allocator does not count"
    );

    let mut granted = 0u32;
    let allocations = allocations_during(|| {
        for _ in 0..1_000 {
            for path in paths {
                for permission in Permission::ALL {
                    for mode in [Mode::Unrestricted, Mode::Partial] {
                        granted +=
                            u32::from(view.check(ResourceType::Thing, path, permission, mode));
                    }
                }
            }
            granted += u32::from(view.check_resource(
                "thing:/features/telemetry",
                Permission::Write,
                Mode::Unrestricted,
            ));
            granted += u32::from(view.check_key(&key, Permission::Read, Mode::Unrestricted));
            granted += u32::from(view.check_segments(
                ResourceType::Topic,
                "sensors/s1/temp".split('/'),
                Permission::Write,
                Mode::Unrestricted,
            ));
        }
    });

    assert_eq!(allocations, 0, "{allocations} allocations in 59,000 checks");
    // The loop really decided something (and was not optimized into nothing).
    assert!(granted > 0 && granted < 59_000, "granted {granted}");
}
