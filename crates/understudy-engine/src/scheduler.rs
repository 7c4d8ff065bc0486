//! Continuous batching: one thread owns the llama.cpp context and its KV
//! cache, shared by up to `n_seq_max` sequences.
//!
//! Requests arrive over a channel. Every step builds one `llama_batch` with
//! one token for each sequence that is generating, the candidate tokens of
//! each sequence that is scoring allowed answers, and chunks of the prompts
//! of newly admitted sequences (so a long prompt does not stall the others),
//! then runs one decode. A request whose event receiver is gone (the client
//! left) is dropped and its KV cells freed (`seq_rm`) before the next step.
//!
//! A greedy sequence may also put a draft after its token (copy-aware
//! speculative decoding, [`crate::speculative`]): the draft's tokens are
//! decoded in the same step, each with its logits, the longest prefix greedy
//! decoding agrees with is kept, and the cells of the rest are removed with
//! `seq_rm` right after the step. Drafts take only the batch room and KV
//! cells left after the generating sequences' tokens and the prompt chunks,
//! so they never delay another request's prompt.
//!
//! A request with a JSON schema ([`crate::schema`]) has the text the schema
//! fixes appended as tokens of its own: the first ones after the prompt
//! (prefilled with it), the others after the token that made them certain,
//! in the same step and with logits only at the last of them (jump-forward
//! decoding). Its answer ends at the object's closing brace: a brace the
//! schema fixes is never decoded.
//!
//! Prompt prefixes are kept (prefix caching): a finished sequence's prompt
//! stays in the KV cache under its sequence id ([`KeptPrefixes`]), and a
//! new request whose prompt starts the same way (a task's system prompt,
//! its instructions and worked examples) takes that sequence over and
//! prefills only the rest. Kept prefixes use only the cells and sequence
//! ids nobody else wants: the least recently used is dropped as soon as a
//! request needs its room.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedSender;

use crate::request::Sampling;
use crate::sampling::{log_sum_exp, log_sum_exp_f64, sample, top_tokens, Rng};
use crate::schema::{ObjectSchema, SchemaAnswer};
use crate::speculative::{prompt_lookup, DraftLength, SpeculationCounters};
use crate::text::{JsonObject, JsonProgress, StopBuffer};

/// One request handed to the scheduler.
#[derive(Debug)]
pub struct Job {
    pub prompt: Vec<LlamaToken>,
    pub sampling: Sampling,
    /// Constrained output: the token sequences of the allowed answers, and their texts.
    pub choices: Option<Vec<(Vec<LlamaToken>, String)>>,
    /// The answer must be one JSON object: it ends at its closing brace.
    pub json_object: bool,
    /// The answer is the compact JSON object of this schema: the text it
    /// fixes is appended without decode steps ([`crate::schema`]).
    pub schema: Option<Arc<ObjectSchema>>,
    pub seed: u64,
    pub events: UnboundedSender<Event>,
}

/// What the scheduler reports about a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Newly released text, with the logprobs entries of its tokens (when asked for).
    Delta {
        text: String,
        logprobs: Vec<Value>,
    },
    Done {
        finish_reason: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
        /// This request's share of the decode steps it took part in: each
        /// step's time split among its sequences by the tokens each put in
        /// the batch. What the call cost the machine; concurrent calls'
        /// wall times overlap, their shares do not.
        compute: Duration,
        /// Prompt tokens whose KV cells came from a kept prefix (not prefilled).
        cached_tokens: usize,
    },
    Failed(String),
}

/// How the scheduler runs.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    pub n_ctx: u32,
    pub n_batch: u32,
    pub n_seq_max: u32,
    /// Most draft tokens a greedy sequence verifies in one step; 0: no speculation.
    pub speculative_draft: usize,
    /// Keep finished prompts in the KV cache for the next request that starts the same way.
    pub prefix_cache: bool,
    /// A schema's fixed tokens enter the KV cache with the token before them
    /// (no decode step, no logits); false: one per decode step, as if the
    /// model had chosen them.
    pub jump_forward: bool,
}

impl SchedulerConfig {
    /// Sequence ids the context must have: one per request decoded
    /// together, and [`KEPT_SEQUENCES`] more for kept prefixes.
    pub fn n_seq_ids(&self) -> u32 {
        self.n_seq_max + if self.prefix_cache { KEPT_SEQUENCES } else { 0 }
    }
}

/// Most sequences generating in a step for drafts to be verified in it. A
/// step costs about a fixed part (the weights read once: about 10 ms on 2
/// cores for SmolLM2-135M) plus about 3.5 ms per token in it. An accepted
/// draft token saves its sequence a later step, whose fixed part is shared
/// by every sequence in it; a rejected one costs its token. With about half
/// of the drafted tokens accepted, a draft pays while the fixed part shared
/// by the sequences outweighs the rejected tokens: up to about 3 of them.
const MAX_DRAFTING_SEQUENCES: usize = 3;

/// Sequence ids beyond `n_seq_max` that hold only kept prefixes, so that a
/// task's prompt prefix survives while every request slot is busy.
const KEPT_SEQUENCES: u32 = 2;

/// Most tokens of earlier answers a kept prefix holds for drafting.
const KEPT_ANSWER_TOKENS: usize = 256;

/// Prompt tokens kept before each earlier answer.
const ANSWER_LEAD_IN: usize = 3;

/// Fewest prompt tokens worth taking a kept prefix over for: a shorter
/// match (the chat template's first tokens) saves little and spends a
/// prefix another request may match better.
const MIN_PREFIX_REUSE: usize = 8;

