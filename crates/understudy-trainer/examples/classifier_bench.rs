//! Times classifier fine-tuning (MiniLM, whole encoder, one epoch) for
//! `bench/train`. Reads `text\tlabel` rows from a file; prints one JSON object.
//!
//!   RAYON_NUM_THREADS=2 cargo run -p understudy-trainer --example classifier_bench -- \
//!     models/all-MiniLM-L6-v2 rows.tsv 32

#![allow(clippy::unwrap_used, clippy::expect_used)]

/// The allocator of `understudy train`, set up as the CLI sets it (freed
/// memory kept: `mi_option_purge_delay` -1), so that the bench measures what users run.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use understudy_trainer::{train_classifier, ClassifierTrainConfig, LabeledText};

fn main() {
    understudy_trainer::keep_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let text = std::fs::read_to_string(&args[2]).unwrap();
    let batch: usize = args.get(3).map_or(32, |v| v.parse().unwrap());
    let rows: Vec<LabeledText> = text
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .map(|(text, label)| LabeledText { text: text.into(), label: label.into() })
        .collect();
    let (validation, train) = rows.split_at(batch);
    let out = tempfile::tempdir().unwrap();
    let mut config = ClassifierTrainConfig::new(&args[1], out.path());
    config.epochs = 1;
    config.batch_size = batch;
    config.progress = false;
    let started = std::time::Instant::now();
    let report = train_classifier(&config, train, validation).unwrap();
    println!(
        "{}",
        serde_json::json!({
            "train_rows": train.len(), "validation_rows": validation.len(), "batch": batch,
            "wall_seconds": started.elapsed().as_secs_f64(), "report_wall_seconds": report.wall_seconds,
            "compute_seconds": report.compute_seconds,
        })
    );
}
