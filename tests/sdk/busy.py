"""The official SDK against a full pool: a RateLimitError at once, with Retry-After and
sluice's code, never a hang. argv: base URL, model."""

import sys

import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="sk-test", max_retries=0, timeout=10)
try:
    client.chat.completions.create(
        model=sys.argv[2],
        messages=[{"role": "user", "content": "Hi"}],
        stream=True,
    )
    print("no error")
except openai.RateLimitError as e:
    print(e.status_code, e.response.headers.get("retry-after"), e.code)
