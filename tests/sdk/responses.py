"""The official openai SDK's Responses API, unchanged, through sluice on its mock model.

Prints one JSON object of what each use of the SDK gave; the Rust test asserts on it.
"""
import json
import sys

import openai
from openai import OpenAI

client = OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0)
found = {}

# Streamed: the raw events.
events = list(client.responses.create(model="mock", input="Tell me about rivers", stream=True))
found["stream"] = {
    "types": [e.type for e in events],
    "sequence": [e.sequence_number for e in events],
    "text": "".join(e.delta for e in events if e.type == "response.output_text.delta"),
    "final_text": events[-1].response.output_text,
    "usage": events[-1].response.usage.output_tokens,
}

# The stream helper, to its final response.
with client.responses.stream(model="mock", input="Tell me about rivers") as stream:
    deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
    final = stream.get_final_response()
found["helper"] = {"text": "".join(deltas), "final": final.output_text, "status": final.status}

# Not streamed, then read back.
reply = client.responses.create(model="mock", input="Tell me about rivers", instructions="Be brief.")
again = client.responses.retrieve(reply.id)
found["plain"] = {
    "id": reply.id,
    "status": reply.status,
    "text": reply.output_text,
    "again": again.output_text,
    "instructions": again.instructions,
}

# A tool round trip: a function call, its output, the answer.
tools = [{"type": "function", "name": "get_weather", "description": "Weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                         "required": ["city"]}}]
call = client.responses.create(model="mock", input="Weather in Paris?", tools=tools,
                               tool_choice="required")
item = call.output[0]
answer = client.responses.create(
    model="mock", previous_response_id=call.id, tools=tools,
    input=[{"type": "function_call_output", "call_id": item.call_id, "output": "sunny"}])
# The same without the stored conversation: the call and its output sent back in full.
stateless = client.responses.create(
    model="mock", tools=tools, store=False,
    input=[{"role": "user", "content": "Weather in Paris?"},
           {"type": "function_call", "call_id": item.call_id, "name": item.name,
            "arguments": item.arguments},
           {"type": "function_call_output", "call_id": item.call_id, "output": "rainy"}])
found["tools"] = {
    "type": item.type, "name": item.name, "arguments": json.loads(item.arguments),
    "answer": answer.output_text, "stateless": stateless.output_text,
}

# Background, streamed: the first connection is dropped after a few events, the rest
# comes from a second one that starts after the last sequence number seen.
first = client.responses.create(model="mock", input="Tell me about rivers", background=True,
                                stream=True)
seen = []
for event in first:
    seen.append(event)
    if len(seen) == 6:
        break
first.close()
rest = list(client.responses.retrieve(seen[0].response.id, stream=True,
                                      starting_after=seen[-1].sequence_number))
whole = seen + rest
done = client.responses.retrieve(seen[0].response.id)
found["background"] = {
    "sequence": [e.sequence_number for e in whole],
    "text": "".join(e.delta for e in whole if e.type == "response.output_text.delta"),
    "final": done.output_text,
    "status": done.status,
    "last": whole[-1].type,
}

# Background, not streamed: answered at once, read when done.
queued = client.responses.create(model="mock", input="Tell me about rivers", background=True)
found["queued"] = queued.status

# An unknown previous response is a 404 naming the parameter.
try:
    client.responses.create(model="mock", input="Hi", previous_response_id="resp_nope")
    found["unknown_previous"] = None
except openai.NotFoundError as e:
    found["unknown_previous"] = e.body.get("param") if isinstance(e.body, dict) else str(e.body)

# Models.
found["models"] = [m.id for m in client.models.list()]
found["model"] = client.models.retrieve("mock").id
try:
    client.models.retrieve("no-such-model")
    found["missing_model"] = None
except openai.NotFoundError as e:
    found["missing_model"] = e.status_code

print(json.dumps(found))
