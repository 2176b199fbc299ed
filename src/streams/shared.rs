//! Stream logs in Redis, so that a reconnect a load balancer sends to another instance
//! resumes there. Each resumable stream is a Redis Stream `sluice:{id}:log` whose entry
//! `0-n` holds event `n` (field `e`), closed by an entry with `end` (or `lost`, when this
//! instance could not log every event), beside a hash `sluice:{id}:meta` (owner, format,
//! producing instance, the producer's `traceparent` when traced). Both expire with the TTL,
//! and hold no more than the producer's memory does: what it trims or evicts is trimmed
//! (`XTRIM MINID`) or deleted here too. The producer's writes go through one writer task
//! that pipelines whatever is queued, then names the streams it wrote to on
//! `sluice:progress`; readers elsewhere share their instance's one connection and wait on
//! that channel between reads. Every instance keeps a heartbeat key alive: a reader whose
//! producer's key has gone ends with `producer_lost`. Cancels travel on the channel
//! `sluice:cancel`.
//!
//! Every key is hash-tagged, so in a Redis Cluster each stream's writes (one script per
//! stream and batch) and reads stay in one slot. A failure (a primary killed, its replica
//! not yet promoted) is ridden out for as long as a stream may be silent
//! (`SLUICE_IDLE_TIMEOUT_MS`): the writer keeps the writes that failed and sends them again
//! first, the script adding only what Redis lacks, and a reader elsewhere retries its reads.
//! Entries Redis lost (a primary's last writes not yet on its replica) are never skipped in
//! silence: the log is closed `lost` where they were, and its readers get
//! `stream_events_lost`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use redis::streams::{StreamId, StreamRangeReply, StreamReadReply};
use redis::{AsyncCommands, RedisResult, Script};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{Attached, Cancelled, Settings, Stored, lock};
use crate::dialect::Wire;
use crate::error::ApiError;
use crate::link::{Connection, Lazy, Link};

/// Writes queued for Redis at most (and their bytes at most the instance's log memory);
/// past either a stream's shared log is abandoned (and marked `lost`) rather than memory
/// growing without bound.
const QUEUE: usize = 65_536;
const QUEUED_BYTES: usize = 16 * 1024 * 1024;
/// Entries read from Redis in one reply.
const PAGE: usize = 256;
const CANCEL_CHANNEL: &str = "sluice:cancel";
/// Where a writer says which streams it has just added events to (ids, space-separated):
/// readers on other instances wait on this, not on a blocked connection each.
const PROGRESS_CHANNEL: &str = "sluice:progress";

pub(super) struct Shared {
    connection: Lazy,
    /// This instance's name in Redis.
    instance: Arc<str>,
    writes: mpsc::Sender<Write>,
    inbox: std::sync::Mutex<Option<mpsc::Receiver<Write>>>,
    /// Bytes of events queued for the writer, and the most there may be.
    queued: Arc<AtomicUsize>,
    budget: usize,
    max_readers: usize,
    /// Readers here of streams produced elsewhere: woken when their producer says so.
    followed: std::sync::Mutex<HashMap<Arc<str>, watch::Sender<()>>>,
    /// How long this instance's heartbeat key lives unrefreshed, and how long a reader
    /// blocks before it checks the producer's.
    lease: Duration,
    ttl: Duration,
    /// How long the keys of a running stream live unrefreshed.
    running: Duration,
    /// Until when (ms since `epoch`) new streams skip Redis after it failed: a dead Redis
    /// costs one connect timeout a second, not one per stream.
    down_until: AtomicU64,
    epoch: Instant,
    /// How long a Redis failure is ridden out before a write is given up or a reader told.
    patience: Duration,
    append: Script,
    errors: metrics::Counter,
}

/// How long new streams skip Redis after a failure.
const BACKOFF: Duration = Duration::from_secs(1);

struct Keys {
    id: String,
    log: String,
    meta: String,
}

/// A stream's log as its producer mirrors it: its keys, what its meta hash says (put back
/// if Redis lost it), and whether the mirror is broken (nothing more is written but a
/// `lost` end).
struct Mirror {
    keys: Keys,
    owner: String,
    wire: Wire,
    broken: AtomicBool,
}