/// A finished sequence's prompt, still in the KV cache under `seq_id`.
struct KeptPrefix {
    /// Unique among the prefixes kept since the scheduler started.
    id: u64,
    seq_id: i32,
    /// The tokens at positions `0..tokens.len()` of the sequence.
    tokens: Vec<LlamaToken>,
    /// The latest answers given after prompts that started with `tokens`
    /// (at most [`KEPT_ANSWER_TOKENS`]): a task's answers repeat their keys
    /// and punctuation, so a greedy request on this prefix drafts from them
    /// too.
    answers: Vec<LlamaToken>,
    /// The scheduler step it was kept or last matched at (least recently used goes first).
    last_used: u64,
}

/// The kept prefixes (at most one per free sequence id).
#[derive(Default)]
struct KeptPrefixes {
    kept: Vec<KeptPrefix>,
    next_id: u64,
}

impl KeptPrefixes {
    fn cells(&self) -> usize {
        self.kept.iter().map(|kept| kept.tokens.len()).sum()
    }

    /// The kept prefix sharing the most leading tokens with `prompt`, and
    /// how many of them a request may reuse: never the whole prompt, since
    /// its last token must be decoded for the logits of the first answer
    /// token. `None` below [`MIN_PREFIX_REUSE`].
    fn best_match(&self, prompt: &[LlamaToken]) -> Option<(usize, usize)> {
        let limit = prompt.len().saturating_sub(1);
        self.kept
            .iter()
            .enumerate()
            .map(|(idx, kept)| {
                let common = kept.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count();
                (idx, common.min(limit))
            })
            .filter(|&(_, reuse)| reuse >= MIN_PREFIX_REUSE)
            .max_by_key(|&(idx, reuse)| (reuse, self.kept[idx].last_used))
    }

    /// Removes and returns the least recently used kept prefix.
    fn pop_least_recent(&mut self) -> Option<KeptPrefix> {
        self.pop_least_recent_except(None)
    }

    /// Removes and returns the least recently used kept prefix whose sequence is not `except`.
    fn pop_least_recent_except(&mut self, except: Option<i32>) -> Option<KeptPrefix> {
        let idx = self
            .kept
            .iter()
            .enumerate()
            .filter(|(_, kept)| Some(kept.seq_id) != except)
            .min_by_key(|(_, kept)| kept.last_used)
            .map(|(idx, _)| idx)?;
        Some(self.kept.swap_remove(idx))
    }
}

enum Phase {
    /// Prompt tokens `[0, n_prefilled)` are in the KV cache.
    Prefill { n_prefilled: usize },
    /// `next` is sampled but not yet decoded.
    Generate { next: LlamaToken },
    /// Scoring allowed answers: `prompt_logits` is the row after the prompt,
    /// `scores[k]` the finished log-probability of answer k.
    Score { prompt_logits: Vec<f32>, candidate: usize, scores: Vec<f64> },
}

struct Slot {
    seq_id: i32,
    job: Job,
    phase: Phase,
    /// Tokens of this sequence in the KV cache.
    n_past: usize,
    n_generated: usize,
    rng: Rng,
    stops: StopBuffer,
    /// Batch rows of this slot's outputs in the current step.
    rows: Vec<i32>,
    /// Earlier answers to prompts that started the same way (from the kept
    /// prefix this sequence reused), the prompt, and every token sampled
    /// since (the last one is `next` while generating): where drafts are
    /// looked up.
    history: Vec<LlamaToken>,
    /// How many of `history`'s first tokens are earlier answers.
    earlier_answers: usize,
    /// The draft decoded after `next` in the current step.
    draft: Vec<LlamaToken>,
    draft_length: DraftLength,
    /// Where a JSON-object answer ends (`Job::json_object`).
    json: Option<JsonObject>,
    /// The answer under its schema (`Job::schema`).
    answer: Option<SchemaAnswer>,
    /// Tokens the schema fixed after `next` (after the prompt while
    /// prefilling), not yet in the KV cache.
    forced: Vec<LlamaToken>,
    /// `SchedulerConfig::jump_forward`.
    jump_forward: bool,
    /// Tokens this sequence put in the current step's batch.
    step_tokens: usize,
    /// Its share of the decode steps so far (`Event::Done::compute`).
    compute: Duration,
    /// Prompt tokens taken over from a kept prefix.
    cached_tokens: usize,
    /// The kept prefix this sequence started from (`KeptPrefix::id`).
    kept_source: Option<u64>,
}

/// Tokens a request's answer may still take after `n_generated`: what its
/// `max_tokens` leaves (at least one), or one when it has no limit.
fn answer_room(job: &Job, n_generated: usize) -> usize {
    job.sampling.max_tokens.map_or(1, |max| max.saturating_sub(n_generated).max(1))
}

impl Slot {
    /// KV cells this sequence holds now.
    fn cells(&self) -> usize {
        match self.phase {
            Phase::Prefill { n_prefilled } => n_prefilled,
            _ => self.n_past,
        }
    }

    /// KV cells this sequence may still come to hold: its whole prompt and
    /// the rest of its answer (`max_tokens`; one more token when it has no
    /// limit), within the context. A request is admitted only when its
    /// reservation fits beside the others', so that no answer is cut short
    /// by what else is in flight.
    fn reserved(&self, n_ctx: usize) -> usize {
        let base = match self.phase {
            Phase::Prefill { .. } => self.job.prompt.len() + self.forced.len(),
            _ => self.n_past + self.forced.len(),
        };
        (base + answer_room(&self.job, self.n_generated)).min(n_ctx)
    }

    /// At most how many new KV cells this sequence may take in the next
    /// step: the rest of its prompt, its next token and a draft, or the
    /// longest allowed answer it scores.
    fn wanted(&self, speculative_draft: usize) -> usize {
        match &self.phase {
            Phase::Prefill { n_prefilled } => self.prefill_len() - n_prefilled,
            Phase::Generate { .. } => 1 + self.forced.len() + speculative_draft,
            Phase::Score { .. } => self.job.choices.iter().flatten().map(|(tokens, _)| tokens.len()).max().unwrap_or(0),
        }
    }

