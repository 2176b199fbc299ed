//! Configuration: flags and environment variables (names fixed by DESIGN.md), plus the TOML
//! file for what does not fit a variable (model routes, pools, keys). Read and checked at
//! start-up; the file again on a reload (SIGHUP, `SLUICE_CONFIG_WATCH`).

use std::collections::{BTreeMap, HashSet};
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

    /// Keys clients must present as `Authorization: Bearer <key>`, comma-separated; unset
    /// (and no keys in the TOML config): open, each client known by its IP.
    #[arg(
        long,
        env = "SLUICE_API_KEYS",
        value_name = "SLUICE_API_KEYS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub api_keys: Vec<String>,

    /// Requests per minute per client.
    #[arg(long, env = "SLUICE_RPM", value_name = "SLUICE_RPM", default_value_t = 600,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub rpm: u32,

    /// Requests a client may make at once before the per-minute pace applies [default: SLUICE_RPM].
    #[arg(long, env = "SLUICE_RPM_BURST", value_name = "SLUICE_RPM_BURST",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub rpm_burst: Option<u32>,

    /// Tokens per minute per client (prompt and reply); unset: unlimited.
    #[arg(long, env = "SLUICE_TPM", value_name = "SLUICE_TPM",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub tpm: Option<u32>,

    /// Concurrent streams per client.
    #[arg(long, env = "SLUICE_MAX_STREAMS", value_name = "SLUICE_MAX_STREAMS", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams: u32,

    /// Concurrent streams in all.
    #[arg(long, env = "SLUICE_GLOBAL_MAX_STREAMS", value_name = "SLUICE_GLOBAL_MAX_STREAMS",
          default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub global_max_streams: u32,

    /// Redis that shares limits across instances (`redis://host:6379`); unset: in-process.
    #[arg(
        long,
        env = "SLUICE_REDIS_URL",
        value_name = "SLUICE_REDIS_URL",
        hide_env_values = true
    )]
    pub redis_url: Option<String>,

    /// When Redis cannot be reached: `open` (this instance's own limits apply, with a
    /// warning and a metric) or `closed` (503).
    #[arg(long, env = "SLUICE_REDIS_FAILURE", value_name = "SLUICE_REDIS_FAILURE",
          default_value = "open", value_parser = ["open", "closed"])]
    pub redis_failure: String,

    /// Proxies (addresses or CIDR ranges, comma-separated) whose `X-Forwarded-For` is believed.
    #[arg(long, env = "SLUICE_TRUSTED_PROXIES", value_name = "SLUICE_TRUSTED_PROXIES",
          value_delimiter = ',', value_parser = ip_net)]
    pub trusted_proxies: Vec<ipnet::IpNet>,

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

    /// Limit on a whole reply, from the upstream call to its last chunk, in milliseconds.
    #[arg(long, env = "SLUICE_TOTAL_TIMEOUT_MS", value_name = "SLUICE_TOTAL_TIMEOUT_MS",
          default_value_t = 600_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub total_timeout_ms: u64,

    /// A client that takes nothing of its stream for this long, in milliseconds, is dropped
    /// and its upstream request cancelled.
    #[arg(long, env = "SLUICE_SLOW_CLIENT_TIMEOUT_MS", value_name = "SLUICE_SLOW_CLIENT_TIMEOUT_MS",
          default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub slow_client_timeout_ms: u64,

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

    /// Sequences the local model decodes together.
    #[arg(long, env = "SLUICE_LOCAL_BATCH", value_name = "SLUICE_LOCAL_BATCH",
          default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub local_batch: u32,

    /// The local model's context in tokens, at most what its file says.
    #[arg(long, env = "SLUICE_LOCAL_CONTEXT", value_name = "SLUICE_LOCAL_CONTEXT",
          default_value_t = 8192, value_parser = clap::value_parser!(u32).range(16..))]
    pub local_context: u32,

    /// Memory for the local model's kept prefixes (their keys and values), in MiB; 0 keeps none.
    #[arg(
        long,
        env = "SLUICE_LOCAL_CACHE_MB",
        value_name = "SLUICE_LOCAL_CACHE_MB",
        default_value_t = 256
    )]
    pub local_cache_mb: u32,

    /// Folder of prompt templates [default: `prompts` when that folder exists, else the
    /// templates built into the binary].
    #[arg(long, env = "SLUICE_PROMPTS", value_name = "SLUICE_PROMPTS")]
    pub prompts: Option<PathBuf>,

    /// Limit on reading a request's headers (and an idle connection's wait for its next
    /// request), and then on reading its body, in milliseconds.
    #[arg(long, env = "SLUICE_HEADER_TIMEOUT_MS", value_name = "SLUICE_HEADER_TIMEOUT_MS",
          default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_timeout_ms: u64,

    /// Open client connections at most [default: from the descriptor limit, leaving room
    /// for upstream sockets]; more wait to be accepted.
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS", value_name = "SLUICE_MAX_CONNECTIONS",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: Option<u32>,

    /// Open client connections from one address at most (IPv6: one /64); trusted proxies
    /// are exempt. More are closed as they arrive.
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS_PER_IP", value_name = "SLUICE_MAX_CONNECTIONS_PER_IP",
          default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_ip: u32,

    /// PEM certificate chain: with SLUICE_TLS_KEY, serve HTTPS (HTTP/2 and 1.1 by ALPN).
    #[arg(long, env = "SLUICE_TLS_CERT", value_name = "SLUICE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of SLUICE_TLS_CERT.
    #[arg(long, env = "SLUICE_TLS_KEY", value_name = "SLUICE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// Origins allowed to call the API from a browser, comma-separated
    /// (`https://app.example`); unset: same origin only.
    #[arg(long, env = "SLUICE_CORS_ORIGINS", value_name = "SLUICE_CORS_ORIGINS",
          value_delimiter = ',', value_parser = origin)]
    pub cors_origins: Vec<String>,

    /// Bearer token that `/metrics` and `/readyz` require; unset: open.
    #[arg(
        long,
        env = "SLUICE_METRICS_TOKEN",
        value_name = "SLUICE_METRICS_TOKEN",
        hide_env_values = true
    )]
    pub metrics_token: Option<String>,

    /// The ledger's database: `sqlite://path` (created when missing), `postgres://…` (what
    /// several instances share), or `off`.
    #[arg(
        long,
        env = "SLUICE_DATABASE_URL",
        value_name = "SLUICE_DATABASE_URL",
        default_value = "sqlite://sluice.db",
        hide_env_values = true
    )]
    pub database_url: String,

    /// Bearer key of the `/admin` API (reports); it cannot call inference. Unset: no admin
    /// routes.
    #[arg(
        long,
        env = "SLUICE_ADMIN_KEY",
        value_name = "SLUICE_ADMIN_KEY",
        hide_env_values = true
    )]
    pub admin_key: Option<String>,

    /// A JSON price file in the format of LiteLLM's `model_prices_and_context_window.json`
    /// (read at start and on reload, never fetched); the TOML config's `[prices]` win.
    #[arg(long, env = "SLUICE_PRICES", value_name = "SLUICE_PRICES")]
    pub prices: Option<PathBuf>,

    /// Cap on a non-streamed reply assembled from an upstream, in bytes.
    #[arg(long, env = "SLUICE_MAX_REPLY_BYTES", value_name = "SLUICE_MAX_REPLY_BYTES",
          default_value_t = 16 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_reply_bytes: u64,

    /// Seconds a resumable stream runs on with no client attached, waiting for one to
    /// reconnect; 0 turns resumption off.
    #[arg(long, env = "SLUICE_RESUME_GRACE_S", value_name = "SLUICE_RESUME_GRACE_S",
          default_value_t = 30.0, value_parser = non_negative)]
    pub resume_grace_s: f64,

    /// Seconds a finished resumable stream stays readable.
    #[arg(long, env = "SLUICE_RESUME_TTL_S", value_name = "SLUICE_RESUME_TTL_S",
          default_value_t = 300.0, value_parser = positive_seconds)]
    pub resume_ttl_s: f64,

    /// Memory for stream logs in this instance, in MiB (fractions allowed); past it, new
    /// streams are served without resumption.
    #[arg(long, env = "SLUICE_RESUME_MEMORY_MB", value_name = "SLUICE_RESUME_MEMORY_MB",
          default_value_t = 64.0, value_parser = positive)]
    pub resume_memory_mb: f64,

    /// The part of SLUICE_RESUME_MEMORY_MB one client's stream logs may hold, from 0 to 1.
    #[arg(long, env = "SLUICE_RESUME_CLIENT_SHARE", value_name = "SLUICE_RESUME_CLIENT_SHARE",
          default_value_t = 0.25, value_parser = fraction)]
    pub resume_client_share: f64,

    /// Connections reading one stored stream at once.
    #[arg(long, env = "SLUICE_MAX_READERS", value_name = "SLUICE_MAX_READERS", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_readers: u32,

    /// Seconds open streams may run on after SIGTERM or Ctrl-C.
    #[arg(
        long,
        env = "SLUICE_SHUTDOWN_GRACE_S",
        value_name = "SLUICE_SHUTDOWN_GRACE_S",
        default_value_t = 10
    )]
    pub shutdown_grace_s: u64,

    /// `1`: read the TOML config again when the file changes (SIGHUP always does).
    #[arg(long, env = "SLUICE_CONFIG_WATCH", value_name = "SLUICE_CONFIG_WATCH",
          default_value = "0", value_parser = flag, action = clap::ArgAction::Set)]
    pub config_watch: bool,

    /// Log filter (`info`, `sluice=debug,...`); `json` for JSON lines at info.
    #[arg(
        long,
        env = "SLUICE_LOG",
        value_name = "SLUICE_LOG",
        default_value = "info"
    )]
    pub log: String,

    /// OpenTelemetry's collector (OTLP): traces and metrics go there. Unset: none.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "OTEL_EXPORTER_OTLP_ENDPOINT",
          value_parser = http_url)]
    pub otel_endpoint: Option<String>,

    /// `true`: OpenTelemetry off, whatever else is set.
    #[arg(long, env = "OTEL_SDK_DISABLED", value_name = "OTEL_SDK_DISABLED",
          default_value = "false", value_parser = flag, action = clap::ArgAction::Set)]
    pub otel_sdk_disabled: bool,

    /// `http/protobuf` or `grpc`.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_PROTOCOL", value_name = "OTEL_EXPORTER_OTLP_PROTOCOL",
          default_value = "http/protobuf", value_parser = ["http/protobuf", "grpc"])]
    pub otel_protocol: String,

    /// The service's name on its spans and metrics.
    #[arg(
        long,
        env = "OTEL_SERVICE_NAME",
        value_name = "OTEL_SERVICE_NAME",
        default_value = "sluice"
    )]
    pub otel_service_name: String,

    /// Which traces are kept, by the specification's names (`parentbased_always_on`…).
    #[arg(
        long,
        env = "OTEL_TRACES_SAMPLER",
        value_name = "OTEL_TRACES_SAMPLER",
        default_value = "parentbased_always_on"
    )]
    pub otel_traces_sampler: String,

    /// The ratio of a `traceidratio` sampler.
    #[arg(
        long,
        env = "OTEL_TRACES_SAMPLER_ARG",
        value_name = "OTEL_TRACES_SAMPLER_ARG"
    )]
    pub otel_traces_sampler_arg: Option<String>,

    /// `true`: prompts and replies are recorded on spans (`gen_ai.input.messages`,
    /// `gen_ai.output.messages`). Off by default: no message text leaves sluice.
    #[arg(long, env = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT",
          value_name = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT",
          default_value = "false", value_parser = flag, action = clap::ArgAction::Set)]
    pub otel_capture_content: bool,

    /// Milliseconds between two exports of finished spans.
    #[arg(
        long,
        env = "OTEL_BSP_SCHEDULE_DELAY",
        value_name = "OTEL_BSP_SCHEDULE_DELAY",
        default_value_t = 5000
    )]
    pub otel_bsp_schedule_delay_ms: u64,

    /// Milliseconds between two exports of metrics.
    #[arg(
        long,
        env = "OTEL_METRIC_EXPORT_INTERVAL",
        value_name = "OTEL_METRIC_EXPORT_INTERVAL",
        default_value_t = 60000
    )]
    pub otel_metric_export_interval_ms: u64,
}

