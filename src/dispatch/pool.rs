//! Pools: a route's deployments of one model, and how a stream gets one of them. Balance
//! (smooth weighted round robin, least busy for its weight, or the lowest recent time to
//! first token), health (a target failing a few times in a row is ejected for a back-off,
//! then one request probes it; an upstream's `Retry-After` ejects it for that long) and room
//! (each target's `max_streams`; a bounded queue per route when every target is full).
//!
//! What a target's health decides, and the state it keeps through reloads, is in
//! `target.rs`; this file is the choice, the slot ([`Lease`]) and the queue.

use std::hash::{BuildHasher as _, Hasher as _};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::shared::SharedPools;
use super::target::{Availability, TargetState, ewma};
use crate::backend::{Backend, BackendError};

/// Under `latency`, one request in this many goes to another target, so that a target
/// that got faster is seen to.
const EXPLORE_ONE_IN: u64 = 20;

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
            // A target that is out is taken only as its probe, by one stream at a time.
            let claimed = if self.guarded {
                target.state.claim(now)
            } else {
                Some(false)
            };
            let Some(probe) = claimed else {
                target.state.open.fetch_sub(1, Ordering::AcqRel);
                excluded |= 1 << index;
                continue;
            };
            return Ok(Lease {
                pool: self.clone(),
                index,
                probe,
                settled: AtomicBool::new(false),
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
                match target.state.availability(now) {
                    Availability::Out(wait) => {
                        back = Some(back.map_or(wait, |b| b.min(wait)));
                        continue;
                    }
                    // Due a probe: it goes first, so that a recovered target is seen.
                    Availability::ProbeDue
                        if target
                            .max_streams
                            .is_none_or(|max| target.state.open() < max) =>
                    {
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
                        .map(|(_, t)| t.state.ttft())
                        .min()
                        .unwrap_or_default();
                    let tied: Vec<usize> = candidates()
                        .filter(|(_, t)| t.state.ttft() == fastest)
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
    settled: AtomicBool,
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
    pub fn succeeded(&self, ttft: Duration) {
        self.settled.store(true, Ordering::Relaxed);
        let state = &self.target().state;
        if state.succeeded(ttft, self.pool.guarded) {
            tracing::info!(target = %state.name, "the upstream answered its probe: back in its pool");
            if let Some(shared) = &self.pool.shared {
                shared.restored(&state.name);
            }
        }
    }

    /// Failed before the first byte with `error`: a failure in a row, perhaps an ejection.
    pub fn failed(&self, error: &BackendError) {
        self.settled.store(true, Ordering::Relaxed);
        if !self.pool.guarded {
            return;
        }
        let state = &self.target().state;
        if let Some(wait) = state.failed(error, self.probe) {
            tracing::warn!(target = %state.name, error = %error, seconds = wait.as_secs(), "upstream ejected from its pool");
            if let Some(shared) = &self.pool.shared {
                shared.ejected(&state.name, wait);
            }
        }
    }

    /// Given back before it was used (full in Redis).
    fn abandon(mut self) {
        self.settled.store(true, Ordering::Relaxed);
        if self.probe {
            self.target().state.probe_dropped();
            self.probe = false;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let state = &self.pool.targets[self.index].state;
        state.open.fetch_sub(1, Ordering::AcqRel);
        let settled = self.settled.load(Ordering::Relaxed);
        if self.probe && !settled {
            // Cancelled before it told anything: another request may probe.
            state.probe_dropped();
        }
        if settled {
            let held = self.since.elapsed().as_micros().min(u128::from(u32::MAX)) as f64;
            let queue = &self.pool.queue;
            let old = queue.held_us.load(Ordering::Relaxed);
            queue.held_us.store(ewma(old, held), Ordering::Relaxed);
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
    use crate::dispatch::target::{Condition, EJECT_AFTER, FIRST_BACKOFF};

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
            let lease = pool.lease(&mut 2).await.expect("target 0");
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
        let probe = pool.take(0, later).expect("the probe");
        assert!(probe.probe && probe.index == 0);
        assert_eq!(pool.choose(0, later), Ok(1));
        let other = pool.take(0, later).expect("another target");
        assert!(!other.probe && other.index == 1);
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
        let probe = pool.take(0, later).expect("the probe");
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
