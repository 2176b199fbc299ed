//! Upstreams that misbehave at the HTTP level, against the plain-HTTP client (`h1.rs`): one
//! that reads a request and closes (how often is one request sent?), one that sends interim
//! answers without end (do the limits fire?), one that sends an answer nobody asked for
//! (whose request gets it?). Each is a raw TCP server that counts what it received.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use super::chat;
use crate::support::{DEADLINE, TestApp, all_events, payloads, read_request};

/// What the raw upstream does with the `n`th POST it reads (from 1).
#[derive(Clone, Copy, PartialEq)]
enum Act {
    /// A whole streamed reply with a Content-Length, the connection kept.
    Answer,
    /// Nothing: the connection is closed.
    Close,
    /// `100 Continue` without end.
    Continue,
    /// A whole reply, then, after a pause (ms), a second answer nobody asked for.
    AnswerTwice(u64),
}

/// A raw HTTP/1.1 upstream: counts POSTs, acts as `act` says for each.
struct Raw {
    base_url: String,
    posts: Arc<AtomicUsize>,
    /// Late answers written in full.
    late: Arc<AtomicUsize>,
}

const REPLY: &str = concat!(
    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"FOR-THIS-REQUEST\"},\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
    "data: [DONE]\n\n"
);

fn answer(text: &str) -> String {
    let body = REPLY.replace("FOR-THIS-REQUEST", text);
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

impl Raw {
    async fn spawn(act: impl Fn(usize) -> Act + Send + Sync + 'static) -> Raw {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind port 0");
        let addr = listener.local_addr().expect("addr");
        let (posts, late) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (counter, written) = (posts.clone(), late.clone());
        let act = Arc::new(act);
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let (counter, written, act) = (counter.clone(), written.clone(), act.clone());
                tokio::spawn(async move {
                    while let Some(post) = read_request(&mut tcp).await {
                        if !post {
                            let list = "{\"object\":\"list\",\"data\":[]}";
                            let head = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                                list.len()
                            );
                            let _ = tcp.write_all(format!("{head}{list}").as_bytes()).await;
                            continue;
                        }
                        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                        match act(n) {
                            Act::Answer => {
                                let _ = tcp.write_all(answer("FOR-THIS-REQUEST").as_bytes()).await;
                            }
                            Act::Close => return,
                            Act::Continue => {
                                let interim = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(64);
                                while tcp.write_all(&interim).await.is_ok() {}
                                return;
                            }
                            Act::AnswerTwice(pause) => {
                                let _ = tcp.write_all(answer("FOR-THIS-REQUEST").as_bytes()).await;
                                let _ = tcp.flush().await;
                                tokio::time::sleep(Duration::from_millis(pause)).await;
                                if tcp
                                    .write_all(answer("LEAKED-FROM-A").as_bytes())
                                    .await
                                    .is_ok()
                                {
                                    written.fetch_add(1, Ordering::SeqCst);
                                }
                            }
                        }
                    }
                });
            }
        });
        Raw {
            base_url: format!("http://{addr}/v1"),
            posts,
            late,
        }
    }

    fn posts(&self) -> usize {
        self.posts.load(Ordering::SeqCst)
    }
}

async fn app(raw: &Raw, adjust: impl FnOnce(&mut sluice::Config)) -> TestApp {
    let base = raw.base_url.clone();
    TestApp::spawn_with(|c| {
        c.openai_base_url = Some(base);
        c.openai_api_key = Some("sk-test".into());
        adjust(c);
    })
    .await
}

/// A streamed chat: its status and its text (or the error's message).
async fn ask(app: &TestApp) -> (u16, String) {
    let response = app.post("/v1/chat/completions", &chat("m", true)).await;
    let status = response.status().as_u16();
    if status != 200 {
        return (status, response.text().await.unwrap_or_default());
    }
    let payloads = payloads(&all_events(response).await);
    let text = payloads
        .iter()
        .map(|p| match p["choices"][0]["delta"]["content"].as_str() {
            Some(text) => text.to_owned(),
            None => p["error"]["message"].as_str().unwrap_or("").to_owned(),
        })
        .collect();
    (status, text)
}

