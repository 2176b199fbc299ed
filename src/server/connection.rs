//! One client connection: TLS when configured, then HTTP/1.1 or HTTP/2 with the limits on
//! slow and idle clients. A connection with no request in progress for the header limit is
//! closed (an HTTP/2 one with a GOAWAY first), as is one asked to make room for a newcomer;
//! a response past its deadlines is dropped by the connection's timer (HTTP/1.1) or its
//! stream's (HTTP/2: see `deadline.rs`).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use metrics::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_io_timeout::TimeoutStream;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use super::Counters;
use super::deadline::{Check, Deadlines, Scoped, StreamExecutor, Tracked};
use super::table::{Busy, Entry};
use crate::http::Peer;
use crate::state::ServerSettings;
use crate::wake::Woken;

/// How long a connection asked to close may take to finish what it has in flight.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// One accepted client connection and what serving it needs.
pub(super) struct Connection {
    pub(super) builder: Arc<auto::Builder<StreamExecutor>>,
    pub(super) settings: ServerSettings,
    pub(super) counters: Counters,
    pub(super) app: axum::Router,
    pub(super) peer: SocketAddr,
    pub(super) entry: Entry,
}

/// Why a connection is closing.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Closing {
    /// Idle past the header limit, or its slot wanted: it is dropped at this instant
    /// ([`CLOSE_GRACE`] after).
    Soon(tokio::time::Instant),
    /// The server is shutting down: it may finish its streams (the shutdown bounds that).
    Shutdown,
}

impl Connection {
    pub(super) async fn run(self, tcp: TcpStream, stopping: CancellationToken) {
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
                Ok(Ok(io)) => self.http(io, stopping).await,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %self.peer, error = %e, "TLS handshake failed")
                }
                Err(_) => self.counters.idle_closed.increment(1),
            },
            None => self.http(io, stopping).await,
        }
    }

    /// HTTP/1.1 or HTTP/2 over `io`, until the client closes it, it has been idle (no request
    /// in progress) for the header limit, its slot is wanted, or the server shuts down.
    async fn http<I>(self, io: I, stopping: CancellationToken)
    where
        I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let peer = ConnectInfo(Peer(self.peer));
        let slot = self.entry.slot.clone();
        let app = self.app.clone();
        let service = tower::service_fn(move |mut req: Request<Incoming>| {
            // Busy from the request's head to its response body's end.
            let busy = Busy::new(&slot);
            req.extensions_mut().insert(peer);
            let app = app.clone();
            async move {
                let response = app.oneshot(req.map(Body::new)).await?;
                Ok::<_, std::convert::Infallible>(
                    response.map(|body| Body::new(Tracked::new(body, busy))),
                )
            }
        });
        let connection = self
            .builder
            .serve_connection(
                TokioIo::new(io),
                hyper_util::service::TowerToHyperService::new(service),
            )
            .into_owned();
        // HTTP/1.1 responses report to the connection's deadlines (HTTP/2 streams have
        // their own, in their own tasks).
        let deadlines = Deadlines::new();
        let mut connection = Scoped::new(deadlines.clone(), connection);
        let slot = &self.entry.slot;
        let (idle_limit, slow, total) = (
            self.settings.header_timeout,
            self.settings.slow_client_timeout,
            self.settings.total_timeout,
        );
        let mut closing: Option<Closing> = None;
        loop {
            let now = tokio::time::Instant::now();
            let next = match (closing, deadlines.check(slow, total)) {
                (Some(Closing::Soon(until)), _) if until <= now => return,
                (Some(Closing::Soon(until)), _) => until,
                (_, Check::Slow) => {
                    self.counters.slow_clients.increment(1);
                    tracing::info!(peer = %self.peer, "a client took nothing for the slow-client limit: dropping it");
                    return;
                }
                (_, Check::Total) => {
                    tracing::info!(peer = %self.peer, "a response ran past the total limit: dropping it");
                    return;
                }
                (_, Check::Until(check)) => match slot.idle_for() {
                    Some(idle) if idle >= idle_limit && closing.is_none() => {
                        self.counters.idle_closed.increment(1);
                        tracing::debug!(peer = %self.peer, "no request in progress for the header limit: closing");
                        connection.task().graceful_shutdown();
                        closing = Some(Closing::Soon(now + CLOSE_GRACE));
                        continue;
                    }
                    Some(idle) if closing.is_none() => check.min(now + (idle_limit - idle)),
                    _ => check.min(now + idle_limit),
                },
            };
            // The timer and the two signals are polled when they fire, not at every
            // chunk the connection writes (see `wake`).
            let sleep = Woken::new(Box::pin(tokio::time::sleep_until(next)));
            let close = Woken::new(Box::pin(slot.close.notified()));
            let stop = Woken::new(Box::pin(stopping.cancelled()));
            tokio::select! {
                _ = &mut connection => return,
                () = sleep => {}
                () = close, if closing.is_none() => {
                    tracing::debug!(peer = %self.peer, "closing the idlest connection for a newcomer");
                    connection.task().graceful_shutdown();
                    closing = Some(Closing::Soon(tokio::time::Instant::now() + CLOSE_GRACE));
                }
                () = stop, if closing.is_none() => {
                    connection.task().graceful_shutdown();
                    closing = Some(Closing::Shutdown);
                }
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
