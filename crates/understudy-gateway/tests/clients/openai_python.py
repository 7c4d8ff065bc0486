"""Drives the gateway with the official `openai` Python client (sync and
async): chat, the Responses API streamed and not (from the lead and from a
task's understudy), a 429 with `Retry-After` and a persistent 5xx.

Run by the Rust test `the_official_python_client_works` (tests/clients.rs):
    python openai_python.py BASE_URL ANSWER
Prints one JSON line per check; exits non-zero on the first failure. The
Rust test then checks the stub's requests and the store's records.
"""
import asyncio
import json
import sys

import openai

base_url, answer = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="client-side-key", max_retries=0)
messages = [{"role": "user", "content": "Capital of France?"}]


def check(name, **fields):
    print(json.dumps({"check": name, **fields}), flush=True)


completion = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
assert completion.choices[0].message.content == answer, completion
assert completion._request_id == "req-stub-1", completion._request_id
check("sync-chat", request_id=completion._request_id)


async def async_calls():
    async_client = openai.AsyncOpenAI(base_url=base_url, api_key="client-side-key", max_retries=0)
    completion = await async_client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    assert completion.choices[0].message.content == answer, completion
    response = await async_client.responses.create(model="gpt-4o-mini", input="Capital of France? (async)")
    assert response.output_text == answer, response
    await async_client.close()


asyncio.run(async_calls())
check("async-chat-and-responses")

response = client.responses.create(model="gpt-4o-mini", instructions="Be brief.", input="Capital of France?")
assert response.output_text == answer, response
assert response.usage.input_tokens == 12 and response.usage.output_tokens == 7, response.usage
assert response._request_id == "req-stub-1", response._request_id
check("responses", output_text=response.output_text)

events = list(client.responses.create(model="gpt-4o-mini", input="Capital of France? (streamed)", stream=True))
deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
assert deltas == answer, deltas
assert events[-1].type == "response.completed", events[-1]
assert events[-1].response.output_text == answer, events[-1]
check("responses-stream", n_events=len(events))

# A task's understudy answers a text-only call, rendered as a response.
served = client.responses.create(model="task:cascaded", input="Kind of question? || answer=HUM")
assert served.output_text == "HUM", served
assert served.status == "completed", served
with client.responses.stream(model="task:cascaded", input="Kind of question? || answer=NUM") as stream:
    text = "".join(event.delta for event in stream if event.type == "response.output_text.delta")
    final = stream.get_final_response()
assert text == "NUM" and final.output_text == "NUM", (text, final)
check("responses-understudy", output_text=served.output_text)

# A 429 with Retry-After reaches the SDK, which waits and retries itself.
retried = client.with_options(max_retries=1).chat.completions.create(
    model="rate-limited-once", messages=[{"role": "user", "content": "Rate me"}]
)
assert retried.choices[0].message.content == answer, retried
check("retry-after", content=retried.choices[0].message.content)

# A persistent 5xx: the SDK's own retries are the only ones.
try:
    client.with_options(max_retries=2).chat.completions.create(
        model="down", messages=[{"role": "user", "content": "Down?"}]
    )
    raise AssertionError("a persistent 503 must fail")
except openai.InternalServerError as error:
    assert error.status_code == 503, error
check("persistent-5xx", status=503)

try:
    client.responses.create(model="gpt-4o-mini", input=3)
    raise AssertionError("a bad input must fail")
except openai.BadRequestError as error:
    assert error.param == "input", error.body
check("responses-bad-request", status=400)
