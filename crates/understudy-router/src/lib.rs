//! Routing policies as pure functions: which model serves a task's call, and
//! when the lead takes over. No IO: the gateway supplies the random draw, the
//! understudy's outcome and its confidence, and acts on the decision.

/// A task's routing policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Policy {
    /// The lead serves every call.
    Lead,
    /// The lead serves; the understudy answers in the background to be scored.
    Shadow,
    /// The understudy serves this share of calls (0..=100 per cent).
    Canary { percent: f64 },
    /// The understudy serves when its confidence is at least the threshold.
    Cascade { threshold: f64 },
    /// The understudy serves every call.
    Understudy,
}

/// Why a policy's text does not parse.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    #[error("`{name}` needs {what}, as `{name}:VALUE`")]
    MissingArgument { name: String, what: &'static str },
    #[error("`{0}` is not a number")]
    NotANumber(String),
    #[error("a canary share must be between 0 and 100, not {0}")]
    CanaryShare(f64),
    #[error("`cascade` needs a calibrated threshold (run eval) or `cascade:THRESHOLD`")]
    Uncalibrated,
    #[error("a cascade threshold must be between 0 and 1, not {0}")]
    CascadeThreshold(f64),
    #[error("unknown policy `{0}` (known: lead, shadow, canary:PCT, cascade[:THRESHOLD], understudy)")]
    Unknown(String),
}

impl Policy {
    /// Parses `lead`, `shadow`, `canary:PCT`, `cascade`, `cascade:THRESHOLD` or
    /// `understudy`. A bare `cascade` takes `calibrated` (the threshold chosen
    /// on validation data), and fails without one.
    pub fn parse(text: &str, calibrated: Option<f64>) -> Result<Policy, PolicyError> {
        let (name, argument) = match text.split_once(':') {
            Some((name, argument)) => (name, Some(argument)),
            None => (text, None),
        };
        let number = |what: &'static str| -> Result<f64, PolicyError> {
            let argument = argument.ok_or_else(|| PolicyError::MissingArgument { name: name.to_string(), what })?;
            argument.parse::<f64>().map_err(|_| PolicyError::NotANumber(argument.to_string()))
        };
        match (name, argument) {
            ("lead", None) => Ok(Policy::Lead),
            ("shadow", None) => Ok(Policy::Shadow),
            ("understudy", None) => Ok(Policy::Understudy),
            ("canary", _) => {
                let percent = number("a percentage")?;
                if !(0.0..=100.0).contains(&percent) {
                    return Err(PolicyError::CanaryShare(percent));
                }
                Ok(Policy::Canary { percent })
            }
            ("cascade", None) => {
                calibrated.map(|threshold| Policy::Cascade { threshold }).ok_or(PolicyError::Uncalibrated)
            }
            ("cascade", Some(_)) => {
                let threshold = number("a threshold")?;
                if !(0.0..=1.0).contains(&threshold) {
                    return Err(PolicyError::CascadeThreshold(threshold));
                }
                Ok(Policy::Cascade { threshold })
            }
            _ => Err(PolicyError::Unknown(text.to_string())),
        }
    }

    pub fn name(&self) -> String {
        match self {
            Policy::Lead => "lead".into(),
            Policy::Shadow => "shadow".into(),
            Policy::Canary { percent } => format!("canary:{percent}"),
            Policy::Cascade { threshold } => format!("cascade:{threshold}"),
            Policy::Understudy => "understudy".into(),
        }
    }
}

/// What to do first with a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstStep {
    /// Ask the lead; the understudy is not involved.
    Lead,
    /// Ask the lead and serve its answer; also ask the understudy, off the response path.
    LeadWithShadow,
    /// Ask the understudy; `judge` says whether its answer may be served.
    Understudy,
}

/// The first step for a call. `draw` is a uniform number in [0, 1) for this call.
pub fn first_step(policy: Policy, draw: f64) -> FirstStep {
    match policy {
        Policy::Lead => FirstStep::Lead,
        Policy::Shadow => FirstStep::LeadWithShadow,
        Policy::Canary { percent } if draw * 100.0 < percent => FirstStep::Understudy,
        Policy::Canary { .. } => FirstStep::Lead,
        Policy::Cascade { .. } | Policy::Understudy => FirstStep::Understudy,
    }
}

/// How the understudy's attempt went.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Attempt {
    Answered { confidence: Option<f64>, valid: bool },
    Failed,
    TimedOut,
}

/// Who serves after the understudy's attempt, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    ServeUnderstudy,
    FallBack(FallbackReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallbackReason {
    UnderstudyError,
    UnderstudyTimeout,
    InvalidAnswer,
    LowConfidence,
    /// The call holds what the understudy cannot be asked (a Responses call
    /// with images, files or tools): the lead serves it without an attempt.
    UnsupportedInput,
    /// The call uses the lead's stored state (a Responses call with
    /// `previous_response_id`, or `store: true`): only the lead can serve it.
    Stateful,
}

impl FallbackReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FallbackReason::UnderstudyError => "understudy_error",
            FallbackReason::UnderstudyTimeout => "understudy_timeout",
            FallbackReason::InvalidAnswer => "invalid_answer",
            FallbackReason::LowConfidence => "low_confidence",
            FallbackReason::UnsupportedInput => "unsupported_input",
            FallbackReason::Stateful => "stateful",
        }
    }
}

