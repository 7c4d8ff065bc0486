//! The commented `understudy.toml` that `understudy init` writes.

/// Prices are list prices per 1M tokens in US dollars, as published by each
/// provider on the date in the text. Check them before trusting a ledger.
pub const TEMPLATE: &str = r#"# understudy.toml: written by `understudy init`. Every key is documented here.
#
# Apps point their OpenAI base URL at the gateway (http://127.0.0.1:8080/v1)
# and name either a model below ("gpt-4o-mini") or a task ("task:triage").

[store]
# Where every call is recorded. SQLite (a file, relative to this config) is the
# embedded default; a postgres:// URL lets several gateways share one store.
url = "sqlite://understudy.db"          # or postgres://user:pass@host/db
# Records wait in a bounded queue and are written in batches, off the response
# path. When the queue is full, requests wait: no record is ever dropped.
queue_capacity = 16384
batch_size = 512
# Records still queued when SIGTERM's deadline passes go to the spill file,
# which the next start replays; records the store refuses go to the
# dead-letter file. Defaults: next to the SQLite file (or this config).
# spill_file = "understudy.db.spill.jsonl"
# dead_letter_file = "understudy.db.dead-letter.jsonl"
# `understudy dataset build` writes each dataset version's files here.
# datasets_dir = "datasets"            # relative to this config
# Retention, applied by `serve` hourly and by `understudy calls prune`:
# bodies (request and answers) of older calls are cleared, the row with its
# tokens, cost and route stays; older calls are deleted. The savings ledger
# keeps counting both. Unset: kept forever.
# keep_bodies_days = 30
# keep_calls_days = 365

[server]
listen = "127.0.0.1:8080"
# Clients send `Authorization: Bearer <key>` (the OpenAI SDKs' api_key). Make
# keys with `understudy keys create --name team-a` (shown once; the store keeps
# only a hash), scoped with --tasks/--models, limited with --budget-usd and
# --period day|month, --rpm and --tpm, and revoked with `understudy keys revoke`.
# An unknown, revoked or expired key gets HTTP 401, a task or model outside the
# key's scope 403, a spent budget or rate limit 429 with Retry-After. Admin keys
# (--admin) may also rate any call and read /metrics and /healthz details.
# auth = "none" turns keys off; it is refused unless `listen` is a loopback
# address, because anyone who reaches the port could spend your lead's budget.
auth = "keys"
# Keys' limits and budgets are counted in each gateway's memory; gateways that
# share a store can share them through Redis instead:
# limits_redis_url = "redis://127.0.0.1:6379"
max_body_bytes = 4194304                # larger request bodies get HTTP 413
# header_read_timeout_secs = 10          # a request's headers, and an idle keep-alive
#                                        # connection's wait for its next request
# body_read_timeout_secs = 30            # a request's body; slow clients get HTTP 408
# shutdown_timeout_secs = 30             # SIGTERM's deadline; the rest is spilled to a file

# ---------------------------------------------------------------- telemetry --
# OpenTelemetry traces: one span per call (task, model, route, served_by,
# status, cost) with a child span per upstream attempt, sent over OTLP/HTTP
# (protobuf) to a collector's /v1/traces. Off unless an endpoint is set.
# [telemetry]
# otlp_endpoint = "http://127.0.0.1:4318"
# service_name = "understudy"

# ---------------------------------------------------------------- providers --
# An OpenAI-compatible upstream: OpenAI itself, or anything that speaks its API.
[providers.cloud]
type = "openai"
base_url = "https://api.openai.com/v1"
api_key_env = "OPENAI_API_KEY"          # the variable's name, never the key
timeout_secs = 60                       # past this, the client gets HTTP 504
# Retries only failures before any answer (a refused or reset connection, no
# headers within timeout_secs), then 502 (504 after a timeout). An answer
# with an error status (429, 500, 503...) is never retried here: it goes to
# the client with its status and `retry-after`, and the client's SDK retries.
max_retries = 2
retry_backoff_ms = 200                  # doubled on each retry

# Anthropic's Messages API (POST {base_url}/v1/messages). Clients still speak
# OpenAI's chat format: requests and answers (tools, streams, usage, errors)
# are translated both ways, and records keep OpenAI's shape.
[providers.anthropic]
type = "anthropic"
base_url = "https://api.anthropic.com"  # without /v1
api_key_env = "ANTHROPIC_API_KEY"       # sent as x-api-key
anthropic_version = "2023-06-01"        # the anthropic-version header
timeout_secs = 60
# As for cloud: only failures before any answer are retried; an error status
# (429, 529 overloaded...) goes to the client with its `retry-after`.
max_retries = 2
retry_backoff_ms = 200
# Anthropic requires max_tokens: a request without max_tokens or
# max_completion_tokens is sent with max_tokens = 4096.

# A replay provider answers from recorded calls (the `understudy import` JSONL
# format), matching requests by their messages after whitespace normalization.
# [providers.recorded]
# type = "replay"
# file = "calls.jsonl"

# ------------------------------------------------------------------- models --
# `name` is the model's name at the provider; prices are US dollars per 1M
# tokens. Defaults are list prices taken on 2025-06-01: check them.
[models.gpt-4o-mini]
provider = "cloud"
name = "gpt-4o-mini"
input_per_million = 0.15
output_per_million = 0.60