/// Seconds as a duration, capped at ten years so that no deadline overflows.
fn seconds(value: f64) -> Duration {
    Duration::from_secs_f64(value.clamp(0.0, 10.0 * 365.0 * 86_400.0))
}

fn http_url(value: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(value).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("must be an http:// or https:// URL".into());
    }
    Ok(value.trim_end_matches('/').to_owned())
}

fn origin(value: &str) -> Result<String, String> {
    let value = value.trim().trim_end_matches('/');
    let url = reqwest::Url::parse(value).map_err(|e| format!("{value:?} is not an origin: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.path() != "/" || url.host().is_none() {
        return Err(format!(
            "{value:?} is not an origin (scheme://host[:port], e.g. https://app.example)"
        ));
    }
    Ok(value.to_owned())
}

fn ip_net(value: &str) -> Result<ipnet::IpNet, String> {
    let value = value.trim();
    value
        .parse::<ipnet::IpNet>()
        .or_else(|_| value.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{value:?} is not an IP address or CIDR range"))
}

fn flag(value: &str) -> Result<bool, String> {
    match value.trim() {
        "1" | "true" | "TRUE" | "True" | "yes" | "on" => Ok(true),
        "" | "0" | "false" | "FALSE" | "False" | "no" | "off" => Ok(false),
        _ => Err("must be 1 or 0".into()),
    }
}

fn non_negative(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err("must be a number of 0 or more".into()),
    }
}

fn positive(value: &str) -> Result<f64, String> {
    match non_negative(value) {
        Ok(v) if v > 0.0 => Ok(v),
        _ => Err("must be a number above 0".into()),
    }
}

fn fraction(value: &str) -> Result<f64, String> {
    match positive(value) {
        Ok(v) if v <= 1.0 => Ok(v),
        _ => Err("must be a number above 0 and at most 1".into()),
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

    pub fn total_timeout(&self) -> Duration {
        Duration::from_millis(self.total_timeout_ms)
    }

    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.header_timeout_ms)
    }

    pub fn slow_client_timeout(&self) -> Duration {
        Duration::from_millis(self.slow_client_timeout_ms)
    }

    /// The limits of a client with no limits of its own.
    pub fn default_limits(&self) -> Limits {
        Limits {
            rpm: self.rpm,
            burst: self.rpm_burst.unwrap_or(self.rpm),
            tpm: self.tpm,
            max_streams: self.max_streams,
            models: None,
            budget: None,
        }
    }

    /// How long a resumable stream runs on detached; zero: streams are not resumable.
    pub fn resume_grace(&self) -> Duration {
        seconds(self.resume_grace_s)
    }

    pub fn resume_ttl(&self) -> Duration {
        seconds(self.resume_ttl_s)
    }

    pub fn resume_memory(&self) -> usize {
        (self.resume_memory_mb * 1024.0 * 1024.0).min(usize::MAX as f64 / 2.0) as usize
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

    /// The TOML config's path, when there is one: `SLUICE_CONFIG` (which must exist), else
    /// `sluice.toml` if present.
    pub fn file_path(&self) -> Option<PathBuf> {
        match &self.config {
            Some(path) => Some(path.clone()),
            None if Path::new("sluice.toml").exists() => Some(PathBuf::from("sluice.toml")),
            None => None,
        }
    }
}

/// A calendar period, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Day,
    Week,
    Month,
    Total,
}

