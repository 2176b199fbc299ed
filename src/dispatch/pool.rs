//! Pools: a route's deployments of one model, and how a stream gets one of them. Balance
//! (smooth weighted round robin, least busy for its weight, or the lowest recent time to
//! first token), health (a target failing a few times in a row is ejected for a back-off,
//! then one request probes it; an upstream's `Retry-After` ejects it for that long) and room
//! (each target's `max_streams`; a bounded queue per route when every target is full).
//!
//! A target's state ([`TargetState`]: open streams, health, recent time to first token) is
//! kept by its identity across reloads of the configuration, so a stream that started
//! before a reload still counts against its target's cap, and an ejected target stays out.

use std::collections::HashMap;
use std::hash::{BuildHasher as _, Hasher as _};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Notify;

use super::shared::SharedPools;
use crate::backend::{Backend, BackendError};

/// Failures in a row that take a target out of its pool.
pub const EJECT_AFTER: u32 = 3;
/// The first ejection's length; each one in a row doubles it, up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(10);
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Under `latency`, one request in this many goes to another target, so that a target
/// that got faster is seen to.
const EXPLORE_ONE_IN: u64 = 20;
/// Weight of the newest sample in the moving averages (time to first token, stream length).
const EWMA_NEW: f64 = 0.3;

/// How a pool picks a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    Weighted,
    LeastBusy,
    Latency,
}

impl Balance {
    pub fn parse(name: Option<&str>) -> Balance {
        match name {
            Some("least-busy") => Balance::LeastBusy,
            Some("latency") => Balance::Latency,
            _ => Balance::Weighted,
        }
    }
}

/// A backend of a route and the name it knows the model by.
#[derive(Clone)]
pub struct Target {
    pub backend: Arc<dyn Backend>,
    /// The model's name at this target; `None`: the name the client asked for.
    pub model: Option<String>,
    pub weight: u32,
    pub max_streams: Option<u32>,
    pub state: Arc<TargetState>,
}

impl Target {
    /// A target with no cap, of weight 1.
    pub fn new(backend: Arc<dyn Backend>, model: Option<String>, state: Arc<TargetState>) -> Self {
        Target {
            backend,
            model,
            weight: 1,
            max_streams: None,
            state,
        }
    }
}

/// What a target is doing now: the part of it that outlives a reload.
pub struct TargetState {
    /// `model@url`: its name in `/readyz` and its metric label (from the configuration).
    pub name: Arc<str>,
    open: AtomicU32,
    /// Streams started on it, ever.
    started: AtomicU64,
    health: Mutex<Health>,
    /// Recent time to first token in µs (a moving average); 0 before the first.
    ttft_us: AtomicU64,
    /// Told when a stream of this target ends or it comes back: queued requests look again.
    room: Notify,
}

#[derive(Default)]
struct Health {
    /// Failures in a row.
    failures: u32,
    /// Ejections in a row: the next back-off is `FIRST_BACKOFF << level`.
    level: u32,
    /// Out until then; once past, the next request is its probe.
    ejected_until: Option<Instant>,
    /// Its probe is in flight.
    probing: bool,
    /// The ejection came from another instance, through Redis.
    remote: bool,
}

/// A target's health as `/readyz` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Condition {
    Healthy,
    Ejected,
    /// Its back-off is over: the next request to it is its probe.
    Probing,
}

