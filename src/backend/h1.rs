//! Plain-HTTP upstreams (`http://`: vLLM, Ollama, llama.cpp server on the same host or
//! network), read in the stream's own task: a chunk goes from the upstream's socket to the
//! client's in one task, one read and one write, as a plain relay does it. (reqwest drives
//! each connection in a task of its own and hands every chunk to the reader through a
//! channel: two task wake-ups a chunk.) The response head and the chunked framing are
//! parsed by `httparse`, hyper's own parser.
//!
//! Connections are kept for the next request once a 2xx reply (an event stream only when
//! chunked) has been read to its end with nothing after it, and checked (on the socket itself) just before they are used again:
//! one the upstream closed or wrote to while it was idle is dropped (an answer nobody asked
//! for must not become the next request's). A request whose kept connection could not take
//! it (the write failed)
//! is sent once more, on a new connection; one that was written is never sent again, since
//! the upstream may have begun on it. A stream dropped before its end closes its
//! connection: that is how the upstream learns the client went away.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use futures::Stream;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The most a response's head may take, and how many headers it may have.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 100;
/// The longest chunk-size line or trailer line taken.
const MAX_LINE: usize = 4096;
/// How long an idle connection is kept, and how many are.
const IDLE_FOR: Duration = Duration::from_secs(90);
const MAX_IDLE: usize = 4096;
/// What each read makes room for.
const READ_SIZE: usize = 4096;
/// Interim (`1xx`) answers taken before the final one (HTTP allows any number; an
/// upstream sending them without end would hold the request forever).
const MAX_INTERIM: usize = 8;

/// The kept connections to one upstream, and how to open another.
pub struct Connections {
    /// `host:port`, to connect to.
    authority: String,
    /// The `Host` header.
    host: String,
    connect_timeout: Duration,
    idle: Mutex<Vec<(TcpStream, Instant)>>,
}

/// Why no answer came.
#[derive(Debug)]
pub enum Failure {
    /// No connection within the connect limit.
    ConnectTimeout,
    /// No connection at all.
    Connect(io::Error),
    /// Connected, but the request or the head of its answer failed.
    Request(String),
}

/// An answer's status and headers, and its body unread ([`Reply::into_parts`]).
pub struct Reply {
    status: u16,
    headers: HeaderMap,
    body: Reader,
}

impl Connections {
    /// The pool for `url`'s upstream, when it is a plain `http://` URL without credentials
    /// (anything else goes through reqwest: TLS, proxies, basic auth).
    pub fn for_url(url: &str, connect_timeout: Duration) -> Option<Arc<Connections>> {
        let parsed = reqwest::Url::parse(url).ok()?;
        if parsed.scheme() != "http" || !parsed.username().is_empty() || proxied() {
            return None;
        }
        let host = parsed.host_str()?;
        let port = parsed.port_or_known_default()?;
        Some(Arc::new(Connections {
            authority: format!("{host}:{port}"),
            host: match parsed.port() {
                Some(port) => format!("{host}:{port}"),
                None => host.to_owned(),
            },
            connect_timeout,
            idle: Mutex::new(Vec::new()),
        }))
    }

    /// A POST of `body` to `target` (a path and query) with `headers`, written as one
    /// HTTP/1.1 request.
    pub fn request(
        &self,
        target: &str,
        headers: &[(HeaderName, HeaderValue)],
        body: &[u8],
    ) -> Bytes {
        let mut out = BytesMut::with_capacity(256 + body.len());
        let mut put = |parts: &[&[u8]]| parts.iter().for_each(|p| out.extend_from_slice(p));
        put(&[
            b"POST ",
            target.as_bytes(),
            b" HTTP/1.1\r\nhost: ",
            self.host.as_bytes(),
        ]);
        for (name, value) in headers {
            put(&[b"\r\n", name.as_str().as_bytes(), b": ", value.as_bytes()]);
        }
        put(&[
            b"\r\ncontent-length: ",
            body.len().to_string().as_bytes(),
            b"\r\n\r\n",
            body,
        ]);
        out.freeze()
    }

