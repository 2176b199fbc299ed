//! The HTTP surfaces, one module each: each parses its wire format, hands the request to
//! the pipeline and answers with its encoder. Here: the 404/405 fallbacks they share.

pub mod admin;
pub mod anthropic;
pub mod completions;
pub mod health;
pub mod keys;
pub mod models;
pub mod prompts;
pub mod responses;
pub mod sluice;
pub mod streams;
pub mod ui;

use axum::extract::OriginalUri;
use axum::http::Method;

use crate::error::ApiError;

pub async fn not_found(method: Method, OriginalUri(uri): OriginalUri) -> ApiError {
    ApiError::RouteNotFound {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}

pub async fn method_not_allowed(method: Method, OriginalUri(uri): OriginalUri) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}
