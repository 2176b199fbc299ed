//! Admission: who the client is (an API key's name, or its IP), and whether it may start a
//! chat request now — requests per minute, tokens per minute, concurrent streams — in this
//! instance or, through Redis, across all of them. It knows no HTTP: it is given the
//! request's credentials as text and answers with a [`Permit`] and its [`Quota`], or a
//! [`Refusal`]; the HTTP layer renders those as statuses and `x-ratelimit-*` headers.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::RateLimiter;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use ipnet::IpNet;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub mod budget;
pub mod shared;
use budget::{Amount, Balances, Exhausted, Left, Owner};
use shared::{Decision, Release, Shared, TokenDecision};

/// Reserved for the reply when a request sets no `max_tokens`.
pub const DEFAULT_REPLY_TOKENS: u32 = 512;

pub use crate::config::Limits;

type RequestLimiter = RateLimiter<
    Arc<str>,
    DefaultKeyedStateStore<Arc<str>>,
    DefaultClock,
    StateInformationMiddleware,
>;

/// Limits and the request limiter that enforces them, shared by every client under them.
struct Policy {
    limits: Limits,
    requests: RequestLimiter,
    /// Its key was revoked with `end_streams`: the streams it holds end at their next chunk.
    ended: std::sync::atomic::AtomicBool,
}

impl Policy {
    fn new(limits: Limits) -> Arc<Self> {
        let rpm = NonZeroU32::new(limits.rpm.max(1)).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(limits.burst.max(1)).unwrap_or(NonZeroU32::MIN);
        let quota = governor::Quota::per_minute(rpm).allow_burst(burst);
        Arc::new(Policy {
            limits,
            requests: RateLimiter::keyed(quota).with_middleware::<StateInformationMiddleware>(),
            ended: std::sync::atomic::AtomicBool::new(false),
        })
    }
}

/// A configured API key: only its SHA-256 is kept.
pub struct ApiKey {
    pub name: String,
    pub secret: String,
    pub limits: Option<Limits>,
}

struct StoredKey {
    name: Arc<str>,
    digest: [u8; 32],
    policy: Arc<Policy>,
    /// When it stops working (its expiry, or the end of a rotation's grace), if ever.
    until: Option<std::time::SystemTime>,
    /// Its team, whose limits and budget hold it too.
    team: Option<Arc<Principal>>,
}

/// A key made through the admin API, as its store gives it: its secret's digest only.
pub struct ManagedKey {
    pub name: String,
    pub digest: [u8; 32],
    pub limits: Limits,
    pub until: Option<std::time::SystemTime>,
    /// Its team's name and limits.
    pub team: Option<(String, Limits)>,
}

/// Who is asking: a key's name or an IP, and the policy that applies.
#[derive(Clone)]
pub struct Principal {
    pub name: Arc<str>,
    policy: Arc<Policy>,
    /// Whether `name` is a key's (else it is the client's address: sluice has no keys).
    pub keyed: bool,
    /// The key's team, held to its own limits and budget (named `team:<name>`).
    pub team: Option<Arc<Principal>>,
}

/// The prefix of a team's name where limits are kept: no key's name can take it.
const TEAM: &str = "team:";

impl Principal {
    /// Whether this client's key may use `model` (every model, unless its key names some:
    /// names, or patterns ending in `*`).
    pub fn may_use(&self, model: &str) -> bool {
        self.policy.limits.models.as_ref().is_none_or(|models| {
            models.contains(model)
                || models.iter().any(|m| {
                    m.strip_suffix('*')
                        .is_some_and(|prefix| model.starts_with(prefix))
                })
        })
    }

    /// The team's name, when the key has one.
    pub fn team_name(&self) -> Option<&str> {
        self.team.as_ref().map(|t| &t.name[TEAM.len()..])
    }
}

/// Limits shared through Redis, and what to do when it cannot be reached.
pub struct SharedLimits {
    pub link: crate::link::Link,
    /// Refuse (503) rather than fall back to this instance's own limits.
    pub fail_closed: bool,
    pub errors: metrics::Counter,
}

pub struct Admission {
    /// Every key: the configured ones, then those made through the admin API.
    keys: std::sync::RwLock<Arc<Vec<StoredKey>>>,
    /// The configured keys, replaced whole on a reload ([`Admission::replace_keys`]).
    configured: std::sync::RwLock<Arc<Vec<StoredKey>>>,
    /// The keys made through the admin API ([`Admission::replace_managed`]).
    managed: std::sync::RwLock<Arc<Vec<StoredKey>>>,
    /// Keys have been made through the admin API: a key is required even when none of
    /// them is live now (disabling the last one must not open sluice to anyone).
    managing: std::sync::atomic::AtomicBool,
    shared: Option<Arc<Shared>>,
    releases: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Release>>>,
    fail_closed: bool,
    redis_errors: metrics::Counter,
    default_policy: Arc<Policy>,
    trusted_proxies: Vec<IpNet>,
    tokens: Mutex<HashMap<Arc<str>, Bucket>>,
    streams: Mutex<HashMap<Arc<str>, u32>>,
    /// Connections reading stored streams, per client (this instance's).
    readers: Mutex<HashMap<Arc<str>, u32>>,
    global_streams: AtomicUsize,
    global_max: usize,
    /// The digest of `SLUICE_ADMIN_KEY`, which inference refuses.
    admin: std::sync::OnceLock<[u8; 32]>,
    /// Every budget's balance.
    balances: Balances,
}

