//! Reading an upstream that speaks OpenAI's Responses API (`api = "responses"` in its
//! route): for a client of that same API, each event goes on as it came
//! ([`Delta::Event`]); for any other, the events become canonical ones — text, function
//! call deltas (as chat `tool_calls`), the finish and the usage.

use serde_json::{Value, json};

use super::{BackendError, Delta, Fields, Text, Usage};

/// What has been read of one response.
#[derive(Default)]
pub struct Reader {
    /// Function calls seen so far: the chat `index` of the next one.
    calls: u64,
}

impl Reader {
    /// Reads one event's data into `ready`; `Ok(true)` once the response has ended.
    pub fn event(
        &mut self,
        data: &str,
        native: bool,
        ready: &mut Vec<Delta>,
    ) -> Result<bool, BackendError> {
        let event: Value = serde_json::from_str(data)
            .map_err(|e| BackendError::Protocol(format!("an event that is not JSON ({e})")))?;
        let kind = event["type"].as_str().unwrap_or_default();
        let ended = matches!(
            kind,
            "response.completed" | "response.incomplete" | "response.failed" | "error"
        );
        if native {
            let raw = serde_json::value::RawValue::from_string(data.to_owned())
                .map_err(|e| BackendError::Protocol(format!("an event that is not JSON ({e})")))?;
            ready.push(Delta::Event(Fields(raw)));
            if ended {
                ready.push(Delta::Finish("stop".into()));
            }
            return Ok(ended);
        }
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
        Ok(ended)
    }
}
