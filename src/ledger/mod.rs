//! The ledger: one record per chat request that reached a model — who asked, which model
//! served it, how it ended, its tokens and what they cost; never the prompt or the reply —
//! in a database (`SLUICE_DATABASE_URL`: SQLite by default, PostgreSQL for several instances,
//! or `off`). Off the hot path: a stream's end hands its record to a bounded queue and goes
//! on; one task writes the queue in batches, keeps what a slow or stopped database could not
//! take, and drops (counting them) only what overflows the queue. Each record has its own id,
//! the table's key, so a batch written again after a failure adds nothing twice.

/// The same code on either pool (the body is compiled once for each).
macro_rules! on {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            Db::Sqlite($pool) => $body,
            Db::Postgres($pool) => $body,
        }
    };
}

mod db;
pub mod keys;
pub mod report;

pub use db::Db;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Records that may wait for the database; past this they are dropped, and counted.
pub const QUEUE: usize = 100_000;
/// Records written in one statement at most.
const BATCH: usize = 256;
/// How long the first record of a batch waits for others.
const LINGER: Duration = Duration::from_millis(100);
/// The longest wait between attempts on a database that failed.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// One request as the ledger keeps it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Record {
    /// sluice's own id for the record (a request's `x-request-id` may be its client's).
    pub id: String,
    pub request_id: String,
    /// When the request arrived, in microseconds since 1970-01-01 UTC (requests a moment
    /// apart keep their order).
    pub at_us: i64,
    /// The key's name, or the client's address when sluice has no keys.
    pub key: String,
    pub team: Option<String>,
    /// The HTTP route, as written (`/v1/chat/completions`).
    pub route: String,
    /// The model asked for, the name it was served as, and the target that served it.
    pub model: String,
    pub served_model: Option<String>,
    pub target: Option<String>,
    /// The client's API: `openai`, `anthropic`, `sluice`.
    pub api: String,
    pub stream_id: Option<String>,
    /// `completed`, `cancelled`, `timed_out`, `upstream_error`, `shutdown`, `budget_exceeded`,
    /// `revoked`.
    pub outcome: String,
    pub error: Option<String>,
    pub input_tokens: i64,
    pub cached_tokens: i64,
    pub cache_write_tokens: i64,
    pub output_tokens: i64,
    pub reasoning_tokens: i64,
    /// USD; `None` when the model has no price.
    pub cost_usd: Option<f64>,
    pub ttft_ms: Option<f64>,
    pub duration_ms: f64,
    pub trace_id: Option<String>,
}

/// The ledger's handle: cheap to clone, shared by every stream.
#[derive(Clone)]
pub struct Ledger(Arc<Inner>);

struct Inner {
    queue: mpsc::Sender<Record>,
    /// The queue's other end, until the writer takes it.
    taken: Mutex<Option<mpsc::Receiver<Record>>>,
    url: String,
    /// The URL with its password masked.
    shown: String,
    /// The database, once connected (reports read it).
    db: Mutex<Option<Db>>,
    /// Told when the writer's first attempt to connect has ended, either way.
    tried: tokio::sync::Notify,
    state: Mutex<State>,
    dropped: AtomicU64,
    /// Records the writer holds in the batch it is trying to write.
    holding: AtomicU64,
    counters: Counters,
    /// This instance's name in the records: host and process id.
    instance: String,
}

/// The ledger's series in `/metrics`.
#[derive(Clone)]
pub struct Counters {
    pub written: Counter,
    pub dropped: Counter,
    pub failed_writes: Counter,
    pub queued: Gauge,
}

#[derive(Debug, Clone)]
enum State {
    Connecting,
    Writing,
    /// The database could not be reached or refused a write, since then: records queue.
    Down {
        error: String,
        since: Instant,
    },
}

impl Ledger {
    /// A ledger on the database at `url` (`sqlite://path`, `postgres://…`): nothing is
    /// connected until [`Ledger::writer`] runs.
    pub fn new(url: &str, counters: Counters) -> Ledger {
        let (queue, taken) = mpsc::channel(QUEUE);
        Ledger(Arc::new(Inner {
            queue,
            taken: Mutex::new(Some(taken)),
            url: url.to_owned(),
            shown: db::masked(url),
            db: Mutex::new(None),
            tried: tokio::sync::Notify::new(),
            state: Mutex::new(State::Connecting),
            dropped: AtomicU64::new(0),
            holding: AtomicU64::new(0),
            counters,
            instance: instance(),
        }))
    }

