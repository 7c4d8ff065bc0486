//! `calibration.json`: what `evaluate` certified for a model version, kept
//! in the version's folder, and read back by `promote`.

use std::path::Path;

use serde_json::{json, Value};
use understudy_eval::{CascadeOutcome, CascadeReport, Certification};

use crate::error::{io, Result};

/// The file in a model version's folder that keeps its certified threshold.
pub const CALIBRATION_FILE: &str = "calibration.json";

/// What `evaluate` certified for a model version, read back from its folder.
#[derive(Debug, Clone, PartialEq)]
pub enum Calibration {
    /// No calibration file (the version was never evaluated), or one that is
    /// unreadable or predates certification.
    Missing,
    /// Evaluated, and no threshold could be certified.
    Uncertified {
        target_agreement: f64,
        delta: f64,
        n_validation: u64,
        more_calls_needed: Option<u64>,
    },
    Certified {
        threshold: f64,
        target_agreement: f64,
        delta: f64,
    },
}

impl Calibration {
    /// The calibration `evaluate` wrote into the model version folder `dir`.
    pub fn read(dir: &str) -> Calibration {
        let Some(value) = std::fs::read_to_string(Path::new(dir).join(CALIBRATION_FILE))
            .ok()
            .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        else {
            return Calibration::Missing;
        };
        let number = |key: &str| value.get(key).and_then(Value::as_f64);
        let (Some(certified), Some(target_agreement), Some(delta)) =
            (value.get("certified").and_then(Value::as_bool), number("target_agreement"), number("delta"))
        else {
            return Calibration::Missing;
        };
        match (certified, number("threshold")) {
            (true, Some(threshold)) => Calibration::Certified { threshold, target_agreement, delta },
            _ => Calibration::Uncertified {
                target_agreement,
                delta,
                n_validation: value.get("n_validation").and_then(Value::as_u64).unwrap_or(0),
                more_calls_needed: value.get("more_calls_needed").and_then(Value::as_u64),
            },
        }
    }

    /// The whole file as written (certificate, test figures, confusion
    /// matrix and coverage–agreement curve), for display; `None` when absent.
    pub fn report(dir: &str) -> Option<Value> {
        let text = std::fs::read_to_string(Path::new(dir).join(CALIBRATION_FILE)).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub fn certified_threshold(&self) -> Option<f64> {
        match self {
            Calibration::Certified { threshold, .. } => Some(*threshold),
            _ => None,
        }
    }
}

/// What the eval report plots for a version on test, kept beside its
/// certificate so the dashboard can show it again.
pub(crate) struct TestPlots<'a> {
    /// Empty for a generation task.
    pub labels: &'a [String],
    /// `confusion[lead][understudy]` counts.
    pub confusion: &'a [Vec<usize>],
    pub curve: &'a [CascadeOutcome],
}

/// The most curve points kept: enough to draw it, few enough to stay small.
const MAX_CURVE_POINTS: usize = 200;

/// Writes the certificate, and how its threshold did on test, into `dir`.
pub(crate) fn write(
    dir: &str,
    dataset: &str,
    certification: &Certification,
    cascade: Option<&CascadeReport>,
    plots: &TestPlots<'_>,
) -> Result<()> {
    let step = plots.curve.len().div_ceil(MAX_CURVE_POINTS).max(1);
    let mut kept: Vec<&CascadeOutcome> = plots.curve.iter().step_by(step).collect();
    if let (Some(last), Some(kept_last)) = (plots.curve.last(), kept.last()) {
        if !std::ptr::eq(last, *kept_last) {
            kept.push(last);
        }
    }
    let curve: Vec<Value> = kept
        .iter()
        .map(|point| json!({"threshold": point.threshold, "coverage": point.coverage, "served_agreement": point.served_agreement}))
        .collect();
    let value = json!({
        "dataset": dataset,
        "certified": certification.threshold.is_some(),
        "threshold": certification.threshold,
        "target_agreement": certification.target_agreement,
        "delta": certification.delta,
        "n_validation": certification.n_validation,
        "n_served": certification.n_served,
        "n_errors": certification.n_errors,
        "risk_upper_bound": certification.risk_upper_bound,
        "more_calls_needed": certification.more_calls_needed,
        "test_coverage": cascade.map(|report| report.coverage.value),
        "test_served_agreement": cascade.map(|report| report.served_agreement.value),
        "test_overall_agreement": cascade.map(|report| report.overall_agreement.value),
        "labels": plots.labels,
        "confusion": plots.confusion,
        "curve": curve,
    });
    let path = Path::new(dir).join(CALIBRATION_FILE);
    std::fs::write(&path, value.to_string()).map_err(io(path))
}

/// The cascade threshold `evaluate` certified for the model in `dir`, if any.
pub fn calibrated_threshold(dir: &str) -> Option<f64> {
    Calibration::read(dir).certified_threshold()
}
