//! A check through a compiled subject view allocates nothing (DESIGN.md §4, §10).
//!
//! This file is its own test binary with a counting global allocator and a single test, so no
//! other test's allocations are counted.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
// The allocator below forwards to the system allocator; `GlobalAlloc` is an unsafe trait.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use policy::{Enforcer, Mode, Permission, ResourceKey, ResourceType, Timestamp, parse_policy};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Only the measuring thread counts: the test harness allocates on other threads meanwhile.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    if COUNTING.try_with(Cell::get).unwrap_or(false) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to `System`; we only count.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

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
    COUNTING.with(|c| c.set(true));
    let probe = std::hint::black_box(vec![1u8; 8]);
    COUNTING.with(|c| c.set(false));
    drop(probe);
    assert_eq!(
        ALLOCATIONS.swap(0, Ordering::Relaxed),
        1,
        "the counting allocator does not count"
    );

    COUNTING.with(|c| c.set(true));
    let mut granted = 0u32;
    for _ in 0..1_000 {
        for path in paths {
            for permission in Permission::ALL {
                for mode in [Mode::Unrestricted, Mode::Partial] {
                    granted += u32::from(view.check(ResourceType::Thing, path, permission, mode));
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
    COUNTING.with(|c| c.set(false));
    let allocations = ALLOCATIONS.load(Ordering::Relaxed);

    assert_eq!(allocations, 0, "{allocations} allocations in 59,000 checks");
    // The loop really decided something (and was not optimized into nothing).
    assert!(granted > 0 && granted < 59_000, "granted {granted}");
}
