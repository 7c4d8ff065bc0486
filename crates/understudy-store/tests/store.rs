//! The store's suite, run against a real SQLite file and a real Postgres.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::future::Future;

use time::macros::datetime;
use understudy_store::testing::TestDatabase;
use understudy_store::{
    AutopilotEvent, CallFilter, CallOrder, DatasetRecord, PolicyChange, Recorder, RecorderConfig, StatusFilter, Store,
};
use understudy_types::{
    CallRecord, Endpoint, Feedback, FeedbackScore, Money, OffsetDateTime, Routing, ServedBy, TaskKind, Usage,
    UsageSource, Uuid,
};

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
        routing: None,
        key: None,
        upstream_request_id: None,
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
        // Legacy text completions are recorded under an endpoint of their own.
        let mut legacy = call("triage", "gpt-4o-mini", datetime!(2026-11-01 10:00:01 UTC), 200);
        legacy.endpoint = Endpoint::Completions;
        store.insert_calls(std::slice::from_ref(&legacy)).await.expect("insert");
        assert_eq!(store.get_call(&legacy.id.to_string()).await.expect("get"), vec![legacy]);
        // A Responses API call keeps its endpoint and the upstream's request id.
        let mut responses = call("triage", "gpt-4o-mini", datetime!(2026-11-01 10:00:02 UTC), 200);
        responses.endpoint = Endpoint::Responses;
        responses.upstream_request_id = Some("req_0123abcd".into());
        store.insert_calls(std::slice::from_ref(&responses)).await.expect("insert");
        assert_eq!(store.get_call(&responses.id.to_string()).await.expect("get"), vec![responses]);
    })
    .await;
}

