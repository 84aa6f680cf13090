//! Lockout prevention: a policy must keep someone who can change it.

use std::sync::Arc;

use crate::enforcer::{Enforcer, Mode};
use crate::model::{Permission, Policy, ResourceType};
use crate::timestamp::Timestamp;

/// Why a policy was refused by [`check_lockout`] or [`check_lockout_on`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the policy would lock everyone out: no permanent subject (one without `expiry`) keeps unrestricted WRITE on `{kind}:/`"
)]
pub struct LockoutError {
    /// The resource type whose root must stay writable (`policy` for thing policies).
    pub kind: ResourceType,
}

/// Accepts a policy only if at least one subject *without expiry*, on its own, has unrestricted
/// WRITE on `policy:/` — as Ditto refuses to store a policy nobody could change afterwards.
///
/// Only the policy's own entries without `namespaces` count: imported entries can disappear
/// with the imported policy, and a namespace-restricted entry does not apply to the policy
/// resource itself.
pub fn check_lockout(policy: &Policy) -> Result<(), LockoutError> {
    check_lockout_on(policy, ResourceType::Policy)
}

/// [`check_lockout`] for another resource type's root: a solution policy, for instance, must
/// keep someone with unrestricted WRITE on `solution:/`.
pub fn check_lockout_on(policy: &Policy, kind: ResourceType) -> Result<(), LockoutError> {
    let enforcer = Arc::new(Enforcer::compile(policy));
    let permanent = policy
        .entries
        .values()
        .filter(|e| e.namespaces.as_ref().is_none_or(Vec::is_empty))
        .flat_map(|e| e.subjects.iter())
        .filter(|(_, s)| s.expiry.is_none());
    for (subject, _) in permanent {
        // At `Timestamp::MAX` every subject with an expiry has expired, wherever it appears.
        let view = enforcer.for_subjects(&[subject.as_str()], None, Timestamp::MAX);
        if view.check(kind, "/", Permission::Write, Mode::Unrestricted) {
            return Ok(());
        }
    }
    Err(LockoutError { kind })
}
