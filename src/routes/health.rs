//! `GET /healthz` (the process answers), `/readyz` (configured and serving), `/metrics`.
//! With `SLUICE_METRICS_TOKEN` set, `/readyz` and `/metrics` want it as a bearer token.

use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
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
/// shows here without taking sluice out of a load balancer. Probes are shared and reused
/// for a few seconds: asking often costs the upstreams nothing more. The ledger is reported
/// the same way: a database that is down leaves sluice ready, its records queued.
async fn readyz(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    operator(&state, &headers)?;
    let upstreams = state.routes.probe().await;
    Ok(Json(json!({
        "status": "ready",
        "default_upstream": state.routes.has_default_upstream(),
        "models": state.routes.model_names(),
        "upstreams": *upstreams,
        "pools": state.routes.report(&state.metrics, state.metrics_token.is_some()),
        // Serving goes on while the ledger's database is down: it says so here.
        "ledger": state.ledger.as_ref().map(crate::ledger::Ledger::status),
    })))
}

async fn metrics(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    operator(&state, &headers)?;
    // The pools' gauges are set from their state as it is now.
    let _ = state.routes.report(&state.metrics, false);
    let text = live_pools(&state.metrics.render(), &state.routes.live_pool_labels());
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text))
}

/// `text` without the pool series of targets and routes a reload removed (the recorder
/// keeps every label set it has seen): a dashboard shows only what is configured.
fn live_pools(text: &str, live: &std::collections::HashSet<String>) -> String {
    let stale = |line: &str| {
        line.starts_with("sluice_pool_")
            && line.split_once('{').is_some_and(|(_, labels)| {
                let labels = labels.split_once('}').map_or(labels, |(l, _)| l);
                let label = |name: &str| {
                    let start = labels.find(&format!("{name}=\""))? + name.len() + 2;
                    let end = labels[start..].find('"')? + start;
                    Some(&labels[start..end])
                };
                let key = match label("target") {
                    Some(target) => format!("{}\u{0}{target}", label("model").unwrap_or("")),
                    None => label("model").unwrap_or("").to_owned(),
                };
                !live.contains(&key)
            })
    };
    let mut out = String::with_capacity(text.len());
    for line in text.lines().filter(|line| !stale(line)) {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// With `SLUICE_METRICS_TOKEN` set, the request must carry it as `Authorization: Bearer`.
fn operator(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &state.metrics_token else {
        return Ok(());
    };
    let presented = crate::http::bearer(headers).unwrap_or("");
    if bool::from(presented.as_bytes().ct_eq(token.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::InvalidMetricsToken)
    }
}