    /// Queues `record` for the writer, at once: a full queue drops it (counted).
    pub fn record(&self, mut record: Record) {
        record.id = uuid::Uuid::new_v4().simple().to_string();
        if self.0.queue.try_send(record).is_err() {
            self.0.dropped.fetch_add(1, Ordering::Relaxed);
            self.0.counters.dropped.increment(1);
        }
    }

    /// This instance's name, as its records give it.
    pub fn instance(&self) -> &str {
        &self.0.instance
    }

    /// The database, once the writer has connected to it (waiting, a few seconds at most,
    /// for its first attempt).
    pub async fn db(&self) -> Option<Db> {
        let tried = self.0.tried.notified();
        if matches!(*lock(&self.0.state), State::Connecting) {
            let _ = tokio::time::timeout(Duration::from_secs(5), tried).await;
        }
        lock(&self.0.db).clone()
    }

    /// Why the database cannot take records, while it cannot.
    pub fn error(&self) -> Option<String> {
        match &*lock(&self.0.state) {
            State::Down { error, .. } => Some(error.clone()),
            _ => None,
        }
    }

    /// The ledger as `/readyz` shows it.
    pub fn status(&self) -> serde_json::Value {
        let state = lock(&self.0.state).clone();
        let queued =
            (QUEUE - self.0.queue.capacity()) as u64 + self.0.holding.load(Ordering::Relaxed);
        let dropped = self.0.dropped.load(Ordering::Relaxed);
        let (status, error, down_s) = match state {
            State::Connecting => ("connecting", None, None),
            State::Writing => ("ok", None, None),
            State::Down { error, since } => {
                ("buffering", Some(error), Some(since.elapsed().as_secs()))
            }
        };
        serde_json::json!({
            "database": self.0.shown,
            "status": status,
            "error": error,
            "down_s": down_s,
            "queued": queued,
            "dropped": dropped,
        })
    }

    fn set(&self, state: State) {
        *lock(&self.0.state) = state;
    }

    /// The task that writes the queue, for `serve` to run (once: later calls get `None`).
    /// It ends when `stop` is cancelled and it has written what was queued, or after
    /// `flush` more.
    pub fn writer(
        &self,
        stop: CancellationToken,
        flush: Duration,
    ) -> Option<impl Future<Output = ()> + Send + 'static> {
        let queue = lock(&self.0.taken).take()?;
        Some(Writer::new(self.clone(), queue).run(stop, flush))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Host name and process id: which instance wrote a record.
fn instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "sluice".into());
    format!("{host}:{}", std::process::id())
}

/// The writer's state: the queue, and the batch it is trying to write.
struct Writer {
    ledger: Ledger,
    queue: mpsc::Receiver<Record>,
    batch: Vec<Record>,
    backoff: Duration,
    /// Drops already said in the log.
    told: u64,
}

impl Writer {
    fn new(ledger: Ledger, queue: mpsc::Receiver<Record>) -> Self {
        Writer {
            ledger,
            queue,
            batch: Vec::with_capacity(BATCH),
            backoff: Duration::ZERO,
            told: 0,
        }
    }

