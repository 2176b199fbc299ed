//! Budgets: what a key or a team may spend in a calendar period (UTC), in USD, in tokens,
//! or both, held under concurrency and inside a running stream.
//!
//! A balance counts what its account has spent and what its open streams hold: a request is
//! admitted when its prompt and a first slice of output fit what is left (never its
//! `max_tokens`: it may not use them), and a stream draws further slices as it goes, each
//! chunk's cost coming out of what it holds ([`Spending::spend`], arithmetic). When no slice
//! is left the stream ends at that chunk; when it ends, what it held and did not use goes
//! back. So a key is never charged past its budget by more than one chunk per stream open
//! when it ran out.
//!
//! The balance lives in this instance, or in Redis for every instance (one script per
//! slice and per settle, on the account's hash-tagged key). Either starts from the ledger:
//! what the account spent since the period began. A flushed Redis is rebuilt from it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use redis::Script;

use super::Refusal;
use super::shared::{Shared, client_key};
use crate::prices::{Details, Price};

/// Output tokens a slice holds: what a stream draws at a time. The balance is touched once
/// per slice (a Redis round trip when it is shared), not once per chunk.
pub const SLICE_TOKENS: u32 = 16;

/// USD in nano-dollars, as balances count it (integers add exactly, in Redis too).
const NANOS: f64 = 1e9;

pub use crate::config::{Budget, Period};

impl Budget {
    /// The limit as balances count it (`None`: that side is not limited).
    fn limit(&self) -> Amount {
        Amount {
            nanos: self.usd.map_or(-1, |usd| (usd * NANOS) as i64),
            tokens: self
                .tokens
                .map_or(-1, |t| i64::try_from(t).unwrap_or(i64::MAX)),
        }
    }
}

/// USD (in nano-dollars) and tokens: a balance, a slice, a charge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amount {
    pub nanos: i64,
    pub tokens: i64,
}

impl Amount {
    /// What `prompt` and `completion` tokens cost at `price` (none: USD 0).
    pub fn of(price: Option<&Price>, prompt: u32, completion: u32, details: Details) -> Self {
        Amount {
            nanos: price.map_or(0, |p| (p.cost(prompt, completion, details) * NANOS) as i64),
            tokens: i64::from(prompt) + i64::from(completion),
        }
    }

    pub fn covers(self, other: Amount) -> bool {
        self.nanos >= other.nanos && self.tokens >= other.tokens
    }

    pub fn minus(self, other: Amount) -> Amount {
        Amount {
            nanos: self.nanos - other.nanos,
            tokens: self.tokens - other.tokens,
        }
    }

    pub fn plus(self, other: Amount) -> Amount {
        Amount {
            nanos: self.nanos + other.nanos,
            tokens: self.tokens + other.tokens,
        }
    }

    /// Each side, or 0 where it is below.
    pub fn at_least_zero(self) -> Amount {
        Amount {
            nanos: self.nanos.max(0),
            tokens: self.tokens.max(0),
        }
    }

    /// The lesser of each side.
    fn min(self, other: Amount) -> Amount {
        Amount {
            nanos: self.nanos.min(other.nanos),
            tokens: self.tokens.min(other.tokens),
        }
    }
}

/// Whose budget: a key's or a team's, by name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner {
    pub team: bool,
    pub name: Arc<str>,
}

impl Owner {
    pub fn describe(&self) -> String {
        let what = if self.team { "team" } else { "key" };
        format!("{what} {:?}", &*self.name)
    }
}

/// How long until `budget`'s period resets (never, for `total`).
pub fn reset(budget: &Budget) -> Option<Duration> {
    let now = now_us();
    let (_, next) = budget.period.bounds(now);
    next.map(|n| Duration::from_micros(u64::try_from(n - now).unwrap_or(0)))
}

/// What an account has spent since a period began, by the ledger.
pub type History = Arc<
    dyn Fn(Owner, i64) -> futures::future::BoxFuture<'static, anyhow::Result<Amount>> + Send + Sync,
>;