[models.gpt-4o]
provider = "cloud"
name = "gpt-4o"
input_per_million = 2.50
output_per_million = 10.00

[models.gpt-4_1]
provider = "cloud"
name = "gpt-4.1"
input_per_million = 2.00
output_per_million = 8.00

[models.gpt-4_1-mini]
provider = "cloud"
name = "gpt-4.1-mini"
input_per_million = 0.40
output_per_million = 1.60

[models.gpt-4_1-nano]
provider = "cloud"
name = "gpt-4.1-nano"
input_per_million = 0.10
output_per_million = 0.40

[models.o4-mini]
provider = "cloud"
name = "o4-mini"
input_per_million = 1.10
output_per_million = 4.40

# Anthropic list prices (USD per 1M tokens, taken on 2025-06-01; prompt
# caching's reads and writes are priced differently and not counted here).
[models.claude-opus-4]
provider = "anthropic"
name = "claude-opus-4-0"
input_per_million = 15.00
output_per_million = 75.00

[models.claude-sonnet-4]
provider = "anthropic"
name = "claude-sonnet-4-0"
input_per_million = 3.00
output_per_million = 15.00

[models.claude-3-7-sonnet]
provider = "anthropic"
name = "claude-3-7-sonnet-latest"
input_per_million = 3.00
output_per_million = 15.00

[models.claude-haiku-3_5]
provider = "anthropic"
name = "claude-3-5-haiku-latest"
input_per_million = 0.80
output_per_million = 4.00

[models.text-embedding-3-small]
provider = "cloud"
name = "text-embedding-3-small"
input_per_million = 0.02
output_per_million = 0.0

# -------------------------------------------------------------------- tasks --
# A task is a named job. Clients call it as model "task:NAME". `lead` is the
# model that answers today; `understudy` is the small model learning the part.
# policy: "lead" (the lead serves every call), "shadow" (the lead serves, the
# understudy answers in the background and agreement is recorded),
# "canary:PCT" (the understudy serves PCT % of calls), "cascade:THRESHOLD" (the
# understudy serves when its confidence is at least THRESHOLD), "understudy".
# `understudy promote --task NAME --policy P` changes it in a running gateway;
# an understudy that errs, times out or answers outside `labels` always falls
# back to the lead.
[tasks.triage]
lead = "gpt-4o-mini"
policy = "lead"
# understudy = "triage-minilm"          # a model below; `promote --model` can name a trained version instead
# kind = "label"                        # or "generation"; detected from the answers if unset
# labels = ["bug", "billing", "other"]  # the answers a label task allows: a local
#                                       # understudy decodes only these (unless the client
#                                       # sends its own response_format); distinct, not blank
# understudy_timeout_ms = 5000
# target_agreement = 0.98               # the promise: served answers that agree with the lead
# audit_rate = 0.05                     # share of served understudy answers re-asked of the lead
# guardrail_delta = 0.05                # chance of demoting an understudy that meets the target
#
# `understudy autopilot` runs this task's loop by itself: trains once enough
# calls are recorded, shadows, promotes a cascade certified on shadow calls,
# and retrains on new calls, drift or a demotion (`understudy history`).
# [tasks.triage.autopilot]
# min_calls = 200                       # successful calls before the first training
# shadow_calls = 100                    # shadow calls the cascade is certified on
# recertify_calls = 100                 # audited and sampled fallback calls a serving cascade is
#                                       # certified on again (a lower threshold serves more; 0: off)
# retrain_after_calls = 2000            # new calls that make a retrain due
# challenger_margin = 0.01              # a challenger shown within this of the champion's agreement is not worse (paired, 95 %); so is one whose cascade serves more at the target
# drift = true                          # drift (answers, confidence) makes a retrain due
# drift_alpha = 0.01                    # the drift tests' level
# drift_window = 200                    # recent calls a drift test looks at
# train_window = 5000                   # train on the newest calls only (default: all)

# ---------------------------------------------------------- local models --
# Models that run on this machine. A local call costs its measured compute
# time at `machine_price_per_hour`.
# [providers.local]
# type = "local"
# machine_price_per_hour = 0.10
# max_batch = 32          # concurrent requests a classifier or encoder answers in one
#                         # forward pass (whatever is queued when it frees up; 1: one at a time)
# speculative_draft = 4   # a causal LM's greedy answers: tokens copied from the prompt checked
#                         # per decode step (same answer, fewer steps; 0: one token per step)
#
# [models.triage-minilm]
# provider = "local"
# path = "understudies/triage/ds-.../classifier"   # a trained classifier, a GGUF file or an HF directory
# [models.smollm2]
# provider = "local"
# path = "models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
# adapter = "understudies/triage/ds-.../lora"       # optional PEFT LoRA adapter
# weights = "auto"    # auto (a Q4_x/Q5_x file is served from a near-lossless Q8_0 copy),
#                     # as-stored, q8_0, or iq4_nl / q4_0 (smaller and faster on AVX2/AVX-512
#                     # CPUs, at some loss: a lossy re-quantization of the file)
"#;
