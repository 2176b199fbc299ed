//! A target's state, the part of it that outlives a reload of the configuration: its open
//! streams, its recent time to first token, and its health — failures in a row, ejection
//! with a back-off that doubles (10 s to 5 min), the one probe that brings it back, an
//! upstream's `Retry-After` (capped). Kept by the target's identity ([`Registry`]), so a
//! stream that started before a reload still counts against its target, and an ejected one
//! stays out.
//!
//! Health is shared by every client of a pool, so it counts only what the target is to
//! blame for ([`Blame`]): a failure to connect at once; a 5xx, a 429 or a first-token
//! timeout only once a second client saw one in the same run, or once the same request
//! was served by another target. One client's requests, however they fail, never take a
//! target out for everyone else.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Notify;

use crate::backend::BackendError;

/// Failures in a row that take a target out of its pool.
pub const EJECT_AFTER: u32 = 3;
/// The first ejection's length; each one in a row doubles it, up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(10);
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// The longest an upstream's `Retry-After` keeps a target out: past it, a probe asks again.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// Unconfirmed failures remembered in a run (one client's each).
const SUSPECTS: usize = 8;
/// Weight of the newest sample in a moving average.
pub const EWMA_NEW: f64 = 0.3;

/// `old` moved towards `sample` by [`EWMA_NEW`]; the sample itself when there was none.
pub fn ewma(old: u64, sample: f64) -> u64 {
    if old == 0 {
        sample as u64
    } else {
        (old as f64 * (1.0 - EWMA_NEW) + sample * EWMA_NEW) as u64
    }
}

/// What a target is doing now: the part of it that outlives a reload.
pub struct TargetState {
    /// `model@url`: its name in `/readyz` and its metric label (from the configuration).
    pub name: Arc<str>,
    pub(super) open: AtomicU32,
    /// Streams started on it, ever.
    pub(super) started: AtomicU64,
    health: Mutex<Health>,
    /// Recent time to first token in µs (a moving average); 0 before the first.
    ttft_us: AtomicU64,
    /// Told when a stream of this target ends or it comes back: queued requests look again.
    pub(super) room: Notify,
}

/// Who is asking, as health and the queue tell clients apart: a hash of the principal's name.
pub type Who = u64;

/// The [`Who`] of a principal's name.
pub fn who(name: &str) -> Who {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    name.hash(&mut hasher);
    hasher.finish()
}

/// Whom a failure before the first byte is laid at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The target: no connection could be made.
    Target,
    /// Either: a 5xx, a 429, a connection closed unanswered, no first token in time. The
    /// request itself may be the cause (a prompt that crashes a worker, one too large for
    /// the upstream's limit), so it counts once another client saw the same, or once the
    /// request was served elsewhere.
    Unknown,
    /// The request: never counted.
    Request,
}

impl Blame {
    pub fn of(error: &BackendError) -> Blame {
        match error {
            BackendError::Unreachable(_) | BackendError::Timeout(crate::backend::Wait::Connect) => {
                Blame::Target
            }
            _ if error.fallback_reason().is_some() => Blame::Unknown,
            _ => Blame::Request,
        }
    }
}

#[derive(Default)]
struct Health {
    /// Failures in a row the target is to blame for.
    failures: u32,
    /// The clients whose requests failed in this run in a way not yet laid at the target,
    /// each with how many of its failures wait for a word on their requests.
    suspects: Vec<(Who, u32)>,
    /// The longest `Retry-After` of the run (capped): an ejection lasts at least that.
    retry_after: Duration,
    /// Ejections in a row: the next back-off is `FIRST_BACKOFF << level`.
    level: u32,
    /// Out until then; once past, the next request is its probe.
    ejected_until: Option<Instant>,
    /// Its probe is in flight.
    probing: bool,
    /// The ejection came from another instance, through Redis.
    remote: bool,
}

