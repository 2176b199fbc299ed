//! Keys as data: made, changed, rotated and revoked through the admin API on one instance,
//! held on another on the same database within a second (it polls the database every
//! second); the secret is shown once; bad bodies are 400s naming the field.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{ADMIN, TestApp, admin, sqlite_url};

async fn app_on(url: &str, keys: Vec<String>) -> TestApp {
    let url = url.to_owned();
    TestApp::spawn_with(move |c| {
        c.database_url = url;
        c.admin_key = Some(ADMIN.into());
        c.api_keys = keys;
    })
    .await
}

/// The status of a chat request with `key`.
async fn chat(app: &TestApp, key: Option<&str>) -> u16 {
    let mut request = app.http.post(app.url("/v1/chat/completions")).json(
        &json!({"model": "mock", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}),
    );
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await.expect("answers").status().as_u16()
}

/// Waits until a request with `key` gets `status` (within a deadline): how long it took.
async fn until(app: &TestApp, key: Option<&str>, status: u16) -> Duration {
    let started = Instant::now();
    loop {
        let now = chat(app, key).await;
        if now == status {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still {now}, expected {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_key_made_changed_and_revoked_on_one_instance_holds_on_another() {
    let url = sqlite_url("keys");
    let (a, b) = (
        app_on(&url, Vec::new()).await,
        app_on(&url, Vec::new()).await,
    );
    assert_eq!(chat(&b, None).await, 200, "no keys yet: open");

    let (status, made) = admin(
        &a,
        "POST",
        "/admin/keys",
        Some(json!({"name": "alice", "rpm": 100, "metadata": {"team": "research"}})),
    )
    .await;
    assert_eq!(status, 201, "{made}");
    let secret = made["key"].as_str().expect("the secret, once").to_owned();
    let id = made["id"].as_str().expect("an id").to_owned();
    assert!(secret.starts_with("sk-sluice-") && secret.len() > 60);
    assert_eq!(made["state"], "active");
    // Taken by A at once, by B within about a second; from then on a key is required.
    assert_eq!(chat(&a, Some(&secret)).await, 200);
    assert_eq!(chat(&a, None).await, 401);
    let took = until(&b, None, 401).await;
    println!("a new key held on the other instance after {took:?}");
    assert_eq!(chat(&b, Some(&secret)).await, 200);

    // Never shown again: not in the list, not in the key.
    let (_, list) = admin(&a, "GET", "/admin/keys", None).await;
    let listed = list["data"].as_array().cloned().unwrap_or_default();
    assert!(
        listed
            .iter()
            .all(|k| k.get("key").is_none() && k.get("digest").is_none()),
        "{list}"
    );
    let (_, one) = admin(&b, "GET", &format!("/admin/keys/{id}"), None).await;
    assert_eq!(one["name"], "alice");
    assert_eq!(one["rpm"], 100);
    assert_eq!(one["metadata"]["team"], "research");
    assert!(one.get("key").is_none());
    // When it was last used, from the ledger (its record is written within a moment).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, now) = admin(&b, "GET", &format!("/admin/keys/{id}"), None).await;
        if now["last_used_at"].is_string() {
            break;
        }
        assert!(Instant::now() < deadline, "{now}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Disabled, then enabled again.
    let (status, _) = admin(
        &a,
        "PATCH",
        &format!("/admin/keys/{id}"),
        Some(json!({"disabled": true})),
    )
    .await;
    assert_eq!(status, 200);
    until(&b, Some(&secret), 401).await;
    admin(
        &a,
        "PATCH",
        &format!("/admin/keys/{id}"),
        Some(json!({"disabled": false})),
    )
    .await;
    until(&b, Some(&secret), 200).await;

    // Rotated: the new secret works at once, the old one not at all (no grace asked).
    let (status, rotated) = admin(&a, "POST", &format!("/admin/keys/{id}/rotate"), None).await;
    assert_eq!(status, 200, "{rotated}");
    let new = rotated["key"].as_str().expect("a new secret").to_owned();
    assert_eq!(chat(&a, Some(&new)).await, 200);
    assert_eq!(chat(&a, Some(&secret)).await, 401);
    // With a grace period the old one goes on working.
    let (_, again) = admin(
        &a,
        "POST",
        &format!("/admin/keys/{id}/rotate"),
        Some(json!({"grace_s": 600})),
    )
    .await;
    let newest = again["key"].as_str().expect("a new secret").to_owned();
    assert_eq!(chat(&a, Some(&newest)).await, 200);
    assert_eq!(chat(&a, Some(&new)).await, 200);

    // Revoked: refused everywhere; the key is still listed, revoked.
    let (status, revoked) = admin(&a, "DELETE", &format!("/admin/keys/{id}"), None).await;
    assert_eq!(status, 200);
    assert_eq!(revoked["state"], "revoked");
    assert_eq!(chat(&a, Some(&newest)).await, 401);
    until(&b, Some(&newest), 401).await;
    until(&b, Some(&new), 401).await;
    let (status, _) = admin(
        &a,
        "PATCH",
        &format!("/admin/keys/{id}"),
        Some(json!({"disabled": false})),
    )
    .await;
    assert_eq!(status, 409, "a revoked key stays revoked");
}

#[tokio::test]
async fn bad_key_requests_are_refused_naming_what_is_wrong() {
    let url = sqlite_url("keys");
    let app = app_on(&url, vec!["sk-configured".into()]).await;
    for (body, param) in [
        (json!({"name": "x", "rpm": -1}), "rpm"),
        (json!({"name": "x", "rpm": "many"}), "rpm"),
        (json!({"name": "x", "rpm": 0}), "rpm"),
        (json!({"name": "x", "budget": 5}), "."),
        (json!({"rpm": 5}), "name"),
        (json!({"name": "x", "expires_at": "soon"}), "expires_at"),
        (json!({"name": "", "rpm": 5}), "name"),
        (
            json!({"name": "x", "metadata": {"big": "x".repeat(20_000)}}),
            "metadata",
        ),
        (json!({"name": "x", "models": [""]}), "models"),
    ] {
        let (status, error) = admin(&app, "POST", "/admin/keys", Some(body.clone())).await;
        assert_eq!(status, 400, "{body}: {error}");
        if param != "." {
            assert_eq!(error["error"]["param"], param, "{body}: {error}");
        }
    }
    let (status, _) = admin(
        &app,
        "PATCH",
        "/admin/keys/key_nope",
        Some(json!({"rpm": 5})),
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = admin(&app, "DELETE", "/admin/keys/key_nope", None).await;
    assert_eq!(status, 404);
    let (status, _) = admin(&app, "POST", "/admin/keys", Some(json!({"name": "bob"}))).await;
    assert_eq!(status, 201);
    let (status, _) = admin(&app, "POST", "/admin/keys", Some(json!({"name": "bob"}))).await;
    assert_eq!(status, 409, "names are unique");
    // The configured key is listed, read-only, and still works.
    let (_, list) = admin(&app, "GET", "/admin/keys", None).await;
    let configured: Vec<&Value> = list["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|k| k["source"] == "config")
        .collect();
    assert_eq!(configured.len(), 1, "{list}");
    assert_eq!(configured[0]["read_only"], true);
    assert_eq!(chat(&app, Some("sk-configured")).await, 200);
    // An inference key is not the admin key.
    let answer = app
        .http
        .get(app.url("/admin/keys"))
        .bearer_auth("sk-configured")
        .send()
        .await
        .expect("answers");
    assert_eq!(answer.status(), 401);
}
