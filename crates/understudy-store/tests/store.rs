//! The store's suite, run against a real SQLite file and a real Postgres.

use std::future::Future;

use time::macros::datetime;
use understudy_store::testing::TestDatabase;
use understudy_store::{CallFilter, CallOrder, Recorder, RecorderConfig, StatusFilter, Store};
use understudy_types::{CallRecord, Endpoint, Money, OffsetDateTime, Usage, UsageSource};

/// Runs `check` once on a fresh SQLite file and once on a fresh Postgres database.
async fn on_both_backends<F, Fut>(check: F)
where
    F: Fn(Store) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("tempdir");
    let sqlite_url = format!("sqlite://{}", dir.path().join("store.db").display());
    let sqlite = Store::connect(&sqlite_url).await.expect("sqlite store opens");
    check(sqlite.clone()).await;
    sqlite.close().await;

    let database = TestDatabase::create().await.expect("postgres must be reachable for the store suite (see .ci/run)");
    let postgres = Store::connect(&database.url).await.expect("postgres store opens");
    check(postgres.clone()).await;
    postgres.close().await;
    database.drop_database().await.expect("drop test database");
}

fn call(task: &str, model: &str, at: OffsetDateTime, status: u16) -> CallRecord {
    CallRecord {
        id: CallRecord::new_id(),
        created_at: at,
        task: Some(task.to_string()),
        model: model.to_string(),
        provider: "cloud".to_string(),
        endpoint: Endpoint::ChatCompletions,
        stream: false,
        request: r#"{"model":"task:t","messages":[{"role":"user","content":"hi"}]}"#.to_string(),
        response: Some(r#"{"choices":[]}"#.to_string()),
        usage: Usage { prompt_tokens: 10, completion_tokens: 5 },
        usage_source: UsageSource::Provider,
        latency_ms: 12.5,
        ttft_ms: Some(3.25),
        status,
        error: if status == 200 { None } else { Some("upstream said no".to_string()) },
        cost: Money(0.001),
    }
}

#[tokio::test]
async fn calls_round_trip_exactly() {
    on_both_backends(|store| async move {
        let mut original = call("triage", "gpt-4o-mini", datetime!(2026-11-01 10:00:00.123 UTC), 200);
        original.task = None;
        original.stream = true;
        original.endpoint = Endpoint::Embeddings;
        original.usage_source = UsageSource::Counted;
        original.ttft_ms = None;
        store.insert_calls(std::slice::from_ref(&original)).await.expect("insert");
        let found = store.get_call(&original.id.to_string()).await.expect("get");
        assert_eq!(found, vec![original.clone()]);
        let by_prefix = store.get_call(&original.id.to_string()[..13]).await.expect("prefix");
        assert_eq!(by_prefix.len(), 1);
    })
    .await;
}

#[tokio::test]
async fn filters_select_by_task_model_time_and_status() {
    on_both_backends(|store| async move {
        let calls = vec![
            call("triage", "gpt-4o-mini", datetime!(2026-11-01 10:00 UTC), 200),
            call("triage", "gpt-4o", datetime!(2026-11-02 10:00 UTC), 502),
            call("summary", "gpt-4o-mini", datetime!(2026-11-03 10:00 UTC), 200),
        ];
        store.insert_calls(&calls).await.expect("insert");
        let ids = |found: Vec<CallRecord>| found.into_iter().map(|c| c.id).collect::<Vec<_>>();

        let triage = CallFilter { task: Some("triage".into()), ..Default::default() };
        assert_eq!(ids(store.list_calls(&triage).await.expect("list")), vec![calls[0].id, calls[1].id]);

        let mini =
            CallFilter { model: Some("gpt-4o-mini".into()), order: CallOrder::NewestFirst, ..Default::default() };
        assert_eq!(ids(store.list_calls(&mini).await.expect("list")), vec![calls[2].id, calls[0].id]);

        let window = CallFilter {
            since: Some(datetime!(2026-11-02 00:00 UTC)),
            until: Some(datetime!(2026-11-03 00:00 UTC)),
            ..Default::default()
        };
        assert_eq!(ids(store.list_calls(&window).await.expect("list")), vec![calls[1].id]);

        let errors = CallFilter { status: Some(StatusFilter::Error), ..Default::default() };
        assert_eq!(ids(store.list_calls(&errors).await.expect("list")), vec![calls[1].id]);
        let code = CallFilter { status: Some(StatusFilter::Code(200)), limit: Some(1), ..Default::default() };
        assert_eq!(ids(store.list_calls(&code).await.expect("list")), vec![calls[0].id]);
        assert_eq!(store.count_calls(&CallFilter::default()).await.expect("count"), 3);
    })
    .await;
}

#[tokio::test]
async fn cost_report_groups_by_task_model_and_day() {
    on_both_backends(|store| async move {
        let calls = vec![
            call("triage", "gpt-4o-mini", datetime!(2026-11-01 01:00 UTC), 200),
            call("triage", "gpt-4o-mini", datetime!(2026-11-01 23:59 UTC), 500),
            call("triage", "gpt-4o-mini", datetime!(2026-11-02 00:01 UTC), 200),
        ];
        store.insert_calls(&calls).await.expect("insert");
        let rows = store.cost_report(&CallFilter::default()).await.expect("report");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].day, datetime!(2026-11-01 00:00 UTC));
        assert_eq!((rows[0].n_calls, rows[0].n_errors), (2, 1));
        assert_eq!(rows[0].usage, Usage { prompt_tokens: 20, completion_tokens: 10 });
        assert!((rows[0].cost.dollars() - 0.002).abs() < 1e-12);
        assert_eq!(rows[1].n_calls, 1);
    })
    .await;
}

#[tokio::test]
async fn a_failed_batch_leaves_nothing_behind() {
    on_both_backends(|store| async move {
        let first = call("triage", "m", datetime!(2026-11-01 01:00 UTC), 200);
        let mut duplicate = call("triage", "m", datetime!(2026-11-01 02:00 UTC), 200);
        duplicate.id = first.id;
        let result = store.insert_calls(&[first, duplicate]).await;
        assert!(result.is_err(), "a duplicate id must fail the batch");
        assert_eq!(store.count_calls(&CallFilter::default()).await.expect("count"), 0);
    })
    .await;
}

#[tokio::test]
async fn the_recorder_writes_everything_before_shutdown_returns() {
    on_both_backends(|store| async move {
        // A queue far smaller than the number of records exercises backpressure.
        let (recorder, handle) = Recorder::start(store.clone(), RecorderConfig { queue_capacity: 8, batch_size: 5 });
        let mut senders = Vec::new();
        for worker in 0..4 {
            let recorder = recorder.clone();
            senders.push(tokio::spawn(async move {
                for idx in 0..250 {
                    let at = datetime!(2026-11-01 00:00 UTC) + time::Duration::milliseconds(worker * 1000 + idx);
                    recorder.record(call("triage", "m", at, 200)).await.expect("queued");
                }
            }));
        }
        for sender in senders {
            sender.await.expect("sender task");
        }
        assert_eq!(recorder.stats().queued.load(std::sync::atomic::Ordering::Relaxed), 1000);
        drop(recorder);
        handle.shutdown().await;
        assert_eq!(store.count_calls(&CallFilter::default()).await.expect("count"), 1000);
    })
    .await;
}