impl Period {
    pub const ALL: [Period; 4] = [Period::Day, Period::Week, Period::Month, Period::Total];

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The period `name` names, else a month (the default).
    pub fn or_month(name: Option<&str>) -> Self {
        name.and_then(Self::parse).unwrap_or(Period::Month)
    }

    pub fn name(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
            Period::Total => "total",
        }
    }

    /// The period holding `now_us` (microseconds since 1970): when it began, and when the
    /// next begins (never, for `total`). Weeks begin on Monday.
    pub fn bounds(self, now_us: i64) -> (i64, Option<i64>) {
        let now = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(now_us) * 1000)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        let date = now.date();
        let (start, next): (time::Date, Option<time::Date>) = match self {
            Period::Total => return (0, None),
            Period::Day => (date, date.next_day()),
            Period::Week => {
                let monday = date
                    - time::Duration::days(i64::from(date.weekday().number_days_from_monday()));
                (monday, Some(monday + time::Duration::days(7)))
            }
            Period::Month => {
                let first = date.replace_day(1).unwrap_or(date);
                let next = match first.month() {
                    time::Month::December => {
                        time::Date::from_calendar_date(first.year() + 1, time::Month::January, 1)
                    }
                    month => time::Date::from_calendar_date(first.year(), month.next(), 1),
                };
                (first, next.ok())
            }
        };
        let us = |d: time::Date| {
            i64::try_from(
                d.with_time(time::Time::MIDNIGHT)
                    .assume_utc()
                    .unix_timestamp_nanos()
                    / 1000,
            )
            .unwrap_or(0)
        };
        (us(start), next.map(us))
    }
}

