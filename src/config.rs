//! Configuration: flags and environment variables (names fixed by DESIGN.md), plus the TOML
//! file for what does not fit a variable (model routes). Read and checked once at start-up.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;
use serde::Deserialize;

pub const DEFAULT_OPENAI_BASE_URL: &str = "https://api.openai.com/v1";
pub const DEFAULT_LOCAL_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// sluice: an LLM token-streaming gateway. Every flag can also be set by its variable, in
/// the environment or in `.env`.
#[derive(Debug, Clone, Parser)]
#[command(name = "sluice", version, about)]
pub struct Config {
    /// Listen address.
    #[arg(
        long,
        env = "SLUICE_ADDR",
        value_name = "SLUICE_ADDR",
        default_value = "127.0.0.1:3000"
    )]
    pub addr: SocketAddr,

    /// Key for the default upstream.
    #[arg(
        long,
        env = "OPENAI_API_KEY",
        value_name = "OPENAI_API_KEY",
        hide_env_values = true
    )]
    pub openai_api_key: Option<String>,

    /// Base URL of the default upstream (OpenAI, vLLM, Ollama, llama.cpp server...). Setting
    /// it, or OPENAI_API_KEY, turns the default upstream on.
    #[arg(long, env = "OPENAI_BASE_URL", value_name = "OPENAI_BASE_URL", value_parser = http_url)]
    pub openai_base_url: Option<String>,

    /// The TOML config (model routes); `sluice.toml` is read when present.
    #[arg(long = "config", env = "SLUICE_CONFIG", value_name = "SLUICE_CONFIG")]
    pub config: Option<PathBuf>,

    /// Limit on connecting to an upstream, in milliseconds.
    #[arg(long, env = "SLUICE_CONNECT_TIMEOUT_MS", value_name = "SLUICE_CONNECT_TIMEOUT_MS",
          default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub connect_timeout_ms: u64,

    /// Limit on waiting for the first token, in milliseconds.
    #[arg(long, env = "SLUICE_FIRST_TOKEN_TIMEOUT_MS", value_name = "SLUICE_FIRST_TOKEN_TIMEOUT_MS",
          default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub first_token_timeout_ms: u64,

    /// Limit on silence between two chunks, in milliseconds.
    #[arg(long, env = "SLUICE_IDLE_TIMEOUT_MS", value_name = "SLUICE_IDLE_TIMEOUT_MS",
          default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout_ms: u64,

    /// Seconds between keep-alive comments on a silent stream.
    #[arg(long, env = "SLUICE_KEEPALIVE_S", value_name = "SLUICE_KEEPALIVE_S",
          default_value_t = 15.0, value_parser = positive_seconds)]
    pub keepalive_s: f64,

    /// Pace of the mock model in tokens per second; 0 sends as fast as the client reads.
    #[arg(long, env = "SLUICE_MOCK_TOKENS_PER_S", value_name = "SLUICE_MOCK_TOKENS_PER_S",
          default_value_t = 30.0, value_parser = non_negative)]
    pub mock_tokens_per_s: f64,

    /// TOML file of scripted mock replies (`[[reply]] pattern = "..." reply = "..."`).
    #[arg(
        long,
        env = "SLUICE_MOCK_FIXTURES",
        value_name = "SLUICE_MOCK_FIXTURES"
    )]
    pub mock_fixtures: Option<PathBuf>,

    /// GGUF file of the in-process model [default: models/SmolLM2-135M-Instruct.Q4_1.gguf,
    /// used when present]; `off` for none.
    #[arg(long, env = "SLUICE_LOCAL_MODEL", value_name = "SLUICE_LOCAL_MODEL")]
    pub local_model: Option<PathBuf>,

    /// Requests that may wait for the local model; more are refused with 503.
    #[arg(long, env = "SLUICE_LOCAL_QUEUE", value_name = "SLUICE_LOCAL_QUEUE",
          default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub local_queue: u32,

    /// Folder of prompt templates.
    #[arg(
        long,
        env = "SLUICE_PROMPTS",
        value_name = "SLUICE_PROMPTS",
        default_value = "prompts"
    )]
    pub prompts: PathBuf,

    /// Log filter (`info`, `sluice=debug,...`); `json` for JSON lines at info.
    #[arg(
        long,
        env = "SLUICE_LOG",
        value_name = "SLUICE_LOG",
        default_value = "info"
    )]
    pub log: String,
}