#[tokio::test]
async fn a_request_the_upstream_read_is_never_sent_again() {
    // Eight requests at once leave eight kept connections; then the upstream reads every
    // request and closes without an answer.
    let raw = Raw::spawn(|n| if n <= 8 { Act::Answer } else { Act::Close }).await;
    let app = app(&raw, |_| {}).await;
    let first = futures::future::join_all((0..8).map(|_| ask(&app))).await;
    assert!(first.iter().all(|(s, _)| *s == 200), "{first:?}");
    let (status, text) = ask(&app).await;
    assert_eq!(status, 502, "{text}");
    println!(
        "POSTs the upstream received for one request: {}",
        raw.posts() - 8
    );
    assert_eq!(raw.posts() - 8, 1, "the request went upstream once");
}

#[tokio::test]
async fn interim_answers_without_end_fail_the_request_at_once() {
    let raw = Raw::spawn(|_| Act::Continue).await;
    let app = app(&raw, |c| c.first_token_timeout_ms = 60_000).await;
    let started = Instant::now();
    let (status, text) = ask(&app).await;
    let took = started.elapsed();
    println!("an endless run of 100 Continue failed the request in {took:?}");
    assert_eq!(status, 502, "{text}");
    assert!(text.contains("interim"), "{text}");
    assert!(took < DEADLINE, "{took:?}");
}

#[tokio::test]
async fn an_always_ready_upstream_still_meets_the_first_token_limit() {
    // Comments without end: the stream always has bytes, never an event.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind port 0");
    let addr = listener.local_addr().expect("addr");
    let closed = Arc::new(tokio::sync::Notify::new());
    let told = closed.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let told = told.clone();
            tokio::spawn(async move {
                if read_request(&mut tcp).await != Some(true) {
                    return;
                }
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n";
                let _ = tcp.write_all(head.as_bytes()).await;
                let comments = b": busy\n\n".repeat(512);
                while tcp.write_all(&comments).await.is_ok() {}
                told.notify_one();
            });
        }
    });
    let app = TestApp::spawn_with(|c| {
        c.openai_base_url = Some(format!("http://{addr}/v1"));
        c.first_token_timeout_ms = 1_000;
    })
    .await;
    let started = Instant::now();
    let response = app.post("/v1/chat/completions", &chat("m", true)).await;
    let took = started.elapsed();
    println!("the first-token limit of 1 s fired after {took:?}");
    assert_eq!(response.status(), 504);
    assert!(
        took >= Duration::from_millis(1_000) && took < DEADLINE,
        "{took:?}"
    );
    tokio::time::timeout(DEADLINE, closed.notified())
        .await
        .expect("the upstream's connection was closed");
}

#[tokio::test]
async fn an_answer_nobody_asked_for_reaches_no_later_request() {
    for pause in [150, 1, 0] {
        late_answer(pause).await;
    }
}

/// The first request's answer is followed, `pause` ms later, by another.
async fn late_answer(pause: u64) {
    let raw = Raw::spawn(move |n| {
        if n == 1 {
            Act::AnswerTwice(pause)
        } else {
            Act::Answer
        }
    })
    .await;
    let app = app(&raw, |_| {}).await;
    assert_eq!(ask(&app).await, (200, "FOR-THIS-REQUEST".to_owned()));
    // At once, before the late answer is written (when it is late): its own answer.
    let (status, text) = ask(&app).await;
    assert_eq!(
        (status, text.as_str()),
        (200, "FOR-THIS-REQUEST"),
        "{pause} ms, at once"
    );
    // And once the late answer has been written.
    let started = Instant::now();
    while raw.late.load(Ordering::SeqCst) == 0 {
        assert!(
            started.elapsed() < DEADLINE,
            "the late answer was never written"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for _ in 0..3 {
        let (status, text) = ask(&app).await;
        assert_eq!(
            (status, text.as_str()),
            (200, "FOR-THIS-REQUEST"),
            "{pause} ms"
        );
    }
}
