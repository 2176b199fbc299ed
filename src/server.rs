//! Serving: the accept loop (a cap on open connections, accept errors backed off and
//! counted), each connection as HTTP/1.1 or HTTP/2 (h2c by prior knowledge, or by ALPN under
//! TLS) with limits on slow and idle clients, and shutdown (stop accepting, let open streams
//! finish for a grace period, then end the rest with an error event saying the server is
//! restarting).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use metrics::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_io_timeout::TimeoutStream;
use tower::ServiceExt as _;

use crate::http::Peer;
use crate::state::{AppState, ServerSettings};

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
    let upkeep = tokio_util::sync::CancellationToken::new();
    let admission = state.admission.clone().maintain(upkeep.clone());
    let metrics = state.metrics.clone().maintain(upkeep.clone());
    let catalogue = state.routes.clone().maintain(upkeep.clone());
    #[expect(
        clippy::disallowed_methods,
        reason = "the one background task: admission's, metrics' and the model list's upkeep, ends with serve"
    )]
    tokio::spawn(async move { tokio::join!(admission, metrics, catalogue) });
    state.streams.spawn_shared(upkeep.clone());
    let _upkeep = upkeep.drop_guard();

    let settings = state.server.clone();
    let counters = Counters {
        slow_clients: state.metrics.slow_clients(),
        accept_errors: state.metrics.accept_errors(),
        idle_closed: state.metrics.idle_connections_closed(),
    };
    let closing = state.closing.clone();
    let app = crate::app(state);
    let builder = Arc::new(http_builder(&settings));
    let connections = Arc::new(Semaphore::new(settings.max_connections));
    let graceful = GracefulShutdown::new();
    let mut backoff = Backoff::default();
    tokio::pin!(shutdown);

    loop {
        // At the cap, further clients wait in the kernel's backlog, not in sluice's memory.
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
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
        let connection = Connection {
            builder: builder.clone(),
            settings: settings.clone(),
            counters: counters.clone(),
            app: app.clone(),
            peer,
        };
        let watcher = graceful.watcher();
        #[expect(
            clippy::disallowed_methods,
            reason = "one task per client connection, as every server has; it owns the connection and ends with it"
        )]
        tokio::spawn(async move {
            connection.run(tcp, watcher).await;
            drop(permit);
        });
    }

    drop(listener);
    tracing::info!(
        grace_s = grace.as_secs_f64(),
        "shutting down: no new connections; open streams may finish"
    );
    let finished = graceful.shutdown();
    tokio::pin!(finished);
    tokio::select! {
        () = &mut finished => return Ok(()),
        () = tokio::time::sleep(grace) => {}
    }
    tracing::warn!("grace period over: ending open streams with `server_restarting`");
    closing.cancel();
    if tokio::time::timeout(Duration::from_secs(1), finished)
        .await
        .is_err()
    {
        tracing::warn!("connections still open one second after the grace period: leaving them");
    }
    Ok(())
}

fn http_builder(settings: &ServerSettings) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
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

/// One accepted client connection and what serving it needs.
struct Connection {
    builder: Arc<auto::Builder<TokioExecutor>>,
    settings: ServerSettings,
    counters: Counters,
    app: axum::Router,
    peer: SocketAddr,
}

impl Connection {
    async fn run(self, tcp: TcpStream, watcher: hyper_util::server::graceful::Watcher) {
        // Tokens are small writes: send each at once.
        let _ = tcp.set_nodelay(true);
        let mut io = TimeoutStream::new(tcp);
        io.set_write_timeout(Some(self.settings.slow_client_timeout));
        let io = ClientIo {
            io: Box::pin(io),
            dropped: self.counters.slow_clients.clone(),
        };
        let limit = self.settings.header_timeout;
        match &self.settings.tls {
            Some(tls) => match tokio::time::timeout(limit, tls.accept(io)).await {
                Ok(Ok(io)) => self.http(io, watcher).await,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %self.peer, error = %e, "TLS handshake failed")
                }
                Err(_) => self.counters.idle_closed.increment(1),
            },
            None => self.http(io, watcher).await,
        }
    }

    /// HTTP/1.1 or HTTP/2 over `io`. hyper limits each HTTP/1.1 request head, and the
    /// idle time between requests, to the header limit; until a first request has arrived,
    /// that limit is kept here (the protocol is not known yet).
    async fn http<I>(self, io: I, watcher: hyper_util::server::graceful::Watcher)
    where
        I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let peer = ConnectInfo(Peer(self.peer));
        let started = Arc::new(AtomicBool::new(false));
        let seen = started.clone();
        let service = self.app.map_request(move |mut req: Request<Incoming>| {
            seen.store(true, Ordering::Relaxed);
            req.extensions_mut().insert(peer);
            req
        });
        let connection = self
            .builder
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(service))
            .into_owned();
        let connection = watcher.watch(connection);
        let limit = self.settings.header_timeout;
        let first_request = async {
            tokio::time::sleep(limit).await;
            if !started.load(Ordering::Relaxed) {
                return;
            }
            std::future::pending::<()>().await;
        };
        tokio::select! {
            _ = connection => {}
            () = first_request => {
                self.counters.idle_closed.increment(1);
                tracing::debug!(peer = %self.peer, "no request within the header limit: closing");
            }
        }
    }
}

/// A client connection whose writes time out (a client that stops reading is
/// disconnected, which drops its stream and cancels the upstream); counts those timeouts.
pub struct ClientIo {
    io: Pin<Box<TimeoutStream<TcpStream>>>,
    dropped: Counter,
}

impl ClientIo {
    fn note<T>(&self, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(e)) = &polled
            && e.kind() == io::ErrorKind::TimedOut
        {
            self.dropped.increment(1);
            tracing::info!("a client took nothing for the slow-client limit: dropping it");
        }
        polled
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.io.as_mut().poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = self.io.as_mut().poll_write(cx, buf);
        self.note(polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = self.io.as_mut().poll_write_vectored(cx, bufs);
        self.note(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = self.io.as_mut().poll_flush(cx);
        self.note(polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io.as_mut().poll_shutdown(cx)
    }
}