/// What a key or a team may spend in a period: USD, tokens, or both.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    pub usd: Option<f64>,
    pub tokens: Option<u64>,
    pub period: Period,
}

/// One client's limits.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub rpm: u32,
    pub burst: u32,
    pub tpm: Option<u32>,
    pub max_streams: u32,
    /// Models this client may use (names, or patterns ending in `*`); all when `None`.
    pub models: Option<HashSet<String>>,
    /// What it may spend in a period (keys and teams made through the admin API).
    pub budget: Option<Budget>,
}

/// What the TOML config holds.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Model name → where it goes.
    #[serde(default)]
    pub models: BTreeMap<String, ModelRoute>,
    /// Key name → the key and its own limits.
    #[serde(default)]
    pub keys: BTreeMap<String, KeyConfig>,
    /// `open = true`: a reload may leave sluice with no keys at all (open to anyone). Without
    /// it, a file with no keys is refused while the running configuration has some: more
    /// likely a file caught half written than a wish to open the door.
    #[serde(default)]
    pub open: bool,
    /// Model name or pattern → its prices, USD per million tokens (each entry read by
    /// `prices::Prices::load`, which names the one that is wrong).
    #[serde(default)]
    pub prices: BTreeMap<String, toml::Value>,
}

/// An API key in the TOML config; limits it leaves out are the defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// The key itself, or
    pub key: Option<String>,
    /// the name of the environment variable that holds it.
    pub key_env: Option<String>,
    pub rpm: Option<u32>,
    pub burst: Option<u32>,
    pub tpm: Option<u32>,
    pub max_streams: Option<u32>,
    /// The only models this key may use.
    pub models: Option<Vec<String>>,
}

