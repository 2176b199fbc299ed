//! The one encode loop every wire format shares. A dialect's [`Encoder`] is pure: canonical
//! events in, SSE events out, no meter, no clock, no I/O (each is unit-tested on canned
//! sequences). This loop owns the rest: it reads the backend stream after the peek, meters
//! every event on the stream's [`StreamGuard`] (tokens delivered, the upstream's usage, the
//! outcome), writes a queue position as a comment, holds a non-streamed reply to its size
//! limit, and hands the encoder the end of the stream with its usage and timings. An
//! upstream that speaks the client's own API is relayed: its events go to
//! [`Encoder::relay`], which says what each one was so that it is metered all the same.
//! Keep-alives are the SSE response's ([`super::sse`]), logging to the stream log the
//! stream registry's.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use serde_json::Value;

use super::{Opened, SseWriter, StreamGuard};
use std::sync::{Arc, OnceLock};

use crate::backend::{BackendError, Delta, Usage};
use crate::error::ApiError;
use crate::telemetry::Outcome;

/// One wire format's encoder. Every method writes into `out`; none may block or fail.
pub trait Encoder: Send + 'static {
    /// What opens a translated stream, before its first canonical event.
    fn open(&mut self, _out: &mut Out) {}

    /// One canonical event of a translated stream.
    fn event(&mut self, delta: Delta, out: &mut Out);

    /// The end of a translated stream: its usage and timings.
    fn end(&mut self, end: &End, out: &mut Out);

    /// The stream failed after its first byte (translated or relayed): its last event.
    fn fail(&mut self, error: &ApiError, out: &mut Out);

    /// One event of an upstream that speaks this encoder's own API, as it came (its JSON),
    /// relayed; what it was, for the meter. Only an encoder whose API an upstream can speak
    /// gets these.
    fn relay(&mut self, _raw: &str, _out: &mut Out) -> Relayed {
        Relayed::default()
    }
}

/// Where an encoder writes: one SSE writer (one buffer, event ids in order) and the events
/// ready to leave.
pub struct Out {
    writer: SseWriter,
    ready: Vec<Bytes>,
}

impl Default for Out {
    fn default() -> Self {
        Self::new()
    }
}

impl Out {
    pub fn new() -> Self {
        let mut writer = SseWriter::new();
        writer.retry();
        Out {
            writer,
            ready: Vec::with_capacity(4),
        }
    }

    /// A writer whose next event is numbered `last + 1`, without `retry:`: for an event
    /// that ends a stream written before.
    pub fn numbered_from(last: u64) -> Self {
        let mut writer = SseWriter::new();
        writer.last_id = last;
        Out {
            writer,
            ready: Vec::with_capacity(1),
        }
    }

    /// An event named `name` (or not) whose data `data` writes.
    pub fn event(&mut self, name: Option<&str>, data: impl FnOnce(&mut BytesMut)) {
        let event = self.writer.event(name, data);
        self.ready.push(event);
    }

    /// An event whose data is `json`.
    pub fn json(&mut self, name: Option<&str>, json: &str) {
        self.event(name, |b| super::put(b, json));
    }

    /// A relayed event as it came (named `name`, its `type`), but for the upstream's id
    /// at `swap` (a JSON pointer, `/response/id`, and the id found there), written as
    /// sluice's `id`: in place, so that every other byte stays the upstream's, or (an id not
    /// written as expected) the event written again.
    pub fn relayed(&mut self, raw: &str, name: &str, swap: Option<(&str, Option<&str>)>, id: &str) {
        let name = (!name.is_empty()).then_some(name);
        let Some((at, upstream)) = swap else {
            return self.json(name, raw);
        };
        match swap_string(raw, upstream, id) {
            Some(swapped) => self.json(name, &swapped),
            None => {
                let mut event: Value = serde_json::from_str(raw).unwrap_or_default();
                let (parent, key) = at.rsplit_once('/').unwrap_or(("", at));
                if let Some(Value::Object(parent)) = event.pointer_mut(parent) {
                    parent.insert(key.to_owned(), Value::String(id.to_owned()));
                }
                self.json(name, &event.to_string());
            }
        }
    }

    /// The number the next event gets (its SSE `id:`).
    pub fn next_id(&self) -> u64 {
        self.writer.next_id()
    }

    /// A comment line, which every client ignores (for what has no place in a format).
    pub fn comment(&mut self, text: &str) {
        let comment = self.writer.comment(text);
        self.ready.push(comment);
    }

    /// A comment that says the upstream's `what` has no place in this wire format and was
    /// left out (clients ignore comments; a reader of the stream sees it).
    /// Written as a line of the next event, so that it is kept wherever the event is (a
    /// stream's log, a replay).
    pub fn left_out(&mut self, what: &str) {
        self.writer.note(&format!(
            "sluice: left out the upstream's {what}, which has no place here"
        ));
    }