    /// Leading prompt tokens of this sequence that are in the KV cache.
    fn prompt_in_cache(&self) -> usize {
        match self.phase {
            Phase::Prefill { n_prefilled } => n_prefilled.min(self.job.prompt.len()),
            _ => self.job.prompt.len(),
        }
    }

    /// Tokens prefilled before the first decode: the prompt, and with jump-forward
    /// the answer's first tokens that its schema fixes.
    fn prefill_len(&self) -> usize {
        self.job.prompt.len() + if self.jump_forward { self.forced.len() } else { 0 }
    }

    /// Token `idx` of what is prefilled.
    fn prefill_token(&self, idx: usize) -> LlamaToken {
        match self.job.prompt.get(idx) {
            Some(&token) => token,
            None => self.forced[idx - self.job.prompt.len()],
        }
    }

    /// Forced tokens that go into the batch with `next`.
    fn forced_with_next(&self) -> &[LlamaToken] {
        if self.jump_forward {
            &self.forced
        } else {
            &[]
        }
    }

    /// The draft this sequence may verify in this step: greedy sequences
    /// only, no more tokens than its answer may still have, and within the
    /// context. Empty for everyone else.
    fn wanted_draft(&self, n_ctx: usize) -> &[LlamaToken] {
        if !matches!(self.phase, Phase::Generate { .. }) || self.job.sampling.temperature > 0.0 {
            return &[];
        }
        // Token by token, forced tokens are decoded one per step before anything is drafted.
        if !self.jump_forward && !self.forced.is_empty() {
            return &[];
        }
        // The step yields the draft's accepted tokens plus one more of the
        // model's own, so a draft longer than the answer's remaining room
        // minus one is decoded for nothing.
        let remaining = match self.job.sampling.max_tokens {
            Some(max) => max.saturating_sub(self.n_generated).saturating_sub(1),
            None => usize::MAX,
        };
        // `next` sits at n_past (its forced tokens after it); the draft's
        // last token must leave the cell after it free, as `sample_next`
        // finishes a sequence with `length` once n_past + 1 reaches n_ctx.
        let room = n_ctx.saturating_sub(self.n_past + self.forced.len() + 2);
        prompt_lookup(&self.history, self.draft_length.get().min(remaining).min(room))
    }

    fn send(&self, event: Event) {
        let _ = self.job.events.send(event);
    }

    fn finish(&mut self, finish_reason: &'static str) {
        let released = self.stops.finish();
        if !released.text.is_empty() || !released.logprobs.is_empty() {
            self.send(Event::Delta { text: released.text, logprobs: released.logprobs });
        }
        self.send(Event::Done {
            finish_reason,
            prompt_tokens: self.job.prompt.len(),
            completion_tokens: self.n_generated,
            compute: self.compute,
            cached_tokens: self.cached_tokens,
        });
    }
}

