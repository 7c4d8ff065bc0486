//! The autopilot: the loop run by itself for every task whose config has
//! `[tasks.NAME.autopilot]`, as a per-task state machine whose transitions
//! are recorded in the store (`autopilot_events`) with their reason and
//! evidence.
//!
//! ```text
//! collecting ──enough calls──▶ training ──trained, evaluated──▶ shadow
//!     ▲                          │ failed                          │ cascade certified on shadow calls
//!     └──────────────────────────┘                                 ▼
//!                         challenger ◀──retrain due── cascade ◀────┘
//!                         (not worse: promoted; else the champion stays)
//! ```
//!
//! [`decide`] is the pure rule: what to do given the stage and what the
//! store shows ([`Observation`]). [`tick`] observes, decides, acts (builds a
//! dataset, trains, evaluates, promotes) and records each transition. The
//! stage lives in the store, so a restarted autopilot resumes where it
//! stood; a training resumes from its checkpoint (same dataset, same folder).
//!
//! A serving cascade is certified again on live calls: its audits and a
//! same-rate sample of its fallbacks ([`live_sample`]) are a uniform sample
//! of its traffic, labelled by the lead. After each `recertify_calls` of
//! them, a threshold they certify below the serving one replaces it (a
//! challenger's validation split, a few hundred rows, certifies cautiously);
//! otherwise the threshold stays, and the guardrail answers for it. Either
//! way the check is recorded (cascade → cascade), and the next one looks
//! only at calls after it, so no call is tested twice.
//!
//! A retrain is due when `retrain_after_calls` new calls arrived since the
//! last training, when drift fired (at most one test per `drift_window` new
//! calls, so repeated looks do not pile up false alarms), or when the
//! guardrail demoted the cascade. A human's `understudy promote` pins the
//! task: the autopilot holds until `understudy autopilot --release TASK`.
//! The autopilot's own policy changes carry a note starting with
//! [`AUTOPILOT_NOTE`], the guardrail's with [`GUARDRAIL_NOTE`]; any other
//! change is a human's.

use serde_json::{json, Value};
use understudy_config::{AutopilotConfig, Config};
use understudy_eval::bootstrap::{Estimate, DEFAULT_RESAMPLES};
use understudy_eval::{bootstrap_mean, certify_threshold, Certification, ScoredAnswer};
use understudy_providers::LocalLoader;
use understudy_router::Policy;
use understudy_store::{AutopilotEvent, CallFilter, CallOrder, PolicyChange, StatusFilter, Store};
use understudy_types::{OffsetDateTime, Routing, ServedBy, Uuid};

use crate::error::{LoopError, Result};
use crate::{build_dataset, evaluate, promote, DatasetOptions, EvalRequest, PromoteRequest, TrainRequest};

/// How the autopilot's policy changes' notes begin.
pub const AUTOPILOT_NOTE: &str = "autopilot:";
/// How the guardrail's demotions' notes begin (`understudy-gateway::audit`).
pub const GUARDRAIL_NOTE: &str = "guardrail:";
/// The reason of the event that hands a pinned task back.
const RELEASED: &str = "released";
/// The error rate of thresholds certified on shadow calls (as `eval`'s default).
const SHADOW_DELTA: f64 = 0.05;
/// Transitions one tick may make before it stops (each acts at most once).
const MAX_STEPS_PER_TICK: usize = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Collecting,
    Training,
    Shadow,
    Cascade,
    Challenger,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Collecting => "collecting",
            Stage::Training => "training",
            Stage::Shadow => "shadow",
            Stage::Cascade => "cascade",
            Stage::Challenger => "challenger",
        }
    }

    pub fn parse(text: &str) -> Option<Stage> {
        [Stage::Collecting, Stage::Training, Stage::Shadow, Stage::Cascade, Stage::Challenger]
            .into_iter()
            .find(|stage| stage.as_str() == text)
    }
}

/// What the autopilot sees of a task at a tick.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    /// Successful calls of the task since the last training began (all of
    /// them before the first).
    pub n_calls_since_training: u64,
    /// The human's policy change that pins the task, if one does.
    pub pinned_by: Option<String>,
    /// The guardrail's demotion, when the current policy is one.
    pub demoted: Option<String>,
    /// In shadow: the shadow calls so far and the threshold they certify.
    pub shadow: Option<ShadowEvidence>,
    /// Under a cascade: its live sample since the last check, and the
    /// threshold it certifies.
    pub live: Option<LiveEvidence>,
    /// Drift signals that fired.
    pub drift: Vec<String>,
    /// The lead answered with labels the serving version never learned: on
    /// those calls the understudy cannot agree, so its certificate no longer
    /// covers the traffic.
    pub drift_new_labels: bool,
}

#[derive(Debug, Clone)]
pub struct ShadowEvidence {
    pub n_calls: u64,
    pub certification: Certification,
}

/// A serving cascade's live calls since its last check: `certification`
/// is over its [`live_sample`] (`n_validation` sampled calls of `n_calls`).
#[derive(Debug, Clone)]
pub struct LiveEvidence {
    pub serving_threshold: f64,
    pub audit_rate: f64,
    pub n_calls: u64,
    pub certification: Certification,
}

/// Whether a call the understudy did not serve is in the live sample: a
/// draw at `rate` from its id (mixed, since a UUIDv7 also holds a clock and
/// a counter), independent of the gateway's random draw of audits.
pub fn sampled_fallback(id: Uuid, rate: f64) -> bool {
    let (high, low) = id.as_u64_pair();
    // SplitMix64's finalizer: every bit of the id moves every bit of the draw.
    let mut mixed = high ^ low.rotate_left(32);
    mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    mixed ^= mixed >> 31;
    ((mixed >> 11) as f64 / (1u64 << 53) as f64) < rate
}

/// A cascade's live calls as labelled calls to certify a threshold on: a
/// uniform sample of its traffic at `audit_rate`.
///
/// A served call is in it when it was audited (the gateway audits each
/// served call with probability `audit_rate`), agreeing as its audit did; a
/// call the lead served (a fallback: the understudy's confidence was below
/// the threshold, or it failed) is in it with the same probability
/// ([`sampled_fallback`]), agreeing as the understudy's answer did with the
/// lead's. So every call is in it with probability `audit_rate`, whatever
/// threshold it was served at, and the sample is what shadow calls are: the
/// understudy's answer and confidence against the lead's on the traffic as
/// it is now. Taking every fallback instead would over-represent the calls
/// below the threshold. Left out: calls not under a cascade, and audits
/// the lead did not answer.
pub fn live_sample<'a>(calls: impl IntoIterator<Item = (Uuid, &'a Routing)>, audit_rate: f64) -> Vec<ScoredAnswer> {
    calls
        .into_iter()
        .filter(|(_, routing)| matches!(Policy::parse(&routing.policy, None), Ok(Policy::Cascade { .. })))
        .filter_map(|(id, routing)| {
            let confidence = routing.understudy_confidence.filter(|confidence| confidence.is_finite());
            match routing.served_by {
                ServedBy::Understudy => Some(match (confidence, routing.audit_agreement) {
                    (Some(confidence), Some(agrees)) => ScoredAnswer { confidence, agrees },
                    (None, Some(_)) => ScoredAnswer::never_served(),
                    (_, None) => return None,
                }),
                ServedBy::Lead if sampled_fallback(id, audit_rate) => Some(match (confidence, routing.agreement) {
                    (Some(confidence), Some(agrees)) => ScoredAnswer { confidence, agrees },
                    _ => ScoredAnswer::never_served(),
                }),
                ServedBy::Lead => None,
            }
        })
        .collect()
}

