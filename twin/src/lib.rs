//! Thingsgate's twins: the thing model (Eclipse Ditto's), the Ditto protocol envelope and its
//! compact MQTT topic form, command application (commands → events, with the permissions each
//! command needs), and durable embedded storage (journal with group commit, snapshots).
//!
//! Dependencies point one way (DESIGN.md §8): broker → twin → [`policy`].
//!
//! # Layout
//! - [`id`]: thing IDs (policy IDs come from `policy`).
//! - [`error`]: Ditto's errors (`{status, error, message, description}`).
//! - [`entity`]: stored entities as JSON documents, and the [`entity::Event`]s that change them.
//! - [`merge`]: JSON merge patch (RFC 7396).
//! - [`path`]: the levels of a thing that commands address.
//! - [`command`]: commands, independent of how they arrived.
//! - [`thing`]: the thing document: shape, validation, limits.
//! - [`apply`]: command application (pure): command + current entity → event or answer.
//! - [`authz`]: the (resource, permission, mode) each command needs; retrieve answers cut to views.
//! - [`protocol`]: Ditto topics and envelope, the compact MQTT topic form.
//! - [`store`]: the durable embedded store (journal, group commit, snapshots).

pub mod apply;
pub mod authz;
pub mod command;
pub mod entity;
pub mod error;
pub mod id;
pub mod merge;
pub mod path;
pub mod protocol;
pub mod rql;
pub mod store;
pub mod thing;

pub use entity::{Entity, EntityKey, EntityKind, Event, EventAction};
pub use error::DittoError;
pub use id::{PolicyId, ThingId};
pub use policy;
