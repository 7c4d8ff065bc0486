//! Scrubbing: e-mail addresses, phone numbers and secrets in a text become
//! typed placeholders (`<EMAIL>`, `<PHONE>`, `<SECRET>`).
//!
//! The patterns are heuristics tuned to miss little of what they name without
//! eating ordinary numbers, dates and words: a phone number needs a shape
//! phones have (a `+` country code, `(555) 123-4567`, `555-123-4567`), and a
//! long token counts as a secret only if it mixes letters and digits the way
//! keys do. Secrets are replaced first, so a key that contains digit runs is
//! one `<SECRET>`, not a key with phone numbers in it.

use regex::{Captures, Regex};

pub const EMAIL_PLACEHOLDER: &str = "<EMAIL>";
pub const PHONE_PLACEHOLDER: &str = "<PHONE>";
pub const SECRET_PLACEHOLDER: &str = "<SECRET>";

/// How many of each kind a scrub replaced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ScrubCounts {
    pub emails: u64,
    pub phones: u64,
    pub secrets: u64,
}

impl ScrubCounts {
    pub fn total(&self) -> u64 {
        self.emails + self.phones + self.secrets
    }

    pub fn add(&mut self, other: ScrubCounts) {
        self.emails += other.emails;
        self.phones += other.phones;
        self.secrets += other.secrets;
    }
}

#[derive(Debug, thiserror::Error)]
#[error("scrub pattern does not compile: {0}")]
pub struct PatternError(#[from] regex::Error);

/// The compiled patterns; build once, use for every row.
#[derive(Debug, Clone)]
pub struct Scrubber {
    /// Keys with a known prefix, and `Bearer <token>`.
    prefixed_secret: Regex,
    /// Any long run of token characters; kept only if it looks random.
    long_token: Regex,
    email: Regex,
    phone: Regex,
}

impl Scrubber {
    pub fn new() -> Result<Scrubber, PatternError> {
        Ok(Scrubber {
            prefixed_secret: Regex::new(concat!(
                r"\bsk-[A-Za-z0-9_-]{16,}",
                r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
                r"|\bgh[pousr]_[A-Za-z0-9]{30,}",
                r"|\bxox[abpr]-[A-Za-z0-9-]{10,}",
                r"|(?i:\bbearer\s+)[A-Za-z0-9._~+/-]{12,}=*",
            ))?,
            long_token: Regex::new(r"[A-Za-z0-9+/_-]{32,}={0,2}")?,
            email: Regex::new(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")?,
            phone: Regex::new(concat!(
                r"\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}",
                r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}\b",
                r"|\b\d{3}[.-]\d{3}[.-]\d{4}\b",
            ))?,
        })
    }

    /// The text with everything found replaced, and what was replaced.
    pub fn scrub(&self, text: &str) -> (String, ScrubCounts) {
        let mut counts = ScrubCounts::default();
        let text = self.prefixed_secret.replace_all(text, |_: &Captures| {
            counts.secrets += 1;
            SECRET_PLACEHOLDER
        });
        let text = self.long_token.replace_all(&text, |captures: &Captures| {
            let token = &captures[0];
            if looks_random(token) {
                counts.secrets += 1;
                SECRET_PLACEHOLDER.to_string()
            } else {
                token.to_string()
            }
        });
        let text = self.email.replace_all(&text, |_: &Captures| {
            counts.emails += 1;
            EMAIL_PLACEHOLDER
        });
        let text = self.phone.replace_all(&text, |captures: &Captures| {
            let n_digits = captures[0].chars().filter(char::is_ascii_digit).count();
            // Phone numbers have 7 to 15 digits (E.164); longer runs are something else.
            if (7..=15).contains(&n_digits) {
                counts.phones += 1;
                PHONE_PLACEHOLDER.to_string()
            } else {
                captures[0].to_string()
            }
        });
        (text.into_owned(), counts)
    }
}

/// Whether a long token looks like a key rather than a word or a path: all
/// hex with digits in it, or letters and digits mixed, in both cases.
fn looks_random(token: &str) -> bool {
    let body = token.trim_end_matches('=');
    let n_digits = body.chars().filter(char::is_ascii_digit).count();
    let has_upper = body.chars().any(|c| c.is_ascii_uppercase());
    let has_lower = body.chars().any(|c| c.is_ascii_lowercase());
    let is_hex = body.chars().all(|c| c.is_ascii_hexdigit());
    (is_hex && n_digits > 0) || (n_digits >= 2 && has_upper && has_lower)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrub(text: &str) -> (String, ScrubCounts) {
        Scrubber::new().expect("patterns compile").scrub(text)
    }

    #[test]
    fn planted_emails_phones_and_keys_are_replaced() {
        let text = "Mail jane.doe+billing@example.co.uk or call +1 (415) 555-0132, office 212-555-0187. \
            Key: sk-proj-AbC123xyz789LMNOpqrs456, aws AKIAIOSFODNN7EXAMPLE, \
            header Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig, \
            digest 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08.";
        let (scrubbed, counts) = scrub(text);
        assert_eq!(
            scrubbed,
            "Mail <EMAIL> or call <PHONE>, office <PHONE>. Key: <SECRET>, aws <SECRET>, \
            header Authorization: <SECRET>, digest <SECRET>."
        );
        assert_eq!(counts, ScrubCounts { emails: 1, phones: 2, secrets: 4 });
    }

    #[test]
    fn ordinary_numbers_words_and_paths_stay() {
        let text = "On 2026-11-01 at 10:30 we shipped 1,250,000 units (order 48213) to \
            /srv/data/exports/quarterly/reports/final/summary_table_v2.csv; internationalization-localization.";
        let (scrubbed, counts) = scrub(text);
        assert_eq!(scrubbed, text);
        assert_eq!(counts.total(), 0);
    }
}
