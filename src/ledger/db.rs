//! The ledger's database: SQLite or PostgreSQL, one SQL for both (`$n` parameters, types
//! both read alike), with the migrations in `migrations/` built into the binary and run at
//! connection.

use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row};

use super::Record;
use super::report::{Filter, Grouped, Usage};

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How long a write waits for a connection before the database counts as down.
const ACQUIRE: Duration = Duration::from_secs(3);

/// The database a ledger writes to.
#[derive(Clone, Debug)]
pub enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// The columns a record fills, in order.
const COLUMNS: &str = "id, request_id, at_us, instance, key_name, team, route, model, served_model, \
     target, api, stream_id, outcome, error, input_tokens, cached_tokens, cache_write_tokens, \
     output_tokens, reasoning_tokens, cost_usd, ttft_ms, duration_ms, trace_id";

/// Whether `url` names a database sluice can write to (else no attempt can succeed).
pub fn known(url: &str) -> bool {
    ["sqlite:", "postgres://", "postgresql://"]
        .iter()
        .any(|scheme| url.starts_with(scheme))
}

impl Db {
    /// Connects to `url` (`sqlite://path`, `postgres://…`) and brings its schema up to date.
    pub async fn open(url: &str) -> anyhow::Result<Db> {
        let db = if let Some(rest) = url.strip_prefix("sqlite:") {
            let options = SqliteConnectOptions::from_str(&format!("sqlite:{rest}"))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                // In WAL mode a commit survives sluice's crash; only the system's crash
                // may lose the last ones, and each commit does not wait on the disk.
                .synchronous(SqliteSynchronous::Normal)
                // The ledger appends and reports scan: a small page cache serves both
                // (SQLite's default is 2 MiB a connection, in sluice's memory).
                .pragma("cache_size", "-512")
                .busy_timeout(ACQUIRE);
            let pool = SqlitePoolOptions::new()
                .max_connections(2)
                .acquire_timeout(ACQUIRE)
                .connect_with(options)
                .await
                .context("opening the SQLite file")?;
            Db::Sqlite(pool)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = PgPoolOptions::new()
                .max_connections(2)
                .acquire_timeout(ACQUIRE)
                .connect(url)
                .await
                .context("connecting to PostgreSQL")?;
            Db::Postgres(pool)
        } else {
            bail!("SLUICE_DATABASE_URL: not sqlite://, postgres:// or off");
        };
        // Two processes starting on one SQLite file may both migrate it at once (SQLite has
        // no lock for that, PostgreSQL does): the one that loses tries again, and finds it
        // done.
        let mut tries = 0;
        loop {
            match on!(&db, pool => MIGRATIONS.run(pool).await) {
                Ok(()) => return Ok(db),
                Err(_) if tries < 5 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e).context("migrating the ledger's schema"),
            }
        }
    }

    /// Writes `records` in one statement; one already there (by id) is left as it is.
    pub async fn insert(&self, instance: &str, records: &[Record]) -> anyhow::Result<()> {
        on!(self, pool => {
            let mut query = QueryBuilder::new(format!("INSERT INTO requests ({COLUMNS}) "));
            query.push_values(records, |mut row, r| {
                row.push_bind(r.id.clone())
                    .push_bind(r.request_id.clone())
                    .push_bind(r.at_us)
                    .push_bind(instance.to_owned())
                    .push_bind(r.key.clone())
                    .push_bind(r.team.clone())
                    .push_bind(r.route.clone())
                    .push_bind(r.model.clone())
                    .push_bind(r.served_model.clone())
                    .push_bind(r.target.clone())
                    .push_bind(r.api.clone())
                    .push_bind(r.stream_id.clone())
                    .push_bind(r.outcome.clone())
                    .push_bind(r.error.clone())
                    .push_bind(r.input_tokens)
                    .push_bind(r.cached_tokens)
                    .push_bind(r.cache_write_tokens)
                    .push_bind(r.output_tokens)
                    .push_bind(r.reasoning_tokens)
                    .push_bind(r.cost_usd)
                    .push_bind(r.ttft_ms)
                    .push_bind(r.duration_ms)
                    .push_bind(r.trace_id.clone());
            });
            query.push(" ON CONFLICT (id) DO NOTHING");
            // Not kept prepared: each batch size is its own statement of thousands of
            // parameters, and a cache of them would hold memory for nothing.
            query.build().persistent(false).execute(pool).await?;
        });
        Ok(())
    }

    /// Requests, tokens and cost in `filter`'s time, in groups.
    pub async fn usage(&self, filter: &Filter, group: &[Grouped]) -> anyhow::Result<Vec<Usage>> {
        let keys: Vec<String> = group
            .iter()
            .enumerate()
            .map(|(i, g)| format!("{} AS g{i}", g.column()))
            .collect();
        let mut sql = String::from("SELECT ");
        for key in &keys {
            sql.push_str(key);
            sql.push_str(", ");
        }
        sql.push_str(
            "COUNT(*) AS requests, \
             CAST(COALESCE(SUM(input_tokens), 0) AS BIGINT) AS input_tokens, \
             CAST(COALESCE(SUM(cached_tokens), 0) AS BIGINT) AS cached_tokens, \
             CAST(COALESCE(SUM(cache_write_tokens), 0) AS BIGINT) AS cache_write_tokens, \
             CAST(COALESCE(SUM(output_tokens), 0) AS BIGINT) AS output_tokens, \
             CAST(COALESCE(SUM(reasoning_tokens), 0) AS BIGINT) AS reasoning_tokens, \
             CAST(COALESCE(SUM(cost_usd), 0) AS DOUBLE PRECISION) AS cost_usd, \
             CAST(SUM(CASE WHEN cost_usd IS NULL THEN 1 ELSE 0 END) AS BIGINT) AS unpriced \
             FROM requests WHERE at_us >= $1 AND at_us < $2",
        );
        if filter.key.is_some() {
            sql.push_str(" AND key_name = $3");
        }
        if !group.is_empty() {
            let by: Vec<String> = (0..group.len()).map(|i| format!("g{i}")).collect();
            sql.push_str(&format!(" GROUP BY {0} ORDER BY {0}", by.join(", ")));
        }
        let usage = on!(self, pool => {
            // Built from constants and the whitelisted columns of `Grouped`; values are bound.
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql.as_str())).bind(filter.from_us).bind(filter.to_us);
            if let Some(key) = &filter.key {
                query = query.bind(key.clone());
            }
            let rows = query.fetch_all(pool).await?;
            rows.iter()
                .map(|row| {
                    let mut values = Vec::with_capacity(group.len());
                    for (i, g) in group.iter().enumerate() {
                        let column = format!("g{i}");
                        values.push(match g {
                            Grouped::Day => row
                                .try_get::<Option<i64>, _>(column.as_str())?
                                .map(super::report::day),
                            _ => row.try_get::<Option<String>, _>(column.as_str())?,
                        });
                    }
                    Ok(Usage {
                        group: values,
                        requests: row.try_get("requests")?,
                        input_tokens: row.try_get("input_tokens")?,
                        cached_tokens: row.try_get("cached_tokens")?,
                        cache_write_tokens: row.try_get("cache_write_tokens")?,
                        output_tokens: row.try_get("output_tokens")?,
                        reasoning_tokens: row.try_get("reasoning_tokens")?,
                        cost_usd: row.try_get("cost_usd")?,
                        unpriced: row.try_get("unpriced")?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()?
        });
        Ok(usage)
    }

    /// Records in `filter`'s time, newest first, `limit` of them after the record `after`.
    pub async fn requests(
        &self,
        filter: &Filter,
        after: Option<&str>,
        limit: i64,
    ) -> anyhow::Result<Vec<(Record, String)>> {
        let mut sql =
            format!("SELECT {COLUMNS}, instance FROM requests WHERE at_us >= $1 AND at_us < $2");
        let mut n = 2;
        if filter.key.is_some() {
            n += 1;
            sql.push_str(&format!(" AND key_name = ${n}"));
        }
        if after.is_some() {
            n += 1;
            sql.push_str(&format!(
                " AND (at_us < (SELECT at_us FROM requests WHERE id = ${n}) \
                 OR (at_us = (SELECT at_us FROM requests WHERE id = ${n}) AND id < ${n}))"
            ));
        }
        n += 1;
        sql.push_str(&format!(" ORDER BY at_us DESC, id DESC LIMIT ${n}"));
        let records = on!(self, pool => {
            // Built from constants and the whitelisted columns of `Grouped`; values are bound.
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql.as_str())).bind(filter.from_us).bind(filter.to_us);
            if let Some(key) = &filter.key {
                query = query.bind(key.clone());
            }
            if let Some(after) = after {
                query = query.bind(after.to_owned());
            }
            let rows = query.bind(limit).fetch_all(pool).await?;
            rows.iter()
                .map(|row| {
                    let record = Record {
                        id: row.try_get("id")?,
                        request_id: row.try_get("request_id")?,
                        at_us: row.try_get("at_us")?,
                        key: row.try_get("key_name")?,
                        team: row.try_get("team")?,
                        route: row.try_get("route")?,
                        model: row.try_get("model")?,
                        served_model: row.try_get("served_model")?,
                        target: row.try_get("target")?,
                        api: row.try_get("api")?,
                        stream_id: row.try_get("stream_id")?,
                        outcome: row.try_get("outcome")?,
                        error: row.try_get("error")?,
                        input_tokens: row.try_get("input_tokens")?,
                        cached_tokens: row.try_get("cached_tokens")?,
                        cache_write_tokens: row.try_get("cache_write_tokens")?,
                        output_tokens: row.try_get("output_tokens")?,
                        reasoning_tokens: row.try_get("reasoning_tokens")?,
                        cost_usd: row.try_get("cost_usd")?,
                        ttft_ms: row.try_get("ttft_ms")?,
                        duration_ms: row.try_get("duration_ms")?,
                        trace_id: row.try_get("trace_id")?,
                    };
                    Ok((record, row.try_get("instance")?))
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()?
        });
        Ok(records)
    }
}

/// `url` with any password masked, for logs and `/readyz`.
pub fn masked(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}
