//! Command application: a command and the current entity give an event (or a retrieve answer).
