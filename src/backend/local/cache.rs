//! The prefix cache: the key-value state replies leave behind, kept within a memory budget
//! (`SLUICE_LOCAL_CACHE_MB`), least recently used out first. A prompt that starts with a
//! kept sequence's tokens (a conversation's next turn, an agent's next call with the same
//! system prompt and tools, Regenerate) takes a copy of that state and prefills only the rest.

use super::model::Kv;

struct Entry {
    tokens: Vec<u32>,
    kv: Kv,
    used: u64,
}

pub struct PrefixCache {
    entries: Vec<Entry>,
    budget: usize,
    bytes: usize,
    clock: u64,
    gauge: metrics::Gauge,
}

impl PrefixCache {
    pub fn new(budget: usize, gauge: metrics::Gauge) -> Self {
        gauge.set(0.0);
        PrefixCache {
            entries: Vec::new(),
            budget,
            bytes: 0,
            clock: 0,
            gauge,
        }
    }

    /// A copy of the longest kept state that `prompt` starts with, and its length. The last
    /// token of the prompt is always computed again: its logits start the reply.
    pub fn lookup(&mut self, prompt: &[u32]) -> Option<(Kv, usize)> {
        let usable = prompt.len().saturating_sub(1);
        let (best, len) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common(&e.tokens, prompt).min(usable)))
            .max_by_key(|&(_, len)| len)?;
        if len == 0 {
            return None;
        }
        self.clock += 1;
        let entry = &mut self.entries[best];
        entry.used = self.clock;
        Some((entry.kv.prefix(len), len))
    }

    /// Keeps the state of `tokens` (as much of its start as the budget holds: an agent's
    /// long reply must not cost the next call its system prompt); a kept sequence it
    /// extends goes, and the least recently used go until the cache is within its budget.
    pub fn keep(&mut self, mut tokens: Vec<u32>, mut kv: Kv) {
        let per_token = kv.bytes_per_token();
        if per_token == 0 {
            return;
        }
        let fits = self.budget / per_token;
        tokens.truncate(fits.min(kv.len()));
        kv.truncate(tokens.len());
        kv.shrink();
        if tokens.is_empty() {
            return;
        }
        self.entries.retain(|e| !tokens.starts_with(&e.tokens));
        self.clock += 1;
        self.entries.push(Entry {
            tokens,
            kv,
            used: self.clock,
        });
        self.bytes = self.entries.iter().map(|e| e.kv.bytes()).sum();
        while self.bytes > self.budget {
            let Some(oldest) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.used)
                .map(|(i, _)| i)
            else {
                break;
            };
            let gone = self.entries.swap_remove(oldest);
            self.bytes -= gone.kv.bytes();
        }
        self.gauge.set(self.bytes as f64);
    }
}

/// How many tokens two sequences share from their start.
fn common(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
