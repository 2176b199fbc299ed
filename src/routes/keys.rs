//! The admin API's keys and teams: `POST/GET /admin/keys`, `GET/PATCH/DELETE
//! /admin/keys/{id}`, `POST /admin/keys/{id}/rotate`, `POST/GET /admin/teams`,
//! `GET/PATCH/DELETE /admin/teams/{id}`. A key is made with a secret shown once (only its
//! digest is stored), held to its limits and budget (and its team's), and taken by every
//! instance on the database within a second. The configured keys (`SLUICE_API_KEYS`, the
//! TOML file) are listed, read-only.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};

use super::admin::Admin;
use crate::admission::budget::Period;
use crate::error::ApiError;
use crate::ledger::keys::{Change, Key, Team, Terms, digest_hex};
use crate::ledger::report;
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/keys", post(create).get(list))
        .route("/admin/keys/{id}", get(one).patch(change).delete(revoke))
        .route("/admin/keys/{id}/rotate", post(rotate))
        .route("/admin/teams", post(create_team).get(list_teams))
        .route(
            "/admin/teams/{id}",
            get(one_team).patch(change_team).delete(delete_team),
        )
}

/// `Some(None)` for a field sent as `null` (cleared), `None` for one not sent.
fn sent<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// What a key may carry, as a client sends it.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Body {
    name: Option<String>,
    #[serde(default, deserialize_with = "sent")]
    rpm: Option<Option<u32>>,
    #[serde(default, deserialize_with = "sent")]
    tpm: Option<Option<u32>>,
    #[serde(default, deserialize_with = "sent")]
    max_streams: Option<Option<u32>>,
    #[serde(default, deserialize_with = "sent")]
    models: Option<Option<Vec<String>>>,
    #[serde(default, deserialize_with = "sent")]
    expires_at: Option<Option<String>>,
    disabled: Option<bool>,
    #[serde(default, deserialize_with = "sent")]
    metadata: Option<Option<serde_json::Map<String, Value>>>,
    #[serde(default, deserialize_with = "sent")]
    budget_usd: Option<Option<f64>>,
    #[serde(default, deserialize_with = "sent")]
    budget_tokens: Option<Option<u64>>,
    #[serde(default, deserialize_with = "sent")]
    budget_period: Option<Option<String>>,
    #[serde(default, deserialize_with = "sent")]
    team_id: Option<Option<String>>,
}

/// `DELETE /admin/keys/{id}?end_streams=true`.
#[derive(Deserialize, Default)]
struct Revoke {
    #[serde(default)]
    end_streams: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Rotation {
    /// Seconds the old secret still works.
    grace_s: Option<u32>,
}

/// The body as `T`, or a 400 naming the field that is wrong.
fn parse<'de, T: Deserialize<'de> + Default>(bytes: &'de [u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    let mut reader = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut reader).map_err(|e| {
        let path = e.path().to_string();
        let param = (path != ".").then_some(path);
        ApiError::invalid(
            format!("the body is not a key: {}", e.inner()),
            param.as_deref(),
        )
    })
}

