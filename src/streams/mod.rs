//! Resumable streams: a stream that outlives its connection. Its encoder's events go into
//! an event log that connections attach to (`Last-Event-ID` picks where a reader starts);
//! a task produces into the log, so a client that leaves does not stop the generation for
//! `SLUICE_RESUME_GRACE_S`, and one that comes back reads on from its cursor. `log.rs` is
//! one stream's log; `shared.rs` mirrors logs into Redis Streams so that any instance can
//! serve a resume or a cancel.
//!
//! A stream nobody can resume never comes here: it is served directly, and dropped with
//! its connection (cancellation stays structural).

mod log;
mod shared;

use opentelemetry::trace::SpanContext;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderValue;
use axum::response::Response;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use tokio::time::Instant;

use crate::dialect::Wire;
use crate::error::ApiError;
use crate::relay;
use crate::telemetry::Metrics;
use log::{Attachment, Entry, Read};

/// How resumable streams behave, from the configuration.
#[derive(Clone)]
pub struct Settings {
    /// How long a stream runs on with no reader; zero: no stream is resumable.
    pub grace: Duration,
    /// How long a finished stream stays readable.
    pub ttl: Duration,
    /// Bytes of logs this instance keeps at most, in memory and in Redis alike.
    pub memory: usize,
    /// The part of `memory` one client's logs may hold (`SLUICE_RESUME_CLIENT_SHARE`).
    pub client_share: f64,
    /// Connections reading one stream at once (`SLUICE_MAX_READERS`).
    pub max_readers: usize,
    /// Between keep-alive comments on a reader's connection.
    pub keep_alive: Duration,
    /// How long a reader on another instance waits on a silent producer before it asks
    /// whether that producer is still alive (`SLUICE_IDLE_TIMEOUT_MS`).
    pub idle: Duration,
    /// The longest a stream may run (`SLUICE_TOTAL_TIMEOUT_MS`): how long a shared log of a
    /// running stream is kept.
    pub total: Duration,
    /// Redis, for logs any instance can read (`SLUICE_REDIS_URL`).
    pub redis: Option<crate::link::Link>,
    /// When Redis cannot be reached: refuse (503) rather than serve without resumption.
    pub redis_fail_closed: bool,
}

/// What a log costs besides its events: its entry, its id, its bookkeeping.
const ENTRY_BYTES: usize = 1024;

/// The streams this instance produces, by id.
#[derive(Clone)]
pub struct Streams(Arc<Registry>);

struct Registry {
    settings: Settings,
    /// A log's cap: a detached producer pauses there; an attached one drops its oldest
    /// events past it.
    per_stream: usize,
    /// The most one client's logs hold.
    share: usize,
    live: Mutex<HashMap<Arc<str>, Arc<Entry>>>,
    /// Finished streams in the order they finished: the first evicted when memory is short.
    finished: Mutex<VecDeque<Arc<Entry>>>,
    bytes: Arc<AtomicUsize>,
    /// Each client's logs' bytes.
    owners: Mutex<HashMap<Arc<str>, Arc<log::Held>>>,
    /// Told when a log gives its memory back: a producer paused for room tries again.
    freed: Arc<tokio::sync::Notify>,
    metrics: StreamMetrics,
    shared: Option<Arc<shared::Shared>>,
}

#[derive(Clone)]
struct StreamMetrics {
    resumes: metrics::Counter,
    detached: metrics::Counter,
    grace_expired: metrics::Counter,
    cancels: metrics::Counter,
    unavailable_memory: metrics::Counter,
    unavailable_redis: metrics::Counter,
    log_bytes: metrics::Gauge,
}

/// Where a reader starts, and what it gets there.
pub enum Attached {
    /// The events after the cursor, then live ones, then the stream's ending.
    Events(BoxStream<'static, Bytes>),
    /// The stream has ended and the reader has every event (204: an `EventSource` stops).
    Complete,
}

/// What a stream's producer does when its last reader leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detach {
    /// Goes on for `SLUICE_RESUME_GRACE_S`, waiting for a reader to come back.
    Grace,
    /// Stops at once, as a direct stream would (a stored, foreground response).
    Cancel,
    /// Runs to its end whoever reads (a background response).
    Keep,
}

/// A log made for a stream that is not running yet.
pub struct Slot {
    streams: Streams,
    entry: Arc<Entry>,
}

