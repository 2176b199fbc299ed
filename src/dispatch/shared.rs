//! Pools shared by every instance through Redis, on admission's link: a target's
//! `max_streams` is a cap across instances (a sorted set of permit ids scored by their
//! expiry, refreshed while their streams live: the stream caps' mechanism), and a target one
//! instance ejects is out for every instance within [`SYNC_EVERY`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::Script;
use tokio::sync::mpsc;

use super::target::TargetState;
use crate::admission::shared::{PERMIT_TTL, REFRESH_EVERY, Shared};

/// How often an instance reads the ejections the others made.
pub const SYNC_EVERY: Duration = Duration::from_millis(500);

/// Takes a slot of a target's cap: 1, or 0 when every instance's streams fill it.
const HOLD: &str = r"
local time = redis.call('TIME')
local now = time[1] * 1000 + math.floor(time[2] / 1000)
local max, id, ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= max then return {0} end
redis.call('ZADD', KEYS[1], now + ttl, id)
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return {1}
";

/// Pushes the expiry of this instance's live slots of one target (ARGV[2..]).
const REFRESH: &str = r"
local time = redis.call('TIME')
local now = time[1] * 1000 + math.floor(time[2] / 1000)
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], now + ttl, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return {0}
";

const RELEASE: &str = r"
redis.call('ZREM', KEYS[1], ARGV[1])
return {0}
";

/// Ejections: one hash of target name → until when (Redis's clock, ms).
const EJECT: &str = r"
local time = redis.call('TIME')
local now = time[1] * 1000 + math.floor(time[2] / 1000)
local back = now + tonumber(ARGV[2])
local was = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or 0)
if back > was then redis.call('HSET', KEYS[1], ARGV[1], back) end
redis.call('PEXPIRE', KEYS[1], 600000)
return {0}
";

const RESTORE: &str = r"
redis.call('HDEL', KEYS[1], ARGV[1])
return {0}
";

/// For each target named in ARGV, how many ms it is still out for: 0 when its back-off is
/// over but no probe has brought it back yet, -1 when it is in.
const SYNC: &str = r"
local time = redis.call('TIME')
local now = time[1] * 1000 + math.floor(time[2] / 1000)
local out = {}
for i = 1, #ARGV do
  local back = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or -1)
  if back < 0 then out[i] = -1 elseif back > now then out[i] = back - now else out[i] = 0 end
end
return out
";

/// Hash-tagged, as every key is: each script touches one key, so one slot.
const EJECTED: &str = "sluice:{pools}:ejected";

/// A target's slots, in a slot of its own (a hash tag of its name, so pools spread).
fn slots(target: &str) -> String {
    format!("sluice:{{pool:{target}}}:streams")
}

/// What a stream's end or a health change asks of Redis: done by the upkeep task, since
/// `Drop` cannot wait for Redis.
enum Change {
    Release { target: Arc<str>, id: String },
    Ejected { target: Arc<str>, wait: Duration },
    Restored { target: Arc<str> },
}

pub struct SharedPools {
    redis: Arc<Shared>,
    hold: Script,
    refresh: Script,
    release: Script,
    eject: Script,
    restore: Script,
    sync: Script,
    /// Live slots this instance holds: id → target.
    live: Mutex<HashMap<String, Arc<str>>>,
    changes: mpsc::UnboundedSender<Change>,
    inbox: Mutex<Option<mpsc::UnboundedReceiver<Change>>>,
}

impl SharedPools {
    pub fn new(redis: Arc<Shared>) -> Arc<Self> {
        let (changes, inbox) = mpsc::unbounded_channel();
        Arc::new(SharedPools {
            redis,
            hold: Script::new(HOLD),
            refresh: Script::new(REFRESH),
            release: Script::new(RELEASE),
            eject: Script::new(EJECT),
            restore: Script::new(RESTORE),
            sync: Script::new(SYNC),
            live: Mutex::default(),
            changes,
            inbox: Mutex::new(Some(inbox)),
        })
    }

