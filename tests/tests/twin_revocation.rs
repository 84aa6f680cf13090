#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! Policy changes reach live subscribers (issue 5, DESIGN.md §4: "a policy change takes effect
//! for live connections and subscriptions at once"; §10: "a policy change stops deliveries to
//! live subscribers within 50 ms").
//!
//! The scenario: a device modifies a thing in a loop (QoS 1, one modify in flight: the next
//! one as soon as the previous one is acknowledged, so one is nearly always in flight when a
//! policy change lands; about one per 0.3–1 ms here), two watchers (MQTT 5 and 3.1.1, secret
//! clients of their own client IDs) and a control subscriber (which keeps READ) are subscribed
//! to the thing's events, and the owner switches the watchers' READ off and on with policy
//! modifies (QoS 1, MQTT 5): the whole policy, or only the watchers' entry.
//!
//! # What each watcher must receive, and the slack
//! Every instant is taken where the packet was read off the socket. Thing revisions are
//! known: the thing is created at revision 1 and only the device changes it, so its k-th
//! modify makes revision k + 1.
//!
//! For a policy change sent at S and acknowledged at T:
//! - `before` = the last revision whose PUBACK the device had read before S. Its event was
//!   offered to the subscribers before its PUBACK was sent, so before the change was even
//!   sent: it was judged with the old policy.
//! - `after` = the last revision whose PUBACK the device had read by T, plus one. The device
//!   sends revision r + 1 only after reading the PUBACK of r, so a revision above `after` was
//!   sent after T, hence applied after the change (which was applied before its PUBACK was
//!   sent) and offered after it: judged with the new policy. The "+ 1" is the in-flight slack:
//!   the one modify that may have been applied before the change while its PUBACK was still on
//!   the way.
//! - Revisions in `before + 1 ..= after` may go either way.
//!
//! So after a revocation acknowledged at T, a watcher receives no revision above `after`;
//! after a grant it receives every revision above `after` (no resubscription); and every
//! revision published while it was granted (up to `before` of the next revocation) reaches
//! it. The revocation delay is the time from T to the last delivery the watcher still got
//! (an event published before the change that was still queued or on the wire); 0 if its
//! last delivery came before T.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use broker::mqtt::codec::{Protocol, QoS};
use e2e::broker::{Broker, Solution};
use e2e::twin_random_support::{
    Delivered, NET_TIMEOUT, NS, SeenEvent, TwinClient, client_subject, is_event, min_median_max,
    policy_command, thing_command,
};
use serde_json::{Value, json};

/// The thing and its policy.
const THING: &str = "org.acme:lamp";
const POLICY: &str = "org.acme:lamp-policy";

/// How long each state (granted / revoked) lasts while the device keeps publishing.
const WINDOW: Duration = Duration::from_millis(250);

/// DESIGN.md §10: a policy change stops deliveries to live subscribers within 50 ms.
const TARGET: Duration = Duration::from_millis(50);

/// What the test asserts: deliveries queued before the change may still be written after its
/// PUBACK, and on a loaded CI machine (other tests in parallel on 2 cores) that can take longer
/// than the target. Nothing judged by the new policy may arrive at all (checked by revision);
/// this bound only catches a revocation that does not take effect. The measured delay is
/// printed and compared with `TARGET` in README.md from quiet runs.
const ASSERTED: Duration = Duration::from_millis(500);

/// The watchers whose READ is switched, and the protocols they speak.
const WATCHERS: [(&str, Protocol); 2] = [("watcher5", Protocol::V5), ("watcher3", Protocol::V311)];

/// One test at a time in this binary: they measure delays on a small machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How the watchers' READ is given or taken in one policy change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// The whole policy with the watchers' entry granting READ on `thing:/`.
    Grant,
    /// The whole policy with that entry revoking READ on `thing:/`.
    RevokeExplicitly,
    /// Only the entry (`…/policies/commands/modify/entries/watchers`), granting READ again.
    GrantEntry,
    /// The whole policy without the watchers' entry.
    RemoveEntry,
}

