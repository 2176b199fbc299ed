//! Serving: the listener (every client connection with a limit on how long a write may
//! wait), and shutdown (stop accepting, let open streams finish for a grace period, then
//! end the rest with an error event saying the server is restarting).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use metrics::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_io_timeout::TimeoutStream;

use crate::state::AppState;

/// Serves `app(state)` on `listener` until `shutdown` completes. Then no connection is
/// accepted; open streams may finish for `grace`, after which they end with an error event
/// (`server_restarting`), and their last bytes get one more second to leave.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> io::Result<()> {
    let upkeep = tokio_util::sync::CancellationToken::new();
    let admission = state.admission.clone().maintain(upkeep.clone());
    let metrics = state.metrics.clone().maintain(upkeep.clone());
    #[expect(
        clippy::disallowed_methods,
        reason = "the one background task: admission's and metrics' upkeep, ends with serve"
    )]
    tokio::spawn(async move { tokio::join!(admission, metrics) });
    let _upkeep = upkeep.drop_guard();

    let listener = Listener {
        inner: listener,
        write_timeout: state.slow_client_timeout,
        dropped: state.metrics.slow_clients(),
    };
    let closing = state.closing.clone();
    let (stopping, stopped) = tokio::sync::oneshot::channel();
    let app = crate::app(state).into_make_service_with_connect_info::<Peer>();
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            let _ = stopping.send(());
        })
        .into_future();
    tokio::pin!(server);

    tokio::select! {
        served = &mut server => return served,
        _ = stopped => {}
    }
    tracing::info!(
        grace_s = grace.as_secs_f64(),
        "shutting down: no new connections; open streams may finish"
    );
    tokio::select! {
        served = &mut server => return served,
        () = tokio::time::sleep(grace) => {}
    }
    tracing::warn!("grace period over: ending open streams with `server_restarting`");
    closing.cancel();
    match tokio::time::timeout(Duration::from_secs(1), server).await {
        Ok(served) => served,
        Err(_) => {
            tracing::warn!(
                "connections still open one second after the grace period: leaving them"
            );
            Ok(())
        }
    }
}

/// The client's address, as handlers see it through `ConnectInfo<Peer>`.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

impl Connected<IncomingStream<'_, Listener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, Listener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

/// A TCP listener whose connections fail a write that waits longer than `write_timeout`:
/// a client that stops reading is disconnected, which drops its stream and cancels the
/// upstream, instead of holding them for as long as it likes.
pub struct Listener {
    inner: TcpListener,
    write_timeout: Duration,
    dropped: Counter,
}

impl axum::serve::Listener for Listener {
    type Io = ClientIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (ClientIo, SocketAddr) {
        let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        // Tokens are small writes: send each at once.
        let _ = stream.set_nodelay(true);
        let mut io = TimeoutStream::new(stream);
        io.set_write_timeout(Some(self.write_timeout));
        let io = ClientIo {
            io: Box::pin(io),
            dropped: self.dropped.clone(),
        };
        (io, addr)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A client connection; counts the writes that timed out.
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
