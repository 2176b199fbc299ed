//! The chat page in a real, headless Chromium (Debian's chromium and chromium-driver),
//! driven over WebDriver: a reply grows on screen token by token, Stop cancels on the
//! server, model output cannot run script, the conversation survives a reload, and the
//! page fits a phone. Screenshots land in `target/tmp/screenshots/`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::key::Key;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::support::{DEADLINE, REPLY_DEADLINE, TestApp, fixtures, free_port, skip_without};

const CHROMIUM: &str = "/usr/bin/chromium";

/// How long chromedriver may take to listen while the whole suite runs beside it.
const DRIVER_START: Duration = Duration::from_secs(30);

/// chromedriver on a free port, stopped (by its pid) when dropped, with the Chromiums it
/// started: a session a test never closed (it failed, or returned early) would outlive the
/// driver otherwise.
pub(crate) struct Driver {
    child: Child,
    url: String,
    /// The profile of every session started: each names its own Chromium processes.
    profiles: std::sync::Mutex<Vec<std::path::PathBuf>>,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let profiles =
            std::mem::take(&mut *self.profiles.lock().unwrap_or_else(|e| e.into_inner()));
        for profile in profiles {
            let flag = format!("--user-data-dir={}", profile.display());
            for pid in processes_with_arg(&flag) {
                let _ = Command::new("kill").arg(pid.to_string()).status();
            }
            let _ = std::fs::remove_dir_all(&profile);
        }
    }
}

/// The pids of the processes one of whose arguments is `arg` (from `/proc`).
fn processes_with_arg(arg: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|line| line.split(|&b| b == 0).any(|a| a == arg.as_bytes()))
        })
        .collect()
}

