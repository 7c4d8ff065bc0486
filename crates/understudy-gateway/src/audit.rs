//! Live audits and the guardrail: the promise, watched.
//!
//! In canary, cascade and understudy modes, a share of the calls the
//! understudy serves (`[tasks.NAME] audit_rate`) is also sent to the lead in
//! the background. The lead's answer is recorded beside the served one and
//! never served; its cost is the call's too. Each audit feeds the task's
//! [`Guardrail`]: a mixture sequential probability ratio test
//! (`understudy_eval::sequential`) on the audited agreement, valid however
//! often it is looked at. When the live agreement is confidently below the
//! task's `target_agreement`, the task is demoted to shadow at once (no
//! restart), the demotion is written as a policy change with its evidence,
//! and it stays until someone promotes again after a new certification.
//!
//! The tally belongs to one route: a promotion starts a new one. After a
//! restart it starts from the audits the store holds since the promotion.
//!
//! A second, faster trip for understudies that answer with labels only (a
//! classifier): when the lead's answers on the calls it sees (fallbacks and
//! audits) hold [`UNLEARNED_TRIP`] answers that are none of the understudy's
//! labels, the traffic holds a label it never learned. It can never agree on
//! those calls, and its certificate was computed on traffic without them, so
//! the task is demoted to shadow at once, as the autopilot does at its drift
//! checks. Fallbacks show the lead's answer on every call the understudy does
//! not serve, so this fires within a few calls of a new label's onset, long
//! before audits of a 20 % sample give the sequential test its evidence.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use understudy_eval::sequential::AuditTally;
use understudy_providers::{AnyProvider, ChatRequest, CostModel};
use understudy_router::Policy;
use understudy_store::PolicyChange;
use understudy_types::{answers_agree, normalize_answer, Money, OffsetDateTime, Routing, Uuid};

use crate::routing::TaskRoute;
use crate::AppState;

/// The audits of one route, and whether its guardrail has fired.
#[derive(Debug, Default)]
pub(crate) struct Guardrail {
    tally: Mutex<AuditTally>,
    tripped: AtomicBool,
    /// The lead's answers (normalized) that are none of the understudy's labels.
    unlearned: Mutex<Vec<String>>,
}

/// Lead answers outside the understudy's labels that demote the task: two,
/// so that one stray answer does not.
pub(crate) const UNLEARNED_TRIP: usize = 2;

/// Whether the lead's `answer` is one an understudy answering with `labels`
/// can never give. When the task lists its labels, only an answer among them
/// counts: one outside them is the lead's own slip, not a new label.
pub(crate) fn is_unlearned_label(answer: &str, labels: &[String], task_labels: Option<&[String]>) -> bool {
    let among = |labels: &[String]| labels.iter().any(|label| answers_agree(label, answer));
    !answer.trim().is_empty() && !among(labels) && task_labels.is_none_or(among)
}

impl Guardrail {
    /// A guardrail that starts from audits already recorded.
    pub fn with_counts(n_audited: u64, n_agreed: u64) -> Guardrail {
        Guardrail {
            tally: Mutex::new(AuditTally { n_audited, n_agreed: n_agreed.min(n_audited) }),
            tripped: AtomicBool::new(false),
            unlearned: Mutex::default(),
        }
    }

    fn tally(&self) -> AuditTally {
        match self.tally.lock() {
            Ok(tally) => *tally,
            Err(poisoned) => *poisoned.into_inner(),
        }
    }

    /// The live quality figure: audited agreement with its anytime-valid
    /// interval, for `/healthz`.
    pub fn summary(&self, target: f64, delta: f64) -> Value {
        let tally = self.tally();
        let (lower, upper) = tally.confidence_sequence(delta);
        let verdict = tally.verdict(target, delta).ok();
        json!({
            "n_audited": tally.n_audited,
            "n_agreed": tally.n_agreed,
            "agreement": (tally.n_audited > 0).then(|| tally.n_agreed as f64 / tally.n_audited as f64),
            "interval": [lower, upper],
            "confidence": 1.0 - delta,
            "target": target,
            "log_evidence_below_target": verdict.map(|verdict| verdict.log_evidence),
            "tripped": self.tripped.load(Ordering::Relaxed),
        })
    }
}

/// The lead's answer to an audited call.
pub(crate) struct AuditAnswer {
    pub answer: Option<String>,
    pub cost: Money,
}

/// Asks the lead the call the understudy served, non-streamed. A lead that
/// fails leaves the audit without an answer (and without agreement).
pub(crate) async fn ask_lead(
    provider: &AnyProvider,
    cost: CostModel,
    mut request: ChatRequest,
) -> Result<AuditAnswer, understudy_providers::ProviderError> {
    request.body.remove("stream");
    request.body.remove("stream_options");
    let started = std::time::Instant::now();
    let response = provider.infer(request).await?;
    let answer = serde_json::from_slice::<Value>(&response.body).ok().and_then(|completion| {
        completion.pointer("/choices/0/message/content").and_then(Value::as_str).map(str::to_string)
    });
    Ok(AuditAnswer { answer, cost: cost.cost(response.usage, started.elapsed()) })
}

/// Puts an audit's outcome into a served call's routing.
pub(crate) fn apply_audit(routing: &mut Routing, audit: &AuditAnswer) {
    routing.audit_answer = audit.answer.clone();
    routing.audit_agreement = match (&routing.understudy_answer, &audit.answer) {
        (Some(served), Some(lead)) => Some(answers_agree(served, lead)),
        _ => None,
    };
    routing.audit_cost = audit.cost;
}