impl KeyConfig {
    /// The key, and its limits with `defaults` filling what it leaves out.
    pub fn resolve(&self, name: &str, defaults: &Limits) -> anyhow::Result<(String, Limits)> {
        let secret = match (&self.key, &self.key_env) {
            (Some(key), None) => key.clone(),
            (None, Some(var)) => std::env::var(var).map_err(|_| {
                anyhow::anyhow!("key {name:?}: key_env names {var}, which is not set")
            })?,
            _ => bail!("key {name:?}: give exactly one of key and key_env"),
        };
        if secret.trim().is_empty() {
            bail!("key {name:?} is empty");
        }
        let rpm = self.rpm.unwrap_or(defaults.rpm);
        let limits = Limits {
            rpm,
            burst: self
                .burst
                .or(self.rpm.map(|_| rpm))
                .unwrap_or(defaults.burst),
            tpm: self.tpm.or(defaults.tpm),
            max_streams: self.max_streams.unwrap_or(defaults.max_streams),
            models: self.models.as_ref().map(|m| m.iter().cloned().collect()),
            budget: None,
        };
        if limits.rpm == 0 || limits.burst == 0 || limits.max_streams == 0 || limits.tpm == Some(0)
        {
            bail!("key {name:?}: limits must be above 0");
        }
        Ok((secret, limits))
    }
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
    /// The API the upstream is called with: `chat` (chat completions, the default),
    /// `responses` (OpenAI's Responses API) or `anthropic` (Anthropic's Messages API); the
    /// last two are relayed natively to clients of the same API.
    #[serde(default = "default_api")]
    pub api: String,
    /// Tried in order when this one fails before anything reached the client (cannot
    /// connect, 5xx, 429, no first token in time). A fallback has no fallbacks of its own.
    #[serde(default)]
    pub fallbacks: Vec<ModelRoute>,
    /// A pool: several deployments of the model, balanced, each a target with its own
    /// `base_url`, `model`, `weight`, `max_streams`, `api_key_env` and `api`. A target
    /// leaving out `model` or `api_key_env` has the route's.
    #[serde(default)]
    pub targets: Vec<ModelRoute>,
    /// How a pool picks its target: `weighted` (smooth weighted round robin, the default),
    /// `least-busy` (fewest open streams for its weight) or `latency` (lowest recent time
    /// to first token).
    pub balance: Option<String>,
    /// A target's share of its pool's streams under `weighted`; its capacity under
    /// `least-busy`.
    pub weight: Option<u32>,
    /// Streams this target may serve at once (across instances with Redis); unset: no cap.
    pub max_streams: Option<u32>,
    /// Requests that may wait for room when every target of the pool is at its
    /// `max_streams`; past that, 429.
    pub queue: Option<u32>,
    /// How long a request may wait in that queue, in milliseconds.
    pub queue_timeout_ms: Option<u64>,
}

