//! A future polled only when it has been woken: for the timers and shutdown signals that
//! sit beside a stream in a `select!`. `select!` polls every branch each time the task
//! wakes, and a stream's task wakes for every chunk, so each chunk would otherwise check a
//! timer, a cancellation token (a mutex) and a notification that have not moved; with
//! thousands of streams those are cold cache lines, a chunk's largest cost after its two
//! system calls.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

/// `future`, polled the first time and then only after its own waker has fired.
pub struct Woken<F> {
    future: F,
    flag: Arc<Flag>,
    /// The waker `future` is polled with: it sets the flag and wakes the task.
    waker: Waker,
    /// The task's waker last handed to the flag: a task's waker rarely changes, so a poll
    /// compares, and takes the flag's lock only when it has.
    registered: Option<Waker>,
}

struct Flag {
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        if let Some(task) = self.task.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            task.wake_by_ref();
        }
    }
}

impl<F: Future + Unpin> Woken<F> {
    pub fn new(future: F) -> Self {
        let flag = Arc::new(Flag {
            woken: AtomicBool::new(true),
            task: Mutex::new(None),
        });
        Woken {
            future,
            waker: Waker::from(flag.clone()),
            flag,
            registered: None,
        }
    }

    /// The future, to change (a timer reset): it is polled again at the next poll.
    pub fn get_mut(&mut self) -> &mut F {
        self.flag.woken.store(true, Ordering::Release);
        &mut self.future
    }
}

impl<F: Future + Unpin> Future for Woken<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        if !this
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            let task = cx.waker().clone();
            *this.flag.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task.clone());
            this.registered = Some(task);
        }
        // Registered before the flag is read: a wake-up in between is not lost. Cleared
        // before the future is polled: what woke it is seen by that poll.
        if !this.flag.woken.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        this.flag.woken.store(false, Ordering::Release);
        let mut inner = Context::from_waker(&this.waker);
        Pin::new(&mut this.future).poll(&mut inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_timer_inside_still_goes_off() {
        let sleep = Woken::new(Box::pin(tokio::time::sleep(Duration::from_millis(20))));
        let fired = tokio::time::timeout(Duration::from_secs(5), sleep).await;
        assert!(fired.is_ok(), "the timer did not go off");
    }

    #[tokio::test]
    async fn a_reset_timer_is_polled_again() {
        let mut sleep = Woken::new(Box::pin(tokio::time::sleep(Duration::from_secs(600))));
        assert!(futures::poll!(&mut sleep).is_pending());
        let deadline = tokio::time::Instant::now() + Duration::from_millis(20);
        sleep.get_mut().as_mut().reset(deadline);
        let fired = tokio::time::timeout(Duration::from_secs(5), &mut sleep).await;
        assert!(fired.is_ok(), "the reset timer did not go off");
        assert!(tokio::time::Instant::now() >= deadline);
    }

    #[tokio::test]
    async fn a_signal_inside_is_seen() {
        let token = tokio_util::sync::CancellationToken::new();
        let mut cancelled = Woken::new(Box::pin(token.clone().cancelled_owned()));
        assert!(futures::poll!(&mut cancelled).is_pending());
        assert!(futures::poll!(&mut cancelled).is_pending());
        token.cancel();
        let seen = tokio::time::timeout(Duration::from_secs(5), cancelled).await;
        assert!(seen.is_ok(), "the cancel was not seen");
    }
}
