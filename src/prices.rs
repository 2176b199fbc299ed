//! What tokens cost: a price table (USD per million tokens) by model name or name pattern,
//! from the TOML config's `[prices]` and, for operators who keep one, a JSON file in the
//! format of LiteLLM's `model_prices_and_context_window.json` (`SLUICE_PRICES`). Read at
//! start and on reload, never fetched. A model with no price costs nothing, and says so: its
//! cost is `None`, not zero.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, RwLock};

use anyhow::{Context, bail};
use serde::Deserialize;

/// One model's prices, USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Prompt tokens (those not read from a cache).
    pub input: f64,
    /// Reply tokens.
    pub output: f64,
    /// Cached prompt tokens (OpenAI's `cached_tokens`); the input price when unset.
    pub cache_read: Option<f64>,
    /// Prompt tokens written to a cache (Anthropic's `cache_creation_input_tokens`); the
    /// input price when unset.
    pub cache_write: Option<f64>,
    /// Reasoning tokens, when the upstream reports them apart; the output price when unset.
    pub reasoning: Option<f64>,
}

/// The parts of a reply's usage priced apart from the rest, from the upstream's details.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Details {
    /// Prompt tokens read from a cache (within `prompt_tokens`).
    pub cached: u32,
    /// Prompt tokens written to a cache (within `prompt_tokens`): Anthropic's
    /// `cache_creation_input_tokens`, relayed as `prompt_tokens_details.cache_write_tokens`.
    pub cache_write: u32,
    /// Reply tokens spent reasoning (within `completion_tokens`).
    pub reasoning: u32,
}

impl Details {
    /// The details an OpenAI-style usage carries beyond its counts (the fields as written,
    /// `"prompt_tokens_details":{…},"completion_tokens_details":{…}`).
    pub fn of_fields(fields: &str) -> Self {
        #[derive(Deserialize, Default)]
        struct Prompt {
            #[serde(default)]
            cached_tokens: Option<u32>,
            #[serde(default)]
            cache_write_tokens: Option<u32>,
        }
        #[derive(Deserialize, Default)]
        struct Completion {
            #[serde(default)]
            reasoning_tokens: Option<u32>,
        }
        #[derive(Deserialize, Default)]
        struct Fields {
            #[serde(default)]
            prompt_tokens_details: Option<Prompt>,
            #[serde(default)]
            completion_tokens_details: Option<Completion>,
        }
        let fields: Fields = serde_json::from_str(&format!("{{{fields}}}")).unwrap_or_default();
        let prompt = fields.prompt_tokens_details.unwrap_or_default();
        Details {
            cached: prompt.cached_tokens.unwrap_or(0),
            cache_write: prompt.cache_write_tokens.unwrap_or(0),
            reasoning: fields
                .completion_tokens_details
                .and_then(|c| c.reasoning_tokens)
                .unwrap_or(0),
        }
    }
}

impl Price {
    /// What `prompt` and `completion` tokens cost at this price, in USD.
    pub fn cost(&self, prompt: u32, completion: u32, details: Details) -> f64 {
        let cached = details.cached.min(prompt);
        let written = details.cache_write.min(prompt - cached);
        let reasoning = details.reasoning.min(completion);
        let per_token = |tokens: u32, price: f64| f64::from(tokens) * price;
        let micro = per_token(prompt - cached - written, self.input)
            + per_token(cached, self.cache_read.unwrap_or(self.input))
            + per_token(written, self.cache_write.unwrap_or(self.input))
            + per_token(completion - reasoning, self.output)
            + per_token(reasoning, self.reasoning.unwrap_or(self.output));
        // Whole billionths of a dollar: no float noise in what a client reads.
        (micro * 1e3).round() / 1e9
    }

    fn check(&self, name: &str) -> anyhow::Result<()> {
        let all = [
            ("input", Some(self.input)),
            ("output", Some(self.output)),
            ("cache_read", self.cache_read),
            ("cache_write", self.cache_write),
            ("reasoning", self.reasoning),
        ];
        for (field, value) in all {
            if let Some(value) = value
                && !(value.is_finite() && value >= 0.0)
            {
                bail!("prices {name:?}: {field} must be a number of dollars, 0 or more");
            }
        }
        Ok(())
    }
}

