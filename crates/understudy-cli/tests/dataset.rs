//! `understudy dataset`, driven as a user would drive it: calls imported into
//! a SQLite store, dataset versions built, exported, re-imported and listed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

mod common;

use common::Workdir;
use serde_json::{json, Value};

impl Workdir {
    fn new(extra_config: &str) -> Workdir {
        let config = format!(
            r#"
[store]
url = "sqlite://calls.db"
{extra_config}

[providers.recorded]
type = "replay"
file = "recorded.jsonl"

[models.replayed]
provider = "recorded"

[tasks.trec]
lead = "replayed"

[tasks.summaries]
lead = "replayed"
kind = "generation"
"#
        );
        Workdir::with_config(&config)
    }
}

fn example(question: &str, label: &str, minute: usize) -> Value {
    json!({
        "messages": [
            {"role": "system", "content": "Answer with one label."},
            {"role": "user", "content": question},
            {"role": "assistant", "content": label},
        ],
        "model": "replayed",
        "created_at": format!("2026-10-01T{:02}:{:02}:00Z", minute / 60, minute % 60),
    })
}

const LONG_QUESTION: &str = "My order arrived yesterday but the box was crushed and two of the six glasses inside \
    were broken, the others look fine. I would like a replacement for the broken ones rather than a refund, and \
    I can send photos of the damage if that helps. What should I do next?";

/// 40 distinct labelled questions, one a minute, then an exact duplicate, a
/// near-duplicate pair and a question with an e-mail address in it.
fn calls() -> Vec<Value> {
    let subjects =
        ["Hamlet", "the Moon", "a quark", "Everest", "the Nile", "Mozart", "a lighthouse", "Saturn", "Lisbon", "zinc"];
    let forms = [("Who discovered", "HUM"), ("How far away is", "NUM"), ("What is", "DESC"), ("Where is", "LOC")];
    let mut lines = Vec::new();
    for (form, label) in forms {
        for subject in subjects {
            lines.push(example(&format!("{form} {subject}?"), label, lines.len()));
        }
    }
    lines.push(example("Who  discovered Hamlet?", "HUM", 40));
    lines.push(example(LONG_QUESTION, "DESC", 41));
    lines.push(example(&LONG_QUESTION.replace("yesterday", "on Monday"), "DESC", 42));
    lines.push(example("Where does jane.doe@example.com live?", "LOC", 43));
    lines
}

fn created_at(line: &str) -> String {
    let value: Value = serde_json::from_str(line).expect("json line");
    value["created_at"].as_str().expect("created_at").to_string()
}