    async fn run(mut self, stop: CancellationToken, flush: Duration) {
        let url = self.ledger.0.url.clone();
        let mut db = None;
        loop {
            if db.is_none() {
                db = self.connect(&url).await;
            }
            if self.batch.is_empty() {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    n = self.queue.recv_many(&mut self.batch, BATCH) => if n == 0 { break },
                }
                // Records come as streams end, one at a time: waiting a moment for those
                // that follow makes one commit of many (a commit costs far more than a row).
                if self.batch.len() < BATCH {
                    tokio::select! {
                        () = stop.cancelled() => {}
                        () = tokio::time::sleep(LINGER) => {}
                    }
                }
            }
            while self.batch.len() < BATCH
                && let Ok(record) = self.queue.try_recv()
            {
                self.batch.push(record);
            }
            self.say_drops();
            if let Some(db) = &db
                && self.write(db).await
            {
                continue;
            }
            // Down: the records wait while the database does.
            let held = self.batch.len();
            self.ledger.0.holding.store(held as u64, Ordering::Relaxed);
            self.ledger
                .0
                .counters
                .queued
                .set((self.queue.len() + held) as f64);
            self.backoff = (self.backoff * 2).clamp(Duration::from_millis(100), MAX_BACKOFF);
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(self.backoff) => {}
            }
        }
        self.flush(db, &url, flush).await;
    }

    /// Writes what is queued at shutdown, retrying until `within` has passed.
    async fn flush(mut self, mut db: Option<Db>, url: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            while self.batch.len() < BATCH
                && let Ok(record) = self.queue.try_recv()
            {
                self.batch.push(record);
            }
            if self.batch.is_empty() || !db::known(url) {
                break;
            }
            if db.is_none() {
                db = self.connect(url).await;
            }
            let written = match &db {
                Some(db) => self.write(db).await,
                None => false,
            };
            if !written {
                let wait = self.backoff.max(Duration::from_millis(100));
                if Instant::now() + wait >= deadline {
                    break;
                }
                tokio::time::sleep(wait).await;
            }
        }
        let left = self.batch.len() + self.queue.len();
        if left > 0 {
            tracing::error!(
                records = left,
                "ledger: shutting down with records the database did not take; they are lost"
            );
        }
        self.say_drops();
    }

    async fn connect(&mut self, url: &str) -> Option<Db> {
        match Db::open(url).await {
            Ok(db) => {
                tracing::info!(database = %self.ledger.0.shown, "ledger: writing to the database");
                *lock(&self.ledger.0.db) = Some(db.clone());
                self.ledger.set(State::Writing);
                self.ledger.0.tried.notify_waiters();
                Some(db)
            }
            Err(e) => {
                self.down(format!("{e:#}"));
                self.ledger.0.tried.notify_waiters();
                None
            }
        }
    }

    /// Writes the batch: true when the database took it.
    async fn write(&mut self, db: &Db) -> bool {
        let n = self.batch.len();
        self.ledger.0.holding.store(n as u64, Ordering::Relaxed);
        let result = db.insert(&self.ledger.0.instance, &self.batch).await;
        self.ledger
            .0
            .counters
            .queued
            .set((self.queue.len() + n) as f64);
        match result {
            Ok(()) => {
                self.ledger.0.counters.written.increment(n as u64);
                self.batch.clear();
                self.ledger.0.holding.store(0, Ordering::Relaxed);
                self.ledger.0.counters.queued.set(self.queue.len() as f64);
                if self.backoff > Duration::ZERO {
                    tracing::info!(database = %self.ledger.0.shown, "ledger: the database takes records again");
                    self.backoff = Duration::ZERO;
                }
                self.ledger.set(State::Writing);
                true
            }
            Err(e) => {
                self.ledger.0.counters.failed_writes.increment(1);
                self.down(format!("{e:#}"));
                false
            }
        }
    }

    /// The database failed: said loudly once, then while it stays down, not at every retry.
    fn down(&mut self, error: String) {
        let mut state = lock(&self.ledger.0.state);
        let first = !matches!(*state, State::Down { .. });
        let since = match &*state {
            State::Down { since, .. } => *since,
            _ => Instant::now(),
        };
        if first {
            tracing::error!(
                database = %self.ledger.0.shown,
                error = %error,
                queued = self.queue.len() + self.batch.len(),
                "ledger: the database cannot take records; they wait in memory (at most {QUEUE}) and are written when it can"
            );
        }
        *state = State::Down { error, since };
    }

    fn say_drops(&mut self) {
        let dropped = self.ledger.0.dropped.load(Ordering::Relaxed);
        if dropped > self.told {
            tracing::error!(
                dropped = dropped - self.told,
                total = dropped,
                "ledger: the queue was full; records were dropped"
            );
            self.told = dropped;
        }
    }
}