/// Runs until every sender of `jobs` is gone.
pub fn run(
    model: &LlamaModel,
    mut context: LlamaContext<'_>,
    config: SchedulerConfig,
    jobs: Receiver<Job>,
    counters: &SpeculationCounters,
) {
    let n_ctx = config.n_ctx as usize;
    let n_batch = config.n_batch.max(1) as usize;
    let mut batch = LlamaBatch::new(n_batch + config.n_seq_max as usize, 1);
    let mut queue: VecDeque<Job> = VecDeque::new();
    let mut slots: Vec<Slot> = Vec::new();
    let mut free_seq_ids: Vec<i32> = (0..config.n_seq_ids() as i32).rev().collect();
    let mut kept = KeptPrefixes::default();
    let mut step: u64 = 0;
    let vocab = model.vocab();
    let end_token = {
        let eot = vocab.eot();
        if eot.0 >= 0 {
            eot
        } else {
            vocab.eos()
        }
    };

    loop {
        // 1. Take new requests: wait when idle, otherwise only what has arrived.
        if slots.is_empty() && queue.is_empty() {
            match jobs.recv() {
                Ok(job) => queue.push_back(job),
                Err(_) => return,
            }
        }
        loop {
            match jobs.try_recv() {
                Ok(job) => queue.push_back(job),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    if slots.is_empty() && queue.is_empty() {
                        return;
                    }
                    break;
                }
            }
        }

        // 2. Drop requests whose client has gone, freeing their KV cells.
        step += 1;
        queue.retain(|job| !job.events.is_closed());
        let mut gone = Vec::new();
        slots.retain_mut(|slot| {
            let closed = slot.job.events.is_closed();
            if closed {
                gone.push(slot.seq_id);
            }
            !closed
        });
        for seq_id in gone {
            let _ = context.clear_kv_cache_seq(Some(seq_id as u32), None, None);
            free_seq_ids.push(seq_id);
        }

        // 3. Admit queued requests while a sequence and KV cells are free,
        // each on the kept prefix that matches its prompt best, if any.
        let mut cells_used: usize = slots.iter().map(|slot| slot.reserved(n_ctx)).sum();
        while let Some(job) = queue.front() {
            let needed = (job.prompt.len() + answer_room(job, 0)).min(n_ctx);
            if cells_used + needed > n_ctx {
                break;
            }
            if slots.len() >= config.n_seq_max as usize {
                break;
            }
            let reuse = if config.prefix_cache { kept.best_match(&job.prompt) } else { None };
            let matched = reuse.map(|(idx, reused)| (kept.kept[idx].seq_id, reused));
            let kept_source = reuse.map(|(idx, _)| kept.kept[idx].id);
            // Drafts are verified, so earlier answers help even if the cells cannot be reused.
            let earlier = reuse.map(|(idx, _)| kept.kept[idx].answers.clone()).unwrap_or_default();
            // A sequence id: a free one, else a kept prefix's (the least
            // recently used one that is not the match), else the match's
            // own, taken over with its cells.
            let mut cached_tokens = 0;
            let seq_id = match free_seq_ids.pop() {
                Some(seq_id) => seq_id,
                None => match kept.pop_least_recent_except(matched.map(|(seq_id, _)| seq_id)) {
                    Some(prefix) => {
                        let _ = context.clear_kv_cache_seq(Some(prefix.seq_id as u32), None, None);
                        prefix.seq_id
                    }
                    None => match (matched, kept.pop_least_recent()) {
                        (Some((_, reused)), Some(prefix)) => {
                            let trimmed =
                                context.clear_kv_cache_seq(Some(prefix.seq_id as u32), Some(reused as u32), None);
                            if matches!(trimmed, Ok(true)) {
                                cached_tokens = reused;
                            } else {
                                let _ = context.clear_kv_cache_seq(Some(prefix.seq_id as u32), None, None);
                            }
                            prefix.seq_id
                        }
                        (None, Some(prefix)) => {
                            let _ = context.clear_kv_cache_seq(Some(prefix.seq_id as u32), None, None);
                            prefix.seq_id
                        }
                        (_, None) => break,
                    },
                },
            };
            // Otherwise the matched prefix's cells are shared with the new
            // sequence (a unified cache copies no data) and it stays kept.
            if let Some((source, reused)) = matched.filter(|&(source, _)| source != seq_id) {
                if let Some(prefix) = kept.kept.iter_mut().find(|prefix| prefix.seq_id == source) {
                    if context.copy_kv_cache_seq(source, seq_id, Some(0), Some(reused as u32)).is_ok() {
                        prefix.last_used = step;
                        cached_tokens = reused;
                    }
                }
            }
            // Kept prefixes give way to requests.
            while cells_used + needed + kept.cells() > n_ctx {
                if !drop_least_recent(&mut context, &mut kept, &mut free_seq_ids) {
                    break;
                }
            }
            let Some(job) = queue.pop_front() else { break };
            cells_used += needed;
            let rng = Rng::new(job.seed);
            let stops = StopBuffer::new(job.sampling.stop.clone());
            let earlier_answers = earlier.len();
            let mut history = earlier;
            history.extend_from_slice(&job.prompt);
            let job_json_object = job.json_object;
            let job_schema = job.schema.clone();
            let mut slot = Slot {
                seq_id,
                job,
                phase: Phase::Prefill { n_prefilled: cached_tokens },
                n_past: 0,
                n_generated: 0,
                rng,
                stops,
                rows: Vec::new(),
                history,
                earlier_answers,
                draft: Vec::new(),
                draft_length: DraftLength::new(config.speculative_draft),
                json: job_json_object.then(JsonObject::default),
                answer: job_schema.map(SchemaAnswer::new),
                forced: Vec::new(),
                jump_forward: config.jump_forward,
                step_tokens: 0,
                compute: Duration::ZERO,
                cached_tokens,
                kept_source,
            };
            // The answer's first tokens, when its schema fixes them.
            match push_forced(model, &mut slot) {
                Ok(None) => slots.push(slot),
                Ok(Some(reason)) => {
                    slot.finish(reason);
                    release(&mut context, &slot, &mut kept, &mut free_seq_ids, config.prefix_cache, step);
                }
                Err(message) => {
                    slot.send(Event::Failed(message));
                    release(&mut context, &slot, &mut kept, &mut free_seq_ids, config.prefix_cache, step);
                }
            }
        }
        if slots.is_empty() {
            continue;
        }
        // Kept prefixes also give way to the sequences' next tokens.
        let wanted: usize = slots.iter().map(|slot| slot.cells() + slot.wanted(config.speculative_draft)).sum();
        while wanted + kept.cells() > n_ctx {
            if !drop_least_recent(&mut context, &mut kept, &mut free_seq_ids) {
                break;
            }
        }

        // 4. Fill one batch: generating and scoring sequences first, then prompt chunks.
        batch.clear();
        let mut budget = n_batch;
        let total_cells: usize = slots.iter().map(Slot::cells).sum::<usize>() + kept.cells();
        let mut cells_free = n_ctx.saturating_sub(total_cells);
        let mut out_of_context = Vec::new();
        for (slot_idx, slot) in slots.iter_mut().enumerate() {
            slot.rows.clear();
            slot.draft.clear();
            slot.step_tokens = 0;
            if let Phase::Generate { next } = slot.phase {
                // With jump-forward, the tokens the schema fixed after `next`
                // go in with it; logits only after the last of them.
                let forced = slot.forced_with_next();
                let n = 1 + forced.len();
                if cells_free < n || slot.n_past + n > n_ctx {
                    out_of_context.push(slot_idx);
                    continue;
                }
                if n > 1 && n > budget {
                    continue;
                }
                if batch.add(next, slot.n_past as i32, &[slot.seq_id], forced.is_empty()).is_err() {
                    continue;
                }
                for (offset, &token) in forced.iter().enumerate() {
                    let position = (slot.n_past + 1 + offset) as i32;
                    let _ = batch.add(token, position, &[slot.seq_id], offset + 1 == forced.len());
                }
                slot.rows.push(batch.n_tokens() - 1);
                cells_free -= n;
                budget = budget.saturating_sub(n);
                slot.step_tokens += n;
            }
        }
        for slot in slots.iter_mut() {
            if let Phase::Score { candidate, .. } = &slot.phase {
                let Some(choices) = &slot.job.choices else { continue };
                let tokens = &choices[*candidate].0;
                if tokens.len() > budget || tokens.len() > cells_free {
                    continue;
                }
                for (offset, token) in tokens.iter().enumerate() {
                    slot.rows.push(batch.n_tokens());
                    let _ = batch.add(*token, (slot.n_past + offset) as i32, &[slot.seq_id], true);
                }
                cells_free -= tokens.len();
                budget -= tokens.len();
                slot.step_tokens += tokens.len();
            }
        }
        for slot in slots.iter_mut() {
            if let Phase::Prefill { n_prefilled } = slot.phase {
                let prefill_len = slot.prefill_len();
                let remaining = prefill_len - n_prefilled;
                let n = remaining.min(budget).min(cells_free);
                if n == 0 {
                    continue;
                }
                for offset in 0..n {
                    let idx = n_prefilled + offset;
                    let last = idx + 1 == prefill_len;
                    if last {
                        slot.rows.push(batch.n_tokens());
                    }
                    let _ = batch.add(slot.prefill_token(idx), idx as i32, &[slot.seq_id], last);
                }
                slot.phase = Phase::Prefill { n_prefilled: n_prefilled + n };
                budget -= n;
                cells_free -= n;
                slot.step_tokens += n;
            }
        }
        // Drafts last, in the room the others left, and only while few
        // sequences generate (see MAX_DRAFTING_SEQUENCES).
        let generating = slots.iter().filter(|slot| matches!(slot.phase, Phase::Generate { .. })).count();
        for slot in slots.iter_mut() {
            if slot.rows.len() != 1 || generating > MAX_DRAFTING_SEQUENCES {
                continue;
            }
            let draft = slot.wanted_draft(n_ctx);
            let n = draft.len().min(budget).min(cells_free);
            if n == 0 {
                continue;
            }
            let draft = draft[..n].to_vec();
            let start = slot.n_past + 1 + slot.forced_with_next().len();
            for (offset, token) in draft.iter().enumerate() {
                slot.rows.push(batch.n_tokens());
                if batch.add(*token, (start + offset) as i32, &[slot.seq_id], true).is_err() {
                    slot.rows.pop();
                    break;
                }
                slot.draft.push(*token);
            }
            budget -= slot.draft.len();
            cells_free -= slot.draft.len();
            slot.step_tokens += slot.draft.len();
        }
        for &slot_idx in out_of_context.iter().rev() {
            let mut slot = slots.remove(slot_idx);
            slot.finish("length");
            release(&mut context, &slot, &mut kept, &mut free_seq_ids, config.prefix_cache, step);
        }
        if batch.n_tokens() == 0 {
            // Nothing fits this step (the context is full of prompts being read): wait for room.
            if slots.iter().all(|slot| matches!(slot.phase, Phase::Prefill { .. })) {
                if let Some(slot) = slots.pop() {
                    slot.send(Event::Failed("the model's context is full".to_string()));
                    let _ = context.clear_kv_cache_seq(Some(slot.seq_id as u32), None, None);
                    free_seq_ids.push(slot.seq_id);
                }
            }
            continue;
        }

        // 5. One decode for everyone, its time shared by the tokens each sequence put in.
        let step_started = Instant::now();
        let decoded = context.decode(&mut batch);
        share_step(&mut slots, step_started.elapsed());
        if let Err(error) = decoded {
            for slot in slots.drain(..) {
                slot.send(Event::Failed(format!("llama.cpp decode failed: {error}")));
                let _ = context.clear_kv_cache_seq(Some(slot.seq_id as u32), None, None);
                free_seq_ids.push(slot.seq_id);
            }
            // What a failed decode left in the cache is not trusted.
            while drop_least_recent(&mut context, &mut kept, &mut free_seq_ids) {}
            continue;
        }

        // 6. Read each slot's outputs.
        let mut finished = Vec::new();
        for (slot_idx, slot) in slots.iter_mut().enumerate() {
            let done = match step_slot(model, &mut context, slot, end_token, n_ctx, counters) {
                Ok(done) => done,
                Err(message) => {
                    slot.send(Event::Failed(message));
                    finished.push(slot_idx);
                    continue;
                }
            };
            if let Some(reason) = done {
                slot.finish(reason);
                finished.push(slot_idx);
            } else if let Phase::Score { candidate, .. } = slot.phase {
                // Forget the scored candidate's tokens: the next one starts right after the prompt.
                if slot.rows.is_empty() {
                    continue;
                }
                let _ = candidate;
                let _ = context.clear_kv_cache_seq(Some(slot.seq_id as u32), Some(slot.n_past as u32), None);
            }
        }
        for &slot_idx in finished.iter().rev() {
            let slot = slots.remove(slot_idx);
            release(&mut context, &slot, &mut kept, &mut free_seq_ids, config.prefix_cache, step);
        }
    }
}

