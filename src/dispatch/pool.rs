//! Pools: a route's deployments of one model, and how a stream gets one of them. Balance
//! (smooth weighted round robin, least busy for its weight, or the lowest recent time to
//! first token), health (a target failing a few times in a row is ejected for a back-off,
//! then one request probes it) and room (each target's `max_streams`; a bounded queue per
//! route when every target is full, shared fairly: the client with the fewest streams on
//! the pool goes first, and one holding more of its places than another gives one up).
//!
//! What a target's health decides, and the state it keeps through reloads, is in
//! `target.rs`; this file is the choice, the slot ([`Lease`]) and the queue.

use std::hash::{BuildHasher as _, Hasher as _};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::shared::SharedPools;
use super::target::{Availability, TargetState, Who, ewma};
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

/// The waiting side of a pool's queue: who waits, in what order, and who holds how many of
/// its streams. Kept through reloads by the route's name, as target states are, so a
/// reload neither empties the queue nor lets more wait than it holds.
#[derive(Default)]
pub struct Waitlist {
    inner: Mutex<Places>,
    /// Told when a place is given up or taken: the next in turn looks again.
    turn: tokio::sync::Notify,
    /// How long a stream holds its target, in µs (a moving average): what a wait is told.
    held_us: AtomicU64,
}

#[derive(Default)]
struct Places {
    next: u64,
    /// The waiting requests, in the order they came: `(ticket, client)`.
    waiting: Vec<(u64, Who)>,
    /// Streams each client has open on the pool.
    open: std::collections::HashMap<Who, u32>,
}

impl Places {
    /// The ticket whose turn it is: the client with the fewest open streams, then the
    /// first to come.
    fn first(&self) -> Option<u64> {
        let open = |who: &Who| self.open.get(who).copied().unwrap_or(0);
        self.waiting
            .iter()
            .min_by_key(|(ticket, who)| (open(who), *ticket))
            .map(|(ticket, _)| *ticket)
    }

    /// Places held by `who`: its open streams and its waiting requests.
    fn held(&self, who: Who) -> usize {
        let open = self.open.get(&who).copied().unwrap_or(0) as usize;
        open + self.waiting.iter().filter(|(_, w)| *w == who).count()
    }
}

impl Waitlist {
    fn places(&self) -> std::sync::MutexGuard<'_, Places> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn opened(&self, who: Who) {
        *self.places().open.entry(who).or_default() += 1;
    }

    fn closed(&self, who: Who) {
        let mut places = self.places();
        if let Some(n) = places.open.get_mut(&who) {
            *n -= 1;
            if *n == 0 {
                places.open.remove(&who);
            }
        }
    }

    /// A place for `who` among at most `max` waiting: when they are all taken, the newest
    /// place of the client holding the most is given up to one holding fewer.
    fn join(&self, who: Who, max: u32) -> Option<u64> {
        let mut places = self.places();
        if places.waiting.len() >= max as usize {
            let mine = places.held(who);
            let hog = places
                .waiting
                .iter()
                .map(|(_, w)| *w)
                .max_by_key(|w| places.held(*w))?;
            if places.held(hog) <= mine + 1 {
                return None;
            }
            let newest = places.waiting.iter().rposition(|(_, w)| *w == hog)?;
            places.waiting.remove(newest);
            self.turn.notify_waiters();
        }
        let ticket = places.next;
        places.next += 1;
        places.waiting.push((ticket, who));
        Some(ticket)
    }

    fn leave(&self, ticket: u64) {
        self.places().waiting.retain(|(t, _)| *t != ticket);
        self.turn.notify_waiters();
    }
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
    /// At most this many wait, each at most `queue_timeout`, when every target is full.
    queue: u32,
    queue_timeout: Duration,
    waitlist: Arc<Waitlist>,
    shared: Option<Arc<SharedPools>>,
}

/// How a pool is set up.
pub struct PoolSettings {
    pub balance: Balance,
    pub queue: u32,
    pub queue_timeout: Duration,
    /// The queue's state, kept through reloads ([`super::Routes::waitlist`]).
    pub waitlist: Arc<Waitlist>,
    pub shared: Option<Arc<SharedPools>>,
}

impl Pool {
    pub fn new(targets: Vec<Target>, settings: PoolSettings) -> Arc<Self> {
        Arc::new(Pool {
            balance: settings.balance,
            guarded: targets.len() > 1,
            current: Mutex::new(vec![0; targets.len()]),
            targets,
            queue: settings.queue,
            queue_timeout: settings.queue_timeout,
            waitlist: settings.waitlist,
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
                waitlist: Arc::default(),
                shared: None,
            },
        )
    }

    /// Requests waiting for room now.
    pub fn waiting(&self) -> u32 {
        self.waitlist.places().waiting.len() as u32
    }

    pub fn queue_limit(&self) -> u32 {
        self.queue
    }

