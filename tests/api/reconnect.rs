//! A flaky network between Chromium and sluice: a TCP proxy of the test's own that cuts
//! every open connection mid-reply. The chat page, and the browser's own `EventSource`,
//! reconnect with `Last-Event-ID` and end with exactly the text an uninterrupted run gives.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::json;
use tokio::task::JoinHandle;

use crate::browser::{
    LAST_REPLY, js, open_page, start_driver, type_and_send, wait_for, wait_for_reply,
};
use crate::support::{DEADLINE, REPLY_DEADLINE, TestApp};

/// Forwards connections on its own port to `target`; `cut` breaks every one open now.
struct Proxy {
    port: u16,
    open: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accepted: Arc<AtomicUsize>,
    listener: JoinHandle<()>,
}

impl Proxy {
    async fn start(target: std::net::SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind port 0");
        let port = listener.local_addr().expect("addr").port();
        let open: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (conns, count) = (open.clone(), accepted.clone());
        let listener = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let pipe = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                conns.lock().expect("lock").push(pipe);
            }
        });
        Proxy {
            port,
            open,
            accepted,
            listener,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Breaks every connection open now (both sockets are dropped); new ones still pass.
    fn cut(&self) {
        for pipe in self.open.lock().expect("lock").drain(..) {
            pipe.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.listener.abort();
        self.cut();
    }
}

#[tokio::test]
async fn the_page_continues_a_reply_after_the_network_drops() {
    let Some(driver) = start_driver() else { return };
    let app = TestApp::spawn_with(|c| c.mock_tokens_per_s = 15.0).await;
    let proxy = Proxy::start(app.addr).await;
    let client = open_page(&driver, &proxy.url("/")).await;

    // Uninterrupted, for the text to compare with (the mock model is deterministic).
    type_and_send(&client, "Tell me about rivers").await;
    wait_for_reply(&client, "").await;
    let whole = js(&client, &format!("return {LAST_REPLY}.textContent")).await;
    assert!(whole.as_str().is_some_and(|t| t.len() > 100), "{whole}");

    type_and_send(&client, "Tell me about rivers").await;
    wait_for(
        &client,
        "const b = document.querySelectorAll('.turn.assistant')[1]?.querySelector('.body'); return !!b && b.textContent.length > 30",
        REPLY_DEADLINE,
    )
    .await;
    let before = proxy.accepted.load(Ordering::SeqCst);
    proxy.cut();
    // The page says so while it reconnects (or has already reconnected and read on).
    wait_for(
        &client,
        "return !!document.querySelector('.turn.assistant:last-of-type .reconnecting') || !document.querySelector('.turn.assistant:last-of-type').classList.contains('streaming')",
        DEADLINE,
    )
    .await;
    wait_for_reply(&client, "").await;
    let resumed = js(&client, &format!("return {LAST_REPLY}.textContent")).await;
    assert_eq!(resumed, whole, "the same reply, nothing missing or doubled");
    let error = js(
        &client,
        "return document.querySelector('.turn.assistant:last-of-type .error')?.textContent ?? null",
    )
    .await;
    assert_eq!(error, json!(null));
    assert!(
        proxy.accepted.load(Ordering::SeqCst) > before,
        "the page reconnected"
    );
    assert_eq!(app.metric("sluice_stream_resumes_total").await, 1.0);
    // One generation per reply: the mock generated each once.
    app.wait_metric("sluice_chat_requests_total{outcome=\"completed\"}", 2.0)
        .await;
}

#[tokio::test]
async fn the_browsers_own_event_source_reconnects_by_itself() {
    let Some(driver) = start_driver() else { return };
    let app = TestApp::spawn_with(|c| c.mock_tokens_per_s = 15.0).await;
    let proxy = Proxy::start(app.addr).await;
    let client = open_page(&driver, &proxy.url("/")).await;
    // Start a stream, let go of the POST's connection, follow it with an EventSource.
    js(
        &client,
        r#"
        window.__es = { text: '', opens: 0, done: false, whole: null };
        (async () => {
          const post = (prompt) => fetch('/api/chat', { method: 'POST',
            headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt }) });
          // The same prompt read whole, for comparison.
          const whole = await (await post('Tell me about rivers')).text();
          window.__es.whole = whole.split('\n').filter((l) => l.startsWith('data: {"text"'))
            .map((l) => JSON.parse(l.slice(6)).text).join('');
          const response = await post('Tell me about rivers');
          const id = response.headers.get('x-sluice-stream-id');
          await response.body.cancel();
          const es = new EventSource(`/api/chat/${id}?last_event_id=0`);
          es.onopen = () => { window.__es.opens += 1; };
          es.addEventListener('token', (e) => { window.__es.text += JSON.parse(e.data).text; });
          es.addEventListener('done', () => { window.__es.done = true; es.close(); });
        })();
        return true;
        "#,
    )
    .await;
    wait_for(
        &client,
        "return window.__es.opens === 1 && window.__es.text.length > 30",
        REPLY_DEADLINE,
    )
    .await;
    proxy.cut();
    wait_for(&client, "return window.__es.done", REPLY_DEADLINE).await;
    let seen = js(&client, "return window.__es").await;
    assert!(
        seen["opens"].as_u64().unwrap_or(0) >= 2,
        "it reconnected: {seen}"
    );
    assert_eq!(
        seen["text"], seen["whole"],
        "whole text after the reconnect"
    );
}
