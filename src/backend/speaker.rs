//! What the HTTP upstream ([`super::openai`]) needs of the API it calls: each dialect's
//! upstream role (`dialect/*/upstream.rs`) implements [`Speaker`], and `startup` gives each
//! upstream the one its route names (`api = …`). The transport — connections, limits,
//! errors, cancellation — is the backend's; the request's shape and the reading of the
//! reply's events are the dialect's.

use reqwest::header::{AUTHORIZATION, HeaderName, HeaderValue};

use super::{BackendError, Delta, ModelRequest, Raw};

/// The APIs an upstream may speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `{base}/chat/completions`.
    Completions,
    /// OpenAI's Responses API, `{base}/responses`.
    Responses,
    /// Anthropic's Messages API, `{base}/messages`.
    Messages,
}

/// The headers of a call.
pub type Headers = Vec<(HeaderName, HeaderValue)>;

/// One upstream API, spoken.
pub trait Speaker: Send + Sync {
    fn api(&self) -> Api;

    /// The path of a call under the upstream's base URL (`/chat/completions`).
    fn path(&self) -> &'static str;

    /// The header that carries the upstream's key: a Bearer token unless the API has its
    /// own.
    fn key(&self, key: &str) -> Option<(HeaderName, HeaderValue)> {
        let mut value = HeaderValue::from_str(&format!("Bearer {key}")).ok()?;
        value.set_sensitive(true);
        Some((AUTHORIZATION, value))
    }

    /// The call's body, always streamed; the headers it needs beyond the common ones go in
    /// `headers`.
    fn body(&self, request: ModelRequest, headers: &mut Headers) -> String;

    /// A reader of one reply's events: relayed as they came when `native` (the client
    /// speaks this API), else read into the pivot's events.
    fn reader(&self, native: bool) -> Box<dyn Reader>;

    /// The chat request fields a call in this API carries: none left out (empty) for chat
    /// completions.
    fn carried(&self) -> &'static [&'static str] {
        &[]
    }
}

/// Reads one reply's events.
pub trait Reader: Send {
    /// Reads the `data` of one event into `ready`; `Ok(true)` once the reply has ended.
    fn event(&mut self, data: &str, ready: &mut Vec<Delta>) -> Result<bool, BackendError>;
}

/// An API whose events are read as typed values: what ends a reply, and what an event is
/// in the pivot's terms.
pub trait Translate: Default + Send + 'static {
    type Event: serde::de::DeserializeOwned;

    /// After it the reply has no more.
    fn ends(event: &Self::Event) -> bool;

    /// Reads one event into the pivot's events in `ready`.
    fn translate(&mut self, event: Self::Event, ready: &mut Vec<Delta>)
    -> Result<(), BackendError>;
}

/// One reply's events of such an API: relayed as they came (`native`), or read.
pub struct Typed<T> {
    native: bool,
    reader: T,
}

impl<T: Translate> Typed<T> {
    pub fn reader(native: bool) -> Box<dyn Reader> {
        Box::new(Typed {
            native,
            reader: T::default(),
        })
    }
}

impl<T: Translate> Reader for Typed<T> {
    fn event(&mut self, data: &str, ready: &mut Vec<Delta>) -> Result<bool, BackendError> {
        let event: T::Event = serde_json::from_str(data)
            .map_err(|e| BackendError::Protocol(format!("an event sluice cannot read ({e})")))?;
        let ended = T::ends(&event);
        if self.native {
            return relay(data, ended, ready);
        }
        self.reader.translate(event, ready)?;
        Ok(ended)
    }
}

/// An event of an upstream that speaks the client's own API, to relay as it came; the
/// reply's end (`ended`) is its finish.
pub fn relay(data: &str, ended: bool, ready: &mut Vec<Delta>) -> Result<bool, BackendError> {
    let raw = serde_json::value::RawValue::from_string(data.to_owned())
        .map_err(|e| BackendError::Protocol(format!("an event that is not JSON ({e})")))?;
    ready.push(Delta::Event(Raw(raw)));
    if ended {
        ready.push(Delta::Finish(super::Finish::Stop));
    }
    Ok(ended)
}

/// An upstream's recorded events (each one's `data`) read as a translating route reads
/// them: the events of the reply, and the error it ended with, if any.
pub fn read_recorded(
    speaker: &dyn Speaker,
    events: &[String],
) -> (Vec<Delta>, Option<BackendError>) {
    let mut reader = speaker.reader(false);
    let mut ready = Vec::new();
    for data in events {
        match reader.event(data, &mut ready) {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => return (ready, Some(e)),
        }
    }
    (ready, None)
}
