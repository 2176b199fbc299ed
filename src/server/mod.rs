//! Serving: the accept loop, each connection as HTTP/1.1 or HTTP/2 (h2c by prior knowledge,
//! or by ALPN under TLS), and shutdown (stop accepting, let open streams finish for a grace
//! period, then end the rest with an error event saying the server is restarting).
//!
//! Connections are resources like streams: `table.rs` caps them per client address and,
//! when every slot is taken, closes the one idle longest to admit a newcomer; a connection
//! with no request in progress for the header limit is closed, whatever its protocol
//! (`connection.rs`); and a response's slow-client and total deadlines run on timers of
//! their own, whether or not its client lets bytes out (`deadline.rs`).

mod connection;
mod deadline;
mod table;

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioTimer;
use hyper_util::server::conn::auto;
use metrics::Counter;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, TryAcquireError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::state::{AppState, ServerSettings};
use connection::Connection;
use deadline::StreamExecutor;
use table::Table;

/// The largest request head (line and headers) sluice reads over HTTP/1.1; a larger one is
/// refused with 431. HTTP/2 has the same limit on its header list.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Streams one HTTP/2 connection may have open at once.
const MAX_H2_STREAMS: u32 = 256;
/// HTTP/2 flow-control windows: what a client may send before sluice reads it. Request
/// bodies are small; the window that paces token streams is the client's own.
const H2_STREAM_WINDOW: u32 = 1024 * 1024;
const H2_CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
/// How long start-up waits for the default upstream's model list.
const CATALOGUE_AT_START: Duration = Duration::from_secs(2);

/// The most descriptor-table entries [`reserve_descriptors`] makes room for.
const RESERVED_TABLE: u64 = 65_536;

/// Takes every descriptor the system allows (each open stream holds two), and grows the
/// process's descriptor table to that size (at most [`RESERVED_TABLE`]) while the process
/// has one thread: call it before the runtime starts. The kernel grows the table as
/// descriptors are taken, and in a process of several threads each growth waits for an RCU
/// grace period (11 ms on the machine of the book's figures, docs/src/measured.md) inside the `accept` or
/// `socket` call that needed it, stalling every stream of that worker; grown at start, the
/// table never shrinks.
pub fn reserve_descriptors() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((1024, 1024));
    let Ok(null) = std::fs::File::open("/dev/null") else {
        return;
    };
    let want = soft.min(RESERVED_TABLE).saturating_sub(64);
    // Descriptors taken one after another fill the table to its end; all closed at once.
    let held: Vec<std::fs::File> = (0..want).map_while(|_| null.try_clone().ok()).collect();
    drop(held);
}