/// Appends one stream's writes of a batch (ARGV from 6: number, field, value), after the
/// entries Redis has already, so sending them again after a failure adds nothing twice.
/// A gap before them (entries Redis lost) closes the log `lost` there. Trims what memory
/// no longer keeps (ARGV[2]), puts the meta hash back if it is gone (ARGV[3..5]), and sets
/// both keys' TTL (ARGV[1]). Returns the last entry's number, or -1 once the log is `lost`.
const APPEND: &str = r"
local log, meta = KEYS[1], KEYS[2]
local ttl, first = tonumber(ARGV[1]), tonumber(ARGV[2])
local top = 0
local last = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)[1]
if last then
  top = tonumber(string.match(last[1], '%d+$'))
  if last[2][1] == 'end' then return top end
  if last[2][1] == 'lost' then return -1 end
end
for i = 6, #ARGV, 3 do
  local n = tonumber(ARGV[i])
  if n > top then
    if n > math.max(top, first - 1) + 1 then
      redis.call('XADD', log, '0-' .. (top + 1), 'lost', '1')
      top = -1
      break
    end
    redis.call('XADD', log, '0-' .. n, ARGV[i + 1], ARGV[i + 2])
    top = n
    if ARGV[i + 1] == 'lost' then top = -1 break end
  end
end
if first > 1 and top > 0 then redis.call('XTRIM', log, 'MINID', '0-' .. first) end
if redis.call('EXISTS', meta) == 0 then
  redis.call('HSET', meta, 'owner', ARGV[3], 'wire', ARGV[4], 'instance', ARGV[5])
end
redis.call('PEXPIRE', log, ttl)
redis.call('PEXPIRE', meta, ttl)
return top
";

impl Keys {
    /// Hash-tagged, so a stream's keys share a Redis Cluster slot.
    fn of(id: &str) -> Keys {
        Keys {
            id: id.to_owned(),
            log: format!("sluice:{{{id}}}:log"),
            meta: format!("sluice:{{{id}}}:meta"),
        }
    }
}

/// The value of a log's end marker when a cancel stopped the stream.
const CANCELLED: &str = "cancelled";

enum What {
    /// An event, and the first event memory still keeps of the stream.
    Event(Bytes, u64),
    /// The end, and whether a cancel stopped it (nothing to follow then).
    End(bool),
    Lost,
    /// Evicted or expired where it was produced: delete its keys.
    Forget,
}

struct Write {
    mirror: Arc<Mirror>,
    id: u64,
    what: What,
}

impl Write {
    fn bytes(&self) -> usize {
        match &self.what {
            What::Event(event, _) => event.len(),
            _ => 0,
        }
    }
}

/// One stream's log in Redis, as its producer writes it.
pub(super) struct Log {
    mirror: Arc<Mirror>,
    writes: mpsc::Sender<Write>,
    queued: Arc<AtomicUsize>,
    budget: usize,
}

impl Log {
    pub(super) fn event(&self, id: u64, event: Bytes, first: u64) {
        // Broken (an event could not be queued, or Redis failed for too long): the rest
        // are not written, and the log ends `lost`.
        if self.mirror.broken.load(Ordering::Relaxed) {
            return;
        }
        let len = event.len();
        let queued = self.queued.fetch_add(len, Ordering::Relaxed);
        let write = Write {
            mirror: self.mirror.clone(),
            id,
            what: What::Event(event, first),
        };
        if queued + len > self.budget || self.writes.try_send(write).is_err() {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            tracing::warn!(stream = %self.mirror.keys.log, "the Redis writer is behind: this stream's shared log is abandoned");
            self.mirror.broken.store(true, Ordering::Relaxed);
        }
    }

    pub(super) fn forget(&self) {
        let write = Write {
            mirror: self.mirror.clone(),
            id: 0,
            what: What::Forget,
        };
        // Not queued (the writer is far behind): the keys expire with their TTL instead.
        let _ = self.writes.try_send(write);
    }

