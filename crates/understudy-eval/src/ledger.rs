//! The savings ledger's arithmetic: what routing saved, and how well the
//! understudy kept the promise, from a task's recorded counts and sums.
//!
//! Two agreement figures, never mixed:
//! - **served agreement**, from live audits: the understudy's served answers
//!   that the lead, asked in the background, answered the same. This is the
//!   promise's figure, with an exact (Clopper–Pearson) interval.
//! - **fallback agreement**: calls the lead served where the understudy also
//!   answered (shadow calls, and cascade fallbacks, which the understudy
//!   answered with low confidence, so it is low by construction).
//!
//! Net savings are the lead cost avoided, less the understudy's compute and
//! the audits' lead calls.

use crate::binomial::clopper_pearson;

/// A task's recorded counts and money over some span of calls.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LedgerCounts {
    pub n_calls: u64,
    /// Calls the understudy's answer was served for.
    pub n_served: u64,
    /// Lead-served calls the understudy also answered, and those that agreed.
    pub n_compared: u64,
    pub n_compared_agreed: u64,
    /// Served calls audited against the lead, and those that agreed.
    pub n_audited: u64,
    pub n_audit_agreed: u64,
    /// Everything the calls cost: the lead's tokens (audits included) and
    /// the understudy's compute.
    pub cost: f64,
    pub understudy_cost: f64,
    pub lead_cost_avoided: f64,
    pub audit_cost: f64,
}

impl LedgerCounts {
    pub fn add(&mut self, other: &LedgerCounts) {
        self.n_calls += other.n_calls;
        self.n_served += other.n_served;
        self.n_compared += other.n_compared;
        self.n_compared_agreed += other.n_compared_agreed;
        self.n_audited += other.n_audited;
        self.n_audit_agreed += other.n_audit_agreed;
        self.cost += other.cost;
        self.understudy_cost += other.understudy_cost;
        self.lead_cost_avoided += other.lead_cost_avoided;
        self.audit_cost += other.audit_cost;
    }

    /// What the lead was paid: everything but the understudy's compute
    /// (the audits' lead calls included).
    pub fn lead_cost(&self) -> f64 {
        self.cost - self.understudy_cost
    }

    /// Lead cost avoided, less the understudy's compute and the audits.
    pub fn net_savings(&self) -> f64 {
        self.lead_cost_avoided - self.understudy_cost - self.audit_cost
    }

    /// The share of what the lead would have cost without routing that it did not.
    pub fn lead_cost_cut(&self) -> f64 {
        let without = self.lead_cost() + self.lead_cost_avoided;
        if without > 0.0 {
            self.lead_cost_avoided / without
        } else {
            0.0
        }
    }
}

/// A share with its interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Share {
    pub value: f64,
    pub lower: f64,
    pub upper: f64,
    pub n: u64,
}

/// The ledger's figures, each with its interval at `confidence`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LedgerFigures {
    pub confidence: f64,
    /// The share of calls the understudy served.
    pub coverage: Share,
    /// Agreement of served answers with the lead, from audits; `None`
    /// without audits.
    pub served_agreement: Option<Share>,
    /// Agreement on lead-served calls the understudy also answered.
    pub fallback_agreement: Option<Share>,
    pub net_savings: f64,
    /// Net savings had the understudy served at the ends of the coverage
    /// interval, with the same lead cost avoided and compute per served call:
    /// what the same traffic is likely to save again.
    pub net_savings_interval: (f64, f64),
}

fn share(k: u64, n: u64, confidence: f64) -> Share {
    let (lower, upper) = if n == 0 { (0.0, 1.0) } else { clopper_pearson(k, n, confidence) };
    Share { value: if n == 0 { 0.0 } else { k as f64 / n as f64 }, lower, upper, n }
}

/// The figures of `counts`, with intervals at `confidence` (e.g. 0.95).
pub fn ledger(counts: &LedgerCounts, confidence: f64) -> LedgerFigures {
    let coverage = share(counts.n_served, counts.n_calls, confidence);
    let served_agreement = (counts.n_audited > 0).then(|| share(counts.n_audit_agreed, counts.n_audited, confidence));
    let fallback_agreement =
        (counts.n_compared > 0).then(|| share(counts.n_compared_agreed, counts.n_compared, confidence));
    let net = counts.net_savings();
    let net_at = |coverage_share: f64| -> f64 {
        if counts.n_served == 0 {
            return net;
        }
        let avoided_per_served = counts.lead_cost_avoided / counts.n_served as f64;
        let served = coverage_share * counts.n_calls as f64;
        served * avoided_per_served - counts.understudy_cost - counts.audit_cost
    };
    LedgerFigures {
        confidence,
        coverage,
        served_agreement,
        fallback_agreement,
        net_savings: net,
        net_savings_interval: (net_at(coverage.lower), net_at(coverage.upper)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_and_fallback_agreement_are_kept_apart() {
        let counts = LedgerCounts {
            n_calls: 1000,
            n_served: 850,
            n_compared: 150,
            n_compared_agreed: 100,
            n_audited: 40,
            n_audit_agreed: 40,
            cost: 2.0,
            understudy_cost: 0.1,
            lead_cost_avoided: 8.5,
            audit_cost: 0.4,
        };
        let figures = ledger(&counts, 0.95);
        let served = figures.served_agreement.unwrap();
        assert_eq!(served.value, 1.0);
        // Clopper–Pearson for 40 of 40 at 95 %: lower bound 0.025^(1/40).
        assert!((served.lower - 0.025f64.powf(1.0 / 40.0)).abs() < 1e-6, "{served:?}");
        let fallback = figures.fallback_agreement.unwrap();
        assert!((fallback.value - 100.0 / 150.0).abs() < 1e-12);
        assert!((figures.net_savings - (8.5 - 0.1 - 0.4)).abs() < 1e-12, "audits are a cost");
        let (low, high) = figures.net_savings_interval;
        assert!(low < figures.net_savings && figures.net_savings < high);
        assert!((counts.lead_cost() - 1.9).abs() < 1e-12);
    }

    #[test]
    fn no_calls_no_figures() {
        let figures = ledger(&LedgerCounts::default(), 0.95);
        assert_eq!(figures.coverage.value, 0.0);
        assert!(figures.served_agreement.is_none() && figures.fallback_agreement.is_none());
        assert_eq!(figures.net_savings_interval, (0.0, 0.0));
    }
}
