//! `AppState`: everything a request needs, built once at start-up from the configuration.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::admission::{Admission, ApiKey, SharedLimits};
use crate::backend::mock::{self, MockBackend};
use crate::backend::openai::OpenAiBackend;
use crate::backend::{Backend, Route, Routes, Target};
use crate::config::{Config, DEFAULT_LOCAL_MODEL, DEFAULT_OPENAI_BASE_URL, ModelRoute};
use crate::metrics::Metrics;
use crate::prompts::Prompts;
use crate::relay::Timeouts;

#[derive(Clone)]
pub struct AppState {
    pub admission: Arc<Admission>,
    pub routes: Routes,
    pub prompts: Prompts,
    pub metrics: Metrics,
    pub timeouts: Timeouts,
    pub keep_alive: Duration,
    /// A client that takes nothing of its stream for this long is dropped.
    pub slow_client_timeout: Duration,
    /// Cancelled when the shutdown grace period is over: open streams end, saying so.
    pub closing: CancellationToken,
}

impl AppState {
    /// Builds the state, or says what in the configuration is wrong.
    pub fn build(config: &Config) -> anyhow::Result<Self> {
        let metrics = Metrics::new();
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
                OpenAiBackend::new(base, key, config.connect_timeout())
                    .context("OPENAI_BASE_URL")?,
            ) as Arc<dyn Backend>),
            None => None,
        };

        let file = config.file()?;
        let defaults = config.default_limits();
        let mut keys: Vec<ApiKey> = config
            .api_keys
            .iter()
            .map(|k| k.trim())
            .filter(|k| !k.is_empty())
            .enumerate()
            .map(|(i, secret)| ApiKey {
                name: format!("key-{}", i + 1),
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
        let shared = config.redis_url.as_ref().map(|url| SharedLimits {
            redis_url: url.clone(),
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

        let mut named = HashMap::new();
        for (name, route) in file.models {
            let mut targets = vec![target(config, &name, &route, &mock)?];
            for fallback in &route.fallbacks {
                targets.push(target(config, &name, fallback, &mock)?);
            }
            named.insert(
                name,
                Route {
                    targets: targets.into(),
                },
            );
        }

        let mut default_model = String::from("mock");
        if let Some((name, route)) = local_route(config, &metrics)? {
            default_model.clone_from(&name);
            named.insert(name, route);
        }

        let prompts = if config.prompts.is_dir() {
            Prompts::load(&config.prompts).context("SLUICE_PROMPTS")?
        } else {
            tracing::warn!(
                folder = %config.prompts.display(),
                "no prompts folder: /api/prompts is empty (set SLUICE_PROMPTS)"
            );
            Prompts::empty()
        };

        // The tokenizer's tables take a moment to build: pay it now, not on a first request.
        crate::tokens::text("warm up");

        Ok(AppState {
            admission,
            routes: Routes::new(named, mock, default_upstream, default_model),
            prompts,
            metrics,
            timeouts: Timeouts {
                first_token: config.first_token_timeout(),
                idle: config.idle_timeout(),
                total: config.total_timeout(),
            },
            keep_alive: config.keep_alive(),
            slow_client_timeout: config.slow_client_timeout(),
            closing: CancellationToken::new(),
        })
    }
}

/// One upstream of a configured route: the mock, or an OpenAI-compatible server.
fn target(
    config: &Config,
    name: &str,
    route: &ModelRoute,
    mock: &Arc<dyn Backend>,
) -> anyhow::Result<Target> {
    let model = route.model.clone().unwrap_or_else(|| name.to_owned());
    if route.backend == "mock" {
        return Ok(Target {
            backend: mock.clone(),
            model,
        });
    }
    let base = route
        .base_url
        .as_deref()
        .or(config.openai_base_url.as_deref())
        .unwrap_or(DEFAULT_OPENAI_BASE_URL);
    let key = match &route.api_key_env {
        Some(var) => std::env::var(var).ok(),
        None => config.openai_api_key.clone(),
    };
    let backend = OpenAiBackend::new(base, key.as_deref(), config.connect_timeout())
        .with_context(|| format!("SLUICE_CONFIG: model {name:?}"))?;
    Ok(Target {
        backend: Arc::new(backend),
        model,
    })
}

/// The in-process model's route, when its weights are there. A path that was set must
/// exist; the default one may be missing, and then one log line says how to fetch it.
fn local_route(config: &Config, metrics: &Metrics) -> anyhow::Result<Option<(String, Route)>> {
    let path = config
        .local_model
        .clone()
        .unwrap_or_else(|| DEFAULT_LOCAL_MODEL.into());
    if path.as_os_str() == "off" {
        return Ok(None);
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
        use crate::backend::local::{LocalBackend, MODEL_NAME};
        let backend =
            LocalBackend::start(&path, config.local_queue as usize, metrics.local_tokens())?;
        Ok(Some((
            MODEL_NAME.to_owned(),
            Route::to(Arc::new(backend), MODEL_NAME),
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
