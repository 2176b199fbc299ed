//! Limits shared by every sluice instance through Redis: one script, one round trip per
//! admission, on Redis's clock so instances need not agree on the time.
//!
//! Stream permits are sorted sets of permit ids scored by their expiry: each admission drops
//! the expired ones first, and the instance that holds a permit refreshes it while its
//! stream lives, so an instance that crashes cannot hold permits for longer than the TTL.
//!
//! Keys spread over a Redis Cluster: each client's keys carry the hash tag of one of
//! [`SHARDS`] shards (`{limits:7}`), and the global count of streams is kept per shard
//! beside them, so each admission stays one script in one slot while the clients' work
//! spreads over the nodes. A shard may hold what the global cap leaves once the other
//! shards' streams are counted (each instance counts them every second).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::Script;
use tokio::sync::mpsc;

use super::Limits;
use crate::link::{Connection, Lazy, Link};

/// How long a permit outlives its last refresh.
pub const PERMIT_TTL: Duration = Duration::from_secs(30);
/// Refresh well within the TTL.
pub const REFRESH_EVERY: Duration = Duration::from_secs(10);
/// Shards of the limits' keys (see the module's doc).
pub const SHARDS: usize = 16;
/// How often the shards' streams are counted.
pub const COUNT_EVERY: Duration = Duration::from_secs(1);

/// The shard of `client`'s limits: FNV-1a of its name, the same in every instance and
/// every version.
pub fn shard(client: &str) -> usize {
    let hash = client.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % SHARDS as u64) as usize
}

/// The key of `client`'s `what` (`requests`, `tokens`, `streams`).
pub fn client_key(client: &str, what: &str) -> String {
    format!("sluice:{{limits:{}}}:{what}:{client}", shard(client))
}

/// Every instance's stream permits in shard `shard`.
pub fn shard_streams(shard: usize) -> String {
    format!("sluice:{{limits:{shard}}}:streams")
}
/// After a failure, how long admissions skip Redis before trying again.
const BACKOFF: Duration = Duration::from_secs(1);

const ADMIT: &str = r"
local time = redis.call('TIME')
local now = time[1] * 1000 + math.floor(time[2] / 1000)
local period, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local max_streams, global_max = tonumber(ARGV[3]), tonumber(ARGV[4])
local id, ttl = ARGV[5], tonumber(ARGV[6])
-- Stream permits: expired ones first.
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
if redis.call('ZCARD', KEYS[4]) >= global_max then return {3, 1000, 0, 0} end
-- Requests: GCRA on the theoretical arrival time.
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + period
local allow_at = new_tat - burst * period
if now < allow_at then return {4, math.ceil(allow_at - now), 0, math.ceil(tat - now)} end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil(new_tat - now) + 1000)
local remaining, reset = math.floor((now - allow_at) / period), math.ceil(new_tat - now)
-- This client's streams: a refusal counts as a request, as any other answer does.
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if redis.call('ZCARD', KEYS[3]) >= max_streams then return {2, 1000, remaining, reset} end
redis.call('ZADD', KEYS[3], now + ttl, id)
redis.call('PEXPIRE', KEYS[3], ttl * 2)
redis.call('ZADD', KEYS[4], now + ttl, id)
redis.call('PEXPIRE', KEYS[4], ttl * 2)
return {0, 0, remaining, reset}
";

/// Counts a request that starts no stream: the GCRA of ADMIT alone, on KEYS[1].
const REQUEST: &str = r"
local time = redis.call('TIME')
local now = time[1] * 1000 + math.floor(time[2] / 1000)
local period, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + period
local allow_at = new_tat - burst * period
if now < allow_at then return {4, math.ceil(allow_at - now), 0, math.ceil(tat - now)} end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil(new_tat - now) + 1000)
return {0, 0, math.floor((now - allow_at) / period), math.ceil(new_tat - now)}
";