#[test]
fn build_export_reimport_list_and_show() {
    let workdir = Workdir::new("");
    workdir.write_lines("calls.jsonl", &calls());
    workdir.run_ok(&["import", "--task", "trec", "calls.jsonl"]);

    let built = workdir.run_ok(&["dataset", "build", "--task", "trec", "--scrub"]);
    assert!(built.contains("(new)"), "{built}");
    assert!(built.contains("trec, label task (detected)"), "{built}");
    // 44 calls less one exact and one near-duplicate: 42 rows.
    assert!(built.contains("rows: 30 train, 4 validation, 8 test"), "{built}");
    assert!(built.contains("1 exact duplicates, 1 near-duplicates"), "{built}");
    assert!(built.contains("scrubbed: 1 rows (1 e-mail addresses"), "{built}");
    assert!(built.contains("prompt overlap: train/test 0"), "{built}");
    assert!(built.contains("labels (4)"), "{built}");
    let id = built.lines().next().and_then(|line| line.split_whitespace().nth(1)).expect("id").to_string();
    assert!(id.starts_with("ds-") && id.len() == 15, "{id}");
    for file in ["train.jsonl", "validation.jsonl", "test.jsonl", "manifest.json"] {
        assert!(workdir.path("datasets").join(&id).join(file).is_file(), "{file} is written next to the config");
    }

    // The same calls and parameters: the same id, registered once.
    let again = workdir.run_ok(&["dataset", "build", "--task", "trec", "--scrub"]);
    assert!(again.starts_with(&format!("dataset {id} (already registered")), "{again}");
    assert_eq!(workdir.run_ok(&["dataset", "list", "--json"]).lines().count(), 1);

    // Other parameters: another version.
    let other: Value = serde_json::from_str(&workdir.run_ok(&[
        "dataset",
        "build",
        "--task",
        "trec",
        "--scrub",
        "--test-share",
        "0.3",
        "--json",
    ]))
    .expect("manifest json");
    let other_id = other["id"].as_str().expect("id").to_string();
    assert_ne!(other_id, id);
    assert_eq!(other["counts"], json!({"train": 25, "validation": 4, "test": 13}));
    assert_eq!(other["parameters"]["test_share"], json!(0.3));
    assert_eq!(other["labels"], json!(["DESC", "LOC", "HUM", "NUM"]));
    let listed = workdir.run_ok(&["dataset", "list", "--task", "trec"]);
    assert_eq!(listed.lines().count(), 3, "a header and two versions: {listed}");
    assert!(listed.lines().nth(1).is_some_and(|line| line.starts_with(&other_id)), "newest first: {listed}");
    assert_eq!(workdir.run_ok(&["dataset", "list", "--task", "summaries"]).lines().count(), 1);

    // Export: splits in time order, scrubbed, in the import format.
    workdir.run_ok(&["dataset", "export", &id, "--split", "test", "-o", "test.jsonl"]);
    let test = std::fs::read_to_string(workdir.path("test.jsonl")).expect("test split");
    let train = workdir.run_ok(&["dataset", "export", &id, "--split", "train"]);
    assert_eq!((train.lines().count(), test.lines().count()), (30, 8));
    let newest_train = train.lines().map(created_at).max().expect("train rows");
    let oldest_test = test.lines().map(created_at).min().expect("test rows");
    assert!(newest_train < oldest_test, "{newest_train} vs {oldest_test}");
    let all = workdir.run_ok(&["dataset", "export", &id[..8]]);
    assert_eq!(all.lines().count(), 42);
    assert!(all.contains("Where does <EMAIL> live?") && !all.contains("jane.doe"), "{all}");
    assert!(all.contains("arrived on Monday") && !all.contains("arrived yesterday"), "the newer near-duplicate stays");

    // The export comes back in as a dataset of the same rows.
    std::fs::write(workdir.path("all.jsonl"), &all).expect("write");
    let imported: Value =
        serde_json::from_str(&workdir.run_ok(&["dataset", "import", "--task", "trec", "all.jsonl", "--json"]))
            .expect("manifest json");
    assert_eq!(imported["counts"], json!({"train": 30, "validation": 4, "test": 8}));
    assert_eq!(imported["parameters"]["source"], "import");
    let imported_id = imported["id"].as_str().expect("id");
    let reexported = workdir.run_ok(&["dataset", "export", imported_id]);
    assert_eq!(reexported, all, "a round trip through import keeps every row and its split");

    let shown: Value = serde_json::from_str(&workdir.run_ok(&["dataset", "show", &id, "--json"])).expect("json");
    assert_eq!(shown["id"], id.as_str());
    assert_eq!(shown["filters"]["near_duplicates"], 1);
    assert_eq!(shown["overlap"]["train_test"], 0);
    assert!(shown["path"].as_str().is_some_and(|path| path.ends_with(&id)));
    let shown_text = workdir.run_ok(&["dataset", "show", &id]);
    assert!(shown_text.contains("HUM") && shown_text.contains("files: "), "{shown_text}");
}

