//! `/metrics` over a real socket, parsed as Prometheus parses it, against
//! the records the store holds.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::json;
use support::{chat_body, Harness};
use understudy_types::ServedBy;

const CASCADE: &str = r#"
[models.student]
provider = "cloud"
name = "student"

[tasks.cascaded]
lead = "gpt-4o-mini"
understudy = "student"
policy = "cascade:0.8"
audit_rate = 0.0
"#;

/// One sample: the metric's name and its labels, sorted.
type Series = (String, BTreeMap<String, String>);

/// Parses the Prometheus text format (0.0.4): `# HELP`/`# TYPE` lines and
/// `name{label="value",...} number` samples.
fn parse(page: &str) -> BTreeMap<Series, f64> {
    let mut samples = BTreeMap::new();
    for line in page.lines().filter(|line| !line.starts_with('#') && !line.trim().is_empty()) {
        let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, labels.trim_end_matches('}')),
            None => (series, ""),
        };
        let mut parsed = BTreeMap::new();
        for pair in labels.split("\",").filter(|pair| !pair.is_empty()) {
            let (label, value) = pair.split_once("=\"").expect("label=\"value\"");
            parsed.insert(label.to_string(), value.trim_end_matches('"').to_string());
        }
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("not a number in {line}"));
        samples.insert((name.to_string(), parsed), value);
    }
    samples
}

fn total(samples: &BTreeMap<Series, f64>, name: &str) -> f64 {
    samples.iter().filter(|((metric, _), _)| metric == name).map(|(_, value)| value).sum()
}

#[tokio::test]
async fn metrics_count_what_the_records_hold() {
    let harness = Harness::start_routed(CASCADE).await;
    let mut n_calls = 0;
    for (model, content) in [
        ("task:triage", "Capital of France?"),
        ("task:triage", "Capital of Spain?"),
        ("down", "Anyone there?"),
        ("task:missing", "Hello?"),
        ("made-up-model-name", "Hello?"),
        ("task:cascaded", "Sure? || answer=Paris || confidence=0.99"),
        ("task:cascaded", "Unsure? || answer=Lyon || confidence=0.2"),
    ] {
        harness.post_json("/chat/completions", &chat_body(model, content)).await;
        n_calls += 1;
    }
    let mut stream = chat_body("gpt-4o-mini", "Stream it");
    stream["stream"] = json!(true);
    let (status, _) = harness.post_stream(&stream).await;
    assert_eq!(status, 200);
    let (status, _) = harness.post_json("/embeddings", &json!({"model": "embedder", "input": ["a", "b"]})).await;
    assert_eq!(status, 200);
    n_calls += 2;

    // A streamed call is counted when its relay has recorded it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let samples = loop {
        let (status, page) = harness.get_as(None, "/metrics").await;
        assert_eq!(status, 200);
        let samples = parse(&page);
        if total(&samples, "understudy_requests_total") as usize == n_calls {
            break samples;
        }
        assert!(Instant::now() < deadline, "the metrics never counted {n_calls} calls:\n{page}");
        tokio::task::yield_now().await;
    };

    let (calls, _harness) = harness.finish().await;
    assert_eq!(calls.len(), n_calls);
    let mut expected: BTreeMap<BTreeMap<String, String>, f64> = BTreeMap::new();
    for call in &calls {
        let served_by = call.routing.as_ref().map_or(ServedBy::Lead, |routing| routing.served_by);
        let known_model =
            ["gpt-4o-mini", "down", "embedder"].contains(&call.model.as_str()) || served_by == ServedBy::Understudy;
        let labels = BTreeMap::from([
            ("endpoint".to_string(), call.endpoint.as_str().to_string()),
            ("task".to_string(), call.task.clone().unwrap_or_default()),
            ("model".to_string(), if known_model { call.model.clone() } else { "other".to_string() }),
            ("status".to_string(), call.status.to_string()),
            ("served_by".to_string(), served_by.as_str().to_string()),
        ]);
        *expected.entry(labels).or_default() += 1.0;
    }
    let requests: BTreeMap<BTreeMap<String, String>, f64> = samples
        .iter()
        .filter(|((name, _), _)| name == "understudy_requests_total")
        .map(|((_, labels), value)| (labels.clone(), *value))
        .collect();
    assert_eq!(requests, expected);
    // Made-up model names do not become label values.
    assert!(!samples.keys().any(|(_, labels)| labels.values().any(|value| value.contains("made-up"))));

    let tokens: u64 = calls.iter().map(|call| call.usage.total_tokens()).sum();
    assert_eq!(total(&samples, "understudy_tokens_total") as u64, tokens);
    let cost: f64 = calls.iter().map(|call| call.cost.dollars()).sum();
    assert!((total(&samples, "understudy_cost_usd_total") - cost).abs() < 1e-12);
    assert_eq!(total(&samples, "understudy_request_duration_seconds_count") as usize, n_calls);
    let fallbacks =
        calls.iter().filter(|call| call.routing.as_ref().is_some_and(|r| r.fallback_reason.is_some())).count();
    assert_eq!(fallbacks, 1);
    let low_confidence = samples
        .get(&(
            "understudy_fallbacks_total".to_string(),
            BTreeMap::from([("task".into(), "cascaded".into()), ("reason".into(), "low_confidence".into())]),
        ))
        .copied();
    assert_eq!(low_confidence, Some(1.0));
    assert!(samples.contains_key(&("understudy_records_pending".to_string(), BTreeMap::new())));
    assert!(samples.contains_key(&("understudy_records_dead_lettered".to_string(), BTreeMap::new())));
}