impl Admission {
    pub fn new(
        keys: Vec<ApiKey>,
        defaults: Limits,
        trusted_proxies: Vec<IpNet>,
        global_max: usize,
        shared: Option<SharedLimits>,
    ) -> anyhow::Result<Arc<Self>> {
        let default_policy = Policy::new(defaults);
        let keys = stored(keys, &default_policy, &[]);
        let (fail_closed, redis_errors) = shared
            .as_ref()
            .map_or((false, metrics::Counter::noop()), |s| {
                (s.fail_closed, s.errors.clone())
            });
        let (shared, releases) = match shared {
            Some(config) => {
                let (shared, releases) = Shared::new(config.link);
                (Some(shared), Some(releases))
            }
            None => (None, None),
        };
        let keys = Arc::new(keys);
        let shared_link = shared.clone();
        Ok(Arc::new(Admission {
            keys: std::sync::RwLock::new(keys.clone()),
            configured: std::sync::RwLock::new(keys),
            managed: std::sync::RwLock::new(Arc::new(Vec::new())),
            managing: std::sync::atomic::AtomicBool::new(false),
            shared,
            releases: Mutex::new(releases),
            fail_closed,
            redis_errors,
            default_policy,
            trusted_proxies,
            tokens: Mutex::default(),
            streams: Mutex::default(),
            readers: Mutex::default(),
            global_streams: AtomicUsize::new(0),
            global_max,
            admin: std::sync::OnceLock::new(),
            balances: Balances::new(shared_link),
        }))
    }

    /// `key` is the admin key: inference refuses it, keys or not.
    pub fn refuse_admin_key(&self, key: &str) {
        let _ = self.admin.set(Sha256::digest(key.as_bytes()).into());
    }

