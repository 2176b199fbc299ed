"""The official anthropic SDK, unchanged, through sluice on its mock model.

Prints one JSON object of what each use of the SDK gave; the Rust test asserts on it.
argv: base URL, then the base URL of a sluice that allows one request per second.
"""
import json
import sys
import time

import anthropic

client = anthropic.Anthropic(base_url=sys.argv[1], api_key="unused", max_retries=0)
found = {}

# Streamed, raw events.
events = list(client.messages.create(model="mock", max_tokens=100, stream=True,
                                     messages=[{"role": "user", "content": "Tell me about rivers"}]))
found["stream"] = {
    "types": [e.type for e in events],
    "text": "".join(e.delta.text for e in events
                    if e.type == "content_block_delta" and e.delta.type == "text_delta"),
    "stop_reason": next(e.delta.stop_reason for e in events if e.type == "message_delta"),
}

# The stream helper.
with client.messages.stream(model="mock", max_tokens=100, system="Be brief.",
                            messages=[{"role": "user", "content": "Tell me about rivers"}]) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
found["helper"] = {"text": text, "final": final.content[0].text, "stop_reason": final.stop_reason,
                   "output_tokens": final.usage.output_tokens, "input_tokens": final.usage.input_tokens}

# Not streamed; cut by max_tokens.
reply = client.messages.create(model="mock", max_tokens=3,
                               messages=[{"role": "user", "content": "Tell me about rivers"}])
found["plain"] = {"text": reply.content[0].text, "stop_reason": reply.stop_reason,
                  "id": reply.id, "usage": reply.usage.output_tokens}

# A tool round trip.
tools = [{"name": "get_weather", "description": "Weather in a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}]
asked = [{"role": "user", "content": "What does get_weather say for Paris?"}]
call = client.messages.create(model="mock", max_tokens=100, tools=tools, messages=asked)
use = next(b for b in call.content if b.type == "tool_use")
answer = client.messages.create(
    model="mock", max_tokens=100, tools=tools,
    messages=asked + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name,
                                           "input": use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                      "content": "sunny"}]},
    ])
found["tools"] = {"stop_reason": call.stop_reason, "name": use.name, "input": use.input,
                  "answer": answer.content[0].text}

# Counting.
found["count"] = client.messages.count_tokens(
    model="mock", messages=[{"role": "user", "content": "Tell me about rivers"}]).input_tokens

# An error mid-stream raises the SDK's error.
try:
    with client.messages.stream(model="mock-error-after", max_tokens=100,
                                messages=[{"role": "user", "content": "Hi"}]) as stream:
        for _ in stream.text_stream:
            pass
    found["midstream"] = None
except anthropic.APIError as e:
    found["midstream"] = type(e).__name__

# Before the stream: a real status and Anthropic's error type.
try:
    client.messages.create(model="no-such-model", max_tokens=10,
                           messages=[{"role": "user", "content": "Hi"}])
    found["missing"] = None
except anthropic.NotFoundError as e:
    found["missing"] = e.body["error"]["type"]
try:
    client.messages.create(model="mock", messages=[{"role": "user", "content": "Hi"}])
    found["no_max_tokens"] = None
except TypeError:
    # The SDK itself insists on max_tokens: ask without it over plain HTTP instead.
    found["no_max_tokens"] = "sdk"

# A 429 with retry-after, honoured by the SDK's own retry.
limited = anthropic.Anthropic(base_url=sys.argv[2], api_key="unused", max_retries=2)
started = time.monotonic()
for _ in range(2):
    limited.messages.create(model="mock", max_tokens=5, messages=[{"role": "user", "content": "Hi"}])
found["retried_after_s"] = round(time.monotonic() - started, 2)

print(json.dumps(found))
