//! Keys made through the admin API, kept in the ledger's database so that every instance
//! on it sees them: a digest of each secret (never the secret), its limits, its state.
//! Every change moves `updated_us`, which the instances poll to take it within a second.

use serde::Serialize;
use sqlx::Row;

use super::Db;

/// What a key and a team both carry: limits, a budget, a state, the operator's metadata.
/// `None`: sluice's defaults (limits), or none (a budget).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Terms {
    pub rpm: Option<i64>,
    pub tpm: Option<i64>,
    pub max_streams: Option<i64>,
    /// USD the period may spend.
    pub budget_usd: Option<f64>,
    /// Tokens (prompt and reply) the period may spend.
    pub budget_tokens: Option<i64>,
    /// `day`, `week`, `month` (calendar, UTC) or `total`.
    pub budget_period: Option<String>,
    pub disabled: bool,
    pub metadata: Option<serde_json::Value>,
}

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
    #[serde(flatten)]
    pub terms: Terms,
    /// Model names, or patterns ending in `*`, the key may use; `None`: every model.
    pub models: Option<Vec<String>>,
    /// The team it belongs to: held by the team's limits and budget too.
    pub team_id: Option<String>,
    #[serde(skip)]
    pub expires_at_us: Option<i64>,
    #[serde(skip)]
    pub revoked_at_us: Option<i64>,
    /// Revoked with its open streams ended.
    #[serde(skip)]
    pub end_streams: bool,
    #[serde(skip)]
    pub created_us: i64,
    #[serde(skip)]
    pub updated_us: i64,
}

/// A team: its keys are held by its limits and budget as well as their own.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Team {
    pub id: String,
    pub name: String,
    #[serde(flatten)]
    pub terms: Terms,
    #[serde(skip)]
    pub deleted_at_us: Option<i64>,
    #[serde(skip)]
    pub created_us: i64,
    #[serde(skip)]
    pub updated_us: i64,
}

/// What a change sets: `Some` fields only (`Some(None)`: cleared). A team's change sets
/// no `models`, `expires_at_us` or `team_id`.
#[derive(Debug, Default, Clone)]
pub struct Change {
    pub name: Option<String>,
    pub rpm: Option<Option<i64>>,
    pub tpm: Option<Option<i64>>,
    pub max_streams: Option<Option<i64>>,
    pub budget_usd: Option<Option<f64>>,
    pub budget_tokens: Option<Option<i64>>,
    pub budget_period: Option<Option<String>>,
    pub disabled: Option<bool>,
    pub metadata: Option<Option<serde_json::Value>>,
    pub models: Option<Option<Vec<String>>>,
    pub expires_at_us: Option<Option<i64>>,
    pub team_id: Option<Option<String>>,
}

/// One value a change binds.
enum Bind {
    Int(Option<i64>),
    Real(Option<f64>),
    Text(Option<String>),
}

impl Change {
    /// The columns it sets, with their values, in one list (the SQL and its binds agree).
    fn sets(&self) -> Vec<(&'static str, Bind)> {
        let mut sets = Vec::new();
        let text = |v: &Option<String>| Bind::Text(v.clone());
        if let Some(name) = &self.name {
            sets.push(("name", Bind::Text(Some(name.clone()))));
        }
        for (column, value) in [
            ("rpm", self.rpm),
            ("tpm", self.tpm),
            ("max_streams", self.max_streams),
            ("budget_tokens", self.budget_tokens),
            ("expires_at_us", self.expires_at_us),
        ] {
            if let Some(value) = value {
                sets.push((column, Bind::Int(value)));
            }
        }
        if let Some(usd) = self.budget_usd {
            sets.push(("budget_usd", Bind::Real(usd)));
        }
        if let Some(period) = &self.budget_period {
            sets.push(("budget_period", text(period)));
        }
        if let Some(team) = &self.team_id {
            sets.push(("team_id", text(team)));
        }
        if let Some(disabled) = self.disabled {
            sets.push(("disabled", Bind::Int(Some(i64::from(disabled)))));
        }
        if let Some(models) = &self.models {
            sets.push(("models", Bind::Text(json(models))));
        }
        if let Some(metadata) = &self.metadata {
            sets.push(("metadata", Bind::Text(json(metadata))));
        }
        sets
    }
}

const KEY_COLUMNS: &str = "id, name, prefix, digest, previous_digest, previous_until_us, rpm, tpm, \
     max_streams, budget_usd, budget_tokens, budget_period, disabled, metadata, models, team_id, \
     expires_at_us, revoked_at_us, end_streams, created_us, updated_us";

const TEAM_COLUMNS: &str = "id, name, rpm, tpm, max_streams, budget_usd, budget_tokens, \
     budget_period, disabled, metadata, deleted_at_us, created_us, updated_us";