impl TargetState {
    pub fn new(name: &str) -> Arc<Self> {
        Arc::new(TargetState {
            name: name.into(),
            open: AtomicU32::new(0),
            started: AtomicU64::new(0),
            health: Mutex::default(),
            ttft_us: AtomicU64::new(0),
            room: Notify::new(),
        })
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn open(&self) -> u32 {
        self.open.load(Ordering::Acquire)
    }

    /// Streams started on it, ever.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// Recent time to first token; zero before the first.
    pub fn ttft(&self) -> Duration {
        Duration::from_micros(self.ttft_us.load(Ordering::Relaxed))
    }

    pub fn condition(&self, now: Instant) -> Condition {
        match self.health().ejected_until {
            None => Condition::Healthy,
            Some(until) if until > now => Condition::Ejected,
            Some(_) => Condition::Probing,
        }
    }

    /// How long it stays out, when it is out.
    pub fn ejected_for(&self, now: Instant) -> Option<Duration> {
        self.health()
            .ejected_until
            .map(|until| until.saturating_duration_since(now))
    }

    /// Ejected (by this instance or another) for `wait` from now: the longer of that and
    /// what it is already out for.
    pub fn eject(&self, wait: Duration, remote: bool) {
        let until = Instant::now() + wait;
        let mut health = self.health();
        if health.ejected_until.is_none_or(|now| now < until) {
            health.ejected_until = Some(until);
            health.remote = remote;
        }
    }

    /// Back, as another instance found it (its ejection is gone from Redis).
    pub fn restore_remote(&self) {
        let mut health = self.health();
        if health.remote && !health.probing {
            *health = Health::default();
            drop(health);
            self.room.notify_waiters();
        }
    }

    fn record_ttft(&self, ttft: Duration) {
        let sample = ttft.as_micros().min(u128::from(u32::MAX)) as f64;
        let old = self.ttft_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            old as f64 * (1.0 - EWMA_NEW) + sample * EWMA_NEW
        };
        self.ttft_us.store(new.max(1.0) as u64, Ordering::Relaxed);
    }
}

/// A target's back-off after `level` ejections in a row.
pub fn backoff(level: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1 << level.min(16))
        .min(MAX_BACKOFF)
}

/// Target states by identity, for as long as something (a pool, a stream) holds them.
#[derive(Default)]
pub struct Registry(Mutex<HashMap<String, Weak<TargetState>>>);

impl Registry {
    /// The state of the target `identity` names: the one it had, or a new one named `name`.
    pub fn state(&self, identity: &str, name: &str) -> Arc<TargetState> {
        let mut known = self.0.lock().unwrap_or_else(|e| e.into_inner());
        known.retain(|_, state| state.strong_count() > 0);
        if let Some(state) = known.get(identity).and_then(Weak::upgrade) {
            return state;
        }
        let state = TargetState::new(name);
        known.insert(identity.to_owned(), Arc::downgrade(&state));
        state
    }
}

/// Why no target of a pool could take a stream now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRoom {
    /// Every one it may use is at its `max_streams`.
    Full,
    /// Every one is ejected (or tried already); the first is back in this long.
    Down(Duration),
}

/// The bounded queue of a pool whose targets are all full.
struct Queue {
    max: u32,
    timeout: Duration,
    waiting: AtomicU32,
    /// How long a stream holds its target, in µs (a moving average): what a wait is told.
    held_us: AtomicU64,
}

/// A route's deployments of one model.
pub struct Pool {
    pub balance: Balance,
    pub targets: Vec<Target>,
    /// Health applies to a pool of several: a pool of one is always tried, as it is all
    /// there is.
    guarded: bool,
    /// The current weights of smooth weighted round robin.
    current: Mutex<Vec<i64>>,
    queue: Queue,
    shared: Option<Arc<SharedPools>>,
}

/// How a pool is set up.
pub struct PoolSettings {
    pub balance: Balance,
    pub queue: u32,
    pub queue_timeout: Duration,
    pub shared: Option<Arc<SharedPools>>,
}

impl Pool {
    pub fn new(targets: Vec<Target>, settings: PoolSettings) -> Arc<Self> {
        Arc::new(Pool {
            balance: settings.balance,
            guarded: targets.len() > 1,
            current: Mutex::new(vec![0; targets.len()]),
            targets,
            queue: Queue {
                max: settings.queue,
                timeout: settings.queue_timeout,
                waiting: AtomicU32::new(0),
                held_us: AtomicU64::new(0),
            },
            shared: settings.shared,
        })
    }

    /// A pool of one target with no cap.
    pub fn single(target: Target) -> Arc<Self> {
        Pool::new(
            vec![target],
            PoolSettings {
                balance: Balance::Weighted,
                queue: 0,
                queue_timeout: Duration::from_secs(1),
                shared: None,
            },
        )
    }