/// Why a budget refused: whose, which side ran out, and when it is whole again.
#[derive(Debug, Clone)]
pub struct Exhausted {
    pub owner: Owner,
    pub budget: Budget,
    /// `usd` or `tokens`.
    pub side: &'static str,
    /// Until the period resets (none for `total`).
    pub reset: Option<Duration>,
}

impl Exhausted {
    pub fn message(&self) -> String {
        let limit = match self.side {
            "usd" => format!("USD {}", self.budget.usd.unwrap_or(0.0)),
            _ => format!("{} tokens", self.budget.tokens.unwrap_or(0)),
        };
        let when = match self.reset {
            Some(reset) => {
                let at = std::time::SystemTime::now() + reset;
                let at = time::OffsetDateTime::from(at)
                    .replace_nanosecond(0)
                    .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
                let at = at
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default();
                format!(
                    "; it resets at the start of the next {} (UTC), at {at}",
                    self.budget.period.name()
                )
            }
            None => "; it is a total, which does not reset".into(),
        };
        let period = match self.budget.period {
            Period::Total => String::new(),
            p => format!(" per {}", p.name()),
        };
        format!(
            "{} has spent its budget of {limit}{period}{when}",
            self.owner.describe()
        )
    }
}

/// The balance a take left: what remains after it (`None`: that side is not limited).
#[derive(Debug, Clone, Copy, Default)]
pub struct Left {
    pub usd: Option<f64>,
    pub tokens: Option<i64>,
}

impl Left {
    fn of(budget: &Budget, remaining: Amount) -> Self {
        Left {
            usd: budget.usd.map(|_| remaining.nanos.max(0) as f64 / NANOS),
            tokens: budget.tokens.map(|_| remaining.tokens.max(0)),
        }
    }

    /// The lesser of each side, of two balances (a key's and its team's).
    pub fn min(self, other: Left) -> Left {
        fn least<T: PartialOrd>(a: Option<T>, b: Option<T>) -> Option<T> {
            match (a, b) {
                (Some(a), Some(b)) => Some(if b < a { b } else { a }),
                (a, b) => a.or(b),
            }
        }
        Left {
            usd: least(self.usd, other.usd),
            tokens: least(self.tokens, other.tokens),
        }
    }
}

/// Takes `want` from a balance `used` of `limit`: all of it (`whole`) or what is left of
/// it. The amount taken, or `None` when nothing (or, `whole`, not all) fits.
fn take(used: Amount, limit: Amount, want: Amount, whole: bool) -> Option<Amount> {
    let left = Amount {
        nanos: if limit.nanos < 0 {
            want.nanos
        } else {
            limit.nanos - used.nanos
        },
        tokens: if limit.tokens < 0 {
            want.tokens
        } else {
            limit.tokens - used.tokens
        },
    };
    if whole {
        return left.covers(want).then_some(want);
    }
    let limited_out = (limit.nanos >= 0 && left.nanos <= 0 && want.nanos > 0)
        || (limit.tokens >= 0 && left.tokens <= 0 && want.tokens > 0);
    (!limited_out).then(|| want.min(left))
}

/// Takes from a balance in Redis: `{ok, taken nanos, taken tokens, left nanos, left
/// tokens}`, or `{-1}` when the balance is not there (Redis lost it: rebuild it first).
const TAKE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
local n = tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
local t = tonumber(redis.call('HGET', KEYS[1], 't') or '0')
local ln, lt = tonumber(ARGV[1]), tonumber(ARGV[2])
local wn, wt, whole = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5] == '1'
local rn, rt = wn, wt
if ln >= 0 then rn = ln - n end
if lt >= 0 then rt = lt - t end
if whole then
  if rn < wn or rt < wt then return {0, 0, 0, rn, rt} end
else
  if (ln >= 0 and rn <= 0 and wn > 0) or (lt >= 0 and rt <= 0 and wt > 0) then
    return {0, 0, 0, rn, rt}
  end
  wn = math.min(wn, rn)
  wt = math.min(wt, rt)
end
redis.call('HINCRBY', KEYS[1], 'n', wn)
redis.call('HINCRBY', KEYS[1], 't', wt)
return {1, wn, wt, rn - wn, rt - wt}
";

