//! `GET /v1/models` and `GET /v1/models/{id}`: every model sluice routes by itself, and the
//! default upstream's own catalogue, in OpenAI's format; only the models the caller's key
//! may use.

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
    let own = state.routes.model_names();
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
    Json(json!({"object": "list", "data": models(&state, &who)}))
}

async fn one(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    models(&state, &who)
        .into_iter()
        .find(|m| m["id"] == id.as_str())
        .map(Json)
        .ok_or(ApiError::ModelNotFound(id))
}