/// Requests that may wait for a full pool, by default.
pub const DEFAULT_QUEUE: u32 = 100;
/// How long a request may wait for a full pool, by default.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(5);
/// The most targets one pool may list.
pub const MAX_TARGETS: usize = 64;
/// The balancing strategies a pool may name.
pub const BALANCES: [&str; 3] = ["weighted", "least-busy", "latency"];

fn default_backend() -> String {
    "openai".into()
}

fn default_api() -> String {
    "chat".into()
}

/// What tells a file's versions apart without reading it: its size and time of change.
pub type Stamp = (u64, Option<std::time::SystemTime>);

/// The stamp of the file at `path`, when it is there.
pub fn stamp(path: &Path) -> Option<Stamp> {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.len(), m.modified().ok()))
}

impl FileConfig {
    /// The TOML config at `path`, read and checked; with none, the empty one.
    pub fn at(path: Option<&Path>) -> anyhow::Result<Self> {
        match path {
            Some(path) => Self::read(path),
            None => Ok(Self::default()),
        }
    }

    /// The file at `path` for a reload: as at start, and refused when it is empty (a file
    /// caught as it is written, as one that is gone is).
    pub fn again(path: Option<&Path>) -> anyhow::Result<Self> {
        if let Some(path) = path {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("SLUICE_CONFIG: cannot read {}", path.display()))?;
            let blank = text
                .lines()
                .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'));
            if blank {
                bail!("SLUICE_CONFIG: {} is empty", path.display());
            }
        }
        Self::at(path)
    }

    fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("SLUICE_CONFIG: cannot read {}", path.display()))?;
        let file: FileConfig = toml::from_str(&text)
            .with_context(|| format!("SLUICE_CONFIG: {} is not valid", path.display()))?;
        file.validate()
            .with_context(|| format!("SLUICE_CONFIG: {}", path.display()))?;
        Ok(file)
    }

    fn validate(&self) -> anyhow::Result<()> {
        for (name, route) in &self.models {
            route.validate_pool(name)?;
            if let Some(queue_timeout) = route.queue_timeout_ms
                && queue_timeout == 0
            {
                bail!("model {name:?}: queue_timeout_ms must be above 0");
            }
            for (i, fallback) in route.fallbacks.iter().enumerate() {
                if !fallback.fallbacks.is_empty() {
                    bail!("model {name:?}: fallback {i} has fallbacks of its own");
                }
                if fallback.queue.is_some() || fallback.queue_timeout_ms.is_some() {
                    bail!(
                        "model {name:?}: fallback {i}: a queue belongs to the route, not a fallback"
                    );
                }
                fallback.validate_pool(&format!("{name}.fallbacks[{i}]"))?;
            }
        }
        Ok(())
    }
}

