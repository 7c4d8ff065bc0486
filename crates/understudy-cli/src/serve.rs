//! `understudy serve`: the gateway until SIGTERM or Ctrl-C, then a flush.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;

use anyhow::Context;
use tokio::sync::oneshot;
use understudy_config::Config;
use understudy_gateway::AppState;
use understudy_store::{Recorder, RecorderConfig, RecorderHandle, RecorderStats, Store};

use crate::cli::ServeCommand;
use crate::output::{load_config, open_store};

pub async fn run(config_path: &Path, command: ServeCommand) -> anyhow::Result<()> {
    let config = load_config(config_path)?;
    let listen = command.listen.unwrap_or(config.server.listen);
    let gateway = RunningGateway::start(config, listen).await?;
    eprintln!("understudy gateway listening on http://{}/v1", gateway.addr);
    shutdown_signal().await;
    eprintln!("signal received: finishing requests in flight");
    gateway.stop().await
}

/// A gateway serving in this process, with its store and recorder.
pub struct RunningGateway {
    pub addr: SocketAddr,
    pub store: Store,
    stop: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    recorder_handle: RecorderHandle,
    stats: std::sync::Arc<RecorderStats>,
    watch: tokio::task::JoinHandle<()>,
}

/// How often a gateway looks for policy changes in the store.
const POLICY_POLL: std::time::Duration = std::time::Duration::from_millis(500);

impl RunningGateway {
    pub async fn start(config: Config, listen: SocketAddr) -> anyhow::Result<RunningGateway> {
        let store = open_store(&config).await?;
        let (recorder, recorder_handle) = Recorder::start(
            store.clone(),
            RecorderConfig { queue_capacity: config.store.queue_capacity, batch_size: config.store.batch_size },
        );
        let stats = recorder.stats();
        let loader: std::sync::Arc<dyn understudy_providers::LocalLoader> =
            std::sync::Arc::new(understudy_local::Loader);
        let state = AppState::with_local_models(config, recorder, Some(loader))?;
        // Policy changes (`understudy promote`) reach this gateway through the store.
        state.apply_policies(&store).await?;
        let watch = understudy_gateway::spawn_policy_watch(state.clone(), store.clone(), POLICY_POLL);
        let listener =
            tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(understudy_gateway::serve(listener, state, async move {
            let _ = stopped.await;
        }));
        Ok(RunningGateway { addr, store, stop, server, recorder_handle, stats, watch })
    }

    /// Stops accepting, lets requests in flight finish, then writes every
    /// queued record before returning.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.server.await.context("gateway task failed")??;
        self.watch.abort();
        let queued = self.stats.queued.load(Ordering::Relaxed);
        let pending = queued.saturating_sub(self.stats.written.load(Ordering::Relaxed));
        eprintln!("shutting down: writing {pending} queued records");
        self.recorder_handle.shutdown().await;
        self.store.close().await;
        let written = self.stats.written.load(Ordering::Relaxed);
        eprintln!("done: {written} of {queued} records of this run are written");
        Ok(())
    }
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
}
