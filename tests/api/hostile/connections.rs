//! Connections as resources: idle HTTP/2 connections, one address holding every slot, a
//! full server, and a client that grants no flow-control window.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::{H2Body, h2_chat};
use crate::support::{DEADLINE, FakeUpstream, TestApp};

/// A TCP connection to `to` from the loopback address `127.0.0.<from>`.
async fn connect_from(from: u8, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("a socket");
    socket
        .bind(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, from)),
            0,
        ))
        .expect("bind a loopback address");
    socket.connect(to).await.expect("connects")
}

/// An HTTP/2 (h2c) connection that has made one `/healthz` request, kept open (by its
/// sender) until sluice closes it; its task ends then.
struct Held {
    _sender: hyper::client::conn::http2::SendRequest<H2Body>,
    connection: tokio::task::JoinHandle<Result<(), hyper::Error>>,
}

async fn h2_after_one_request(tcp: TcpStream) -> Option<Held> {
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .ok()?;
    let connection = tokio::spawn(connection);
    let request = hyper::Request::get("/healthz")
        .body(H2Body::new(bytes::Bytes::new()))
        .expect("a request");
    let response = sender.send_request(request).await.ok()?;
    (response.status() == 200).then_some(Held {
        _sender: sender,
        connection,
    })
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_the_header_limit() {
    let app = TestApp::spawn_with(|c| c.header_timeout_ms = 1_000).await;
    let tcp = TcpStream::connect(app.addr).await.expect("connects");
    let started = Instant::now();
    let held = h2_after_one_request(tcp).await.expect("served over h2c");
    // sluice sends GOAWAY and closes: the client's connection task ends by itself.
    tokio::time::timeout(DEADLINE, held.connection)
        .await
        .expect("sluice closed the idle HTTP/2 connection")
        .expect("the task ran")
        .expect("a clean close (GOAWAY), not an error");
    let idle = started.elapsed();
    eprintln!("an idle h2c connection was closed after {idle:?}");
    assert!(
        idle >= Duration::from_millis(900),
        "closed too early: {idle:?}"
    );
}

#[tokio::test]
async fn one_address_holds_at_most_its_cap_of_connections() {
    let app = TestApp::spawn_with(|c| c.max_connections_per_ip = 20).await;
    let mut held = Vec::new();
    for _ in 0..20 {
        let mut tcp = connect_from(2, app.addr).await;
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("writes");
        let mut head = [0u8; 12];
        tcp.read_exact(&mut head).await.expect("an answer");
        assert_eq!(&head, b"HTTP/1.1 200");
        held.push(tcp);
    }
    // The 21st from that address is closed at once, unanswered.
    let mut extra = connect_from(2, app.addr).await;
    let _ = extra
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(DEADLINE, extra.read(&mut buf))
        .await
        .expect("sluice closes it at once");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "a connection past the cap was served"
    );
    // Another address is served as ever, and a freed slot is taken again.
    let health = app
        .http
        .get(app.url("/healthz"))
        .send()
        .await
        .expect("answers");
    assert_eq!(health.status(), 200);
    drop(held.pop());
    let started = Instant::now();
    loop {
        let mut again = connect_from(2, app.addr).await;
        let _ = again
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await;
        let mut head = [0u8; 12];
        if again.read_exact(&mut head).await.is_ok() {
            assert_eq!(&head, b"HTTP/1.1 200");
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the freed slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = app
        .metric("sluice_connections_refused_total{reason=\"per_ip\"}")
        .await;
    assert!(refused >= 1.0, "{refused}");
}

#[tokio::test]
async fn two_thousand_idle_connections_do_not_lock_out_a_victim() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    // A lowered cap, a long header limit (so that idle-closing is not what saves the
    // victim) and the default cap per address: the attacker uses eight addresses.
    let app = TestApp::spawn_with(|c| {
        c.max_connections = Some(500);
        c.max_connections_per_ip = 256;
        c.header_timeout_ms = 60_000;
    })
    .await;
    let mut held = Vec::new();
    for i in 0..2_000u32 {
        let from = 2 + (i % 8) as u8;
        let tcp = connect_from(from, app.addr).await;
        if let Some(connection) = h2_after_one_request(tcp).await {
            held.push(connection);
        }
    }
    let open = held.iter().filter(|c| !c.connection.is_finished()).count();
    eprintln!("attacker: 2,000 h2c connections made, {open} still open");
    assert!(open <= 500, "more open connections than the cap: {open}");

    // The victim, from its own address, while the attacker holds what it can.
    let victim = TestApp {
        addr: app.addr,
        http: reqwest::Client::new(),
        operator: None,
    };
    for _ in 0..3 {
        let started = Instant::now();
        let health = victim
            .http
            .get(victim.url("/healthz"))
            .send()
            .await
            .expect("answers");
        assert_eq!(health.status(), 200);
        let chat = victim
            .post(
                "/v1/chat/completions",
                &json!({"model": "mock", "max_tokens": 3,
                    "messages": [{"role": "user", "content": "Hi"}]}),
            )
            .await;
        assert_eq!(chat.status(), 200);
        let took = started.elapsed();
        eprintln!("victim /healthz and chat during the attack: {took:?}");
        assert!(took < Duration::from_secs(1), "{took:?}");
        // A fresh connection each time: it has to win a slot.
        drop(victim.http.clone());
    }
    let evicted = app
        .metric("sluice_connections_closed_total{reason=\"idlest_for_newcomer\"}")
        .await;
    assert!(evicted >= 1_000.0, "idlest connections closed: {evicted}");
    for held in held {
        held.connection.abort();
    }
}

/// Streams from a client that grants no flow-control window: the response head comes
/// (headers are not flow-controlled), no byte of the body ever can.
async fn zero_window_streams(
    app: &TestApp,
    n: usize,
) -> Vec<hyper::Response<hyper::body::Incoming>> {
    let tcp = TcpStream::connect(app.addr).await.expect("connects");
    let (sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(0)
            .adaptive_window(false)
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("h2c");
    tokio::spawn(connection);
    let mut responses = Vec::new();
    for _ in 0..n {
        let response = sender
            .clone()
            .send_request(h2_chat("slow", "Hi"))
            .await
            .expect("an answer");
        assert_eq!(response.status(), 200);
        responses.push(response);
    }
    responses
}

#[tokio::test]
async fn a_client_that_grants_no_window_is_reset_at_its_deadlines() {
    use http_body_util::BodyExt;
    // The slow-client limit, with the total far away...
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of_with(&upstream, |c| {
        c.slow_client_timeout_ms = 1_000;
        c.total_timeout_ms = 60_000;
    })
    .await;
    let started = Instant::now();
    let responses = zero_window_streams(&app, 5).await;
    for n in 1..=5 {
        upstream.closed(n).await;
    }
    let took = started.elapsed();
    eprintln!(
        "5 zero-window streams: every upstream closed after {took:?} (slow-client limit 1 s)"
    );
    assert!(took < Duration::from_secs(4), "{took:?}");
    for response in responses {
        // The stream was reset: its body ends in an error, never in a clean end.
        let body = tokio::time::timeout(DEADLINE, response.into_body().collect()).await;
        assert!(matches!(body, Ok(Err(_))), "the stream was not reset");
    }
    assert!(app.metric("sluice_slow_clients_dropped_total").await >= 5.0);

    // ...and the total limit, with the slow-client one far away.
    let upstream = FakeUpstream::spawn().await;
    let app = TestApp::in_front_of_with(&upstream, |c| {
        c.slow_client_timeout_ms = 60_000;
        c.total_timeout_ms = 1_500;
    })
    .await;
    let started = Instant::now();
    let _responses = zero_window_streams(&app, 5).await;
    for n in 1..=5 {
        upstream.closed(n).await;
    }
    let took = started.elapsed();
    eprintln!("5 zero-window streams: every upstream closed after {took:?} (total limit 1.5 s)");
    assert!(took < Duration::from_secs(5), "{took:?}");
}