pub(crate) fn start_driver() -> Option<Driver> {
    let found = std::path::Path::new(CHROMIUM).exists()
        && Command::new("chromedriver")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if !found
        && skip_without("Chromium and ChromeDriver (Debian packages chromium, chromium-driver)")
    {
        return None;
    }
    // A busy machine can be slow to start it, and another process can take the port
    // between `free_port` and its bind: a driver that exits is started again elsewhere.
    for _ in 0..3 {
        let port = free_port();
        let child = Command::new("chromedriver")
            .args([format!("--port={port}"), "--allowed-ips=127.0.0.1".into()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let mut driver = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
            profiles: std::sync::Mutex::default(),
        };
        let started = Instant::now();
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(driver);
            }
            if driver.child.try_wait().ok().flatten().is_some() {
                break;
            }
            assert!(
                started.elapsed() < DRIVER_START,
                "chromedriver did not listen on {port} within {DRIVER_START:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("chromedriver exited at start three times")
}

pub(crate) async fn browser(driver: &Driver) -> Client {
    // A profile of its own per session: two Chromiums cannot share one.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let profile = std::env::temp_dir().join(format!("sluice-chromium-{}-{n}", std::process::id()));
    driver
        .profiles
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(profile.clone());
    let caps = json!({"goog:chromeOptions": {"binary": CHROMIUM, "args": [
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--window-size=1280,900",
        format!("--user-data-dir={}", profile.display()),
    ]}});
    let Value::Object(caps) = caps else {
        unreachable!()
    };
    ClientBuilder::rustls()
        .expect("TLS")
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a Chromium session")
}

pub(crate) async fn js(client: &Client, script: &str) -> Value {
    client.execute(script, vec![]).await.expect("script runs")
}

pub(crate) async fn wait_for(client: &Client, script: &str, deadline: Duration) {
    let started = Instant::now();
    while js(client, script).await != json!(true) {
        assert!(started.elapsed() < deadline, "never true: {script}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) const LAST_REPLY: &str = "document.querySelector('.turn.assistant:last-of-type .body')";

/// Chromium on `url`, once the page says it is ready.
pub(crate) async fn open_page(driver: &Driver, url: &str) -> Client {
    let client = browser(driver).await;
    client.goto(url).await.expect("the page loads");
    wait_for(
        &client,
        "return document.body.dataset.ready === 'true'",
        DEADLINE,
    )
    .await;
    client
}

/// Waits until the last reply has finished streaming and holds `text`.
pub(crate) async fn wait_for_reply(client: &Client, text: &str) {
    let script = format!(
        "const b = {LAST_REPLY}; return !!b && !b.parentElement.classList.contains('streaming') && b.textContent.includes({text:?})"
    );
    wait_for(client, &script, REPLY_DEADLINE).await;
}

pub(crate) async fn type_and_send(client: &Client, text: &str) {
    let input = client.find(Locator::Id("prompt")).await.expect("the input");
    input
        .send_keys(&format!("{text}{}", char::from(Key::Enter)))
        .await
        .expect("typing");
}

pub(crate) fn screenshot(name: &str, png: &[u8]) {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot folder");
    std::fs::write(dir.join(name), png).expect("screenshot saved");
}

#[tokio::test]
async fn the_chat_page_in_chromium() {
    let Some(driver) = start_driver() else { return };
    let script = "Here it is: <script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\"> and **bold** text.\n\n```rust\nfn main() {}\n```";
    let path = fixtures("(?i)show me html", script);
    let app = TestApp::spawn_with(|c| {
        c.mock_tokens_per_s = 25.0;
        c.mock_fixtures = Some(path);
    })
    .await;
    let client = open_page(&driver, &app.url("/")).await;

    // A reply grows on screen: its length is seen at several moments before it is done.
    type_and_send(&client, "Tell me about rivers").await;
    let mut lengths = Vec::new();
    let mut shot = false;
    let started = Instant::now();
    loop {
        let seen = js(&client, &format!(
            "const b = {LAST_REPLY}; return b ? [b.textContent.length, b.parentElement.classList.contains('streaming')] : [0, true]"
        ))
        .await;
        let (length, streaming) = (seen[0].as_u64().unwrap_or(0), seen[1] == json!(true));
        if length > 0 && lengths.last() != Some(&length) {
            lengths.push(length);
        }
        if streaming && length > 120 && !shot {
            shot = true;
            let png = client.screenshot().await.expect("png");
            screenshot("desktop-streaming.png", &png);
        }
        if !streaming {
            break;
        }
        assert!(
            started.elapsed() < REPLY_DEADLINE,
            "the reply never finished"
        );
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    assert!(
        lengths.len() >= 4,
        "the reply appeared at once: {lengths:?}"
    );
    assert!(shot, "a screenshot mid-stream");
    let text = js(&client, &format!("return {LAST_REPLY}.textContent")).await;
    assert!(
        text.as_str()
            .unwrap_or_default()
            .starts_with("You said: Tell me about rivers"),
        "{text}"
    );
    let meta = js(
        &client,
        "return document.querySelector('.turn.assistant:last-of-type .meta').textContent",
    )
    .await;
    assert!(
        meta.as_str().unwrap_or_default().contains("tokens/s"),
        "{meta}"
    );

    // Stop cancels on the server, not just on screen.
    type_and_send(&client, "Another long answer please").await;
    wait_for(
        &client,
        &format!("const b = {LAST_REPLY}; return !!b && b.textContent.length > 20"),
        REPLY_DEADLINE,
    )
    .await;
    client
        .find(Locator::Id("stop"))
        .await
        .expect("stop")
        .click()
        .await
        .expect("click");
    app.wait_metric("sluice_chat_requests_total{outcome=\"cancelled\"}", 1.0)
        .await;
    // Through the cancel route: the stream does not wait out a reconnect grace period.
    app.wait_metric("sluice_stream_cancels_total", 1.0).await;
    wait_for(
        &client,
        "return !document.getElementById('prompt').disabled",
        DEADLINE,
    )
    .await;

    // Shift+Enter is a new line, not a send.
    let input = client.find(Locator::Id("prompt")).await.expect("input");
    input
        .send_keys(&format!(
            "line one{}{}{}line two",
            char::from(Key::Shift),
            char::from(Key::Enter),
            char::from(Key::Null) // releases Shift
        ))
        .await
        .expect("typing");
    let value = js(&client, "return document.getElementById('prompt').value").await;
    assert_eq!(value, json!("line one\nline two"));
    input.clear().await.expect("clear");

    // Model output is rendered as markdown, and nothing in it runs.
    type_and_send(&client, "Show me HTML").await;
    wait_for_reply(&client, "main").await;
    let html = js(&client, &format!("return {LAST_REPLY}.innerHTML")).await;
    let html = html.as_str().unwrap_or_default();
    assert!(html.contains("<strong>bold</strong>"), "{html}");
    assert!(
        !html.contains("<script") && !html.contains("onerror"),
        "{html}"
    );
    assert!(
        html.contains("<pre") && html.contains("Copy"),
        "a code block with its copy button: {html}"
    );
    assert_eq!(
        js(&client, "return window.__pwned === undefined").await,
        json!(true)
    );

    // The conversation survives a reload.
    client.refresh().await.expect("reload");
    wait_for(
        &client,
        "return document.body.dataset.ready === 'true'",
        DEADLINE,
    )
    .await;
    assert_eq!(
        js(&client, "return document.querySelectorAll('.turn').length").await,
        json!(6)
    );

    // Phone width: nothing spills sideways.
    client.set_window_size(390, 844).await.expect("resize");
    wait_for(&client, "return window.innerWidth <= 390", DEADLINE).await;
    assert_eq!(
        js(
            &client,
            "return document.documentElement.scrollWidth <= window.innerWidth"
        )
        .await,
        json!(true)
    );
    // Its placeholder names no keys a phone does not have.
    assert_eq!(
        js(
            &client,
            "return document.getElementById('prompt').placeholder"
        )
        .await,
        json!("Message sluice…")
    );
    // The header is one row: every control in it sits on the same line.
    let header = js(
        &client,
        r#"const bar = document.querySelector('.bar').getBoundingClientRect();
           const middles = [...document.querySelectorAll('.bar > *, .bar .key > *')]
             .map((e) => e.getBoundingClientRect()).filter((r) => r.height > 1)
             .map((r) => r.top + r.height / 2);
           const rows = middles.filter((m) => Math.abs(m - middles[0]) > 6).length;
           return { height: bar.height, rows, middles };"#,
    )
    .await;
    assert_eq!(header["rows"], json!(0), "{header}");
    assert!(
        header["height"].as_f64().is_some_and(|h| h < 56.0),
        "{header}"
    );
    // A code block's Copy button covers none of the code.
    let covered = js(
        &client,
        r#"return [...document.querySelectorAll('pre')].filter((pre) => {
             const copy = pre.querySelector('.copy'), code = pre.querySelector('code');
             if (!copy || !code) return false;
             const c = copy.getBoundingClientRect(), t = code.getClientRects()[0];
             return c.bottom > t.top + 1 && c.left < t.right;
           }).length"#,
    )
    .await;
    assert_eq!(covered, json!(0));
    screenshot("phone.png", &client.screenshot().await.expect("png"));
    // The drawer opens from the menu and closes from its own button.
    client
        .find(Locator::Css("#toggle-sidebar"))
        .await
        .expect("menu")
        .click()
        .await
        .expect("opens");
    wait_for(
        &client,
        "return document.getElementById('sidebar').getBoundingClientRect().left >= 0",
        DEADLINE,
    )
    .await;
    screenshot("phone-drawer.png", &client.screenshot().await.expect("png"));
    client
        .find(Locator::Css("#close-sidebar"))
        .await
        .expect("a close button in the drawer")
        .click()
        .await
        .expect("closes");
    wait_for(
        &client,
        "return document.getElementById('sidebar').getBoundingClientRect().right <= 0 \
         && document.getElementById('toggle-sidebar').getAttribute('aria-expanded') === 'false'",
        DEADLINE,
    )
    .await;
    client.close().await.expect("closes");
}

#[tokio::test]
async fn the_model_picker_groups_every_model_and_hides_failure_mocks() {
    let Some(driver) = start_driver() else { return };
    let upstream = crate::support::FakeUpstream::spawn().await;
    let app = TestApp::in_front_of(&upstream).await;
    let picker = "return [...document.querySelectorAll('#model optgroup')].map((g) => [g.label, [...g.querySelectorAll('option')].map((o) => o.value)])";
    let client = open_page(&driver, &app.url("/")).await;
    let groups = js(&client, picker).await;
    assert_eq!(
        groups,
        json!([
            ["Upstream", ["gpt-test", "slow", "status-500"]],
            ["Test", ["mock"]]
        ]),
        "the upstream's catalogue, and no failure-mode mock"
    );
    client.close().await.expect("close");
    let client = open_page(&driver, &app.url("/?debug")).await;
    let groups = js(&client, picker).await;
    assert_eq!(
        groups[1],
        json!([
            "Test",
            [
                "mock",
                "mock-error-after",
                "mock-error-before",
                "mock-hang",
                "mock-stall"
            ]
        ])
    );
}