    /// The principal of a request: its key when keys are configured, else its IP.
    /// `key` is the bearer token it presented; `forwarded_for`, the addresses its
    /// `X-Forwarded-For` headers list, in order.
    pub fn identify<'a>(
        &self,
        key: Option<&str>,
        forwarded_for: impl Iterator<Item = &'a str>,
        peer: Option<IpAddr>,
    ) -> Result<Principal, Refusal> {
        let keys = self.keys();
        if let (Some(admin), Some(presented)) = (self.admin.get(), key) {
            let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
            if bool::from(admin.ct_eq(&digest)) {
                return Err(Refusal::AdminKey);
            }
        }
        if keys.is_empty() && !self.managing.load(Ordering::Relaxed) {
            let ip = self.client_ip(forwarded_for, peer);
            return Ok(Principal {
                name: ip.map_or_else(|| "unknown".into(), |ip| client_name(ip).into()),
                policy: self.default_policy.clone(),
                keyed: false,
                team: None,
            });
        }
        let presented = key.ok_or(Refusal::InvalidKey)?;
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // Compare with every key, each in constant time, so timing tells nothing.
        let mut found = None;
        for key in keys.iter() {
            if bool::from(key.digest.ct_eq(&digest)) {
                found = Some(key);
            }
        }
        let key = found.ok_or(Refusal::InvalidKey)?;
        if key
            .until
            .is_some_and(|until| until <= std::time::SystemTime::now())
        {
            return Err(Refusal::InvalidKey);
        }
        Ok(Principal {
            name: key.name.clone(),
            policy: key.policy.clone(),
            keyed: true,
            team: key.team.clone(),
        })
    }

    /// The peer's address, or the client `X-Forwarded-For` names when the peer is a trusted
    /// proxy: the right-most address no trusted proxy added.
    fn client_ip<'a>(
        &self,
        forwarded_for: impl Iterator<Item = &'a str>,
        peer: Option<IpAddr>,
    ) -> Option<IpAddr> {
        let trusted = |ip: &IpAddr| self.trusted_proxies.iter().any(|net| net.contains(ip));
        let peer = peer?;
        if !trusted(&peer) {
            return Some(peer);
        }
        let forwarded = forwarded_for
            .flat_map(|v| v.split(','))
            .filter_map(|s| s.trim().parse::<IpAddr>().ok())
            .collect::<Vec<_>>();
        Some(
            forwarded
                .into_iter()
                .rev()
                .find(|ip| !trusted(ip))
                .unwrap_or(peer),
        )
    }

    /// Decides whether `who` may start a request for `model` now: the model is theirs to
    /// use, sluice has room, and they are within their request rate and stream count. The
    /// checks that cost nothing come first; tokens are counted and reserved afterwards
    /// ([`Permit::reserve`]). On yes, the permit holds a stream slot until it is dropped.
    /// With Redis, the limits are every instance's together.
    /// A key of a team is admitted by both, its own limits first.
    pub async fn admit(self: &Arc<Self>, who: &Principal, model: &str) -> Result<Permit, Refusal> {
        if !who.may_use(model) {
            return Err(Refusal::ModelNotAllowed(model.to_owned()));
        }
        let mut permit = self.admit_one(who).await?;
        if let Some(team) = &who.team {
            permit.team = Some(Box::new(self.admit_one(team).await?));
        }
        Ok(permit)
    }

    async fn admit_one(self: &Arc<Self>, who: &Principal) -> Result<Permit, Refusal> {
        let limits = &who.policy.limits;
        if let Some(shared) = &self.shared {
            let id = uuid::Uuid::new_v4().simple().to_string();
            match shared.admit(&who.name, limits, self.global_max, &id).await {
                Ok(decision) => return self.decided(who, decision, id),
                Err(e) => self.redis_failed(&e)?,
            }
            // Admitted here while Redis fails: its permit goes into Redis too once Redis
            // is back (the next refresh adds it), so the shared caps count it again.
            let mut permit = self.admit_locally(who)?;
            shared.adopt(&id, &who.name);
            permit.hold = Hold::Local {
                stream: true,
                shared: Some(id),
            };
            return Ok(permit);
        }
        self.admit_locally(who)
    }

    /// Admits a request that starts no stream of its own (a token count, a read of a stored
    /// stream): it counts against the client's request rate, in Redis when shared.
    pub async fn admit_request(self: &Arc<Self>, who: &Principal) -> Result<Quota, Refusal> {
        let limits = &who.policy.limits;
        if let Some(shared) = &self.shared {
            match shared.request(&who.name, limits).await {
                Ok(Decision::Requests { wait, reset }) => {
                    return Err(Refusal::Requests {
                        rpm: limits.rpm,
                        wait,
                        quota: Quota::requests(limits, 0, reset),
                    });
                }
                Ok(Decision::Admitted {
                    remaining_requests,
                    reset_requests,
                }) => return Ok(Quota::requests(limits, remaining_requests, reset_requests)),
                Ok(_) => return Err(Refusal::LimitsUnavailable),
                Err(e) => self.redis_failed(&e)?,
            }
        }
        self.requests_locally(who)
    }

    /// Admits a read of a stored stream: a request ([`Self::admit_request`]), and one of the
    /// client's reader slots (as many as its `max_streams`, in this instance) held until the
    /// [`Reader`] is dropped with its connection.
    pub async fn admit_read(self: &Arc<Self>, who: &Principal) -> Result<Reader, Refusal> {
        let quota = self.admit_request(who).await?;
        let max = who.policy.limits.max_streams;
        let mut readers = lock(&self.readers);
        let open = readers.entry(who.name.clone()).or_insert(0);
        if *open >= max {
            return Err(Refusal::TooManyReaders { max_readers: max });
        }
        *open += 1;
        Ok(Reader {
            admission: self.clone(),
            client: who.name.clone(),
            quota,
        })
    }

    /// The request rate in this instance: governor's verdict as a quota or a refusal.
    fn requests_locally(&self, who: &Principal) -> Result<Quota, Refusal> {
        let limits = &who.policy.limits;
        let period = Duration::from_secs(60) / limits.rpm.max(1);
        match who.policy.requests.check_key(&who.name) {
            Ok(snapshot) => {
                let requests = snapshot.remaining_burst_capacity();
                let reset = period * (limits.burst.saturating_sub(requests));
                Ok(Quota::requests(limits, requests, reset))
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                Err(Refusal::Requests {
                    rpm: limits.rpm,
                    wait,
                    quota: Quota::requests(limits, 0, period * limits.burst),
                })
            }
        }
    }

    /// Counts a Redis failure; fails closed (503) or lets this instance's own limits apply.
    fn redis_failed(&self, e: &redis::RedisError) -> Result<(), Refusal> {
        self.redis_errors.increment(1);
        if self.fail_closed {
            tracing::warn!(error = %e, "Redis is unreachable: refusing requests");
            return Err(Refusal::LimitsUnavailable);
        }
        tracing::warn!(error = %e, "Redis is unreachable: this instance's own limits apply");
        Ok(())
    }

    /// Redis's decision, as a permit or the same refusals as [`Self::admit_locally`]'s.
    fn decided(
        self: &Arc<Self>,
        who: &Principal,
        decision: Decision,
        id: String,
    ) -> Result<Permit, Refusal> {
        let limits = &who.policy.limits;
        match decision {
            Decision::Admitted {
                remaining_requests,
                reset_requests,
            } => Ok(Permit::of(
                self,
                who,
                Hold::Shared { id, give_back: 0 },
                Quota::requests(limits, remaining_requests, reset_requests),
            )),
            Decision::TooManyStreams {
                remaining_requests,
                reset_requests,
            } => Err(Refusal::TooManyStreams {
                max_streams: limits.max_streams,
                quota: Quota::requests(limits, remaining_requests, reset_requests),
            }),
            Decision::GlobalFull => Err(Refusal::Full {
                max_streams: self.global_max,
            }),
            Decision::Requests { wait, reset } => Err(Refusal::Requests {
                rpm: limits.rpm,
                wait,
                quota: Quota::requests(limits, 0, reset),
            }),
        }
    }

    /// This instance's own limits: without Redis, or when Redis fails open.
    fn admit_locally(self: &Arc<Self>, who: &Principal) -> Result<Permit, Refusal> {
        let limits = &who.policy.limits;
        // Stream slots: checked before anything is spent.
        let reserved_global = self
            .global_streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.global_max).then_some(n + 1)
            })
            .is_ok();
        if !reserved_global {
            return Err(Refusal::Full {
                max_streams: self.global_max,
            });
        }
        let mut permit = Permit::of(
            self,
            who,
            Hold::Local {
                stream: false,
                shared: None,
            },
            Quota::default(),
        );

        // Requests per minute: every answer from here on counts as a request.
        permit.quota = self.requests_locally(who)?;

        // This client's streams.
        let mut streams = lock(&self.streams);
        let open = streams.entry(who.name.clone()).or_insert(0);
        if *open >= limits.max_streams {
            return Err(Refusal::TooManyStreams {
                max_streams: limits.max_streams,
                quota: permit.quota.clone(),
            });
        }
        *open += 1;
        drop(streams);
        permit.hold = Hold::Local {
            stream: true,
            shared: None,
        };
        Ok(permit)
    }

    /// The background work admission needs, until `stop`: forgetting idle clients, and with
    /// Redis, refreshing this instance's permits and releasing ended ones.
    pub async fn maintain(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut purge = tokio::time::interval(Duration::from_secs(60));
        let mut refresh = tokio::time::interval(shared::REFRESH_EVERY);
        let mut count = tokio::time::interval(shared::COUNT_EVERY);
        let mut releases = lock(&self.releases).take();
        loop {
            let release = async {
                match releases.as_mut() {
                    Some(inbox) => inbox.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                _ = purge.tick() => self.purge(),
                _ = refresh.tick() => {
                    if let Some(shared) = &self.shared {
                        shared.refresh().await;
                        shared.retry_releases().await;
                    }
                }
                _ = count.tick(), if self.shared.is_some() => {
                    if let Some(shared) = &self.shared {
                        shared.count().await;
                    }
                }
                Some(release) = release => {
                    if let Some(shared) = &self.shared {
                        shared.apply(release).await;
                    }
                }
            }
        }
    }

    /// Forgets clients whose limits have recovered fully: nothing they did still counts.
    pub fn purge(&self) {
        self.default_policy.requests.retain_recent();
        self.default_policy.requests.shrink_to_fit();
        let keys = self.keys();
        for key in keys.iter() {
            key.policy.requests.retain_recent();
            if let Some(team) = &key.team {
                team.policy.requests.retain_recent();
            }
        }
        let tpm = |name: &Arc<str>| {
            keys.iter()
                .find(|k| k.name == *name)
                .map(|k| &k.policy)
                .or_else(|| {
                    keys.iter()
                        .filter_map(|k| k.team.as_ref())
                        .find(|t| t.name == *name)
                        .map(|t| &t.policy)
                })
                .unwrap_or(&self.default_policy)
                .limits
                .tpm
                .unwrap_or(u32::MAX)
        };
        lock(&self.tokens).retain(|name, bucket| bucket.until_full(tpm(name)) > Duration::ZERO);
        lock(&self.streams).retain(|_, open| *open > 0);
        lock(&self.readers).retain(|_, open| *open > 0);
    }

    fn keys(&self) -> Arc<Vec<StoredKey>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether no key is required: anyone may call.
    pub fn is_open(&self) -> bool {
        self.keys().is_empty() && !self.managing.load(Ordering::Relaxed)
    }

    /// Puts `keys` in place of the configured ones (a reload): a key whose name and limits
    /// are unchanged keeps its request limiter's state; a client already admitted keeps
    /// its permit.
    pub fn replace_keys(&self, keys: Vec<ApiKey>) {
        let old = self.keys();
        let keys = stored(keys, &self.default_policy, &old);
        *self.configured.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        self.merge();
    }

    /// Puts `keys` in place of the keys made through the admin API (as for
    /// [`Admission::replace_keys`], a key whose name and limits are unchanged keeps its
    /// state). Once any key has been made (`made`, live or not), sluice asks every client
    /// for one.
    pub fn replace_managed(&self, keys: Vec<ManagedKey>, made: bool) {
        self.managing.fetch_or(made, Ordering::Relaxed);
        let old = self.keys();
        let old_teams: Vec<Arc<Principal>> = old.iter().filter_map(|k| k.team.clone()).collect();
        let mut teams: Vec<Arc<Principal>> = Vec::new();
        let keys = keys
            .into_iter()
            .map(|key| {
                let team = key.team.map(|(name, limits)| {
                    let name = format!("{TEAM}{name}");
                    let known = teams
                        .iter()
                        .chain(old_teams.iter())
                        .find(|t| *t.name == *name && t.policy.limits == limits);
                    match known {
                        Some(team) => team.clone(),
                        None => {
                            let team = Arc::new(Principal {
                                name: name.into(),
                                policy: Policy::new(limits),
                                keyed: true,
                                team: None,
                            });
                            teams.push(team.clone());
                            team
                        }
                    }
                });
                StoredKey {
                    policy: kept_policy(&old, &key.name, key.limits),
                    name: key.name.into(),
                    digest: key.digest,
                    until: key.until,
                    team,
                }
            })
            .collect();
        *self.managed.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        self.merge();
    }

    /// Takes `want` from every budget in `accounts` (all of it, `whole`, or what each has
    /// left): the same of each; what one took past what a later one could give goes back.
    async fn take(
        &self,
        accounts: &[(Owner, budget::Budget)],
        want: Amount,
        whole: bool,
    ) -> Result<Taken, Refusal> {
        let failed = |e: &redis::RedisError| self.redis_failed(e);
        let mut taken: Vec<Amount> = Vec::with_capacity(accounts.len());
        let mut left: Option<Left> = None;
        let mut common = want;
        let mut least = 0;
        for (i, (owner, budget)) in accounts.iter().enumerate() {
            match self
                .balances
                .take(owner, budget, common, whole, failed)
                .await
            {
                Ok((got, after)) => {
                    if got != common {
                        least = i;
                    }
                    common = got;
                    taken.push(got);
                    left = Some(left.map_or(after, |l| l.min(after)));
                }
                Err(refusal) => {
                    for ((owner, budget), got) in accounts.iter().zip(&taken) {
                        self.balances.give(owner, budget, *got);
                    }
                    return Err(refusal);
                }
            }
        }
        for ((owner, budget), got) in accounts.iter().zip(&taken) {
            self.balances.give(owner, budget, got.minus(common));
        }
        Ok(Taken {
            amount: common,
            left,
            least,
        })
    }

    /// Ends the open streams of the key named `name` (revoked with `end_streams`): each at
    /// its next chunk, on this instance.
    pub fn end_streams(&self, name: &str) {
        for key in self.keys().iter().filter(|k| &*k.name == name) {
            key.policy.ended.store(true, Ordering::Relaxed);
        }
    }

    /// The streams each key has open: in Redis, every instance's (`true`), else (or when
    /// Redis fails) this instance's.
    pub async fn open_by_client(&self) -> (bool, Vec<(Arc<str>, u64)>) {
        let mut names: Vec<Arc<str>> = self.keys().iter().map(|k| k.name.clone()).collect();
        names.dedup();
        if let Some(shared) = &self.shared {
            let mut open = Vec::with_capacity(names.len());
            for name in &names {
                match shared.streams_of(name).await {
                    Ok(n) => open.push((name.clone(), n)),
                    Err(_) => break,
                }
            }
            if open.len() == names.len() {
                return (true, open);
            }
        }
        let streams = lock(&self.streams);
        let open = names
            .into_iter()
            .map(|name| {
                let n = streams.get(&name).copied().unwrap_or(0);
                (name, u64::from(n))
            })
            .collect();
        (false, open)
    }

    /// Budgets' balances start from what the ledger says was spent in their period.
    pub fn budget_history(&self, history: budget::History) {
        self.balances.with_history(history);
    }

    /// Whether keys have been made through the admin API (then a key is always required).
    pub fn manages_keys(&self) -> bool {
        self.managing.load(Ordering::Relaxed)
    }

    /// The names of the configured keys.
    pub fn configured_names(&self) -> Vec<Arc<str>> {
        let configured = self.configured.read().unwrap_or_else(|e| e.into_inner());
        configured.iter().map(|k| k.name.clone()).collect()
    }

    fn merge(&self) {
        let configured = self
            .configured
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let managed = self
            .managed
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let all = configured
            .iter()
            .chain(managed.iter())
            .map(|k| StoredKey {
                name: k.name.clone(),
                digest: k.digest,
                policy: k.policy.clone(),
                until: k.until,
                team: k.team.clone(),
            })
            .collect();
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(all);
    }

    /// How many clients sluice holds state for, in each of its tables.
    pub fn tracked(&self) -> (usize, usize, usize) {
        let requests = self.default_policy.requests.len()
            + self
                .keys()
                .iter()
                .map(|k| k.policy.requests.len())
                .sum::<usize>();
        (
            requests,
            lock(&self.tokens).len(),
            lock(&self.streams).len(),
        )
    }

    /// The Redis link limits are shared through, when they are: pools share theirs on it.
    pub fn shared(&self) -> Option<Arc<Shared>> {
        self.shared.clone()
    }

    pub fn open_streams(&self) -> usize {
        self.global_streams.load(Ordering::Acquire)
    }
}