    /// Sends `request` (from [`Connections::request`]) and reads the head of its answer.
    pub async fn send(self: &Arc<Self>, request: &[u8]) -> Result<Reply, Failure> {
        let mut resent = false;
        loop {
            let (mut tcp, kept) = match self.take().filter(|_| !resent) {
                Some(tcp) => (tcp, true),
                None => (self.connect().await?, false),
            };
            let mut buf = BytesMut::with_capacity(READ_SIZE);
            match exchange(&mut tcp, request, &mut buf).await {
                Ok(head) => {
                    return Ok(Reply {
                        status: head.status,
                        headers: head.headers,
                        body: Reader {
                            tcp: Some(tcp),
                            buf,
                            framing: head.framing,
                            keep: head.keep_alive,
                            pool: self.clone(),
                        },
                    });
                }
                // A kept connection the upstream closed before it took the request: once
                // more, on a new one.
                Err(Attempt::NotSent) if kept && !resent => resent = true,
                Err(Attempt::NotSent) => {
                    return Err(Failure::Request(
                        "the upstream closed the connection before the request was sent".into(),
                    ));
                }
                Err(Attempt::Closed) => {
                    return Err(Failure::Request(
                        "the upstream closed the connection without answering".into(),
                    ));
                }
                Err(Attempt::Failed(e)) => return Err(Failure::Request(e)),
            }
        }
    }

    async fn connect(&self) -> Result<TcpStream, Failure> {
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&self.authority))
            .await
            .map_err(|_| Failure::ConnectTimeout)?
            .map_err(Failure::Connect)?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    /// The most recently kept connection that is still open.
    fn take(&self) -> Option<TcpStream> {
        // Those past their time or closed are dropped (closed) once the lock is let go.
        let (found, _done) = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            // Kept in the order they came back: those past their time are a prefix.
            let now = Instant::now();
            let expired = idle.partition_point(|(_, since)| now.duration_since(*since) >= IDLE_FOR);
            let mut done: Vec<_> = idle.drain(..expired).collect();
            let mut found = None;
            while let Some((tcp, since)) = idle.pop() {
                // Nothing may wait on an idle connection: data or an end means it is done.
                if quiet(&tcp) {
                    found = Some(tcp);
                    break;
                }
                done.push((tcp, since));
            }
            (found, done)
        };
        found
    }

    fn keep(&self, tcp: TcpStream) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push((tcp, Instant::now()));
        }
    }
}

/// Whether nothing has arrived on `tcp` and it is open: asked of the socket itself,
/// without taking anything (tokio's reads go by the readiness they last saw).
fn quiet(tcp: &TcpStream) -> bool {
    let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    matches!(
        socket2::SockRef::from(tcp).peek(&mut probe),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock
    )
}

/// Whether the environment names a proxy, which reqwest honours for plain HTTP.
fn proxied() -> bool {
    ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()))
}

enum Attempt {
    /// The request could not be written: the upstream has not seen it whole.
    NotSent,
    /// The connection ended, after the request was written, before any of an answer came.
    Closed,
    Failed(String),
}

struct Head {
    status: u16,
    headers: HeaderMap,
    framing: Framing,
    keep_alive: bool,
}

/// How an answer's body ends.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Framing {
    /// `Transfer-Encoding: chunked`, at this point of its framing.
    Chunked(Chunk),
    /// This many bytes left.
    Length(u64),
    /// At the connection's end.
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Chunk {
    /// A chunk-size line is next.
    Size,
    /// This many bytes of the chunk's data are left.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer lines, up to an empty one.
    Trailers,
    Done,
}

