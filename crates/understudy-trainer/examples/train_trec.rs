//! Trains an all-MiniLM-L6-v2 classifier on TREC question classification (6
//! coarse labels) end to end and prints test accuracy and wall time. The older
//! 80 % of the questions (file order is time order) train, the last tenth of
//! those validates, the newest 20 % test.
//!
//! Run it (data and model are fetched from PyPI into CACHE when missing):
//!
//!   bash scripts/fetch-models.sh    # optional: models/ for your own runs
//!   RAYON_NUM_THREADS=2 cargo run --release -p understudy-trainer --example train_trec -- \
//!       [CACHE=~/.cache/understudy] [OUTPUT_DIR=target/trec-classifier] [EPOCHS=2] [TOP_LAYERS=all]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use understudy_trainer::testing::{ensure_trec_and_minilm, parse_trec};
use understudy_trainer::{train_classifier, ClassifierModel, ClassifierTrainConfig};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    default_candle_threads();
    let started = Instant::now();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let home = std::env::var("HOME").unwrap_or_else(|_| String::from("."));
    let cache = args.first().map(PathBuf::from).unwrap_or_else(|| PathBuf::from(home).join(".cache/understudy"));
    let output = args.get(1).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("target/trec-classifier"));
    let epochs: usize = args.get(2).map(|epochs| epochs.parse()).transpose()?.unwrap_or(2);
    let top_layers: Option<usize> = match args.get(3).map(String::as_str) {
        None | Some("all") => None,
        Some(n) => Some(n.parse()?),
    };

    let (data, minilm) = ensure_trec_and_minilm(&cache)?;
    let rows = parse_trec(&std::fs::read_to_string(&data)?);
    let (older, newest) = rows.split_at(rows.len() * 8 / 10);
    let (train, validation) = older.split_at(older.len() * 9 / 10);
    println!(
        "TREC: {} questions: {} train, {} validation, {} test (newest)",
        rows.len(),
        train.len(),
        validation.len(),
        newest.len()
    );

    let mut config = ClassifierTrainConfig::new(&minilm, &output);
    config.epochs = epochs;
    config.train_top_layers = top_layers;
    let report = train_classifier(&config, train, validation)?;
    for epoch in &report.epochs {
        println!(
            "epoch {}: train loss {:.4}, validation loss {:.4}, validation accuracy {:.4}",
            epoch.epoch, epoch.train_loss, epoch.validation_loss, epoch.validation_accuracy
        );
    }
    println!("best epoch {:?}, training wall time {:.1}s", report.best_epoch, report.wall_seconds);

    let model = ClassifierModel::load(&output)?;
    let texts: Vec<String> = newest.iter().map(|row| row.text.clone()).collect();
    let predictions = model.predict(&texts)?;
    let correct = predictions.iter().zip(newest).filter(|(p, row)| p.label == row.label).count();
    println!(
        "test accuracy {:.4} ({correct}/{}), total wall time {:.1}s (loading, training, testing)",
        correct as f64 / newest.len() as f64,
        newest.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// candle 0.11 runs element-wise ops on its own spin-waiting thread pool
/// (`CANDLE_NUM_THREADS`, else `RAYON_NUM_THREADS`), which burns the cores
/// when they are shared; matmuls use `RAYON_NUM_THREADS` either way. One
/// element-wise thread measured 2-3x faster per step on a busy 2-core box.
fn default_candle_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}