/// Whose budget a client's is: a team's (its limits kept as `team:<name>`) or a key's.
fn owner(client: &Arc<str>) -> Owner {
    match client.strip_prefix(TEAM) {
        Some(team) => Owner {
            team: true,
            name: Arc::from(team),
        },
        None => Owner {
            team: false,
            name: client.clone(),
        },
    }
}

/// Keys as admission keeps them (digests), with the policy of an `old` key of the same name
/// and limits kept.
fn stored(keys: Vec<ApiKey>, default_policy: &Arc<Policy>, old: &[StoredKey]) -> Vec<StoredKey> {
    keys.into_iter()
        .map(|key| {
            let policy = match key.limits {
                None => default_policy.clone(),
                Some(limits) => kept_policy(old, &key.name, limits),
            };
            StoredKey {
                name: key.name.into(),
                digest: Sha256::digest(key.secret.as_bytes()).into(),
                policy,
                until: None,
                team: None,
            }
        })
        .collect()
}

/// The policy of the `old` key of this name and limits (its limiter's state kept), else a
/// new one.
fn kept_policy(old: &[StoredKey], name: &str, limits: Limits) -> Arc<Policy> {
    old.iter()
        .find(|k| *k.name == *name && k.policy.limits == limits)
        .map_or_else(|| Policy::new(limits), |k| k.policy.clone())
}

