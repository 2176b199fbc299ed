//! Reading an upstream that speaks OpenAI's Responses API (`api = "responses"` in its
//! route): for a client of that same API, each event goes on as it came
//! ([`Delta::Event`]); for any other, the events become canonical ones — text, function
//! call deltas (as chat `tool_calls`), the finish and the usage.

use serde_json::{Value, json};

use super::shown;

use super::{BackendError, Delta, Fields, Signature, Text, Usage};

/// What has been read of one response.
#[derive(Default)]
pub struct Reader {
    /// Function calls seen so far: the chat `index` of the next one.
    calls: u64,
}

/// The events after which a response has no more.
pub const ENDINGS: [&str; 4] = [
    "response.completed",
    "response.incomplete",
    "response.failed",
    "error",
];

impl Reader {
    /// Reads one event (of type `kind`) into canonical events in `ready`.
    pub fn translate(
        &mut self,
        kind: &str,
        event: &Value,
        ready: &mut Vec<Delta>,
    ) -> Result<(), BackendError> {
        match kind {
            "response.output_text.delta" => {
                if let Some(text) = event["delta"].as_str() {
                    ready.push(Delta::Text(Text::plain(text)));
                }
            }
            "response.output_item.added" if event["item"]["type"] == "function_call" => {
                let item = &event["item"];
                let call = json!({"tool_calls": [{"index": self.calls, "id": item["call_id"],
                    "type": "function", "function": {"name": item["name"], "arguments": ""}}]});
                self.calls += 1;
                ready.push(Fields::delta(&call)?);
            }
            "response.reasoning_text.delta" | "response.reasoning_summary_text.delta" => {
                if let Some(text) = event["delta"].as_str() {
                    ready.push(Fields::delta(&json!({"reasoning_content": text}))?);
                }
            }
            "response.output_item.done" if event["item"]["type"] == "reasoning" => {
                if let Some(encrypted) = event["item"]["encrypted_content"].as_str() {
                    ready.push(Delta::Signature(Signature::Encrypted(encrypted.to_owned())));
                }
            }
            // Built-in tools' calls (`web_search_call`…) and items to come.
            "response.output_item.done"
                if !matches!(
                    event["item"]["type"].as_str(),
                    Some("message" | "function_call")
                ) =>
            {
                let kind = event["item"]["type"].as_str();
                ready.push(Delta::Untranslated(format!("{} item", shown(kind))));
            }
            "response.output_text.annotation.added" => {
                ready.push(Delta::Annotation(Fields::raw(&event["annotation"])?));
            }
            "response.function_call_arguments.delta" => {
                let call = json!({"tool_calls": [{"index": self.calls.saturating_sub(1),
                    "function": {"arguments": event["delta"]}}]});
                ready.push(Fields::delta(&call)?);
            }
            "response.completed" | "response.incomplete" => {
                let reason = if kind == "response.incomplete" {
                    "length"
                } else if self.calls > 0 {
                    "tool_calls"
                } else {
                    "stop"
                };
                ready.push(Delta::Finish(reason.into()));
                let usage = &event["response"]["usage"];
                if let (Some(input), Some(output)) = (
                    usage["input_tokens"].as_u64(),
                    usage["output_tokens"].as_u64(),
                ) {
                    let clamp = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
                    ready.push(Delta::Usage(Usage::new(clamp(input), clamp(output))));
                }
            }
            "response.failed" | "error" => {
                let message = event["response"]["error"]["message"]
                    .as_str()
                    .or(event["message"].as_str())
                    .unwrap_or("the upstream's response failed");
                return Err(BackendError::Interrupted(message.to_owned()));
            }
            _ => {}
        }
        Ok(())
    }
}
