//! `GET /api/prompts`: the prompt templates, their descriptions and variables.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::admission::Principal;
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/prompts", get(list))
}

async fn list(State(state): State<AppState>, _: Principal) -> Json<Value> {
    let prompts: Vec<_> = state.prompts.list().collect();
    Json(json!({"object": "list", "data": prompts}))
}
