//! Connect rate and memory per idle connection of the real `thingsgate serve` (release build).
//!
//! `cargo bench -p broker --bench connect` — starts the binary on port 0 with a fresh data dir,
//! a solution and an ES256 issuer, then:
//! 1. connects/s with solution secrets and with ES256 JWTs: 2 client tasks, each a loop of TCP
//!    connect → CONNECT → CONNACK (must be 0) → DISCONNECT, for `SECONDS` seconds per kind;
//! 2. memory per idle connection: the broker's RSS before and after opening `IDLE` authenticated
//!    connections (secret, keep-alive 0), delta / count.
//!
//! Environment: `CONNECT_BENCH_SECONDS` (default 5), `CONNECT_BENCH_IDLE` (default 10000).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod support;

use support::{cpu_seconds, create_solution, rss_kib, serve, thingsgate, utf8};

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use broker::mqtt::codec::{self, ConnAck, Connect, Packet, Properties, Protocol};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn connect_packet(client_id: &str, username: Option<&str>, password: &str) -> BytesMut {
    let connect = Connect {
        protocol: Protocol::V311,
        clean_start: true,
        keep_alive: 0,
        client_id: utf8(client_id),
        will: None,
        username: username.map(utf8),
        password: Some(Bytes::copy_from_slice(password.as_bytes())),
        properties: Properties::default(),
    };
    let mut buf = BytesMut::new();
    Packet::Connect(Box::new(connect))
        .encode(Protocol::V311, &mut buf)
        .unwrap();
    buf
}

/// Connects and waits for a successful CONNACK; returns the open stream.
async fn connect(addr: SocketAddr, packet: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    stream.write_all(packet).await.unwrap();
    let mut buf = BytesMut::with_capacity(16);
    loop {
        if let Some(p) = codec::decode(&mut buf, Protocol::V311, 1024).unwrap() {
            match p {
                Packet::ConnAck(ConnAck { code: 0, .. }) => return stream,
                other => panic!("unexpected answer {other:?}"),
            }
        }
        let n = stream.read_buf(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed before CONNACK");
    }
}

async fn connect_rate(
    addr: SocketAddr,
    username: Option<String>,
    password: String,
    d: Duration,
) -> f64 {
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..2 {
        let count = count.clone();
        let username = username.clone();
        let password = password.clone();
        tasks.push(tokio::spawn(async move {
            let mut disconnect = BytesMut::new();
            Packet::Disconnect(Default::default())
                .encode(Protocol::V311, &mut disconnect)
                .unwrap();
            let mut i = 0u64;
            while start.elapsed() < d {
                let packet =
                    connect_packet(&format!("c{task}-{i}"), username.as_deref(), &password);
                let mut stream = connect(addr, &packet).await;
                stream.write_all(&disconnect).await.unwrap();
                // RST instead of FIN: no TIME_WAIT pile-up on the client side.
                #[allow(deprecated, reason = "a blocking close is what we want: no TIME_WAIT")]
                stream.set_linger(Some(Duration::ZERO)).unwrap();
                drop(stream);
                i += 1;
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("connect: benchmark");
        return;
    }
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let seconds: u64 = std::env::var("CONNECT_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let idle: usize = std::env::var("CONNECT_BENCH_IDLE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_str = data.to_str().unwrap();
    let secret = create_solution(data_str, "org.bench");
    let key = broker::token_cmd::generate_dev_key().unwrap();
    let key_file = dir.path().join("key.pem");
    std::fs::write(&key_file, &key).unwrap();
    let jwks = broker::token_cmd::jwks_for_private_key(&key).unwrap();
    std::fs::write(dir.path().join("jwks.json"), jwks.to_string()).unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[[issuer]]\nkey = \"bench\"\nissuer = \"https://bench.local\"\naudiences = [\"thingsgate\"]\n\
         jwks_file = \"jwks.json\"\nsolution_claim = \"solution_id\"\n",
    )
    .unwrap();
    let token = thingsgate(&[
        "token",
        "--key",
        key_file.to_str().unwrap(),
        "--iss",
        "https://bench.local",
        "--sub",
        "device",
        "--aud",
        "thingsgate",
        "--claim",
        "solution_id=bench",
        "--ttl",
        "1h",
    ])
    .trim()
    .to_owned();

    let (server, addresses) = serve(&[
        "--data",
        data_str,
        "--config",
        config.to_str().unwrap(),
        "--mqtt",
        "127.0.0.1:0",
    ]);
    let pid = server.0.id();
    let addr = addresses["mqtt"];
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let d = Duration::from_secs(seconds);
        // Warm-up.
        connect_rate(addr, Some("bench".into()), secret.clone(), Duration::from_millis(500)).await;
        let kinds = [
            ("secret", "bench", secret.as_str()),
            // 3.1.1 needs a user name with a password; the solution comes from the token's claim.
            ("jwt-es256", "device", token.as_str()),
        ];
        for (kind, username, password) in kinds {
            let cpu = cpu_seconds(&pid.to_string());
            let rate = connect_rate(addr, Some(username.into()), password.to_owned(), d).await;
            let used = cpu_seconds(&pid.to_string()) - cpu;
            println!(
                "connect/{kind}: {rate:.0} connections/s (2 client tasks, {seconds} s); broker CPU {:.2} cores, {:.0} µs per connect",
                used / seconds as f64,
                used * 1e6 / (rate * seconds as f64)
            );
        }

        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = rss_kib(pid);
        let mut open = Vec::with_capacity(idle);
        for i in 0..idle {
            let packet = connect_packet(&format!("idle-{i}"), Some("bench"), &secret);
            open.push(connect(addr, &packet).await);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = rss_kib(pid);
        let per = (after.saturating_sub(before)) as f64 * 1024.0 / idle as f64;
        println!(
            "memory/idle-connection: {per:.0} bytes per connection ({idle} connections, RSS {before} KiB -> {after} KiB)"
        );
        drop(open);
    });
    drop(server);
}
