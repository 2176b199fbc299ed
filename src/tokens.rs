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

/// Lanes of large work by client: a client's large requests wait in its own lane (one at a
/// time) before the shared one, so one client sending a stream of megabytes takes its turn
/// with the others instead of the whole lane. Clients are spread over them by a hash.
const LANES: usize = 64;

/// Counts prompts; large ones one at a time, off the async workers, each client's in turn.
#[derive(Clone)]
pub struct Counter {
    large: Arc<Semaphore>,
    lanes: Arc<[Semaphore]>,
}

/// The lane of large work of the client `name` (a key's name, an address).
pub fn lane(name: &str) -> usize {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    name.hash(&mut hasher);
    (hasher.finish() % LANES as u64) as usize
}

impl Default for Counter {
    fn default() -> Self {
        Counter {
            large: Arc::new(Semaphore::new(1)),
            lanes: (0..LANES).map(|_| Semaphore::new(1)).collect(),
        }
    }
}

impl Counter {
    /// Runs `work` on a request of `size` bytes from the client in `lane` ([`lane`]): where
    /// it is asked when the request is small, else on the blocking pool, one at a time (as
    /// large prompts are counted) and one of each client's at a time, so that a megabyte to
    /// translate or count never holds an async worker and one client's megabytes do not
    /// hold the others'. `None`: it panicked.
    pub async fn heavy<T: Send + 'static>(
        &self,
        lane: usize,
        size: usize,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        if size <= INLINE_BYTES {
            return Some(work());
        }
        let _own = self.lanes[lane % LANES].acquire().await;
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_clients_large_work_waits_in_its_own_lane() {
        let counter = Counter::default();
        let big = INLINE_BYTES + 1;
        let (hog, other) = (lane("hog"), lane("someone else"));
        assert_ne!(hog, other);
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let job = |who: &'static str, gate: Option<std::sync::mpsc::Receiver<()>>| {
            let order = order.clone();
            move || {
                if let Some(gate) = gate {
                    let _ = gate.recv();
                }
                order.lock().unwrap_or_else(|e| e.into_inner()).push(who);
            }
        };
        // The hog's first job holds the shared lane until the others are all waiting.
        let mut first = Box::pin(counter.heavy(hog, big, job("hog", Some(wait))));
        assert!(futures::poll!(&mut first).is_pending());
        let mut more: Vec<_> = (0..2)
            .map(|_| Box::pin(counter.heavy(hog, big, job("hog", None))))
            .collect();
        for job in &mut more {
            assert!(futures::poll!(job).is_pending());
        }
        let mut theirs = Box::pin(counter.heavy(other, big, job("other", None)));
        assert!(futures::poll!(&mut theirs).is_pending());
        go.send(()).expect("the first job waits");
        let more = futures::future::join_all(more);
        let _ = tokio::join!(first, more, theirs);
        let order = order.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert_eq!(order, ["hog", "other", "hog", "hog"]);
    }

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