/// Reserves n tokens from a bucket refilled at tpm per minute: KEYS[2] as in ADMIT.
const TOKENS: &str = r"
local time = redis.call('TIME')
local now = time[1] * 1000 + math.floor(time[2] / 1000)
local tpm, n = tonumber(ARGV[1]), tonumber(ARGV[2])
if n > tpm then return {5, 0, 0, 0} end
local rate = tpm / 60000
local b = redis.call('HMGET', KEYS[2], 't', 'ts')
local t, ts = tonumber(b[1]) or tpm, tonumber(b[2]) or now
t = math.min(tpm, t + (now - ts) * rate)
if t < n then return {6, math.ceil((n - t) / rate), math.floor(t), math.ceil((tpm - t) / rate)} end
t = t - n
redis.call('HSET', KEYS[2], 't', t, 'ts', now)
redis.call('PEXPIRE', KEYS[2], math.ceil((tpm - t) / rate) + 1000)
return {0, 0, math.floor(t), math.ceil((tpm - t) / rate)}
";

/// Gives back unused tokens (a negative amount takes more) and releases a permit.
const RELEASE: &str = r"
local time = redis.call('TIME')
local now = time[1] * 1000 + math.floor(time[2] / 1000)
local tpm, amount, id = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
redis.call('ZREM', KEYS[3], id)
redis.call('ZREM', KEYS[4], id)
if tpm > 0 and amount ~= 0 then
  local rate = tpm / 60000
  local b = redis.call('HMGET', KEYS[2], 't', 'ts')
  local t, ts = tonumber(b[1]) or tpm, tonumber(b[2]) or now
  t = math.min(tpm, t + (now - ts) * rate + amount)
  redis.call('HSET', KEYS[2], 't', t, 'ts', now)
  redis.call('PEXPIRE', KEYS[2], math.ceil(math.max(0, tpm - t) / rate) + 1000)
end
return 0
";

/// Pushes the expiry of live permits: KEYS[1] the global set, then one client set per id.
/// A permit Redis lost (a flush, a failover) is added again: this instance's streams still
/// run, and the caps must count them.
const REFRESH: &str = r"
local time = redis.call('TIME')
local now = time[1] * 1000 + math.floor(time[2] / 1000)
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
  redis.call('ZADD', KEYS[i], now + ttl, ARGV[i])
  redis.call('PEXPIRE', KEYS[i], ttl * 2)
end
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return 0
";

/// What Redis decided of a request.
pub enum Decision {
    Admitted {
        remaining_requests: u32,
        reset_requests: Duration,
    },
    TooManyStreams {
        remaining_requests: u32,
        reset_requests: Duration,
    },
    GlobalFull,
    Requests {
        wait: Duration,
        reset: Duration,
    },
}

/// ADMIT's (and REQUEST's) answer, `{code, wait ms, requests left, reset ms}`, as a decision.
fn decision(reply: &[i64]) -> Decision {
    let at = |i: usize| reply.get(i).copied().unwrap_or(0).max(0) as u64;
    let ms = |i: usize| Duration::from_millis(at(i));
    match at(0) {
        0 => Decision::Admitted {
            remaining_requests: at(2) as u32,
            reset_requests: ms(3),
        },
        2 => Decision::TooManyStreams {
            remaining_requests: at(2) as u32,
            reset_requests: ms(3),
        },
        3 => Decision::GlobalFull,
        _ => Decision::Requests {
            wait: ms(1),
            reset: ms(3),
        },
    }
}

/// What Redis decided of a token reservation.
pub enum TokenDecision {
    /// Reserved: tokens left, and time until the bucket is full.
    Reserved {
        left: u32,
        reset: Duration,
    },
    NeverFits,
    Wait {
        wait: Duration,
        left: u32,
        reset: Duration,
    },
}

/// A permit's release, done by the maintenance task: `Drop` cannot wait for Redis.
pub struct Release {
    pub client: Arc<str>,
    pub id: String,
    pub tpm: u32,
    pub give_back: i64,
}

pub struct Shared {
    connection: Lazy,
    /// Until when (ms since `epoch`) to skip Redis after a failure.
    down_until: AtomicU64,
    epoch: Instant,
    admit: Script,
    request: Script,
    tokens: Script,
    release: Script,
    refresh: Script,
    /// Live permits this instance holds: id → client.
    live: Mutex<HashMap<String, Arc<str>>>,
    releases: mpsc::UnboundedSender<Release>,
    /// Each shard's streams, as last counted.
    counted: [AtomicU64; SHARDS],
    /// Releases Redis failed to take, and when they were first tried: tried again at each
    /// refresh until their permits would have expired anyway.
    retries: Mutex<Vec<(Release, Instant)>>,
}

