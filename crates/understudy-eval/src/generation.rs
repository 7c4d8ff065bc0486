//! Metrics for generation tasks: exact match, normalized match, token F1,
//! ROUGE-L, and for JSON answers validity and field-level match.

use std::collections::HashMap;

use serde_json::Value;

use crate::bootstrap::{bootstrap_mean, Estimate};

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationReport {
    pub n_examples: usize,
    pub exact_match: Estimate,
    pub normalized_match: Estimate,
    pub token_f1: Estimate,
    pub rouge_l: Estimate,
    /// Present when most reference answers are JSON objects.
    pub json: Option<JsonReport>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct JsonReport {
    /// The share of predictions that parse as JSON.
    pub validity: Estimate,
    /// The share of the reference's top-level fields the prediction matches.
    pub field_match: Estimate,
}

pub fn generation_report(
    reference: &[String],
    predicted: &[String],
    n_resamples: usize,
    seed: u64,
) -> GenerationReport {
    let n_examples = reference.len().min(predicted.len());
    let pairs: Vec<(&str, &str)> =
        (0..n_examples).map(|idx| (reference[idx].as_str(), predicted[idx].as_str())).collect();
    let score =
        |metric: fn(&str, &str) -> f64| pairs.iter().map(|(gold, guess)| metric(gold, guess)).collect::<Vec<_>>();
    let estimate =
        |scores: Vec<f64>, offset: u64| bootstrap_mean(&scores, n_resamples, 0.95, seed.wrapping_add(offset));
    let n_json_references = pairs.iter().filter(|(gold, _)| matches!(parse_json(gold), Some(Value::Object(_)))).count();
    let json = (n_json_references * 2 > n_examples).then(|| JsonReport {
        validity: estimate(score(|_, guess| f64::from(parse_json(guess).is_some())), 4),
        field_match: estimate(score(json_field_match), 5),
    });
    GenerationReport {
        n_examples,
        exact_match: estimate(score(|gold, guess| f64::from(gold == guess)), 0),
        normalized_match: estimate(score(|gold, guess| f64::from(normalize(gold) == normalize(guess))), 1),
        token_f1: estimate(score(token_f1), 2),
        rouge_l: estimate(score(rouge_l), 3),
        json,
    }
}

/// Lowercase, punctuation and the articles a/an/the removed, whitespace collapsed
/// (the SQuAD normalization).
pub fn normalize(text: &str) -> String {
    let lowered: String = text
        .to_lowercase()
        .chars()
        .map(|ch| if ch.is_alphanumeric() || ch.is_whitespace() { ch } else { ' ' })
        .collect();
    lowered.split_whitespace().filter(|word| !matches!(*word, "a" | "an" | "the")).collect::<Vec<_>>().join(" ")
}

fn tokens(text: &str) -> Vec<String> {
    normalize(text).split_whitespace().map(str::to_string).collect()
}

/// F1 of the bags of normalized tokens; two empty answers match fully.
pub fn token_f1(reference: &str, predicted: &str) -> f64 {
    let reference_tokens = tokens(reference);
    let predicted_tokens = tokens(predicted);
    if reference_tokens.is_empty() || predicted_tokens.is_empty() {
        return f64::from(reference_tokens.is_empty() && predicted_tokens.is_empty());
    }
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for token in &reference_tokens {
        *counts.entry(token).or_default() += 1;
    }
    let mut n_common = 0;
    for token in &predicted_tokens {
        if let Some(count) = counts.get_mut(token.as_str()) {
            if *count > 0 {
                *count -= 1;
                n_common += 1;
            }
        }
    }
    if n_common == 0 {
        return 0.0;
    }
    let precision = n_common as f64 / predicted_tokens.len() as f64;
    let recall = n_common as f64 / reference_tokens.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// ROUGE-L F-measure: the longest common subsequence of normalized tokens.
pub fn rouge_l(reference: &str, predicted: &str) -> f64 {
    let reference_tokens = tokens(reference);
    let predicted_tokens = tokens(predicted);
    if reference_tokens.is_empty() || predicted_tokens.is_empty() {
        return f64::from(reference_tokens.is_empty() && predicted_tokens.is_empty());
    }
    let mut previous = vec![0usize; predicted_tokens.len() + 1];
    for reference_token in &reference_tokens {
        let mut current = vec![0usize; predicted_tokens.len() + 1];
        for (predicted_idx, predicted_token) in predicted_tokens.iter().enumerate() {
            current[predicted_idx + 1] = if reference_token == predicted_token {
                previous[predicted_idx] + 1
            } else {
                current[predicted_idx].max(previous[predicted_idx + 1])
            };
        }
        previous = current;
    }
    let lcs = previous[predicted_tokens.len()] as f64;
    if lcs == 0.0 {
        return 0.0;
    }
    let precision = lcs / predicted_tokens.len() as f64;
    let recall = lcs / reference_tokens.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// JSON text, also when wrapped in a Markdown code fence.
fn parse_json(text: &str) -> Option<Value> {
    let trimmed = text.trim();
    let unfenced = trimmed
        .strip_prefix("```json")
        .or_else(|| trimmed.strip_prefix("```"))
        .and_then(|rest| rest.strip_suffix("```"))
        .unwrap_or(trimmed);
    serde_json::from_str(unfenced.trim()).ok()
}

/// The share of the reference object's top-level fields whose values the
/// prediction has equal; 0 when the prediction is not a JSON object.
pub fn json_field_match(reference: &str, predicted: &str) -> f64 {
    let Some(Value::Object(reference)) = parse_json(reference) else { return f64::from(reference == predicted) };
    let Some(Value::Object(predicted)) = parse_json(predicted) else { return 0.0 };
    if reference.is_empty() {
        return f64::from(predicted.is_empty());
    }
    let n_matching = reference.iter().filter(|(key, value)| predicted.get(*key) == Some(value)).count();
    n_matching as f64 / reference.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_scores() {
        assert_eq!(normalize("The  Eiffel Tower!"), "eiffel tower");
        // reference tokens: cat sat on mat (4); predicted: cat sat mat today (4); common 3.
        assert!((token_f1("The cat sat on the mat.", "cat sat mat today") - 0.75).abs() < 1e-12);
        // LCS of [cat sat on mat] and [cat on sat mat] is 3 tokens: p = r = 3/4.
        assert!((rouge_l("cat sat on mat", "cat on sat mat") - 0.75).abs() < 1e-12);
        assert_eq!(token_f1("", ""), 1.0);
        assert_eq!(rouge_l("a", "dog"), 0.0, "'a' normalizes away, leaving nothing");
        assert!((json_field_match(r#"{"a":1,"b":"x"}"#, "```json\n{\"a\":1,\"b\":\"y\"}\n```") - 0.5).abs() < 1e-12);
        assert_eq!(json_field_match(r#"{"a":1}"#, "not json"), 0.0);
    }

    #[test]
    fn reports_detect_json_tasks() {
        let reference = vec![r#"{"priority":"high"}"#.to_string(), r#"{"priority":"low"}"#.to_string()];
        let predicted = vec![r#"{"priority":"high"}"#.to_string(), "low".to_string()];
        let report = generation_report(&reference, &predicted, 100, 1);
        let json = report.json.expect("json task");
        assert!((json.validity.value - 0.5).abs() < 1e-12);
        assert!((json.field_match.value - 0.5).abs() < 1e-12);
        assert!((report.exact_match.value - 0.5).abs() < 1e-12);
        let plain = generation_report(&["Paris".to_string()], &["paris.".to_string()], 100, 1);
        assert!(plain.json.is_none());
        assert_eq!((plain.exact_match.value, plain.normalized_match.value), (0.0, 1.0));
    }
}