/// The stable name of a key given without one (`SLUICE_API_KEYS`): `key-` and the first 16
/// bytes of its SHA-256 in hex. The same key has the same name on every instance and in
/// every order, so ownership of streams and limits in Redis survive a rotation; the key
/// itself cannot be read back from it.
pub fn key_name(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    let mut name = String::with_capacity(4 + 32);
    name.push_str("key-");
    for byte in &digest[..16] {
        use std::fmt::Write as _;
        let _ = write!(name, "{byte:02x}");
    }
    name
}

/// The name a client without a key is limited by: its IPv4 address, or its IPv6 /64 (one
/// host usually holds a whole /64, so per address would let it multiply its limits).
fn client_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let net = ipnet::Ipv6Net::new(v6, 64).map(|n| n.trunc());
                net.map_or_else(|_| v6.to_string(), |n| n.to_string())
            }
        },
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A token bucket that gives back what a request reserved and did not use: governor's GCRA
/// cannot return capacity, so tokens per minute keep their own small bucket.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    fn full(capacity: u32) -> Self {
        Bucket {
            tokens: f64::from(capacity),
            updated: Instant::now(),
        }
    }

    fn refill(&mut self, capacity: u32) {
        let now = Instant::now();
        let rate = f64::from(capacity) / 60.0;
        self.tokens =
            (self.tokens + rate * (now - self.updated).as_secs_f64()).min(f64::from(capacity));
        self.updated = now;
    }

    /// `Err(None)`: can never fit; `Err(Some(wait))`: fits after `wait`.
    fn reserve(&mut self, capacity: u32, n: u32) -> Result<(), Option<Duration>> {
        if n > capacity {
            return Err(None);
        }
        self.refill(capacity);
        let n = f64::from(n);
        if self.tokens >= n {
            self.tokens -= n;
            return Ok(());
        }
        let rate = f64::from(capacity) / 60.0;
        Err(Some(Duration::from_secs_f64((n - self.tokens) / rate)))
    }

    /// Gives back `n` tokens (negative: takes more, for a reply that used more).
    fn give_back(&mut self, capacity: u32, n: f64) {
        self.refill(capacity);
        self.tokens = (self.tokens + n).min(f64::from(capacity));
    }

    fn available(&self, capacity: u32) -> u32 {
        self.tokens.clamp(0.0, f64::from(capacity)) as u32
    }

    fn until_full(&mut self, capacity: u32) -> Duration {
        self.refill(capacity);
        let rate = f64::from(capacity) / 60.0;
        Duration::from_secs_f64((f64::from(capacity) - self.tokens).max(0.0) / rate)
    }
}

