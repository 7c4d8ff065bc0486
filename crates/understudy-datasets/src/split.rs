//! The time split: the newest rows are the test set, the ones just before
//! them the validation set, and everything older the training set.
//!
//! Splitting by time instead of at random is what makes the test honest: the
//! understudy is judged on calls from after everything it learnt from, as it
//! will be once it serves traffic.

/// The shares of rows that go to validation and test.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SplitShares {
    pub validation: f64,
    pub test: f64,
}

impl Default for SplitShares {
    fn default() -> Self {
        SplitShares { validation: 0.1, test: 0.2 }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SplitError {
    #[error("--{flag} {share} must be a number from 0 up to (not including) 1")]
    ShareOutOfRange { flag: &'static str, share: f64 },
    #[error("--validation-share {validation} and --test-share {test} add up to {sum}, which leaves no rows to train on (they must add up to less than 1)")]
    SharesTooLarge { validation: f64, test: f64, sum: f64 },
}

impl SplitShares {
    pub fn check(&self) -> Result<(), SplitError> {
        for (flag, share) in [("validation-share", self.validation), ("test-share", self.test)] {
            if !(share.is_finite() && (0.0..1.0).contains(&share)) {
                return Err(SplitError::ShareOutOfRange { flag, share });
            }
        }
        let sum = self.validation + self.test;
        if sum >= 1.0 {
            return Err(SplitError::SharesTooLarge { validation: self.validation, test: self.test, sum });
        }
        Ok(())
    }
}

/// Row counts of the three splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct SplitCounts {
    pub train: u64,
    pub validation: u64,
    pub test: u64,
}

impl SplitCounts {
    pub fn total(&self) -> u64 {
        self.train + self.validation + self.test
    }
}

/// How many of `n_rows` go to each split. Shares round to the nearest row;
/// test is taken first, then validation, and train keeps the rest.
pub fn split_counts(n_rows: usize, shares: SplitShares) -> SplitCounts {
    let n_test = ((n_rows as f64 * shares.test).round() as usize).min(n_rows);
    let n_validation = ((n_rows as f64 * shares.validation).round() as usize).min(n_rows - n_test);
    SplitCounts { train: (n_rows - n_test - n_validation) as u64, validation: n_validation as u64, test: n_test as u64 }
}

/// Splits rows that are in time order (oldest first) into train, validation
/// and test, each still oldest first.
pub fn time_split<T>(rows_oldest_first: Vec<T>, shares: SplitShares) -> (Vec<T>, Vec<T>, Vec<T>) {
    let counts = split_counts(rows_oldest_first.len(), shares);
    let mut train = rows_oldest_first;
    let test = train.split_off(train.len() - counts.test as usize);
    let validation = train.split_off(train.len() - counts.validation as usize);
    (train, validation, test)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_are_disjoint_cover_everything_and_are_time_ordered() {
        // Rows are (time, id); times repeat so that order is not just the id.
        let rows: Vec<(u64, usize)> = (0..97).map(|idx| (idx as u64 / 3, idx)).collect();
        let (train, validation, test) = time_split(rows.clone(), SplitShares::default());
        assert_eq!((train.len(), validation.len(), test.len()), (68, 10, 19));
        let mut ids: Vec<usize> = train.iter().chain(&validation).chain(&test).map(|(_, id)| *id).collect();
        ids.sort_unstable();
        assert_eq!(ids, (0..97).collect::<Vec<_>>(), "every row lands in exactly one split");
        let newest = |split: &[(u64, usize)]| split.iter().map(|(at, _)| *at).max().unwrap_or(0);
        let oldest = |split: &[(u64, usize)]| split.iter().map(|(at, _)| *at).min().unwrap_or(u64::MAX);
        assert!(newest(&train) <= oldest(&validation));
        assert!(newest(&validation) <= oldest(&test));
        assert!(newest(&train) < oldest(&test));
    }

    #[test]
    fn zero_shares_keep_everything_for_training() {
        let (train, validation, test) = time_split(vec![1, 2, 3], SplitShares { validation: 0.0, test: 0.0 });
        assert_eq!((train, validation, test), (vec![1, 2, 3], vec![], vec![]));
        assert_eq!(split_counts(0, SplitShares::default()), SplitCounts::default());
    }

    #[test]
    fn bad_shares_are_refused() {
        assert!(matches!(SplitShares { validation: 0.5, test: 0.7 }.check(), Err(SplitError::SharesTooLarge { .. })));
        assert!(matches!(
            SplitShares { validation: 0.1, test: -0.2 }.check(),
            Err(SplitError::ShareOutOfRange { flag: "test-share", .. })
        ));
        assert!(SplitShares { validation: 0.1, test: f64::NAN }.check().is_err());
        assert_eq!(SplitShares::default().check(), Ok(()));
    }
}