/// What to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Nothing; the reason says what is awaited.
    Hold(String),
    /// Enter `to` (training or challenger start with a new dataset).
    Move { to: Stage, reason: String },
    /// Run the stage's work (train and evaluate).
    Run,
    /// Promote the cascade at a threshold certified on shadow calls (or,
    /// serving one, on its live calls).
    PromoteCascade { threshold: f64, reason: String },
    /// A serving cascade's live calls were checked and its threshold stays:
    /// recorded, so that the next check looks at later calls only.
    Kept(String),
}

/// The rule: the next step of a task at `stage`, given `seen`.
pub fn decide(stage: Stage, seen: &Observation, config: &AutopilotConfig) -> Decision {
    if let Some(by) = &seen.pinned_by {
        return Decision::Hold(format!("pinned by a promotion by hand ({by}); release it to hand the task back"));
    }
    match stage {
        Stage::Collecting if seen.n_calls_since_training >= config.min_calls => Decision::Move {
            to: Stage::Training,
            reason: format!(
                "{} successful calls, at least the {} to train on",
                seen.n_calls_since_training, config.min_calls
            ),
        },
        Stage::Collecting => Decision::Hold(format!(
            "{} of the {} successful calls needed to train",
            seen.n_calls_since_training, config.min_calls
        )),
        Stage::Training | Stage::Challenger => Decision::Run,
        Stage::Shadow => {
            // Shadow calls are the newest traffic, answered by the understudy
            // beside the lead: when enough of them certify a cascade, that
            // certificate holds for the traffic as it is now, whatever moved
            // since the version's training set. Only a shadow that does not
            // certify gives way to a retrain.
            let certified = seen.shadow.as_ref().is_some_and(|shadow| {
                shadow.n_calls >= config.shadow_calls && shadow.certification.threshold.is_some()
            });
            if !certified {
                if let Some(reason) = retrain_due(seen, config) {
                    return Decision::Move { to: Stage::Challenger, reason };
                }
            }
            match &seen.shadow {
                Some(shadow) if shadow.n_calls >= config.shadow_calls => match shadow.certification.threshold {
                    Some(threshold) => Decision::PromoteCascade {
                        threshold,
                        reason: format!(
                            "cascade threshold {threshold:.4} certified on {} shadow calls (target agreement {}, \
                             delta {}): {} served, {} of them disagreeing",
                            shadow.n_calls,
                            shadow.certification.target_agreement,
                            shadow.certification.delta,
                            shadow.certification.n_served,
                            shadow.certification.n_errors
                        ),
                    },
                    None => Decision::Hold(format!(
                        "{} shadow calls certify no cascade threshold yet{}",
                        shadow.n_calls,
                        shadow
                            .certification
                            .more_calls_needed
                            .map_or(String::new(), |more| format!("; about {more} more would"))
                    )),
                },
                Some(shadow) => {
                    Decision::Hold(format!("{} of {} shadow calls to certify on", shadow.n_calls, config.shadow_calls))
                }
                None => Decision::Hold("waiting for shadow calls".to_string()),
            }
        }
        Stage::Cascade => match retrain_due(seen, config) {
            Some(reason) => Decision::Move { to: Stage::Challenger, reason },
            None => recertify(seen.live.as_ref(), config),
        },
    }
}

/// A serving cascade's threshold against its live calls: a lower one they
/// certify replaces it, once `recertify_calls` sampled calls are in.
fn recertify(live: Option<&LiveEvidence>, config: &AutopilotConfig) -> Decision {
    let Some(live) = live.filter(|_| config.recertify_calls > 0) else {
        return Decision::Hold("serving the cascade".to_string());
    };
    let certification = &live.certification;
    let n_sampled = certification.n_validation;
    if n_sampled < config.recertify_calls {
        return Decision::Hold(format!(
            "serving the cascade at {:.4}; {n_sampled} of the {} sampled live calls to certify it again on",
            live.serving_threshold, config.recertify_calls
        ));
    }
    let sample = format!(
        "{n_sampled} sampled of {} live calls (audits and fallbacks at rate {}; target agreement {}, delta {})",
        live.n_calls, live.audit_rate, certification.target_agreement, certification.delta
    );
    match certification.threshold {
        Some(threshold) if threshold < live.serving_threshold => Decision::PromoteCascade {
            threshold,
            reason: format!(
                "cascade threshold {threshold:.4} (was {:.4}) certified on {sample}: {} served, {} of them disagreeing",
                live.serving_threshold, certification.n_served, certification.n_errors
            ),
        },
        Some(threshold) => Decision::Kept(format!(
            "threshold {:.4} kept: {sample} certify {threshold:.4}, not below it",
            live.serving_threshold
        )),
        None => Decision::Kept(format!(
            "threshold {:.4} kept: {sample} certify none (the guardrail watches the served answers)",
            live.serving_threshold
        )),
    }
}

/// Why a retrain is due, if it is.
fn retrain_due(seen: &Observation, config: &AutopilotConfig) -> Option<String> {
    if let Some(demotion) = &seen.demoted {
        return Some(format!("retrain due: the guardrail demoted the cascade ({demotion})"));
    }
    if !seen.drift.is_empty() {
        return Some(format!("retrain due: drift: {}", seen.drift.join("; ")));
    }
    (seen.n_calls_since_training >= config.retrain_after_calls).then(|| {
        format!(
            "retrain due: {} new calls since the last training (retrain_after_calls {})",
            seen.n_calls_since_training, config.retrain_after_calls
        )
    })
}

/// One side of a challenger's comparison: its answers on the test split (the
/// same rows, in the same order, for both sides) and the threshold its
/// cascade would serve at.
#[derive(Debug, Clone, Copy)]
pub struct Contender<'a> {
    /// Whether each test row's answer agrees with the lead's.
    pub agrees: &'a [bool],
    /// Each test row as the cascade sees it.
    pub scored: &'a [ScoredAnswer],
    pub threshold: Option<f64>,
}

impl Contender<'_> {
    /// Whether its cascade serves each row (never, without a threshold).
    fn served(&self) -> Vec<bool> {
        self.scored
            .iter()
            .map(|answer| self.threshold.is_some_and(|threshold| answer.confidence >= threshold))
            .collect()
    }

    /// Agreement of the rows its cascade serves, if it serves any.
    fn served_agreement(&self) -> Option<f64> {
        let served: Vec<bool> = self
            .served()
            .iter()
            .zip(self.scored)
            .filter(|(served, _)| **served)
            .map(|(_, answer)| answer.agrees)
            .collect();
        (!served.is_empty()).then(|| agreement(&served))
    }
}

