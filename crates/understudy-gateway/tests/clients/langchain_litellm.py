"""Drives the gateway with `langchain-openai` (chat, and the Responses API
with `use_responses_api=True`, streamed too) and `litellm` as a client
(`completion` and `responses`).

Run by the Rust test `langchain_and_litellm_work` (tests/clients.rs):
    python langchain_litellm.py BASE_URL ANSWER
Prints one JSON line per check; exits non-zero on the first failure.
"""
import json
import os
import sys

# litellm reads its price map from the network at import unless told not to.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # noqa: E402
from langchain_openai import ChatOpenAI  # noqa: E402

base_url, answer = sys.argv[1], sys.argv[2]


def check(name, **fields):
    print(json.dumps({"check": name, **fields}), flush=True)


def text_of(message):
    text = message.text
    return text() if callable(text) else text


chat = ChatOpenAI(model="gpt-4o-mini", base_url=base_url, api_key="client-side-key", max_retries=0)
message = chat.invoke("Capital of France? (langchain)")
assert message.content == answer, message
check("langchain-chat", content=message.content)

responses = ChatOpenAI(
    model="gpt-4o-mini", base_url=base_url, api_key="client-side-key", max_retries=0, use_responses_api=True
)
message = responses.invoke("Capital of France? (langchain responses)")
assert text_of(message) == answer, message
check("langchain-responses", text=text_of(message))

streamed = "".join(text_of(chunk) for chunk in responses.stream("Capital of France? (langchain responses stream)"))
assert streamed == answer, streamed
check("langchain-responses-stream", text=streamed)

completion = litellm.completion(
    model="openai/gpt-4o-mini",
    api_base=base_url,
    api_key="client-side-key",
    messages=[{"role": "user", "content": "Capital of France? (litellm)"}],
)
assert completion.choices[0].message.content == answer, completion
check("litellm-completion", content=completion.choices[0].message.content)

response = litellm.responses(
    model="openai/gpt-4o-mini", api_base=base_url, api_key="client-side-key", input="Capital of France? (litellm responses)"
)
texts = [part.text for item in response.output for part in getattr(item, "content", None) or [] if hasattr(part, "text")]
assert "".join(texts) == answer, response
check("litellm-responses", text="".join(texts))
