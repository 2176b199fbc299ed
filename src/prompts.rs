//! Prompt templates from `prompts/`: loaded and checked at start-up, rendered in strict
//! mode into the system message of an `/api/chat` request.
//!
//! A template is `prompts/<name>.j2`; its first line is a comment holding its description:
//! `{# Summarises the user's text. #}`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;
use serde_json::{Map, Value};

/// The shipped templates, as `prompts/` holds them.
const BUILT_IN: [(&str, &str); 4] = [
    ("assistant", include_str!("../prompts/assistant.j2")),
    ("code_review", include_str!("../prompts/code_review.j2")),
    ("summarize", include_str!("../prompts/summarize.j2")),
    ("translate", include_str!("../prompts/translate.j2")),
];

#[derive(Debug, Clone, Serialize)]
pub struct PromptInfo {
    pub name: String,
    pub description: String,
    /// The variables the template reads, sorted.
    pub variables: Vec<String>,
}

#[derive(Clone)]
pub struct Prompts {
    env: Arc<Environment<'static>>,
    info: Arc<BTreeMap<String, PromptInfo>>,
}

/// Why a template could not be rendered: a client's mistake, told as a 400.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("unknown template `{0}`; GET /api/prompts lists them")]
    Unknown(String),
    #[error("template variable `{0}` must be a string, number or boolean")]
    BadValue(String),
    #[error("template `{name}` needs the variables {missing:?}: {detail}")]
    Missing {
        name: String,
        missing: Vec<String>,
        detail: String,
    },
}

impl Prompts {
    /// Loads every `*.j2` in `dir`. A template that does not parse stops start-up with its
    /// file name.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let entries = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read the prompts folder {}", dir.display()))?;
        let mut paths: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "j2"))
            .collect();
        paths.sort();
        let mut sources = Vec::with_capacity(paths.len());
        for path in paths {
            let name = path
                .file_stem()
                .and_then(|s| s.to_str())
                .with_context(|| format!("prompt file name {} is not UTF-8", path.display()))?
                .to_owned();
            let source = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read prompt template {}", path.display()))?;
            sources.push((name, path.display().to_string(), source));
        }
        Self::from_sources(sources)
    }

    /// The templates shipped in `prompts/`, built into the binary: `/api/chat` templates
    /// work from any working directory.
    pub fn built_in() -> anyhow::Result<Self> {
        let sources = BUILT_IN
            .iter()
            .map(|(name, source)| {
                (
                    (*name).to_owned(),
                    format!("built-in {name}.j2"),
                    (*source).to_owned(),
                )
            })
            .collect();
        Self::from_sources(sources)
    }

    /// Templates from `(name, where it came from, source)`.
    fn from_sources(sources: Vec<(String, String, String)>) -> anyhow::Result<Self> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        let mut info = BTreeMap::new();
        for (name, origin, source) in sources {
            let Some(description) = description(&source) else {
                bail!("prompt template {origin} must start with a {{# description #}} comment");
            };
            env.add_template_owned(name.clone(), source)
                .with_context(|| format!("prompt template {origin} does not parse"))?;
            let template = env.get_template(&name)?;
            let mut variables: Vec<String> =
                template.undeclared_variables(false).into_iter().collect();
            variables.sort();
            info.insert(
                name.clone(),
                PromptInfo {
                    name,
                    description,
                    variables,
                },
            );
        }
        Ok(Prompts {
            env: Arc::new(env),
            info: Arc::new(info),
        })
    }

    pub fn list(&self) -> impl Iterator<Item = &PromptInfo> {
        self.info.values()
    }

    /// Renders template `name` with `vars` (scalars only); every variable it reads must be
    /// given, unless the template gives it a default.
    pub fn render(&self, name: &str, vars: &Map<String, Value>) -> Result<String, RenderError> {
        let info = self
            .info
            .get(name)
            .ok_or_else(|| RenderError::Unknown(name.to_owned()))?;
        let template = self
            .env
            .get_template(name)
            .map_err(|_| RenderError::Unknown(name.to_owned()))?;
        let mut context = Vec::with_capacity(vars.len());
        for (key, value) in vars {
            let value = match value {
                Value::String(s) => minijinja::Value::from(s.as_str()),
                Value::Bool(b) => minijinja::Value::from(*b),
                Value::Number(n) => match n.as_i64() {
                    Some(i) => minijinja::Value::from(i),
                    None => minijinja::Value::from(n.as_f64().unwrap_or_default()),
                },
                _ => return Err(RenderError::BadValue(key.clone())),
            };
            context.push((key.as_str(), value));
        }
        template
            .render(minijinja::Value::from_pairs(context))
            .map(|text| text.trim().to_owned())
            .map_err(|e| RenderError::Missing {
                name: name.to_owned(),
                missing: info
                    .variables
                    .iter()
                    .filter(|v| !vars.contains_key(*v))
                    .cloned()
                    .collect(),
                detail: e.to_string(),
            })
    }
}

/// The text of the comment that opens a template.
fn description(source: &str) -> Option<String> {
    let rest = source.trim_start().strip_prefix("{#")?;
    let end = rest.find("#}")?;
    let text = rest[..end].trim_matches(|c: char| c == '-' || c.is_whitespace());
    (!text.is_empty()).then(|| text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_templates_load_and_render() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("prompts");
        let prompts = Prompts::load(&dir).expect("prompts/ loads");
        let names: Vec<_> = prompts.list().map(|p| p.name.as_str()).collect();
        assert!(names.len() >= 3, "{names:?}");
        let summarize = prompts.info.get("summarize").expect("a summariser");
        assert!(summarize.variables.contains(&"sentences".to_owned()));
        let mut vars = Map::new();
        vars.insert("sentences".into(), Value::from(2));
        let text = prompts.render("summarize", &vars).expect("renders");
        assert!(text.contains('2'), "{text}");
    }

    #[test]
    fn the_built_in_templates_are_the_shipped_folder() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("prompts");
        let folder = Prompts::load(&dir).expect("prompts/ loads");
        let built_in = Prompts::built_in().expect("built-in templates load");
        let names = |p: &Prompts| p.list().map(|i| i.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&folder), names(&built_in));
    }

    #[test]
    fn a_missing_variable_is_named() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("prompts");
        let prompts = Prompts::load(&dir).expect("prompts/ loads");
        let err = prompts
            .render("translate", &Map::new())
            .expect_err("a missing variable fails");
        assert!(err.to_string().contains("target_language"), "{err}");
    }
}