impl Change {
    fn grants(self) -> bool {
        matches!(self, Change::Grant | Change::GrantEntry)
    }
}

fn subjects_json(subjects: &[String]) -> Value {
    let map: serde_json::Map<String, Value> = subjects
        .iter()
        .map(|s| (s.clone(), json!({"type": "e2e"})))
        .collect();
    Value::Object(map)
}

fn watcher_entry(solution: &Solution, read: bool) -> Value {
    let subjects: Vec<String> = WATCHERS
        .iter()
        .map(|(id, _)| client_subject(solution, id))
        .collect();
    let (grant, revoke) = if read {
        (json!(["READ"]), json!([]))
    } else {
        (json!([]), json!(["READ"]))
    };
    json!({
        "subjects": subjects_json(&subjects),
        "resources": {"thing:/": {"grant": grant, "revoke": revoke}},
    })
}

/// The policy: the owner administers it, the device may WRITE the thing, the control
/// subscriber may READ it, and the watchers' entry as `watchers` says (`None`: no entry).
fn policy(solution: &Solution, watchers: Option<bool>) -> Value {
    let one = |id: &str| subjects_json(&[client_subject(solution, id)]);
    let mut entries = json!({
        "owner": {
            "subjects": one("owner"),
            "resources": {
                "policy:/": {"grant": ["READ", "WRITE"], "revoke": []},
                "thing:/": {"grant": ["READ", "WRITE"], "revoke": []},
            },
        },
        "device": {
            "subjects": one("device"),
            "resources": {"thing:/": {"grant": ["WRITE"], "revoke": []}},
        },
        "control": {
            "subjects": one("control"),
            "resources": {"thing:/": {"grant": ["READ"], "revoke": []}},
        },
    });
    if let Some(read) = watchers {
        entries["watchers"] = watcher_entry(solution, read);
    }
    json!({"policyId": POLICY, "entries": entries})
}

/// One policy change as the test saw it.
#[derive(Debug, Clone, Copy)]
struct Switch {
    grants: bool,
    /// When the owner handed the PUBLISH to its writer.
    sent: Instant,
    /// When the owner read the PUBACK.
    acked: Instant,
    /// Revisions up to this one were judged with the old policy.
    before: u64,
    /// Revisions above this one were judged with the new policy.
    after: u64,
}

/// What happened in one scenario.
struct Outcome {
    switches: Vec<Switch>,
    /// Per watcher (and the control subscriber last): its thing events, `(revision, arrival)`.
    received: Vec<(String, Vec<(u64, Instant)>)>,
    /// The device's acknowledged modifies: `(revision, PUBACK arrival)`.
    published: Vec<(u64, Instant)>,
    /// Whether the watchers had READ before the first switch.
    initially_granted: bool,
}

/// Whether a watcher must (`Some(true)`), must not (`Some(false)`) or may (`None`) receive
/// revision `rev`.
fn entitled(outcome: &Outcome, rev: u64) -> Option<bool> {
    let mut granted = outcome.initially_granted;
    for s in &outcome.switches {
        if rev <= s.before {
            return Some(granted);
        }
        if rev <= s.after {
            return None;
        }
        granted = s.grants;
    }
    Some(granted)
}

fn events_of(deliveries: Vec<Delivered>) -> Vec<(u64, Instant)> {
    deliveries
        .into_iter()
        .filter(is_event)
        .map(|d| {
            let event = SeenEvent::parse(&d);
            assert_eq!(event.path, "/attributes/n", "{event:?}");
            // The k-th modify sets n = k and makes revision k + 1.
            assert_eq!(
                event.value,
                Some(json!(event.revision - 1)),
                "event value and revision disagree: {event:?}"
            );
            (event.revision, d.at)
        })
        .collect()
}

