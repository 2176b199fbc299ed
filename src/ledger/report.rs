//! What the admin reports ask of the ledger: a time range and a key, the columns usage is
//! grouped by, and the rows that come back. Parsing is strict: a bad date or an unknown
//! group is the client's error, said by name.

use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{Date, OffsetDateTime, Time};

/// Microseconds in a day.
const DAY_US: i64 = 86_400_000_000;

/// Records from `from_us` (included) to `to_us` (excluded), in microseconds since 1970,, of one key when given.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    pub from_us: i64,
    pub to_us: i64,
    pub key: Option<String>,
}

impl Filter {
    /// `from` and `to` as a client gives them: a date (`2026-12-01`, `to` takes in the
    /// whole day) or an RFC 3339 time (`2026-12-01T09:00:00Z`); unset, no bound.
    pub fn parse(
        from: Option<&str>,
        to: Option<&str>,
        key: Option<&str>,
    ) -> Result<Filter, String> {
        let from_us = match from {
            Some(from) => instant(from, false).ok_or_else(|| bad("from", from))?,
            None => i64::MIN,
        };
        let to_us = match to {
            Some(to) => instant(to, true).ok_or_else(|| bad("to", to))?,
            None => i64::MAX,
        };
        Ok(Filter {
            from_us,
            to_us,
            key: key.map(str::to_owned),
        })
    }
}

fn bad(name: &str, value: &str) -> String {
    let value: String = value.chars().take(64).collect();
    format!(
        "`{name}` is not a date (2026-12-01) or an RFC 3339 time (2026-12-01T09:00:00Z): {value:?}"
    )
}

/// Microseconds since 1970 of a date (its start) or an RFC 3339 time.
pub fn micros(text: &str) -> Option<i64> {
    instant(text, false)
}

/// Microseconds since 1970 of a date (its start, or with `end` the next day's) or a time.
fn instant(text: &str, end: bool) -> Option<i64> {
    let at = if let Ok(date) = Date::parse(text, format_description!("[year]-[month]-[day]")) {
        let day = date.with_time(Time::MIDNIGHT).assume_utc();
        if end { day + time::Duration::DAY } else { day }
    } else {
        OffsetDateTime::parse(text, &Rfc3339).ok()?
    };
    i64::try_from(at.unix_timestamp_nanos() / 1_000).ok()
}

/// A column usage may be grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouped {
    Key,
    Team,
    Model,
    ServedModel,
    Target,
    Api,
    Outcome,
    Instance,
    Day,
}

impl Grouped {
    const ALL: [(&'static str, Grouped); 9] = [
        ("key", Grouped::Key),
        ("team", Grouped::Team),
        ("model", Grouped::Model),
        ("served_model", Grouped::ServedModel),
        ("target", Grouped::Target),
        ("api", Grouped::Api),
        ("outcome", Grouped::Outcome),
        ("instance", Grouped::Instance),
        ("day", Grouped::Day),
    ];

    /// `key,model,day`, each once.
    pub fn parse_list(text: &str) -> Result<Vec<Grouped>, String> {
        let mut groups = Vec::new();
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let group = Self::ALL
                .iter()
                .find(|(known, _)| *known == name)
                .map(|(_, g)| *g)
                .ok_or_else(|| {
                    let known: Vec<&str> = Self::ALL.iter().map(|(n, _)| *n).collect();
                    let name: String = name.chars().take(64).collect();
                    format!(
                        "`group_by` names {name:?}, which is not one of {}",
                        known.join(", ")
                    )
                })?;
            if !groups.contains(&group) {
                groups.push(group);
            }
        }
        Ok(groups)
    }

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, g)| *g == self)
            .map_or("", |(n, _)| n)
    }

    /// The SQL the group is (a column of the table, or the day of one).
    pub(super) fn column(self) -> &'static str {
        match self {
            Grouped::Key => "key_name",
            Grouped::Team => "team",
            Grouped::Model => "model",
            Grouped::ServedModel => "served_model",
            Grouped::Target => "target",
            Grouped::Api => "api",
            Grouped::Outcome => "outcome",
            Grouped::Instance => "instance",
            Grouped::Day => "(at_us / 86400000000)",
        }
    }
}

/// The date of a day number (days since 1970-01-01, UTC).
pub fn day(days: i64) -> String {
    OffsetDateTime::from_unix_timestamp(days.saturating_mul(DAY_US / 1_000_000))
        .map(|at| at.date().to_string())
        .unwrap_or_default()
}

/// An RFC 3339 time of microseconds since 1970.
pub fn rfc3339(us: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1_000)
        .ok()
        .and_then(|at| at.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// One row of a usage report: the group's values (in `group_by`'s order), then the sums.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Usage {
    #[serde(skip)]
    pub group: Vec<Option<String>>,
    pub requests: i64,
    pub input_tokens: i64,
    pub cached_tokens: i64,
    pub cache_write_tokens: i64,
    pub output_tokens: i64,
    pub reasoning_tokens: i64,
    pub cost_usd: f64,
    /// Requests whose model had no price (counted in the tokens, not in the cost).
    pub unpriced: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_times_bound_a_report() {
        let f = Filter::parse(Some("2026-12-01"), Some("2026-12-01"), None).expect("parses");
        assert_eq!(f.to_us - f.from_us, DAY_US);
        assert_eq!(day(f.from_us / DAY_US), "2026-12-01");
        let f = Filter::parse(Some("2026-12-01T09:00:00Z"), None, Some("k")).expect("parses");
        assert_eq!(rfc3339(f.from_us), "2026-12-01T09:00:00Z");
        assert_eq!(f.to_us, i64::MAX);
        assert!(Filter::parse(Some("yesterday"), None, None).is_err());
        assert!(Filter::parse(None, Some("2026-13-01"), None).is_err());
    }

    #[test]
    fn group_by_takes_known_names_once() {
        let groups = Grouped::parse_list("key, model,day,key").expect("parses");
        assert_eq!(groups, [Grouped::Key, Grouped::Model, Grouped::Day]);
        let error = Grouped::parse_list("key,prompt").expect_err("refused");
        assert!(error.contains("\"prompt\""), "{error}");
    }
}
