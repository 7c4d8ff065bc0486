"""Drives a gateway with keys on, with the official `openai` Python client.

Run by the Rust test `the_official_openai_python_client_sees_key_errors`:
    python openai_keys.py BASE_URL GOOD_KEY SCOPED_KEY LIMITED_KEY
GOOD_KEY may call task:trec; SCOPED_KEY may call task:triage only;
LIMITED_KEY may make one request a minute. Prints one JSON line per check;
exits non-zero on the first failure.
"""
import json
import sys

import openai

base_url, good, scoped, limited = sys.argv[1:5]
messages = [
    {"role": "system", "content": "Answer with one label."},
    {"role": "user", "content": "Question 1?"},
]


def client(key):
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)


completion = client(good).chat.completions.create(model="task:trec", messages=messages)
assert completion.choices[0].message.content == "NUM", completion
print(json.dumps({"check": "good-key", "status": 200}))

try:
    client("us-not-a-key-at-all").chat.completions.create(model="task:trec", messages=messages)
    raise AssertionError("an unknown key must fail")
except openai.AuthenticationError as error:
    assert error.status_code == 401 and error.code == "invalid_api_key", error.body
print(json.dumps({"check": "unknown-key", "status": 401}))

try:
    client(scoped).chat.completions.create(model="task:trec", messages=messages)
    raise AssertionError("a task outside the key's scope must fail")
except openai.PermissionDeniedError as error:
    assert error.status_code == 403 and error.code == "permission_denied", error.body
print(json.dumps({"check": "out-of-scope", "status": 403}))

client(limited).chat.completions.create(model="task:trec", messages=messages)
try:
    client(limited).chat.completions.create(model="task:trec", messages=messages)
    raise AssertionError("a second request in the minute must fail")
except openai.RateLimitError as error:
    assert error.status_code == 429 and error.code == "rate_limit_exceeded", error.body
    assert int(error.response.headers["retry-after"]) >= 1, error.response.headers
print(json.dumps({"check": "rate-limited", "status": 429}))
