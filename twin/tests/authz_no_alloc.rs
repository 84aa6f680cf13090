//! Authorizing a command on a connection's view allocates nothing (issue: "no allocation in
//! the authorization itself"): `authz::grants_without_allocation` for every single-requirement
//! command whose path has no `~`.
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
use std::sync::atomic::{AtomicUsize, Ordering};

use std::sync::Arc;

use serde_json::json;
use twin::ThingId;
use twin::authz::grants_without_allocation;
use twin::command::{Action, CommandHeaders, ThingCommand};
use twin::path::ThingPath;
use twin::policy::{Enforcer, Timestamp};

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
fn authorizing_a_command_on_a_view_allocates_nothing() {
    let policy = twin::policy::policy_from_value(&json!({"policyId": "org.acme:p", "entries": {
        "owner": {"subjects": {"s:owner": {"type": "t"}},
                  "resources": {"thing:/": {"grant": ["READ", "WRITE"], "revoke": []},
                                "policy:/": {"grant": ["READ", "WRITE"], "revoke": []}}},
        "device": {"subjects": {"s:device": {"type": "t"}},
                   "resources": {"thing:/features/telemetry": {"grant": ["READ", "WRITE"], "revoke": []},
                                 "thing:/features/telemetry/properties/secret": {"grant": [], "revoke": ["READ"]}}}
    }}))
    .unwrap();
    let view = Arc::new(Enforcer::compile(&policy)).for_subjects(
        &["s:device"],
        Some("org.acme"),
        Timestamp::from_unix_millis(0),
    );
    let command = |action, path: &str| ThingCommand {
        thing_id: ThingId::parse("org.acme:lamp").unwrap(),
        action,
        path: ThingPath::parse(path).unwrap(),
        value: None,
        headers: CommandHeaders::default(),
    };
    let commands = [
        command(Action::Modify, "/features/telemetry/properties/temp"),
        command(Action::Modify, "/attributes/location"),
        command(Action::Retrieve, "/features/telemetry"),
        command(Action::Retrieve, "/"),
        command(Action::Delete, "/features/telemetry/properties/secret"),
        command(Action::Create, "/features/other"),
    ];
    let expected = [true, false, true, true, true, false];

    // The counter itself must work, or a zero below would prove nothing.
    COUNTING.with(|c| c.set(true));
    let probe = vec![1u8; 3];
    COUNTING.with(|c| c.set(false));
    drop(probe);
    assert!(
        ALLOCATIONS.swap(0, Ordering::Relaxed) > 0,
        "the counter counts"
    );

    let mut decisions = [false; 6];
    COUNTING.with(|c| c.set(true));
    for _ in 0..1000 {
        for (i, cmd) in commands.iter().enumerate() {
            decisions[i] = grants_without_allocation(&view, cmd) == Some(true);
        }
    }
    COUNTING.with(|c| c.set(false));
    assert_eq!(
        ALLOCATIONS.load(Ordering::Relaxed),
        0,
        "allocations while authorizing"
    );
    assert_eq!(decisions, expected);
}