impl Slot {
    /// Runs `events` into the log; the returned reader follows it from the start.
    pub fn run(
        self,
        events: impl Stream<Item = Bytes> + Send + 'static,
        detach: Detach,
    ) -> impl Stream<Item = Bytes> + Send + 'static {
        // The first reader is there before the producer starts: it never sees a detach.
        let attachment = Attachment::new(self.entry.clone(), 0);
        self.spawn(events, detach);
        log::follow(attachment, 0)
    }

    /// Runs `events` into the log with nobody reading (a background response).
    pub fn run_detached(self, events: impl Stream<Item = Bytes> + Send + 'static) {
        self.spawn(events, Detach::Keep);
    }

    fn spawn(self, events: impl Stream<Item = Bytes> + Send + 'static, detach: Detach) {
        #[expect(
            clippy::disallowed_methods,
            reason = "a resumable stream's producer: owned by the registry, not a connection; it ends with the stream (its end, a cancel, the grace period) and its log with the TTL"
        )]
        tokio::spawn(self.streams.produce(self.entry, events, detach));
    }
}

/// What is kept of a stream: what its creator stored beside it, and its events.
pub struct Stored {
    pub context: Option<Bytes>,
    /// The events still kept, in order (the oldest may be gone from a long stream).
    pub events: Vec<Bytes>,
    pub ended: bool,
}

/// The reply a finished stream adds up to, as its route renders it (`ok`: a success, else
/// the error it ended in): built once from its events and kept.
#[derive(Clone)]
pub struct Reply {
    pub ok: bool,
    pub body: Bytes,
}

/// What a cancel found.
pub enum Cancelled {
    /// Stopped now: the upstream request is dropped.
    Now,
    /// It had already ended.
    Ended,
}

impl Streams {
    pub fn new(settings: Settings, metrics: &Metrics) -> anyhow::Result<Self> {
        let shared = match &settings.redis {
            Some(link) if !settings.grace.is_zero() => Some(shared::Shared::new(
                link.clone(),
                &settings,
                metrics.redis_errors(),
            )),
            _ => None,
        };
        let metrics = StreamMetrics {
            resumes: metrics.counter("sluice_stream_resumes_total", &[]),
            detached: metrics.counter("sluice_streams_detached_total", &[]),
            grace_expired: metrics.counter("sluice_stream_grace_expired_total", &[]),
            cancels: metrics.counter("sluice_stream_cancels_total", &[]),
            unavailable_memory: metrics.counter(
                "sluice_streams_not_resumable_total",
                &[("reason", "memory")],
            ),
            unavailable_redis: metrics
                .counter("sluice_streams_not_resumable_total", &[("reason", "redis")]),
            log_bytes: metrics.gauge("sluice_stream_log_bytes"),
        };
        metrics.log_bytes.set(0.0);
        let share = (settings.memory as f64 * settings.client_share.clamp(0.0, 1.0)) as usize;
        let streams = Streams(Arc::new(Registry {
            per_stream: (settings.memory / 8).max(64 * 1024).min(share.max(1)),
            share,
            settings,
            live: Mutex::default(),
            finished: Mutex::default(),
            bytes: Arc::default(),
            owners: Mutex::default(),
            freed: Arc::default(),
            metrics,
            shared,
        }));
        Ok(streams)
    }

    /// Starts the tasks that keep the shared log (when Redis is configured): its writer,
    /// this instance's heartbeat, and the listener for cancels sent to other instances.
    pub fn spawn_shared(&self, upkeep: tokio_util::sync::CancellationToken) {
        if let Some(shared) = &self.0.shared {
            let registry = Arc::downgrade(&self.0);
            shared.spawn(upkeep, move |id| {
                if let Some(registry) = registry.upgrade() {
                    Streams(registry).cancel_here(&id);
                }
            });
        }
    }

    pub fn enabled(&self) -> bool {
        !self.0.settings.grace.is_zero()
    }