impl Shared {
    pub fn new(link: Link) -> (Arc<Self>, mpsc::UnboundedReceiver<Release>) {
        let (releases, inbox) = mpsc::unbounded_channel();
        (
            Arc::new(Shared {
                connection: Lazy::new(link, Duration::from_millis(500)),
                down_until: AtomicU64::new(0),
                epoch: Instant::now(),
                admit: Script::new(ADMIT),
                request: Script::new(REQUEST),
                tokens: Script::new(TOKENS),
                release: Script::new(RELEASE),
                refresh: Script::new(REFRESH),
                live: Mutex::default(),
                releases,
                counted: std::array::from_fn(|_| AtomicU64::new(0)),
                retries: Mutex::default(),
            }),
            inbox,
        )
    }

    async fn connection(&self) -> Result<Connection, redis::RedisError> {
        let since = self.epoch.elapsed().as_millis() as u64;
        if since < self.down_until.load(Ordering::Relaxed) {
            return Err(redis::RedisError::from((
                redis::ErrorKind::IoError,
                "Redis failed a moment ago",
            )));
        }
        let result = self.connection.get().await;
        if result.is_err() {
            self.failed();
        }
        result
    }

    fn failed(&self) {
        let until = self.epoch.elapsed() + BACKOFF;
        self.down_until
            .store(until.as_millis() as u64, Ordering::Relaxed);
    }

    fn keys(client: &str) -> [String; 4] {
        [
            client_key(client, "requests"),
            client_key(client, "tokens"),
            client_key(client, "streams"),
            shard_streams(shard(client)),
        ]
    }