/// Runs the scenario: the watchers start with READ iff `initially_granted`, then the owner
/// applies `changes` one window apart while the device publishes.
async fn scenario(initially_granted: bool, changes: &[Change]) -> Outcome {
    let mut broker = Broker::new();
    let solution = broker.create_solution(NS);
    broker.start();
    let addr = broker.mqtt_addr();
    let mut owner = TwinClient::connect(addr, Protocol::V5, "owner", &solution).await;
    let mut device = TwinClient::connect(addr, Protocol::V5, "device", &solution).await;
    let mut control = TwinClient::connect(addr, Protocol::V5, "control", &solution).await;
    let mut watchers = Vec::new();
    for (id, protocol) in WATCHERS {
        watchers.push(TwinClient::connect(addr, protocol, id, &solution).await);
    }
    let initial = policy(&solution, initially_granted.then_some(true));
    let ack = owner
        .publish_qos1(
            &policy_command(POLICY, "create", ""),
            initial.to_string().as_bytes(),
        )
        .await;
    assert_eq!(ack.reason, 0, "policy create: {ack:?}");
    let ack = owner
        .publish_qos1(
            &thing_command(THING, "create", ""),
            json!({"policyId": POLICY, "attributes": {"n": 0}})
                .to_string()
                .as_bytes(),
        )
        .await;
    assert_eq!(ack.reason, 0, "thing create: {ack:?}");
    for client in watchers.iter_mut().chain([&mut control]) {
        client
            .subscribe_ok("org.acme/+/things/twin/events/#", QoS::AtLeastOnce)
            .await;
    }

    // The device: one modify in flight at a time, each PUBACK logged with its revision.
    let published: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let device_task = {
        let published = Arc::clone(&published);
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let topic = thing_command(THING, "modify", "/attributes/n");
            let mut k: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                let ack = device.publish_qos1(&topic, k.to_string().as_bytes()).await;
                assert_eq!(
                    ack.reason, 0,
                    "the device's modify {k} was refused: {ack:?}"
                );
                published.lock().unwrap().push((k + 1, ack.at));
            }
            device
        })
    };
    let acked_before = |instant: Instant, inclusive: bool| -> u64 {
        published
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, at)| {
                if inclusive {
                    *at <= instant
                } else {
                    *at < instant
                }
            })
            .map(|(rev, _)| *rev)
            .max()
            .unwrap_or(1)
    };

    let mut switches = Vec::new();
    tokio::time::sleep(WINDOW).await;
    for &change in changes {
        let (topic, payload) = match change {
            Change::Grant => (
                policy_command(POLICY, "modify", ""),
                policy(&solution, Some(true)),
            ),
            Change::RevokeExplicitly => (
                policy_command(POLICY, "modify", ""),
                policy(&solution, Some(false)),
            ),
            Change::GrantEntry => (
                policy_command(POLICY, "modify", "/entries/watchers"),
                watcher_entry(&solution, true),
            ),
            Change::RemoveEntry => (
                policy_command(POLICY, "modify", ""),
                policy(&solution, None),
            ),
        };
        let sent = Instant::now();
        let ack = owner
            .send_qos1(&topic, payload.to_string().as_bytes())
            .wait()
            .await;
        assert_eq!(ack.reason, 0, "policy change {change:?}: {ack:?}");
        switches.push(Switch {
            grants: change.grants(),
            sent,
            acked: ack.at,
            before: acked_before(sent, false),
            after: acked_before(ack.at, true) + 1,
        });
        tokio::time::sleep(WINDOW).await;
    }
    stop.store(true, Ordering::Relaxed);
    let device = tokio::time::timeout(NET_TIMEOUT, device_task)
        .await
        .expect("the device stops")
        .expect("the device's loop did not fail");
    drop(device);

    let mut received = Vec::new();
    for client in watchers.iter_mut().chain([&mut control]) {
        let deliveries = client
            .drain_until_quiet(Duration::from_millis(400), NET_TIMEOUT)
            .await;
        received.push((client.client_id.clone(), events_of(deliveries)));
    }
    let published = published.lock().unwrap().clone();
    broker.stop();
    Outcome {
        switches,
        received,
        published,
        initially_granted,
    }
}

