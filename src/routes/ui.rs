//! `GET /` and `GET /ui/…`: the chat page from web/, embedded in the binary.

use axum::Router;
use axum::extract::Path;
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;

use crate::error::ApiError;
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(index))
        .route("/favicon.ico", get(favicon))
        .route("/ui/{*path}", get(file))
}

/// The page's files: path under /ui/, content type, body.
const FILES: &[(&str, &str, &str)] = &[
    ("app.js", JS, include_str!("../../web/app.js")),
    ("admin.js", JS, include_str!("../../web/admin.js")),
    (
        "admin.css",
        "text/css; charset=utf-8",
        include_str!("../../web/admin.css"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_str!("../../web/app.css"),
    ),
    (
        "vendor/marked/marked.esm.js",
        JS,
        include_str!("../../web/vendor/marked/marked.esm.js"),
    ),
    (
        "vendor/dompurify/purify.es.mjs",
        JS,
        include_str!("../../web/vendor/dompurify/purify.es.mjs"),
    ),
    (
        "vendor/eventsource-parser/stream.js",
        JS,
        include_str!("../../web/vendor/eventsource-parser/stream.js"),
    ),
    (
        "vendor/eventsource-parser/parse.js",
        JS,
        include_str!("../../web/vendor/eventsource-parser/parse.js"),
    ),
    (
        "vendor/prism/prism.js",
        JS,
        include_str!("../../web/vendor/prism/prism.js"),
    ),
    (
        "vendor/eventsource-parser/errors.js",
        JS,
        include_str!("../../web/vendor/eventsource-parser/errors.js"),
    ),
];
const JS: &str = "text/javascript; charset=utf-8";

/// The page shows model output, which is untrusted: it may load and run only its own files,
/// send nothing to other hosts, and be framed by no one.
pub(super) const PAGE_HEADERS: [(header::HeaderName, &str); 4] = [
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; \
         form-action 'self'; frame-ancestors 'none'",
    ),
    (header::X_FRAME_OPTIONS, "DENY"),
    (header::REFERRER_POLICY, "no-referrer"),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
];

async fn index() -> Response {
    (PAGE_HEADERS, Html(include_str!("../../web/index.html"))).into_response()
}

/// The page's icon (an SVG, which browsers take at this path too): no 404 on every load.
async fn favicon() -> Response {
    (
        PAGE_HEADERS,
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        include_str!("../../web/favicon.svg"),
    )
        .into_response()
}

async fn file(Path(path): Path<String>) -> Response {
    match FILES.iter().find(|(name, _, _)| *name == path) {
        Some((_, kind, body)) => {
            (PAGE_HEADERS, [(header::CONTENT_TYPE, *kind)], *body).into_response()
        }
        None => ApiError::RouteNotFound {
            method: "GET".into(),
            path: format!("/ui/{path}"),
        }
        .into_response(),
    }
}
