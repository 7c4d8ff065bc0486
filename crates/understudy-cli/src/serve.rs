//! `understudy serve`: the gateway until SIGTERM or Ctrl-C, then a flush.

use std::path::Path;
use std::sync::atomic::Ordering;

use anyhow::Context;
use understudy_gateway::AppState;
use understudy_store::{Recorder, RecorderConfig};

use crate::cli::ServeCommand;
use crate::output::{load_config, open_store};

pub async fn run(config_path: &Path, command: ServeCommand) -> anyhow::Result<()> {
    let config = load_config(config_path)?;
    let store = open_store(&config).await?;
    let (recorder, recorder_handle) = Recorder::start(
        store.clone(),
        RecorderConfig {
            queue_capacity: config.store.queue_capacity,
            batch_size: config.store.batch_size,
        },
    );
    let listen = command.listen.unwrap_or(config.server.listen);
    let state = AppState::new(config, recorder.clone())?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let local_addr = listener.local_addr()?;
    eprintln!("understudy gateway listening on http://{local_addr}/v1");
    understudy_gateway::serve(listener, state, shutdown_signal()).await?;

    let stats = recorder.stats();
    drop(recorder);
    let queued = stats.queued.load(Ordering::Relaxed);
    let pending = queued.saturating_sub(stats.written.load(Ordering::Relaxed));
    eprintln!("shutting down: writing {pending} queued records");
    recorder_handle.shutdown().await;
    store.close().await;
    eprintln!(
        "done: {} of {queued} records of this run are written",
        stats.written.load(Ordering::Relaxed)
    );
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    eprintln!("signal received: finishing requests in flight");
}