/// One revocation as one watcher saw it.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// The revocation delay: from the policy change's PUBACK to the last delivery the watcher
    /// still got (0 when that delivery came before the PUBACK).
    after_ack: Duration,
    /// The same, signed (negative: deliveries had stopped before the PUBACK arrived).
    offset_ms: f64,
    /// From the moment the owner sent the change to that last delivery.
    from_send_ms: f64,
}

/// `a - b` in milliseconds, signed.
fn signed_ms(a: Instant, b: Instant) -> f64 {
    if a >= b {
        a.duration_since(b).as_secs_f64() * 1e3
    } else {
        -(b.duration_since(a).as_secs_f64() * 1e3)
    }
}

/// Checks every watcher's deliveries against [`entitled`] and the control subscriber's against
/// the device's log; returns the revocations as the watchers saw them.
fn check(outcome: &Outcome) -> Vec<Sample> {
    let last = outcome.published.last().map_or(1, |(rev, _)| *rev);
    for pair in outcome.switches.windows(2) {
        // Each window must hold revisions that are certainly judged by one policy revision,
        // or the test would prove nothing.
        assert!(
            pair[1].before > pair[0].after + 2,
            "the device published too little between two policy changes: {pair:?}"
        );
    }
    if let Some(s) = outcome.switches.last() {
        assert!(
            last > s.after + 2,
            "the device published too little after the last change: {s:?}, last revision {last}"
        );
    }
    let (control, watchers) = outcome.received.split_last().expect("a control subscriber");
    let control_revisions: Vec<u64> = control.1.iter().map(|(rev, _)| *rev).collect();
    let all: Vec<u64> = (2..=last).collect();
    assert_eq!(
        control_revisions, all,
        "the control subscriber (READ all along) must receive every revision once, in order"
    );
    let mut samples = Vec::new();
    for (name, events) in watchers {
        let revisions: Vec<u64> = events.iter().map(|(rev, _)| *rev).collect();
        assert!(
            revisions.windows(2).all(|w| w[0] < w[1]),
            "`{name}` received revisions out of order or twice: {revisions:?}"
        );
        for (rev, at) in events {
            if entitled(outcome, *rev) != Some(false) {
                continue;
            }
            match outcome.switches.iter().rev().find(|s| s.after < *rev) {
                Some(switch) => panic!(
                    "`{name}` received revision {rev} {:?} after the policy change acknowledged \
                     at {:?} that took its READ away (the device had acknowledged up to \
                     revision {} then, so revisions above {} were published after it)",
                    at.saturating_duration_since(switch.acked),
                    switch.acked,
                    switch.after - 1,
                    switch.after,
                ),
                None => panic!("`{name}` received revision {rev} before it was ever granted READ"),
            }
        }
        let missing: Vec<u64> = (2..=last)
            .filter(|rev| entitled(outcome, *rev) == Some(true) && !revisions.contains(rev))
            .collect();
        assert!(
            missing.is_empty(),
            "`{name}` had READ for revisions {missing:?} but did not receive them"
        );
        for (i, s) in outcome.switches.iter().enumerate() {
            let next = outcome.switches.get(i + 1).map(|n| n.sent);
            let in_window = |at: &Instant| next.is_none_or(|n| *at < n);
            if s.grants {
                let first = events
                    .iter()
                    .find(|(rev, _)| *rev > s.after)
                    .map(|(rev, at)| (*rev, at.saturating_duration_since(s.acked)));
                eprintln!(
                    "`{name}`: grant acknowledged; first revision certainly after it: {} \
                     (published up to {} when acknowledged); first such delivery {:?} after \
                     the acknowledgement",
                    s.after + 1,
                    s.after - 1,
                    first
                );
            } else {
                let in_window: Vec<&(u64, Instant)> =
                    events.iter().filter(|(_, at)| in_window(at)).collect();
                let late = in_window.iter().filter(|(_, at)| *at > s.acked).count();
                let Some((last_rev, last_at)) = in_window.last().copied() else {
                    continue;
                };
                let sample = Sample {
                    after_ack: last_at.saturating_duration_since(s.acked),
                    offset_ms: signed_ms(*last_at, s.acked),
                    from_send_ms: signed_ms(*last_at, s.sent),
                };
                eprintln!(
                    "`{name}`: revocation sent, acknowledged {:.2} ms later (device had \
                     acknowledged revision {} when it was sent, {} when it was acknowledged); \
                     last delivery: revision {last_rev} at {:+.2} ms from the acknowledgement \
                     ({:+.2} ms from the send), {late} deliveries after the acknowledgement",
                    signed_ms(s.acked, s.sent),
                    s.before,
                    s.after - 1,
                    sample.offset_ms,
                    sample.from_send_ms,
                );
                samples.push(sample);
            }
        }
    }
    samples
}

