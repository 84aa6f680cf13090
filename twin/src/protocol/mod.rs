//! The Ditto protocol: topics, the JSON envelope, and the compact MQTT topic form.