/// `query` with a key's or a team's terms bound, in their columns' order.
macro_rules! bind_terms {
    ($query:expr, $terms:expr) => {
        $query
            .bind($terms.rpm)
            .bind($terms.tpm)
            .bind($terms.max_streams)
            .bind($terms.budget_usd)
            .bind($terms.budget_tokens)
            .bind($terms.budget_period.clone())
            .bind(i64::from($terms.disabled))
            .bind(json(&$terms.metadata))
    };
}

/// The terms in a row of either table (of either database's rows).
macro_rules! terms {
    ($row:expr) => {{
        let row = $row;
        let metadata: Option<String> = row.try_get("metadata")?;
        Terms {
            rpm: row.try_get("rpm")?,
            tpm: row.try_get("tpm")?,
            max_streams: row.try_get("max_streams")?,
            budget_usd: row.try_get("budget_usd")?,
            budget_tokens: row.try_get("budget_tokens")?,
            budget_period: row.try_get("budget_period")?,
            disabled: row.try_get::<i64, _>("disabled")? != 0,
            metadata: metadata.and_then(|m| serde_json::from_str(&m).ok()),
        }
    }};
}

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
            "INSERT INTO api_keys ({KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, \
             $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21)"
        );
        let t = &key.terms;
        on!(self, pool => {
            let query = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
                .bind(key.id.clone())
                .bind(key.name.clone())
                .bind(key.prefix.clone())
                .bind(key.digest.clone())
                .bind(key.previous_digest.clone())
                .bind(key.previous_until_us);
            bind_terms!(query, t)
                .bind(json(&key.models))
                .bind(key.team_id.clone())
                .bind(key.expires_at_us)
                .bind(key.revoked_at_us)
                .bind(i64::from(key.end_streams))
                .bind(key.created_us)
                .bind(key.updated_us)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Every key ever made, revoked ones too, oldest first.
    pub async fn keys(&self) -> anyhow::Result<Vec<Key>> {
        let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_us, id");
        let keys = on!(self, pool => {
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql.as_str())).fetch_all(pool).await?;
            rows.iter().map(|row| -> Result<Key, sqlx::Error> {
                let models: Option<String> = row.try_get("models")?;
                Ok(Key {
                    id: row.try_get("id")?,
                    name: row.try_get("name")?,
                    prefix: row.try_get("prefix")?,
                    digest: row.try_get("digest")?,
                    previous_digest: row.try_get("previous_digest")?,
                    previous_until_us: row.try_get("previous_until_us")?,
                    terms: terms!(row),
                    models: models.and_then(|m| serde_json::from_str(&m).ok()),
                    team_id: row.try_get("team_id")?,
                    expires_at_us: row.try_get("expires_at_us")?,
                    revoked_at_us: row.try_get("revoked_at_us")?,
                    end_streams: row.try_get::<i64, _>("end_streams")? != 0,
                    created_us: row.try_get("created_us")?,
                    updated_us: row.try_get("updated_us")?,
                })
            }).collect::<Result<Vec<_>, _>>()?
        });
        Ok(keys)
    }

    /// Stores a new team.
    pub async fn create_team(&self, team: &Team) -> anyhow::Result<()> {
        let sql = format!(
            "INSERT INTO teams ({TEAM_COLUMNS}) VALUES \
             ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
        );
        let t = &team.terms;
        on!(self, pool => {
            let query = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
                .bind(team.id.clone())
                .bind(team.name.clone());
            bind_terms!(query, t)
                .bind(team.deleted_at_us)
                .bind(team.created_us)
                .bind(team.updated_us)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Every team not deleted, oldest first.
    pub async fn teams(&self) -> anyhow::Result<Vec<Team>> {
        let sql = format!(
            "SELECT {TEAM_COLUMNS} FROM teams WHERE deleted_at_us IS NULL ORDER BY created_us, id"
        );
        let teams = on!(self, pool => {
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql.as_str())).fetch_all(pool).await?;
            rows.iter().map(|row| -> Result<Team, sqlx::Error> {
                Ok(Team {
                    id: row.try_get("id")?,
                    name: row.try_get("name")?,
                    terms: terms!(row),
                    deleted_at_us: row.try_get("deleted_at_us")?,
                    created_us: row.try_get("created_us")?,
                    updated_us: row.try_get("updated_us")?,
                })
            }).collect::<Result<Vec<_>, _>>()?
        });
        Ok(teams)
    }

    /// Deletes team `id` at `now_us` when no live key belongs to it: `Ok(None)` when it
    /// was not there, `Ok(Some(n))` with the live keys that keep it.
    pub async fn delete_team(&self, id: &str, now_us: i64) -> anyhow::Result<Option<i64>> {
        let count =
            "SELECT COUNT(*) AS n FROM api_keys WHERE team_id = $1 AND revoked_at_us IS NULL";
        let delete = "UPDATE teams SET deleted_at_us = $1, updated_us = $1 \
                      WHERE id = $2 AND deleted_at_us IS NULL";
        let outcome = on!(self, pool => {
            let mut tx = pool.begin().await?;
            let keys: i64 = sqlx::query(count).bind(id.to_owned()).fetch_one(&mut *tx).await?.try_get("n")?;
            if keys > 0 {
                Some(keys)
            } else {
                let n = sqlx::query(delete).bind(now_us).bind(id.to_owned()).execute(&mut *tx).await?.rows_affected();
                tx.commit().await?;
                (n > 0).then_some(0)
            }
        });
        Ok(outcome)
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

    /// What a key (`team`: a team) of this name has spent since `from_us`, by the
    /// ledger: USD and tokens (prompt and reply).
    pub async fn spent(&self, team: bool, name: &str, from_us: i64) -> anyhow::Result<(f64, i64)> {
        let sql = if team {
            "SELECT CAST(COALESCE(SUM(cost_usd), 0) AS DOUBLE PRECISION) AS usd, \
             CAST(COALESCE(SUM(input_tokens + output_tokens), 0) AS BIGINT) AS tokens \
             FROM requests WHERE team = $1 AND at_us >= $2"
        } else {
            "SELECT CAST(COALESCE(SUM(cost_usd), 0) AS DOUBLE PRECISION) AS usd, \
             CAST(COALESCE(SUM(input_tokens + output_tokens), 0) AS BIGINT) AS tokens \
             FROM requests WHERE key_name = $1 AND at_us >= $2"
        };
        let spent = on!(self, pool => {
            let row = sqlx::query(sql).bind(name.to_owned()).bind(from_us).fetch_one(pool).await?;
            (row.try_get::<f64, _>("usd")?, row.try_get::<i64, _>("tokens")?)
        });
        Ok(spent)
    }

    /// The keys' and teams' version: their number and their latest change. Polled every
    /// second.
    pub async fn keys_version(&self) -> anyhow::Result<(i64, i64)> {
        let sql = "SELECT CAST((SELECT COUNT(*) FROM api_keys) + (SELECT COUNT(*) FROM teams) AS BIGINT) AS n, \
                   CAST(COALESCE((SELECT MAX(updated_us) FROM api_keys), 0) \
                   + COALESCE((SELECT MAX(updated_us) FROM teams), 0) AS BIGINT) AS at";
        let version = on!(self, pool => {
            let row = sqlx::query(sql).fetch_one(pool).await?;
            (row.try_get::<i64, _>("n")?, row.try_get::<i64, _>("at")?)
        });
        Ok(version)
    }

    /// Applies `change` to key `id` (not revoked) at `now_us`: whether there was one.
    pub async fn change_key(&self, id: &str, change: &Change, now_us: i64) -> anyhow::Result<bool> {
        self.change("api_keys", "revoked_at_us", id, change, now_us)
            .await
    }

    /// Applies `change` to team `id` (not deleted) at `now_us`: whether there was one.
    pub async fn change_team(
        &self,
        id: &str,
        change: &Change,
        now_us: i64,
    ) -> anyhow::Result<bool> {
        self.change("teams", "deleted_at_us", id, change, now_us)
            .await
    }

    /// One UPDATE of the row `id` of `table` whose `ended` column is unset: changes are
    /// applied one at a time, in the order they reach the database, each to the row as the
    /// last one left it (no read-modify-write, so none is lost).
    async fn change(
        &self,
        table: &str,
        ended: &str,
        id: &str,
        change: &Change,
        now_us: i64,
    ) -> anyhow::Result<bool> {
        let mut sets = change.sets();
        sets.push(("updated_us", Bind::Int(Some(now_us))));
        let assigned: Vec<String> = sets
            .iter()
            .enumerate()
            .map(|(i, (column, _))| format!("{column} = ${}", i + 1))
            .collect();
        let sql = format!(
            "UPDATE {table} SET {} WHERE id = ${} AND {ended} IS NULL",
            assigned.join(", "),
            sets.len() + 1
        );
        let changed = on!(self, pool => {
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()));
            for (_, value) in sets {
                query = match value {
                    Bind::Int(v) => query.bind(v),
                    Bind::Real(v) => query.bind(v),
                    Bind::Text(v) => query.bind(v),
                };
            }
            query.bind(id.to_owned()).execute(pool).await?.rows_affected()
        });
        Ok(changed > 0)
    }

    /// Revokes key `id` at `now_us` (`end_streams`: its open streams end too): whether it
    /// was live.
    pub async fn revoke_key(
        &self,
        id: &str,
        end_streams: bool,
        now_us: i64,
    ) -> anyhow::Result<bool> {
        let sql = "UPDATE api_keys SET revoked_at_us = $1, updated_us = $1, end_streams = $2 \
                   WHERE id = $3 AND revoked_at_us IS NULL";
        let changed = on!(self, pool => {
            sqlx::query(sql)
                .bind(now_us)
                .bind(i64::from(end_streams))
                .bind(id.to_owned())
                .execute(pool)
                .await?
                .rows_affected()
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