    /// Requests waiting for room now.
    pub fn waiting(&self) -> u32 {
        self.queue.waiting.load(Ordering::Acquire)
    }

    pub fn queue_limit(&self) -> u32 {
        self.queue.max
    }

    /// Picks a target not in `tried` (a bit per target) and takes a stream slot on it, at
    /// once: a full pool is not waited for.
    pub async fn lease(self: &Arc<Self>, tried: &mut u64) -> Result<Lease, NoRoom> {
        // Full in Redis (every instance's streams) though not here: not asked again.
        let mut full_elsewhere = 0_u64;
        loop {
            let lease = self.take(*tried | full_elsewhere, Instant::now());
            let mut lease = match lease {
                Ok(lease) => lease,
                Err(NoRoom::Down(_)) if full_elsewhere != 0 => return Err(NoRoom::Full),
                Err(e) => return Err(e),
            };
            if let (Some(shared), Some(max)) = (&self.shared, lease.target().max_streams) {
                match shared.hold(&lease.target().state.name, max).await {
                    Ok(Some(id)) => lease.held = Some(id),
                    Ok(None) => {
                        full_elsewhere |= 1 << lease.index;
                        lease.abandon();
                        continue;
                    }
                    // Redis unreachable: this instance's own count applies.
                    Err(()) => {}
                }
            }
            *tried |= 1 << lease.index;
            lease.target().state.started.fetch_add(1, Ordering::Relaxed);
            return Ok(lease);
        }
    }

    /// A stream slot on some target, waiting in the pool's queue while every target is
    /// full: at most `queue` requests wait, each at most `queue_timeout`. Refused: `Full`
    /// with how long a wait would be, or `Down`. A waiting request that is dropped (its
    /// client left) leaves the queue at once.
    pub async fn wait(self: &Arc<Self>) -> Result<Lease, (NoRoom, Duration)> {
        match self.lease(&mut 0).await {
            Ok(lease) => return Ok(lease),
            Err(NoRoom::Down(back)) => return Err((NoRoom::Down(back), back)),
            Err(NoRoom::Full) => {}
        }
        let queue = &self.queue;
        let ahead = queue.waiting.fetch_add(1, Ordering::AcqRel);
        let _place = Waiting(&queue.waiting);
        if ahead >= queue.max {
            return Err((NoRoom::Full, self.estimate(ahead)));
        }
        let deadline = tokio::time::Instant::now() + queue.timeout;
        loop {
            // Listening before looking: a slot freed in between is not missed.
            let mut freed: Vec<_> = self
                .targets
                .iter()
                .map(|t| Box::pin(t.state.room.notified()))
                .collect();
            for notified in &mut freed {
                notified.as_mut().enable();
            }
            match self.lease(&mut 0).await {
                Ok(lease) => return Ok(lease),
                Err(NoRoom::Down(back)) => return Err((NoRoom::Down(back), back)),
                Err(NoRoom::Full) => {}
            }
            // Slots freed on other instances are not told here: look again now and then.
            let elsewhere = if self.shared.is_some() {
                Duration::from_millis(100)
            } else {
                queue.timeout
            };
            tokio::select! {
                _ = futures::future::select_all(freed) => {}
                () = tokio::time::sleep(elsewhere) => {}
                () = tokio::time::sleep_until(deadline) => {
                    let ahead = self.waiting().saturating_sub(1);
                    return Err((NoRoom::Full, self.estimate(ahead)));
                }
            }
        }
    }

    /// When a slot is likely to be free for a request with `ahead` others before it: slots
    /// free at the pool's capacity over the time a stream holds one.
    fn estimate(&self, ahead: u32) -> Duration {
        let slots: u64 = self
            .targets
            .iter()
            .map(|t| u64::from(t.max_streams.unwrap_or(1)))
            .sum();
        let held = self.queue.held_us.load(Ordering::Relaxed).max(1_000_000);
        let wait = (u64::from(ahead) + 1) * held / slots.max(1);
        Duration::from_secs(wait.div_ceil(1_000_000).clamp(1, 300))
    }