    /// The events written so far, taken.
    pub fn take(&mut self) -> std::vec::Drain<'_, Bytes> {
        self.ready.drain(..)
    }
}

/// What the loop knows at the end of a translated stream.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct End {
    /// The upstream's counts (within the request's bounds), else sluice's.
    pub usage: Usage,
    /// What they cost, in USD, when the model has a price.
    pub cost: Option<f64>,
    /// From the request's arrival to its first token.
    pub first_token: Option<Duration>,
    /// From the request's arrival to now.
    pub duration: Duration,
}

/// What one relayed event of the client's own API was.
#[derive(Debug, Default, PartialEq)]
pub struct Relayed {
    /// A piece of the reply's text.
    pub text: bool,
    /// The usage it reports, whole.
    pub usage: Option<Usage>,
    /// The parts of that usage priced apart (cached prompt tokens…), when it says.
    pub details: Option<crate::prices::Details>,
    /// It ends the upstream's reply: completed, or failed with this message.
    pub ended: Option<Result<(), String>>,
}

/// `raw` with every occurrence of the JSON string `old` written as `new`: an id substituted
/// without writing the rest of a relayed event again (its bytes stay the upstream's), in
/// each place the upstream wrote it (a copy in `metadata` too). A string value is matched
/// whole, quotes and all: inside another string its quotes would be escaped. `None` when
/// `old` is not there as written.
fn swap_string(raw: &str, old: Option<&str>, new: &str) -> Option<String> {
    let old = serde_json::to_string(old?).ok()?;
    if !raw.contains(&old) {
        return None;
    }
    let new = serde_json::to_string(new).ok()?;
    Some(raw.replace(&old, &new))
}

/// One step of the loop: an event, or (after the event that says so) the failure that
/// ended the stream.
type Step = Result<Bytes, ApiError>;

/// Encodes a stream after its peek: the events `encoder` writes, metered on `guard`.
pub fn encode<E: Encoder>(
    opened: Opened,
    encoder: E,
    guard: StreamGuard,
) -> impl Stream<Item = Bytes> + Send + 'static {
    steps(opened, encoder, guard, usize::MAX, None).filter_map(|step| std::future::ready(step.ok()))
}

/// Runs a stream to its end for a reply answered whole, each event handed to `each` as it
/// is written (which folds it into the reply, so that only the reply is held); the failure
/// that ended it, if one did. A reply past `max_bytes` of text and fields fails
/// (`TooLarge`). Dropping the future drops the backend stream, as for a streamed reply.
pub async fn collect<E: Encoder>(
    opened: Opened,
    encoder: E,
    guard: StreamGuard,
    max_bytes: usize,
    mut each: impl FnMut(Bytes),
) -> Result<Option<f64>, ApiError> {
    let cost = Arc::new(OnceLock::new());
    let mut steps = std::pin::pin!(steps(opened, encoder, guard, max_bytes, Some(cost.clone())));
    while let Some(step) = steps.next().await {
        each(step?);
    }
    Ok(cost.get().copied())
}