/// Writes `request`, then reads until the head of the answer (a final one, not `1xx`).
async fn exchange(
    tcp: &mut TcpStream,
    request: &[u8],
    buf: &mut BytesMut,
) -> Result<Head, Attempt> {
    if tcp.write_all(request).await.is_err() {
        return Err(Attempt::NotSent);
    }
    // Interim answers taken, and the bytes they took: both bounded, whatever the upstream.
    let mut interim = (0, 0);
    loop {
        if let Some(head) = parse_head(buf, &mut interim)? {
            return Ok(head);
        }
        if buf.len() + interim.1 > MAX_HEAD {
            return Err(Attempt::Failed(format!(
                "an answer whose head is over {MAX_HEAD} bytes"
            )));
        }
        buf.reserve(READ_SIZE);
        match tcp.read_buf(buf).await {
            Ok(0) if buf.is_empty() => return Err(Attempt::Closed),
            Ok(0) => {
                return Err(Attempt::Failed(
                    "the upstream closed the connection mid-answer".into(),
                ));
            }
            Ok(_) => {}
            Err(_) if buf.is_empty() => return Err(Attempt::Closed),
            Err(e) => return Err(Attempt::Failed(format!("reading the answer: {e}"))),
        }
    }
}

/// The head at the start of `buf`, taken from it, once it is whole; interim (`1xx`)
/// answers are skipped, counted in `interim` (how many, and their bytes) up to
/// [`MAX_INTERIM`].
fn parse_head(buf: &mut BytesMut, interim: &mut (usize, usize)) -> Result<Option<Head>, Attempt> {
    loop {
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut slots);
        let len = match response.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(Attempt::Failed(format!("not an HTTP answer ({e})"))),
        };
        let status = response.code.unwrap_or(0);
        if (100..200).contains(&status) {
            *interim = (interim.0 + 1, interim.1 + len);
            if interim.0 > MAX_INTERIM || interim.1 > MAX_HEAD {
                return Err(Attempt::Failed(format!(
                    "more than {MAX_INTERIM} interim (1xx) answers before the final one"
                )));
            }
            buf.advance(len);
            continue;
        }
        let mut headers = HeaderMap::with_capacity(response.headers.len());
        for header in response.headers.iter() {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(header.name.as_bytes()),
                HeaderValue::from_bytes(header.value),
            ) {
                headers.append(name, value);
            }
        }
        let has = |name: &str, token: &str| {
            headers.get_all(name).iter().any(|v| {
                v.to_str()
                    .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            })
        };
        let framing = if status == 204 || status == 304 {
            Framing::Length(0)
        } else if has("transfer-encoding", "chunked") {
            Framing::Chunked(Chunk::Size)
        } else if let Some(length) = headers.get("content-length") {
            match length.to_str().ok().and_then(|l| l.trim().parse().ok()) {
                Some(length) => Framing::Length(length),
                None => return Err(Attempt::Failed("an unreadable Content-Length".into())),
            }
        } else {
            Framing::Close
        };
        // Kept only after an answer whose end is beyond doubt: a 2xx with one framing. An
        // event stream of a fixed length is not what a streaming server writes (they chunk
        // it): what follows it on the connection cannot be trusted to be the next answer.
        let lengths = headers.get_all("content-length").iter().count();
        let event_stream = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
        let plain = (200..300).contains(&status)
            && !(lengths > 0 && has("transfer-encoding", "chunked"))
            && lengths <= 1
            && !(event_stream && matches!(framing, Framing::Length(_)));
        let keep_alive = plain
            && response.version == Some(1)
            && !has("connection", "close")
            && framing != Framing::Close;
        buf.advance(len);
        return Ok(Some(Head {
            status,
            headers,
            framing,
            keep_alive,
        }));
    }
}

/// An answer's body: the connection, what has been read of it, and where the body ends.
struct Reader {
    tcp: Option<TcpStream>,
    buf: BytesMut,
    framing: Framing,
    /// The connection may serve another request once the body has ended.
    keep: bool,
    pool: Arc<Connections>,
}

