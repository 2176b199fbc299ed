//! Server-Sent Events from an upstream's body: the `data` of each event, parsed in linear
//! time (each byte is looked at once, however the body is split), with a cap on a line and
//! on an event so a hostile upstream cannot make sluice buffer or rescan without end.

use bytes::Bytes;
use futures::{Stream, StreamExt};

/// The longest line, and the largest event, sluice takes from an upstream.
pub const MAX_LINE: usize = 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("an event stream line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("an event larger than {MAX_LINE} bytes")]
    EventTooLarge,
    #[error("an event that is not UTF-8")]
    NotUtf8,
}

/// Incremental parser: feed bytes, take events.
#[derive(Default)]
pub struct Parser {
    buf: Vec<u8>,
    /// Where the unread part of `buf` starts.
    start: usize,
    /// How far past `start` has been searched for a line end.
    scanned: usize,
    data: Vec<u8>,
    has_data: bool,
}

impl Parser {
    pub fn feed(&mut self, bytes: &[u8]) {
        // Drop what was read once it is most of the buffer: each byte moves at most once.
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.scanned = self.scanned.saturating_sub(self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete event's data, if one is complete.
    pub fn next_event(&mut self) -> Result<Option<String>, SseError> {
        loop {
            let from = self.start.max(self.scanned);
            let Some(offset) = self.buf[from..]
                .iter()
                .position(|&b| b == b'\n' || b == b'\r')
            else {
                self.scanned = self.buf.len();
                if self.buf.len() - self.start > MAX_LINE {
                    return Err(SseError::LineTooLong);
                }
                return Ok(None);
            };
            let end = from + offset;
            // A `\r` may be the first half of `\r\n`: wait to see the next byte.
            let next = if self.buf[end] == b'\r' {
                match self.buf.get(end + 1) {
                    Some(b'\n') => end + 2,
                    Some(_) => end + 1,
                    None => {
                        self.scanned = end;
                        return Ok(None);
                    }
                }
            } else {
                end + 1
            };
            let (line_start, line_end) = (self.start, end);
            self.start = next;
            self.scanned = next;
            if line_end - line_start > MAX_LINE {
                return Err(SseError::LineTooLong);
            }
            if line_start == line_end {
                if !self.has_data {
                    continue;
                }
                self.has_data = false;
                let data = std::mem::take(&mut self.data);
                return String::from_utf8(data)
                    .map(Some)
                    .map_err(|_| SseError::NotUtf8);
            }
            let line = &self.buf[line_start..line_end];
            let (field, value) = match line.iter().position(|&b| b == b':') {
                Some(colon) => {
                    let value = &line[colon + 1..];
                    (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
                }
                None => (line, &b""[..]),
            };
            // Comments (an empty field name), `event`, `id` and `retry` carry nothing
            // sluice needs from an upstream.
            if field == b"data" {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.has_data = true;
                self.data.extend_from_slice(value);
                if self.data.len() > MAX_LINE {
                    return Err(SseError::EventTooLarge);
                }
            }
        }
    }
}

/// Why an upstream's event stream ended badly.
#[derive(Debug)]
pub enum StreamError<E> {
    Transport(E),
    Parse(SseError),
}

/// The `data` of each event in `body`, as it completes.
pub fn data<E>(
    body: impl Stream<Item = Result<Bytes, E>> + Send + Unpin,
) -> impl Stream<Item = Result<String, StreamError<E>>> + Send
where
    E: Send,
{
    let mut body = body;
    async_stream::stream! {
        let mut parser = Parser::default();
        loop {
            match parser.next_event() {
                Ok(Some(data)) => {
                    yield Ok(data);
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    yield Err(StreamError::Parse(e));
                    return;
                }
            }
            match body.next().await {
                Some(Ok(bytes)) => parser.feed(&bytes),
                Some(Err(e)) => {
                    yield Err(StreamError::Transport(e));
                    return;
                }
                None => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in_pieces(input: &[u8], piece: usize) -> Vec<String> {
        let mut parser = Parser::default();
        let mut out = Vec::new();
        for chunk in input.chunks(piece) {
            parser.feed(chunk);
            while let Some(event) = parser.next_event().expect("valid") {
                out.push(event);
            }
        }
        out
    }

    #[test]
    fn events_come_out_whole_however_the_body_is_split() {
        let input = b": comment\n\ndata: {\"a\":1}\n\ndata:two\r\ndata: lines\r\n\r\nevent: x\rdata: cr\r\rid: 3\ndata: [DONE]\n\n";
        let want = ["{\"a\":1}", "two\nlines", "cr", "[DONE]"];
        for piece in [1, 2, 3, 7, input.len()] {
            assert_eq!(parse_in_pieces(input, piece), want, "pieces of {piece}");
        }
    }

    #[test]
    fn a_line_past_the_cap_is_an_error_not_a_buffer() {
        let mut parser = Parser::default();
        let mut result = Ok(None);
        for _ in 0..(MAX_LINE / 4096 + 2) {
            parser.feed(&[b'x'; 4096]);
            result = parser.next_event();
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(SseError::LineTooLong));
        assert!(parser.buf.len() <= MAX_LINE + 8192);
    }
}