    pub(super) fn end(&self, next: u64, cancelled: bool) {
        let what = if self.mirror.broken.load(Ordering::Relaxed) {
            What::Lost
        } else {
            What::End(cancelled)
        };
        let write = Write {
            mirror: self.mirror.clone(),
            id: next,
            what,
        };
        if let Err(mpsc::error::TrySendError::Full(write)) = self.writes.try_send(write) {
            let writes = self.writes.clone();
            #[expect(
                clippy::disallowed_methods,
                reason = "hands a stream's end marker to a full writer queue; ends once queued"
            )]
            tokio::spawn(async move { writes.send(write).await });
        }
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// Writes by stream, each stream's in the order they came.
fn group(writes: Vec<Write>) -> Vec<Vec<Write>> {
    let mut at: HashMap<*const Mirror, usize> = HashMap::new();
    let mut groups: Vec<Vec<Write>> = Vec::new();
    for write in writes {
        let key = Arc::as_ptr(&write.mirror);
        match at.get(&key) {
            Some(&i) => groups[i].push(write),
            None => {
                at.insert(key, groups.len());
                groups.push(vec![write]);
            }
        }
    }
    groups
}

impl Shared {
    pub(super) fn new(link: Link, settings: &Settings, errors: metrics::Counter) -> Arc<Self> {
        let (writes, inbox) = mpsc::channel(QUEUE);
        Arc::new(Shared {
            connection: Lazy::new(link, Duration::from_millis(1000)),
            instance: uuid::Uuid::new_v4().simple().to_string().into(),
            writes,
            inbox: std::sync::Mutex::new(Some(inbox)),
            queued: Arc::default(),
            // What is queued is mostly what memory holds too (the same buffers), but a
            // burst must not abandon a fast stream on a small budget.
            budget: settings.memory.max(QUEUED_BYTES),
            max_readers: settings.max_readers,
            followed: std::sync::Mutex::default(),
            lease: (settings.idle / 3).clamp(Duration::from_millis(300), Duration::from_secs(10)),
            ttl: settings.ttl,
            running: settings.total + settings.grace + settings.ttl,
            down_until: AtomicU64::new(0),
            epoch: Instant::now(),
            patience: settings.idle,
            append: Script::new(APPEND),
            errors,
        })
    }

    async fn connection(&self) -> RedisResult<Connection> {
        self.connection.get().await
    }

    fn instance_key(instance: &str) -> String {
        format!("sluice:instance:{{{instance}}}")
    }

