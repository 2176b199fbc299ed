"""The official openai SDK, unchanged, streaming through sluice. Prints the reply, then the usage."""
import sys

from openai import OpenAI

client = OpenAI(base_url=sys.argv[1], api_key="unused-by-the-fake-upstream")
stream = client.chat.completions.create(
    model=sys.argv[2],
    messages=[{"role": "user", "content": "Hi"}],
    stream=True,
    stream_options={"include_usage": True},
)
text, usage = [], None
for chunk in stream:
    for choice in chunk.choices:
        text.append(choice.delta.content or "")
    if chunk.usage:
        usage = chunk.usage
print("".join(text))
print(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)

reply = client.chat.completions.create(model=sys.argv[2], messages=[{"role": "user", "content": "Hi"}])
print(reply.choices[0].message.content)