    /// The SSE response for `events`: resumable when `resumable` is asked for and there is
    /// room for its log (`x-sluice-resumable` says which), else served directly.
    pub async fn respond(
        &self,
        events: impl Stream<Item = Bytes> + Send + 'static,
        id: String,
        owner: &Arc<str>,
        wire: Wire,
        resumable: bool,
        trace: Option<SpanContext>,
    ) -> Result<Response, ApiError> {
        let keep_alive = self.0.settings.keep_alive;
        if !resumable {
            return Ok(relay::sse(events, wire.keep_alive(), &id, keep_alive));
        }
        let Some(slot) = self.slot(&id, owner, wire, None, trace).await? else {
            let mut response = relay::sse(events, wire.keep_alive(), &id, keep_alive);
            response
                .headers_mut()
                .insert("x-sluice-resumable", HeaderValue::from_static("false"));
            return Ok(response);
        };
        let mut response = relay::sse(
            slot.run(events, Detach::Grace),
            wire.keep_alive(),
            &id,
            keep_alive,
        );
        response
            .headers_mut()
            .insert("x-sluice-resumable", HeaderValue::from_static("true"));
        Ok(response)
    }

    /// A log for a new stream (with `context` kept beside it), or `None` when it cannot be
    /// kept (resumption off, no memory left, Redis unreachable and failing open).
    pub async fn slot(
        &self,
        id: &str,
        owner: &Arc<str>,
        wire: Wire,
        context: Option<Bytes>,
        trace: Option<SpanContext>,
    ) -> Result<Option<Slot>, ApiError> {
        let registry = &self.0;
        if !self.enabled() {
            return Ok(None);
        }
        let context_bytes = context.as_ref().map_or(0, Bytes::len);
        let needs = ENTRY_BYTES + context_bytes;
        let owned = self.owner_bytes(owner);
        if !self.room(owner, &owned, needs) {
            registry.metrics.unavailable_memory.increment(1);
            return Ok(None);
        }
        let id: Arc<str> = id.into();
        let shared = match &registry.shared {
            None => None,
            Some(shared) => match shared
                .open(
                    &id,
                    owner,
                    wire,
                    context.as_deref(),
                    trace.as_ref().map(crate::telemetry::traceparent).as_deref(),
                )
                .await
            {
                Ok(log) => Some(log),
                Err(e) => {
                    registry.metrics.unavailable_redis.increment(1);
                    tracing::warn!(error = %e, "Redis is unreachable: this stream cannot be resumed");
                    if registry.settings.redis_fail_closed {
                        return Err(ApiError::Busy {
                            message: "the shared stream log (Redis) cannot be reached".into(),
                            retry_after: Duration::from_secs(1),
                        });
                    }
                    return Ok(None);
                }
            },
        };
        let entry = Arc::new(Entry::new(
            id.clone(),
            owner.clone(),
            wire,
            log::Memory {
                all: registry.bytes.clone(),
                owner: owned,
                gauge: registry.metrics.log_bytes.clone(),
                freed: registry.freed.clone(),
            },
            shared,
            context,
            trace,
        ));
        entry.account(needs as isize);
        lock(&registry.live).insert(id, entry.clone());
        Ok(Some(Slot {
            streams: self.clone(),
            entry,
        }))
    }

