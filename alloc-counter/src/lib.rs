//! Counting heap allocations on the calling thread, for the tests that prove a hot path
//! allocates nothing (`policy/tests/no_alloc.rs`, `twin/tests/no_alloc.rs`).
//!
//! A test binary installs [`CountingAllocator`] as its global allocator (it forwards every call
//! to [`System`]) and measures a closure with [`allocations_during`]:
//!
//! ```
//! #[global_allocator]
//! static GLOBAL: alloc_counter::CountingAllocator = alloc_counter::CountingAllocator;
//!
//! fn main() {
//!     let allocations = alloc_counter::allocations_during(|| {
//!         drop(std::hint::black_box(vec![1u8; 8]));
//!     });
//!     assert_eq!(allocations, 1, "the counter counts");
//! }
//! ```
//!
//! Only the thread that calls [`allocations_during`] counts, and only while the closure runs:
//! the test harness allocates on other threads meanwhile. An allocation and a reallocation count
//! one each; a deallocation counts nothing. Without the `#[global_allocator]` line nothing is
//! counted, so a test should first check that a probe allocation counts, as both users do.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    /// Whether this thread is inside [`allocations_during`].
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    /// Allocations made on this thread while `COUNTING`.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

/// Counts one allocation if this thread is counting. `try_with`: the allocator also runs while
/// a thread's locals are being destroyed.
#[inline]
fn count() {
    if COUNTING.try_with(Cell::get).unwrap_or(false) {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get().saturating_add(1)));
    }
}

/// The global allocator a measuring test binary declares: [`System`], plus a count of the
/// allocations made inside [`allocations_during`] on the thread that called it.
#[derive(Debug, Clone, Copy, Default)]
pub struct CountingAllocator;

// SAFETY: every method forwards its arguments unchanged to `System`, which upholds the
// `GlobalAlloc` contract; counting touches only const-initialized thread-locals, which neither
// allocate nor call back into the allocator.
#[expect(
    unsafe_code,
    reason = "GlobalAlloc is an unsafe trait; every call is forwarded to System"
)]
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller upholds `alloc`'s contract, which is `System.alloc`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller upholds `alloc_zeroed`'s contract, which is `System.alloc_zeroed`'s.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` (every allocation here is), with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: `ptr` was allocated by `System` with `layout`; the caller upholds the rest of
        // `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Restores the thread's counting state when [`allocations_during`] ends, also by a panic.
struct Restore {
    was_counting: bool,
}

impl Drop for Restore {
    fn drop(&mut self) {
        COUNTING.with(|c| c.set(self.was_counting));
    }
}

/// Runs `f` and returns how many allocations and reallocations it made on this thread (other
/// threads are not counted). Calls nest: an outer measurement includes the inner one's.
///
/// Counts only in a binary whose `#[global_allocator]` is [`CountingAllocator`]; elsewhere it
/// returns 0.
pub fn allocations_during(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.with(Cell::get);
    let restore = Restore {
        was_counting: COUNTING.with(|c| c.replace(true)),
    };
    f();
    drop(restore);
    ALLOCATIONS.with(Cell::get).saturating_sub(before)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::panic)]

    use super::*;

    #[global_allocator]
    static GLOBAL: CountingAllocator = CountingAllocator;

    #[test]
    fn an_allocation_and_a_reallocation_count_and_a_deallocation_does_not() {
        let mut kept = None;
        let n = allocations_during(|| {
            let mut v = std::hint::black_box(Vec::<u8>::with_capacity(1));
            v.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 9]);
            kept = Some(v);
        });
        assert_eq!(n, 2);
        assert_eq!(allocations_during(|| drop(kept.take())), 0);
        assert_eq!(
            allocations_during(|| drop(std::hint::black_box(vec![0u8; 64]))),
            1,
            "alloc_zeroed counts"
        );
    }

    #[test]
    fn nothing_is_counted_outside_the_closure_or_on_other_threads() {
        let spawn_and_join = || {
            std::thread::scope(|s| {
                s.spawn(|| std::hint::black_box(0u8));
            });
        };
        // The first spawn of a process may allocate once for good (e.g. the stack size setting).
        spawn_and_join();
        let n = allocations_during(|| {
            std::thread::scope(|s| {
                s.spawn(|| std::hint::black_box(vec![1u8; 1024]));
            });
        });
        // Spawning allocates on this thread too, but the vector lives on the other one:
        // measure the same spawn without the vector and compare.
        let baseline = allocations_during(spawn_and_join);
        assert_eq!(n, baseline, "the other thread's vector was counted");
        let outside = std::hint::black_box(vec![1u8; 8]);
        assert_eq!(allocations_during(|| {}), 0);
        drop(outside);
    }

    #[test]
    fn measurements_nest_and_a_panic_stops_the_count() {
        let mut inner = 0;
        let outer = allocations_during(|| {
            drop(std::hint::black_box(vec![1u8; 8]));
            inner = allocations_during(|| drop(std::hint::black_box(vec![1u8; 8])));
        });
        assert_eq!((outer, inner), (2, 1));

        let caught = std::panic::catch_unwind(|| allocations_during(|| panic!("inside")));
        assert!(caught.is_err());
        assert!(!COUNTING.with(Cell::get), "still counting after a panic");
    }
}