/// The price table: exact names, then patterns (`claude-*`), the longest that matches.
#[derive(Debug, Default, Clone)]
pub struct Prices {
    exact: HashMap<String, Price>,
    /// (prefix, price), longest prefix first.
    patterns: Vec<(String, Price)>,
}

impl Prices {
    /// The table of the config's `[prices]`, over those of the JSON file at `file` (the
    /// TOML's win where both name a model).
    pub fn load(toml: &BTreeMap<String, toml::Value>, file: Option<&Path>) -> anyhow::Result<Self> {
        let mut all: BTreeMap<String, Price> = match file {
            Some(path) => litellm(path)?,
            None => BTreeMap::new(),
        };
        for (name, entry) in toml {
            let price = Price::deserialize(entry.clone())
                .map_err(|e| anyhow::anyhow!("SLUICE_CONFIG: prices {name:?}: {e}"))?;
            price.check(name).context("SLUICE_CONFIG")?;
            all.insert(name.clone(), price);
        }
        let mut prices = Prices::default();
        for (name, price) in all {
            match name.strip_suffix('*') {
                Some(prefix) => prices.patterns.push((prefix.to_owned(), price)),
                None => {
                    prices.exact.insert(name, price);
                }
            }
        }
        prices
            .patterns
            .sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        Ok(prices)
    }

    /// The price of `model`, when it has one.
    pub fn of(&self, model: &str) -> Option<Price> {
        self.exact.get(model).copied().or_else(|| {
            self.patterns
                .iter()
                .find(|(prefix, _)| model.starts_with(prefix.as_str()))
                .map(|(_, price)| *price)
        })
    }
}

/// The price table in force: read at start, replaced whole by a reload.
#[derive(Clone, Default)]
pub struct PriceTable(Arc<RwLock<Arc<Prices>>>);

impl PriceTable {
    pub fn new(prices: Prices) -> Self {
        PriceTable(Arc::new(RwLock::new(Arc::new(prices))))
    }

    /// The price of `model` in the table as it stands.
    pub fn of(&self, model: &str) -> Option<Price> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).of(model)
    }

    pub fn replace(&self, prices: Prices) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(prices);
    }
}