    /// Picks a target not in `tried` (a bit per target) and takes a stream slot on it for
    /// `who`, at once: a full pool is not waited for.
    pub async fn lease(self: &Arc<Self>, tried: &mut u64, who: Who) -> Result<Lease, NoRoom> {
        // Full in Redis (every instance's streams) though not here: not asked again.
        let mut full_elsewhere = 0_u64;
        loop {
            let lease = self.take(*tried | full_elsewhere, Instant::now(), who);
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

    /// A stream slot on some target for `who`, waiting in the pool's queue while every
    /// target is full: at most `queue` requests wait, each at most `queue_timeout`, and a
    /// slot that frees goes to the waiting client with the fewest streams on the pool.
    /// Refused: `Full` with how long a wait would be, or `Down`. A waiting request that is
    /// dropped (its client left) leaves the queue at once.
    pub async fn wait(self: &Arc<Self>, who: Who) -> Result<Lease, (NoRoom, Duration)> {
        // Nobody waits: no turn to take.
        if self.waiting() == 0 {
            match self.lease(&mut 0, who).await {
                Ok(lease) => return Ok(lease),
                Err(NoRoom::Down(back)) => return Err((NoRoom::Down(back), back)),
                Err(NoRoom::Full) => {}
            }
        }
        let list = &self.waitlist;
        let Some(ticket) = list.join(who, self.queue) else {
            return Err((NoRoom::Full, self.estimate(self.waiting())));
        };
        let _place = Place(list, ticket);
        let deadline = tokio::time::Instant::now() + self.queue_timeout;
        loop {
            // Listening before looking: a slot freed in between is not missed.
            let mut freed: Vec<_> = self
                .targets
                .iter()
                .map(|t| Box::pin(t.state.room.notified()))
                .collect();
            let mut turn = Box::pin(list.turn.notified());
            for notified in &mut freed {
                notified.as_mut().enable();
            }
            turn.as_mut().enable();
            let first = {
                let places = list.places();
                if !places.waiting.iter().any(|(t, _)| *t == ticket) {
                    // Given up to a client that held fewer places.
                    let ahead = places.waiting.len() as u32;
                    drop(places);
                    return Err((NoRoom::Full, self.estimate(ahead)));
                }
                places.first() == Some(ticket)
            };
            if first {
                match self.lease(&mut 0, who).await {
                    Ok(lease) => return Ok(lease),
                    Err(NoRoom::Down(back)) => return Err((NoRoom::Down(back), back)),
                    Err(NoRoom::Full) => {}
                }
            }
            // Slots freed on other instances are not told here: look again now and then.
            let elsewhere = if self.shared.is_some() {
                Duration::from_millis(100)
            } else {
                self.queue_timeout
            };
            tokio::select! {
                _ = futures::future::select_all(freed) => {}
                () = turn => {}
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
        let held = self.waitlist.held_us.load(Ordering::Relaxed).max(1_000_000);
        let wait = (u64::from(ahead) + 1) * held / slots.max(1);
        Duration::from_secs(wait.div_ceil(1_000_000).clamp(1, 300))
    }

    /// The choice and the local slot, under no await.
    fn take(self: &Arc<Self>, tried: u64, now: Instant, who: Who) -> Result<Lease, NoRoom> {
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
            self.waitlist.opened(who);
            return Ok(Lease {
                pool: self.clone(),
                index,
                who,
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
struct Place<'a>(&'a Waitlist, u64);

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.0.leave(self.1);
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
    /// Whose request holds it.
    who: Who,
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

    pub fn who(&self) -> Who {
        self.who
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
        let ejected = state.failed(error, self.probe, self.who);
        self.ejected(ejected, error);
    }

    /// Given back before it was used (full in Redis).
    fn abandon(mut self) {
        self.settled.store(true, Ordering::Relaxed);
        if self.probe {
            self.target().state.probe_dropped();
            self.probe = false;
        }
    }

    /// What is needed to lay this failure at the target later ([`Suspect::confirm`]),
    /// once the slot is given back.
    pub fn suspect(&self) -> Suspect {
        Suspect {
            pool: self.pool.clone(),
            index: self.index,
            who: self.who,
            probe: self.probe,
        }
    }

    fn ejected(&self, wait: Option<Duration>, why: &dyn std::fmt::Display) {
        ejected(&self.pool, self.index, wait, why);
    }
}

/// A target that failed a request before its first byte, while it is not yet known whether
/// the request or the target was to blame.
pub struct Suspect {
    pool: Arc<Pool>,
    index: usize,
    who: Who,
    probe: bool,
}

impl Suspect {
    /// The request was served by another target: the failure was this target's.
    pub fn confirm(&self) {
        if self.pool.guarded {
            let wait = self.pool.targets[self.index]
                .state
                .confirm(self.who, self.probe);
            ejected(
                &self.pool,
                self.index,
                wait,
                &"failed a request another target served",
            );
        }
    }
}

/// Says (and tells other instances) that a target was ejected, when it was.
fn ejected(pool: &Pool, index: usize, wait: Option<Duration>, why: &dyn std::fmt::Display) {
    let Some(wait) = wait else { return };
    let state = &pool.targets[index].state;
    tracing::warn!(target = %state.name, error = %why, seconds = wait.as_secs(), "upstream ejected from its pool");
    if let Some(shared) = &pool.shared {
        shared.ejected(&state.name, wait);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let state = &self.pool.targets[self.index].state;
        state.open.fetch_sub(1, Ordering::AcqRel);
        self.pool.waitlist.closed(self.who);
        let settled = self.settled.load(Ordering::Relaxed);
        if self.probe && !settled {
            // Cancelled before it told anything: another request may probe.
            state.probe_dropped();
        }
        if settled {
            let held = self.since.elapsed().as_micros().min(u128::from(u32::MAX)) as f64;
            let list = &self.pool.waitlist;
            let old = list.held_us.load(Ordering::Relaxed);
            list.held_us.store(ewma(old, held), Ordering::Relaxed);
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
    use crate::dispatch::target::{Condition, EJECT_AFTER, FIRST_BACKOFF, MAX_RETRY_AFTER};

    const HOG: Who = 1;
    const VICTIM: Who = 2;

    fn pool(balance: Balance, weights: &[u32], max: Option<u32>) -> Arc<Pool> {
        queued(balance, weights, max, 1, Duration::from_millis(50))
    }

    fn queued(
        balance: Balance,
        weights: &[u32],
        max: Option<u32>,
        queue: u32,
        queue_timeout: Duration,
    ) -> Arc<Pool> {
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
                queue,
                queue_timeout,
                waitlist: Arc::default(),
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
            held.push(pool.lease(&mut 0, 1).await.expect("room"));
        }
        let open: Vec<u32> = pool.targets.iter().map(|t| t.state.open()).collect();
        assert_eq!(open, [4, 2]);
    }

    #[tokio::test]
    async fn three_failures_eject_and_a_probe_brings_back() {
        let pool = pool(Balance::Weighted, &[1, 1], None);
        let error = BackendError::Unreachable("refused".into());
        for _ in 0..EJECT_AFTER {
            let lease = pool.lease(&mut 2, 1).await.expect("target 0");
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
        let probe = pool.take(0, later, 1).expect("the probe");
        assert!(probe.probe && probe.index == 0);
        assert_eq!(pool.choose(0, later), Ok(1));
        let other = pool.take(0, later, 1).expect("another target");
        assert!(!other.probe && other.index == 1);
        probe.succeeded(Duration::from_millis(5));
        assert_eq!(pool.targets[0].state.condition(later), Condition::Healthy);
    }

    #[tokio::test]
    async fn a_failed_probe_doubles_the_back_off() {
        let pool = pool(Balance::Weighted, &[1, 1], None);
        let error = BackendError::Unreachable("refused".into());
        for _ in 0..EJECT_AFTER {
            pool.lease(&mut 2, 1)
                .await
                .expect("target 0")
                .failed(&error);
        }
        let later = Instant::now() + FIRST_BACKOFF + Duration::from_millis(1);
        let probe = pool.take(0, later, 1).expect("the probe");
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
        let first = pool.lease(&mut 0, 1).await.expect("room");
        let waiter = pool.wait(1);
        let others = async {
            // The queue holds one: a second waiter is refused at once.
            let deadline = Instant::now() + Duration::from_secs(5);
            while pool.waiting() == 0 {
                assert!(Instant::now() < deadline, "the waiter never queued");
                tokio::task::yield_now().await;
            }
            assert!(matches!(pool.wait(1).await, Err((NoRoom::Full, _))));
            drop(first);
        };
        let (waited, ()) = tokio::join!(waiter, others);
        assert!(waited.is_ok());
        assert_eq!(pool.waiting(), 0);
    }

    fn server_error() -> BackendError {
        BackendError::Rejected {
            status: 500,
            message: "boom".into(),
            param: None,
            code: None,
        }
    }

    #[tokio::test]
    async fn one_clients_failures_never_take_a_target_out() {
        let pool = pool(Balance::Weighted, &[1, 1], None);
        let limited = BackendError::RateLimited {
            message: "Rate limit reached".into(),
            retry_after: Some(Duration::from_secs(300)),
        };
        for _ in 0..10 {
            for error in [&server_error(), &limited] {
                pool.lease(&mut 2, HOG)
                    .await
                    .expect("target 0")
                    .failed(error);
            }
        }
        let state = &pool.targets[0].state;
        assert_eq!(state.condition(Instant::now()), Condition::Healthy);
        // Two more clients see it fail: three in the run, the target's. Its Retry-After
        // of 300 s makes the ejection longer than a back-off, but no longer than the cap.
        pool.lease(&mut 2, 8)
            .await
            .expect("t0")
            .failed(&server_error());
        pool.lease(&mut 2, 9).await.expect("t0").failed(&limited);
        let out = state.ejected_for(Instant::now()).expect("out");
        assert!(out > FIRST_BACKOFF && out <= MAX_RETRY_AFTER, "{out:?}");
    }

    #[tokio::test]
    async fn a_429_naming_the_request_size_is_the_requests_doing() {
        let pool = pool(Balance::Weighted, &[1, 1], None);
        let too_large = BackendError::RateLimited {
            message: "Request too large for gpt-4o on tokens per min (TPM): Limit 30000, \
                      Requested 50000."
                .into(),
            retry_after: Some(Duration::from_secs(300)),
        };
        assert!(too_large.fallback_reason().is_none(), "not tried elsewhere");
        for who in 0..10 {
            pool.lease(&mut 2, who)
                .await
                .expect("t0")
                .failed(&too_large);
        }
        let state = &pool.targets[0].state;
        assert_eq!(state.condition(Instant::now()), Condition::Healthy);
    }

    #[tokio::test]
    async fn a_failure_is_the_targets_once_another_target_served_the_request() {
        let pool = pool(Balance::Weighted, &[1, 1], None);
        for round in 0..EJECT_AFTER {
            let lease = pool.lease(&mut 2, HOG).await.expect("target 0");
            lease.failed(&server_error());
            let suspect = lease.suspect();
            drop(lease);
            assert_eq!(
                pool.targets[0].state.condition(Instant::now()),
                Condition::Healthy,
                "round {round}"
            );
            suspect.confirm();
        }
        let state = &pool.targets[0].state;
        assert_eq!(state.condition(Instant::now()), Condition::Ejected);
    }

    #[tokio::test]
    async fn one_clients_failures_at_once_are_each_confirmed() {
        let pool = pool(Balance::Weighted, &[1, 1], None);
        // Three of its requests fail on target 0 at the same time, then are served elsewhere.
        let mut suspects = Vec::new();
        for _ in 0..EJECT_AFTER {
            let lease = pool.lease(&mut 2, HOG).await.expect("target 0");
            lease.failed(&server_error());
            suspects.push(lease.suspect());
        }
        let state = &pool.targets[0].state;
        assert_eq!(state.condition(Instant::now()), Condition::Healthy);
        for suspect in &suspects {
            suspect.confirm();
        }
        assert_eq!(state.condition(Instant::now()), Condition::Ejected);
    }

    #[tokio::test]
    async fn a_freed_slot_goes_to_the_client_with_the_fewest_streams() {
        let pool = queued(Balance::Weighted, &[1], Some(2), 4, DEADLINE);
        let first = pool.lease(&mut 0, HOG).await.expect("room");
        let _second = pool.lease(&mut 0, HOG).await.expect("room");
        let mut hog = Box::pin(pool.wait(HOG));
        assert!(futures::poll!(&mut hog).is_pending());
        let mut victim = Box::pin(pool.wait(VICTIM));
        assert!(futures::poll!(&mut victim).is_pending());
        assert_eq!(pool.waiting(), 2);
        drop(first);
        // The hog came first but holds a stream: not its turn.
        assert!(futures::poll!(&mut hog).is_pending());
        let lease = victim.await.expect("the victim's turn");
        assert_eq!(lease.who(), VICTIM);
        assert!(futures::poll!(&mut hog).is_pending());
    }

    #[tokio::test]
    async fn a_full_queue_gives_the_hogs_newest_place_to_another_client() {
        let pool = queued(Balance::Weighted, &[1], Some(1), 2, DEADLINE);
        let held = pool.lease(&mut 0, HOG).await.expect("room");
        let mut older = Box::pin(pool.wait(HOG));
        let mut newer = Box::pin(pool.wait(HOG));
        assert!(futures::poll!(&mut older).is_pending());
        assert!(futures::poll!(&mut newer).is_pending());
        // Full for the hog itself.
        assert!(matches!(pool.wait(HOG).await, Err((NoRoom::Full, _))));
        let mut victim = Box::pin(pool.wait(VICTIM));
        assert!(futures::poll!(&mut victim).is_pending());
        assert!(matches!(newer.await, Err((NoRoom::Full, _))));
        assert!(futures::poll!(&mut older).is_pending());
        // Each holding nothing else, the first to come goes first; then the other.
        drop(held);
        let older = older.await.expect("served");
        assert!(futures::poll!(&mut victim).is_pending());
        drop(older);
        assert_eq!(victim.await.expect("served").who(), VICTIM);
    }

    const DEADLINE: Duration = Duration::from_secs(30);
}