    /// The choice and the local slot, under no await.
    fn take(self: &Arc<Self>, tried: u64, now: Instant) -> Result<Lease, NoRoom> {
        let mut excluded = tried;
        loop {
            let index = self.choose(excluded, now)?;
            let target = &self.targets[index];
            let max = target.max_streams.unwrap_or(u32::MAX);
            let taken = target
                .state
                .open
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < max).then_some(n + 1)
                })
                .is_ok();
            if !taken {
                // Filled between the look and the take.
                excluded |= 1 << index;
                continue;
            }
            let probe = self.guarded && {
                let mut health = target.state.health();
                match health.ejected_until {
                    Some(until) if until <= now && !health.probing => {
                        health.probing = true;
                        true
                    }
                    _ => false,
                }
            };
            return Ok(Lease {
                pool: self.clone(),
                index,
                probe,
                settled: false,
                held: None,
                since: Instant::now(),
            });
        }
    }

    /// The target a new stream should go to, among those not `excluded` (a bit each) that
    /// have room and are in (or due a probe, which comes first).
    pub fn choose(&self, excluded: u64, now: Instant) -> Result<usize, NoRoom> {
        let mut usable = 0_u64;
        let mut full = false;
        let mut back: Option<Duration> = None;
        for (i, target) in self.targets.iter().enumerate() {
            if excluded & (1 << i) != 0 {
                continue;
            }
            if self.guarded {
                let health = target.state.health();
                match health.ejected_until {
                    Some(until) if until > now => {
                        let wait = until - now;
                        back = Some(back.map_or(wait, |b| b.min(wait)));
                        continue;
                    }
                    Some(_) if health.probing => {
                        back = Some(Duration::from_secs(1));
                        continue;
                    }
                    Some(_)
                        if target
                            .max_streams
                            .is_none_or(|max| target.state.open() < max) =>
                    {
                        // Due a probe: it goes first, so that a recovered target is seen.
                        return Ok(i);
                    }
                    _ => {}
                }
            }
            if target
                .max_streams
                .is_some_and(|max| target.state.open() >= max)
            {
                full = true;
                continue;
            }
            usable |= 1 << i;
        }
        if usable == 0 {
            return Err(if full {
                NoRoom::Full
            } else {
                NoRoom::Down(back.unwrap_or(Duration::from_secs(1)))
            });
        }
        let candidates = || {
            self.targets
                .iter()
                .enumerate()
                .filter(move |(i, _)| usable & (1 << i) != 0)
        };
        Ok(match self.balance {
            Balance::Weighted => {
                let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
                let mut total = 0_i64;
                let mut best: Option<usize> = None;
                for (i, target) in candidates() {
                    let weight = i64::from(target.weight);
                    current[i] += weight;
                    total += weight;
                    if best.is_none_or(|b| current[i] > current[b]) {
                        best = Some(i);
                    }
                }
                let best = best.unwrap_or(0);
                current[best] -= total;
                best
            }
            Balance::LeastBusy => {
                // open / weight, compared without division; ties broken at random.
                let load = |t: &Target| (u64::from(t.state.open()), u64::from(t.weight.max(1)));
                let least = candidates()
                    .map(|(_, t)| load(t))
                    .min_by(|(oa, wa), (ob, wb)| (oa * wb).cmp(&(ob * wa)))
                    .unwrap_or((0, 1));
                let tied: Vec<usize> = candidates()
                    .filter(|(_, t)| {
                        let (o, w) = load(t);
                        o * least.1 == least.0 * w
                    })
                    .map(|(i, _)| i)
                    .collect();
                tied[(random() % tied.len().max(1) as u64) as usize]
            }
            Balance::Latency => {
                let all: Vec<usize> = candidates().map(|(i, _)| i).collect();
                let roll = random();
                if all.len() > 1 && roll.is_multiple_of(EXPLORE_ONE_IN) {
                    all[((roll / EXPLORE_ONE_IN) % all.len() as u64) as usize]
                } else {
                    let fastest = candidates()
                        .map(|(_, t)| t.state.ttft_us.load(Ordering::Relaxed))
                        .min()
                        .unwrap_or(0);
                    let tied: Vec<usize> = candidates()
                        .filter(|(_, t)| t.state.ttft_us.load(Ordering::Relaxed) == fastest)
                        .map(|(i, _)| i)
                        .collect();
                    tied[((roll / EXPLORE_ONE_IN) % tied.len().max(1) as u64) as usize]
                }
            }
        })
    }

    /// Whether any target is left that `tried` does not name.
    pub fn untried(&self, tried: u64) -> bool {
        (0..self.targets.len()).any(|i| tried & (1 << i) == 0)
    }
}

