//! `GET /healthz` (the process answers), `/readyz` (configured and serving), `/metrics`.

use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// The configuration loaded at start-up, so a running sluice is ready (200) whatever its
/// upstreams do; each upstream is reported reachable or not, with why, so one that is down
/// shows here without taking sluice out of a load balancer.
async fn readyz(State(state): State<AppState>) -> Json<Value> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap_or_default();
    let probes = state.routes.upstreams().into_iter().map(|url| {
        let http = http.clone();
        async move {
            let started = std::time::Instant::now();
            let answer = http.get(format!("{url}/models")).send().await;
            // Any HTTP answer, even 401, means the upstream is there.
            match answer {
                Ok(response) => json!({"url": url, "reachable": true,
                "status": response.status().as_u16(),
                "latency_ms": started.elapsed().as_millis() as u64}),
                Err(e) => json!({"url": url, "reachable": false,
                "error": if e.is_timeout() { "no answer within 2 s".to_owned() }
                         else { "cannot connect".to_owned() }}),
            }
        }
    });
    let upstreams = futures::future::join_all(probes).await;
    Json(json!({
        "status": "ready",
        "default_upstream": state.routes.has_default_upstream(),
        "models": state.routes.model_names(),
        "upstreams": upstreams,
    }))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
