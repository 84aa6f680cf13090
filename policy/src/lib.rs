//! Thingsgate's policy engine: Eclipse Ditto's policy model, evaluated from a compiled trie.
//!
//! Pure: no I/O, no async, no clock (callers pass `now`).
//!
//! # Layout
//! - [`model`]: the policy types (IDs, resource keys, permissions, entries) — valid by construction.
//! - [`json`]: Ditto policy JSON in and out, with errors that name the JSON path.
//! - `compile`: the resource trie, built once per policy revision.
//! - [`enforcer`]: [`Enforcer`] (a compiled revision) and [`SubjectView`] (that revision as one
//!   subject set sees it): checks, partial views, explanations.
//! - [`cache`]: [`PolicyCache`], policy ID → `Arc<Enforcer>`.
//! - [`lockout`]: refusing policies that nobody could change any more.
//! - [`vectors`]: the JSONL test-vector format users test their policies with.
//!
//! # Semantics (DESIGN.md §1)
//! For a permission p, a set of subjects S (all of one connection, together) and a resource n:
//! 1. a grant or revoke applies to its resource and everything below it, until a deeper one;
//! 2. n is *allowed* iff the deepest grant of p at or above n is strictly deeper than every
//!    revoke of p at or above n (any subject of S, any entry);
//! 3. hence at the same level a revoke wins, whichever entry or subject of S it comes from;
//! 4. **unrestricted** (changes, live messages): allowed at n and no subject of S revokes p
//!    anywhere below n;
//! 5. **partial** (retrieves, event deliveries): allowed at n, or some subject of S grants p
//!    below n where that same subject does not also revoke p;
//! 6. the **partial view** of JSON keeps a scalar iff READ is allowed at its own path, an object
//!    if anything inside it survives (or as `{}` if READ is allowed at its level), and judges
//!    array elements at the array's path; a view for a set of permissions (Ditto's
//!    `buildJsonView(permissions)`, e.g. READ and WRITE) reads "allowed" as "each permission of
//!    the set allowed on its own", and an empty set is allowed nowhere;
//! 7. resource keys split at the first `:`; `thing:` is `thing:/`; segments are whole and
//!    case-sensitive, empty ones are ignored and `~0` decodes to `~`; types never cover each other;
//!    entries without subjects or resources are ignored; WRITE does not imply READ;
//! 8. an entry with `namespaces` (`a.b` exactly, `a.b.*` strictly below) applies only to things
//!    in a matching namespace; `imports` add another policy's importable entries.
//!
//! # Deliberate differences from Eclipse Ditto
//! - **Expiry**: a subject whose `expiry` is at or before `now` matches nothing from that instant
//!   on. Ditto deletes expired subjects in a periodic sweep, so they keep working until then.
//! - **Events** are judged on all subjects of the receiver together, like commands. Ditto
//!   computes an event's readers subject by subject and unions them, so a revoke held by one of
//!   a connection's subjects does not hide an event from another of its subjects.
//! - **One permission at a time**: a check for READ+WRITE is READ and WRITE, each on its own, and
//!   so is every node of a view for READ+WRITE. Ditto's `GrantRevokeIndex.hasPermissions`, which
//!   its checks and its view builder share, compares the nearest grant of *any* permission of the
//!   set with the nearest revoke of any, so with several subjects it can answer differently
//!   (vectors `C7.readPlusWriteQuirk`, `V9.readPlusWriteQuirkInAView`).
//! - **Views of paths deeper than the policy**: Ditto's view builder can hide a property named
//!   like a revoked resource elsewhere (a revoke on `thing:/features/a` hiding property `a` of
//!   feature `x`); our view judges every value at its own full path.
//! - **Stricter input**: unknown fields, unknown resource types (other than `thing`, `policy`,
//!   `message`, `solution`, `topic`), subjects without an `issuer:` prefix and resource keys that
//!   normalize to the same resource within one entry are errors rather than silently accepted.
//! - **Namespace-less checks**: a check made without a thing namespace (e.g. `topic:` resources of
//!   a solution policy) ignores every entry that has `namespaces`.

pub mod cache;
mod compile;
pub mod enforcer;
pub mod json;
pub mod lockout;
pub mod model;
pub mod timestamp;
pub mod vectors;

pub use cache::{Cached, PolicyCache};
pub use compile::effective_entries;
pub use enforcer::{Enforcer, Explanation, Mode, SubjectView};
pub use json::{PolicyJsonError, parse_policy, policy_from_value, policy_to_value};
pub use lockout::{LockoutError, check_lockout, check_lockout_on};
pub use model::{
    Permission, Permissions, Policy, PolicyEntry, PolicyId, ResourceKey, ResourceType, SubjectId,
};
pub use timestamp::Timestamp;
