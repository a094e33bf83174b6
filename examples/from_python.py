"""batchrun from Python, against the mock server (no API key, no Redis needed).

In one shell:    batchrun mock-server --port 8089
In another:      python examples/from_python.py

Against OpenAI, leave out base_url and api_key (OPENAI_API_KEY is read from the environment).
"""

import batchrun

BASE = {"base_url": "http://127.0.0.1:8089/v1", "api_key": "sk-mock"}

# The one-liner: prompts in, texts out (None where a request failed).
texts = batchrun.complete(["Name a colour.", "Name a fruit."], model="gpt-4o-mini", max_tokens=20, **BASE)
print(texts)

# Any request bodies (or Batch API lines, or a JSONL path): one Result per request, in order.
requests = [{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"Question {i}"}]}
            for i in range(100)]
results = batchrun.run(requests, tpm=200_000, max_cost=0.50, **BASE)
for r in results[:3]:
    print(r.custom_id, r.ok, r.text, r.cost_usd, r.error)
print(sum(r.ok for r in results), "answered;", results[0].to_dict()["response"]["status_code"])

# As they end, not in order:
for r in batchrun.stream(requests[:10], progress=False, **BASE):
    print("ended:", r.custom_id)