/// Puts a balance rebuilt from the ledger in place, unless another instance did first.
const SEED: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'n', ARGV[1], 't', ARGV[2])
  if tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
end
return {1}
";

/// Gives back what a stream held and did not use (negative: charges what it used past it).
const GIVE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'n', -tonumber(ARGV[1]))
  redis.call('HINCRBY', KEYS[1], 't', -tonumber(ARGV[2]))
end
return {1}
";

/// One account's balance in one period.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Account {
    owner: Owner,
    /// When its period began (microseconds since 1970).
    since: i64,
}

/// Every budget's balance: in this instance, or in Redis when limits are shared.
pub struct Balances {
    local: Mutex<HashMap<Account, Amount>>,
    history: OnceLock<History>,
    shared: Option<Arc<Shared>>,
    take: Script,
    seed: Script,
    give: Script,
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

impl Balances {
    pub fn new(shared: Option<Arc<Shared>>) -> Self {
        Balances {
            local: Mutex::default(),
            history: OnceLock::new(),
            shared,
            take: Script::new(TAKE),
            seed: Script::new(SEED),
            give: Script::new(GIVE),
        }
    }

    /// Balances start from what `history` says was spent (the ledger).
    pub fn with_history(&self, history: History) {
        let _ = self.history.set(history);
    }

    fn account(owner: &Owner, budget: &Budget) -> (Account, Option<i64>) {
        let (since, next) = budget.period.bounds(now_us());
        (
            Account {
                owner: owner.clone(),
                since,
            },
            next,
        )
    }

    /// What the account spent since `since`, by the ledger (nothing without one, or when it
    /// cannot be read: said in the log).
    async fn spent(&self, owner: &Owner, since: i64) -> Amount {
        let Some(history) = self.history.get() else {
            return Amount::default();
        };
        match history(owner.clone(), since).await {
            Ok(spent) => spent,
            Err(e) => {
                tracing::warn!(owner = %owner.describe(), error = %format!("{e:#}"),
                    "budgets: the ledger cannot be read; the balance starts from what this instance sees");
                Amount::default()
            }
        }
    }

    /// Takes `want` from `owner`'s `budget`: all of it (`whole`), or what is left. What was
    /// taken and what is left after it, or why not.
    pub async fn take(
        &self,
        owner: &Owner,
        budget: &Budget,
        want: Amount,
        whole: bool,
        redis_failed: impl Fn(&redis::RedisError) -> Result<(), Refusal>,
    ) -> Result<(Amount, Left), Refusal> {
        let (account, next) = Self::account(owner, budget);
        let limit = budget.limit();
        let refused = |left: Amount| {
            let side = if limit.nanos >= 0 && left.nanos < want.nanos.max(1) {
                "usd"
            } else {
                "tokens"
            };
            Exhausted {
                owner: owner.clone(),
                budget: *budget,
                side,
                reset: reset(budget),
            }
        };
        if let Some(shared) = &self.shared {
            match self
                .take_shared(shared, &account, next, limit, want, whole)
                .await
            {
                Ok((Some(taken), left)) => return Ok((taken, Left::of(budget, left))),
                Ok((None, left)) => return Err(Refusal::Budget(refused(left))),
                Err(e) => redis_failed(&e)?,
            }
        }
        if !lock(&self.local).contains_key(&account) {
            let spent = self.spent(owner, account.since).await;
            let mut local = lock(&self.local);
            // An earlier period's balance of the same account is done with.
            local.retain(|a, _| a.owner != account.owner || a.since >= account.since);
            local.entry(account.clone()).or_insert(spent);
        }
        let mut local = lock(&self.local);
        let used = local.entry(account).or_default();
        let left = limit.minus(*used);
        match take(*used, limit, want, whole) {
            Some(taken) => {
                *used = used.plus(taken);
                Ok((taken, Left::of(budget, left.minus(taken))))
            }
            None => Err(Refusal::Budget(refused(left))),
        }
    }

