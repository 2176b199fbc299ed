//! The admin API's reports, mounted only when `SLUICE_ADMIN_KEY` is set and open only to
//! it: `GET /admin/usage` (requests, tokens and cost in a time range, grouped),
//! `GET /admin/requests` (the ledger's records, newest first, a page at a time) and
//! `GET /admin/streams` (the streams open now, per key); and `GET /admin`, the page in
//! web/ that manages keys and teams (it asks for the admin key, which it keeps in the
//! tab's session storage only).

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRef, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::ledger::Db;
use crate::ledger::report::{self, Filter, Grouped};
use crate::state::AppState;

/// Records a page holds at most, and when the client names no number.
const MAX_LIMIT: i64 = 1000;
const DEFAULT_LIMIT: i64 = 20;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/usage", get(usage))
        .route("/admin/requests", get(requests))
        .route("/admin/streams", get(streams))
        .route("/admin", get(page))
        .merge(super::keys::router())
}

/// A request that presented `SLUICE_ADMIN_KEY` as its bearer key.
pub struct Admin;

impl<S> FromRequestParts<S> for Admin
where
    S: Send + Sync,
    AppState: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let state = AppState::from_ref(state);
        let Some(key) = &state.admin_key else {
            return Err(ApiError::InvalidAdminKey);
        };
        let presented = crate::http::bearer(&parts.headers).unwrap_or("");
        if bool::from(presented.as_bytes().ct_eq(key.as_bytes())) {
            Ok(Admin)
        } else {
            Err(ApiError::InvalidAdminKey)
        }
    }
}

/// The admin page: static, like the chat page, under the same policy; every figure on it
/// comes from the API with the admin key.
async fn page() -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        super::ui::PAGE_HEADERS,
        axum::response::Html(include_str!("../../web/admin.html")),
    )
        .into_response()
}

/// The streams open now, per key: across every instance with Redis, else this instance's.
async fn streams(_: Admin, State(state): State<AppState>) -> Json<Value> {
    let (shared, open) = state.admission.open_by_client().await;
    let data: Vec<Value> = open
        .into_iter()
        .map(|(key, open)| json!({"key": key, "open": open}))
        .collect();
    Json(json!({"object": "list", "shared": shared, "data": data}))
}

#[derive(Deserialize)]
struct UsageQuery {
    from: Option<String>,
    to: Option<String>,
    key: Option<String>,
    group_by: Option<String>,
}

#[derive(Deserialize)]
struct RequestsQuery {
    from: Option<String>,
    to: Option<String>,
    key: Option<String>,
    limit: Option<String>,
    after: Option<String>,
}

/// The query, or a 400 that says what is wrong with it.
fn query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query
        .map(|Query(q)| q)
        .map_err(|e| ApiError::invalid(e.body_text(), None))
}

fn filter(from: Option<&str>, to: Option<&str>, key: Option<&str>) -> Result<Filter, ApiError> {
    Filter::parse(from, to, key).map_err(|message| {
        let param = if message.starts_with("`from`") {
            "from"
        } else {
            "to"
        };
        ApiError::invalid(message, Some(param))
    })
}

/// The ledger's database, or why there is none to read.
pub(super) async fn db(state: &AppState) -> Result<Db, ApiError> {
    let ledger = state.ledger.as_ref().ok_or_else(|| {
        ApiError::LedgerUnavailable("the ledger is off (SLUICE_DATABASE_URL=off)".into())
    })?;
    ledger.db().await.ok_or_else(|| {
        let why = ledger.error().unwrap_or_else(|| "not connected yet".into());
        ApiError::LedgerUnavailable(format!("the ledger's database cannot be read: {why}"))
    })
}

fn unreadable(error: anyhow::Error) -> ApiError {
    tracing::warn!(error = %format!("{error:#}"), "admin: the ledger's database failed a report");
    ApiError::LedgerUnavailable(format!(
        "the ledger's database failed the report: {error:#}"
    ))
}

/// `GET /admin/usage?from=&to=&key=&group_by=key,model,day`: requests, tokens and cost.
async fn usage(
    _: Admin,
    State(state): State<AppState>,
    q: Result<Query<UsageQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    let filter = filter(q.from.as_deref(), q.to.as_deref(), q.key.as_deref())?;
    let group = Grouped::parse_list(q.group_by.as_deref().unwrap_or(""))
        .map_err(|message| ApiError::invalid(message, Some("group_by")))?;
    let rows = db(&state)
        .await?
        .usage(&filter, &group)
        .await
        .map_err(unreadable)?;
    let mut total = report::Usage {
        group: Vec::new(),
        requests: 0,
        input_tokens: 0,
        cached_tokens: 0,
        cache_write_tokens: 0,
        output_tokens: 0,
        reasoning_tokens: 0,
        cost_usd: 0.0,
        unpriced: 0,
    };
    let mut data = Vec::with_capacity(rows.len());
    for mut row in rows {
        row.cost_usd = (row.cost_usd * 1e9).round() / 1e9;
        total.requests += row.requests;
        total.input_tokens += row.input_tokens;
        total.cached_tokens += row.cached_tokens;
        total.cache_write_tokens += row.cache_write_tokens;
        total.output_tokens += row.output_tokens;
        total.reasoning_tokens += row.reasoning_tokens;
        total.cost_usd += row.cost_usd;
        total.unpriced += row.unpriced;
        let mut object = Map::new();
        for (g, value) in group.iter().zip(&row.group) {
            object.insert(g.name().into(), json!(value));
        }
        if let Value::Object(sums) = json!(row) {
            object.extend(sums);
        }
        data.push(Value::Object(object));
    }
    total.cost_usd = (total.cost_usd * 1e9).round() / 1e9;
    Ok(Json(json!({
        "object": "list",
        "from": q.from,
        "to": q.to,
        "group_by": group.iter().map(|g| g.name()).collect::<Vec<_>>(),
        "data": data,
        "total": total,
    })))
}

/// `GET /admin/requests?key=&from=&to=&limit=&after=`: records, newest first; `after` is
/// the last id of the page before.
async fn requests(
    _: Admin,
    State(state): State<AppState>,
    q: Result<Query<RequestsQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    let filter = filter(q.from.as_deref(), q.to.as_deref(), q.key.as_deref())?;
    let limit = match q.limit.as_deref() {
        None => DEFAULT_LIMIT,
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::invalid(
                    format!("`limit` must be a whole number from 1 to {MAX_LIMIT}"),
                    Some("limit"),
                )
            })?,
    };
    let mut records = db(&state)
        .await?
        .requests(&filter, q.after.as_deref(), limit + 1)
        .await
        .map_err(unreadable)?;
    let has_more = records.len() as i64 > limit;
    records.truncate(limit as usize);
    let last_id = records.last().map(|(r, _)| r.id.clone());
    let first_id = records.first().map(|(r, _)| r.id.clone());
    let data: Vec<Value> = records
        .into_iter()
        .map(|(record, instance)| {
            let time = report::rfc3339(record.at_us);
            let mut value = json!(record);
            if let Value::Object(object) = &mut value {
                object.insert("object".into(), json!("sluice.request"));
                object.insert("time".into(), json!(time));
                object.insert("instance".into(), json!(instance));
            }
            value
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "first_id": first_id,
        "last_id": last_id,
        "has_more": has_more,
    })))
}