impl Body {
    /// The change it asks for, checked.
    fn change(self) -> Result<Change, ApiError> {
        for (field, value) in [
            ("rpm", self.rpm),
            ("tpm", self.tpm),
            ("max_streams", self.max_streams),
        ] {
            if value == Some(Some(0)) {
                return Err(ApiError::invalid(
                    format!("`{field}` must be above 0"),
                    Some(field),
                ));
            }
        }
        if let Some(name) = &self.name
            && (name.trim().is_empty() || name.len() > 128 || name.chars().any(char::is_control))
        {
            return Err(ApiError::invalid(
                "`name` must be 1 to 128 printable characters",
                Some("name"),
            ));
        }
        if let Some(Some(models)) = &self.models
            && (models.len() > 1024 || models.iter().any(|m| m.is_empty() || m.len() > 256))
        {
            return Err(ApiError::invalid(
                "`models` holds at most 1,024 names of 1 to 256 bytes",
                Some("models"),
            ));
        }
        if let Some(Some(metadata)) = &self.metadata
            && serde_json::to_string(metadata).map_or(0, |m| m.len()) > 16 * 1024
        {
            return Err(ApiError::invalid(
                "`metadata` is at most 16 KiB",
                Some("metadata"),
            ));
        }
        let expires_at_us = match self.expires_at {
            Some(Some(text)) => Some(Some(report::micros(&text).ok_or_else(|| {
                ApiError::invalid(
                    "`expires_at` is not an RFC 3339 time or a date",
                    Some("expires_at"),
                )
            })?)),
            Some(None) => Some(None),
            None => None,
        };
        if let Some(Some(usd)) = self.budget_usd
            && !(usd.is_finite() && usd >= 0.0)
        {
            return Err(ApiError::invalid(
                "`budget_usd` must be a number of USD, 0 or more",
                Some("budget_usd"),
            ));
        }
        if let Some(Some(period)) = &self.budget_period
            && Period::parse(period).is_none()
        {
            return Err(ApiError::invalid(
                format!(
                    "`budget_period` must be one of {}",
                    Period::ALL.map(Period::name).join(", ")
                ),
                Some("budget_period"),
            ));
        }
        let limit = |v: Option<Option<u32>>| v.map(|v| v.map(i64::from));
        Ok(Change {
            name: self.name.map(|n| n.trim().to_owned()),
            rpm: limit(self.rpm),
            tpm: limit(self.tpm),
            max_streams: limit(self.max_streams),
            budget_usd: self.budget_usd,
            budget_tokens: self
                .budget_tokens
                .map(|t| t.map(|t| i64::try_from(t).unwrap_or(i64::MAX))),
            budget_period: self.budget_period,
            models: self.models,
            expires_at_us,
            disabled: self.disabled,
            metadata: self.metadata.map(|m| m.map(Value::Object)),
            team_id: self.team_id,
        })
    }
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// A new secret: `sk-sluice-` and 64 random hex digits.
fn secret() -> String {
    format!(
        "sk-sluice-{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

async fn db(state: &AppState) -> Result<crate::ledger::Db, ApiError> {
    super::admin::db(state).await
}

fn failed(error: anyhow::Error) -> ApiError {
    tracing::warn!(error = %format!("{error:#}"), "admin: the keys' database failed");
    ApiError::LedgerUnavailable(format!("the keys' database failed: {error:#}"))
}

/// What a key or a team (`team`) named `name` has spent in its budget's period (the
/// calendar month's when it has no budget), by the ledger, and what its budget has left.
async fn spend(
    db: &crate::ledger::Db,
    team: bool,
    name: &str,
    terms: &Terms,
) -> Result<Value, ApiError> {
    let period = Period::or_month(terms.budget_period.as_deref());
    let (since, next) = period.bounds(now_us());
    let (usd, tokens) = db.spent(team, name, since).await.map_err(failed)?;
    Ok(json!({
        "period": period.name(),
        "since": report::rfc3339(since),
        "resets_at": next.map(report::rfc3339),
        "usd": usd,
        "tokens": tokens,
        "remaining_usd": terms.budget_usd.map(|b| (b - usd).max(0.0)),
        "remaining_tokens": terms.budget_tokens.map(|b| (b - tokens).max(0)),
    }))
}

/// A key as the API shows it, with when it was last used: never a digest, and its secret
/// only in the answer that made it (`secret`).
fn shown(key: &Key, last_used_us: Option<i64>, secret: Option<&str>, spend: Value) -> Value {
    let time = |us: Option<i64>| us.map(report::rfc3339);
    let now = now_us();
    let state = if key.revoked_at_us.is_some() {
        "revoked"
    } else if key.terms.disabled {
        "disabled"
    } else if key.expires_at_us.is_some_and(|at| at <= now) {
        "expired"
    } else {
        "active"
    };
    let mut value = json!(key);
    if let Value::Object(object) = &mut value {
        object.insert("object".into(), json!("sluice.key"));
        object.insert("source".into(), json!("api"));
        object.insert("state".into(), json!(state));
        object.insert("expires_at".into(), json!(time(key.expires_at_us)));
        object.insert("created_at".into(), json!(report::rfc3339(key.created_us)));
        object.insert("revoked_at".into(), json!(time(key.revoked_at_us)));
        object.insert("last_used_at".into(), json!(time(last_used_us)));
        object.insert("spend".into(), spend);
        if let Some(secret) = secret {
            object.insert("key".into(), json!(secret));
        }
    }
    value
}

/// Key `id` after a change: taken by this instance at once, shown as it is now.
async fn changed(state: &AppState, id: &str, secret: Option<&str>) -> Result<Value, ApiError> {
    applied(state).await;
    let key = find(state, id).await?;
    described(state, &key, secret).await
}

/// A key as the API shows it, read now: when it was last used, what it spent.
async fn described(state: &AppState, key: &Key, secret: Option<&str>) -> Result<Value, ApiError> {
    let db = db(state).await?;
    let used = db.last_used().await.map_err(failed)?;
    let spend = spend(&db, false, &key.name, &key.terms).await?;
    Ok(shown(key, used.get(&key.name).copied(), secret, spend))
}

/// The key of `id` unless it is revoked (a 409) or not there (a 404).
async fn live(state: &AppState, id: &str) -> Result<Key, ApiError> {
    let key = find(state, id).await?;
    if key.revoked_at_us.is_some() {
        return Err(ApiError::Conflict("the key is revoked".into()));
    }
    Ok(key)
}

/// The key of `id`, or a 404.
async fn find(state: &AppState, id: &str) -> Result<Key, ApiError> {
    let keys = db(state).await?.keys().await.map_err(failed)?;
    keys.into_iter()
        .find(|k| k.id == id)
        .ok_or_else(|| ApiError::NotFound(no("key", id)))
}

/// Takes the database's keys on this instance at once (the others within a second).
async fn applied(state: &AppState) {
    if let Ok(db) = db(state).await {
        state.apply_keys(&db).await;
    }
}

/// A name no other key, configured or made, has.
async fn check_name(state: &AppState, name: &str, id: Option<&str>) -> Result<(), ApiError> {
    let taken = state
        .admission
        .configured_names()
        .iter()
        .any(|n| &**n == name)
        || db(state)
            .await?
            .keys()
            .await
            .map_err(failed)?
            .iter()
            .any(|k| k.name == name && Some(k.id.as_str()) != id);
    if taken {
        return Err(ApiError::Conflict(format!(
            "a key is already named {name:?}"
        )));
    }
    Ok(())
}

async fn create(
    _: Admin,
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: Body = parse(&body)?;
    let change = body.change()?;
    let name = change
        .name
        .clone()
        .ok_or_else(|| ApiError::invalid("a key needs a `name`", Some("name")))?;
    check_name(&state, &name, None).await?;
    check_team(&state, &change).await?;
    let secret = secret();
    let now = now_us();
    let key = Key {
        id: format!("key_{}", uuid::Uuid::new_v4().simple()),
        name,
        prefix: secret.chars().take(14).collect(),
        digest: digest_hex(&secret),
        previous_digest: None,
        previous_until_us: None,
        terms: terms(&change),
        models: change.models.flatten(),
        team_id: change.team_id.flatten(),
        expires_at_us: change.expires_at_us.flatten(),
        revoked_at_us: None,
        end_streams: false,
        created_us: now,
        updated_us: now,
    };
    db(&state).await?.create_key(&key).await.map_err(failed)?;
    applied(&state).await;
    let shown = described(&state, &key, Some(&secret)).await?;
    Ok((StatusCode::CREATED, Json(shown)).into_response())
}

/// The terms a new key or team is made with.
fn terms(change: &Change) -> Terms {
    Terms {
        rpm: change.rpm.flatten(),
        tpm: change.tpm.flatten(),
        max_streams: change.max_streams.flatten(),
        budget_usd: change.budget_usd.flatten(),
        budget_tokens: change.budget_tokens.flatten(),
        budget_period: change.budget_period.clone().flatten(),
        disabled: change.disabled.unwrap_or(false),
        metadata: change.metadata.clone().flatten(),
    }
}

/// The team a change puts a key in is there (a 400 naming `team_id` when not).
async fn check_team(state: &AppState, change: &Change) -> Result<(), ApiError> {
    let Some(Some(id)) = &change.team_id else {
        return Ok(());
    };
    let teams = db(state).await?.teams().await.map_err(failed)?;
    if teams.iter().any(|t| &t.id == id) {
        return Ok(());
    }
    Err(ApiError::invalid(no("team", id), Some("team_id")))
}

async fn list(_: Admin, State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let db = db(&state).await?;
    let keys = db.keys().await.map_err(failed)?;
    let used = db.last_used().await.map_err(failed)?;
    let mut data: Vec<Value> = state
        .admission
        .configured_names()
        .iter()
        .map(|name| {
            let last = used.get(&**name).copied().map(report::rfc3339);
            json!({"object": "sluice.key", "name": name, "source": "config", "read_only": true,
                "state": "active", "last_used_at": last})
        })
        .collect();
    for key in &keys {
        let spend = spend(&db, false, &key.name, &key.terms).await?;
        data.push(shown(key, used.get(&key.name).copied(), None, spend));
    }
    Ok(Json(json!({"object": "list", "data": data})))
}

async fn one(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let key = find(&state, &id).await?;
    Ok(Json(described(&state, &key, None).await?))
}

async fn change(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let body: Body = parse(&body)?;
    let change = body.change()?;
    live(&state, &id).await?;
    if let Some(name) = &change.name {
        check_name(&state, name, Some(&id)).await?;
    }
    check_team(&state, &change).await?;
    let db = db(&state).await?;
    if !db
        .change_key(&id, &change, now_us())
        .await
        .map_err(failed)?
    {
        return Err(ApiError::Conflict("the key is revoked".into()));
    }
    Ok(Json(changed(&state, &id, None).await?))
}

/// Revokes a key: its next request is a 401 on every instance. Its open streams go on,
/// unless `?end_streams=true`: then each ends at its next chunk with an error event.
async fn revoke(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(revoke): Query<Revoke>,
) -> Result<Json<Value>, ApiError> {
    find(&state, &id).await?;
    db(&state)
        .await?
        .revoke_key(&id, revoke.end_streams, now_us())
        .await
        .map_err(failed)?;
    Ok(Json(changed(&state, &id, None).await?))
}

async fn rotate(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let rotation: Rotation = parse(&body)?;
    live(&state, &id).await?;
    let secret = secret();
    let now = now_us();
    let until = now + i64::from(rotation.grace_s.unwrap_or(0)) * 1_000_000;
    let prefix: String = secret.chars().take(14).collect();
    db(&state)
        .await?
        .rotate_key(&id, &digest_hex(&secret), &prefix, until, now)
        .await
        .map_err(failed)?;
    Ok(Json(changed(&state, &id, Some(&secret)).await?))
}

/// A team as the API shows it, with what it spent and its keys' ids.
async fn shown_team(state: &AppState, team: &Team) -> Result<Value, ApiError> {
    let db = db(state).await?;
    let spend = spend(&db, true, &team.name, &team.terms).await?;
    let keys: Vec<String> = db
        .keys()
        .await
        .map_err(failed)?
        .into_iter()
        .filter(|k| k.revoked_at_us.is_none() && k.team_id.as_deref() == Some(&team.id))
        .map(|k| k.id)
        .collect();
    let mut value = json!(team);
    if let Value::Object(object) = &mut value {
        object.insert("object".into(), json!("sluice.team"));
        object.insert(
            "state".into(),
            json!(if team.terms.disabled {
                "disabled"
            } else {
                "active"
            }),
        );
        object.insert("created_at".into(), json!(report::rfc3339(team.created_us)));
        object.insert("keys".into(), json!(keys));
        object.insert("spend".into(), spend);
    }
    Ok(value)
}

/// A team's body: a key's, without what only a key carries.
fn team_change(body: Body) -> Result<Change, ApiError> {
    for (field, sent) in [
        ("models", body.models.is_some()),
        ("expires_at", body.expires_at.is_some()),
        ("team_id", body.team_id.is_some()),
    ] {
        if sent {
            return Err(ApiError::invalid(
                format!("a team has no `{field}`: set it on its keys"),
                Some(field),
            ));
        }
    }
    body.change()
}

/// A name no other team (than `id`) has.
async fn check_team_name(state: &AppState, name: &str, id: Option<&str>) -> Result<(), ApiError> {
    let teams = db(state).await?.teams().await.map_err(failed)?;
    if teams
        .iter()
        .any(|t| t.name == name && Some(t.id.as_str()) != id)
    {
        return Err(ApiError::Conflict(format!(
            "a team is already named {name:?}"
        )));
    }
    Ok(())
}

/// `no key "…"`: an id as a client sent it, shortened.
fn no(what: &str, id: &str) -> String {
    format!("no {what} {:?}", id.chars().take(64).collect::<String>())
}

/// The team of `id`, or a 404.
async fn find_team(state: &AppState, id: &str) -> Result<Team, ApiError> {
    let teams = db(state).await?.teams().await.map_err(failed)?;
    teams
        .into_iter()
        .find(|t| t.id == id)
        .ok_or_else(|| ApiError::NotFound(no("team", id)))
}

async fn create_team(
    _: Admin,
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let change = team_change(parse(&body)?)?;
    let name = change
        .name
        .clone()
        .ok_or_else(|| ApiError::invalid("a team needs a `name`", Some("name")))?;
    check_team_name(&state, &name, None).await?;
    let db = db(&state).await?;
    let now = now_us();
    let team = Team {
        id: format!("team_{}", uuid::Uuid::new_v4().simple()),
        name,
        terms: terms(&change),
        deleted_at_us: None,
        created_us: now,
        updated_us: now,
    };
    db.create_team(&team).await.map_err(failed)?;
    applied(&state).await;
    let shown = shown_team(&state, &team).await?;
    Ok((StatusCode::CREATED, Json(shown)).into_response())
}

async fn list_teams(_: Admin, State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let teams = db(&state).await?.teams().await.map_err(failed)?;
    let mut data = Vec::with_capacity(teams.len());
    for team in &teams {
        data.push(shown_team(&state, team).await?);
    }
    Ok(Json(json!({"object": "list", "data": data})))
}

async fn one_team(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let team = find_team(&state, &id).await?;
    Ok(Json(shown_team(&state, &team).await?))
}

async fn change_team(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let change = team_change(parse(&body)?)?;
    find_team(&state, &id).await?;
    if let Some(name) = &change.name {
        check_team_name(&state, name, Some(&id)).await?;
    }
    let db = db(&state).await?;
    if !db
        .change_team(&id, &change, now_us())
        .await
        .map_err(failed)?
    {
        return Err(ApiError::NotFound("the team was deleted".into()));
    }
    applied(&state).await;
    let team = find_team(&state, &id).await?;
    Ok(Json(shown_team(&state, &team).await?))
}

/// Deletes a team that no live key belongs to (a 409 saying how many do).
async fn delete_team(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let team = find_team(&state, &id).await?;
    match db(&state)
        .await?
        .delete_team(&id, now_us())
        .await
        .map_err(failed)?
    {
        Some(0) | None => {}
        Some(keys) => {
            return Err(ApiError::Conflict(format!(
                "{keys} live keys belong to the team; move or revoke them first"
            )));
        }
    }
    applied(&state).await;
    Ok(Json(
        json!({"object": "sluice.team", "id": team.id, "name": team.name, "deleted": true}),
    ))
}