/// Drops the least recently used kept prefix, freeing its cells and its
/// sequence id; false when none is kept.
fn drop_least_recent(context: &mut LlamaContext<'_>, kept: &mut KeptPrefixes, free_seq_ids: &mut Vec<i32>) -> bool {
    let Some(prefix) = kept.pop_least_recent() else { return false };
    let _ = context.clear_kv_cache_seq(Some(prefix.seq_id as u32), None, None);
    free_seq_ids.push(prefix.seq_id);
    true
}

/// Gives a finished sequence's id back: with its prompt kept in the KV
/// cache for the next request that starts the same way (its answer's cells
/// removed), or with all its cells freed.
fn release(
    context: &mut LlamaContext<'_>,
    slot: &Slot,
    kept: &mut KeptPrefixes,
    free_seq_ids: &mut Vec<i32>,
    prefix_cache: bool,
    step: u64,
) {
    let seq_id = slot.seq_id;
    let n_kept = slot.prompt_in_cache();
    if prefix_cache
        && n_kept >= MIN_PREFIX_REUSE
        && matches!(context.clear_kv_cache_seq(Some(seq_id as u32), Some(n_kept as u32), None), Ok(true))
    {
        // The earlier answers and this one, the newest last, each after the
        // prompt's last tokens (the chat template's start of an answer), so
        // that a match on them drafts an answer's first tokens too.
        let mut answers = slot.history[..slot.earlier_answers].to_vec();
        let prompt_end = (slot.earlier_answers + slot.job.prompt.len()).min(slot.history.len());
        answers.extend_from_slice(&slot.history[prompt_end.saturating_sub(ANSWER_LEAD_IN).max(slot.earlier_answers)..]);
        let answers = answers.split_off(answers.len().saturating_sub(KEPT_ANSWER_TOKENS));
        // This prefix takes the place of the one it started from when it
        // shares most of it (the same task's instructions, another message):
        // it holds those leading cells (shared) and that one's answers too,
        // so one task's calls keep one prefix, not one per call.
        if let Some(source) = slot.kept_source {
            let replaces = |prefix: &KeptPrefix| prefix.id == source && 2 * slot.cached_tokens >= prefix.tokens.len();
            if let Some(idx) = kept.kept.iter().position(replaces) {
                let replaced = kept.kept.swap_remove(idx);
                let _ = context.clear_kv_cache_seq(Some(replaced.seq_id as u32), None, None);
                free_seq_ids.push(replaced.seq_id);
            }
        }
        kept.next_id += 1;
        let tokens = slot.job.prompt[..n_kept].to_vec();
        kept.kept.push(KeptPrefix { id: kept.next_id, seq_id, tokens, answers, last_used: step });
        return;
    }
    let _ = context.clear_kv_cache_seq(Some(seq_id as u32), None, None);
    free_seq_ids.push(seq_id);
}