/// Serves `app(state)` on `listener` until `shutdown` completes. Then no connection is
/// accepted; open streams may finish for `grace`, after which they end with an error event
/// (`server_restarting`), and their last bytes get one more second to leave.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> io::Result<()> {
    // The upstream's model list names the models metrics may label: fetch it before the
    // first request (bounded: a dead upstream does not hold start-up for long).
    let _ = tokio::time::timeout(CATALOGUE_AT_START, state.routes.refresh_catalogue()).await;
    let upkeep = CancellationToken::new();
    let admission = state.admission.clone().maintain(upkeep.clone());
    let metrics = state.metrics.clone().maintain(upkeep.clone());
    let catalogue = state.routes.clone().maintain(upkeep.clone());
    let reloads = state.clone().reloads(upkeep.clone());
    let keys = state.clone().refresh_keys(upkeep.clone());
    #[expect(
        clippy::disallowed_methods,
        reason = "the one background task: admission's, metrics', the routes', the configuration's and the keys' upkeep, ends with serve"
    )]
    tokio::spawn(async move { tokio::join!(admission, metrics, catalogue, reloads, keys) });
    state.streams.spawn_shared(upkeep.clone());
    let _upkeep = upkeep.drop_guard();
    // The ledger's writer outlives the connections: it stops last, once the streams' ends
    // are queued, and writes what is queued within the grace period (at least two seconds).
    let flush = grace.max(Duration::from_secs(2));
    let stop_ledger = CancellationToken::new();
    let ledger = state
        .ledger
        .as_ref()
        .and_then(|ledger| ledger.writer(stop_ledger.clone(), flush));
    #[expect(
        clippy::disallowed_methods,
        reason = "the ledger's writer: records reach the database off every request's path; it ends after the connections, flushing"
    )]
    let ledger = ledger.map(tokio::spawn);

    let settings = state.server.clone();
    let counters = Counters {
        slow_clients: state.metrics.slow_clients(),
        accept_errors: state.metrics.accept_errors(),
        idle_closed: state.metrics.idle_connections_closed(),
        refused_per_ip: state
            .metrics
            .counter("sluice_connections_refused_total", &[("reason", "per_ip")]),
        evicted: state.metrics.counter(
            "sluice_connections_closed_total",
            &[("reason", "idlest_for_newcomer")],
        ),
    };
    let closing = state.closing.clone();
    let app = crate::app(state);
    let builder = Arc::new(http_builder(&settings, &counters));
    let table = Table::new(
        settings.max_connections_per_ip,
        settings.trusted_proxies.clone(),
    );
    let connections = Arc::new(Semaphore::new(settings.max_connections));
    let stopping = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut backoff = Backoff::default();
    tokio::pin!(shutdown);

    loop {
        let permit = match connections.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(TryAcquireError::Closed) => break,
            Err(TryAcquireError::NoPermits) => {
                // Every slot is taken: the connection idle longest makes room for this one.
                // When every connection is serving a request, newcomers wait in the
                // kernel's backlog, not in sluice's memory.
                if table.close_idlest() {
                    counters.evicted.increment(1);
                }
                tokio::select! {
                    permit = connections.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                    () = &mut shutdown => break,
                }
            }
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => {
                backoff.reset();
                accepted
            }
            Err(e) => {
                // Out of descriptors, mostly: wait for connections to close instead of
                // spinning on the error.
                counters.accept_errors.increment(1);
                let wait = backoff.next();
                tracing::warn!(error = %e, wait_ms = wait.as_millis() as u64, "accept failed");
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        let Some(entry) = table.open(peer.ip()) else {
            // This address holds as many connections as it may: this one closes at once.
            counters.refused_per_ip.increment(1);
            tracing::debug!(%peer, "connection refused: its address has its cap");
            drop(tcp);
            continue;
        };
        let connection = Connection {
            builder: builder.clone(),
            settings: settings.clone(),
            counters: counters.clone(),
            app: app.clone(),
            peer,
            entry,
        };
        let stopping = stopping.clone();
        #[expect(
            clippy::disallowed_methods,
            reason = "one task per client connection, as every server has; it owns the connection and ends with it"
        )]
        tokio::spawn(tracker.track_future(async move {
            connection.run(tcp, stopping).await;
            drop(permit);
        }));
    }

    drop(listener);
    tracing::info!(
        grace_s = grace.as_secs_f64(),
        "shutting down: no new connections; open streams may finish"
    );
    stopping.cancel();
    tracker.close();
    let finished = tokio::select! {
        () = tracker.wait() => true,
        () = tokio::time::sleep(grace) => false,
    };
    if !finished {
        tracing::warn!("grace period over: ending open streams with `server_restarting`");
        closing.cancel();
        if tokio::time::timeout(Duration::from_secs(1), tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "connections still open one second after the grace period: leaving them"
            );
        }
    }
    stop_ledger.cancel();
    if let Some(writer) = ledger {
        let _ = tokio::time::timeout(flush + Duration::from_secs(1), writer).await;
    }
    Ok(())
}

fn http_builder(settings: &ServerSettings, counters: &Counters) -> auto::Builder<StreamExecutor> {
    let executor = StreamExecutor {
        slow: settings.slow_client_timeout,
        total: settings.total_timeout,
        slow_clients: counters.slow_clients.clone(),
    };
    let mut builder = auto::Builder::new(executor);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_H2_STREAMS)
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

#[derive(Clone)]
struct Counters {
    slow_clients: Counter,
    accept_errors: Counter,
    idle_closed: Counter,
    refused_per_ip: Counter,
    evicted: Counter,
}

/// Waits between failed accepts: 5 ms doubling to 1 s, reset by a success.
#[derive(Default)]
struct Backoff(Option<Duration>);

impl Backoff {
    fn next(&mut self) -> Duration {
        let wait = self.0.map_or(Duration::from_millis(5), |w| {
            (w * 2).min(Duration::from_secs(1))
        });
        self.0 = Some(wait);
        wait
    }

    fn reset(&mut self) {
        self.0 = None;
    }
}