impl ModelRoute {
    /// A route or fallback: one upstream, or a pool of targets.
    fn validate_pool(&self, name: &str) -> anyhow::Result<()> {
        if let Some(balance) = &self.balance
            && !BALANCES.contains(&balance.as_str())
        {
            bail!("model {name:?}: unknown balance {balance:?} (weighted, least-busy or latency)");
        }
        if self.targets.is_empty() {
            return self.validate(name);
        }
        if self.targets.len() > MAX_TARGETS {
            bail!("model {name:?}: at most {MAX_TARGETS} targets in a pool");
        }
        if self.base_url.is_some() || self.weight.is_some() || self.max_streams.is_some() {
            bail!("model {name:?}: base_url, weight and max_streams belong to each of its targets");
        }
        for (i, target) in self.targets.iter().enumerate() {
            let at = format!("{name}.targets[{i}]");
            if !target.targets.is_empty() || !target.fallbacks.is_empty() {
                bail!("model {at:?}: a target has no targets or fallbacks of its own");
            }
            if target.balance.is_some()
                || target.queue.is_some()
                || target.queue_timeout_ms.is_some()
            {
                bail!("model {at:?}: balance and queue belong to the route, not a target");
            }
            target.validate(&at)?;
        }
        Ok(())
    }

    fn validate(&self, name: &str) -> anyhow::Result<()> {
        if self.weight == Some(0) || self.max_streams == Some(0) {
            bail!("model {name:?}: weight and max_streams must be above 0");
        }
        match self.backend.as_str() {
            "openai" => {}
            // Which mock models there are is checked where the routes are built.
            "mock" => {}
            other => bail!("model {name:?}: unknown backend {other:?} (openai or mock)"),
        }
        match (self.backend.as_str(), self.api.as_str()) {
            (_, "chat") | ("openai", "responses" | "anthropic") => {}
            ("mock", _) => bail!("model {name:?}: the mock backend speaks only api = \"chat\""),
            (_, other) => {
                bail!("model {name:?}: unknown api {other:?} (chat, responses or anthropic)")
            }
        }
        if let Some(url) = &self.base_url {
            http_url(url).map_err(|e| anyhow::anyhow!("model {name:?}: base_url {e}"))?;
        }
        // A key variable that is not set leaves this upstream out (see `startup::table`).
        Ok(())
    }
}
