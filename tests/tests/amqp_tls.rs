//! `serve --amqps`: AMQP over TLS with the `[mqtt]` certificate, exercised by Debian's
//! `amqp-tools` (librabbitmq with OpenSSL, verifying the certificate and host name), next to a
//! plain AMQP listener on the same broker.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use e2e::amqp::{amqp_addr, confirm_channel, connect, encode, secret_uri};
use e2e::broker::{Broker, Solution};
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;

/// A broker with a plain and a TLS AMQP listener on a certificate made here.
fn tls_broker() -> (Broker, Solution, SocketAddr, SocketAddr) {
    let mut broker = Broker::new();
    let solution = broker.create_solution("org.acme");
    broker.grant_topics(&solution.id, &[&format!("iot-things:{}", solution.id)]);
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(broker.dir().join("cert.pem"), certified.cert.pem()).unwrap();
    std::fs::write(
        broker.dir().join("key.pem"),
        certified.signing_key.serialize_pem(),
    )
    .unwrap();
    broker.write_config("[mqtt]\ntls_cert_file = \"cert.pem\"\ntls_key_file = \"key.pem\"\n");
    broker
        .arg("--amqp")
        .arg("127.0.0.1:0")
        .arg("--amqps")
        .arg("127.0.0.1:0");
    broker.start();
    let plain = amqp_addr(&broker);
    let tls = broker
        .stdout_lines()
        .iter()
        .find_map(|l| l.strip_prefix("amqps listening on "))
        .and_then(|a| a.parse().ok())
        .expect("the broker printed `amqps listening on ADDR`");
    (broker, solution, plain, tls)
}

fn amqp_tool(name: &str) -> Command {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "`{name}` is missing: it comes with Debian's amqp-tools (`apt-get install amqp-tools`; \
         `cargo xtask test` installs it)"
    );
    Command::new(name)
}

fn finish_within(mut child: std::process::Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the client did not finish within {limit:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_tools_over_tls_receive_what_a_plain_amqp_client_publishes() {
    let (broker, solution, plain, tls) = tls_broker();
    let cacert = broker.dir().join("cert.pem");
    let consumer = amqp_tool("amqp-consume")
        .args(["--ssl", "--cacert"])
        .arg(&cacert)
        .arg(format!(
            "--url=amqps://{}:{}@localhost:{}",
            encode(&solution.id),
            encode(&solution.secret),
            tls.port()
        ))
        .args(["-e", "amq.topic", "-r", "tls.#", "-c", "1", "cat"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The consumer's binding takes a moment: publish until it has its message.
    let connection = connect(&secret_uri(plain, &solution)).await;
    let channel = confirm_channel(&connection).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut consumer = Some(consumer);
    let output = loop {
        let confirm = channel
            .basic_publish(
                "amq.topic".into(),
                "tls.hello".into(),
                BasicPublishOptions::default(),
                b"over tls",
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
        let child = consumer.as_mut().unwrap();
        if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
            break finish_within(consumer.take().unwrap(), Duration::from_secs(5));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout), "over tls");

    // A wrong secret over TLS: refused, the broker stays up.
    let refused = amqp_tool("amqp-publish")
        .args(["--ssl", "--cacert"])
        .arg(&cacert)
        .arg(format!(
            "--url=amqps://{}:not-the-secret@localhost:{}",
            encode(&solution.id),
            tls.port()
        ))
        .args(["-e", "amq.topic", "-r", "tls.hello", "-b", "x"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let refused = finish_within(refused, Duration::from_secs(20));
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("ACCESS_REFUSED"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    broker.assert_logs_never_contain(&[&solution.secret]);
}

#[test]
fn a_plain_amqp_client_on_the_tls_port_is_closed_without_harm() {
    let (mut broker, solution, plain, tls) = tls_broker();
    let mut tcp = TcpStream::connect(tls).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    tcp.write_all(b"AMQP\x00\x00\x09\x01").unwrap();
    let mut buf = [0u8; 64];
    // Whatever TLS says to a protocol header (an alert, or nothing), the socket ends.
    let mut total = 0;
    loop {
        match tcp.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                total += n;
                assert!(total < 4096, "the TLS port keeps talking to a plain client");
            }
        }
    }
    assert!(broker.is_running());
    // The plain listener still serves.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let connection = connect(&secret_uri(plain, &solution)).await;
        connection.close(200, "bye".into()).await.unwrap();
    });
}