/// A challenger against its champion on the same test rows, paired.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// Challenger minus champion: agreement with the lead over every row.
    pub agreement: Estimate,
    /// Challenger minus champion: the share of rows each one's cascade serves.
    pub coverage: Estimate,
    /// The agreement of the rows the challenger's cascade serves.
    pub served_agreement: Option<f64>,
}

/// Whether a challenger may replace its champion, and why.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    NotWorse(String),
    Worse(String),
}

/// The rule for a challenger. It is not worse than its champion when
/// - its agreement over every test row is within `margin` of the champion's
///   (the 95 % interval's lower bound on the difference is above `-margin`), or
/// - as a cascade it serves more: its cascade at its certified threshold
///   serves more test rows than the champion's at the champion's (the lower
///   bound on the difference is above 0), the rows it serves agree at least
///   at `target`, and its agreement is not shown to be worse (the upper bound
///   is at least 0).
///
/// The second clause is what a cascade is for: its certificate keeps served
/// agreement at the target, and coverage is what it saves. Without it, a
/// challenger equal to a champion serving at a cautious threshold is seldom
/// promoted (on a few hundred test rows the agreement interval is about
/// ±0.03 wide), and that threshold is never revisited.
pub fn judge(champion: Contender, challenger: Contender, margin: f64, target: f64, seed: u64) -> (Comparison, Verdict) {
    let paired = |a: &[bool], b: &[bool]| -> Vec<f64> {
        a.iter().zip(b).map(|(a, b)| f64::from(u8::from(*a)) - f64::from(u8::from(*b))).collect()
    };
    let agreement = bootstrap_mean(&paired(challenger.agrees, champion.agrees), DEFAULT_RESAMPLES, 0.95, seed);
    let coverage = bootstrap_mean(&paired(&challenger.served(), &champion.served()), DEFAULT_RESAMPLES, 0.95, seed + 1);
    let served_agreement = challenger.served_agreement();
    let comparison = Comparison { agreement, coverage, served_agreement };
    let (a, c) = (&comparison.agreement, &comparison.coverage);
    let verdict = if a.interval.low >= -margin {
        Verdict::NotWorse(format!("agreement within {margin} of the champion's"))
    } else if challenger.threshold.is_some()
        && c.interval.low > 0.0
        && a.interval.high >= 0.0
        && served_agreement.is_some_and(|served| served >= target)
    {
        Verdict::NotWorse(format!(
            "as a cascade it serves more ({:+.4} [{:+.4}, {:+.4}] of the test calls) at served agreement {:.4}, at \
             least the target {target}, and its agreement is not shown to be worse",
            c.value,
            c.interval.low,
            c.interval.high,
            served_agreement.unwrap_or_default()
        ))
    } else {
        Verdict::Worse(format!(
            "not shown to be within {margin} of the champion (the interval's lower bound is below -{margin}), nor \
             to serve more as a cascade at the target (coverage {:+.4} [{:+.4}, {:+.4}], served agreement {})",
            c.value,
            c.interval.low,
            c.interval.high,
            served_agreement.map_or("-".to_string(), |served| format!("{served:.4}"))
        ))
    };
    (comparison, verdict)
}

/// The autopilot of one process: what it needs, and the drift checks it
/// made (in memory; a restart checks again).
pub struct Autopilot<'a> {
    pub config: &'a Config,
    pub store: &'a Store,
    pub loader: &'a dyn LocalLoader,
    /// Per task: `n_calls_since_training` at the last drift check.
    drift_checked_at: std::collections::HashMap<String, u64>,
    /// The encoder the input-drift test embeds prompts with, if any.
    pub encoder: Option<crate::drift::Encoder<'a>>,
}

