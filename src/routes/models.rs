//! `GET /v1/models`: every model sluice routes by itself, in OpenAI's list format.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::admission::Principal;
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/models", get(list))
}

async fn list(State(state): State<AppState>, _: Principal) -> Json<Value> {
    let data: Vec<Value> = state
        .routes
        .model_names()
        .into_iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "sluice"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}
