//! The admin API's keys: `POST/GET /admin/keys`, `GET/PATCH/DELETE /admin/keys/{id}`,
//! `POST /admin/keys/{id}/rotate`. A key is made with a secret shown once (only its digest
//! is stored), held to its limits, and taken by every instance on the database within a
//! second. The configured keys (`SLUICE_API_KEYS`, the TOML file) are listed, read-only.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};

use super::admin::Admin;
use crate::error::ApiError;
use crate::ledger::keys::{Change, Key, digest_hex};
use crate::ledger::report;
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/keys", post(create).get(list))
        .route("/admin/keys/{id}", get(one).patch(change).delete(revoke))
        .route("/admin/keys/{id}/rotate", post(rotate))
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
        let limit = |v: Option<Option<u32>>| v.map(|v| v.map(i64::from));
        Ok(Change {
            name: self.name.map(|n| n.trim().to_owned()),
            rpm: limit(self.rpm),
            tpm: limit(self.tpm),
            max_streams: limit(self.max_streams),
            models: self.models,
            expires_at_us,
            disabled: self.disabled,
            metadata: self.metadata.map(|m| m.map(Value::Object)),
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

/// A key as the API shows it, with when it was last used: never a digest, and its secret
/// only in the answer that made it (`secret`).
fn shown(key: &Key, last_used_us: Option<i64>, secret: Option<&str>) -> Value {
    let time = |us: Option<i64>| us.map(report::rfc3339);
    let now = now_us();
    let state = if key.revoked_at_us.is_some() {
        "revoked"
    } else if key.disabled {
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
    let used = db(state).await?.last_used().await.map_err(failed)?;
    Ok(shown(&key, used.get(&key.name).copied(), secret))
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
    keys.into_iter().find(|k| k.id == id).ok_or_else(|| {
        ApiError::NotFound(format!(
            "no key {:?}",
            id.chars().take(64).collect::<String>()
        ))
    })
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
    let secret = secret();
    let now = now_us();
    let key = Key {
        id: format!("key_{}", uuid::Uuid::new_v4().simple()),
        name,
        prefix: secret.chars().take(14).collect(),
        digest: digest_hex(&secret),
        previous_digest: None,
        previous_until_us: None,
        rpm: change.rpm.flatten(),
        tpm: change.tpm.flatten(),
        max_streams: change.max_streams.flatten(),
        models: change.models.flatten(),
        expires_at_us: change.expires_at_us.flatten(),
        disabled: change.disabled.unwrap_or(false),
        metadata: change.metadata.flatten(),
        revoked_at_us: None,
        created_us: now,
        updated_us: now,
    };
    db(&state).await?.create_key(&key).await.map_err(failed)?;
    applied(&state).await;
    Ok((StatusCode::CREATED, Json(shown(&key, None, Some(&secret)))).into_response())
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
    data.extend(
        keys.iter()
            .map(|k| shown(k, used.get(&k.name).copied(), None)),
    );
    Ok(Json(json!({"object": "list", "data": data})))
}

async fn one(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let key = find(&state, &id).await?;
    let used = db(&state).await?.last_used().await.map_err(failed)?;
    Ok(Json(shown(&key, used.get(&key.name).copied(), None)))
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

async fn revoke(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    find(&state, &id).await?;
    db(&state)
        .await?
        .revoke_key(&id, now_us())
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