/// Splits one decode step's time among the sequences in its batch, by the
/// tokens each put in it.
fn share_step(slots: &mut [Slot], step: Duration) {
    let n_tokens: usize = slots.iter().map(|slot| slot.step_tokens).sum();
    if n_tokens == 0 {
        return;
    }
    for slot in slots.iter_mut().filter(|slot| slot.step_tokens > 0) {
        slot.compute += step.mul_f64(slot.step_tokens as f64 / n_tokens as f64);
    }
}

/// Advances one slot after a decode; `Some(finish_reason)` when it is done,
/// an error message when its KV cache could not be put right.
fn step_slot(
    model: &LlamaModel,
    context: &mut LlamaContext<'_>,
    slot: &mut Slot,
    end_token: LlamaToken,
    n_ctx: usize,
    counters: &SpeculationCounters,
) -> Result<Option<&'static str>, String> {
    if slot.rows.is_empty() {
        return Ok(None);
    }
    if let Phase::Generate { .. } = slot.phase {
        return step_generating(model, context, slot, end_token, n_ctx, counters);
    }
    step_other(model, context, slot, end_token, n_ctx)
}

/// A generating slot after a decode: its token, then as much of its draft as greedy decoding agrees with.
fn step_generating(
    model: &LlamaModel,
    context: &mut LlamaContext<'_>,
    slot: &mut Slot,
    end_token: LlamaToken,
    n_ctx: usize,
    counters: &SpeculationCounters,
) -> Result<Option<&'static str>, String> {
    let draft = std::mem::take(&mut slot.draft);
    let rows = std::mem::take(&mut slot.rows);
    if !slot.jump_forward && !slot.forced.is_empty() {
        // Token by token: `next` was a token the schema fixed, and so is
        // the one after it; this step's logits are not needed.
        slot.n_past += 1;
        slot.phase = Phase::Generate { next: slot.forced.remove(0) };
        return Ok(None);
    }
    // With jump-forward, the tokens the schema fixed after `next` are in the cache too.
    slot.n_past += std::mem::take(&mut slot.forced).len();
    // Row k holds the logits after `next` (and its forced tokens) and the
    // draft's first k tokens. Each row's token is chosen exactly as without
    // a draft; while it (and the tokens the schema then fixes) equals the
    // draft's next tokens, they are already in the cache at the right
    // positions and the row after them is valid too.
    let mut k = 0;
    let mut n_accepted = 0;
    while k < rows.len() {
        slot.n_past += 1;
        let logits = context.get_logits_ith(rows[k]);
        if let Some(reason) = sample_next(model, slot, logits, end_token, n_ctx)? {
            if !draft.is_empty() {
                counters.record(draft.len(), n_accepted);
            }
            // The sequence's cells are all freed when it is removed.
            return Ok(Some(reason));
        }
        let Phase::Generate { next } = slot.phase else { break };
        let held = draft.get(k) == Some(&next)
            && if slot.jump_forward { draft[k + 1..].starts_with(&slot.forced) } else { slot.forced.is_empty() };
        if !held {
            break;
        }
        let n = 1 + slot.forced.len();
        n_accepted += n;
        k += n;
        slot.n_past += n - 1;
        slot.forced.clear();
    }
    slot.rows = rows;
    if !draft.is_empty() {
        counters.record(draft.len(), n_accepted);
        slot.draft_length.update(draft.len(), n_accepted);
        // Forget the rejected draft tokens: the cells from n_past on.
        let removed = context.clear_kv_cache_seq(Some(slot.seq_id as u32), Some(slot.n_past as u32), None);
        if !matches!(removed, Ok(true)) {
            return Err("llama.cpp could not remove a rejected draft from the KV cache".to_string());
        }
    }
    Ok(None)
}

