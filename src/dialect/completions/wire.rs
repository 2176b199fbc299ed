//! A chat completions request, typed as far as sluice writes it in another API (an
//! upstream of the Messages or the Responses API). Read leniently: a field of a shape
//! sluice does not expect is kept as it came ([`Content::Other`]) or left out, never a
//! reason to refuse a request its client role already accepted.

use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

/// A field that is null, or of a shape other than the one expected, is as if absent.
pub(crate) fn lenient<'de, D: Deserializer<'de>, T: serde::de::DeserializeOwned>(
    d: D,
) -> Result<Option<T>, D::Error> {
    Ok(Value::deserialize(d)
        .ok()
        .filter(|v| !v.is_null())
        .and_then(|v| T::deserialize(v).ok()))
}

/// The items of a list that have the shape expected; anything else is as if empty.
fn lenient_list<'de, D: Deserializer<'de>, T: serde::de::DeserializeOwned>(
    d: D,
) -> Result<Vec<T>, D::Error> {
    Ok(match Value::deserialize(d) {
        Ok(Value::Array(items)) => items
            .into_iter()
            .filter_map(|v| T::deserialize(v).ok())
            .collect(),
        _ => Vec::new(),
    })
}

/// The fields another API's request is written from.
#[derive(Deserialize, Default)]
pub struct Body {
    #[serde(default, deserialize_with = "lenient_list")]
    pub messages: Vec<Message>,
    #[serde(default, deserialize_with = "lenient_list")]
    pub tools: Vec<Tool>,
    #[serde(default, deserialize_with = "lenient")]
    pub tool_choice: Option<ToolChoice>,
    #[serde(default, deserialize_with = "lenient")]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default, deserialize_with = "lenient")]
    pub response_format: Option<Value>,
    #[serde(default, deserialize_with = "lenient")]
    pub max_tokens: Option<Value>,
    #[serde(default, deserialize_with = "lenient")]
    pub max_completion_tokens: Option<Value>,
    #[serde(default, deserialize_with = "lenient")]
    pub stop: Option<Stop>,
    #[serde(default, deserialize_with = "lenient")]
    pub temperature: Option<Value>,
    #[serde(default, deserialize_with = "lenient")]
    pub top_p: Option<Value>,
    #[serde(default, deserialize_with = "lenient")]
    pub top_k: Option<Value>,
    #[serde(default, deserialize_with = "lenient")]
    pub user: Option<Value>,
    #[serde(default, deserialize_with = "lenient")]
    pub metadata: Option<Value>,
    #[serde(default, deserialize_with = "lenient")]
    pub service_tier: Option<Value>,
    #[serde(default, deserialize_with = "lenient")]
    pub reasoning_effort: Option<Value>,
}

impl Body {
    /// The chat request in `body`, as far as it is typed here (every field lenient, so
    /// never the default but for a body that is not an object).
    pub fn of(body: &Map<String, Value>) -> Body {
        Body::deserialize(Value::Object(body.clone())).unwrap_or_default()
    }

    /// The reply's token limit, by either of its names.
    pub fn limit(&self) -> Option<&Value> {
        self.max_completion_tokens
            .as_ref()
            .or(self.max_tokens.as_ref())
    }
}

#[derive(Deserialize)]
pub struct Message {
    #[serde(default, deserialize_with = "lenient")]
    pub role: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    pub content: Option<Content>,
    #[serde(default, deserialize_with = "lenient_list")]
    pub tool_calls: Vec<Call>,
    #[serde(default, deserialize_with = "lenient")]
    pub tool_call_id: Option<Value>,
}

/// A message's content: a string, parts, or something else kept as it came.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
    Other(Value),
}

impl Content {
    /// Its text: the string, or its text parts joined.
    pub fn text(&self) -> String {
        match self {
            Content::Text(text) => text.clone(),
            Content::Parts(parts) => parts
                .iter()
                .filter_map(|p| match p {
                    Part::Text { text } => Some(text.as_str()),
                    _ => None,
                })
                .collect(),
            Content::Other(_) => String::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    Text {
        #[serde(default)]
        text: String,
    },
    ImageUrl {
        image_url: Image,
    },
    /// Audio, files, and parts to come.
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
pub struct Image {
    #[serde(default)]
    pub url: String,
    #[serde(default, deserialize_with = "lenient")]
    pub detail: Option<Value>,
}

/// A tool call of an assistant's message.
#[derive(Deserialize)]
pub struct Call {
    #[serde(default, deserialize_with = "lenient")]
    pub id: Option<Value>,
    #[serde(default)]
    pub function: Function,
}

#[derive(Deserialize, Default)]
pub struct Function {
    #[serde(default, deserialize_with = "lenient")]
    pub name: Option<Value>,
    #[serde(default, deserialize_with = "lenient")]
    pub arguments: Option<Value>,
}

/// A tool offered: a function (other kinds have no counterpart elsewhere).
#[derive(Deserialize)]
pub struct Tool {
    #[serde(default, deserialize_with = "lenient")]
    pub function: Option<Map<String, Value>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum ToolChoice {
    /// `auto`, `none`, `required`.
    Mode(String),
    /// `{"type":"function","function":{"name":…}}`.
    Named {
        function: Named,
    },
    Other(Value),
}

#[derive(Deserialize)]
pub struct Named {
    #[serde(default, deserialize_with = "lenient")]
    pub name: Option<Value>,
}

/// `stop`: one sequence or several.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<Value>),
    Other(Value),
}

/// A chat message as sluice writes it from another API's request (and keeps it, for a
/// stored conversation to continue): its role, its content (a string, parts, or null
/// beside tool calls), the tool calls of an assistant's, the call a tool message answers.
#[derive(serde::Serialize, Deserialize, Debug, Clone)]
pub struct Said {
    #[serde(default)]
    pub role: String,
    #[serde(default)]
    pub content: Value,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<SaidCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<Value>,
}

impl Said {
    pub fn new(role: &str, content: Value) -> Self {
        Said {
            role: role.to_owned(),
            content,
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }

    /// A tool's answer to call `id`.
    pub fn tool(id: Value, content: String) -> Self {
        Said {
            tool_call_id: Some(id),
            ..Said::new("tool", Value::String(content))
        }
    }

    /// Its text: the string, or its text parts joined.
    pub fn text(&self) -> String {
        match &self.content {
            Value::String(s) => s.clone(),
            Value::Array(_) => Content::deserialize(&self.content)
                .map(|c| c.text())
                .unwrap_or_default(),
            _ => String::new(),
        }
    }
}

/// A tool call as a chat assistant message holds it.
#[derive(serde::Serialize, Deserialize, Debug, Clone)]
pub struct SaidCall {
    #[serde(default)]
    pub id: Value,
    #[serde(rename = "type", default = "function_kind")]
    pub kind: String,
    #[serde(default)]
    pub function: SaidFunction,
}

#[derive(serde::Serialize, Deserialize, Debug, Clone, Default)]
pub struct SaidFunction {
    #[serde(default)]
    pub name: Value,
    #[serde(default)]
    pub arguments: Value,
}

fn function_kind() -> String {
    "function".to_owned()
}

impl SaidCall {
    pub fn new(id: Value, name: Value, arguments: Value) -> Self {
        SaidCall {
            id,
            kind: function_kind(),
            function: SaidFunction { name, arguments },
        }
    }
}
