"""Drives the gateway with the official `openai` Python client.

Run by the Rust test `the_official_openai_python_client_works`:
    python openai_compat.py BASE_URL
Prints one JSON line per check; exits non-zero on the first failure.
"""
import json
import sys

import openai

base_url = sys.argv[1]
client = openai.OpenAI(base_url=base_url, api_key="client-side-key", max_retries=0)
messages = [
    {"role": "system", "content": "Answer with one label."},
    {"role": "user", "content": "Question 1?"},
]

models = [model.id for model in client.models.list()]
assert "task:trec" in models, models

completion = client.chat.completions.create(model="task:trec", messages=messages, temperature=0)
assert completion.choices[0].message.content == "NUM", completion
assert completion.usage.total_tokens == 22, completion.usage
print(json.dumps({"check": "non-streaming", "content": completion.choices[0].message.content}))

stream = client.chat.completions.create(
    model="task:trec", messages=messages, stream=True, stream_options={"include_usage": True}
)
text, usage = "", None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
    if chunk.usage is not None:
        usage = chunk.usage
assert text == "NUM", text
assert usage is not None and usage.prompt_tokens == 20, usage
print(json.dumps({"check": "streaming", "content": text}))

try:
    client.chat.completions.create(model="task:missing", messages=messages)
    raise AssertionError("an unknown task must fail")
except openai.NotFoundError as error:
    assert error.status_code == 404
    assert error.code == "model_not_found", error.body
print(json.dumps({"check": "not-found", "status": 404}))

try:
    client.chat.completions.create(model="task:trec", messages=[{"role": "oracle", "content": "x"}])
    raise AssertionError("a bad role must fail")
except openai.BadRequestError as error:
    assert error.param == "messages[0]", error.body
print(json.dumps({"check": "bad-request", "status": 400}))
