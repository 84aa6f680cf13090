#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! Cluster mode when NATS fails (issue 16, DESIGN.md §6), on nats-servers of each test's own:
//!
//! - R3 (a cluster of three current nats-servers, `THINGSGATE_NATS_SERVER_BIN`): two nodes on
//!   different servers racing on one thing lose no update; kill -9 of the stream's leader while
//!   a device writes pauses its writes (the pause is measured and bounded) and loses no
//!   acknowledged one.
//! - R1 (Debian's nats-server): a node whose NATS is gone says so on `/ready`, refuses writes
//!   and deliveries (fail closed), and serves again once NATS is back, with nothing lost; a
//!   write that outlives the write deadline while NATS hangs fails, and if NATS stores it after
//!   all, every node (the writing one included) shows it.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use broker::mqtt::codec::{Protocol, QoS};
use e2e::broker::{Broker, Solution, create_cluster_solution, create_cluster_solution_env};
use e2e::nats::{NatsServers, current_server_bin, debian_server_bin, request_json, unique_prefix};
use e2e::twin_random_support::{
    Ack, NET_TIMEOUT, NS, PendingAck, TwinClient, client_subject, is_event, policy_command,
    thing_command,
};
use serde_json::{Value, json};

const THING: &str = "org.acme:lamp";
const POLICY: &str = "org.acme:lamp-policy";
/// MQTT 5 PUBACK reason codes.
const SUCCESS: u8 = 0x00;
const UNSPECIFIED_ERROR: u8 = 0x80;

fn subjects_json(subjects: &[String]) -> Value {
    Value::Object(
        subjects
            .iter()
            .map(|s| (s.clone(), json!({"type": "e2e"})))
            .collect(),
    )
}

/// The owner administers; the device and the app may READ and WRITE the thing and send and
/// receive its messages.
fn policy(solution: &Solution) -> Value {
    let one = |id: &str| subjects_json(&[client_subject(solution, id)]);
    let user = json!({
        "thing:/": {"grant": ["READ", "WRITE"], "revoke": []},
        "message:/": {"grant": ["READ", "WRITE"], "revoke": []},
    });
    json!({"policyId": POLICY, "entries": {
        "owner": {"subjects": one("owner"), "resources": {
            "policy:/": {"grant": ["READ", "WRITE"], "revoke": []},
            "thing:/": {"grant": ["READ", "WRITE"], "revoke": []},
        }},
        "device": {"subjects": one("device"), "resources": user.clone()},
        "app": {"subjects": one("app"), "resources": user},
    }})
}

async fn client(node: &Broker, id: &str, solution: &Solution) -> TwinClient {
    TwinClient::connect(node.mqtt_addr(), Protocol::V5, id, solution).await
}

async fn ok(client: &mut TwinClient, topic: &str, payload: &Value) {
    let ack = client
        .publish_qos1(topic, payload.to_string().as_bytes())
        .await;
    assert_eq!(
        ack.reason, SUCCESS,
        "`{topic}` refused: {:?}",
        ack.reason_string
    );
}

/// The owner creates the policy and the thing (`attributes` as given), through `node`.
async fn create_thing(node: &Broker, solution: &Solution, attributes: Value) {
    let mut owner = client(node, "owner", solution).await;
    ok(
        &mut owner,
        &policy_command(POLICY, "create", "/"),
        &policy(solution),
    )
    .await;
    ok(
        &mut owner,
        &thing_command(THING, "create", "/"),
        &json!({"policyId": POLICY, "attributes": attributes}),
    )
    .await;
}

/// A cluster node on `urls` and `stream`, creating an R3 stream if it is the first.
fn start_node(urls: &str, stream: &str, replicas: usize) -> Broker {
    let mut node = Broker::cluster_node(urls, stream);
    node.env("THINGSGATE_CLUSTER_REPLICAS", &replicas.to_string());
    node.start();
    node
}

/// `GET /ready` of `node`: (status, body); (0, error) if it does not answer within 2 s.
async fn ready(node: &Broker) -> (u16, String) {
    let url = format!("http://{}/ready", e2e::http::http_addr(node));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    match client.get(url).send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            (status, response.text().await.unwrap_or_default())
        }
        Err(e) => (0, e.to_string()),
    }
}