    /// The writer, the heartbeat and the cancel listener; `on_cancel` gets the ids other
    /// instances were asked to cancel.
    #[expect(
        clippy::disallowed_methods,
        reason = "the shared log's three background tasks, each ended by the upkeep token"
    )]
    pub(super) fn spawn(
        self: &Arc<Self>,
        upkeep: CancellationToken,
        on_cancel: impl Fn(String) + Send + 'static,
    ) {
        if let Some(inbox) = lock(&self.inbox).take() {
            tokio::spawn(
                upkeep
                    .clone()
                    .run_until_cancelled_owned(self.clone().writer(inbox)),
            );
        }
        let shared = self.clone();
        tokio::spawn(upkeep.clone().run_until_cancelled_owned(async move {
            let key = Self::instance_key(&shared.instance);
            let mut tick = tokio::time::interval(shared.lease / 3);
            loop {
                tick.tick().await;
                if let Ok(mut conn) = shared.connection().await {
                    let _: RedisResult<()> = conn.pset_ex(&key, 1, millis(shared.lease)).await;
                }
            }
        }));
        let link = self.connection.link().clone();
        let shared = self.clone();
        tokio::spawn(upkeep.run_until_cancelled_owned(async move {
            // In a Cluster, any node hears every PUBLISH: after a failure, try the next one.
            for attempt in 0.. {
                match link.pubsub(attempt).await {
                    Ok(mut pubsub) => {
                        if pubsub.subscribe(&[CANCEL_CHANNEL, PROGRESS_CHANNEL]).await.is_ok() {
                            // Readers may have missed progress while unsubscribed.
                            shared.wake_all();
                            let mut messages = pubsub.into_on_message();
                            while let Some(message) = messages.next().await {
                                let Ok(payload) = message.get_payload::<String>() else {
                                    continue;
                                };
                                if message.get_channel_name() == PROGRESS_CHANNEL {
                                    shared.wake(&payload);
                                } else {
                                    on_cancel(payload);
                                }
                            }
                        }
                        tracing::warn!("lost the Redis subscription to stream cancels and progress; retrying");
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot subscribe to stream cancels in Redis; retrying"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }));
    }

    /// Writes whatever is queued, one script per stream, all sent at once (the connection
    /// pipelines them), in order; then says on the progress channel which streams have new
    /// events. Writes that failed go first in the next round, after a pause, until Redis
    /// has been failing for `patience`: then their streams' mirrors are given up.
    async fn writer(self: Arc<Self>, mut inbox: mpsc::Receiver<Write>) {
        let mut batch = Vec::with_capacity(512);
        let mut pending: Vec<Write> = Vec::new();
        let mut retry = Retry::new(self.patience);
        loop {
            if pending.is_empty() {
                if inbox.recv_many(&mut batch, 512).await == 0 {
                    return;
                }
            } else {
                // After the pause `retry` waited: what came meanwhile goes too.
                while batch.len() < 4096
                    && let Ok(write) = inbox.try_recv()
                {
                    batch.push(write);
                }
            }
            pending.append(&mut batch);
            let groups = group(std::mem::take(&mut pending));
            let results = futures::future::join_all(groups.iter().map(|g| self.apply(g))).await;
            let mut progress = String::new();
            let mut done = 0;
            let mut failed = None;
            for (group, result) in groups.into_iter().zip(results) {
                let mirror = &group[0].mirror;
                match result {
                    Ok(top) => {
                        if top < 0 {
                            mirror.broken.store(true, Ordering::Relaxed);
                        }
                        if !progress.is_empty() {
                            progress.push(' ');
                        }
                        progress.push_str(&mirror.keys.id);
                        done += group.iter().map(Write::bytes).sum::<usize>();
                    }
                    Err(e) => {
                        failed.get_or_insert(e);
                        pending.extend(group);
                    }
                }
            }
            match failed {
                Some(e) => {
                    tracing::warn!(error = %e, "could not write stream events to Redis; retrying");
                    self.errors.increment(1);
                    if !retry.wait().await {
                        tracing::warn!(
                            streams = pending.len(),
                            "Redis failed for too long: these streams are no longer logged there"
                        );
                        for write in pending.drain(..) {
                            write.mirror.broken.store(true, Ordering::Relaxed);
                            done += write.bytes();
                        }
                        retry = Retry::new(self.patience);
                    }
                }
                None => retry = Retry::new(self.patience),
            }
            self.queued.fetch_sub(done, Ordering::Relaxed);
            if !progress.is_empty()
                && let Ok(mut conn) = self.connection().await
            {
                let _: RedisResult<i64> = conn.publish(PROGRESS_CHANNEL, progress).await;
            }
        }
    }

    /// One stream's writes of a round, in order: a delete, or one APPEND.
    async fn apply(&self, writes: &[Write]) -> RedisResult<i64> {
        let mut conn = self.connection().await?;
        let mirror = &writes[0].mirror;
        let keys = &mirror.keys;
        if writes.iter().any(|w| matches!(w.what, What::Forget)) {
            let _: () = conn.del(&[&keys.log, &keys.meta]).await?;
            return Ok(0);
        }
        let mut invocation = self.append.key(&keys.log);
        invocation.key(&keys.meta);
        let ended = writes
            .iter()
            .any(|w| matches!(w.what, What::End(_) | What::Lost));
        let ttl = if ended { self.ttl } else { self.running };
        let first = writes
            .iter()
            .filter_map(|w| match w.what {
                What::Event(_, first) => Some(first),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        invocation
            .arg(millis(ttl))
            .arg(first)
            .arg(&mirror.owner)
            .arg(mirror.wire.as_str())
            .arg(&*self.instance);
        for write in writes {
            invocation.arg(write.id);
            match &write.what {
                What::Event(event, _) => invocation.arg("e").arg(event.as_ref()),
                What::End(true) => invocation.arg("end").arg(CANCELLED),
                What::End(false) => invocation.arg("end").arg("1"),
                What::Lost => invocation.arg("lost").arg("1"),
                What::Forget => continue,
            };
        }
        invocation.invoke_async(&mut conn).await
    }

    /// Wakes the readers here of the streams named in a progress message.
    fn wake(&self, ids: &str) {
        let mut followed = lock(&self.followed);
        for id in ids.split(' ') {
            if let Some(sender) = followed.get(id) {
                if sender.receiver_count() == 0 {
                    followed.remove(id);
                } else {
                    sender.send_replace(());
                }
            }
        }
    }

    fn wake_all(&self) {
        lock(&self.followed).retain(|_, sender| sender.send(()).is_ok());
    }

    /// A wake-up for a reader here of stream `id`, unless it has as many as it may.
    fn follow_progress(&self, id: &str) -> Result<watch::Receiver<()>, ApiError> {
        let mut followed = lock(&self.followed);
        match followed.get(id) {
            Some(sender) if sender.receiver_count() >= self.max_readers => {
                Err(crate::admission::Refusal::StreamReaders {
                    max_readers: self.max_readers,
                }
                .into())
            }
            Some(sender) => Ok(sender.subscribe()),
            None => {
                let (sender, receiver) = watch::channel(());
                followed.insert(id.into(), sender);
                Ok(receiver)
            }
        }
    }

    /// Registers a new stream, or fails when Redis cannot be reached.
    pub(super) async fn open(
        &self,
        id: &str,
        owner: &str,
        wire: Wire,
        context: Option<&[u8]>,
        trace: Option<&str>,
    ) -> RedisResult<Log> {
        let now = self.epoch.elapsed().as_millis() as u64;
        if now < self.down_until.load(Ordering::Relaxed) {
            return Err(redis::RedisError::from((
                redis::ErrorKind::IoError,
                "Redis failed a moment ago",
            )));
        }
        let result = self.register(id, owner, wire, context, trace).await;
        if result.is_err() {
            let until = self.epoch.elapsed() + BACKOFF;
            self.down_until
                .store(until.as_millis() as u64, Ordering::Relaxed);
        }
        result
    }

    async fn register(
        &self,
        id: &str,
        owner: &str,
        wire: Wire,
        context: Option<&[u8]>,
        trace: Option<&str>,
    ) -> RedisResult<Log> {
        let keys = Keys::of(id);
        let mut conn = self.connection().await?;
        let mut pipe = redis::pipe();
        pipe.hset_multiple(
            &keys.meta,
            &[
                ("owner", owner),
                ("wire", wire.as_str()),
                ("instance", &self.instance),
            ],
        )
        .ignore();
        if let Some(context) = context {
            pipe.hset(&keys.meta, "context", context).ignore();
        }
        // The producer's span, for readers' spans on any instance to link to.
        if let Some(trace) = trace {
            pipe.hset(&keys.meta, "trace", trace).ignore();
        }
        pipe.pexpire(&keys.meta, millis(self.running) as i64)
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        Ok(Log {
            mirror: Arc::new(Mirror {
                keys,
                owner: owner.to_owned(),
                wire,
                broken: AtomicBool::new(false),
            }),
            writes: self.writes.clone(),
            queued: self.queued.clone(),
            budget: self.budget,
        })
    }

    /// The producing instance of `id` and its span's `traceparent`, when `who` may read it
    /// in `wire`'s format.
    async fn find(
        &self,
        conn: &mut Connection,
        keys: &Keys,
        id: &str,
        who: &str,
        wire: Wire,
    ) -> Result<(String, Option<String>), ApiError> {
        let mut meta: std::collections::HashMap<String, String> =
            conn.hgetall(&keys.meta).await.map_err(unreachable)?;
        match (meta.get("owner"), meta.get("wire"), meta.get("instance")) {
            (Some(owner), Some(w), Some(instance))
                if owner == who && Wire::parse(w) == Some(wire) =>
            {
                Ok((instance.clone(), meta.remove("trace")))
            }
            _ => Err(ApiError::StreamNotFound(id.to_owned())),
        }
    }

    pub(super) async fn attach(
        &self,
        id: &str,
        who: &str,
        wire: Wire,
        after: u64,
    ) -> Result<(Attached, Option<String>), ApiError> {
        let keys = Keys::of(id);
        let mut conn = self.connection().await.map_err(unreachable)?;
        let (instance, trace) = self.find(&mut conn, &keys, id, who, wire).await?;
        let last: StreamRangeReply = conn
            .xrevrange_count(&keys.log, "+", "-", 1)
            .await
            .map_err(unreachable)?;
        if let Some(last) = last.ids.first() {
            let n = entry_number(&last.id);
            let ended = last.map.contains_key("end");
            let sent = if ended || last.map.contains_key("lost") {
                n.saturating_sub(1)
            } else {
                n
            };
            let finished = ended || last.map.contains_key("lost");
            // Stopped by a cancel: there is nothing to follow, as on the producing instance.
            let cancelled = last
                .map
                .get("end")
                .and_then(|v| redis::from_redis_value::<String>(v).ok());
            if cancelled.as_deref() == Some(CANCELLED) {
                return Err(ApiError::StreamCancelled);
            }
            // A cursor past what Redis kept of a stream whose log was lost: the reader had
            // events the producer served from memory before they reached Redis. It is told
            // the rest is lost, as a reader behind the loss is.
            if after > sent && !ended && last.map.contains_key("lost") {
                let lost = wire.error_event(id, after + 1, &ApiError::StreamEventsLost);
                let events = futures::stream::once(async move { lost });
                return Ok((Attached::Events(events.boxed()), trace));
            }
            // A cursor ahead of a running stream waits for its events.
            if after > sent && finished {
                return Err(super::cursor_beyond(after));
            }
            if ended && after == sent {
                return Ok((Attached::Complete, trace));
            }
        }
        // Every reader here shares the one connection: it reads without blocking, and
        // waits for the producer's word on the progress channel (or a lease) in between.
        let progress = self.follow_progress(id)?;
        let events = follow(
            conn,
            progress,
            id.to_owned(),
            keys,
            wire,
            after,
            instance,
            (self.lease, self.patience),
        );
        Ok((Attached::Events(events.boxed()), trace))
    }

    pub(super) async fn events(
        &self,
        id: &str,
        who: &str,
        wire: Wire,
    ) -> Result<Vec<Bytes>, ApiError> {
        let keys = Keys::of(id);
        let mut conn = self.connection().await.map_err(unreachable)?;
        self.find(&mut conn, &keys, id, who, wire).await?;
        let mut events = Vec::new();
        let mut after = 0u64;
        loop {
            let page: StreamRangeReply = conn
                .xrange_count(&keys.log, format!("(0-{after}"), "+", PAGE)
                .await
                .map_err(unreachable)?;
            if page.ids.is_empty() {
                return Err(ApiError::StreamRunning(id.to_owned()));
            }
            for entry in &page.ids {
                let n = entry_number(&entry.id);
                if n != after + 1 {
                    return Err(ApiError::StreamEventsGone(id.to_owned()));
                }
                after = n;
                if entry.map.contains_key("end") {
                    return Ok(events);
                }
                match event_of(entry) {
                    Some(event) => events.push(event),
                    None => return Err(ApiError::StreamEventsLost),
                }
            }
        }
    }

    /// The reply a finished stream adds up to, when an instance has built it already.
    pub(super) async fn reply(
        &self,
        id: &str,
        who: &str,
        wire: Wire,
    ) -> Result<Option<super::Reply>, ApiError> {
        let keys = Keys::of(id);
        let mut conn = self.connection().await.map_err(unreachable)?;
        self.find(&mut conn, &keys, id, who, wire).await?;
        let (ok, body): (Option<u8>, Option<Vec<u8>>) = redis::cmd("HMGET")
            .arg(&keys.meta)
            .arg("reply_ok")
            .arg("reply")
            .query_async(&mut conn)
            .await
            .map_err(unreachable)?;
        Ok(ok.zip(body).map(|(ok, body)| super::Reply {
            ok: ok == 1,
            body: Bytes::from(body),
        }))
    }

    /// Keeps a finished stream's reply beside its log, for every instance.
    pub(super) async fn keep_reply(&self, id: &str, reply: &super::Reply) {
        let keys = Keys::of(id);
        if let Ok(mut conn) = self.connection().await {
            let _: RedisResult<()> = redis::cmd("HSET")
                .arg(&keys.meta)
                .arg("reply_ok")
                .arg(u8::from(reply.ok))
                .arg("reply")
                .arg(reply.body.as_ref())
                .query_async(&mut conn)
                .await;
        }
    }

    /// Context and events of a stream logged in Redis (by any instance).
    pub(super) async fn stored(&self, id: &str, who: &str, wire: Wire) -> Result<Stored, ApiError> {
        let keys = Keys::of(id);
        let mut conn = self.connection().await.map_err(unreachable)?;
        self.find(&mut conn, &keys, id, who, wire).await?;
        let context: Option<Vec<u8>> = conn
            .hget(&keys.meta, "context")
            .await
            .map_err(unreachable)?;
        let mut stored = Stored {
            context: context.map(Bytes::from),
            events: Vec::new(),
            ended: false,
        };
        let mut after = String::from("-");
        loop {
            let page: StreamRangeReply = conn
                .xrange_count(&keys.log, &after, "+", PAGE)
                .await
                .map_err(unreachable)?;
            let Some(last) = page.ids.last() else {
                return Ok(stored);
            };
            after = format!("({}", last.id);
            for entry in &page.ids {
                if entry.map.contains_key("end") || entry.map.contains_key("lost") {
                    stored.ended = true;
                } else if let Some(event) = event_of(entry) {
                    stored.events.push(event);
                }
            }
        }
    }

    /// Removes a stream's keys (its producer, here, has been stopped already).
    pub(super) async fn forget(&self, id: &str) {
        let keys = Keys::of(id);
        if let Ok(mut conn) = self.connection().await {
            let _: RedisResult<()> = conn.del(&[&keys.log, &keys.meta]).await;
        }
    }

    /// Stops a stream another instance produces and removes its keys.
    pub(super) async fn delete(&self, id: &str, who: &str, wire: Wire) -> Result<(), ApiError> {
        let keys = Keys::of(id);
        let mut conn = self.connection().await.map_err(unreachable)?;
        self.find(&mut conn, &keys, id, who, wire).await?;
        let _: i64 = conn
            .publish(CANCEL_CHANNEL, id)
            .await
            .map_err(unreachable)?;
        let _: () = conn
            .del(&[&keys.log, &keys.meta])
            .await
            .map_err(unreachable)?;
        Ok(())
    }

    pub(super) async fn cancel(
        &self,
        id: &str,
        who: &str,
        wire: Wire,
    ) -> Result<Cancelled, ApiError> {
        let keys = Keys::of(id);
        let mut conn = self.connection().await.map_err(unreachable)?;
        self.find(&mut conn, &keys, id, who, wire).await?;
        let last: StreamRangeReply = conn
            .xrevrange_count(&keys.log, "+", "-", 1)
            .await
            .map_err(unreachable)?;
        if last
            .ids
            .first()
            .is_some_and(|e| e.map.contains_key("end") || e.map.contains_key("lost"))
        {
            return Ok(Cancelled::Ended);
        }
        let _: i64 = conn
            .publish(CANCEL_CHANNEL, id)
            .await
            .map_err(unreachable)?;
        Ok(Cancelled::Now)
    }
}

fn unreachable(e: redis::RedisError) -> ApiError {
    tracing::warn!(error = %e, "Redis failed while serving a stream resume or cancel");
    ApiError::Busy {
        message: "the shared stream log (Redis) cannot be reached".into(),
        retry_after: Duration::from_secs(1),
    }
}

/// `0-n` → n.
fn entry_number(id: &str) -> u64 {
    id.rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn event_of(entry: &StreamId) -> Option<Bytes> {
    entry.get::<Vec<u8>>("e").map(Bytes::from)
}

/// A reader on an instance that does not produce the stream: the events after `after`
/// from Redis, page by page, then new ones as the producer says it added them; when nothing
/// comes for a lease, it checks that the producer still lives. A Redis failure is retried
/// for `patience`, then ends it with `shared_log_unavailable` (the producer may well run
/// on); a producer gone (its heartbeat key missing for a lease of a working Redis) with
/// `producer_lost`.
#[allow(clippy::too_many_arguments)]
fn follow(
    mut conn: Connection,
    mut progress: watch::Receiver<()>,
    id: String,
    keys: Keys,
    wire: Wire,
    after: u64,
    instance: String,
    (lease, patience): (Duration, Duration),
) -> impl futures::Stream<Item = Bytes> + Send {
    async_stream::stream! {
        let mut cursor = after;
        let alive_key = Shared::instance_key(&instance);
        let mut retry = Retry::new(patience);
        // Since when the producer's heartbeat key has been missing, Redis answering every
        // time: a failover may let it expire before the producer can write it again, so
        // the producer is lost only once its key has stayed missing for a whole lease
        // (three heartbeats) of a Redis that works.
        let mut missing: Option<Instant> = None;
        loop {
            // Nothing new for a lease: look at the log's end and the producer. While its
            // key is missing, look again without waiting for progress.
            let wait = if missing.is_none() { Some(lease) } else { None };
            let found = match look(&mut conn, &mut progress, &keys, &alive_key, cursor, wait).await {
                Ok(found) => {
                    retry = Retry::new(patience);
                    found
                }
                Err(e) => {
                    missing = None;
                    if retry.wait().await {
                        continue;
                    }
                    tracing::warn!(error = %e, "Redis failed under a resumed stream");
                    yield wire.error_event(&id, cursor + 1, &ApiError::SharedLogUnavailable);
                    return;
                }
            };
            match found {
                Found::Events(entries) => {
                    missing = None;
                    for entry in entries {
                        let n = entry_number(&entry.id);
                        if entry.map.contains_key("end") {
                            return;
                        }
                        let event = if n == cursor + 1 { event_of(&entry) } else { None };
                        match event {
                            Some(event) => {
                                cursor = n;
                                yield event;
                            }
                            None => {
                                yield wire.error_event(&id, cursor + 1, &ApiError::StreamEventsLost);
                                return;
                            }
                        }
                    }
                }
                Found::Ended => return,
                Found::Lost => {
                    yield wire.error_event(&id, cursor + 1, &ApiError::StreamEventsLost);
                    return;
                }
                Found::Producer { alive: true } => missing = None,
                Found::Producer { alive: false } if missing.is_some_and(|since| since.elapsed() >= lease) => {
                    yield wire.error_event(&id, cursor + 1, &ApiError::ProducerLost);
                    return;
                }
                Found::Producer { alive: false } => {
                    missing.get_or_insert_with(Instant::now);
                    tokio::time::sleep(lease / 3).await;
                }
            }
        }
    }
}

/// What a reader finds next in Redis.
enum Found {
    /// Entries after its cursor (none: the producer said it wrote, look again).
    Events(Vec<StreamId>),
    /// The log ended at or before the cursor: nothing will come after it.
    Ended,
    /// The log was closed `lost` at or before the cursor.
    Lost,
    /// Nothing for a lease: whether the producer's heartbeat key is there.
    Producer { alive: bool },
}

/// The entries after `cursor`; if none, waits up to `wait` for the producer's word, then
/// looks at the log's last entry and the producer's heartbeat.
async fn look(
    conn: &mut Connection,
    progress: &mut watch::Receiver<()>,
    keys: &Keys,
    alive_key: &str,
    cursor: u64,
    wait: Option<Duration>,
) -> RedisResult<Found> {
    progress.borrow_and_update();
    let options = redis::streams::StreamReadOptions::default().count(PAGE);
    let reply: Option<StreamReadReply> = conn
        .xread_options(&[&keys.log], &[format!("0-{cursor}")], &options)
        .await?;
    let entries: Vec<StreamId> = reply
        .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
        .unwrap_or_default();
    if !entries.is_empty() {
        return Ok(Found::Events(entries));
    }
    if let Some(wait) = wait
        && tokio::time::timeout(wait, progress.changed()).await.is_ok()
    {
        return Ok(Found::Events(entries));
    }
    // A cursor ahead of the stream never sees its end marker come after it.
    let last: StreamRangeReply = conn.xrevrange_count(&keys.log, "+", "-", 1).await?;
    if let Some(e) = last.ids.first()
        && entry_number(&e.id) <= cursor + 1
    {
        if e.map.contains_key("end") {
            return Ok(Found::Ended);
        }
        if e.map.contains_key("lost") {
            return Ok(Found::Lost);
        }
    }
    Ok(Found::Producer {
        alive: conn.exists(alive_key).await?,
    })
}

/// Patience with a failing Redis (the writer's, a reader's): pauses growing from 50 ms to
/// 1 s between tries, for as long as `patience`.
struct Retry {
    since: Option<Instant>,
    pause: Duration,
    patience: Duration,
}

impl Retry {
    fn new(patience: Duration) -> Retry {
        Retry {
            since: None,
            pause: Duration::from_millis(50),
            patience,
        }
    }

    /// Waits before the next try, or says (false) that patience has run out.
    async fn wait(&mut self) -> bool {
        let since = *self.since.get_or_insert_with(Instant::now);
        if since.elapsed() >= self.patience {
            return false;
        }
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(Duration::from_secs(1));
        true
    }
}
