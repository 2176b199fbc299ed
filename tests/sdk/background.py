"""The official SDK polling a background response the moment it is created, as its docs
show: 32 times over, each retrieve answers the response (queued or in progress), never
an error. Prints the statuses seen. argv: base URL, model."""

import collections
import sys

import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="sk-test", max_retries=0, timeout=10)
seen = collections.Counter()
for _ in range(32):
    created = client.responses.create(model=sys.argv[2], input="Hi", background=True)
    polled = client.responses.retrieve(created.id)
    seen[polled.status] += 1
    client.responses.cancel(created.id)
print(" ".join(f"{status}={n}" for status, n in sorted(seen.items())))