/// Whether a new stream may go to a target, as its health has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    In,
    /// Out for this long yet.
    Out(Duration),
    /// Its back-off is over and no probe is in flight: the next stream is its probe.
    ProbeDue,
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

    /// Whether a stream may go to it now.
    pub fn availability(&self, now: Instant) -> Availability {
        let health = self.health();
        match health.ejected_until {
            None => Availability::In,
            Some(until) if until > now => Availability::Out(until - now),
            // Its probe is on its way: the others wait for what it finds.
            Some(_) if health.probing => Availability::Out(Duration::from_secs(1)),
            Some(_) => Availability::ProbeDue,
        }
    }

    /// Claims it for a stream about to start: `Some(false)` when it is in, `Some(true)`
    /// when that stream is its probe (due, and none in flight), `None` when it is out.
    pub fn claim(&self, now: Instant) -> Option<bool> {
        let mut health = self.health();
        match health.ejected_until {
            None => Some(false),
            Some(until) if until <= now && !health.probing => {
                health.probing = true;
                Some(true)
            }
            Some(_) => None,
        }
    }

    /// A probe that ended before it told anything: another stream may probe.
    pub fn probe_dropped(&self) {
        self.health().probing = false;
    }

    /// The first token came after `ttft`; with `guarded` (health applies), the target is
    /// well: whether that brought it back.
    pub fn succeeded(&self, ttft: Duration, guarded: bool) -> bool {
        let sample = ttft.as_micros().min(u128::from(u32::MAX)) as f64;
        let old = self.ttft_us.load(Ordering::Relaxed);
        self.ttft_us
            .store(ewma(old, sample).max(1), Ordering::Relaxed);
        if !guarded {
            return false;
        }
        let mut health = self.health();
        let was_out = health.ejected_until.is_some();
        *health = Health::default();
        drop(health);
        if was_out {
            self.room.notify_waiters();
        }
        was_out
    }

    /// A failure before the first byte of `who`'s request (a `probe`, or not): how long it
    /// is out for, when this ejects it. Three failures in a row that are the target's do
    /// (a failed probe at once), the back-off doubling each time; an upstream's
    /// `Retry-After` is one failure, and makes that ejection last at least as long, up to
    /// [`MAX_RETRY_AFTER`]. A failure only one client has seen is not the target's yet.
    pub fn failed(&self, error: &BackendError, probe: bool, who: Who) -> Option<Duration> {
        let mut health = self.health();
        health.probing = false;
        let told = match error {
            BackendError::RateLimited {
                retry_after: Some(wait),
                ..
            }
            | BackendError::Overloaded {
                retry_after: wait, ..
            } => (*wait).min(MAX_RETRY_AFTER),
            _ => Duration::ZERO,
        };
        health.retry_after = health.retry_after.max(told);
        let counted = match Blame::of(error) {
            Blame::Request => return None,
            Blame::Target => {
                health.failures += 1;
                true
            }
            Blame::Unknown => {
                // Each failure is remembered, to be laid at the target if its request is
                // served elsewhere; the clients are counted each once.
                let known = health.suspects.len();
                match health.suspects.iter_mut().find(|(w, _)| *w == who) {
                    Some((_, n)) => *n += 1,
                    None if known < SUSPECTS => health.suspects.push((who, 1)),
                    None => {}
                }
                health.suspects.len() >= 2
            }
        };
        if (probe && counted) || health.run() >= EJECT_AFTER {
            return Some(eject(&mut health));
        }
        None
    }

    /// `who`'s request, which failed here before its first byte (as a `probe`, or not),
    /// was served by another target: that failure was this target's.
    pub fn confirm(&self, who: Who, probe: bool) -> Option<Duration> {
        let mut health = self.health();
        let at = health.suspects.iter().position(|(w, _)| *w == who)?;
        health.suspects[at].1 -= 1;
        if health.suspects[at].1 == 0 {
            health.suspects.swap_remove(at);
        }
        health.failures += 1;
        // Out already: the back-off it has stands.
        if health
            .ejected_until
            .is_some_and(|until| until > Instant::now())
        {
            return None;
        }
        (probe || health.run() >= EJECT_AFTER).then(|| eject(&mut health))
    }
}

impl Health {
    /// The failures of the run laid at the target: its own, and one for each client that
    /// saw one once two have.
    fn run(&self) -> u32 {
        let seen = self.suspects.len() as u32;
        self.failures + if seen >= 2 { seen } else { 0 }
    }
}

/// Takes a target out: for its back-off, or its `Retry-After` when that is longer.
fn eject(health: &mut Health) -> Duration {
    let wait = backoff(health.level).max(health.retry_after);
    health.level += 1;
    health.failures = 0;
    health.suspects.clear();
    health.retry_after = Duration::ZERO;
    health.ejected_until = Some(Instant::now() + wait);
    health.remote = false;
    wait
}

/// A target's back-off after `level` ejections in a row.
pub fn backoff(level: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1 << level.min(16))
        .min(MAX_BACKOFF)
}

/// Target states by identity, and routes' queues by name, for as long as something (a
/// pool, a stream, a waiting request) holds them.
#[derive(Default)]
pub struct Registry(
    Mutex<HashMap<String, Weak<TargetState>>>,
    Mutex<HashMap<String, Weak<super::pool::Waitlist>>>,
);

impl Registry {
    /// The queue of the route `name`: the one it had, or a new one.
    pub fn waitlist(&self, name: &str) -> Arc<super::pool::Waitlist> {
        let mut known = self.1.lock().unwrap_or_else(|e| e.into_inner());
        known.retain(|_, list| list.strong_count() > 0);
        if let Some(list) = known.get(name).and_then(Weak::upgrade) {
            return list;
        }
        let list = Arc::default();
        known.insert(name.to_owned(), Arc::downgrade(&list));
        list
    }

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