/// What the buffer holds next.
enum Next {
    Data(Bytes),
    /// More must be read.
    More,
    End,
}

impl Reader {
    /// Takes the next piece of the body from the buffer.
    fn decode(&mut self) -> Result<Next, String> {
        loop {
            match &mut self.framing {
                Framing::Length(0) => return Ok(Next::End),
                Framing::Length(left) => {
                    if self.buf.is_empty() {
                        return Ok(Next::More);
                    }
                    let n = (*left).min(self.buf.len() as u64);
                    *left -= n;
                    return Ok(Next::Data(self.buf.split_to(n as usize).freeze()));
                }
                Framing::Close => {
                    if self.buf.is_empty() {
                        return Ok(Next::More);
                    }
                    return Ok(Next::Data(self.buf.split().freeze()));
                }
                Framing::Chunked(chunk) => match *chunk {
                    Chunk::Size => match httparse::parse_chunk_size(&self.buf) {
                        Ok(httparse::Status::Complete((len, 0))) => {
                            self.buf.advance(len);
                            *chunk = Chunk::Trailers;
                        }
                        Ok(httparse::Status::Complete((len, size))) => {
                            self.buf.advance(len);
                            *chunk = Chunk::Data(size);
                        }
                        Ok(httparse::Status::Partial) if self.buf.len() > MAX_LINE => {
                            return Err("a chunk size line past its limit".into());
                        }
                        Ok(httparse::Status::Partial) => return Ok(Next::More),
                        Err(_) => return Err("a broken chunked body".into()),
                    },
                    Chunk::Data(left) => {
                        if self.buf.is_empty() {
                            return Ok(Next::More);
                        }
                        let n = left.min(self.buf.len() as u64);
                        *chunk = match left - n {
                            0 => Chunk::DataEnd,
                            rest => Chunk::Data(rest),
                        };
                        return Ok(Next::Data(self.buf.split_to(n as usize).freeze()));
                    }
                    Chunk::DataEnd => {
                        if self.buf.len() < 2 {
                            return Ok(Next::More);
                        }
                        if &self.buf[..2] != b"\r\n" {
                            return Err("a broken chunked body".into());
                        }
                        self.buf.advance(2);
                        *chunk = Chunk::Size;
                    }
                    Chunk::Trailers => {
                        let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") else {
                            if self.buf.len() > MAX_LINE {
                                return Err("a trailer line past its limit".into());
                            }
                            return Ok(Next::More);
                        };
                        self.buf.advance(end + 2);
                        if end == 0 {
                            *chunk = Chunk::Done;
                        }
                    }
                    Chunk::Done => return Ok(Next::End),
                },
            }
        }
    }

    /// The connection goes back to the pool if it may serve another request.
    fn ended(&mut self) {
        if let Some(tcp) = self.tcp.take()
            && self.keep
            && self.buf.is_empty()
        {
            self.pool.keep(tcp);
        }
    }
}