    /// A slot of `target`'s cap of `max` across instances: its id, `None` when full, or
    /// `Err` when Redis cannot be reached (the instance's own count then applies).
    pub async fn hold(&self, target: &Arc<str>, max: u32) -> Result<Option<String>, ()> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let mut invocation = self.hold.prepare_invoke();
        invocation
            .key(slots(target))
            .arg(max)
            .arg(&id)
            .arg(PERMIT_TTL.as_millis() as u64);
        match self.redis.invoke(&invocation).await {
            Ok(reply) if reply.first() == Some(&1) => {
                self.live
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id.clone(), target.clone());
                Ok(Some(id))
            }
            Ok(_) => Ok(None),
            Err(e) => {
                tracing::warn!(error = %e, "Redis is unreachable: a target's cap counts this instance's streams only");
                Err(())
            }
        }
    }

    pub fn release(&self, target: &Arc<str>, id: String) {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        let _ = self.changes.send(Change::Release {
            target: target.clone(),
            id,
        });
    }

    pub fn ejected(&self, target: &Arc<str>, wait: Duration) {
        let _ = self.changes.send(Change::Ejected {
            target: target.clone(),
            wait,
        });
    }

    pub fn restored(&self, target: &Arc<str>) {
        let _ = self.changes.send(Change::Restored {
            target: target.clone(),
        });
    }

    /// Until `stop`: applies this instance's changes, keeps its slots from expiring, and
    /// reads the others' ejections into `targets()` (the pools' current targets).
    pub async fn maintain(
        self: Arc<Self>,
        targets: impl Fn() -> Vec<Arc<TargetState>>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let Some(mut inbox) = self.inbox.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let mut refresh = tokio::time::interval(REFRESH_EVERY);
        let mut sync = tokio::time::interval(SYNC_EVERY);
        sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                Some(change) = inbox.recv() => self.apply(change).await,
                _ = refresh.tick() => self.refresh().await,
                _ = sync.tick() => self.sync(&targets()).await,
            }
        }
    }

    async fn apply(&self, change: Change) {
        let (script, key, args): (&Script, &str, Vec<String>) = match &change {
            Change::Release { target, id } => (&self.release, &slots(target), vec![id.clone()]),
            Change::Ejected { target, wait } => (
                &self.eject,
                EJECTED,
                vec![target.to_string(), wait.as_millis().to_string()],
            ),
            Change::Restored { target } => (&self.restore, EJECTED, vec![target.to_string()]),
        };
        let mut invocation = script.prepare_invoke();
        invocation.key(key);
        for arg in args {
            invocation.arg(arg);
        }
        // A failure is the link's to count; slots expire by themselves, ejections end.
        let _ = self.redis.invoke(&invocation).await;
    }

    async fn refresh(&self) {
        let mut by_target: HashMap<Arc<str>, Vec<String>> = HashMap::new();
        for (id, target) in self.live.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            by_target
                .entry(target.clone())
                .or_default()
                .push(id.clone());
        }
        for (target, ids) in by_target {
            let mut invocation = self.refresh.prepare_invoke();
            invocation
                .key(slots(&target))
                .arg(PERMIT_TTL.as_millis() as u64);
            for id in ids {
                invocation.arg(id);
            }
            let _ = self.redis.invoke(&invocation).await;
        }
    }

    /// The ejections in Redis, applied here; one that is gone brings its target back.
    async fn sync(&self, targets: &[Arc<TargetState>]) {
        if targets.is_empty() {
            return;
        }
        let mut invocation = self.sync.prepare_invoke();
        invocation.key(EJECTED);
        for target in targets {
            invocation.arg(&*target.name);
        }
        let Ok(out) = self.redis.invoke(&invocation).await else {
            return;
        };
        for (target, ms) in targets.iter().zip(out) {
            match ms {
                ..0 => target.restore_remote(),
                0 => {}
                ms => target.eject(Duration::from_millis(ms as u64), true),
            }
        }
    }
}