    async fn take_shared(
        &self,
        shared: &Shared,
        account: &Account,
        next: Option<i64>,
        limit: Amount,
        want: Amount,
        whole: bool,
    ) -> Result<(Option<Amount>, Amount), redis::RedisError> {
        let key = redis_key(account);
        for _ in 0..2 {
            let mut take = self.take.prepare_invoke();
            take.key(&key)
                .arg(limit.nanos)
                .arg(limit.tokens)
                .arg(want.nanos)
                .arg(want.tokens)
                .arg(u8::from(whole));
            let reply = shared.invoke(&take).await?;
            let at = |i: usize| reply.get(i).copied().unwrap_or(0);
            match at(0) {
                1 => {
                    let taken = Amount {
                        nanos: at(1),
                        tokens: at(2),
                    };
                    let left = Amount {
                        nanos: at(3),
                        tokens: at(4),
                    };
                    return Ok((Some(taken), left));
                }
                0 => {
                    return Ok((
                        None,
                        Amount {
                            nanos: at(3),
                            tokens: at(4),
                        },
                    ));
                }
                _ => {
                    // Not in Redis (new, expired or flushed): rebuilt from the ledger.
                    let spent = self.spent(&account.owner, account.since).await;
                    let ttl = next.map_or(0, |n| (n - account.since) / 1_000_000 + 86_400);
                    let mut seed = self.seed.prepare_invoke();
                    seed.key(&key).arg(spent.nanos).arg(spent.tokens).arg(ttl);
                    shared.invoke(&seed).await?;
                }
            }
        }
        Err(redis::RedisError::from((
            redis::ErrorKind::ResponseError,
            "a budget's balance vanished as it was rebuilt",
        )))
    }

    /// Gives `amount` back to `owner`'s balance (negative: charges it).
    pub fn give(&self, owner: &Owner, budget: &Budget, amount: Amount) {
        if amount == Amount::default() {
            return;
        }
        let (account, _) = Self::account(owner, budget);
        if let Some(shared) = self.shared.clone() {
            let Ok(handle) = tokio::runtime::Handle::try_current() else {
                return;
            };
            let give = self.give.clone();
            let key = redis_key(&account);
            handle.spawn(async move {
                let mut invocation = give.prepare_invoke();
                invocation.key(key).arg(amount.nanos).arg(amount.tokens);
                if let Err(e) = shared.invoke(&invocation).await {
                    tracing::warn!(error = %e, "budgets: Redis did not take a stream's settlement");
                }
            });
            // Kept here as well: should Redis fail, this instance's balance is current.
        }
        if let Some(used) = lock(&self.local).get_mut(&account) {
            *used = used.minus(amount);
        }
    }
}

/// An account's balance in Redis: in its owner's shard, one key per period.
fn redis_key(account: &Account) -> String {
    let who = if account.owner.team { "team" } else { "key" };
    client_key(
        &format!("{who}:{}", account.owner.name),
        &format!("budget:{}", account.since),
    )
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_are_calendar_ones_in_utc() {
        let us = |s: &str| crate::ledger::report::micros(s).expect("a time");
        let now = us("2026-12-09T15:30:00Z"); // a Wednesday
        assert_eq!(
            Period::Day.bounds(now),
            (us("2026-12-09"), Some(us("2026-12-10")))
        );
        assert_eq!(
            Period::Week.bounds(now),
            (us("2026-12-07"), Some(us("2026-12-14")))
        );
        assert_eq!(
            Period::Month.bounds(now),
            (us("2026-12-01"), Some(us("2027-01-01")))
        );
        assert_eq!(Period::Total.bounds(now), (0, None));
    }

    #[test]
    fn a_take_is_whole_or_what_is_left() {
        let limit = Amount {
            nanos: 100,
            tokens: -1,
        };
        let want = Amount {
            nanos: 30,
            tokens: 10,
        };
        let used = Amount {
            nanos: 80,
            tokens: 5_000,
        };
        assert_eq!(take(used, limit, want, true), None);
        assert_eq!(
            take(used, limit, want, false),
            Some(Amount {
                nanos: 20,
                tokens: 10
            })
        );
        let spent = Amount {
            nanos: 100,
            tokens: 0,
        };
        assert_eq!(take(spent, limit, want, false), None);
        assert_eq!(take(Amount::default(), limit, want, true), Some(want));
    }
}