/// The loop; `cost`, when given, is told what the finished reply cost (when it has a
/// price).
fn steps<E: Encoder>(
    mut opened: Opened,
    mut encoder: E,
    mut guard: StreamGuard,
    max_bytes: usize,
    cost: Option<Arc<OnceLock<f64>>>,
) -> impl Stream<Item = Step> + Send + 'static {
    async_stream::stream! {
        let mut out = Out::new();
        let first = opened.next().await;
        let relayed = matches!(first, Some(Ok(Delta::Event(_))));
        if !relayed {
            encoder.open(&mut out);
        }
        let mut ended = false;
        let mut size = 0usize;
        let mut item = first;
        let failure = loop {
            let delta = match item {
                None => break None,
                Some(Ok(delta)) => delta,
                Some(Err(e)) => break Some(e),
            };
            // A piece of the reply went out: the stream's budget (and its key) are checked.
            let mut metered = false;
            match delta {
                Delta::Queued(ahead) => out.comment(&format!("queued: {ahead} ahead")),
                Delta::Event(raw) => {
                    let seen = encoder.relay(raw.json(), &mut out);
                    if seen.text {
                        guard.delivered();
                        metered = true;
                    }
                    if let Some(usage) = seen.usage {
                        guard.reported = Some(usage);
                    }
                    if let Some(details) = seen.details {
                        guard.details = details;
                    }
                    if let Some(end) = seen.ended {
                        ended = true;
                        match end {
                            Ok(()) => guard.finish(Outcome::Completed),
                            Err(message) => guard.failed(&BackendError::Interrupted(message)),
                        }
                    }
                }
                delta => {
                    match &delta {
                        Delta::Text(text) => {
                            guard.delivered();
                            metered = true;
                            size = size.saturating_add(text.len());
                        }
                        Delta::ChatFields(fields) => {
                            guard.times.token(guard.exchange.arrived().elapsed());
                            size = size.saturating_add(fields.json().len());
                        }
                        Delta::Reasoning(text) => {
                            guard.times.token(guard.exchange.arrived().elapsed());
                            size = size.saturating_add(text.len());
                        }
                        Delta::ToolCall(call) => {
                            guard.times.token(guard.exchange.arrived().elapsed());
                            size = size.saturating_add(call.arguments.len());
                        }
                        Delta::Usage(usage) => guard.reported = Some(*usage),
                        Delta::UsageDetails(fields) => {
                            guard.details = crate::prices::Details::of_fields(fields);
                        }
                        Delta::Finish(reason) => guard.exchange.set_finish(reason.chat()),
                        _ => {}
                    }
                    if size > max_bytes {
                        break Some(BackendError::TooLarge(max_bytes));
                    }
                    encoder.event(delta, &mut out);
                }
            }
            for event in out.take() {
                yield Ok(event);
            }
            if metered && let Err(e) = guard.may_go_on().await {
                break Some(e);
            }
            item = opened.next().await;
        };
        let failure = failure.or_else(|| {
            (relayed && !ended).then(|| {
                BackendError::Interrupted("the upstream's event stream ended before its reply did".into())
            })
        });
        if let Some(e) = failure {
            guard.failed(&e);
            let error = ApiError::from(e);
            encoder.fail(&error, &mut out);
            for event in out.take() {
                yield Ok(event);
            }
            yield Err(error);
            return;
        }
        let spent = guard.cost();
        if let Some((cell, spent)) = cost.zip(spent) {
            let _ = cell.set(spent);
        }
        if relayed {
            return;
        }
        let end = End {
            usage: guard.usage(),
            cost: spent,
            first_token: guard.times.first,
            duration: guard.exchange.arrived().elapsed(),
        };
        guard.finish(Outcome::Completed);
        encoder.end(&end, &mut out);
        for event in out.take() {
            yield Ok(event);
        }
    }
}

/// Runs an encoder over a canned translated stream, as the loop would: for the dialects'
/// unit tests.
#[cfg(test)]
pub fn canned(encoder: &mut impl Encoder, deltas: Vec<Delta>, end: Option<&End>) -> Vec<String> {
    let mut out = Out::new();
    encoder.open(&mut out);
    for delta in deltas {
        encoder.event(delta, &mut out);
    }
    if let Some(end) = end {
        encoder.end(end, &mut out);
    }
    out.take()
        .map(|e| String::from_utf8_lossy(&e).into_owned())
        .collect()
}

/// `Option`s and `Result`s in a test that returns `Result<(), String>`: `x.must("what")?`.
#[cfg(test)]
pub trait Must<T> {
    fn must(self, what: &str) -> Result<T, String>;
}

#[cfg(test)]
impl<T> Must<T> for Option<T> {
    fn must(self, what: &str) -> Result<T, String> {
        self.ok_or_else(|| format!("no {what}"))
    }
}

#[cfg(test)]
impl<T, E: std::fmt::Debug> Must<T> for Result<T, E> {
    fn must(self, what: &str) -> Result<T, String> {
        self.map_err(|e| format!("{what}: {e:?}"))
    }
}

/// The JSON payloads of events written (`Null` for one that is not JSON): for tests.
#[cfg(test)]
pub fn payloads(events: &[String]) -> Vec<Value> {
    events
        .iter()
        .map(|e| super::payload(e.as_bytes()).unwrap_or(Value::Null))
        .collect()
}

/// The end of a canned stream: 3 prompt tokens, 2 completion tokens.
#[cfg(test)]
pub const CANNED_END: End = End {
    usage: Usage {
        prompt_tokens: 3,
        completion_tokens: 2,
        total_tokens: 5,
    },
    cost: None,
    first_token: Some(Duration::from_millis(5)),
    duration: Duration::from_millis(9),
};

#[cfg(test)]
mod tests {
    use super::swap_string;

    #[test]
    fn every_copy_of_the_upstreams_id_is_swapped_and_nothing_else() {
        let raw = r#"{"response":{"id":"resp_up","metadata":{"copy":"resp_up"},"text":"say \"resp_up\" resp_up"}}"#;
        let swapped = swap_string(raw, Some("resp_up"), "resp_sluice").expect("there");
        assert_eq!(
            swapped,
            r#"{"response":{"id":"resp_sluice","metadata":{"copy":"resp_sluice"},"text":"say \"resp_up\" resp_up"}}"#
        );
        assert!(swap_string(raw, Some("other"), "x").is_none());
    }
}