/// A place in a queue, given up when dropped.
struct Waiting<'a>(&'a AtomicU32);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A random number, from the standard library's per-process random hash keys.
fn random() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(NEXT.fetch_add(1, Ordering::Relaxed));
    hasher.finish()
}

/// A stream's slot on one target: held while the stream lives, and the way its outcome
/// reaches the target's health.
pub struct Lease {
    pool: Arc<Pool>,
    index: usize,
    /// This stream is the target's probe.
    probe: bool,
    /// Its outcome was told.
    settled: bool,
    /// Its permit id in Redis, when the cap is shared.
    held: Option<String>,
    since: Instant,
}

impl Lease {
    pub fn index(&self) -> usize {
        self.index
    }

    pub fn target(&self) -> &Target {
        &self.pool.targets[self.index]
    }

    /// The first token came after `ttft`: the target is well.
    pub fn succeeded(&mut self, ttft: Duration) {
        self.settled = true;
        let state = &self.target().state;
        state.record_ttft(ttft);
        if !self.pool.guarded {
            return;
        }
        let mut health = state.health();
        let was_out = health.ejected_until.is_some();
        *health = Health::default();
        drop(health);
        if was_out {
            tracing::info!(target = %state.name, "the upstream answered its probe: back in its pool");
            state.room.notify_waiters();
            if let Some(shared) = &self.pool.shared {
                shared.restored(&state.name);
            }
        }
    }

    /// Failed before the first byte with `error`: a failure in a row, perhaps an ejection.
    pub fn failed(&mut self, error: &BackendError) {
        self.settled = true;
        if !self.pool.guarded {
            return;
        }
        let state = &self.target().state;
        let mut health = state.health();
        health.failures += 1;
        let told = match error {
            BackendError::RateLimited {
                retry_after: Some(wait),
                ..
            }
            | BackendError::Overloaded {
                retry_after: wait, ..
            } if !wait.is_zero() => Some((*wait).min(MAX_BACKOFF)),
            _ => None,
        };
        let wait = if let Some(wait) = told {
            Some(wait)
        } else if self.probe || health.failures >= EJECT_AFTER {
            let wait = backoff(health.level);
            health.level += 1;
            Some(wait)
        } else {
            None
        };
        health.probing = false;
        if let Some(wait) = wait {
            health.failures = 0;
            health.ejected_until = Some(Instant::now() + wait);
            health.remote = false;
            drop(health);
            tracing::warn!(target = %state.name, error = %error, seconds = wait.as_secs(), "upstream ejected from its pool");
            if let Some(shared) = &self.pool.shared {
                shared.ejected(&state.name, wait);
            }
        }
    }