/// Whether the understudy's answer is served. In every policy an error, a
/// timeout or an invalid answer falls back to the lead; a cascade also falls
/// back below its threshold (and when no confidence came with the answer).
pub fn judge(policy: Policy, attempt: Attempt) -> Verdict {
    match (policy, cascade_confidence(attempt)) {
        (Policy::Cascade { threshold }, Ok(confidence)) if confidence < threshold => {
            Verdict::FallBack(FallbackReason::LowConfidence)
        }
        (_, Ok(_)) => Verdict::ServeUnderstudy,
        (Policy::Cascade { .. }, Err(reason)) => Verdict::FallBack(reason),
        // Only a cascade needs a confidence; the others serve a valid answer without one.
        (_, Err(FallbackReason::LowConfidence)) => Verdict::ServeUnderstudy,
        (_, Err(reason)) => Verdict::FallBack(reason),
    }
}

/// The confidence a cascade compares with its threshold, or why the call
/// falls back to the lead at every threshold: an error, a timeout, an invalid
/// answer, or an answer without a (usable) confidence. [`judge`] serves a
/// cascade's call exactly when this is at least the threshold, so `eval`,
/// which scores every threshold at once, scores the cascade as it is served.
pub fn cascade_confidence(attempt: Attempt) -> Result<f64, FallbackReason> {
    match attempt {
        Attempt::Failed => Err(FallbackReason::UnderstudyError),
        Attempt::TimedOut => Err(FallbackReason::UnderstudyTimeout),
        Attempt::Answered { valid: false, .. } => Err(FallbackReason::InvalidAnswer),
        Attempt::Answered { confidence: Some(confidence), valid: true } if !confidence.is_nan() => Ok(confidence),
        Attempt::Answered { valid: true, .. } => Err(FallbackReason::LowConfidence),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_and_print() {
        assert_eq!(Policy::parse("lead", None), Ok(Policy::Lead));
        assert_eq!(Policy::parse("canary:12.5", None), Ok(Policy::Canary { percent: 12.5 }));
        assert_eq!(Policy::parse("cascade", Some(0.8)), Ok(Policy::Cascade { threshold: 0.8 }));
        assert_eq!(Policy::parse("cascade:0.7", Some(0.8)), Ok(Policy::Cascade { threshold: 0.7 }));
        assert!(Policy::parse("cascade", None).is_err());
        assert!(Policy::parse("canary:120", None).is_err());
        assert!(Policy::parse("canary", None).is_err());
        assert!(Policy::parse("yolo", None).unwrap_err().to_string().contains("unknown policy"));
        assert_eq!(Policy::Canary { percent: 10.0 }.name(), "canary:10");
    }

    #[test]
    fn canary_sends_its_share_to_the_understudy() {
        let policy = Policy::Canary { percent: 30.0 };
        let n_understudy =
            (0..1000).filter(|idx| first_step(policy, f64::from(*idx) / 1000.0) == FirstStep::Understudy).count();
        assert_eq!(n_understudy, 300);
        assert_eq!(first_step(Policy::Shadow, 0.0), FirstStep::LeadWithShadow);
        assert_eq!(first_step(Policy::Lead, 0.0), FirstStep::Lead);
    }

    #[test]
    fn every_policy_falls_back_on_failure() {
        for policy in [Policy::Canary { percent: 100.0 }, Policy::Cascade { threshold: 0.5 }, Policy::Understudy] {
            assert_eq!(judge(policy, Attempt::Failed), Verdict::FallBack(FallbackReason::UnderstudyError));
            assert_eq!(judge(policy, Attempt::TimedOut), Verdict::FallBack(FallbackReason::UnderstudyTimeout));
            let invalid = Attempt::Answered { confidence: Some(0.99), valid: false };
            assert_eq!(judge(policy, invalid), Verdict::FallBack(FallbackReason::InvalidAnswer));
        }
    }

    #[test]
    fn cascade_serves_at_or_above_its_threshold() {
        let policy = Policy::Cascade { threshold: 0.8 };
        let answered = |confidence| Attempt::Answered { confidence, valid: true };
        assert_eq!(judge(policy, answered(Some(0.8))), Verdict::ServeUnderstudy);
        assert_eq!(judge(policy, answered(Some(0.79))), Verdict::FallBack(FallbackReason::LowConfidence));
        assert_eq!(judge(policy, answered(None)), Verdict::FallBack(FallbackReason::LowConfidence));
        assert_eq!(judge(Policy::Understudy, answered(None)), Verdict::ServeUnderstudy);
        assert_eq!(judge(policy, answered(Some(f64::NAN))), Verdict::FallBack(FallbackReason::LowConfidence));
        assert_eq!(judge(Policy::Understudy, answered(Some(f64::NAN))), Verdict::ServeUnderstudy);
    }

    #[test]
    fn the_cascade_confidence_decides_every_threshold() {
        let attempts = [
            Attempt::Answered { confidence: Some(0.7), valid: true },
            Attempt::Answered { confidence: None, valid: true },
            Attempt::Answered { confidence: Some(0.99), valid: false },
            Attempt::Failed,
            Attempt::TimedOut,
        ];
        for attempt in attempts {
            for threshold in [0.0, 0.5, 0.7, 0.71, 1.0] {
                let served = judge(Policy::Cascade { threshold }, attempt) == Verdict::ServeUnderstudy;
                assert_eq!(
                    served,
                    cascade_confidence(attempt).is_ok_and(|c| c >= threshold),
                    "{attempt:?} at {threshold}"
                );
            }
        }
        assert_eq!(cascade_confidence(Attempt::TimedOut), Err(FallbackReason::UnderstudyTimeout));
    }
}