/// A prefilling or scoring slot after a decode.
fn step_other(
    model: &LlamaModel,
    context: &LlamaContext<'_>,
    slot: &mut Slot,
    end_token: LlamaToken,
    n_ctx: usize,
) -> Result<Option<&'static str>, String> {
    Ok(match &mut slot.phase {
        Phase::Prefill { n_prefilled } => {
            let n_prefilled = *n_prefilled;
            if n_prefilled < slot.prefill_len() {
                return Ok(None);
            }
            slot.n_past = n_prefilled;
            let logits = context.get_logits_ith(slot.rows[0]);
            if let Some(choices) = &slot.job.choices {
                let n_choices = choices.len();
                slot.phase = Phase::Score { prompt_logits: logits.to_vec(), candidate: 0, scores: Vec::new() };
                let _ = n_choices;
                return Ok(None);
            }
            if !slot.forced.is_empty() {
                if slot.jump_forward {
                    // Prefilled with the prompt.
                    slot.forced.clear();
                } else {
                    // Token by token: the answer's first token is the schema's, not sampled.
                    slot.phase = Phase::Generate { next: slot.forced.remove(0) };
                    return Ok(None);
                }
            }
            return sample_next(model, slot, logits, end_token, n_ctx);
        }
        Phase::Generate { .. } => None,
        Phase::Score { prompt_logits, candidate, scores } => {
            let Some(choices) = &slot.job.choices else { return Ok(Some("stop")) };
            let tokens = &choices[*candidate].0;
            // log P(t1 | prompt) + Σ log P(t_i | prompt, t_<i) + log P(end | prompt, answer)
            let mut score = prompt_logits[tokens[0].0 as usize] as f64 - log_sum_exp(prompt_logits);
            for (offset, &row) in slot.rows.iter().enumerate() {
                let logits = context.get_logits_ith(row);
                let next = if offset + 1 < tokens.len() { tokens[offset + 1] } else { end_token };
                score += logits[next.0 as usize] as f64 - log_sum_exp(logits);
            }
            scores.push(score);
            *candidate += 1;
            if *candidate < choices.len() {
                return Ok(None);
            }
            let scores = scores.clone();
            let chosen = choose(&scores, slot.job.sampling.temperature, &mut slot.rng);
            let want = slot.job.sampling.logprobs;
            let (chosen_tokens, text) = &choices[chosen];
            let logprobs = match want {
                Some(n_top) => constrained_logprobs(model, choices, &scores, chosen, n_top),
                None => Vec::new(),
            };
            slot.n_generated = chosen_tokens.len();
            slot.send(Event::Delta { text: text.clone(), logprobs });
            Some("stop")
        }
    })
}

/// Samples the next token from `logits` and releases its text; an error
/// message when the answer cannot be the JSON object the request asked for.
fn sample_next(
    model: &LlamaModel,
    slot: &mut Slot,
    logits: &[f32],
    end_token: LlamaToken,
    n_ctx: usize,
) -> Result<Option<&'static str>, String> {
    let sampling = &slot.job.sampling;
    let token_idx = sample(logits, sampling.temperature, sampling.top_p, &mut slot.rng);
    let token = LlamaToken(token_idx as i32);
    let vocab = model.vocab();
    if vocab.is_eog(token) || token == end_token {
        if slot.json.is_some() || slot.answer.is_some() {
            return Err("the model ended its answer before the JSON object it was asked for was complete".into());
        }
        return Ok(Some("stop"));
    }
    let mut piece = vocab.token_to_piece(token, false, None);
    // A JSON-object answer ends at its closing brace: what the token has
    // after it is dropped, and no token after it is asked for.
    let mut json_complete = false;
    if let Some(json) = slot.json.as_mut() {
        match json.feed(&piece) {
            JsonProgress::Open => {}
            JsonProgress::Complete { used } => {
                json.check().map_err(|error| format!("the model's answer is not a JSON object: {error}"))?;
                piece.truncate(used);
                json_complete = true;
            }
            JsonProgress::NotAnObject => {
                return Err("the model's answer does not start with a JSON object".into());
            }
        }
    }
    if let Some(answer) = slot.answer.as_mut() {
        if let Some(used) = answer.feed(&piece).map_err(|error| error.to_string())? {
            piece.truncate(used);
            json_complete = true;
        }
    }
    let logprob = sampling.logprobs.map(|n_top| {
        let norm = log_sum_exp(logits);
        let top = top_tokens(logits, norm, n_top)
            .into_iter()
            .map(|(token, logprob)| {
                let piece = vocab.token_to_piece(LlamaToken(token as i32), false, None);
                logprob_entry(&piece, logprob, Vec::new())
            })
            .collect();
        logprob_entry(&piece, logits[token_idx] as f64 - norm, top)
    });
    let stopped = emit(slot, token, &piece, logprob);
    if stopped || json_complete {
        return Ok(Some("stop"));
    }
    if slot.job.sampling.max_tokens.is_some_and(|max| slot.n_generated >= max) {
        return Ok(Some("length"));
    }
    if slot.n_past + 1 >= n_ctx {
        return Ok(Some("length"));
    }
    slot.phase = Phase::Generate { next: token };
    if let Some(reason) = push_forced(model, slot)? {
        return Ok(Some(reason));
    }
    if slot.n_past + 1 + slot.forced.len() >= n_ctx {
        return Ok(Some("length"));
    }
    Ok(None)
}

/// Adds `token` (its `piece`) to the slot's answer, sampled or fixed by its
/// schema alike, and sends what the stop buffer releases; true when a stop
/// sequence ended the answer.
fn emit(slot: &mut Slot, token: LlamaToken, piece: &[u8], logprob: Option<Value>) -> bool {
    slot.n_generated += 1;
    slot.history.push(token);
    let released = slot.stops.push(piece, logprob);
    if !released.text.is_empty() || !released.logprobs.is_empty() {
        slot.send(Event::Delta { text: released.text, logprobs: released.logprobs });
    }
    released.stopped
}