    /// What the global cap leaves `shard`: the cap less the other shards' streams.
    fn allowance(&self, shard: usize, global_max: usize) -> u64 {
        let others: u64 = self
            .counted
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != shard)
            .map(|(_, n)| n.load(Ordering::Relaxed))
            .sum();
        (global_max as u64).saturating_sub(others)
    }

    /// Counts each shard's streams (the global cap's share of each shard).
    pub async fn count(&self) {
        let Ok(mut connection) = self.connection().await else {
            return;
        };
        for (i, counted) in self.counted.iter().enumerate() {
            let n: Result<u64, _> = redis::cmd("ZCARD")
                .arg(shard_streams(i))
                .query_async(&mut connection)
                .await;
            match n {
                Ok(n) => counted.store(n, Ordering::Relaxed),
                Err(_) => {
                    self.failed();
                    return;
                }
            }
        }
    }

    pub async fn admit(
        &self,
        client: &Arc<str>,
        limits: &Limits,
        global_max: usize,
        id: &str,
    ) -> Result<Decision, redis::RedisError> {
        let period_ms = 60_000.0 / f64::from(limits.rpm.max(1));
        let mut invocation = self.admit.prepare_invoke();
        for key in Self::keys(client) {
            invocation.key(key);
        }
        invocation
            .arg(period_ms)
            .arg(limits.burst)
            .arg(limits.max_streams)
            .arg(self.allowance(shard(client), global_max))
            .arg(id)
            .arg(PERMIT_TTL.as_millis() as u64);
        let decision = decision(&self.invoke(&invocation).await?);
        if let Decision::Admitted { .. } = decision {
            self.adopt(id, client);
        }
        Ok(decision)
    }

    /// The stream permits `client` holds in Redis now, every instance's.
    pub async fn streams_of(&self, client: &str) -> Result<u64, redis::RedisError> {
        let mut connection = self.connection().await?;
        redis::cmd("ZCARD")
            .arg(client_key(client, "streams"))
            .query_async(&mut connection)
            .await
    }

    /// Counts a request that holds no stream permit.
    pub async fn request(
        &self,
        client: &str,
        limits: &Limits,
    ) -> Result<Decision, redis::RedisError> {
        let period_ms = 60_000.0 / f64::from(limits.rpm.max(1));
        let mut invocation = self.request.prepare_invoke();
        let [requests, ..] = Self::keys(client);
        invocation.key(requests).arg(period_ms).arg(limits.burst);
        Ok(decision(&self.invoke(&invocation).await?))
    }

    /// Reserves `tokens` of `client`'s `tpm`.
    pub async fn reserve(
        &self,
        client: &str,
        tpm: u32,
        tokens: u32,
    ) -> Result<TokenDecision, redis::RedisError> {
        let mut invocation = self.tokens.prepare_invoke();
        for key in Self::keys(client) {
            invocation.key(key);
        }
        invocation.arg(tpm).arg(tokens);
        let reply = self.invoke(&invocation).await?;
        let at = |i: usize| reply.get(i).copied().unwrap_or(0).max(0) as u64;
        let ms = |i: usize| Duration::from_millis(at(i));
        Ok(match at(0) {
            0 => TokenDecision::Reserved {
                left: at(2) as u32,
                reset: ms(3),
            },
            5 => TokenDecision::NeverFits,
            _ => TokenDecision::Wait {
                wait: ms(1),
                left: at(2) as u32,
                reset: ms(3),
            },
        })
    }

    /// Runs a script in Redis, backing off after a failure (for every user of this link).
    pub async fn invoke(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<Vec<i64>, redis::RedisError> {
        let mut connection = self.connection().await?;
        match invocation.invoke_async(&mut connection).await {
            Ok(reply) => Ok(reply),
            Err(e) => {
                self.failed();
                Err(e)
            }
        }
    }

    /// Queues a permit's release for the maintenance task.
    pub fn release(&self, release: Release) {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&release.id);
        let _ = self.releases.send(release);
    }

    /// A permit this instance holds, refreshed into Redis while it lives: one Redis
    /// admitted, or one admitted by this instance's own limits while Redis failed.
    pub fn adopt(&self, id: &str, client: &Arc<str>) {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_owned(), client.clone());
    }

    pub async fn apply(&self, r: Release) {
        self.apply_since(r, Instant::now()).await;
    }

    /// Applies a release; one Redis fails to take is kept to be tried again, until its
    /// permit has expired by itself.
    async fn apply_since(&self, r: Release, since: Instant) {
        let result = match self.connection().await {
            Ok(mut connection) => {
                let mut invocation = self.release.prepare_invoke();
                for key in Self::keys(&r.client) {
                    invocation.key(key);
                }
                invocation.arg(r.tpm).arg(r.give_back).arg(&r.id);
                let result = invocation.invoke_async::<i64>(&mut connection).await;
                if result.is_err() {
                    self.failed();
                }
                result.is_ok()
            }
            Err(_) => false,
        };
        if !result && since.elapsed() < PERMIT_TTL {
            self.retries
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((r, since));
        }
    }

    /// Tries again the releases Redis failed to take.
    pub async fn retry_releases(&self) {
        let retries = std::mem::take(&mut *self.retries.lock().unwrap_or_else(|e| e.into_inner()));
        for (release, since) in retries {
            self.apply_since(release, since).await;
        }
    }

    /// Keeps this instance's live permits from expiring.
    pub async fn refresh(&self) {
        let live: Vec<(String, Arc<str>)> = self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, client)| (id.clone(), client.clone()))
            .collect();
        if live.is_empty() {
            return;
        }
        let Ok(mut connection) = self.connection().await else {
            return;
        };
        // One script per shard: each touches one slot.
        let mut by_shard: Vec<Vec<(String, Arc<str>)>> = vec![Vec::new(); SHARDS];
        for (id, client) in live {
            by_shard[shard(&client)].push((id, client));
        }
        for (i, permits) in by_shard.iter().enumerate() {
            if permits.is_empty() {
                continue;
            }
            let mut invocation = self.refresh.prepare_invoke();
            invocation
                .key(shard_streams(i))
                .arg(PERMIT_TTL.as_millis() as u64);
            for (id, client) in permits {
                invocation.key(client_key(client, "streams")).arg(id);
            }
            if invocation
                .invoke_async::<i64>(&mut connection)
                .await
                .is_err()
            {
                self.failed();
                return;
            }
        }
    }
}
