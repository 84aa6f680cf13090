//! Thingsgate's twins: the thing model (Eclipse Ditto's), the Ditto protocol envelope and its
//! compact MQTT topic form, command application (commands → events, with the permissions each
//! command needs), and durable embedded storage (journal with group commit, snapshots).
//!
//! Not built yet: issue "Twins: the Ditto protocol, command application, and durable embedded
//! storage" fills this crate. It depends on [`policy`] only (DESIGN.md §8: broker → twin → policy).

pub use policy;