    /// Given back before it was used (full in Redis).
    fn abandon(mut self) {
        self.settled = true;
        if self.probe {
            self.target().state.health().probing = false;
            self.probe = false;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let state = &self.pool.targets[self.index].state;
        state.open.fetch_sub(1, Ordering::AcqRel);
        if self.probe && !self.settled {
            // Cancelled before it told anything: another request may probe.
            state.health().probing = false;
        }
        if self.settled {
            let held = self.since.elapsed().as_micros().min(u128::from(u32::MAX)) as f64;
            let queue = &self.pool.queue;
            let old = queue.held_us.load(Ordering::Relaxed) as f64;
            let new = if old == 0.0 {
                held
            } else {
                old * (1.0 - EWMA_NEW) + held * EWMA_NEW
            };
            queue.held_us.store(new as u64, Ordering::Relaxed);
        }
        if let (Some(shared), Some(id)) = (&self.pool.shared, self.held.take()) {
            shared.release(&state.name, id);
        }
        state.room.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::mock::MockBackend;

    fn pool(balance: Balance, weights: &[u32], max: Option<u32>) -> Arc<Pool> {
        let backend: Arc<dyn Backend> =
            Arc::new(MockBackend::new(0.0, Vec::new(), metrics::Counter::noop()));
        let targets = weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Target {
                weight,
                max_streams: max,
                ..Target::new(
                    backend.clone(),
                    Some("mock".into()),
                    TargetState::new(&format!("t{i}")),
                )
            })
            .collect();
        Pool::new(
            targets,
            PoolSettings {
                balance,
                queue: 1,
                queue_timeout: Duration::from_millis(50),
                shared: None,
            },
        )
    }

    #[test]
    fn weighted_round_robin_is_smooth() {
        let pool = pool(Balance::Weighted, &[5, 1, 1], None);
        let picks: Vec<usize> = (0..7)
            .map(|_| pool.choose(0, Instant::now()).expect("a target"))
            .collect();
        // nginx's sequence for 5, 1, 1: a a b a c a a.
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[tokio::test]
    async fn least_busy_goes_to_the_emptiest_for_its_weight() {
        let pool = pool(Balance::LeastBusy, &[2, 1], None);
        let mut held = Vec::new();
        for _ in 0..6 {
            held.push(pool.lease(&mut 0).await.expect("room"));
        }
        let open: Vec<u32> = pool.targets.iter().map(|t| t.state.open()).collect();
        assert_eq!(open, [4, 2]);
    }

    #[tokio::test]
    async fn three_failures_eject_and_a_probe_brings_back() {
        let pool = pool(Balance::Weighted, &[1, 1], None);
        let error = BackendError::Unreachable("refused".into());
        for _ in 0..EJECT_AFTER {
            let mut lease = pool.lease(&mut 2).await.expect("target 0");
            assert_eq!(lease.index, 0);
            lease.failed(&error);
        }
        let now = Instant::now();
        assert_eq!(pool.targets[0].state.condition(now), Condition::Ejected);
        for _ in 0..4 {
            assert_eq!(pool.choose(0, now), Ok(1));
        }
        // Past its back-off, the next request is its probe, and only one is.
        let later = now + FIRST_BACKOFF + Duration::from_millis(1);
        let mut probe = pool.take(0, later).expect("the probe");
        assert!(probe.probe && probe.index == 0);
        assert_eq!(pool.choose(0, later), Ok(1));
        probe.succeeded(Duration::from_millis(5));
        assert_eq!(pool.targets[0].state.condition(later), Condition::Healthy);
    }

    #[tokio::test]
    async fn a_failed_probe_doubles_the_back_off() {
        let pool = pool(Balance::Weighted, &[1, 1], None);
        let error = BackendError::Unreachable("refused".into());
        for _ in 0..EJECT_AFTER {
            pool.lease(&mut 2).await.expect("target 0").failed(&error);
        }
        let later = Instant::now() + FIRST_BACKOFF + Duration::from_millis(1);
        let mut probe = pool.take(0, later).expect("the probe");
        probe.failed(&error);
        let out = pool.targets[0]
            .state
            .ejected_for(Instant::now())
            .expect("out");
        assert!(out > FIRST_BACKOFF && out <= 2 * FIRST_BACKOFF, "{out:?}");
    }

    #[tokio::test]
    async fn a_full_pool_queues_then_refuses() {
        let pool = pool(Balance::Weighted, &[1], Some(1));
        let first = pool.lease(&mut 0).await.expect("room");
        let waiter = pool.wait();
        let others = async {
            // The queue holds one: a second waiter is refused at once.
            let deadline = Instant::now() + Duration::from_secs(5);
            while pool.waiting() == 0 {
                assert!(Instant::now() < deadline, "the waiter never queued");
                tokio::task::yield_now().await;
            }
            assert!(matches!(pool.wait().await, Err((NoRoom::Full, _))));
            drop(first);
        };
        let (waited, ()) = tokio::join!(waiter, others);
        assert!(waited.is_ok());
        assert_eq!(pool.waiting(), 0);
    }
}