/// Polls `/ready` every 20 ms until it answers `status`; how long that took and the body.
/// Panics (with the node's log tail) after `limit`.
async fn wait_ready(node: &Broker, status: u16, limit: Duration) -> (Duration, String) {
    let began = Instant::now();
    loop {
        let (got, body) = ready(node).await;
        if got == status {
            return (began.elapsed(), body);
        }
        if began.elapsed() > limit {
            let logs = node.logs();
            let tail: Vec<&str> = logs.lines().rev().take(30).collect();
            panic!(
                "/ready did not answer {status} within {limit:?} (last: {got} {body})\n\
                 node log (newest first):\n{}",
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the node's cluster store logged: warnings and information (it lost or regained NATS,
/// fell behind, followed the stream again) and its attempts to follow the stream again.
fn store_log(node: &Broker) -> String {
    node.logs()
        .lines()
        .filter(|l| {
            l.contains("twin::store::cluster") && (!l.contains("DEBUG") || l.contains("follow"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Asserts that `/ready` answers 200 now; panics with the body and the node's cluster log
/// lines otherwise.
async fn assert_ready(node: &Broker) {
    let (status, body) = ready(node).await;
    if status != 200 {
        panic!(
            "/ready answers {status}: {}\nthe node's cluster store said:\n{}",
            body.trim(),
            store_log(node)
        );
    }
}

/// `thingsgate_cluster_conflicts_total` of `node`.
async fn conflicts(node: &Broker) -> f64 {
    let metrics = reqwest::get(format!("http://{}/metrics", e2e::http::http_addr(node)))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("thingsgate_cluster_conflicts_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no cluster_conflicts in /metrics:\n{metrics}"))
}

/// The thing's attributes and revision as `client`'s node has it.
async fn read_thing(client: &mut TwinClient) -> (serde_json::Map<String, Value>, u64) {
    let state = client.retrieve_fields(THING, "attributes,_revision").await;
    assert_eq!(state["status"], json!(200), "{state}");
    (
        state["value"]["attributes"]
            .as_object()
            .cloned()
            .unwrap_or_default(),
        state["value"]["_revision"].as_u64().unwrap_or(0),
    )
}

/// Reads the thing on `client`'s node until its revision is at least `revision` (another
/// node's writes arrive through the stream); panics after [`NET_TIMEOUT`].
async fn read_thing_at(
    client: &mut TwinClient,
    revision: u64,
) -> (serde_json::Map<String, Value>, u64) {
    let deadline = Instant::now() + NET_TIMEOUT;
    loop {
        let (attributes, got) = read_thing(client).await;
        if got >= revision {
            return (attributes, got);
        }
        assert!(
            Instant::now() < deadline,
            "`{}`'s node stays at revision {got}, below {revision}",
            client.client_id
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// --- R3 --------------------------------------------------------------------------------------

/// Three current nats-servers, an R3 stream of the test's own holding solution `acme`.
struct R3 {
    nats: NatsServers,
    stream: String,
    solution: Solution,
}

impl R3 {
    fn start(test: &str) -> R3 {
        let nats = NatsServers::start(3, &current_server_bin());
        let stream = unique_prefix(test).to_uppercase();
        // The CLI creates the stream: R3, as the nodes would.
        let solution = create_cluster_solution_env(
            &nats.url_list(),
            &stream,
            "acme",
            NS,
            &[("THINGSGATE_CLUSTER_REPLICAS", "3")],
        );
        let mut r3 = R3 {
            nats,
            stream,
            solution,
        };
        let info = r3.stream_info(None);
        assert_eq!(
            info.pointer("/config/num_replicas"),
            Some(&json!(3)),
            "the stream is not R3: {info}"
        );
        r3
    }

    /// `$JS.API.STREAM.INFO` from any running server (other than `except`), retried for up to
    /// 30 s (during an election the API may not answer).
    fn stream_info(&mut self, except: Option<usize>) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = String::new();
        loop {
            for i in 0..self.nats.len() {
                if Some(i) == except || !self.nats.is_running(i) {
                    continue;
                }
                let url = &self.nats.urls()[i];
                match request_json(
                    url,
                    &format!("$JS.API.STREAM.INFO.{}", self.stream),
                    &json!({}),
                    Duration::from_secs(2),
                ) {
                    Ok(info) if info.get("error").is_none() => return info,
                    Ok(info) => last = info.to_string(),
                    Err(e) => last = e,
                }
            }
            assert!(
                Instant::now() < deadline,
                "no stream info within 30 s: {last}\n{}",
                self.nats.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The stream's leader (a running server's index), once one is elected.
    fn stream_leader(&mut self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let info = self.stream_info(None);
            if let Some(leader) = info.pointer("/cluster/leader").and_then(Value::as_str) {
                let i = self.nats.index_of(leader);
                if self.nats.is_running(i) {
                    return i;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no stream leader within 30 s: {info}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A node connected to server `i` first (it learns the others from it).
    fn node_on(&self, i: usize) -> Broker {
        start_node(&self.nats.urls()[i], &self.stream, 3)
    }

    /// How many Thingsgate nodes are connected to server `i` (its `/connz`).
    fn nodes_connected_to(&self, i: usize) -> usize {
        let (status, body) = self.nats.monitor(i, "/connz");
        assert_eq!(status, 200, "/connz: {body}");
        let connz: Value = serde_json::from_str(&body).unwrap();
        connz["connections"].as_array().map_or(0, |c| {
            c.iter().filter(|c| c["name"] == "thingsgate").count()
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r3_two_nodes_on_different_servers_racing_on_one_thing_lose_no_update() {
    let r3 = R3::start("r3race");
    let nodes = [r3.node_on(0), r3.node_on(1)];
    assert_eq!(
        (0..3).map(|i| r3.nodes_connected_to(i)).collect::<Vec<_>>(),
        vec![1, 1, 0],
        "one node on n1, the other on n2"
    );
    create_thing(&nodes[0], &r3.solution, json!({"log": {}})).await;
    // Two writers on two nodes (on two nats-servers), each adding 40 distinct attributes to
    // the same thing, 4 in flight: every acknowledged write must be there, in revisions 1..n.
    // A write may be refused after 64 conflicts in a row (the core gives up: one node's
    // pipelined writes can starve the other's, as JetStream ≥ 2.11 also refuses a CAS append
    // while another append of the subject is in flight): such a write is counted, must say so
    // in the node's log, and must not be stored.
    const EACH: usize = 40;
    let mut tasks = Vec::new();
    for (node, id) in [(0, "device"), (1, "app")] {
        let mut writer = client(&nodes[node], id, &r3.solution).await;
        tasks.push(tokio::spawn(async move {
            let mut pending: VecDeque<(usize, PendingAck)> = VecDeque::new();
            let mut refused = Vec::new();
            for i in 0..EACH {
                let topic = thing_command(THING, "modify", &format!("/attributes/log/n{node}-{i}"));
                pending.push_back((i, writer.send_qos1(&topic, b"true")));
                if pending.len() >= 4 {
                    let (i, p) = pending.pop_front().unwrap();
                    let ack = p.wait().await;
                    if ack.reason != SUCCESS {
                        refused.push((i, ack));
                    }
                }
            }
            for (i, p) in pending {
                let ack = p.wait().await;
                if ack.reason != SUCCESS {
                    refused.push((i, ack));
                }
            }
            (writer, refused)
        }));
    }
    let mut writers = Vec::new();
    let mut refused_keys = Vec::new();
    for (node, task) in tasks.into_iter().enumerate() {
        let (writer, refused) = tokio::time::timeout(Duration::from_secs(40), task)
            .await
            .expect("the writers finish within 40 s")
            .unwrap();
        let logs = nodes[node].logs();
        let gave_up = logs
            .lines()
            .filter(|l| l.contains("conflicts in a row; giving up"))
            .count();
        let all_starved = refused.iter().all(|(_, ack)| {
            ack.reason == UNSPECIFIED_ERROR
                && ack.reason_string.as_deref() == Some("the change could not be stored")
        });
        if !all_starved || gave_up != refused.len() {
            let said: Vec<&str> = logs
                .lines()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
                .collect();
            panic!(
                "writes through node {node} refused ({gave_up} gave up after conflicts): \
                 {refused:?}\nthe node's warnings and errors:\n{}",
                said.join("\n")
            );
        }
        refused_keys.extend(refused.iter().map(|(i, _)| format!("n{node}-{i}")));
        writers.push(writer);
    }
    // Each node: revision 1 (create) + one per acknowledged write, each of them present, none
    // of the refused ones.
    let acked = 2 * EACH - refused_keys.len();
    let want = 1 + acked as u64;
    for (node, writer) in writers.iter_mut().enumerate() {
        let (attributes, revision) = read_thing_at(writer, want).await;
        assert_eq!(revision, want, "node {node}: a revision too many");
        let log = attributes["log"].as_object().unwrap();
        for n in 0..2 {
            for i in 0..EACH {
                let key = format!("n{n}-{i}");
                assert_eq!(
                    log.contains_key(&key),
                    !refused_keys.contains(&key),
                    "node {node}: write {key} (refused: {}) in the state: {log:?}",
                    refused_keys.contains(&key)
                );
            }
        }
        assert_eq!(log.len(), acked);
    }
    // The race was real.
    let total = conflicts(&nodes[0]).await + conflicts(&nodes[1]).await;
    eprintln!(
        "r3 race: {total} changes decided again after a conflict; {} of {} writes refused after \
         64 conflicts in a row: {refused_keys:?}",
        refused_keys.len(),
        2 * EACH
    );
    assert!(total > 0.0, "no conflict: the two nodes never raced");
}

/// What became of one write of the device.
#[derive(Debug)]
struct Outcome {
    n: u64,
    sent: Instant,
    ack: Ack,
}

/// kill -9 of the R3 stream's leader while a device writes through a node, 4 in flight.
/// `writer_on_leader`: the device's node is connected to that server (it must also reconnect:
/// the worst case); otherwise to another one (only the stream fails over).
async fn kill_the_stream_leader_while_writing(test: &str, writer_on_leader: bool) {
    let mut r3 = R3::start(test);
    let leader = r3.stream_leader();
    let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let (writer_server, reader_server) = if writer_on_leader {
        (leader, others[0])
    } else {
        (others[0], others[1])
    };
    let writer_node = r3.node_on(writer_server);
    let reader_node = r3.node_on(reader_server);
    eprintln!(
        "stream leader {}; the writing node on {}, the reading node on {}",
        r3.nats.name(leader),
        r3.nats.name(writer_server),
        r3.nats.name(reader_server)
    );
    create_thing(&writer_node, &r3.solution, json!({"log": {}})).await;
    let mut device = client(&writer_node, "device", &r3.solution).await;

    // Write /attributes/log/<n> = n, 4 in flight; kill -9 the leader after 2 s; go on until
    // writes have succeeded again for 3 s (at most 40 s after the kill).
    const IN_FLIGHT: usize = 4;
    let began = Instant::now();
    let mut killed_at: Option<Instant> = None;
    let mut resumed_at: Option<Instant> = None;
    let mut in_flight: VecDeque<(u64, Instant, PendingAck)> = VecDeque::new();
    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut n = 0u64;
    loop {
        let stop = match (killed_at, resumed_at) {
            (_, Some(resumed)) => resumed.elapsed() > Duration::from_secs(3),
            (Some(killed), None) => killed.elapsed() > Duration::from_secs(40),
            (None, None) => false,
        };
        while !stop && in_flight.len() < IN_FLIGHT {
            n += 1;
            let topic = thing_command(THING, "modify", &format!("/attributes/log/{n}"));
            let pending = device.send_qos1(&topic, n.to_string().as_bytes());
            in_flight.push_back((n, Instant::now(), pending));
        }
        let Some((m, sent, mut pending)) = in_flight.pop_front() else {
            break;
        };
        // PUBACKs come in order; a write may take up to the write deadline (20 s) and be
        // decided again after it.
        let ack = pending
            .wait_within(Duration::from_secs(45))
            .await
            .unwrap_or_else(|| {
                panic!(
                    "no PUBACK for write {m} within 45 s (connection closed: {})",
                    device.is_closed()
                )
            });
        // Resumed: a write sent after the kill succeeded.
        if ack.reason == SUCCESS && resumed_at.is_none() && killed_at.is_some_and(|k| sent > k) {
            resumed_at = Some(ack.at);
        }
        let failed = ack.reason != SUCCESS;
        outcomes.push(Outcome { n: m, sent, ack });
        if failed {
            // Refused at once (the node is not current): do not spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if killed_at.is_none() && began.elapsed() > Duration::from_secs(2) {
            r3.nats.kill9(leader);
            killed_at = Some(Instant::now());
            eprintln!(
                "killed nats-server {} (stream leader)",
                r3.nats.name(leader)
            );
        }
    }
    let killed_at = killed_at.unwrap();
    assert!(
        resumed_at.is_some(),
        "writes never succeeded again within 40 s of the kill: {:?}",
        outcomes.iter().rev().take(5).collect::<Vec<_>>()
    );

    // The pauses: between consecutive PUBACKs, and between consecutive successful ones.
    let gap = |acks: &mut dyn Iterator<Item = &Outcome>| {
        let mut longest = Duration::ZERO;
        let mut previous: Option<Instant> = None;
        for o in acks {
            if let Some(p) = previous {
                longest = longest.max(o.ack.at.saturating_duration_since(p));
            }
            previous = Some(o.ack.at);
        }
        longest
    };
    let any_gap = gap(&mut outcomes.iter());
    let write_pause = gap(&mut outcomes.iter().filter(|o| o.ack.reason == SUCCESS));
    let failed: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.ack.reason != SUCCESS)
        .collect();
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for o in &failed {
        *reasons
            .entry(format!("{:#04x} {:?}", o.ack.reason, o.ack.reason_string))
            .or_default() += 1;
    }
    let slowest = outcomes
        .iter()
        .map(|o| o.ack.at.saturating_duration_since(o.sent))
        .max()
        .unwrap_or_default();
    eprintln!(
        "write pause: {:.2} s (longest gap between successful PUBACKs; between any PUBACKs: \
         {:.2} s; slowest write {:.2} s); writes: {} sent, {} acknowledged, {} failed {reasons:?}; \
         writes succeeded again {:.2} s after the kill",
        write_pause.as_secs_f64(),
        any_gap.as_secs_f64(),
        slowest.as_secs_f64(),
        outcomes.len(),
        outcomes.len() - failed.len(),
        failed.len(),
        resumed_at
            .unwrap()
            .saturating_duration_since(killed_at)
            .as_secs_f64(),
    );
    assert!(
        write_pause < Duration::from_secs(30),
        "writes paused for {write_pause:?}"
    );
    for o in &failed {
        assert!(
            o.ack.reason >= UNSPECIFIED_ERROR,
            "write {} got PUBACK {:#04x}",
            o.n,
            o.ack.reason
        );
    }

    // Both nodes serve again (a node whose stream consumer lived on the killed server is not
    // current until it follows the stream again).
    for (name, node) in [("writing", &writer_node), ("reading", &reader_node)] {
        let (waited, _) = wait_ready(node, 200, Duration::from_secs(30)).await;
        eprintln!(
            "the {name} node was ready again {:.2} s after the writes ended ({:.2} s after the kill)",
            waited.as_secs_f64(),
            killed_at.elapsed().as_secs_f64()
        );
    }
    for (name, node) in [("writing", &writer_node), ("reading", &reader_node)] {
        eprintln!("the {name} node's cluster store said:\n{}", store_log(node));
    }

    // Every acknowledged write is there, on the writing node and on the other one; the
    // revision counts exactly the writes stored.
    let acknowledged: Vec<u64> = outcomes
        .iter()
        .filter(|o| o.ack.reason == SUCCESS)
        .map(|o| o.n)
        .collect();
    let (attributes, revision) = read_thing(&mut device).await;
    let log = attributes["log"].as_object().unwrap().clone();
    let missing: Vec<u64> = acknowledged
        .iter()
        .copied()
        .filter(|n| log.get(&n.to_string()) != Some(&json!(n)))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged writes missing on the writing node: {missing:?}"
    );
    assert_eq!(
        revision,
        1 + log.len() as u64,
        "the revision counts the stored writes"
    );
    let stored_though_failed: Vec<u64> = failed
        .iter()
        .map(|o| o.n)
        .filter(|n| log.contains_key(&n.to_string()))
        .collect();
    eprintln!(
        "the thing: revision {revision}, {} writes stored; failed but stored: \
         {stored_though_failed:?}",
        log.len()
    );
    let mut reader = client(&reader_node, "app", &r3.solution).await;
    let (other, other_revision) = read_thing_at(&mut reader, revision).await;
    assert_eq!(other_revision, revision);
    assert_eq!(
        other["log"].as_object(),
        Some(&log),
        "the other node shows another state"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r3_kill_9_of_the_stream_leader_and_the_writing_nodes_server_loses_no_acknowledged_write() {
    kill_the_stream_leader_while_writing("r3killboth", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r3_kill_9_of_the_stream_leader_elsewhere_loses_no_acknowledged_write() {
    kill_the_stream_leader_while_writing("r3killleader", false).await;
}

// --- R1: no NATS at all ----------------------------------------------------------------------

/// One Debian nats-server of the test's own and a stream on it holding solution `acme`.
fn r1(test: &str) -> (NatsServers, String, Solution) {
    let nats = NatsServers::start(1, &debian_server_bin());
    let stream = unique_prefix(test).to_uppercase();
    let solution = create_cluster_solution(&nats.url_list(), &stream, "acme", NS);
    (nats, stream, solution)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_reach_nats_says_so_refuses_writes_and_recovers() {
    let (mut nats, stream, solution) = r1("unreachable");
    let url = nats.url_list();
    let node = start_node(&url, &stream, 1);
    let other = start_node(&url, &stream, 1);
    create_thing(&node, &solution, json!({"before": 1})).await;
    let mut device = client(&node, "device", &solution).await;
    ok(
        &mut device,
        &thing_command(THING, "modify", "/attributes/before"),
        &json!(2),
    )
    .await;
    assert_ready(&node).await;

    nats.kill9(0);
    let (to_503, body) = wait_ready(&node, 503, Duration::from_secs(10)).await;
    eprintln!(
        "/ready answered 503 {:.3} s after kill -9 of NATS: {}",
        to_503.as_secs_f64(),
        body.trim()
    );
    assert!(body.contains("NATS"), "the reason names NATS: {body}");

    // A change now is refused at once: MQTT 5 PUBACK 0x80 with the reason, nothing stored.
    let sent = Instant::now();
    let ack = device
        .publish_qos1(
            &thing_command(THING, "modify", "/attributes/during"),
            b"true",
        )
        .await;
    eprintln!(
        "a modify while NATS is down: PUBACK {:#04x} {:?} after {:?}",
        ack.reason,
        ack.reason_string,
        ack.at - sent
    );
    assert_eq!(ack.reason, UNSPECIFIED_ERROR, "{:?}", ack.reason_string);
    let why = ack.reason_string.unwrap_or_default();
    assert!(
        why.contains("cannot be decided now") && why.contains("NATS"),
        "the reason says why: {why}"
    );
    assert!(ack.at - sent < Duration::from_secs(2), "refused at once");
    assert!(!device.is_closed(), "the device stays connected");

    let restarted = Instant::now();
    nats.restart(0);
    let (to_200, _) = wait_ready(&node, 200, Duration::from_secs(30)).await;
    let back = restarted.elapsed();
    eprintln!(
        "/ready answered 200 again {:.3} s after the restart began ({:.3} s of polling after \
         NATS accepted connections)",
        back.as_secs_f64(),
        to_200.as_secs_f64()
    );
    wait_ready(&other, 200, Duration::from_secs(30)).await;

    // Writes succeed again, and keep succeeding beyond the freshness check's 1 s (the node's
    // consumer follows the stream again), on both nodes; each node sees the other's.
    for i in 0..5 {
        ok(
            &mut device,
            &thing_command(THING, "modify", &format!("/attributes/after{i}")),
            &json!(i),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_ready(&node).await;
    }
    let mut app = client(&other, "app", &solution).await;
    // create (1), before (2), after0..4 (3..7)
    let (attributes, revision) = read_thing_at(&mut app, 7).await;
    assert_eq!(revision, 7, "{attributes:?}");
    ok(
        &mut app,
        &thing_command(THING, "modify", "/attributes/fromOther"),
        &json!(true),
    )
    .await;
    let (attributes, revision) = read_thing_at(&mut device, 8).await;
    assert_eq!(revision, 8);
    assert_eq!(attributes["before"], json!(2), "written before the kill");
    assert_eq!(attributes["fromOther"], json!(true));
    assert!(
        !attributes.contains_key("during"),
        "refused, never stored: {attributes:?}"
    );
    for i in 0..5 {
        assert_eq!(attributes[&format!("after{i}")], json!(i));
    }
    assert_ready(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_reach_nats_delivers_nothing() {
    let (mut nats, stream, solution) = r1("deliveries");
    let node = start_node(&nats.url_list(), &stream, 1);
    create_thing(&node, &solution, json!({"n": 0})).await;
    let mut device = client(&node, "device", &solution).await;
    let mut app = client(&node, "app", &solution).await;
    app.subscribe_ok("plain/#", QoS::AtLeastOnce).await;
    app.subscribe_ok("org.acme/+/things/live/messages/#", QoS::AtLeastOnce)
        .await;
    app.subscribe_ok("org.acme/+/things/twin/events/#", QoS::AtLeastOnce)
        .await;
    let live = "org.acme/lamp/things/live/messages/blink";
    // Everything arrives while the node is current.
    ok(&mut device, "plain/before", &json!(1)).await;
    ok(&mut device, live, &json!("before")).await;
    ok(
        &mut device,
        &thing_command(THING, "modify", "/attributes/n"),
        &json!(1),
    )
    .await;
    let got = app
        .drain_until_quiet(Duration::from_millis(300), NET_TIMEOUT)
        .await;
    let topics: Vec<&str> = got.iter().map(|d| d.topic.as_str()).collect();
    assert!(topics.contains(&"plain/before"), "{topics:?}");
    assert!(topics.contains(&live), "{topics:?}");
    assert!(got.iter().any(is_event), "{topics:?}");

    nats.kill9(0);
    wait_ready(&node, 503, Duration::from_secs(10)).await;
    // Neither a plain message (the solution policy may have changed) nor a live message (its
    // thing's policy may have) can be authorized now: both refused, the publisher told why.
    let plain = device.publish_qos1("plain/during", b"\"during\"").await;
    eprintln!(
        "plain message while not current: PUBACK {:#04x} {:?}",
        plain.reason, plain.reason_string
    );
    assert_eq!(plain.reason, UNSPECIFIED_ERROR, "{:?}", plain.reason_string);
    assert!(
        plain
            .reason_string
            .as_deref()
            .is_some_and(|r| r.contains("cannot be authorized now")),
        "{:?}",
        plain.reason_string
    );
    let refused = device.publish_qos1(live, b"\"during\"").await;
    eprintln!(
        "live message while not current: PUBACK {:#04x} {:?}",
        refused.reason, refused.reason_string
    );
    assert_eq!(
        refused.reason, UNSPECIFIED_ERROR,
        "not a denial: {:?}",
        refused.reason_string
    );
    assert!(
        refused
            .reason_string
            .as_deref()
            .is_some_and(|r| r.contains("cannot be authorized now")),
        "{:?}",
        refused.reason_string
    );
    let during = app
        .drain_until_quiet(Duration::from_secs(1), Duration::from_secs(3))
        .await;
    assert!(
        during.is_empty(),
        "delivered while the node was not current: {:?}",
        during.iter().map(|d| &d.topic).collect::<Vec<_>>()
    );

    nats.restart(0);
    wait_ready(&node, 200, Duration::from_secs(30)).await;
    ok(&mut device, "plain/after", &json!(2)).await;
    let after = app
        .drain_until_quiet(Duration::from_millis(500), NET_TIMEOUT)
        .await;
    let topics: Vec<&str> = after.iter().map(|d| d.topic.as_str()).collect();
    assert_eq!(
        topics,
        vec!["plain/after"],
        "only what was published once the node was current again"
    );
}

/// Sends `signal` (`STOP`, `CONT`) to process `pid` (a nats-server of this test's own).
fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("`kill` runs");
    assert!(status.success(), "kill -{signal} {pid}: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_failed_at_the_deadline_but_stored_shows_on_every_node() {
    let (nats, stream, solution) = r1("deadline");
    let url = nats.url_list();
    let node = start_node(&url, &stream, 1);
    let other = start_node(&url, &stream, 1);
    create_thing(&node, &solution, json!({"n": 0})).await;
    let mut device = client(&node, "device", &solution).await;
    // NATS hangs (SIGSTOP: its connections stay open; what the node sends waits in the
    // socket): a write decided just now is retried under its message ID until the write
    // deadline (20 s), then fails.
    let pid = nats.pid(0);
    signal(pid, "STOP");
    let stopped = Instant::now();
    let mut pending = device.send_qos1(&thing_command(THING, "modify", "/attributes/n"), b"1");
    let (to_503, body) = wait_ready(&node, 503, Duration::from_secs(10)).await;
    eprintln!(
        "NATS stopped: /ready answered 503 after {:.2} s: {}",
        to_503.as_secs_f64(),
        body.trim()
    );
    let ack = pending.wait_within(Duration::from_secs(30)).await;
    let Some(ack) = ack else {
        signal(pid, "CONT");
        panic!("no PUBACK within 30 s of NATS hanging");
    };
    let took = ack.at.saturating_duration_since(stopped);
    eprintln!(
        "the write in flight: PUBACK {:#04x} {:?} after {:.2} s",
        ack.reason,
        ack.reason_string,
        took.as_secs_f64()
    );
    signal(pid, "CONT");
    assert_eq!(ack.reason, UNSPECIFIED_ERROR, "{:?}", ack.reason_string);
    assert!(
        took >= Duration::from_secs(19),
        "it failed before the write deadline: {ack:?}"
    );
    // NATS goes on: it reads the write waiting in its socket and stores it (the retries are
    // duplicates of it). The write failed for the device, but it is in the stream: every
    // node, the one that wrote it included, must show it (and the revision it has there).
    let (back, _) = wait_ready(&node, 200, Duration::from_secs(10)).await;
    eprintln!("/ready 200 again {:.2} s after SIGCONT", back.as_secs_f64());
    // The server works off what queued while it was stopped: wait until the node stays ready.
    let steady = Instant::now();
    let mut since = Instant::now();
    while since.elapsed() < Duration::from_secs(1) {
        if ready(&node).await.0 != 200 {
            since = Instant::now();
        }
        assert!(
            steady.elapsed() < Duration::from_secs(20),
            "/ready keeps changing"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut app = client(&other, "app", &solution).await;
    let (there, revision) = read_thing_at(&mut app, 2).await;
    assert_eq!((there["n"].clone(), revision), (json!(1), 2), "{there:?}");
    let (here, revision) = read_thing_at(&mut device, 2).await;
    assert_eq!(
        (here["n"].clone(), revision),
        (json!(1), 2),
        "the writing node shows what the stream holds"
    );
    // And both write on top of it.
    ok(
        &mut device,
        &thing_command(THING, "modify", "/attributes/n"),
        &json!(2),
    )
    .await;
    let (there, revision) = read_thing_at(&mut app, 3).await;
    assert_eq!((there["n"].clone(), revision), (json!(2), 3));
}
