//! One stream's event log: the encoded SSE events in order (event `n` has `id: n`), the
//! readers attached to it, and the control its producer obeys (readers come and go, a
//! cancel). Readers wait on the log's progress, not on a timer.

use opentelemetry::trace::SpanContext;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::Stream;
use tokio::sync::watch;

use super::{ENTRY_BYTES, lock, shared};
use crate::dialect::Wire;
use crate::error::ApiError;

pub(super) struct Entry {
    pub(super) id: Arc<str>,
    /// The principal that started it: the only one that may read or cancel it.
    pub(super) owner: Arc<str>,
    pub(super) wire: Wire,
    log: Mutex<Log>,
    /// The number of the last event logged (bumped again when the log ends).
    progress: watch::Sender<u64>,
    control: watch::Sender<Control>,
    /// Each attached reader's cursor, and word of its progress.
    cursors: Mutex<Vec<Arc<AtomicU64>>>,
    taken: tokio::sync::Notify,
    memory: Memory,
    /// The same log in Redis, when configured.
    shared: Option<shared::Log>,
    /// What the stream's creator keeps beside it (a response's conversation).
    pub(super) context: Option<Bytes>,
    /// The span of the request that started it, which its readers' spans link to.
    pub(super) trace: Option<SpanContext>,
    /// The reply it adds up to, once built.
    reply: std::sync::OnceLock<super::Reply>,
}

/// What one client's logs hold: their bytes, and how many of them have finished (and so
/// may be evicted for room).
#[derive(Default)]
pub(super) struct Held {
    pub(super) bytes: AtomicUsize,
    pub(super) finished: AtomicUsize,
}

/// Where a log's bytes are counted: with every log's, with its client's, on the gauge; and
/// who is told when they are given back.
pub(super) struct Memory {
    pub(super) all: Arc<AtomicUsize>,
    pub(super) owner: Arc<Held>,
    pub(super) gauge: metrics::Gauge,
    pub(super) freed: Arc<tokio::sync::Notify>,
}

/// What the producer obeys.
#[derive(Clone, Copy, Default)]
pub(super) struct Control {
    pub(super) readers: usize,
    pub(super) cancelled: bool,
}

struct Log {
    events: VecDeque<Bytes>,
    /// The number of `events[0]`: above 1 once an attached stream outgrew its cap.
    first: u64,
    bytes: usize,
    ended: bool,
    /// Evicted or expired: its memory is given back and nothing can be read.
    released: bool,
}

impl Log {
    fn last(&self) -> u64 {
        self.first + self.events.len() as u64 - 1
    }
}

/// What a reader finds after its cursor.
pub(super) enum Read {
    /// Events (copied out when asked).
    Events,
    /// None yet: the stream goes on.
    Waiting,
    /// None, and the stream has ended: the reader has it all.
    Ended,
    /// The events after the cursor are no longer kept.
    Gone,
    /// The cursor is past every event sent.
    Beyond,
}

impl Entry {
    pub(super) fn new(
        id: Arc<str>,
        owner: Arc<str>,
        wire: Wire,
        memory: Memory,
        shared: Option<shared::Log>,
        context: Option<Bytes>,
        trace: Option<SpanContext>,
    ) -> Self {
        Entry {
            id,
            owner,
            wire,
            log: Mutex::new(Log {
                events: VecDeque::with_capacity(64),
                first: 1,
                bytes: 0,
                ended: false,
                released: false,
            }),
            progress: watch::Sender::new(0),
            control: watch::Sender::new(Control::default()),
            cursors: Mutex::default(),
            taken: tokio::sync::Notify::new(),
            memory,
            shared,
            context,
            trace,
            reply: std::sync::OnceLock::new(),
        }
    }

    pub(super) fn reply(&self) -> Option<super::Reply> {
        self.reply.get().cloned()
    }

    /// Keeps the reply of a finished stream (the first one built, if two raced).
    pub(super) fn keep_reply(&self, reply: super::Reply) -> super::Reply {
        self.reply.get_or_init(|| reply).clone()
    }

    /// Whether a cancel stopped it.
    pub(super) fn was_cancelled(&self) -> bool {
        self.control.borrow().cancelled
    }

    /// Connections reading it now.
    pub(super) fn readers(&self) -> usize {
        self.control.borrow().readers
    }

    /// The last event every attached reader has taken (all of them, with none attached).
    fn min_cursor(&self) -> u64 {
        lock(&self.cursors)
            .iter()
            .map(|c| c.load(Ordering::Acquire))
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Told when a reader has taken events (or left): a producer waiting for room retries.
    pub(super) fn taken(&self) -> tokio::sync::futures::Notified<'_> {
        self.taken.notified()
    }

