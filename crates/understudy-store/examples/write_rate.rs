//! How fast the store writes call records, in batches as the recorder does.
//!
//! Run: `cargo run --release -p understudy-store --example write_rate -- [sqlite|postgres] [N_RECORDS]`

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::time::Instant;

use understudy_store::Store;
use understudy_types::{CallRecord, Endpoint, Money, OffsetDateTime, Usage, UsageSource};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let backend = std::env::args().nth(1).unwrap_or_else(|| "sqlite".into());
    let n_records: usize = std::env::args().nth(2).map_or(Ok(50_000), |text| text.parse())?;
    let dir = tempfile::tempdir()?;
    let database;
    let url = if backend == "postgres" {
        database = Some(understudy_store::testing::TestDatabase::create().await?);
        database.as_ref().map(|db| db.url.clone()).unwrap_or_default()
    } else {
        database = None;
        format!("sqlite://{}", dir.path().join("rate.db").display())
    };
    let store = Store::connect(&url).await?;
    let request = r#"{"model":"task:bench","messages":[{"role":"system","content":"Answer with one label."},{"role":"user","content":"How far is the Moon from the Earth?"}]}"#;
    let response = r#"{"id":"chatcmpl-stub","object":"chat.completion","created":1700000000,"model":"ok","choices":[{"index":0,"message":{"role":"assistant","content":"Paris is the capital of France."},"finish_reason":"stop"}],"usage":{"prompt_tokens":21,"completion_tokens":7,"total_tokens":28}}"#;
    let calls: Vec<CallRecord> = (0..n_records)
        .map(|_| CallRecord {
            id: CallRecord::new_id(),
            created_at: OffsetDateTime::now_utc(),
            task: Some("bench".into()),
            model: "bench".into(),
            provider: "stub".into(),
            endpoint: Endpoint::ChatCompletions,
            stream: false,
            request: request.into(),
            response: Some(response.into()),
            usage: Usage { prompt_tokens: 21, completion_tokens: 7 },
            usage_source: UsageSource::Provider,
            latency_ms: 0.5,
            ttft_ms: Some(0.5),
            status: 200,
            error: None,
            cost: Money(1e-6),
            routing: None,
            key: None,
            upstream_request_id: None,
        })
        .collect();
    let started = Instant::now();
    for batch in calls.chunks(512) {
        store.insert_calls(batch).await?;
    }
    let secs = started.elapsed().as_secs_f64();
    println!("{backend}: {n_records} records in {secs:.2}s = {:.0} records/s", n_records as f64 / secs);
    store.close().await;
    if let Some(database) = database {
        database.drop_database().await?;
    }
    Ok(())
}
