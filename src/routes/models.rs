//! `GET /v1/models` and `GET /v1/models/{id}`: every model sluice routes by itself (a
//! pattern route's as the names it is known to serve, the pattern itself apart, in
//! `sluice_patterns`), and the default upstream's own catalogue, in OpenAI's format; only
//! the models the caller's key may use.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::admission::Principal;
use crate::error::ApiError;
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/models", get(list))
        .route("/v1/models/{*id}", get(one))
}

/// Every model the caller may use: sluice's own first (the default one leading), then the
/// upstream's as it last listed them.
fn models(state: &AppState, who: &Principal) -> Vec<Value> {
    let mut own = state.routes.model_names();
    for (_, names) in state.routes.patterns() {
        own.extend(
            names
                .into_iter()
                .filter(|n| !own.contains(n))
                .collect::<Vec<_>>(),
        );
    }
    let mut upstream: Vec<String> = state
        .routes
        .catalogue()
        .iter()
        .filter(|name| !own.contains(name))
        .cloned()
        .collect();
    upstream.sort();
    let own = own.into_iter().map(|id| (id, "sluice"));
    let upstream = upstream.into_iter().map(|id| (id, "upstream"));
    own.chain(upstream)
        .filter(|(id, _)| who.may_use(id))
        .map(|(id, owner)| json!({"id": id, "object": "model", "created": 0, "owned_by": owner}))
        .collect()
}

async fn list(State(state): State<AppState>, who: Principal) -> Json<Value> {
    // The patterns are not models: a picker that lists or checks ids sees names only.
    let patterns: Vec<Value> = state
        .routes
        .patterns()
        .into_iter()
        .map(|(pattern, serves)| json!({"pattern": pattern, "serves": serves}))
        .collect();
    Json(json!({"object": "list", "data": models(&state, &who), "sluice_patterns": patterns}))
}

async fn one(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if let Some(model) = models(&state, &who)
        .into_iter()
        .find(|m| m["id"] == id.as_str())
    {
        return Ok(Json(model));
    }
    // Any name a pattern route serves is a model, listed or not yet.
    match state.routes.pattern_of(&id) {
        Some(_) if who.may_use(&id) => Ok(Json(
            json!({"id": id, "object": "model", "created": 0, "owned_by": "sluice"}),
        )),
        _ => Err(ApiError::ModelNotFound(id)),
    }
}