#[tokio::test]
async fn filters_select_by_who_served_by_text_and_by_page() {
    on_both_backends(|store| async move {
        let mut calls: Vec<CallRecord> = (0..5)
            .map(|idx| {
                call("triage", "gpt-4o-mini", datetime!(2026-11-01 10:00 UTC) + time::Duration::minutes(idx), 200)
            })
            .collect();
        calls[1].request = r#"{"messages":[{"role":"user","content":"Where is 100% Lake_Baikal?"}]}"#.to_string();
        calls[3].routing =
            Some(Routing { policy: "cascade:0.9".into(), served_by: ServedBy::Understudy, ..Routing::default() });
        store.insert_calls(&calls).await.expect("insert");
        let ids = |found: Vec<CallRecord>| found.into_iter().map(|c| c.id).collect::<Vec<_>>();

        let understudy = CallFilter { served_by: Some(ServedBy::Understudy), ..Default::default() };
        assert_eq!(ids(store.list_calls(&understudy).await.expect("list")), vec![calls[3].id]);
        let lead = CallFilter { served_by: Some(ServedBy::Lead), ..Default::default() };
        assert_eq!(store.count_calls(&lead).await.expect("count"), 4);

        // Case-insensitive, and LIKE's wildcards match only themselves.
        for text in ["lake_baikal", "100% LAKE", "WHERE IS"] {
            let found = CallFilter { text: Some(text.into()), ..Default::default() };
            assert_eq!(ids(store.list_calls(&found).await.expect("list")), vec![calls[1].id], "{text}");
        }
        for text in ["lake%baikal", "lakexbaikal", "1000"] {
            let found = CallFilter { text: Some(text.into()), ..Default::default() };
            assert_eq!(store.count_calls(&found).await.expect("count"), 0, "{text}");
        }

        let page = CallFilter { limit: Some(2), offset: Some(2), order: CallOrder::NewestFirst, ..Default::default() };
        assert_eq!(ids(store.list_calls(&page).await.expect("list")), vec![calls[2].id, calls[1].id]);
        let rest = CallFilter { offset: Some(3), ..Default::default() };
        assert_eq!(ids(store.list_calls(&rest).await.expect("list")), vec![calls[3].id, calls[4].id]);
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
        let (recorder, handle) = Recorder::start(
            store.clone(),
            RecorderConfig { queue_capacity: 8, batch_size: 5, ..RecorderConfig::default() },
        );
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

fn dataset(id: &str, task: &str, at: OffsetDateTime) -> DatasetRecord {
    DatasetRecord {
        id: id.to_string(),
        task: task.to_string(),
        created_at: at,
        kind: TaskKind::Label,
        labels: vec!["HUM".to_string(), "NUM".to_string()],
        n_train: 7,
        n_validation: 1,
        n_test: 2,
        parameters: r#"{"test_share":0.2}"#.to_string(),
        path: "/data/datasets/x".to_string(),
    }
}

#[tokio::test]
async fn datasets_register_once_and_list_newest_first() {
    on_both_backends(|store| async move {
        let older = dataset("ds-aaaa00000001", "trec", datetime!(2026-11-01 10:00:00.5 UTC));
        let mut newer = dataset("ds-bbbb00000002", "trec", datetime!(2026-11-02 10:00 UTC));
        newer.kind = TaskKind::Generation;
        newer.labels = Vec::new();
        let other = dataset("ds-cccc00000003", "triage", datetime!(2026-11-03 10:00 UTC));
        assert!(store.register_dataset(&older).await.expect("register"));
        assert!(store.register_dataset(&newer).await.expect("register"));
        assert!(store.register_dataset(&other).await.expect("register"));

        // The same id again is not a second registration, and the first one stays.
        let mut again = older.clone();
        again.created_at = datetime!(2026-12-01 00:00 UTC);
        assert!(!store.register_dataset(&again).await.expect("register again"));
        assert_eq!(store.get_dataset(&older.id).await.expect("get"), vec![older.clone()]);

        assert_eq!(store.get_dataset("ds-bbbb").await.expect("prefix"), vec![newer.clone()]);
        assert_eq!(store.get_dataset("ds-").await.expect("ambiguous").len(), 2);
        assert!(store.get_dataset("ds-ffff").await.expect("missing").is_empty());

        let trec = store.list_datasets(Some("trec")).await.expect("list");
        assert_eq!(trec, vec![newer.clone(), older.clone()]);
        assert_eq!(store.list_datasets(None).await.expect("list all").len(), 3);
        assert!(store.list_datasets(Some("nope")).await.expect("list none").is_empty());
    })
    .await;
}

#[tokio::test]
async fn model_versions_register_and_list_newest_first() {
    on_both_backends(|store| async move {
        let version = |id: &str, at: OffsetDateTime| understudy_store::ModelVersionRecord {
            id: id.to_string(),
            task: "trec".into(),
            dataset_id: "ds-0123456789ab".into(),
            method: "classifier".into(),
            base_model: "models/all-MiniLM-L6-v2".into(),
            path: format!("understudies/{id}"),
            created_at: at,
            wall_seconds: 321.5,
            metrics: r#"{"validation_accuracy":0.93}"#.into(),
        };
        let older = version("mv-older", datetime!(2026-11-01 10:00 UTC));
        let newer = version("mv-newer", datetime!(2026-11-02 10:00 UTC));
        store.register_model_version(&older).await.expect("register");
        store.register_model_version(&newer).await.expect("register");
        assert!(store.register_model_version(&newer).await.is_err(), "ids are unique");
        let listed = store.list_model_versions("trec").await.expect("list");
        assert_eq!(listed, vec![newer.clone(), older]);
        assert_eq!(store.get_model_version("mv-ne").await.expect("get"), vec![newer]);
        assert!(store.list_model_versions("other").await.expect("list").is_empty());
    })
    .await;
}

#[tokio::test]
async fn routing_round_trips_and_sums_into_the_savings_report() {
    on_both_backends(|store| async move {
        let at = datetime!(2026-11-05 10:00 UTC);
        let mut served = call("triage", "minilm", at, 200);
        served.routing = Some(Routing {
            policy: "cascade:0.9".into(),
            served_by: ServedBy::Understudy,
            understudy_model: Some("minilm".into()),
            understudy_answer: Some("HUM".into()),
            understudy_confidence: Some(0.97),
            understudy_latency_ms: Some(4.5),
            understudy_cost: Money(0.0001),
            lead_cost_avoided: Money(0.002),
            ..Routing::default()
        });
        let mut fell_back = call("triage", "gpt-4o-mini", at, 200);
        fell_back.routing = Some(Routing {
            policy: "cascade:0.9".into(),
            fallback_reason: Some("low_confidence".into()),
            understudy_answer: Some("NUM".into()),
            understudy_cost: Money(0.0001),
            agreement: Some(false),
            ..Routing::default()
        });
        let plain = call("triage", "gpt-4o-mini", at, 200);
        store.insert_calls(&[served.clone(), fell_back.clone(), plain]).await.expect("insert");
        assert_eq!(store.get_call(&served.id.to_string()).await.expect("get"), vec![served]);
        assert_eq!(store.get_call(&fell_back.id.to_string()).await.expect("get"), vec![fell_back]);
        let rows = store.savings_report(&CallFilter::default()).await.expect("savings");
        assert_eq!(rows.len(), 1);
        let row = &rows[0];
        assert_eq!((row.n_calls, row.n_served_by_understudy, row.n_compared, row.n_agreed), (3, 1, 1, 0));
        assert!((row.cost.dollars() - 0.003).abs() < 1e-12);
        assert!((row.understudy_cost.dollars() - 0.0002).abs() < 1e-12);
        assert!((row.lead_cost_avoided.dollars() - 0.002).abs() < 1e-12);
    })
    .await;
}

#[tokio::test]
async fn the_newest_policy_change_of_a_task_is_current() {
    on_both_backends(|store| async move {
        let change = |task: &str, policy: &str| PolicyChange {
            id: Uuid::now_v7().to_string(),
            task: task.into(),
            policy: policy.into(),
            understudy: Some("mv-1".into()),
            understudy_path: Some("/models/mv-1".into()),
            created_at: datetime!(2026-11-05 10:00 UTC),
            note: None,
        };
        for (task, policy) in [("a", "shadow"), ("b", "lead"), ("a", "cascade:0.9"), ("a", "lead")] {
            store.insert_policy_change(&change(task, policy)).await.expect("insert");
        }
        let current: Vec<(String, String)> =
            store.current_policies().await.expect("current").into_iter().map(|c| (c.task, c.policy)).collect();
        assert_eq!(current, vec![("a".into(), "lead".into()), ("b".into(), "lead".into())]);
        let history: Vec<String> =
            store.policy_history("a").await.expect("history").into_iter().map(|c| c.policy).collect();
        assert_eq!(history, vec!["lead", "cascade:0.9", "shadow"]);
    })
    .await;
}

#[tokio::test]
async fn autopilot_transitions_come_back_newest_first_with_their_evidence() {
    on_both_backends(|store| async move {
        let event = |task: &str, from: &str, to: &str, reason: &str| AutopilotEvent {
            id: Uuid::now_v7().to_string(),
            task: task.into(),
            created_at: datetime!(2026-11-05 10:00 UTC),
            stage_from: from.into(),
            stage_to: to.into(),
            reason: reason.into(),
            evidence: r#"{"n_calls":200}"#.into(),
        };
        let first = event("a", "collecting", "training", "200 calls");
        store.insert_autopilot_event(&first).await.unwrap();
        store.insert_autopilot_event(&event("b", "collecting", "training", "x")).await.unwrap();
        // Text is stored safely on both backends: a NUL does not fail the write.
        store.insert_autopilot_event(&event("a", "training", "shadow", "certified\0 on validation")).await.unwrap();
        let history = store.autopilot_history("a").await.unwrap();
        let stages: Vec<(&str, &str)> = history.iter().map(|e| (e.stage_from.as_str(), e.stage_to.as_str())).collect();
        assert_eq!(stages, vec![("training", "shadow"), ("collecting", "training")]);
        assert_eq!(history[0].reason, "certified\u{FFFD} on validation");
        assert_eq!(history[1], first);
        assert!(store.autopilot_history("nobody").await.unwrap().is_empty());
    })
    .await;
}

#[tokio::test]
async fn the_latest_feedback_on_each_of_a_tasks_calls_counts() {
    on_both_backends(|store| async move {
        let first = call("triage", "gpt-4o-mini", datetime!(2026-11-01 10:00 UTC), 200);
        let second = call("triage", "gpt-4o-mini", datetime!(2026-11-01 10:01 UTC), 200);
        let unrated = call("triage", "gpt-4o-mini", datetime!(2026-11-01 10:02 UTC), 200);
        let other_task = call("billing", "gpt-4o-mini", datetime!(2026-11-01 10:03 UTC), 200);
        store.insert_calls(&[first.clone(), second.clone(), unrated.clone(), other_task.clone()]).await.unwrap();
        assert!(store.call_exists(first.id).await.unwrap());
        assert!(!store.call_exists(Uuid::now_v7()).await.unwrap());

        let verdict = |call: &CallRecord, score, at, comment: Option<&str>| Feedback {
            id: Uuid::now_v7(),
            call_id: call.id,
            score,
            comment: comment.map(str::to_string),
            created_at: at,
        };
        // The first call is rated down, then up: up counts. The second the
        // other way round, with the later verdict given in the same
        // millisecond (the id orders it).
        store
            .add_feedback(&verdict(&first, FeedbackScore::Negative, datetime!(2026-11-02 09:00 UTC), None))
            .await
            .unwrap();
        store
            .add_feedback(&verdict(&first, FeedbackScore::Positive, datetime!(2026-11-02 10:00 UTC), Some("right")))
            .await
            .unwrap();
        let at = datetime!(2026-11-02 11:00 UTC);
        store.add_feedback(&verdict(&second, FeedbackScore::Positive, at, None)).await.unwrap();
        store.add_feedback(&verdict(&second, FeedbackScore::Negative, at, Some("wrong label"))).await.unwrap();
        store.add_feedback(&verdict(&other_task, FeedbackScore::Negative, at, None)).await.unwrap();

        let latest = store.task_feedback("triage").await.unwrap();
        assert_eq!(latest.len(), 2, "only rated calls of the task: {latest:?}");
        assert_eq!(latest[&first.id].score, FeedbackScore::Positive);
        assert_eq!(latest[&first.id].comment.as_deref(), Some("right"));
        assert_eq!(latest[&second.id].score, FeedbackScore::Negative);
        assert_eq!(latest[&second.id].comment.as_deref(), Some("wrong label"));
        assert!(!latest.contains_key(&unrated.id));
        assert_eq!(store.task_feedback("billing").await.unwrap().len(), 1);
        assert!(store.task_feedback("nobody").await.unwrap().is_empty());

        let history = store.call_feedback(first.id).await.unwrap();
        let scores: Vec<FeedbackScore> = history.iter().map(|feedback| feedback.score).collect();
        assert_eq!(scores, vec![FeedbackScore::Negative, FeedbackScore::Positive]);
        assert_eq!(history[1].created_at, datetime!(2026-11-02 10:00 UTC));

        // The latest verdict on a list of calls, whatever their task.
        let listed = store.latest_feedback(&[first.id, other_task.id, unrated.id]).await.unwrap();
        assert_eq!(listed.len(), 2, "{listed:?}");
        assert_eq!(listed[&first.id], latest[&first.id]);
        assert_eq!(listed[&other_task.id].score, FeedbackScore::Negative);
        assert!(store.latest_feedback(&[]).await.unwrap().is_empty());

        // Imported calls and their verdicts are written together.
        let imported = call("triage", "gpt-4o-mini", datetime!(2026-11-03 10:00 UTC), 200);
        let imported_verdict = verdict(&imported, FeedbackScore::Positive, datetime!(2026-11-03 11:00 UTC), Some("ok"));
        store
            .insert_calls_with_feedback(std::slice::from_ref(&imported), std::slice::from_ref(&imported_verdict))
            .await
            .unwrap();
        assert!(store.call_exists(imported.id).await.unwrap());
        assert_eq!(store.call_feedback(imported.id).await.unwrap(), vec![imported_verdict]);
        // A failure writes neither: the call is a duplicate, so its verdict is not kept.
        let duplicate_verdict = verdict(&imported, FeedbackScore::Negative, datetime!(2026-11-03 12:00 UTC), None);
        assert!(store.insert_calls_with_feedback(std::slice::from_ref(&imported), &[duplicate_verdict]).await.is_err());
        assert_eq!(store.call_feedback(imported.id).await.unwrap().len(), 1);
    })
    .await;
}

fn gateway_key(name: &str, hash: &str) -> understudy_types::GatewayKey {
    understudy_types::GatewayKey {
        id: Uuid::now_v7().to_string(),
        name: name.to_string(),
        prefix: "us-abcdef".to_string(),
        hash: hash.to_string(),
        tasks: None,
        models: None,
        budget: None,
        rpm: None,
        tpm: None,
        expires_at: None,
        admin: false,
        created_at: datetime!(2026-12-01 09:00:00.250 UTC),
        revoked_at: None,
    }
}

#[tokio::test]
async fn keys_round_trip_and_a_live_name_is_taken_once() {
    on_both_backends(|store| async move {
        let scoped = understudy_types::GatewayKey {
            tasks: Some(vec!["triage".into(), "summary".into()]),
            models: Some(vec![]),
            budget: Some(understudy_types::Budget { usd: 50.0, period: understudy_types::BudgetPeriod::Month }),
            rpm: Some(600),
            tpm: Some(200_000),
            expires_at: Some(datetime!(2027-01-01 00:00 UTC)),
            admin: true,
            ..gateway_key("team-a", "aa11")
        };
        let plain = gateway_key("team-b", "bb22");
        store.insert_key(&scoped).await.expect("insert");
        store.insert_key(&plain).await.expect("insert");
        assert_eq!(store.list_keys().await.expect("list"), vec![scoped.clone(), plain.clone()]);
        assert_eq!(store.key_by_hash("aa11").await.expect("by hash"), Some(scoped.clone()));
        assert_eq!(store.key_by_hash("cc33").await.expect("by hash"), None);
        assert_eq!(store.find_keys("team-b").await.expect("by name"), vec![plain.clone()]);
        assert_eq!(store.find_keys(&scoped.id).await.expect("by id"), vec![scoped.clone()]);
        let all = store.find_keys(&scoped.id[..8]).await.expect("by prefix");
        assert!(all.contains(&scoped) && all.contains(&plain), "ids made together share a prefix");

        let again = gateway_key("team-a", "dd44");
        let error = store.insert_key(&again).await.expect_err("name taken");
        assert!(matches!(error, understudy_store::StoreError::KeyNameTaken(ref name) if name == "team-a"), "{error}");
        // Revoked, the name is free for a replacement; the first revocation time stays.
        let at = datetime!(2026-12-02 10:00 UTC);
        assert!(store.revoke_key(&scoped.id, at).await.expect("revoke"));
        assert!(store.revoke_key(&scoped.id, datetime!(2026-12-03 10:00 UTC)).await.expect("revoke again"));
        assert!(!store.revoke_key("no-such-key", at).await.expect("revoke unknown"));
        assert_eq!(store.key_by_hash("aa11").await.expect("by hash").and_then(|key| key.revoked_at), Some(at));
        store.insert_key(&again).await.expect("a revoked key's name is free");
    })
    .await;
}

#[tokio::test]
async fn calls_carry_their_key_and_costs_group_by_it() {
    on_both_backends(|store| async move {
        let team_a = understudy_types::KeyRef { id: "key-a".into(), name: "team-a".into() };
        let team_b = understudy_types::KeyRef { id: "key-b".into(), name: "team-b".into() };
        let with_key = |key: &understudy_types::KeyRef, at: OffsetDateTime, status: u16| CallRecord {
            key: Some(key.clone()),
            ..call("triage", "gpt-4o-mini", at, status)
        };
        let calls = vec![
            with_key(&team_a, datetime!(2026-11-01 10:00 UTC), 200),
            with_key(&team_a, datetime!(2026-11-01 11:00 UTC), 429),
            with_key(&team_b, datetime!(2026-11-01 12:00 UTC), 200),
            with_key(&team_a, datetime!(2026-11-02 10:00 UTC), 200),
            call("triage", "gpt-4o-mini", datetime!(2026-11-02 11:00 UTC), 200),
        ];
        store.insert_calls(&calls).await.expect("insert");
        let found = store.get_call(&calls[0].id.to_string()).await.expect("get");
        assert_eq!(found, vec![calls[0].clone()]);

        let rows = store.key_cost_report(&CallFilter::default()).await.expect("report");
        let summary: Vec<(Option<String>, String, u64, u64)> = rows
            .iter()
            .map(|row| (row.key.as_ref().map(|key| key.name.clone()), format_day(row.day), row.n_calls, row.n_errors))
            .collect();
        assert_eq!(
            summary,
            vec![
                (Some("team-a".into()), "2026-11-01".into(), 2, 1),
                (Some("team-b".into()), "2026-11-01".into(), 1, 0),
                (None, "2026-11-02".into(), 1, 0),
                (Some("team-a".into()), "2026-11-02".into(), 1, 0),
            ]
        );
        assert!((rows[0].cost.dollars() - 0.002).abs() < 1e-12);

        let spent = store.key_spend_since("key-a", datetime!(2026-11-01 10:30 UTC)).await.expect("spend");
        assert!((spent.dollars() - 0.002).abs() < 1e-12, "{spent:?}");
        assert_eq!(store.key_spend_since("key-z", datetime!(2026-01-01 00:00 UTC)).await.expect("spend"), Money(0.0));

        let owner = store.call_owner(calls[1].id).await.expect("owner");
        assert_eq!(owner, Some(understudy_store::CallOwner { key_id: Some("key-a".into()), succeeded: false }));
        let owner = store.call_owner(calls[4].id).await.expect("owner");
        assert_eq!(owner, Some(understudy_store::CallOwner { key_id: None, succeeded: true }));
        assert_eq!(store.call_owner(Uuid::now_v7()).await.expect("owner"), None);
    })
    .await;
}

fn format_day(at: OffsetDateTime) -> String {
    at.format(time::macros::format_description!("[year]-[month]-[day]")).expect("format")
}

/// Varied calls over three days: tasks, models, keys, a task-less call,
/// an error, routed and audited calls.
fn varied_calls() -> Vec<CallRecord> {
    let key = understudy_types::KeyRef { id: "key-a".into(), name: "team-a".into() };
    let mut calls = Vec::new();
    for day in 0..3i64 {
        let at = datetime!(2026-11-05 10:30 UTC) + time::Duration::days(day);
        for idx in 0..7i64 {
            let task = if idx % 3 == 0 { "triage" } else { "summarize" };
            let mut one =
                call(task, if idx % 2 == 0 { "gpt-4o-mini" } else { "minilm" }, at + time::Duration::minutes(idx), 200);
            one.cost = Money(0.001 * (idx + 1) as f64);
            if idx == 5 {
                one.status = 502;
                one.error = Some("upstream failed".into());
            }
            if idx % 2 == 1 {
                one.key = Some(key.clone());
            }
            if idx == 6 {
                one.task = None;
            }
            if idx % 2 == 1 && idx != 5 {
                one.routing = Some(Routing {
                    policy: "cascade:0.9".into(),
                    served_by: ServedBy::Understudy,
                    understudy_answer: Some("HUM".into()),
                    understudy_cost: Money(0.0001),
                    lead_cost_avoided: Money(0.002),
                    audit_answer: (idx == 1).then(|| "HUM".to_string()),
                    audit_agreement: (idx == 1).then_some(day != 1),
                    audit_cost: Money(if idx == 1 { 0.002 } else { 0.0 }),
                    ..Routing::default()
                });
            } else if idx == 2 {
                one.routing = Some(Routing {
                    policy: "cascade:0.9".into(),
                    fallback_reason: Some("low_confidence".into()),
                    understudy_answer: Some("NUM".into()),
                    agreement: Some(day == 0),
                    ..Routing::default()
                });
            }
            calls.push(one);
        }
    }
    calls
}

/// Reports as comparable tuples: money rounded, since the two sources add
/// the same amounts in different orders.
fn savings_view(rows: &[understudy_store::SavingsRow]) -> Vec<(String, OffsetDateTime, [u64; 6], [i64; 4])> {
    let cents = |money: Money| (money.dollars() * 1e9).round() as i64;
    rows.iter()
        .map(|row| {
            (
                row.task.clone(),
                row.day,
                [
                    row.n_calls,
                    row.n_served_by_understudy,
                    row.n_compared,
                    row.n_agreed,
                    row.n_audited,
                    row.n_audit_agreed,
                ],
                [cents(row.cost), cents(row.understudy_cost), cents(row.lead_cost_avoided), cents(row.audit_cost)],
            )
        })
        .collect()
}

fn cost_view(rows: &[understudy_store::CostRow]) -> Vec<(Option<String>, String, OffsetDateTime, [u64; 4], i64)> {
    rows.iter()
        .map(|row| {
            (
                row.task.clone(),
                row.model.clone(),
                row.day,
                [row.n_calls, row.n_errors, row.usage.prompt_tokens, row.usage.completion_tokens],
                (row.cost.dollars() * 1e9).round() as i64,
            )
        })
        .collect()
}

#[tokio::test]
async fn daily_rollups_answer_reports_as_the_calls_table_does_and_count_a_replayed_call_once() {
    on_both_backends(|store| async move {
        let calls = varied_calls();
        store.insert_calls(&calls[..10]).await.expect("insert");
        // The recorder's write of a spill replay: the first 10 again, and the rest.
        store.record_calls(&calls).await.expect("record");
        // A filter the rollups answer (whole days), and the same calls
        // through one they cannot (a bound 1 ms after midnight).
        let by_day = CallFilter { since: Some(datetime!(2026-11-05 00:00 UTC)), ..CallFilter::default() };
        let by_calls = CallFilter { since: Some(datetime!(2026-11-05 00:00:00.001 UTC)), ..CallFilter::default() };
        let savings = store.savings_report(&by_day).await.expect("savings");
        assert_eq!(savings_view(&savings), savings_view(&store.savings_report(&by_calls).await.expect("savings")));
        assert_eq!(savings_view(&savings), savings_view(&store.savings_report(&CallFilter::default()).await.unwrap()));
        // By hand: 2 tasks x 3 days; triage has idx 0 and 3 a day.
        assert_eq!(savings.len(), 6);
        let triage_day1 = savings.iter().find(|row| row.task == "triage").expect("triage");
        assert_eq!(triage_day1.n_calls, 2);
        assert_eq!(triage_day1.n_served_by_understudy, 1);
        let summarize: Vec<_> = savings.iter().filter(|row| row.task == "summarize").collect();
        assert_eq!(summarize.iter().map(|row| row.n_calls).sum::<u64>(), 12);
        assert_eq!(summarize.iter().map(|row| row.n_audited).sum::<u64>(), 3);
        assert_eq!(summarize.iter().map(|row| row.n_audit_agreed).sum::<u64>(), 2);
        assert_eq!(summarize.iter().map(|row| row.n_compared).sum::<u64>(), 3);

        let costs = store.cost_report(&by_day).await.expect("costs");
        assert_eq!(cost_view(&costs), cost_view(&store.cost_report(&by_calls).await.expect("costs")));
        assert_eq!(costs.iter().map(|row| row.n_calls).sum::<u64>(), 21, "every call once");
        assert_eq!(costs.iter().map(|row| row.n_errors).sum::<u64>(), 3);
        assert!(costs.iter().any(|row| row.task.is_none()), "the task-less call is its own row");
        let task_day = CallFilter {
            task: Some("summarize".into()),
            since: Some(datetime!(2026-11-06 00:00 UTC)),
            until: Some(datetime!(2026-11-07 00:00 UTC)),
            ..CallFilter::default()
        };
        let task_calls = CallFilter { since: Some(datetime!(2026-11-06 00:00:00.001 UTC)), ..task_day.clone() };
        assert_eq!(
            cost_view(&store.cost_report(&task_day).await.unwrap()),
            cost_view(&store.cost_report(&task_calls).await.unwrap())
        );
        let keys = store.key_cost_report(&by_day).await.expect("keys");
        let keys_calls = store.key_cost_report(&by_calls).await.expect("keys");
        assert_eq!(keys.len(), keys_calls.len());
        for (a, b) in keys.iter().zip(&keys_calls) {
            assert_eq!((&a.key, a.day, a.n_calls, a.n_errors), (&b.key, b.day, b.n_calls, b.n_errors));
        }
        assert_eq!(keys.iter().filter(|row| row.key.is_some()).map(|row| row.n_calls).sum::<u64>(), 9);
        // One rollup row per day, task, model, endpoint and key: far fewer than calls.
        assert!(store.count_rollup_rows().await.unwrap() < 21);
    })
    .await;
}

#[tokio::test]
async fn each_batch_adds_only_its_own_calls_to_the_rollups() {
    // Each batch adds its own calls' totals to the rollup rows the earlier
    // batches began: counted again or missed, a report would differ.
    on_both_backends(|store| async move {
        let calls = varied_calls();
        for batch in [&calls[..1], &calls[1..7], &calls[7..13], &calls[13..]] {
            store.insert_calls(batch).await.expect("insert");
        }
        let by_day = CallFilter { since: Some(datetime!(2026-11-05 00:00 UTC)), ..CallFilter::default() };
        let by_calls = CallFilter { since: Some(datetime!(2026-11-05 00:00:00.001 UTC)), ..CallFilter::default() };
        let costs = store.cost_report(&by_day).await.expect("costs");
        assert_eq!(costs.iter().map(|row| row.n_calls).sum::<u64>(), calls.len() as u64, "every call once");
        assert_eq!(cost_view(&costs), cost_view(&store.cost_report(&by_calls).await.expect("costs")));
        let savings = store.savings_report(&by_day).await.expect("savings");
        assert_eq!(savings_view(&savings), savings_view(&store.savings_report(&by_calls).await.expect("savings")));
    })
    .await;
}

/// A seeded stream of numbers for the random calls below (SplitMix64).
struct Seeded(u64);

impl Seeded {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// Calls that vary every field a rollup total or grouping reads, including
/// the names the store cuts or cleans before it keeps them.
fn random_calls(seed: u64, n: usize) -> Vec<CallRecord> {
    let mut random = Seeded(seed);
    let long_name = "m".repeat(700);
    let tasks = [None, Some("triage"), Some("summarize"), Some("t\0nul"), Some(long_name.as_str())];
    let models = ["gpt-4o-mini", "minilm", "mo\0del", long_name.as_str()];
    let endpoints = [Endpoint::ChatCompletions, Endpoint::Completions, Endpoint::Embeddings];
    let keys = [
        None,
        Some(understudy_types::KeyRef { id: "key-a".into(), name: "team-a".into() }),
        Some(understudy_types::KeyRef { id: "key-\0b".into(), name: "team-\0b".into() }),
    ];
    let start = datetime!(2026-11-05 00:00 UTC);
    (0..n)
        .map(|_| {
            let at = start + time::Duration::milliseconds(random.below(4 * 86_400_000) as i64);
            let status = *random.pick(&[200u16, 200, 200, 201, 199, 429, 502]);
            let model = *random.pick(&models);
            let mut one = call("x", model, at, status);
            one.task = random.pick(&tasks).map(str::to_string);
            one.endpoint = *random.pick(&endpoints);
            one.error = (random.below(5) == 0).then(|| "cut off".to_string());
            one.usage = Usage { prompt_tokens: random.below(1000), completion_tokens: random.below(300) };
            one.cost = Money(random.below(10_000) as f64 * 1e-7);
            one.key = random.pick(&keys).clone();
            let option_bool = |random: &mut Seeded| match random.below(3) {
                0 => None,
                1 => Some(false),
                _ => Some(true),
            };
            if random.below(3) != 0 {
                one.routing = Some(Routing {
                    policy: "cascade:0.9".into(),
                    served_by: if random.below(2) == 0 { ServedBy::Lead } else { ServedBy::Understudy },
                    agreement: option_bool(&mut random),
                    understudy_cost: Money(random.below(100) as f64 * 1e-7),
                    lead_cost_avoided: Money(random.below(1000) as f64 * 1e-7),
                    audit_agreement: option_bool(&mut random),
                    audit_cost: Money(random.below(1000) as f64 * 1e-7),
                    ..Routing::default()
                });
            }
            one
        })
        .collect()
}

#[tokio::test]
async fn rollups_added_up_in_rust_agree_with_the_calls_table_over_seeded_random_calls() {
    // Each batch's totals are summed by each measure's Rust rule; reports
    // over the calls table sum the same measures' SQL. Written in random
    // batches, with replays and a call repeated within a batch, both must
    // give every report the same answer.
    on_both_backends(|store| async move {
        for seed in 0..3u64 {
            let calls = random_calls(seed, 240);
            let mut random = Seeded(seed + 100);
            let mut written = 0;
            while written < calls.len() {
                let end = (written + 1 + random.below(60) as usize).min(calls.len());
                let batch = &calls[written..end];
                match random.below(3) {
                    0 => store.insert_calls(batch).await.expect("insert"),
                    // A replay: some calls already stored, and one twice.
                    1 => {
                        let mut replay: Vec<CallRecord> = calls[written.saturating_sub(5)..end].to_vec();
                        replay.push(batch[0].clone());
                        store.record_calls(&replay).await.expect("record");
                    }
                    _ => store.record_calls(batch).await.expect("record"),
                }
                written = end;
            }
            let by_day = CallFilter::default();
            let by_calls = CallFilter { since: Some(datetime!(2026-11-01 00:00:00.001 UTC)), ..CallFilter::default() };
            let costs = store.cost_report(&by_day).await.expect("costs");
            assert_eq!(
                cost_view(&costs),
                cost_view(&store.cost_report(&by_calls).await.expect("costs")),
                "seed {seed}"
            );
            let expected = (seed + 1) * calls.len() as u64;
            assert_eq!(costs.iter().map(|row| row.n_calls).sum::<u64>(), expected, "every call once");
            assert_eq!(
                savings_view(&store.savings_report(&by_day).await.expect("savings")),
                savings_view(&store.savings_report(&by_calls).await.expect("savings")),
                "seed {seed}"
            );
            let keys = store.key_cost_report(&by_day).await.expect("keys");
            let keys_calls = store.key_cost_report(&by_calls).await.expect("keys");
            let key_view = |rows: &[understudy_store::KeyCostRow]| -> Vec<_> {
                rows.iter()
                    .map(|row| {
                        let cost = (row.cost.dollars() * 1e9).round() as i64;
                        (row.key.clone(), row.day, row.n_calls, row.n_errors, row.usage, cost)
                    })
                    .collect()
            };
            assert_eq!(key_view(&keys), key_view(&keys_calls), "seed {seed}");
            assert!(keys.iter().any(|row| row.key.as_ref().is_some_and(|key| key.name.contains('\u{FFFD}'))));
        }
    })
    .await;
}

#[tokio::test]
async fn retention_clears_old_bodies_then_deletes_old_calls_and_the_ledger_still_counts_them() {
    on_both_backends(|store| async move {
        let now = datetime!(2026-12-01 12:00 UTC);
        let old = call("triage", "m", now - time::Duration::days(40), 200);
        let aged = call("triage", "m", now - time::Duration::days(10), 200);
        let fresh = call("triage", "m", now - time::Duration::days(1), 200);
        store.insert_calls(&[old.clone(), aged.clone(), fresh.clone()]).await.expect("insert");
        let verdict = Feedback {
            id: Uuid::now_v7(),
            call_id: old.id,
            created_at: old.created_at + time::Duration::minutes(1),
            score: FeedbackScore::Negative,
            comment: None,
        };
        store.insert_calls_with_feedback(&[], &[verdict]).await.expect("feedback");
        let before = cost_view(&store.cost_report(&CallFilter::default()).await.unwrap());
        let week = std::time::Duration::from_secs(7 * 86_400);
        let month = std::time::Duration::from_secs(30 * 86_400);
        let pruned = store.prune(now, Some(week), Some(month)).await.expect("prune");
        assert_eq!((pruned.bodies_cleared, pruned.calls_deleted), (1, 1));
        assert!(store.get_call(&old.id.to_string()).await.unwrap().is_empty(), "the old call is gone");
        let kept = store.get_call(&aged.id.to_string()).await.unwrap().remove(0);
        assert_eq!((kept.request.as_str(), kept.response.as_deref()), ("", None), "its bodies are cleared");
        assert_eq!((kept.usage, kept.cost, kept.status), (aged.usage, aged.cost, aged.status), "its metadata stays");
        assert_eq!(store.get_call(&fresh.id.to_string()).await.unwrap(), vec![fresh.clone()]);
        assert_eq!(
            cost_view(&store.cost_report(&CallFilter::default()).await.unwrap()),
            before,
            "the ledger keeps them"
        );
        // A second pass finds nothing new; a later one clears the next.
        assert_eq!(store.prune(now, Some(week), Some(month)).await.unwrap(), understudy_store::Pruned::default());
        let later = store.prune(now + time::Duration::days(7), Some(week), None).await.unwrap();
        assert_eq!(later.bodies_cleared, 1);
        assert_eq!(store.get_call(&fresh.id.to_string()).await.unwrap()[0].request, "");
    })
    .await;
}

#[tokio::test]
async fn a_capped_count_stops_at_its_cap() {
    on_both_backends(|store| async move {
        let at = datetime!(2026-11-05 10:00 UTC);
        let calls: Vec<CallRecord> = (0..30).map(|_| call("triage", "m", at, 200)).collect();
        store.insert_calls(&calls).await.expect("insert");
        assert_eq!(store.count_calls_up_to(&CallFilter::default(), 10).await.unwrap(), 10);
        assert_eq!(store.count_calls_up_to(&CallFilter::default(), 100).await.unwrap(), 30);
        let failed = CallFilter { status: Some(StatusFilter::Error), ..CallFilter::default() };
        assert_eq!(store.count_calls_up_to(&failed, 100).await.unwrap(), 0);
        // Where a scan of the newest n calls starts.
        let spread: Vec<CallRecord> =
            (0..5).map(|idx| call("spread", "m", at + time::Duration::minutes(idx), 200)).collect();
        store.insert_calls(&spread).await.expect("insert");
        let of_task = CallFilter { task: Some("spread".into()), ..CallFilter::default() };
        assert_eq!(store.nth_newest_call_time(&of_task, 2).await.unwrap(), Some(at + time::Duration::minutes(3)));
        assert_eq!(store.nth_newest_call_time(&of_task, 6).await.unwrap(), None);
        // A whole id, and a unique prefix of one.
        let id = spread[4].id.to_string();
        assert_eq!(store.get_call(&id).await.unwrap(), vec![spread[4].clone()]);
        assert_eq!(store.get_call(&id[..30]).await.unwrap(), vec![spread[4].clone()]);
    })
    .await;
}