#[test]
fn feedback_decides_which_calls_a_dataset_learns_from() {
    let workdir = Workdir::new("");
    workdir.write_lines("calls.jsonl", &calls()[..40]);
    workdir.run_ok(&["import", "--task", "trec", "calls.jsonl"]);
    // The imported calls' ids, by the question each asked.
    let mut ids = std::collections::HashMap::new();
    for line in workdir.run_ok(&["calls", "list", "--task", "trec", "--limit", "100", "--json"]).lines() {
        let call: Value = serde_json::from_str(line).expect("call json");
        let id = call["id"].as_str().expect("id").to_string();
        let shown: Value = serde_json::from_str(&workdir.run_ok(&["calls", "show", &id, "--json"])).expect("json");
        let question = shown["request"]["messages"][1]["content"].as_str().expect("question").to_string();
        ids.insert(question, id);
    }
    assert_eq!(ids.len(), 40);
    let export_all = |built: &str| -> String {
        let id = built.lines().next().and_then(|line| line.split_whitespace().nth(1)).expect("id").to_string();
        workdir.run_ok(&["dataset", "export", &id])
    };

    let unrated = workdir.run_ok(&["dataset", "build", "--task", "trec"]);
    assert!(unrated.contains("removed: 0 by feedback"), "{unrated}");
    assert_eq!(export_all(&unrated).lines().count(), 40);

    // Rejected answers never become rows; the unrated ones stay.
    let rated = workdir.run_ok(&["feedback", "--call", &ids["Who discovered Hamlet?"], "--score", "negative"]);
    assert!(rated.contains("rated negative") && rated.contains("task `trec`"), "{rated}");
    let prefix = &ids["Where is Lisbon?"][..30];
    workdir.run_ok(&["feedback", "--call", prefix, "--score", "-1", "--comment", "it is in Portugal, not a label"]);
    let without_rejected = workdir.run_ok(&["dataset", "build", "--task", "trec"]);
    assert!(without_rejected.contains("(new)"), "{without_rejected}");
    assert!(without_rejected.contains("40 source rows; removed: 2 by feedback,"), "{without_rejected}");
    let rows = export_all(&without_rejected);
    assert_eq!(rows.lines().count(), 38);
    assert!(!rows.contains("Who discovered Hamlet?") && !rows.contains("Where is Lisbon?"), "{rows}");
    assert!(rows.contains("Who discovered the Moon?"), "{rows}");

    // Once some answers are endorsed, only those are learnt from; the
    // latest verdict on a call counts.
    let endorsed = ["Who discovered Hamlet?", "What is a quark?", "How far away is the Moon?", "Where is Everest?"];
    for question in endorsed {
        workdir.run_ok(&["feedback", "--call", &ids[question], "--score", "positive"]);
    }
    workdir.run_ok(&["feedback", "--call", &ids["What is zinc?"], "--score", "up"]);
    workdir.run_ok(&["feedback", "--call", &ids["What is zinc?"], "--score", "down"]);
    let json_manifest: Value =
        serde_json::from_str(&workdir.run_ok(&["dataset", "build", "--task", "trec", "--json"])).expect("manifest");
    assert_eq!(json_manifest["filters"]["feedback"], 36, "{json_manifest}");
    assert_eq!(json_manifest["filters"]["feedback_positive_only"], true);
    let only_endorsed = workdir.run_ok(&["dataset", "build", "--task", "trec"]);
    assert!(only_endorsed.contains("only positively rated calls are used"), "{only_endorsed}");
    let rows = export_all(&only_endorsed);
    let mut questions: Vec<String> = rows
        .lines()
        .map(|line| {
            let row: Value = serde_json::from_str(line).expect("row");
            row["messages"][1]["content"].as_str().expect("question").to_string()
        })
        .collect();
    questions.sort();
    let mut expected: Vec<String> = endorsed.iter().map(|question| question.to_string()).collect();
    expected.sort();
    assert_eq!(questions, expected);
    // Each row carries its call's verdict in `metadata`.
    for line in rows.lines() {
        let row: Value = serde_json::from_str(line).expect("row");
        assert_eq!(row["metadata"]["feedback"], "positive", "{line}");
        assert!(row["metadata"]["feedback_at"].as_str().is_some_and(|at| at.ends_with('Z')), "{line}");
    }

    // `calls export` carries the verdict that counts on every rated call;
    // importing the export into a fresh store brings the verdicts back, so
    // the export after it is the same and the same dataset is built from it.
    let exported = workdir.run_ok(&["calls", "export", "--task", "trec"]);
    let verdicts: std::collections::BTreeMap<String, Value> = exported
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).expect("line"))
        .filter(|line| !line["metadata"].is_null())
        .map(|line| (line["messages"][1]["content"].as_str().expect("question").to_string(), line["metadata"].clone()))
        .collect();
    let rated = ["Who discovered Hamlet?", "What is a quark?", "How far away is the Moon?", "Where is Everest?"];
    assert_eq!(verdicts.len(), 6, "{verdicts:?}");
    for question in rated {
        assert_eq!(verdicts[question]["feedback"], "positive", "{question}");
    }
    assert_eq!(verdicts["What is zinc?"]["feedback"], "negative");
    assert_eq!(verdicts["Where is Lisbon?"]["feedback"], "negative");
    assert_eq!(verdicts["Where is Lisbon?"]["feedback_comment"], "it is in Portugal, not a label");
    std::fs::write(workdir.path("exported.jsonl"), &exported).expect("write");
    std::fs::remove_file(workdir.path("calls.db")).expect("fresh store");
    let imported = workdir.run_ok(&["import", "--task", "trec", "exported.jsonl"]);
    assert!(imported.contains("imported 40 calls (6 with feedback)"), "{imported}");
    assert_eq!(workdir.run_ok(&["calls", "export", "--task", "trec"]), exported);
    let rebuilt = workdir.run_ok(&["dataset", "build", "--task", "trec"]);
    let id_of = |built: &str| built.lines().next().and_then(|line| line.split_whitespace().nth(1)).map(str::to_string);
    assert_eq!(id_of(&rebuilt), id_of(&only_endorsed), "{rebuilt}");
    // `dataset import` reads the verdicts too: only the endorsed lines are rows.
    let from_file = workdir.run_ok(&["dataset", "import", "--task", "trec", "exported.jsonl"]);
    assert!(from_file.contains("only positively rated calls are used"), "{from_file}");
    assert_eq!(export_all(&from_file).lines().count(), 4);

    // Bad feedback is an error and a non-zero exit.
    let error = workdir.run_err(&["feedback", "--call", &ids["What is zinc?"], "--score", "meh"]);
    assert!(error.contains("--score `meh` is not a score"), "{error}");
    let error = workdir.run_err(&["feedback", "--call", "0000dead-beef", "--score", "positive"]);
    assert!(error.contains("no call with id `0000dead-beef`"), "{error}");
}

