//! The thing model (Eclipse Ditto's): document shape, validation and size limits.