/// An admitted request's hold on its client's limits: a stream slot while it lives, and a
/// token reservation settled to the real usage by [`Permit::settle`] (or given back whole).
pub struct Permit {
    admission: Arc<Admission>,
    client: Arc<str>,
    policy: Arc<Policy>,
    /// The client's tokens per minute, when limited.
    tpm: Option<u32>,
    reserved: u32,
    hold: Hold,
    quota: Quota,
    /// The team's permit, for a key of a team.
    team: Option<Box<Permit>>,
    /// What the stream holds of its budgets, once [`Permit::budget`] took its first slice.
    spending: Option<Spending>,
}

/// What a take from several budgets took: the same of each; the least left after it; the
/// account that gave least.
struct Taken {
    amount: Amount,
    left: Option<Left>,
    least: usize,
}

/// A stream's hold on its budgets (its key's, its team's): what it holds of each, and the
/// price its chunks are charged at.
struct Spending {
    accounts: Vec<(Owner, budget::Budget)>,
    price: Option<crate::prices::Price>,
    /// Taken from every account, not yet spent or given back.
    held: Amount,
    /// Spent so far, as the stream counted it.
    used: Amount,
}

/// Where the permit's stream slot is held.
enum Hold {
    /// In this instance: always a global slot, and the client's once `stream` is set;
    /// admitted while Redis failed, also in Redis under `shared` once it is back.
    Local {
        stream: bool,
        shared: Option<String>,
    },
    /// In Redis, under `id`; `give_back` is what settling returns, applied on release.
    Shared { id: String, give_back: i64 },
}

impl Permit {
    fn of(admission: &Arc<Admission>, who: &Principal, hold: Hold, quota: Quota) -> Self {
        Permit {
            admission: admission.clone(),
            client: who.name.clone(),
            policy: who.policy.clone(),
            tpm: who.policy.limits.tpm,
            reserved: 0,
            hold,
            quota,
            team: None,
            spending: None,
        }
    }

    /// The client's standing after this request: for `x-ratelimit-*`.
    pub fn quota(&self) -> &Quota {
        &self.quota
    }

    pub fn client(&self) -> &str {
        &self.client
    }

    /// The key was revoked with its streams ended.
    pub fn ended(&self) -> bool {
        self.policy.ended.load(Ordering::Relaxed)
    }

    /// Whether the stream is held to a budget.
    pub fn budgeted(&self) -> bool {
        self.spending.is_some()
    }

