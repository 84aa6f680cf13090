//! Durable storage of things, policies and solutions: journal with group commit, snapshots.