impl<'a> Autopilot<'a> {
    pub fn new(config: &'a Config, store: &'a Store, loader: &'a dyn LocalLoader) -> Autopilot<'a> {
        Autopilot { config, store, loader, drift_checked_at: Default::default(), encoder: None }
    }

    /// The tasks the config puts on autopilot.
    pub fn tasks(&self) -> Vec<String> {
        self.config.tasks.iter().filter(|(_, task)| task.autopilot.is_some()).map(|(name, _)| name.clone()).collect()
    }

    /// Moves `task` on as far as it can go now, recording each transition;
    /// returns them, and what it waits for.
    pub async fn tick(&mut self, task: &str) -> Result<(Vec<AutopilotEvent>, String)> {
        let settings = self.config.tasks.get(task).and_then(|task| task.autopilot.clone()).ok_or_else(|| {
            LoopError::NotFound(format!("task `{task}` has no [tasks.{task}.autopilot] in the config"))
        })?;
        let mut events = Vec::new();
        for _ in 0..MAX_STEPS_PER_TICK {
            let (stage, last) = current_stage(self.store, task).await?;
            let seen = self.observe(task, stage, &settings).await?;
            match decide(stage, &seen, &settings) {
                Decision::Hold(reason) => return Ok((events, reason)),
                Decision::Move { to, reason } => {
                    let mut evidence = self.enter(task, to, &seen).await?;
                    if stage == Stage::Cascade && to == Stage::Challenger && seen.drift_new_labels {
                        // The traffic holds answers the champion never
                        // learned, which its certificate cannot cover: the
                        // lead serves (the champion in shadow) until live
                        // shadow calls certify a cascade again. Other drift
                        // (label shares, inputs, confidence) changes the mix
                        // the certificate was computed on; the cascade goes
                        // on serving under the guardrail's live audits, which
                        // demote it if served agreement falls below target.
                        let current = self.store.policy_history(task).await?.into_iter().next();
                        let why = format!("drift, shadow while a challenger trains: {}", seen.drift.join("; "));
                        let change = self.promote(task, "shadow", current.and_then(|c| c.understudy), &why).await?;
                        evidence["shadowed"] = json!(change.id);
                    }
                    events.push(record(self.store, task, stage, to, &reason, evidence).await?);
                }
                Decision::PromoteCascade { threshold, reason } => {
                    let current = self.store.policy_history(task).await?.into_iter().next();
                    let change = self
                        .promote(task, &format!("cascade:{threshold}"), current.and_then(|c| c.understudy), &reason)
                        .await?;
                    let mut evidence =
                        json!({"policy": change.policy, "understudy": change.understudy, "policy_change": change.id});
                    if let Some(live) = &seen.live {
                        evidence["live"] = live_json(live);
                    }
                    events.push(record(self.store, task, stage, Stage::Cascade, &reason, evidence).await?);
                }
                Decision::Kept(reason) => {
                    let evidence = json!({"live": seen.live.as_ref().map(live_json)});
                    events.push(record(self.store, task, stage, stage, &reason, evidence).await?);
                }
                Decision::Run => {
                    let evidence: Value =
                        last.map_or(Value::Null, |event| serde_json::from_str(&event.evidence).unwrap_or(Value::Null));
                    let (to, reason, evidence) = match stage {
                        Stage::Training => self.train_first(task, &settings, &evidence).await,
                        _ => self.challenge(task, &settings, &evidence).await,
                    };
                    events.push(record(self.store, task, stage, to, &reason, evidence).await?);
                }
            }
        }
        Ok((events, "stopped after the most transitions one tick makes".to_string()))
    }

    /// Hands a pinned task back to the autopilot, at the stage its current
    /// policy stands for.
    pub async fn release(&self, task: &str) -> Result<AutopilotEvent> {
        let (stage, _) = current_stage(self.store, task).await?;
        let current = self.store.policy_history(task).await?.into_iter().next();
        let to = stage_of(current.as_ref());
        let evidence = json!({"policy": current.as_ref().map(|c| c.policy.clone())});
        record(
            self.store,
            task,
            stage,
            to,
            &format!("{RELEASED} by hand: the autopilot drives the task again"),
            evidence,
        )
        .await
    }

    async fn observe(&mut self, task: &str, stage: Stage, settings: &AutopilotConfig) -> Result<Observation> {
        let history = self.store.autopilot_history(task).await?;
        let changes = self.store.policy_history(task).await?;
        let current = changes.first();
        let trained_at = history
            .iter()
            .find(|event| matches!(Stage::parse(&event.stage_to), Some(Stage::Training | Stage::Challenger)))
            .map(|event| event.created_at);
        let filter = CallFilter {
            task: Some(task.to_string()),
            status: Some(StatusFilter::Ok),
            since: trained_at,
            ..CallFilter::default()
        };
        let n_calls_since_training = self.store.count_calls(&filter).await?;
        let released_at = history.iter().find(|event| event.reason.starts_with(RELEASED)).map(|event| event.created_at);
        let by_hand =
            |change: &PolicyChange| crate::history::changed_by(change.note.as_deref().unwrap_or("")) == "by hand";
        let pinned_by = current
            .filter(|change| by_hand(change) && released_at.is_none_or(|released| change.created_at > released))
            .map(|change| format!("policy {} at {}", change.policy, change.created_at));
        let last_event_at = history.first().map(|event| event.created_at);
        let demoted = current
            .filter(|change| change.note.as_deref().is_some_and(|note| note.starts_with(GUARDRAIL_NOTE)))
            // At or after the last transition: a clock tick (ms) can hold both.
            .filter(|change| last_event_at.is_none_or(|at| change.created_at >= at))
            .and_then(|change| change.note.clone());
        let shadow = match (stage, current) {
            (Stage::Shadow, Some(change)) if change.policy == Policy::Shadow.name() => {
                Some(self.shadow_evidence(task, change.created_at).await?)
            }
            _ => None,
        };
        let live = match (stage, current.map(|change| (change, Policy::parse(&change.policy, None)))) {
            (Stage::Cascade, Some((change, Ok(Policy::Cascade { threshold }))))
                if settings.recertify_calls > 0 && pinned_by.is_none() && demoted.is_none() =>
            {
                // Calls after the cascade began and after the last check.
                let since = last_event_at.map_or(change.created_at, |at| at.max(change.created_at));
                Some(self.live_evidence(task, threshold, since).await?)
            }
            _ => None,
        };
        let mut drift = Vec::new();
        let mut drift_new_labels = false;
        let checked = self.drift_checked_at.get(task).copied();
        // A window of new calls since the last training, and since the last
        // check (a training resets the count): one test per window of calls.
        let window_passed = n_calls_since_training >= settings.drift_window
            && checked
                .is_none_or(|at| n_calls_since_training >= at + settings.drift_window || n_calls_since_training < at);
        // Watched in shadow too: a challenger shadowed after drift whose
        // shadow calls do not certify a cascade, and that has still not
        // learned what moved, gets a retrain (see `decide`).
        let watched = matches!(stage, Stage::Cascade | Stage::Shadow);
        if settings.drift && watched && pinned_by.is_none() && window_passed {
            let found =
                crate::drift::task_drift(self.store, task, settings.drift_window, settings.drift_alpha, self.encoder)
                    .await?;
            if found.report.input.is_some() || found.report.answers.is_some() || found.report.confidence.is_some() {
                self.drift_checked_at.insert(task.to_string(), n_calls_since_training);
            }
            drift = found.report.reasons();
            drift_new_labels = found.report.answers.as_ref().is_some_and(|answers| answers.new_label_fired);
        }
        Ok(Observation { n_calls_since_training, pinned_by, demoted, shadow, live, drift, drift_new_labels })
    }

    /// What a serving cascade's live calls since `since` certify.
    async fn live_evidence(&self, task: &str, serving_threshold: f64, since: OffsetDateTime) -> Result<LiveEvidence> {
        let filter = CallFilter {
            task: Some(task.to_string()),
            status: Some(StatusFilter::Ok),
            since: Some(since),
            ..CallFilter::default()
        };
        let calls = self.store.list_calls(&filter).await?;
        let task_config = self.config.tasks.get(task);
        let audit_rate = task_config.map_or(0.0, |task| task.audit_rate);
        let sample = live_sample(
            calls.iter().filter_map(|call| call.routing.as_ref().map(|routing| (call.id, routing))),
            audit_rate,
        );
        let target = task_config.map_or(0.98, |task| task.target_agreement);
        let certification = certify_threshold(&sample, target, SHADOW_DELTA)?;
        Ok(LiveEvidence { serving_threshold, audit_rate, n_calls: calls.len() as u64, certification })
    }

    /// The cascade threshold the shadow calls since `since` certify: each
    /// call where the understudy answered with a confidence counts as served
    /// at that confidence, agreeing or not; one it could not answer is never served.
    async fn shadow_evidence(&self, task: &str, since: OffsetDateTime) -> Result<ShadowEvidence> {
        let filter = CallFilter {
            task: Some(task.to_string()),
            status: Some(StatusFilter::Ok),
            since: Some(since),
            ..CallFilter::default()
        };
        let shadow = Policy::Shadow.name();
        let scored: Vec<ScoredAnswer> = self
            .store
            .list_calls(&filter)
            .await?
            .iter()
            .filter_map(|call| call.routing.as_ref())
            .filter(|routing| routing.policy == shadow)
            .map(|routing| match (routing.understudy_confidence, routing.agreement) {
                (Some(confidence), Some(agrees)) if confidence.is_finite() => ScoredAnswer { confidence, agrees },
                _ => ScoredAnswer::never_served(),
            })
            .collect();
        let target = self.config.tasks.get(task).map_or(0.98, |task| task.target_agreement);
        let certification = certify_threshold(&scored, target, SHADOW_DELTA)?;
        Ok(ShadowEvidence { n_calls: scored.len() as u64, certification })
    }

    /// Entering training or a challenger: the dataset it trains on is built
    /// now and named in the transition, so a restart trains on the same rows.
    async fn enter(&self, task: &str, to: Stage, seen: &Observation) -> Result<Value> {
        let settings = self.config.tasks.get(task).and_then(|task| task.autopilot.as_ref());
        let mut options = DatasetOptions::default();
        if let Some(window) = settings.and_then(|settings| settings.train_window) {
            // The window's oldest call bounds the rows: `since` is inclusive.
            let filter = CallFilter {
                task: Some(task.to_string()),
                status: Some(StatusFilter::Ok),
                limit: Some(window),
                order: CallOrder::NewestFirst,
                ..CallFilter::default()
            };
            options.since = self.store.list_calls(&filter).await?.last().map(|call| call.created_at);
        }
        let saved = build_dataset(self.config, self.store, task, &options).await?;
        let champion = self.store.policy_history(task).await?.into_iter().next().and_then(|change| change.understudy);
        Ok(json!({
            "dataset": saved.record.id, "n_train": saved.record.n_train, "n_validation": saved.record.n_validation,
            "n_test": saved.record.n_test, "calls_since_training": seen.n_calls_since_training,
            "champion": if to == Stage::Challenger { champion } else { None }, "drift": seen.drift,
            "new_labels": seen.drift_new_labels,
        }))
    }

    fn train_request(&self, task: &str, settings: &AutopilotConfig, dataset: Option<&str>) -> TrainRequest {
        let mut request = TrainRequest::new(task);
        request.dataset = dataset.map(str::to_string);
        request.base = settings.base.clone();
        request.epochs = settings.epochs;
        request.learning_rate = settings.learning_rate;
        // Same dataset, same folder: a training cut short goes on from its checkpoint.
        request.resume = true;
        request.progress = false;
        request
    }

    /// Training → shadow (or back to collecting when it fails).
    async fn train_first(&self, task: &str, settings: &AutopilotConfig, entered: &Value) -> (Stage, String, Value) {
        let dataset = entered.get("dataset").and_then(Value::as_str);
        let outcome = async {
            let trained = crate::train(self.config, self.store, &self.train_request(task, settings, dataset)).await?;
            let mut request = EvalRequest::new(task);
            request.models = vec![trained.version.id.clone()];
            request.dataset = Some(trained.version.dataset_id.clone());
            let evaluation = evaluate(self.config, self.store, self.loader, &request, &mut |_| {}).await?;
            let result = &evaluation.results[0];
            let reason = format!(
                "trained {} on dataset {}; shadow until {} shadow calls certify a cascade",
                trained.version.id, trained.version.dataset_id, settings.shadow_calls
            );
            let change = self.promote(task, "shadow", Some(trained.version.id.clone()), &reason).await?;
            let evidence = json!({
                "model_version": trained.version.id, "dataset": trained.version.dataset_id,
                "train_seconds": trained.version.wall_seconds, "test_agreement": agreement(&result.agrees),
                "validation_threshold": result.certification.threshold, "policy_change": change.id,
            });
            Ok::<_, LoopError>((Stage::Shadow, reason, evidence))
        }
        .await;
        outcome.unwrap_or_else(|error| {
            (
                Stage::Collecting,
                format!("training failed: {error}"),
                json!({"dataset": dataset, "error": error.to_string()}),
            )
        })
    }

    /// A challenger trained on the newest data against the champion, paired
    /// on the same test rows; promoted only when it is not worse.
    async fn challenge(&self, task: &str, settings: &AutopilotConfig, entered: &Value) -> (Stage, String, Value) {
        let dataset = entered.get("dataset").and_then(Value::as_str);
        let champion = entered.get("champion").and_then(Value::as_str).map(str::to_string);
        let outcome = async {
            let trained = crate::train(self.config, self.store, &self.train_request(task, settings, dataset)).await?;
            let challenger = trained.version.id.clone();
            let mut request = EvalRequest::new(task);
            request.dataset = Some(trained.version.dataset_id.clone());
            request.models = champion.iter().cloned().chain([challenger.clone()]).collect();
            let evaluation = evaluate(self.config, self.store, self.loader, &request, &mut |_| {}).await?;
            let new = evaluation.results.last().ok_or_else(|| LoopError::NotFound("no evaluation".into()))?;
            let old = (evaluation.results.len() == 2).then(|| &evaluation.results[0]);
            // The champion's cascade as it serves now, or, when it is not
            // serving one (shadow, a demotion), at the threshold this
            // evaluation certifies for it on the same validation rows.
            let serving = self.store.policy_history(task).await?.into_iter().next();
            let serving_threshold = serving
                .filter(|change| change.understudy.is_some() && change.understudy == champion)
                .and_then(|change| match Policy::parse(&change.policy, None) {
                    Ok(Policy::Cascade { threshold }) => Some(threshold),
                    _ => None,
                });
            let target = self.config.tasks.get(task).map_or(0.98, |task| task.target_agreement);
            fn contender(result: &crate::evaluate::VersionResult, threshold: Option<f64>) -> Contender<'_> {
                Contender { agrees: &result.agrees, scored: &result.scored, threshold }
            }
            let champion_threshold = old.and_then(|old| serving_threshold.or(old.certification.threshold));
            let judged = old.map(|old| {
                let champion = contender(old, champion_threshold);
                judge(champion, contender(new, new.certification.threshold), settings.challenger_margin, target, 29)
            });
            let not_worse = judged.as_ref().is_none_or(|(_, verdict)| matches!(verdict, Verdict::NotWorse(_)));
            let difference = judged.as_ref().map(|(comparison, _)| &comparison.agreement);
            let mut evidence = json!({
                "challenger": challenger, "champion": champion, "dataset": trained.version.dataset_id,
                "train_seconds": trained.version.wall_seconds,
                "challenger_agreement": agreement(&new.agrees), "champion_agreement": old.map(|old| agreement(&old.agrees)),
                "difference": difference.map(|d| json!({"value": d.value, "ci95": [d.interval.low, d.interval.high]})),
                "margin": settings.challenger_margin, "certified_threshold": new.certification.threshold,
                "champion_threshold": champion_threshold,
                "coverage_difference": judged.as_ref().map(|(c, _)| json!({"value": c.coverage.value, "ci95": [c.coverage.interval.low, c.coverage.interval.high]})),
                "served_agreement": judged.as_ref().and_then(|(c, _)| c.served_agreement),
            });
            let compared = match (difference, &judged) {
                (Some(d), Some((_, Verdict::NotWorse(why) | Verdict::Worse(why)))) => format!(
                    "agreement {:+.4} [{:+.4}, {:+.4}] against {} on {} test calls; {why}",
                    d.value,
                    d.interval.low,
                    d.interval.high,
                    champion.as_deref().unwrap_or("-"),
                    new.n_test
                ),
                _ => "no champion to compare with".to_string(),
            };
            // Entered on new labels (older transitions recorded only the
            // drift's sentences, and any drift counted), or learned labels
            // the champion never had, whatever made the retrain due (a
            // periodic retrain can be the first to see a new label).
            let drift_said = match entered.get("new_labels").and_then(Value::as_bool) {
                Some(new_labels) => new_labels,
                None => entered.get("drift").and_then(Value::as_array).is_some_and(|drift| !drift.is_empty()),
            };
            let learned = match &champion {
                Some(champion) => crate::drift::labels_learned_since(self.store, champion, &challenger).await?,
                None => Vec::new(),
            };
            evidence["labels_learned"] = json!(learned);
            match (not_worse, new.certification.threshold) {
                (true, _) if drift_said || !learned.is_empty() => {
                    // Its validation and test splits are partly older than
                    // the new labels, so they may not certify it (a new label
                    // is rare in them, and its certificate is cautious or
                    // none): live shadow calls, the newest traffic there is,
                    // certify its cascade.
                    let which = if learned.is_empty() {
                        "new labels".to_string()
                    } else {
                        format!("new labels {}", learned.join(", "))
                    };
                    let reason = format!(
                        "challenger {challenger} shadowed until live shadow calls certify its cascade ({which}): {compared}"
                    );
                    let change = self.promote(task, "shadow", Some(challenger.clone()), &reason).await?;
                    evidence["policy_change"] = json!(change.id);
                    Ok::<_, LoopError>((Stage::Shadow, reason, evidence))
                }
                (true, Some(threshold)) => {
                    let reason = format!(
                        "challenger {challenger} promoted at its certified threshold {threshold:.4}: {compared}"
                    );
                    let change = self.promote(task, &format!("cascade:{threshold}"), Some(challenger.clone()), &reason).await?;
                    evidence["policy_change"] = json!(change.id);
                    Ok((Stage::Cascade, reason, evidence))
                }
                (not_worse, _) => {
                    let why = if not_worse { "no cascade threshold certified on validation" } else { "not shown to be as good" };
                    let back = self.serving_stage(task).await?;
                    Ok((back, format!("challenger {challenger} not promoted ({why}): {compared}; the champion stays"), evidence))
                }
            }
        }
        .await;
        match outcome {
            Ok(done) => done,
            Err(error) => {
                let back = self.serving_stage(task).await.unwrap_or(Stage::Cascade);
                (
                    back,
                    format!("challenger training failed: {error}"),
                    json!({"dataset": dataset, "error": error.to_string()}),
                )
            }
        }
    }