    /// Admits the request to its budgets (its key's, its team's): its prompt and a first
    /// slice of output must fit what is left, at `price` (none: only a tokens budget
    /// counts it). Refused: 429 `insufficient_quota`, until the period resets.
    pub async fn budget(
        &mut self,
        prompt_tokens: u32,
        price: Option<crate::prices::Price>,
    ) -> Result<(), Refusal> {
        let accounts: Vec<_> = std::iter::once(self as &Permit)
            .chain(self.team.as_deref())
            .filter_map(|permit| Some((owner(&permit.client), permit.policy.limits.budget?)))
            .collect();
        if accounts.is_empty() {
            return Ok(());
        }
        let want = Amount::of(
            price.as_ref(),
            prompt_tokens,
            budget::SLICE_TOKENS,
            Default::default(),
        );
        let taken = self.admission.take(&accounts, want, true).await?;
        self.quota.budget = taken.left;
        self.spending = Some(Spending {
            accounts,
            price,
            held: taken.amount,
            used: Amount::default(),
        });
        Ok(())
    }

    /// The stream has used `prompt` and `completion` tokens so far: charged to what it
    /// holds, drawing another slice when that is spent. `Err` when its budget has run out
    /// (the stream ends at this chunk). Arithmetic, unless a slice is drawn.
    pub async fn spend(&mut self, prompt: u32, completion: u32) -> Result<(), Exhausted> {
        let Some(spending) = &mut self.spending else {
            return Ok(());
        };
        let price = spending.price.as_ref();
        spending.used = Amount::of(price, prompt, completion, Default::default());
        if spending.held.covers(spending.used) {
            return Ok(());
        }
        let slice = Amount::of(price, 0, budget::SLICE_TOKENS, Default::default());
        let short = spending
            .used
            .minus(spending.held)
            .at_least_zero()
            .plus(slice);
        match self.admission.take(&spending.accounts, short, false).await {
            Ok(taken) => {
                spending.held = spending.held.plus(taken.amount);
                if spending.held.covers(spending.used) {
                    return Ok(());
                }
                let (owner, budget) = spending.accounts[taken.least].clone();
                let usd_short = spending.held.nanos < spending.used.nanos;
                Err(Exhausted {
                    owner,
                    side: if budget.usd.is_some() && usd_short {
                        "usd"
                    } else {
                        "tokens"
                    },
                    reset: budget::reset(&budget),
                    budget,
                })
            }
            Err(Refusal::Budget(exhausted)) => Err(exhausted),
            // Redis failed and sluice fails closed: the stream goes on with what it holds
            // rather than fail a reply it has started; its account is charged at the end.
            Err(_) => Ok(()),
        }
    }

    /// The stream ended having used `prompt` and `completion` tokens (its usage, as it is
    /// billed): what it held and did not use goes back to its budgets.
    pub fn charge(&mut self, prompt: u32, completion: u32, details: crate::prices::Details) {
        if let Some(spending) = &mut self.spending {
            spending.used = Amount::of(spending.price.as_ref(), prompt, completion, details);
        }
        self.give_back();
    }

    /// What the stream held and did not use goes back (negative: what it used past it is
    /// charged), once.
    fn give_back(&mut self) {
        if let Some(spending) = self.spending.take() {
            let back = spending.held.minus(spending.used);
            for (owner, budget) in &spending.accounts {
                self.admission.balances.give(owner, budget, back);
            }
        }
    }

    /// Reserves `tokens` (prompt and the most the reply may use) of the client's tokens per
    /// minute, when they are limited; settled to the real usage by [`Permit::settle`].
    /// Refused: 429 when they fit later, 400 naming `max_tokens` when they never can.
    pub async fn reserve(&mut self, tokens: u32) -> Result<(), Refusal> {
        if let Some(team) = &mut self.team {
            Box::pin(team.reserve(tokens)).await?;
        }
        let Some(tpm) = self.tpm else {
            return Ok(());
        };
        let refused = |wait, quota: &Quota| Refusal::Tokens {
            tpm,
            wait,
            quota: quota.clone(),
        };
        if let (Hold::Shared { .. }, Some(shared)) = (&self.hold, &self.admission.shared) {
            match shared.reserve(&self.client, tpm, tokens).await {
                Ok(TokenDecision::Reserved { left, reset }) => {
                    self.reserved = tokens;
                    self.quota.tokens(tpm, left, reset);
                    return Ok(());
                }
                Ok(TokenDecision::NeverFits) => return Err(Refusal::NeverFits { tokens, tpm }),
                Ok(TokenDecision::Wait { wait, left, reset }) => {
                    self.quota.tokens(tpm, left, reset);
                    return Err(refused(wait, &self.quota));
                }
                Err(e) => {
                    // Failing open: this request's tokens go uncounted.
                    self.admission.redis_failed(&e)?;
                    return Ok(());
                }
            }
        }
        let mut buckets = lock(&self.admission.tokens);
        let bucket = buckets
            .entry(self.client.clone())
            .or_insert_with(|| Bucket::full(tpm));
        let reserved = bucket.reserve(tpm, tokens);
        self.quota
            .tokens(tpm, bucket.available(tpm), bucket.until_full(tpm));
        match reserved {
            Ok(()) => {
                self.reserved = tokens;
                Ok(())
            }
            Err(None) => Err(Refusal::NeverFits { tokens, tpm }),
            Err(Some(wait)) => Err(refused(wait, &self.quota)),
        }
    }

