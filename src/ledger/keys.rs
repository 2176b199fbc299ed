//! Keys made through the admin API, kept in the ledger's database so that every instance
//! on it sees them: a digest of each secret (never the secret), its limits, its state.
//! Every change moves `updated_us`, which the instances poll to take it within a second.

use serde::Serialize;
use sqlx::Row;

use super::Db;

/// One key as the store keeps it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Key {
    pub id: String,
    pub name: String,
    /// The secret's first characters, to recognise it.
    pub prefix: String,
    #[serde(skip)]
    pub digest: String,
    #[serde(skip)]
    pub previous_digest: Option<String>,
    #[serde(skip)]
    pub previous_until_us: Option<i64>,
    pub rpm: Option<i64>,
    pub tpm: Option<i64>,
    pub max_streams: Option<i64>,
    pub models: Option<Vec<String>>,
    #[serde(skip)]
    pub expires_at_us: Option<i64>,
    pub disabled: bool,
    pub metadata: Option<serde_json::Value>,
    #[serde(skip)]
    pub revoked_at_us: Option<i64>,
    #[serde(skip)]
    pub created_us: i64,
    #[serde(skip)]
    pub updated_us: i64,
}

/// What a change sets: `Some` fields only (`Some(None)`: cleared).
#[derive(Debug, Default, Clone)]
pub struct Change {
    pub name: Option<String>,
    pub rpm: Option<Option<i64>>,
    pub tpm: Option<Option<i64>>,
    pub max_streams: Option<Option<i64>>,
    pub models: Option<Option<Vec<String>>>,
    pub expires_at_us: Option<Option<i64>>,
    pub disabled: Option<bool>,
    pub metadata: Option<Option<serde_json::Value>>,
}

const COLUMNS: &str = "id, name, prefix, digest, previous_digest, previous_until_us, rpm, tpm, \
     max_streams, models, expires_at_us, disabled, metadata, revoked_at_us, created_us, updated_us";