fn http_url(value: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(value).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("must be an http:// or https:// URL".into());
    }
    Ok(value.trim_end_matches('/').to_owned())
}

fn non_negative(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err("must be a number of 0 or more".into()),
    }
}

fn positive_seconds(value: &str) -> Result<f64, String> {
    match non_negative(value) {
        Ok(v) if v > 0.0 => Ok(v),
        _ => Err("must be a number of seconds above 0".into()),
    }
}

impl Config {
    /// Defaults only, as if nothing were set: for tests and embedding.
    pub fn defaults() -> Self {
        Config::parse_from(["sluice"])
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub fn first_token_timeout(&self) -> Duration {
        Duration::from_millis(self.first_token_timeout_ms)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    pub fn keep_alive(&self) -> Duration {
        Duration::from_secs_f64(self.keepalive_s)
    }

    /// The default upstream, when one is configured: its base URL and key.
    pub fn default_upstream(&self) -> Option<(&str, Option<&str>)> {
        if self.openai_api_key.is_none() && self.openai_base_url.is_none() {
            return None;
        }
        let base = self
            .openai_base_url
            .as_deref()
            .unwrap_or(DEFAULT_OPENAI_BASE_URL);
        Some((base, self.openai_api_key.as_deref()))
    }

    /// The TOML config: `SLUICE_CONFIG` (which must exist), else `sluice.toml` if present.
    pub fn file(&self) -> anyhow::Result<FileConfig> {
        let path = match &self.config {
            Some(path) => path.clone(),
            None if Path::new("sluice.toml").exists() => PathBuf::from("sluice.toml"),
            None => return Ok(FileConfig::default()),
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("SLUICE_CONFIG: cannot read {}", path.display()))?;
        let file: FileConfig = toml::from_str(&text)
            .with_context(|| format!("SLUICE_CONFIG: {} is not valid", path.display()))?;
        file.validate()
            .with_context(|| format!("SLUICE_CONFIG: {}", path.display()))?;
        Ok(file)
    }
}

/// What the TOML config holds.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Model name → where it goes.
    #[serde(default)]
    pub models: BTreeMap<String, ModelRoute>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRoute {
    /// `openai` (any OpenAI-compatible server) or `mock`.
    #[serde(default = "default_backend")]
    pub backend: String,
    /// Base URL; the default upstream's when absent.
    pub base_url: Option<String>,
    /// Name of the environment variable that holds this upstream's key.
    pub api_key_env: Option<String>,
    /// The model's name at the upstream; the route's own name when absent.
    pub model: Option<String>,
}

fn default_backend() -> String {
    "openai".into()
}

impl FileConfig {
    fn validate(&self) -> anyhow::Result<()> {
        for (name, route) in &self.models {
            match route.backend.as_str() {
                "openai" => {}
                "mock" => {
                    let target = route.model.as_deref().unwrap_or("mock");
                    if crate::backend::mock::Mode::from_model(target).is_none() {
                        bail!("model {name:?}: the mock backend has no model {target:?}");
                    }
                }
                other => bail!("model {name:?}: unknown backend {other:?} (openai or mock)"),
            }
            if let Some(url) = &route.base_url {
                http_url(url).map_err(|e| anyhow::anyhow!("model {name:?}: base_url {e}"))?;
            }
            if let Some(var) = &route.api_key_env
                && std::env::var(var).is_err()
            {
                bail!("model {name:?}: api_key_env names {var}, which is not set");
            }
        }
        Ok(())
    }
}