/// The tokens of a schema's fixed `text`, as the model writes them; `None`
/// when no tokenization found writes exactly the text. (A SentencePiece
/// vocabulary puts a space token before text it tokenizes on its own; that
/// token is not part of the answer.)
fn forced_tokens(model: &LlamaModel, text: &[u8]) -> Option<Vec<LlamaToken>> {
    let vocab = model.vocab();
    let mut tokens = vocab.tokenize(text, false, false);
    let piece = |token: &LlamaToken| vocab.token_to_piece(*token, false, None);
    if text.first() != Some(&b' ') && tokens.first().is_some_and(|token| piece(token) == b" ") {
        tokens.remove(0);
    }
    let written: Vec<u8> = tokens.iter().flat_map(piece).collect();
    (written == text).then_some(tokens)
}

/// Writes the text the slot's schema fixes from here on: its tokens are
/// released as answer text (certain under the schema: logprob 0) and, unless
/// the answer ends with them, wait in `slot.forced` for the KV cache.
/// `Some(finish_reason)` when the answer ends within them: a closing brace
/// the schema fixes is never decoded.
fn push_forced(model: &LlamaModel, slot: &mut Slot) -> Result<Option<&'static str>, String> {
    let Some(answer) = slot.answer.as_mut() else { return Ok(None) };
    let mut after = answer.clone();
    let text = after.take_forced().map_err(|error| error.to_string())?;
    if text.is_empty() {
        return Ok(None);
    }
    let Some(mut tokens) = forced_tokens(model, &text) else {
        // Its tokens would not write the text back: the model writes it.
        return Ok(None);
    };
    *answer = after;
    let complete = answer.is_done();
    let vocab = model.vocab();
    let room = slot.job.sampling.max_tokens.map_or(usize::MAX, |max| max.saturating_sub(slot.n_generated));
    let whole = tokens.len() <= room;
    tokens.truncate(room);
    for &token in &tokens {
        let piece = vocab.token_to_piece(token, false, None);
        let logprob = slot.job.sampling.logprobs.map(|n_top| {
            let top = if n_top > 0 { vec![logprob_entry(&piece, 0.0, Vec::new())] } else { Vec::new() };
            logprob_entry(&piece, 0.0, top)
        });
        if emit(slot, token, &piece, logprob) {
            return Ok(Some("stop"));
        }
    }
    if complete && whole {
        return Ok(Some("stop"));
    }
    if slot.job.sampling.max_tokens.is_some_and(|max| slot.n_generated >= max) {
        return Ok(Some("length"));
    }
    slot.forced = tokens;
    Ok(None)
}

/// An OpenAI `logprobs.content` entry.
pub fn logprob_entry(piece: &[u8], logprob: f64, top_logprobs: Vec<Value>) -> Value {
    json!({
        "token": String::from_utf8_lossy(piece),
        "logprob": logprob,
        "bytes": piece,
        "top_logprobs": top_logprobs,
    })
}

/// Greedy at temperature 0, otherwise a draw from softmax(scores / temperature).
fn choose(scores: &[f64], temperature: f64, rng: &mut Rng) -> usize {
    let best = scores.iter().enumerate().fold(0, |best, (idx, &score)| if score > scores[best] { idx } else { best });
    if temperature <= 0.0 {
        return best;
    }
    let weights: Vec<f64> = scores.iter().map(|score| ((score - scores[best]) / temperature).exp()).collect();
    let mut target = rng.next_f64() * weights.iter().sum::<f64>();
    for (idx, weight) in weights.iter().enumerate() {
        target -= weight;
        if target < 0.0 {
            return idx;
        }
    }
    best
}

/// Logprobs of the chosen answer under the constrained distribution: the
/// model's answer probabilities renormalized over the allowed answers, spread
/// over the answer's tokens along the prefix tree of the allowed answers. The
/// chosen answer's entries sum to log P(answer | allowed answers), so
/// `exp(Σ logprob)` is its probability among the allowed answers.
pub fn constrained_logprobs(
    model: &LlamaModel,
    choices: &[(Vec<LlamaToken>, String)],
    scores: &[f64],
    chosen: usize,
    n_top: usize,
) -> Vec<Value> {
    let vocab = model.vocab();
    let piece = |token: LlamaToken| vocab.token_to_piece(token, false, None);
    let tokens = &choices[chosen].0;
    let mass = |prefix: &[LlamaToken]| {
        log_sum_exp_f64(
            choices.iter().zip(scores).filter(|(choice, _)| choice.0.starts_with(prefix)).map(|(_, &score)| score),
        )
    };
    let mut entries = Vec::with_capacity(tokens.len());
    for position in 0..tokens.len() {
        let prefix = &tokens[..position];
        let prefix_mass = mass(prefix);
        let logprob_of = |token: LlamaToken, exact: Option<usize>| {
            let mut extended = prefix.to_vec();
            extended.push(token);
            match exact {
                Some(choice) => scores[choice] - prefix_mass,
                None => mass(&extended) - prefix_mass,
            }
        };
        let is_last = position + 1 == tokens.len();
        let logprob = logprob_of(tokens[position], is_last.then_some(chosen));
        let mut alternatives: Vec<(LlamaToken, f64)> = Vec::new();
        for (choice, _) in choices {
            if choice.len() > position && choice.starts_with(prefix) {
                let token = choice[position];
                if !alternatives.iter().any(|(seen, _)| *seen == token) {
                    alternatives.push((token, logprob_of(token, None)));
                }
            }
        }
        alternatives.sort_by(|a, b| b.1.total_cmp(&a.1));
        alternatives.truncate(n_top);
        let top = alternatives
            .into_iter()
            .map(|(token, logprob)| logprob_entry(&piece(token), logprob, Vec::new()))
            .collect();
        entries.push(logprob_entry(&piece(tokens[position]), logprob, top));
    }
    entries
}