    /// The stage the current policy stands for.
    async fn serving_stage(&self, task: &str) -> Result<Stage> {
        Ok(stage_of(self.store.policy_history(task).await?.first()))
    }

    async fn promote(&self, task: &str, policy: &str, model: Option<String>, reason: &str) -> Result<PolicyChange> {
        let (policy, threshold) = match policy.split_once(':') {
            Some(("cascade", threshold)) => ("cascade".to_string(), threshold.parse::<f64>().ok()),
            _ => (policy.to_string(), None),
        };
        let request = PromoteRequest {
            task: task.to_string(),
            policy,
            model,
            threshold,
            note: Some(format!("{AUTOPILOT_NOTE} {reason}")),
        };
        Ok(promote(self.config, self.store, &request).await?.change)
    }
}

fn live_json(live: &LiveEvidence) -> Value {
    let certification = &live.certification;
    json!({
        "serving_threshold": live.serving_threshold, "audit_rate": live.audit_rate, "n_calls": live.n_calls,
        "n_sampled": certification.n_validation, "certified_threshold": certification.threshold,
        "n_served": certification.n_served, "n_errors": certification.n_errors,
    })
}

fn agreement(agrees: &[bool]) -> f64 {
    agrees.iter().filter(|agrees| **agrees).count() as f64 / agrees.len().max(1) as f64
}

