//! Token counts with OpenAI's o200k encoding: a prompt's size for the token budget, and
//! usage when a backend reports none.
//!
//! Counting must not be a weapon: tiktoken's regex overflows its stack on a run of a
//! million spaces, and its pair merge is quadratic in the length of one piece. So text is
//! counted in segments of bounded length (cut at white space where there is some, which
//! leaves ordinary text's count unchanged), a panic falls back to an estimate, and a large
//! prompt is counted on the blocking pool, one at a time, never on an async worker.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::backend::Message;

/// Text up to this size is counted where it is asked for: it takes well under a millisecond.
const INLINE_BYTES: usize = 16 * 1024;
/// A segment ends at the last white space within this many bytes...
const SEGMENT_BYTES: usize = 256;
/// ...and where there is none (one long "word"), after this many.
const HARD_CUT_BYTES: usize = 32;

/// Counts prompts; large ones one at a time, off the async workers.
#[derive(Clone)]
pub struct Counter {
    large: Arc<Semaphore>,
}

impl Default for Counter {
    fn default() -> Self {
        Counter {
            large: Arc::new(Semaphore::new(1)),
        }
    }
}

impl Counter {
    /// Runs `work` on a request of `size` bytes: where it is asked when the request is
    /// small, else on the blocking pool, one at a time (as large prompts are counted), so
    /// that a megabyte to translate or count never holds an async worker. `None`: it
    /// panicked.
    pub async fn heavy<T: Send + 'static>(
        &self,
        size: usize,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        if size <= INLINE_BYTES {
            return Some(work());
        }
        let _turn = self.large.acquire().await;
        tokio::task::spawn_blocking(work).await.ok()
    }

    /// The tokens of a chat prompt, OpenAI's way; the messages are given back.
    pub async fn prompt(&self, messages: Vec<Message>) -> (Vec<Message>, u32) {
        let size: usize = messages.iter().map(|m| m.content.len()).sum();
        if size <= INLINE_BYTES {
            let n = prompt(&messages);
            return (messages, n);
        }
        let _turn = self.large.acquire().await;
        let shared = Arc::new(messages);
        let counting = shared.clone();
        let counted = tokio::task::spawn_blocking(move || prompt(&counting)).await;
        // The blocking task has ended and dropped its reference, whatever happened.
        let n = counted.unwrap_or_else(|_| estimate(&shared));
        let messages = Arc::try_unwrap(shared).unwrap_or_else(|shared| (*shared).clone());
        (messages, n)
    }
}

/// OpenAI's accounting for chat prompts: 3 tokens a message, 3 to prime the reply.
pub fn prompt(messages: &[Message]) -> u32 {
    messages.iter().fold(3u32, |n, m| {
        n.saturating_add(3)
            .saturating_add(text(&m.role))
            .saturating_add(text(&m.content))
    })
}

/// Tokens in `text`, counted segment by segment; never panics.
pub fn text(text: &str) -> u32 {
    let bpe = tiktoken_rs::o200k_base_singleton();
    let mut n = 0u32;
    for segment in segments(text) {
        let counted = std::panic::catch_unwind(|| bpe.encode_ordinary(segment).len());
        let counted = counted.unwrap_or(segment.len().div_ceil(4));
        n = n.saturating_add(u32::try_from(counted).unwrap_or(u32::MAX));
    }
    n
}

fn estimate(messages: &[Message]) -> u32 {
    let bytes: usize = messages.iter().map(|m| m.content.len() + 8).sum();
    u32::try_from(bytes.div_ceil(4)).unwrap_or(u32::MAX)
}

/// `text` cut into pieces of at most [`SEGMENT_BYTES`], each ending just before white
/// space where possible (where tiktoken's own pieces begin), else after [`HARD_CUT_BYTES`].
fn segments(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let cut = if rest.len() <= SEGMENT_BYTES {
            rest.len()
        } else {
            let window = floor_char_boundary(rest, SEGMENT_BYTES);
            // The last white space that follows something else: a run of spaces stays
            // whole only up to the window.
            let soft = rest[..window]
                .char_indices()
                .rev()
                .find(|&(i, c)| i > 0 && c.is_whitespace())
                .map(|(i, _)| i);
            match soft {
                Some(i) if i >= HARD_CUT_BYTES => i,
                _ => floor_char_boundary(rest, HARD_CUT_BYTES).max(first_char_len(rest)),
            }
        };
        let (segment, tail) = rest.split_at(cut);
        rest = tail;
        Some(segment)
    })
}

fn floor_char_boundary(s: &str, at: usize) -> usize {
    let mut at = at.min(s.len());
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

fn first_char_len(s: &str) -> usize {
    s.chars().next().map_or(0, char::len_utf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_text_counts_as_tiktoken_does() {
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(40)
            + "Unicode: héllo wörld, 日本語のテキスト, emoji 🎉🎉 and code fn main() {}";
        let whole = tiktoken_rs::o200k_base_singleton()
            .encode_ordinary(&text)
            .len() as u32;
        let counted = super::text(&text);
        let off = counted.abs_diff(whole);
        assert!(off * 100 <= whole, "{counted} against {whole}");
    }

    #[test]
    fn hostile_text_is_counted_without_panicking() {
        assert!(text(&" ".repeat(1_000_001)) > 0);
        assert!(text(&"!".repeat(1_000_000)) > 0);
        assert!(text(&"é".repeat(100_000)) > 0);
    }

    #[test]
    fn segments_rejoin_to_the_text() {
        for sample in [
            "",
            "a",
            &"ab cd ".repeat(200),
            &"é!".repeat(500),
            &" ".repeat(999),
        ] {
            let parts: Vec<&str> = segments(sample).collect();
            assert_eq!(parts.concat(), sample);
            assert!(
                parts
                    .iter()
                    .all(|p| p.len() <= SEGMENT_BYTES && !p.is_empty())
            );
        }
    }
}