impl Reply {
    /// The status, the headers, and the body piece by piece as it arrives: an error once
    /// the connection fails or the framing breaks. Dropping the body before its end closes
    /// the connection.
    pub fn into_parts(
        self,
    ) -> (
        u16,
        HeaderMap,
        impl Stream<Item = Result<Bytes, String>> + Send + 'static,
    ) {
        let mut reader = self.body;
        let body = async_stream::stream! {
            loop {
                match reader.decode() {
                    Ok(Next::Data(data)) => {
                        yield Ok(data);
                        continue;
                    }
                    Ok(Next::End) => {
                        reader.ended();
                        return;
                    }
                    Ok(Next::More) => {}
                    Err(e) => {
                        yield Err(e);
                        return;
                    }
                }
                let Some(tcp) = reader.tcp.as_mut() else { return };
                reader.buf.reserve(READ_SIZE);
                match tcp.read_buf(&mut reader.buf).await {
                    Ok(0) if reader.framing == Framing::Close => return,
                    Ok(0) => {
                        yield Err("the upstream closed the connection mid-reply".to_owned());
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        yield Err(e.to_string());
                        return;
                    }
                }
            }
        };
        (self.status, self.headers, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(framing: Framing, bytes: &[u8]) -> Reader {
        Reader {
            tcp: None,
            buf: BytesMut::from(bytes),
            framing,
            keep: false,
            pool: Arc::new(Connections {
                authority: String::new(),
                host: String::new(),
                connect_timeout: Duration::ZERO,
                idle: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Everything decoded from `bytes`, and whether the body ended.
    fn decoded(reader: &mut Reader) -> Result<(Vec<u8>, bool), String> {
        let mut out = Vec::new();
        loop {
            match reader.decode()? {
                Next::Data(data) => out.extend_from_slice(&data),
                Next::More => return Ok((out, false)),
                Next::End => return Ok((out, true)),
            }
        }
    }

    #[test]
    fn a_chunked_body_is_decoded_however_it_is_split() -> Result<(), String> {
        let body = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\n";
        for piece in 1..body.len() {
            let mut r = reader(Framing::Chunked(Chunk::Size), b"");
            let (mut out, mut ended) = (Vec::new(), false);
            for part in body.chunks(piece) {
                r.buf.extend_from_slice(part);
                let (data, end) = decoded(&mut r)?;
                out.extend(data);
                ended = end;
            }
            assert_eq!(out, b"hello, world", "pieces of {piece}");
            assert!(ended, "pieces of {piece}");
        }
        Ok(())
    }

    #[test]
    fn broken_framing_is_an_error_not_data() {
        let mut r = reader(Framing::Chunked(Chunk::Size), b"5\r\nhelloXX0\r\n\r\n");
        assert!(decoded(&mut r).is_err());
        let mut r = reader(Framing::Chunked(Chunk::Size), b"zz\r\n");
        assert!(decoded(&mut r).is_err());
        let mut r = reader(Framing::Chunked(Chunk::Size), &[b'1'; MAX_LINE + 1]);
        assert!(decoded(&mut r).is_err());
    }

    #[test]
    fn a_length_body_ends_at_its_length() -> Result<(), String> {
        let mut r = reader(Framing::Length(5), b"hello");
        assert_eq!(decoded(&mut r)?, (b"hello".to_vec(), true));
        Ok(())
    }

    #[test]
    fn heads_are_read_with_their_framing() {
        let head = |text: &[u8]| {
            parse_head(&mut BytesMut::from(text), &mut (0, 0))
                .ok()
                .flatten()
        };
        let chunked = head(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert!(chunked.is_some_and(|h| h.status == 200
            && h.framing == Framing::Chunked(Chunk::Size)
            && h.keep_alive));
        let closed = head(b"HTTP/1.1 500 Oops\r\nContent-Length: 3\r\nConnection: close\r\n\r\n");
        assert!(closed.is_some_and(|h| h.framing == Framing::Length(3) && !h.keep_alive));
        // An error's connection is not kept, nor one whose framing is in doubt.
        let failed = head(b"HTTP/1.1 500 Oops\r\nContent-Length: 3\r\n\r\n");
        assert!(failed.is_some_and(|h| !h.keep_alive));
        let both =
            head(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(both.is_some_and(|h| !h.keep_alive));
        let old = head(b"HTTP/1.0 200 OK\r\n\r\n");
        assert!(old.is_some_and(|h| h.framing == Framing::Close && !h.keep_alive));
        assert!(head(b"HTTP/1.1 200 OK\r\nContent-").is_none());
    }

    #[test]
    fn interim_answers_without_end_are_refused() {
        let mut flood = BytesMut::new();
        for _ in 0..=MAX_INTERIM {
            flood.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        flood.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert!(matches!(
            parse_head(&mut flood, &mut (0, 0)),
            Err(Attempt::Failed(_))
        ));
    }
}