/// The prices of a LiteLLM `model_prices_and_context_window.json` file (USD per token,
/// made per million). Entries with neither an input nor an output price (images, audio,
/// the file's `sample_spec`) are left out; a price that is not a number of dollars, 0 or
/// more, refuses the file, naming its entry.
fn litellm(path: &Path) -> anyhow::Result<BTreeMap<String, Price>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("SLUICE_PRICES: cannot read {}", path.display()))?;
    let entries: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text)
        .with_context(|| {
            format!(
                "SLUICE_PRICES: {} is not a JSON object of models (LiteLLM's format)",
                path.display()
            )
        })?;
    let mut prices = BTreeMap::new();
    for (name, entry) in entries {
        if name == "sample_spec" {
            continue;
        }
        let Some(entry) = entry.as_object() else {
            bail!("SLUICE_PRICES: entry {name:?} is not an object");
        };
        let field = |key: &str| -> anyhow::Result<Option<f64>> {
            match entry.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(value) => match value.as_f64() {
                    Some(v) if v.is_finite() && v >= 0.0 => Ok(Some(v * 1e6)),
                    _ => bail!(
                        "SLUICE_PRICES: entry {name:?}: {key} must be a number of dollars, 0 or more"
                    ),
                },
            }
        };
        let (input, output) = (
            field("input_cost_per_token")?,
            field("output_cost_per_token")?,
        );
        if input.is_none() && output.is_none() {
            continue;
        }
        prices.insert(
            name.clone(),
            Price {
                input: input.unwrap_or(0.0),
                output: output.unwrap_or(0.0),
                cache_read: field("cache_read_input_token_cost")?,
                cache_write: field("cache_creation_input_token_cost")?,
                reasoning: field("output_cost_per_reasoning_token")?,
            },
        );
    }
    Ok(prices)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(prices: &[(&str, Price)]) -> BTreeMap<String, toml::Value> {
        prices
            .iter()
            .map(|(name, p)| {
                let mut entry = toml::Table::new();
                entry.insert("input".into(), p.input.into());
                entry.insert("output".into(), p.output.into());
                ((*name).to_owned(), toml::Value::Table(entry))
            })
            .collect()
    }

    fn price(input: f64, output: f64) -> Price {
        Price {
            input,
            output,
            cache_read: None,
            cache_write: None,
            reasoning: None,
        }
    }

    #[test]
    fn a_reply_costs_its_tokens_at_their_prices() {
        let gpt = Price {
            cache_read: Some(0.5),
            reasoning: Some(10.0),
            ..price(2.0, 8.0)
        };
        // 1,000 prompt tokens, 400 of them cached; 500 reply tokens, 100 of them reasoning.
        let details = Details {
            cached: 400,
            reasoning: 100,
            ..Details::default()
        };
        let cost = gpt.cost(1000, 500, details);
        let expected = (600.0 * 2.0 + 400.0 * 0.5 + 400.0 * 8.0 + 100.0 * 10.0) / 1e6;
        assert!((cost - expected).abs() < 1e-12, "{cost} vs {expected}");
        // 300 of the prompt written to a cache, at its price.
        let claude = Price {
            cache_write: Some(3.75),
            ..price(3.0, 15.0)
        };
        let written = Details {
            cache_write: 300,
            ..Details::default()
        };
        let cost = claude.cost(1000, 0, written);
        let expected = (700.0 * 3.0 + 300.0 * 3.75) / 1e6;
        assert!((cost - expected).abs() < 1e-12, "{cost} vs {expected}");
        assert_eq!(price(3.0, 15.0).cost(0, 0, Details::default()), 0.0);
    }

    #[test]
    fn exact_names_then_the_longest_pattern() -> anyhow::Result<()> {
        let toml = table(&[
            ("claude-*", price(3.0, 15.0)),
            ("claude-haiku-*", price(1.0, 5.0)),
            ("gpt-4.1", price(2.0, 8.0)),
        ]);
        let prices = Prices::load(&toml, None)?;
        assert_eq!(prices.of("gpt-4.1"), Some(price(2.0, 8.0)));
        assert_eq!(prices.of("claude-haiku-4-5"), Some(price(1.0, 5.0)));
        assert_eq!(prices.of("claude-opus-4-8"), Some(price(3.0, 15.0)));
        assert_eq!(prices.of("gpt-4.1-mini"), None);
        Ok(())
    }

    #[test]
    fn a_negative_price_is_refused_naming_its_entry() {
        let toml = table(&[("bad", price(-1.0, 2.0))]);
        let error = format!("{:#}", Prices::load(&toml, None).expect_err("refused"));
        assert!(
            error.contains("\"bad\"") && error.contains("input"),
            "{error}"
        );
    }

    #[test]
    fn usage_details_name_cached_and_reasoning_tokens() {
        let details = Details::of_fields(
            r#""prompt_tokens_details":{"cached_tokens":7,"cache_write_tokens":2},"completion_tokens_details":{"reasoning_tokens":3}"#,
        );
        assert_eq!(
            details,
            Details {
                cached: 7,
                cache_write: 2,
                reasoning: 3
            }
        );
        assert_eq!(Details::of_fields("not json"), Details::default());
    }

    #[test]
    fn litellm_s_file_is_read_per_million_and_checked() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("sluice-prices-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let good = dir.join("good.json");
        std::fs::write(
            &good,
            r#"{"sample_spec": {"input_cost_per_token": "price"},
                "gpt-4.1": {"input_cost_per_token": 2e-6, "output_cost_per_token": 8e-6,
                            "cache_read_input_token_cost": 5e-7, "litellm_provider": "openai"},
                "dall-e-3": {"output_cost_per_image": 0.04}}"#,
        )?;
        let prices = Prices::load(&BTreeMap::new(), Some(&good))?;
        let gpt = prices.of("gpt-4.1").expect("priced");
        assert!((gpt.input - 2.0).abs() < 1e-9 && (gpt.output - 8.0).abs() < 1e-9);
        assert!(gpt.cache_read.is_some_and(|p| (p - 0.5).abs() < 1e-9));
        assert_eq!(prices.of("dall-e-3"), None);
        let bad = dir.join("bad.json");
        std::fs::write(&bad, r#"{"gpt-x": {"input_cost_per_token": "cheap"}}"#)?;
        let error = format!(
            "{:#}",
            Prices::load(&BTreeMap::new(), Some(&bad)).expect_err("refused")
        );
        assert!(error.contains("gpt-x"), "{error}");
        std::fs::write(&bad, "[1, 2]")?;
        assert!(Prices::load(&BTreeMap::new(), Some(&bad)).is_err());
        Ok(())
    }
}