    /// Charges `used` tokens in place of the reservation: the rest comes back.
    pub fn settle(&mut self, used: u32) {
        if let Some(team) = &mut self.team {
            team.settle(used);
        }
        let reserved = std::mem::take(&mut self.reserved);
        let Some(tpm) = self.tpm else {
            return;
        };
        let give_back = i64::from(reserved) - i64::from(used);
        match &mut self.hold {
            Hold::Shared {
                give_back: pending, ..
            } => *pending += give_back,
            Hold::Local { .. } => {
                if let Some(bucket) = lock(&self.admission.tokens).get_mut(&self.client) {
                    bucket.give_back(tpm, give_back as f64);
                }
            }
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.reserved > 0 {
            self.settle(0);
        }
        // Not charged yet (the stream was never metered): what it held goes back.
        self.give_back();
        match &mut self.hold {
            Hold::Local { stream, shared } => {
                if *stream && let Some(open) = lock(&self.admission.streams).get_mut(&self.client) {
                    *open = open.saturating_sub(1);
                }
                self.admission.global_streams.fetch_sub(1, Ordering::AcqRel);
                if let (Some(id), Some(redis)) = (shared.take(), &self.admission.shared) {
                    redis.release(Release {
                        client: self.client.clone(),
                        id,
                        tpm: 0,
                        give_back: 0,
                    });
                }
            }
            Hold::Shared { id, give_back } => {
                if let Some(shared) = &self.admission.shared {
                    shared.release(Release {
                        client: self.client.clone(),
                        id: std::mem::take(id),
                        tpm: self.tpm.unwrap_or(0),
                        give_back: *give_back,
                    });
                }
            }
        }
    }
}

/// A connection's hold on one of its client's reader slots.
pub struct Reader {
    admission: Arc<Admission>,
    client: Arc<str>,
    quota: Quota,
}

impl Reader {
    /// The client's standing after this request: for `x-ratelimit-*`.
    pub fn quota(&self) -> &Quota {
        &self.quota
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        if let Some(open) = lock(&self.admission.readers).get_mut(&self.client) {
            *open = open.saturating_sub(1);
        }
    }
}

/// Why a request was not admitted, with what the client may be told.
#[derive(Debug, Clone)]
pub enum Refusal {
    /// No key, or a key sluice does not know.
    InvalidKey,
    /// The admin key, which cannot call inference.
    AdminKey,
    /// The key may not use this model.
    ModelNotAllowed(String),
    /// sluice as a whole has `max_streams` open.
    Full { max_streams: usize },
    /// Limits are kept in Redis, which cannot be reached, and sluice fails closed.
    LimitsUnavailable,
    /// The client has `max_streams` open.
    TooManyStreams { max_streams: u32, quota: Quota },
    /// The client reads as many stored streams at once as it may (its `max_streams`).
    TooManyReaders { max_readers: u32 },
    /// The stream has `SLUICE_MAX_READERS` connections reading it.
    StreamReaders { max_readers: usize },
    /// Over the requests per minute.
    Requests {
        rpm: u32,
        wait: Duration,
        quota: Quota,
    },
    /// More tokens than the per-minute limit could ever hold.
    NeverFits { tokens: u32, tpm: u32 },
    /// Over the tokens per minute for now.
    Tokens {
        tpm: u32,
        wait: Duration,
        quota: Quota,
    },
    /// A budget (the key's or its team's) has nothing left for the request.
    Budget(Exhausted),
}

/// A client's standing against its limits, as OpenAI's `x-ratelimit-*` headers tell it.
#[derive(Debug, Clone, Default)]
pub struct Quota {
    pub requests: Option<Window>,
    pub tokens: Option<Window>,
    /// What the budgets (the key's, its team's) have left, the least of them.
    pub budget: Option<Left>,
}

/// One limit: its size, what is left, and when it is whole again.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub limit: u32,
    pub remaining: u32,
    pub reset: Duration,
}

impl Quota {
    fn requests(limits: &Limits, remaining: u32, reset: Duration) -> Self {
        Quota {
            requests: Some(Window {
                limit: limits.rpm,
                remaining,
                reset,
            }),
            tokens: None,
            budget: None,
        }
    }

    fn tokens(&mut self, limit: u32, remaining: u32, reset: Duration) {
        self.tokens = Some(Window {
            limit,
            remaining,
            reset,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_are_limited_per_64() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("an address");
        assert_eq!(client_name(ip("2001:db8:1:2:aaaa::1")), "2001:db8:1:2::/64");
        assert_eq!(
            client_name(ip("2001:db8:1:2:bbbb::9")),
            client_name(ip("2001:db8:1:2:aaaa::1"))
        );
        assert_ne!(
            client_name(ip("2001:db8:1:3::1")),
            client_name(ip("2001:db8:1:2::1"))
        );
        assert_eq!(client_name(ip("::ffff:10.0.0.1")), "10.0.0.1");
        assert_eq!(client_name(ip("10.0.0.1")), "10.0.0.1");
    }

    #[test]
    fn a_bucket_gives_back_what_was_not_used() {
        let mut bucket = Bucket::full(600);
        assert!(bucket.reserve(600, 500).is_ok());
        assert!(matches!(bucket.reserve(600, 500), Err(Some(_))));
        bucket.give_back(600, 400.0);
        assert!(bucket.reserve(600, 450).is_ok());
        assert!(matches!(bucket.reserve(600, 601), Err(None)));
    }
}
