//! MQTT 3.1.1 / 5 connections to an external broker (rumqttc). Being written.

use std::sync::Arc;

use tokio::sync::watch;

use crate::bridge::config::Compiled;
use crate::bridge::{State, Status};
use crate::core::Core;

pub async fn run(
    _core: Arc<Core>,
    _solution: String,
    _compiled: Compiled,
    status: Arc<Status>,
    mut stop: watch::Receiver<bool>,
) {
    status.set(State::Failed("MQTT bridges are not built yet".into()));
    crate::bridge::until_set(&mut stop).await;
}
