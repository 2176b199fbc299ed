//! Deadlines a response keeps whether or not its body is polled. An HTTP/2 client that
//! grants no flow-control window is never written to, so no write times out, and its
//! response body is never polled, so no deadline inside the stream is checked either. Here
//! each response says when it was handed to the client and when the client last took a
//! piece of it; a timer of its own — the HTTP/2 stream's task (see [`StreamExecutor`]) or
//! the HTTP/1.1 connection's — ends it past `SLUICE_SLOW_CLIENT_TIMEOUT_MS` with nothing
//! taken, or past `SLUICE_TOTAL_TIMEOUT_MS` in all (plus [`TOTAL_BACKSTOP`]). Ending it drops the body, and with it
//! the upstream request; HTTP/2 resets the stream.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body::Frame;
use metrics::Counter;
use tokio::time::Instant;

use super::table::Busy;

/// How long past `SLUICE_TOTAL_TIMEOUT_MS` a response may still run here. The stream's own
/// total limit ends it first, with a `timeout` event its client can read; this deadline is
/// the backstop for a body nobody polls, and must not cut that event off.
pub(super) const TOTAL_BACKSTOP: Duration = Duration::from_secs(1);

tokio::task_local! {
    /// The deadlines of the responses served in this task: an HTTP/2 stream's, or an
    /// HTTP/1.1 connection's (its responses come one after another).
    static DEADLINES: Arc<Deadlines>;
}

/// When a response began and when it last waited on its client (ms since `epoch`, plus
/// one; zero: not now).
pub(super) struct Deadlines {
    epoch: Instant,
    started: AtomicU64,
    waiting: AtomicU64,
}

/// What a check of [`Deadlines`] found.
pub(super) enum Check {
    /// Nothing is over: look again then.
    Until(Instant),
    /// The client took nothing for the slow-client limit.
    Slow,
    /// The response ran past the total limit.
    Total,
}

impl Deadlines {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Deadlines {
            epoch: Instant::now(),
            started: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
        })
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    fn at(&self, stamp: u64) -> Instant {
        self.epoch + Duration::from_millis(stamp.saturating_sub(1))
    }

    pub(super) fn check(&self, slow: Duration, total: Duration) -> Check {
        let now = Instant::now();
        let mut next = now + slow.min(total + TOTAL_BACKSTOP);
        let waiting = self.waiting.load(Ordering::Acquire);
        if waiting != 0 {
            let over = self.at(waiting) + slow;
            if over <= now {
                return Check::Slow;
            }
            next = next.min(over);
        }
        let started = self.started.load(Ordering::Acquire);
        if started != 0 {
            let over = self.at(started) + total + TOTAL_BACKSTOP;
            if over <= now {
                return Check::Total;
            }
            next = next.min(over);
        }
        Check::Until(next)
    }

    /// Watches `task` (a stream's whole life) and drops it when a deadline is over.
    pub(super) async fn guard<F: Future>(
        self: Arc<Self>,
        task: F,
        slow: Duration,
        total: Duration,
        slow_clients: Counter,
    ) {
        let task = DEADLINES.scope(self.clone(), task);
        tokio::pin!(task);
        loop {
            let next = match self.check(slow, total) {
                Check::Until(next) => next,
                Check::Slow => {
                    slow_clients.increment(1);
                    tracing::info!(
                        "an HTTP/2 client took nothing for the slow-client limit: resetting its stream"
                    );
                    return;
                }
                Check::Total => {
                    tracing::info!("a response ran past the total limit: resetting its stream");
                    return;
                }
            };
            tokio::select! {
                _ = &mut task => return,
                () = tokio::time::sleep_until(next) => {}
            }
        }
    }
}

/// `task` polled with `deadlines` as the ones its responses report to (an HTTP/1.1
/// connection, whose responses are made and sent in its own task), still reachable.
pub(super) struct Scoped<F> {
    deadlines: Arc<Deadlines>,
    task: Pin<Box<F>>,
}

impl<F: Future> Scoped<F> {
    pub(super) fn new(deadlines: Arc<Deadlines>, task: F) -> Self {
        Scoped {
            deadlines,
            task: Box::pin(task),
        }
    }

    pub(super) fn task(&mut self) -> Pin<&mut F> {
        self.task.as_mut()
    }
}

impl<F: Future> Future for Scoped<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        DEADLINES.sync_scope(this.deadlines.clone(), || this.task.as_mut().poll(cx))
    }
}

/// Spawns hyper's HTTP/2 stream tasks, each watched by its own [`Deadlines`].
#[derive(Clone)]
pub(super) struct StreamExecutor {
    pub(super) slow: Duration,
    pub(super) total: Duration,
    pub(super) slow_clients: Counter,
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, task: F) {
        let guarded =
            Deadlines::new().guard(task, self.slow, self.total, self.slow_clients.clone());
        #[expect(
            clippy::disallowed_methods,
            reason = "hyper's task per HTTP/2 stream: it owns the stream's response and ends with it, or at its deadline"
        )]
        tokio::spawn(guarded);
    }
}

/// A response body that keeps its connection busy while it lives and reports to the
/// deadlines of the task that sends it.
pub(crate) struct Tracked {
    inner: Body,
    deadlines: Option<Arc<Deadlines>>,
    _busy: Busy,
}

impl Tracked {
    /// `body`, handed to the client now.
    pub(super) fn new(inner: Body, busy: Busy) -> Self {
        let deadlines = DEADLINES.try_with(Arc::clone).ok();
        if let Some(d) = &deadlines {
            let now = d.now();
            d.started.store(now, Ordering::Release);
            d.waiting.store(now, Ordering::Release);
        }
        Tracked {
            inner,
            deadlines,
            _busy: busy,
        }
    }
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Some(d) = &self.deadlines {
            match &polled {
                // Waiting on the upstream, not on the client.
                Poll::Pending => d.waiting.store(0, Ordering::Release),
                // Handed out: until the next poll, it waits on the client.
                Poll::Ready(Some(_)) => d.waiting.store(d.now(), Ordering::Release),
                Poll::Ready(None) => {
                    d.waiting.store(0, Ordering::Release);
                    d.started.store(0, Ordering::Release);
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(d) = &self.deadlines {
            d.waiting.store(0, Ordering::Release);
            d.started.store(0, Ordering::Release);
        }
    }
}