    pub(super) fn control(&self) -> watch::Receiver<Control> {
        self.control.subscribe()
    }

    pub(super) fn account(&self, bytes: isize) {
        let memory = &self.memory;
        if bytes >= 0 {
            memory.all.fetch_add(bytes as usize, Ordering::Relaxed);
            memory
                .owner
                .bytes
                .fetch_add(bytes as usize, Ordering::Relaxed);
            memory.gauge.increment(bytes as f64);
        } else {
            let freed = bytes.unsigned_abs();
            memory.all.fetch_sub(freed, Ordering::Relaxed);
            memory.owner.bytes.fetch_sub(freed, Ordering::Relaxed);
            memory.gauge.decrement(freed as f64);
            memory.freed.notify_waiters();
        }
    }

    /// What every log of this stream's client holds.
    pub(super) fn held(&self) -> &Held {
        &self.memory.owner
    }

    /// The bytes every log of this stream's client holds.
    pub(super) fn owned(&self) -> usize {
        self.memory.owner.bytes.load(Ordering::Relaxed)
    }

    /// It joins (or leaves) the finished logs that may be evicted.
    pub(super) fn evictable(&self, yes: bool) {
        let finished = &self.memory.owner.finished;
        if yes {
            finished.fetch_add(1, Ordering::Relaxed);
        } else {
            finished.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub(super) fn bytes(&self) -> usize {
        lock(&self.log).bytes
    }

    /// The number the next event gets.
    pub(super) fn next_id(&self) -> u64 {
        let log = lock(&self.log);
        log.last() + 1
    }

    /// Logs the next event within `cap` bytes, dropping the oldest events to make room, but
    /// only those every attached reader has taken; when that is not enough room, gives the
    /// event back (the producer waits for its slowest reader).
    pub(super) fn push_within(&self, event: Bytes, cap: usize) -> Result<(), Bytes> {
        // The newest event is always kept (the caller holds events to a log's cap): a stream
        // read live never stalls on room that other clients' logs hold.
        let cap = cap.max(event.len());
        let log = lock(&self.log);
        let mut need = (log.bytes + event.len()).saturating_sub(cap);
        if need > 0 {
            // Only when the log must trim do the readers' cursors matter (no path takes the
            // log's lock after the cursors').
            let read = self.min_cursor();
            for (n, old) in (log.first..).zip(log.events.iter()) {
                if need == 0 || n > read {
                    break;
                }
                need = need.saturating_sub(old.len());
            }
        }
        if need > 0 {
            return Err(event);
        }
        self.append(log, event, cap);
        Ok(())
    }

    /// Logs the next event whatever the room (the ending, which a reader must see), dropping
    /// what it can of what every reader has taken to stay within `cap`.
    pub(super) fn push(&self, event: Bytes, cap: usize) {
        let log = lock(&self.log);
        self.append(log, event, cap);
    }

    fn append(&self, mut log: std::sync::MutexGuard<'_, Log>, event: Bytes, cap: usize) {
        if log.released {
            return;
        }
        let mut delta = event.len() as isize;
        log.bytes += event.len();
        log.events.push_back(event.clone());
        let read = if log.bytes > cap {
            self.min_cursor()
        } else {
            0
        };
        while log.bytes > cap && log.events.len() > 1 && log.first <= read {
            if let Some(old) = log.events.pop_front() {
                log.first += 1;
                log.bytes -= old.len();
                delta -= old.len() as isize;
            }
        }
        let (id, first) = (log.last(), log.first);
        drop(log);
        self.account(delta);
        if let Some(shared) = &self.shared {
            // Redis keeps what memory keeps: the events trimmed here go there too.
            shared.event(id, event, first);
        }
        self.progress.send_replace(id);
    }

    pub(super) fn end(&self) {
        let mut log = lock(&self.log);
        log.ended = true;
        let next = log.last() + 1;
        drop(log);
        if let Some(shared) = &self.shared {
            shared.end(next, self.was_cancelled());
        }
        self.progress.send_modify(|_| {});
    }

    pub(super) fn has_ended(&self) -> bool {
        lock(&self.log).ended
    }

    pub(super) async fn wait_end(&self) {
        let mut progress = self.progress.subscribe();
        while !self.has_ended() {
            if progress.changed().await.is_err() {
                return;
            }
        }
    }

    pub(super) fn cancel(&self) {
        self.control.send_modify(|c| c.cancelled = true);
    }

    /// Gives the log's memory back; readers still attached find nothing more.
    pub(super) fn release(&self) {
        let mut log = lock(&self.log);
        if log.released {
            return;
        }
        log.released = true;
        let bytes = log.bytes + ENTRY_BYTES + self.context.as_ref().map_or(0, Bytes::len);
        log.first = log.last() + 1;
        log.events = VecDeque::new();
        log.bytes = 0;
        log.ended = true;
        drop(log);
        self.account(-(bytes as isize));
        if let Some(shared) = &self.shared {
            // Evicted or expired here: gone from Redis too, so it holds no more than memory.
            shared.forget();
        }
        self.progress.send_modify(|_| {});
    }

    /// What there is after event `after`, without copying it.
    pub(super) fn read_check(&self, after: u64) -> Read {
        self.read(after, None)
    }

    /// The events after `after` (a few at a time) into `into`, and what was found.
    fn read(&self, after: u64, into: Option<&mut Vec<Bytes>>) -> Read {
        let log = lock(&self.log);
        if log.released || after.saturating_add(1) < log.first {
            return Read::Gone;
        }
        let last = log.last();
        if after > last {
            return Read::Beyond;
        }
        if after == last {
            return if log.ended {
                Read::Ended
            } else {
                Read::Waiting
            };
        }
        if let Some(into) = into {
            let start = (after + 1 - log.first) as usize;
            let end = log.events.len().min(start + 32);
            into.extend(log.events.range(start..end).cloned());
        }
        Read::Events
    }

    /// The events still kept, and whether the stream has ended.
    pub(super) fn snapshot(&self) -> (Vec<Bytes>, bool) {
        let log = lock(&self.log);
        (log.events.iter().cloned().collect(), log.ended)
    }

    /// Every event of a finished stream that still has them all.
    pub(super) fn all(&self) -> Option<Vec<Bytes>> {
        let log = lock(&self.log);
        (log.ended && !log.released && log.first == 1).then(|| log.events.iter().cloned().collect())
    }
}

/// A reader's hold on a stream: while one exists the producer is not detached, and does
/// not drop events it has not taken yet.
pub(super) struct Attachment {
    entry: Arc<Entry>,
    /// The last event this reader has taken.
    cursor: Arc<AtomicU64>,
}

impl Attachment {
    pub(super) fn new(entry: Arc<Entry>, after: u64) -> Self {
        let cursor = Arc::new(AtomicU64::new(after));
        lock(&entry.cursors).push(cursor.clone());
        entry.control.send_modify(|c| c.readers += 1);
        Attachment { entry, cursor }
    }

    /// It has taken every event up to `n`: a producer waiting for room may go on.
    fn took(&self, n: u64) {
        self.cursor.store(n, Ordering::Release);
        self.entry.taken.notify_one();
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        lock(&self.entry.cursors).retain(|c| !Arc::ptr_eq(c, &self.cursor));
        self.entry.taken.notify_one();
        self.entry
            .control
            .send_modify(|c| c.readers = c.readers.saturating_sub(1));
    }
}

/// Whether the log was evicted or expired (a reader attached then just ends).
fn released(entry: &Entry) -> bool {
    lock(&entry.log).released
}

/// The events after `after`, then live ones as they are logged, until the stream's end.
/// The reader stays attached until this stream is dropped (its connection closed).
pub(super) fn follow(attachment: Attachment, after: u64) -> impl Stream<Item = Bytes> + Send {
    async_stream::stream! {
        let entry = attachment.entry.clone();
        let mut progress = entry.progress.subscribe();
        let mut cursor = after;
        let mut batch = Vec::with_capacity(32);
        loop {
            progress.borrow_and_update();
            match entry.read(cursor, Some(&mut batch)) {
                Read::Events => {
                    for event in batch.drain(..) {
                        yield event;
                        cursor += 1;
                    }
                    attachment.took(cursor);
                }
                // Nothing after the cursor yet (or the cursor is ahead of a running
                // stream): wait for the next event.
                Read::Waiting => {
                    if progress.changed().await.is_err() {
                        return;
                    }
                }
                Read::Beyond if !entry.has_ended() => {
                    if progress.changed().await.is_err() {
                        return;
                    }
                }
                // A reader that fell behind an attached stream's cap is told so (never a
                // quiet end that looks like the stream's); reconnecting, it gets a 410.
                Read::Gone if !released(&entry) => {
                    let gone = ApiError::StreamEventsGone(entry.id.to_string());
                    yield entry.wire.error_event(&entry.id, cursor + 1, &gone);
                    return;
                }
                Read::Ended | Read::Gone | Read::Beyond => return,
            }
        }
    }
}