/// A secret's digest as the store writes it: SHA-256, hex.
pub fn digest_hex(secret: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(secret.as_bytes());
    let mut hex = String::with_capacity(64);
    for byte in digest {
        use std::fmt::Write as _;
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// The 32 bytes of a digest the store wrote.
pub fn digest_bytes(hex: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if hex.len() != 64 {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn json<T: Serialize>(value: &Option<T>) -> Option<String> {
    value.as_ref().and_then(|v| serde_json::to_string(v).ok())
}

impl Db {
    /// Stores a new key.
    pub async fn create_key(&self, key: &Key) -> anyhow::Result<()> {
        let sql = format!(
            "INSERT INTO api_keys ({COLUMNS}) VALUES \
             ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"
        );
        on!(self, pool => {
            sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
                .bind(key.id.clone())
                .bind(key.name.clone())
                .bind(key.prefix.clone())
                .bind(key.digest.clone())
                .bind(key.previous_digest.clone())
                .bind(key.previous_until_us)
                .bind(key.rpm)
                .bind(key.tpm)
                .bind(key.max_streams)
                .bind(json(&key.models))
                .bind(key.expires_at_us)
                .bind(i64::from(key.disabled))
                .bind(json(&key.metadata))
                .bind(key.revoked_at_us)
                .bind(key.created_us)
                .bind(key.updated_us)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Every key ever made, revoked ones too, oldest first.
    pub async fn keys(&self) -> anyhow::Result<Vec<Key>> {
        let sql = format!("SELECT {COLUMNS} FROM api_keys ORDER BY created_us, id");
        let keys = on!(self, pool => {
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql.as_str())).fetch_all(pool).await?;
            rows.iter().map(|row| -> Result<Key, sqlx::Error> {
                let models: Option<String> = row.try_get("models")?;
                let metadata: Option<String> = row.try_get("metadata")?;
                Ok(Key {
                    id: row.try_get("id")?,
                    name: row.try_get("name")?,
                    prefix: row.try_get("prefix")?,
                    digest: row.try_get("digest")?,
                    previous_digest: row.try_get("previous_digest")?,
                    previous_until_us: row.try_get("previous_until_us")?,
                    rpm: row.try_get("rpm")?,
                    tpm: row.try_get("tpm")?,
                    max_streams: row.try_get("max_streams")?,
                    models: models.and_then(|m| serde_json::from_str(&m).ok()),
                    expires_at_us: row.try_get("expires_at_us")?,
                    disabled: row.try_get::<i64, _>("disabled")? != 0,
                    metadata: metadata.and_then(|m| serde_json::from_str(&m).ok()),
                    revoked_at_us: row.try_get("revoked_at_us")?,
                    created_us: row.try_get("created_us")?,
                    updated_us: row.try_get("updated_us")?,
                })
            }).collect::<Result<Vec<_>, _>>()?
        });
        Ok(keys)
    }

    /// When each key's latest request arrived, from the ledger (by key name).
    pub async fn last_used(&self) -> anyhow::Result<std::collections::HashMap<String, i64>> {
        let sql =
            "SELECT key_name, CAST(MAX(at_us) AS BIGINT) AS at FROM requests GROUP BY key_name";
        let used = on!(self, pool => {
            let rows = sqlx::query(sql).fetch_all(pool).await?;
            rows.iter()
                .map(|row| Ok((row.try_get::<String, _>("key_name")?, row.try_get::<i64, _>("at")?)))
                .collect::<Result<std::collections::HashMap<_, _>, sqlx::Error>>()?
        });
        Ok(used)
    }

    /// The keys' version: their number and their latest change. Polled every second.
    pub async fn keys_version(&self) -> anyhow::Result<(i64, i64)> {
        let sql = "SELECT COUNT(*) AS n, CAST(COALESCE(MAX(updated_us), 0) AS BIGINT) AS at FROM api_keys";
        let version = on!(self, pool => {
            let row = sqlx::query(sql).fetch_one(pool).await?;
            (row.try_get::<i64, _>("n")?, row.try_get::<i64, _>("at")?)
        });
        Ok(version)
    }

    /// Applies `change` to key `id` (not revoked) at `now_us`: whether there was one.
    pub async fn change_key(&self, id: &str, change: &Change, now_us: i64) -> anyhow::Result<bool> {
        let columns = [
            ("name", change.name.is_some()),
            ("rpm", change.rpm.is_some()),
            ("tpm", change.tpm.is_some()),
            ("max_streams", change.max_streams.is_some()),
            ("models", change.models.is_some()),
            ("expires_at_us", change.expires_at_us.is_some()),
            ("disabled", change.disabled.is_some()),
            ("metadata", change.metadata.is_some()),
            ("updated_us", true),
        ];
        // The parameters in this order: the values are bound below in the same one.
        let sets: Vec<String> = columns
            .iter()
            .filter(|(_, set)| *set)
            .enumerate()
            .map(|(i, (column, _))| format!("{column} = ${}", i + 1))
            .collect();
        let n = sets.len();
        let id_at = n + 1;
        let sql = format!(
            "UPDATE api_keys SET {} WHERE id = ${id_at} AND revoked_at_us IS NULL",
            sets.join(", ")
        );
        let changed = on!(self, pool => {
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()));
            if let Some(name) = &change.name {
                query = query.bind(name.clone());
            }
            for limit in [change.rpm, change.tpm, change.max_streams].into_iter().flatten() {
                query = query.bind(limit);
            }
            if let Some(models) = &change.models {
                query = query.bind(json(models));
            }
            if let Some(expires) = change.expires_at_us {
                query = query.bind(expires);
            }
            if let Some(disabled) = change.disabled {
                query = query.bind(i64::from(disabled));
            }
            if let Some(metadata) = &change.metadata {
                query = query.bind(json(metadata));
            }
            query.bind(now_us).bind(id.to_owned()).execute(pool).await?.rows_affected()
        });
        Ok(changed > 0)
    }

    /// Revokes key `id` at `now_us`: whether it was live.
    pub async fn revoke_key(&self, id: &str, now_us: i64) -> anyhow::Result<bool> {
        let sql = "UPDATE api_keys SET revoked_at_us = $1, updated_us = $1 \
                   WHERE id = $2 AND revoked_at_us IS NULL";
        let changed = on!(self, pool => {
            sqlx::query(sql).bind(now_us).bind(id.to_owned()).execute(pool).await?.rows_affected()
        });
        Ok(changed > 0)
    }

    /// Gives key `id` a new secret; the old one works until `previous_until_us`.
    pub async fn rotate_key(
        &self,
        id: &str,
        digest: &str,
        prefix: &str,
        previous_until_us: i64,
        now_us: i64,
    ) -> anyhow::Result<bool> {
        let sql = "UPDATE api_keys SET previous_digest = digest, previous_until_us = $1, \
                   digest = $2, prefix = $3, updated_us = $4 \
                   WHERE id = $5 AND revoked_at_us IS NULL";
        let changed = on!(self, pool => {
            sqlx::query(sql)
                .bind(previous_until_us)
                .bind(digest.to_owned())
                .bind(prefix.to_owned())
                .bind(now_us)
                .bind(id.to_owned())
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(changed > 0)
    }
}