impl AppState {
    /// Whether a call the understudy served is audited.
    pub(crate) fn should_audit(&self, task: &str) -> bool {
        let rate = self.config().tasks.get(task).map_or(0.0, |task| task.audit_rate);
        rate > 0.0 && rand::random::<f64>() < rate
    }

    /// Counts one audit on the route it was made under, and demotes the task
    /// when the guardrail fires.
    pub(crate) async fn count_audit(&self, task: &str, route: &Arc<TaskRoute>, agreed: bool) {
        let Some(task_config) = self.config().tasks.get(task) else { return };
        let tally = {
            let mut tally = match route.guardrail.tally.lock() {
                Ok(tally) => tally,
                Err(poisoned) => poisoned.into_inner(),
            };
            tally.update(agreed);
            *tally
        };
        let verdict = match tally.verdict(task_config.target_agreement, task_config.guardrail_delta) {
            Ok(verdict) => verdict,
            Err(error) => {
                tracing::error!(%error, task, "the guardrail cannot judge this task's audits");
                return;
            }
        };
        if verdict.alarm && !route.guardrail.tripped.swap(true, Ordering::SeqCst) {
            let (lower, upper) = tally.confidence_sequence(task_config.guardrail_delta);
            let evidence = format!(
                "guardrail: audited agreement {} of {} ({:.1} %, {:.0} % confidence sequence [{:.3}, {:.3}]) is \
                 confidently below the target {:.3} (log evidence {:.2} >= {:.2}); demoted from {} to shadow \
                 until a new certification",
                tally.n_agreed,
                tally.n_audited,
                100.0 * tally.n_agreed as f64 / tally.n_audited.max(1) as f64,
                100.0 * (1.0 - task_config.guardrail_delta),
                lower,
                upper,
                task_config.target_agreement,
                verdict.log_evidence,
                verdict.log_threshold,
                route.policy.name(),
            );
            self.demote(task, route, evidence).await;
        }
    }

    /// Counts an answer of the lead's on a call the understudy of `route` was
    /// asked (a fallback or an audit), and demotes the task when
    /// [`UNLEARNED_TRIP`] of them are labels the understudy cannot give.
    pub(crate) async fn count_lead_answer(&self, task: &str, route: &Arc<TaskRoute>, answer: &str) {
        if matches!(route.policy, Policy::Lead | Policy::Shadow) {
            return;
        }
        let (Some(labels), Some(task_config)) = (&route.labels, self.config().tasks.get(task)) else { return };
        if !is_unlearned_label(answer, labels, task_config.labels.as_deref()) {
            return;
        }
        let unlearned = {
            let mut unlearned = match route.guardrail.unlearned.lock() {
                Ok(unlearned) => unlearned,
                Err(poisoned) => poisoned.into_inner(),
            };
            unlearned.push(normalize_answer(answer));
            unlearned.clone()
        };
        if unlearned.len() >= UNLEARNED_TRIP && !route.guardrail.tripped.swap(true, Ordering::SeqCst) {
            let mut distinct = unlearned.clone();
            distinct.sort();
            distinct.dedup();
            let evidence = format!(
                "guardrail: the lead answered {} calls with labels {} cannot give ({}): its certificate does not \
                 cover them; demoted from {} to shadow until a new certification",
                unlearned.len(),
                route.understudy.as_ref().map_or("the understudy", |understudy| understudy.name.as_str()),
                distinct.join(", "),
                route.policy.name(),
            );
            self.demote(task, route, evidence).await;
        }
    }

    /// Moves a task to shadow (same understudy) at once, and records why.
    async fn demote(&self, task: &str, route: &Arc<TaskRoute>, evidence: String) {
        tracing::error!(task, %evidence, "understudy demoted");
        let change = PolicyChange {
            id: Uuid::now_v7().to_string(),
            task: task.to_string(),
            policy: Policy::Shadow.name(),
            understudy: route.understudy.as_ref().map(|understudy| understudy.name.clone()),
            understudy_path: route.understudy_path.clone(),
            created_at: OffsetDateTime::now_utc(),
            note: Some(evidence.clone()),
        };
        // If the store cannot take the change, the route still changes here;
        // keeping the old change id stops the policy watcher from undoing it.
        let change_id = match self.recorder().store().insert_policy_change(&change).await {
            Ok(()) => Some(change.id.clone()),
            Err(error) => {
                tracing::error!(%error, task, "the demotion could not be written to the store");
                route.change_id.clone()
            }
        };
        self.set_route(
            task,
            TaskRoute {
                policy: Policy::Shadow,
                understudy: route.understudy.clone(),
                understudy_path: route.understudy_path.clone(),
                change_id,
                guardrail: Arc::new(Guardrail::default()),
                demotion: Some(evidence),
                labels: route.labels.clone(),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| name.to_string()).collect()
    }

    #[test]
    fn a_lead_answer_is_an_unlearned_label_when_it_is_none_of_the_understudys() {
        let learned = labels(&["ABBR", "DESC", "ENTY", "HUM", "LOC"]);
        assert!(is_unlearned_label("NUM", &learned, None));
        // Answers agree as `answers_agree` says (case, surrounding space).
        assert!(!is_unlearned_label(" loc ", &learned, None));
        assert!(!is_unlearned_label("", &learned, None));
        // With the task's labels listed, only one of them is a new label; an
        // answer outside them is the lead's slip.
        let task = labels(&["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]);
        assert!(is_unlearned_label("num", &learned, Some(&task)));
        assert!(!is_unlearned_label("I cannot tell", &learned, Some(&task)));
    }
}