    /// Runs a stream into its log: on while readers are attached, for the grace period once
    /// none is, until its end or a cancel. Then it stays readable for the TTL.
    async fn produce(
        self,
        entry: Arc<Entry>,
        events: impl Stream<Item = Bytes> + Send,
        detach: Detach,
    ) {
        let registry = &self.0;
        let mut control = entry.control();
        let grace = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(grace);
        let mut detached = false;
        // Boxed so that it can be dropped (and the upstream with it) before the TTL wait.
        let mut events = Box::pin(events);
        // An event read from the upstream that has no room in the log yet.
        let mut pending: Option<Bytes> = None;
        let ending = loop {
            let now = *control.borrow_and_update();
            if now.cancelled {
                registry.metrics.cancels.increment(1);
                break Some(ApiError::StreamCancelled);
            }
            if now.readers == 0 && detach == Detach::Cancel {
                // As a direct stream would be: dropped with its (last) connection.
                break Some(ApiError::StreamCancelled);
            }
            if now.readers == 0 && !detached && detach == Detach::Grace {
                detached = true;
                registry.metrics.detached.increment(1);
                grace
                    .as_mut()
                    .reset(Instant::now() + registry.settings.grace);
            } else if now.readers > 0 {
                detached = false;
            }
            // Nobody reads and the next event does not fit (the log's cap, the instance's
            // memory, the client's share): take nothing more from the upstream (TCP holds
            // it back) until there is room, a reader comes or the grace period ends.
            let freed = registry.freed.notified();
            tokio::pin!(freed);
            let taken = entry.taken();
            tokio::pin!(taken);
            if let Some(event) = pending.take() {
                freed.as_mut().enable();
                taken.as_mut().enable();
                match self.place(&entry, event, !detached) {
                    Ok(unplaced) => pending = unplaced,
                    Err(too_large) => break Some(too_large),
                }
            }
            let paused = pending.is_some();
            tokio::select! {
                biased;
                _ = control.changed() => {}
                _ = &mut grace, if detached => {
                    registry.metrics.grace_expired.increment(1);
                    break Some(ApiError::StreamCancelled);
                }
                () = &mut freed, if paused => {}
                () = &mut taken, if paused => {}
                event = events.next(), if !paused => match event {
                    // Comments (queue position) are for the connection that sees them.
                    Some(event) if event.first() == Some(&b':') => {}
                    Some(event) => match self.place(&entry, event, !detached) {
                        Ok(unplaced) => pending = unplaced,
                        Err(too_large) => break Some(too_large),
                    },
                    None => break None,
                },
            }
        };
        // Drops the backend stream: the upstream request closes, the meter records the end.
        drop(events);
        if let Some(error) = ending {
            // The ending is logged whatever the room: it is small, and a reader must see it.
            let event = entry.wire.error_event(&entry.id, entry.next_id(), &error);
            entry.push(event, registry.per_stream);
        }
        entry.end();
        entry.evictable(true);
        lock(&registry.finished).push_back(entry.clone());
        tokio::time::sleep(registry.settings.ttl).await;
        self.remove(&entry);
    }

    /// Logs `event` when there is room for it, else gives it back to wait for room (or
    /// fails, when it is larger than a log can ever hold: one event is never dropped). A stream read live
    /// (`trim`) makes room by dropping its own oldest events that every reader has taken,
    /// and waits for its slowest reader when those are not enough; one that nobody reads
    /// waits rather than take more than its log's cap, the instance's memory or its
    /// client's share. Finished logs are evicted for room first: the client's own,
    /// oldest first, then other clients' only while they hold more than their share.
    fn place(&self, entry: &Entry, event: Bytes, trim: bool) -> Result<Option<Bytes>, ApiError> {
        let registry = &self.0;
        let len = event.len();
        if len > registry.per_stream {
            return Err(ApiError::StreamTooLarge(format!(
                "one event of this stream is {len} bytes, more than the {} a resumable stream's log holds",
                registry.per_stream
            )));
        }
        let held = entry.bytes();
        if !trim && held + len > registry.per_stream {
            return Ok(Some(event));
        }
        let over = |registry: &Registry| {
            let all = registry.bytes.load(Ordering::Relaxed) + len;
            let own = entry.owned() + len;
            all.saturating_sub(registry.settings.memory)
                .max(own.saturating_sub(registry.share))
        };
        let mut excess = over(registry);
        if excess > 0 {
            self.evict(&entry.owner, entry.held(), len);
            excess = over(registry);
        }
        if excess > 0 && !trim {
            return Ok(Some(event));
        }
        let cap = registry.per_stream.min((held + len).saturating_sub(excess));
        Ok(entry.push_within(event, cap).err())
    }

    /// Frees finished logs until `owner` has room for `needs` more bytes: its own first,
    /// oldest first; then other clients' oldest, but only those of a client above its share.
    fn evict(&self, owner: &Arc<str>, held: &log::Held, needs: usize) {
        let registry = &self.0;
        let (memory, share) = (registry.settings.memory, registry.share);
        let over_all = || registry.bytes.load(Ordering::Relaxed) + needs > memory;
        let short = || over_all() || held.bytes.load(Ordering::Relaxed) + needs > share;
        // A client at its share with no finished log of its own has nothing to evict.
        if !over_all() && held.finished.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut finished = lock(&registry.finished);
        let mut evicted = Vec::new();
        // Oldest first, while `short` holds, the logs `pick` chooses.
        let mut evict_while = |short: &dyn Fn() -> bool, pick: &dyn Fn(&Entry) -> bool| {
            let mut i = 0;
            while short() && i < finished.len() {
                if !pick(&finished[i]) {
                    i += 1;
                } else if let Some(entry) = finished.remove(i) {
                    entry.evictable(false);
                    entry.release();
                    evicted.push(entry);
                }
            }
        };
        evict_while(
            &|| held.finished.load(Ordering::Relaxed) > 0 && short(),
            &|entry| entry.owner == *owner,
        );
        evict_while(&over_all, &|entry| entry.owned() > share);
        drop(finished);
        if evicted.is_empty() {
            return;
        }
        let mut live = lock(&registry.live);
        for entry in &evicted {
            if live.get(&entry.id).is_some_and(|e| Arc::ptr_eq(e, entry)) {
                live.remove(&entry.id);
            }
        }
    }

