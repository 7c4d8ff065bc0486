// Drives the gateway with the official `openai` Node SDK: chat, the
// Responses API streamed and not, a task's understudy through it, and a 400.
//
// Run by the Rust test `the_official_node_client_works` (tests/clients.rs),
// with NODE_PATH set to the folder `scripts/test.sh` installs the SDK into:
//     node openai_node.js BASE_URL ANSWER
// Prints one JSON line per check; exits non-zero on the first failure.
"use strict";

const assert = require("node:assert/strict");
const OpenAI = require("openai");

const [baseURL, answer] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "client-side-key", maxRetries: 0 });

function check(name, fields = {}) {
  console.log(JSON.stringify({ check: name, ...fields }));
}

async function main() {
  const completion = await client.chat.completions.create({
    model: "gpt-4o-mini",
    messages: [{ role: "user", content: "Capital of France? (node)" }],
  });
  assert.equal(completion.choices[0].message.content, answer);
  assert.equal(completion._request_id, "req-stub-1");
  check("chat", { request_id: completion._request_id });

  const response = await client.responses.create({ model: "gpt-4o-mini", input: "Capital of France? (node)" });
  assert.equal(response.output_text, answer);
  assert.equal(response.usage.input_tokens, 12);
  check("responses", { output_text: response.output_text });

  const stream = await client.responses.create({
    model: "gpt-4o-mini",
    input: "Capital of France? (node, streamed)",
    stream: true,
  });
  let text = "";
  let last = null;
  for await (const event of stream) {
    if (event.type === "response.output_text.delta") text += event.delta;
    last = event;
  }
  assert.equal(text, answer);
  assert.equal(last.type, "response.completed");
  check("responses-stream", { text });

  const served = await client.responses.create({ model: "task:cascaded", input: "Kind? || answer=HUM" });
  assert.equal(served.output_text, "HUM");
  check("responses-understudy", { output_text: served.output_text });

  await assert.rejects(
    client.responses.create({ model: "gpt-4o-mini", input: 3 }),
    (error) => error instanceof OpenAI.BadRequestError && error.param === "input",
  );
  check("responses-bad-request", { status: 400 });
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