#[test]
fn the_config_sets_the_kind_and_the_datasets_folder() {
    let workdir = Workdir::new("datasets_dir = \"versions\"");
    workdir.write_lines("calls.jsonl", &calls());
    workdir.run_ok(&["import", "--task", "summaries", "calls.jsonl"]);
    let built = workdir.run_ok(&["dataset", "build", "--task", "summaries", "--near-dup-threshold", "1"]);
    assert!(built.contains("summaries, generation task (set in the config)"), "{built}");
    assert!(built.contains("0 near-duplicates"), "{built}");
    assert!(!built.contains("labels ("), "{built}");
    let id = built.lines().next().and_then(|line| line.split_whitespace().nth(1)).expect("id");
    assert!(workdir.path("versions").join(id).join("manifest.json").is_file());
}

#[test]
fn bad_input_is_a_clear_error_and_a_non_zero_exit() {
    let workdir = Workdir::new("");
    let stderr = workdir.run_err(&["dataset", "build", "--task", "ghost"]);
    assert!(stderr.contains("task `ghost` has no successful chat calls in the store, and it is not in the config"));
    let stderr = workdir.run_err(&["dataset", "show", "ds-000000000000"]);
    assert!(stderr.contains("no dataset with id `ds-000000000000`"), "{stderr}");
    let stderr = workdir.run_err(&["dataset", "export", "ds-000000000000"]);
    assert!(stderr.contains("no dataset with id"), "{stderr}");

    workdir.write_lines("calls.jsonl", &calls());
    workdir.run_ok(&["import", "--task", "trec", "calls.jsonl"]);
    let stderr = workdir.run_err(&["dataset", "build", "--task", "trec", "--min-chars", "100000"]);
    assert!(stderr.contains("no rows are left for task `trec`") && stderr.contains("44 by prompt length"), "{stderr}");
    let stderr = workdir.run_err(&["dataset", "build", "--task", "trec", "--since", "2030-01-01"]);
    assert!(stderr.contains("44 outside the time range"), "{stderr}");
    let stderr =
        workdir.run_err(&["dataset", "build", "--task", "trec", "--test-share", "0.7", "--validation-share", "0.5"]);
    assert!(stderr.contains("add up to") && stderr.contains("less than 1"), "{stderr}");
    let stderr = workdir.run_err(&["dataset", "build", "--task", "trec", "--near-dup-threshold", "1.5"]);
    assert!(stderr.contains("--near-dup-threshold 1.5"), "{stderr}");
    let stderr = workdir.run_err(&["dataset", "export", "ds-", "--split", "dev"]);
    assert!(stderr.contains("dev"), "{stderr}");

    std::fs::write(workdir.path("broken.jsonl"), format!("{}\n{{not json\n", calls()[0])).expect("write");
    let stderr = workdir.run_err(&["dataset", "import", "--task", "trec", "broken.jsonl"]);
    assert!(stderr.contains("broken.jsonl:2: not valid JSON") && stderr.contains("no dataset was made"), "{stderr}");
    assert_eq!(workdir.run_ok(&["dataset", "list", "--json"]), "", "nothing was registered");
}