/// Prints the revocation delays of `samples` (min/median/max) and returns the largest.
fn report(label: &str, samples: &[Sample]) -> Duration {
    let mut delays: Vec<Duration> = samples.iter().map(|s| s.after_ack).collect();
    let sorted = |f: fn(&Sample) -> f64| {
        let mut v: Vec<f64> = samples.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let offsets = sorted(|s| s.offset_ms);
    let from_send = sorted(|s| s.from_send_ms);
    let Some((min, median, max)) = min_median_max(&mut delays) else {
        return Duration::ZERO;
    };
    let mid = |v: &[f64]| v.get(v.len() / 2).copied().unwrap_or_default();
    eprintln!(
        "revocation delay ({label}, {} samples): min {min:?}, median {median:?}, max {max:?} \
         (DESIGN.md target: ≤ {TARGET:?}); last delivery relative to the PUBACK: min {:+.2} ms, \
         median {:+.2} ms, max {:+.2} ms; relative to sending the change: min {:+.2} ms, median \
         {:+.2} ms, max {:+.2} ms",
        samples.len(),
        offsets.first().copied().unwrap_or_default(),
        mid(&offsets),
        offsets.last().copied().unwrap_or_default(),
        from_send.first().copied().unwrap_or_default(),
        mid(&from_send),
        from_send.last().copied().unwrap_or_default(),
    );
    max
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_live_subscriber_receives_nothing_published_after_the_policy_change_is_acked() {
    let _serial = SERIAL.lock().await;
    let outcome = scenario(
        true,
        &[
            Change::RevokeExplicitly,
            Change::Grant,
            Change::RemoveEntry,
            Change::GrantEntry,
            Change::RevokeExplicitly,
        ],
    )
    .await;
    let samples = check(&outcome);
    assert_eq!(samples.len(), 3 * WATCHERS.len());
    let max = report("revoke, grant, remove entry, grant entry, revoke", &samples);
    assert!(
        max <= ASSERTED,
        "a revoked subscriber still received deliveries {max:?} after the policy change was \
         acknowledged (target {TARGET:?}, asserted {ASSERTED:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_reaches_a_live_subscriber_at_once_without_resubscribing() {
    let _serial = SERIAL.lock().await;
    let outcome = scenario(false, &[Change::Grant]).await;
    check(&outcome);
    for (name, events) in &outcome.received[..WATCHERS.len()] {
        assert!(
            !events.is_empty(),
            "`{name}` received nothing after being granted READ"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_subscriber_that_is_granted_again_receives_again() {
    let _serial = SERIAL.lock().await;
    let outcome = scenario(true, &[Change::RemoveEntry, Change::GrantEntry]).await;
    let samples = check(&outcome);
    report("remove entry, grant entry", &samples);
    let regrant = outcome.switches[1];
    for (name, events) in &outcome.received[..WATCHERS.len()] {
        assert!(
            events.iter().any(|(rev, _)| *rev > regrant.after),
            "`{name}` received nothing after READ was granted again"
        );
    }
}