/// The stage a policy change stands for: a cascade, a shadow, or (lead,
/// canary, understudy, nothing) collecting.
fn stage_of(change: Option<&PolicyChange>) -> Stage {
    match change.and_then(|change| Policy::parse(&change.policy, None).ok()) {
        Some(Policy::Cascade { .. }) => Stage::Cascade,
        Some(Policy::Shadow) => Stage::Shadow,
        _ => Stage::Collecting,
    }
}

/// A task's stage: its newest transition's, or collecting.
pub async fn current_stage(store: &Store, task: &str) -> Result<(Stage, Option<AutopilotEvent>)> {
    let last = store.autopilot_history(task).await?.into_iter().next();
    let stage = last.as_ref().and_then(|event| Stage::parse(&event.stage_to)).unwrap_or(Stage::Collecting);
    Ok((stage, last))
}

async fn record(
    store: &Store,
    task: &str,
    from: Stage,
    to: Stage,
    reason: &str,
    evidence: Value,
) -> Result<AutopilotEvent> {
    let event = AutopilotEvent {
        id: Uuid::now_v7().to_string(),
        task: task.to_string(),
        created_at: OffsetDateTime::now_utc(),
        stage_from: from.as_str().to_string(),
        stage_to: to.as_str().to_string(),
        reason: reason.to_string(),
        evidence: evidence.to_string(),
    };
    store.insert_autopilot_event(&event).await?;
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AutopilotConfig {
        AutopilotConfig {
            min_calls: 100,
            shadow_calls: 50,
            recertify_calls: 100,
            retrain_after_calls: 1000,
            base: None,
            epochs: None,
            learning_rate: None,
            challenger_margin: 0.01,
            drift: true,
            drift_alpha: 0.01,
            drift_window: 200,
            train_window: None,
        }
    }

    fn certification(threshold: Option<f64>) -> Certification {
        // 60 shadow calls, all agreeing at confidence 0.9: certifies 0.9 at a low target.
        let agreeing = vec![ScoredAnswer { confidence: 0.9, agrees: true }; 60];
        let mut certification = certify_threshold(&agreeing, 0.9, 0.05).expect("certify");
        if threshold.is_none() {
            certification = certify_threshold(&[ScoredAnswer::never_served(); 60], 0.9, 0.05).expect("certify");
        }
        certification
    }

    #[test]
    fn collecting_waits_for_enough_calls_then_trains() {
        let seen = Observation { n_calls_since_training: 99, ..Observation::default() };
        assert!(
            matches!(decide(Stage::Collecting, &seen, &settings()), Decision::Hold(reason) if reason.contains("99 of the 100"))
        );
        let seen = Observation { n_calls_since_training: 100, ..Observation::default() };
        assert!(matches!(decide(Stage::Collecting, &seen, &settings()), Decision::Move { to: Stage::Training, .. }));
        // Training and a challenger are work, resumed at every tick until done.
        assert_eq!(decide(Stage::Training, &seen, &settings()), Decision::Run);
        assert_eq!(decide(Stage::Challenger, &seen, &settings()), Decision::Run);
    }

    #[test]
    fn shadow_promotes_the_cascade_only_when_enough_shadow_calls_certify_it() {
        let shadow = |n_calls, threshold| Observation {
            shadow: Some(ShadowEvidence { n_calls, certification: certification(threshold) }),
            ..Observation::default()
        };
        assert!(
            matches!(decide(Stage::Shadow, &shadow(40, Some(0.9)), &settings()), Decision::Hold(r) if r.contains("40 of 50"))
        );
        match decide(Stage::Shadow, &shadow(60, Some(0.9)), &settings()) {
            Decision::PromoteCascade { threshold, reason } => {
                assert!((threshold - 0.9).abs() < 1e-12);
                assert!(reason.contains("certified on 60 shadow calls"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(decide(Stage::Shadow, &shadow(60, None), &settings()), Decision::Hold(r) if r.contains("certify no"))
        );
        // Drift since the version's training set: shadow calls that certify
        // a cascade promote it (they are the traffic as it is now); a shadow
        // that does not certify, or has too few calls yet, gives way to a retrain.
        let drifted = |n_calls, threshold| Observation {
            drift: vec!["label shares shifted".into()],
            ..shadow(n_calls, threshold)
        };
        assert!(matches!(decide(Stage::Shadow, &drifted(60, Some(0.9)), &settings()), Decision::PromoteCascade { .. }));
        for (n_calls, threshold) in [(60, None), (40, Some(0.9))] {
            match decide(Stage::Shadow, &drifted(n_calls, threshold), &settings()) {
                Decision::Move { to: Stage::Challenger, reason } => assert!(reason.contains("drift"), "{reason}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_retrain_is_due_on_new_calls_drift_or_a_demotion_and_a_pin_holds_everything() {
        let serving = Observation { n_calls_since_training: 10, ..Observation::default() };
        assert!(matches!(decide(Stage::Cascade, &serving, &settings()), Decision::Hold(_)));
        let cases = [
            (Observation { n_calls_since_training: 1000, ..Observation::default() }, "1000 new calls"),
            (Observation { drift: vec!["a new label".into()], ..Observation::default() }, "drift: a new label"),
            (Observation { demoted: Some("guardrail: low".into()), ..Observation::default() }, "guardrail demoted"),
        ];
        for (seen, why) in cases {
            match decide(Stage::Cascade, &seen, &settings()) {
                Decision::Move { to: Stage::Challenger, reason } => assert!(reason.contains(why), "{reason}"),
                other => panic!("{other:?}"),
            }
            let pinned = Observation { pinned_by: Some("policy lead".into()), ..seen };
            assert!(matches!(decide(Stage::Cascade, &pinned, &settings()), Decision::Hold(r) if r.contains("pinned")));
        }
    }

    /// A live call under `cascade:threshold`: served when its confidence
    /// reaches the threshold, audited when `audited`; the lead's answer
    /// agrees with the understudy's when `agrees`.
    fn live_call(threshold: f64, confidence: f64, agrees: bool, audited: bool) -> Routing {
        let served = confidence >= threshold;
        Routing {
            policy: format!("cascade:{threshold}"),
            served_by: if served { ServedBy::Understudy } else { ServedBy::Lead },
            fallback_reason: (!served).then(|| "low_confidence".to_string()),
            understudy_confidence: Some(confidence),
            agreement: (!served).then_some(agrees),
            audit_agreement: (served && audited).then_some(agrees),
            ..Routing::default()
        }
    }

    #[test]
    fn the_live_sample_takes_audits_and_fallbacks_at_the_same_rate() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let rate = 0.2;
        let calls: Vec<(Uuid, Routing)> = (0..20_000)
            .map(|_| {
                let confidence: f64 = rng.gen();
                let audited = rng.gen::<f64>() < rate;
                (Uuid::now_v7(), live_call(0.7, confidence, true, audited))
            })
            .collect();
        let sample = live_sample(calls.iter().map(|(id, routing)| (*id, routing)), rate);
        // Below the threshold (fallbacks) and above it (audits), each about
        // `rate` of the calls: 0.2 of 14,000 and of 6,000.
        let below = sample.iter().filter(|answer| answer.confidence < 0.7).count() as f64 / 14_000.0;
        let above = sample.iter().filter(|answer| answer.confidence >= 0.7).count() as f64 / 6_000.0;
        assert!((below - rate).abs() < 0.015 && (above - rate).abs() < 0.02, "{below} {above}");
        // Ids made one after another in the same millisecond are drawn
        // independently (a UUIDv7's counter does not make runs of them).
        let draws: Vec<bool> = calls.iter().map(|(id, _)| sampled_fallback(*id, 0.5)).collect();
        let repeats = draws.windows(2).filter(|pair| pair[0] == pair[1]).count() as f64 / 19_999.0;
        assert!((repeats - 0.5).abs() < 0.02, "{repeats}");
        // Not under a cascade, or an audit the lead did not answer: left out.
        let shadow = Routing { policy: "shadow".into(), ..live_call(0.7, 0.9, true, true) };
        let unanswered = live_call(0.7, 0.9, true, false);
        assert!(live_sample([(Uuid::now_v7(), &shadow), (Uuid::now_v7(), &unanswered)], 1.0).is_empty());
        // A fallback whose understudy failed is in it, never served.
        let failed = Routing { understudy_confidence: None, agreement: None, ..live_call(0.7, 0.1, true, false) };
        let sample = live_sample([(Uuid::now_v7(), &failed)], 1.0);
        assert!(sample.len() == 1 && sample[0].confidence.is_nan());
    }

    fn live(serving_threshold: f64, sample: &[ScoredAnswer]) -> Observation {
        Observation {
            live: Some(LiveEvidence {
                serving_threshold,
                audit_rate: 0.2,
                n_calls: sample.len() as u64 * 5,
                certification: certify_threshold(sample, 0.9, 0.05).expect("certify"),
            }),
            ..Observation::default()
        }
    }

    #[test]
    fn a_serving_cascade_takes_a_lower_threshold_its_live_calls_certify() {
        // 100 sampled calls agreeing at confidence 0.6 certify 0.6 at 0.9.
        let agreeing = vec![ScoredAnswer { confidence: 0.6, agrees: true }; 100];
        match decide(Stage::Cascade, &live(0.95, &agreeing), &settings()) {
            Decision::PromoteCascade { threshold, reason } => {
                assert!((threshold - 0.6).abs() < 1e-12);
                assert!(reason.contains("(was 0.9500)") && reason.contains("100 sampled of 500"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // Not below the serving threshold, or nothing certified: kept (and
        // recorded, so the next check looks at later calls).
        assert!(
            matches!(decide(Stage::Cascade, &live(0.5, &agreeing), &settings()), Decision::Kept(r) if r.contains("not below"))
        );
        let never = vec![ScoredAnswer::never_served(); 100];
        assert!(
            matches!(decide(Stage::Cascade, &live(0.95, &never), &settings()), Decision::Kept(r) if r.contains("none"))
        );
        // Too few sampled calls yet; a retrain due comes first; off at 0.
        assert!(matches!(
            decide(Stage::Cascade, &live(0.95, &agreeing[..99]), &settings()),
            Decision::Hold(r) if r.contains("99 of the 100 sampled")
        ));
        let due = Observation { n_calls_since_training: 1000, ..live(0.95, &agreeing) };
        assert!(matches!(decide(Stage::Cascade, &due, &settings()), Decision::Move { to: Stage::Challenger, .. }));
        let off = AutopilotConfig { recertify_calls: 0, ..settings() };
        assert!(matches!(decide(Stage::Cascade, &live(0.95, &agreeing), &off), Decision::Hold(_)));
    }

    /// The simulated understudy: confidence ~ U(0, 1), agreeing with
    /// probability 1 - 0.9 (1 - c)^2, so the agreement served at `t` is
    /// 1 - 0.3 (1 - t)^2 (0.9 at t = 0.42: the oracle serves 58 %).
    fn true_served_agreement(threshold: f64) -> f64 {
        1.0 - 0.3 * (1.0 - threshold).powi(2)
    }

    #[test]
    fn simulation_a_threshold_certified_on_live_calls_keeps_the_target() {
        use rand::{Rng, SeedableRng};
        const DRAWS: usize = 400;
        const TARGET: f64 = 0.9;
        const RATE: f64 = 0.2;
        // Served at a cautious 0.9 (10 % coverage); the oracle at 0.42 (58 %).
        const SERVING: f64 = 0.9;
        let config = AutopilotConfig { recertify_calls: 300, ..settings() };
        let mut rng = rand::rngs::StdRng::seed_from_u64(20_261_202);
        let (mut kept_promise, mut naive_kept_promise, mut coverage) = (0, 0, 0.0);
        for _ in 0..DRAWS {
            // Live traffic until `recertify_calls` are sampled.
            let mut calls = Vec::new();
            while live_sample(calls.iter().map(|(id, routing)| (*id, routing)), RATE).len() < 300 {
                for _ in 0..100 {
                    let confidence: f64 = rng.gen();
                    let agrees = rng.gen::<f64>() >= 0.9 * (1.0 - confidence).powi(2);
                    let audited = rng.gen::<f64>() < RATE;
                    calls.push((Uuid::from_u128(rng.gen()), live_call(SERVING, confidence, agrees, audited)));
                }
            }
            let sample = live_sample(calls.iter().map(|(id, routing)| (*id, routing)), RATE);
            let observed = Observation {
                live: Some(LiveEvidence {
                    serving_threshold: SERVING,
                    audit_rate: RATE,
                    n_calls: calls.len() as u64,
                    certification: certify_threshold(&sample, TARGET, SHADOW_DELTA).expect("certify"),
                }),
                ..Observation::default()
            };
            let serving = match decide(Stage::Cascade, &observed, &config) {
                Decision::PromoteCascade { threshold, .. } => threshold,
                Decision::Kept(_) => SERVING,
                other => panic!("{other:?}"),
            };
            kept_promise += usize::from(true_served_agreement(serving) >= TARGET);
            coverage += 1.0 - serving;
            // The point rule on the same sample: the lowest threshold whose
            // sampled agreement reaches the target.
            let naive = understudy_eval::choose_threshold(&sample, TARGET).unwrap_or(SERVING).min(SERVING);
            naive_kept_promise += usize::from(true_served_agreement(naive) >= TARGET);
        }
        let share = kept_promise as f64 / DRAWS as f64;
        let naive_share = naive_kept_promise as f64 / DRAWS as f64;
        let coverage = coverage / DRAWS as f64;
        eprintln!("live re-certification keeps the target in {share:.3} of draws (mean coverage {coverage:.3}, from 0.1); the point rule in {naive_share:.3}");
        // The promise (1 - delta = 0.95), less the Monte Carlo error (0.011 at 400 draws).
        assert!(share >= 1.0 - SHADOW_DELTA - 0.025, "{share}");
        // The same draws are hard enough that a rule without the guarantee fails them.
        assert!(naive_share < 0.8, "{naive_share}");
        // And it recovers coverage from a cautious threshold.
        assert!(coverage > 0.3, "{coverage}");
    }

    /// 240 test rows: `agree_rate` of each model's answers agree (which rows
    /// differs between the two by `seed`), with confidences spread so that a
    /// threshold at `t` serves about `1 - t` of the rows, the agreeing ones
    /// higher.
    fn rows(agree_rate: f64, seed: u64) -> (Vec<bool>, Vec<ScoredAnswer>) {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let mut next = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut agrees = Vec::new();
        let mut scored = Vec::new();
        for _ in 0..240 {
            let agree = next() < agree_rate;
            let confidence = if agree { next() } else { 0.8 * next() };
            agrees.push(agree);
            scored.push(ScoredAnswer { confidence, agrees: agree });
        }
        (agrees, scored)
    }

    fn contender<'a>(rows: &'a (Vec<bool>, Vec<ScoredAnswer>), threshold: Option<f64>) -> Contender<'a> {
        Contender { agrees: &rows.0, scored: &rows.1, threshold }
    }

    #[test]
    fn a_challenger_is_not_worse_when_its_agreement_is_within_the_margin_or_its_cascade_serves_more() {
        let champion = rows(0.92, 1);
        // The same answers: the difference is exactly 0.
        let (comparison, verdict) =
            judge(contender(&champion, Some(0.9)), contender(&champion, Some(0.9)), 0.01, 0.9, 29);
        assert!(matches!(&verdict, Verdict::NotWorse(why) if why.contains("agreement within")), "{verdict:?}");
        assert_eq!(comparison.agreement.value, 0.0);

        // As good, on other rows: the agreement interval is too wide for the
        // margin. At the same threshold it does not serve more: worse.
        let challenger = rows(0.93, 2);
        let (comparison, verdict) =
            judge(contender(&champion, Some(0.9)), contender(&challenger, Some(0.9)), 0.01, 0.9, 29);
        assert!(comparison.agreement.interval.low < -0.01, "{comparison:?}");
        assert!(matches!(verdict, Verdict::Worse(_)), "{verdict:?}");
        // The champion serves at a cautious threshold, the challenger at a
        // lower one that keeps the target on test: it serves more, so it is
        // promoted. Above the target only: the champion stays.
        let (comparison, verdict) =
            judge(contender(&champion, Some(0.96)), contender(&challenger, Some(0.7)), 0.01, 0.9, 29);
        assert!(comparison.coverage.interval.low > 0.0, "{comparison:?}");
        assert!(matches!(&verdict, Verdict::NotWorse(why) if why.contains("serves more")), "{verdict:?}");
        let (_, verdict) = judge(contender(&champion, Some(0.96)), contender(&challenger, Some(0.0)), 0.01, 0.97, 29);
        assert!(matches!(verdict, Verdict::Worse(_)), "served agreement below the target: {verdict:?}");
        // Serving more does not excuse a model shown to agree less.
        let worse = rows(0.75, 3);
        let (comparison, verdict) =
            judge(contender(&champion, Some(0.96)), contender(&worse, Some(0.8)), 0.01, 0.7, 29);
        assert!(comparison.agreement.interval.high < 0.0 && comparison.coverage.interval.low > 0.0, "{comparison:?}");
        assert!(matches!(verdict, Verdict::Worse(_)), "{verdict:?}");
        // Without a certified threshold its cascade serves nothing.
        let (comparison, verdict) =
            judge(contender(&champion, Some(0.96)), contender(&challenger, None), 0.01, 0.9, 29);
        assert_eq!(comparison.served_agreement, None);
        assert!(matches!(verdict, Verdict::Worse(_)), "{verdict:?}");
    }

    #[test]
    fn stages_round_trip_through_their_names() {
        for stage in [Stage::Collecting, Stage::Training, Stage::Shadow, Stage::Cascade, Stage::Challenger] {
            assert_eq!(Stage::parse(stage.as_str()), Some(stage));
        }
        assert_eq!(Stage::parse("flying"), None);
    }
}