    /// Whether a new log of `needs` bytes for `owner` fits, once finished logs are evicted.
    fn room(&self, owner: &Arc<str>, held: &log::Held, needs: usize) -> bool {
        let registry = &self.0;
        let fits = || {
            registry.bytes.load(Ordering::Relaxed) + needs <= registry.settings.memory
                && held.bytes.load(Ordering::Relaxed) + needs <= registry.share
        };
        fits() || {
            self.evict(owner, held, needs);
            fits()
        }
    }

    /// What `owner`'s logs hold (made on its first log; forgotten once it holds none).
    fn owner_bytes(&self, owner: &Arc<str>) -> Arc<log::Held> {
        let mut owners = lock(&self.0.owners);
        if owners.len() > 1024 {
            owners.retain(|_, held| Arc::strong_count(held) > 1);
        }
        owners.entry(owner.clone()).or_default().clone()
    }

    fn remove(&self, entry: &Arc<Entry>) {
        let registry = &self.0;
        let mut live = lock(&registry.live);
        if live.get(&entry.id).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            live.remove(&entry.id);
        }
        drop(live);
        // Logs expire in about the order they finished: mostly the first in line.
        let mut finished = lock(&registry.finished);
        let before = finished.len();
        if finished.front().is_some_and(|e| Arc::ptr_eq(e, entry)) {
            finished.pop_front();
        } else {
            finished.retain(|e| !Arc::ptr_eq(e, entry));
        }
        if finished.len() < before {
            entry.evictable(false);
        }
        drop(finished);
        entry.release();
    }

    /// This instance's log of `id`, when `who` may read it in `wire`'s format.
    fn local(&self, id: &str, who: &str, wire: Wire) -> Option<Arc<Entry>> {
        lock(&self.0.live)
            .get(id)
            .filter(|e| &*e.owner == who && e.wire == wire)
            .cloned()
    }

    /// A reader for stream `id` from after event `after` (0: from the start), wherever the
    /// stream is logged, and the span of the request that started it (for the reader's to
    /// link to). Another client's stream is as unknown as one that never was.
    pub async fn attach(
        &self,
        id: &str,
        who: &str,
        wire: Wire,
        after: u64,
    ) -> Result<(Attached, Option<SpanContext>), ApiError> {
        self.check(id)?;
        if let Some(entry) = self.local(id, who, wire) {
            let producer = entry.trace.clone();
            // Stopped by a cancel: there is nothing to follow (a stream the grace period
            // ended is replayed, to its `stream_cancelled` ending).
            if entry.has_ended() && entry.was_cancelled() {
                return Err(ApiError::StreamCancelled);
            }
            let max_readers = self.0.settings.max_readers;
            if entry.readers() >= max_readers {
                return Err(crate::admission::Refusal::StreamReaders { max_readers }.into());
            }
            let attached = match entry.read_check(after) {
                Read::Gone => return Err(ApiError::StreamEventsGone(id.to_owned())),
                Read::Beyond if entry.has_ended() => return Err(cursor_beyond(after)),
                Read::Ended => Attached::Complete,
                // A cursor ahead of a running stream (a client that raced its producer)
                // waits for the events after it.
                Read::Events | Read::Waiting | Read::Beyond => {
                    Attached::Events(log::follow(Attachment::new(entry, after), after).boxed())
                }
            };
            self.0.metrics.resumes.increment(1);
            return Ok((attached, producer));
        }
        let Some(shared) = &self.0.shared else {
            return Err(ApiError::StreamNotFound(id.to_owned()));
        };
        let (attached, trace) = shared.attach(id, who, wire, after).await?;
        self.0.metrics.resumes.increment(1);
        let producer = trace.as_deref().and_then(crate::telemetry::span_of);
        Ok((attached, producer))
    }

    /// What is kept of stream `id`: its context and events, wherever it is logged.
    pub async fn stored(&self, id: &str, who: &str, wire: Wire) -> Result<Stored, ApiError> {
        self.check(id)?;
        if let Some(entry) = self.local(id, who, wire) {
            let (events, ended) = entry.snapshot();
            return Ok(Stored {
                context: entry.context.clone(),
                events,
                ended,
            });
        }
        match &self.0.shared {
            Some(shared) => shared.stored(id, who, wire).await,
            None => Err(ApiError::StreamNotFound(id.to_owned())),
        }
    }

    /// Forgets stream `id` (cancelling it first if it runs), wherever it is logged.
    pub async fn delete(&self, id: &str, who: &str, wire: Wire) -> Result<(), ApiError> {
        self.check(id)?;
        if let Some(entry) = self.local(id, who, wire) {
            entry.cancel();
            self.remove(&entry);
            if let Some(shared) = &self.0.shared {
                shared.forget(id).await;
            }
            return Ok(());
        }
        match &self.0.shared {
            Some(shared) => shared.delete(id, who, wire).await,
            None => Err(ApiError::StreamNotFound(id.to_owned())),
        }
    }

    /// The reply finished stream `id` adds up to: `build` makes it from the events the first
    /// time, and it is kept beside the log (here, and in Redis for the other instances), so a
    /// client asking again and again costs a lookup, not a rebuild. 409 while it runs.
    pub async fn reply(
        &self,
        id: &str,
        who: &str,
        wire: Wire,
        build: impl FnOnce(&[Bytes]) -> Reply,
    ) -> Result<Reply, ApiError> {
        self.check(id)?;
        if let Some(entry) = self.local(id, who, wire) {
            if let Some(reply) = entry.reply() {
                return Ok(reply);
            }
            let events = entry.all().ok_or_else(|| match entry.read_check(0) {
                Read::Gone => ApiError::StreamEventsGone(id.to_owned()),
                _ => ApiError::StreamRunning(id.to_owned()),
            })?;
            return Ok(entry.keep_reply(build(&events)));
        }
        let Some(shared) = &self.0.shared else {
            return Err(ApiError::StreamNotFound(id.to_owned()));
        };
        if let Some(reply) = shared.reply(id, who, wire).await? {
            return Ok(reply);
        }
        let reply = build(&shared.events(id, who, wire).await?);
        shared.keep_reply(id, &reply).await;
        Ok(reply)
    }

    /// Stops stream `id` (its upstream request closes at once), wherever it runs.
    pub async fn cancel(&self, id: &str, who: &str, wire: Wire) -> Result<Cancelled, ApiError> {
        self.check(id)?;
        if let Some(entry) = self.local(id, who, wire) {
            if entry.has_ended() {
                return Ok(Cancelled::Ended);
            }
            entry.cancel();
            // Answer once the producer has let the upstream go, so a client that reads
            // the answer knows it is done (bounded: a producer stuck elsewhere is not waited).
            let _ = tokio::time::timeout(Duration::from_secs(1), entry.wait_end()).await;
            return Ok(Cancelled::Now);
        }
        match &self.0.shared {
            Some(shared) => shared.cancel(id, who, wire).await,
            None => Err(ApiError::StreamNotFound(id.to_owned())),
        }
    }

    /// An id sluice could have made (`chat-…`, `chatcmpl-…`: letters, digits, `-`, `_`),
    /// while resumption is on; anything else is unknown before a lookup (or a Redis key)
    /// is made of it.
    fn check(&self, id: &str) -> Result<(), ApiError> {
        let plausible = !id.is_empty()
            && id.len() <= 128
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !self.enabled() || !plausible {
            let shown: String = id.chars().take(128).collect();
            return Err(ApiError::StreamNotFound(shown));
        }
        Ok(())
    }

    /// A cancel that another instance passed on: this instance's stream, if it has it.
    fn cancel_here(&self, id: &str) {
        if let Some(entry) = lock(&self.0.live).get(id) {
            entry.cancel();
        }
    }
}

/// A cursor past the last event a finished stream sent: no honest client has one. The
/// route says it in the words of the parameter the client used.
fn cursor_beyond(after: u64) -> ApiError {
    ApiError::CursorBeyond(after)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
