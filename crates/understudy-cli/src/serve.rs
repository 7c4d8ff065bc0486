//! `understudy serve`: the gateway until SIGTERM or Ctrl-C, then a flush.

use std::net::SocketAddr;
use std::path::Path;

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
    let signalled = shutdown_signal()?;
    let gateway = RunningGateway::start(config, listen).await?;
    eprintln!("understudy gateway listening on http://{}/v1", gateway.addr);
    signalled.await;
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
    key_watch: tokio::task::JoinHandle<()>,
    retention: Option<tokio::task::JoinHandle<()>>,
    shutdown_timeout: std::time::Duration,
    spill_file: std::path::PathBuf,
    dead_letter_file: std::path::PathBuf,
}

/// The recorder's settings from `[store]` and `[server]`.
pub fn recorder_config(config: &Config) -> RecorderConfig {
    RecorderConfig {
        queue_capacity: config.store.queue_capacity,
        batch_size: config.store.batch_size,
        spill_file: Some(config.store.spill_file.clone()),
        dead_letter_file: Some(config.store.dead_letter_file.clone()),
        shutdown_deadline: config.server.shutdown_timeout,
    }
}

/// How often a gateway looks for policy changes in the store.
const POLICY_POLL: std::time::Duration = std::time::Duration::from_millis(500);
/// How often a gateway reloads its keys (a revocation takes effect within it).
const KEY_POLL: std::time::Duration = std::time::Duration::from_secs(1);
/// How often `[store]` retention runs (and once at start).
const RETENTION_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

impl RunningGateway {
    pub async fn start(config: Config, listen: SocketAddr) -> anyhow::Result<RunningGateway> {
        // `--listen` may move a loopback-only config onto a public address.
        config.server.check_exposure(listen).map_err(|message| anyhow::anyhow!("cannot serve: {message}"))?;
        let store = open_store(&config).await?;
        let (recorder, recorder_handle) = Recorder::start(store.clone(), recorder_config(&config));
        let shutdown_timeout = config.server.shutdown_timeout;
        let spill_file = config.store.spill_file.clone();
        let dead_letter_file = config.store.dead_letter_file.clone();
        let stats = recorder.stats();
        let config_auth = config.server.auth;
        let loader: std::sync::Arc<dyn understudy_providers::LocalLoader> =
            std::sync::Arc::new(understudy_local::Loader);
        let state = AppState::with_local_models(config, recorder, Some(loader))?;
        // Policy changes (`understudy promote`) reach this gateway through the store.
        state.apply_policies(&store).await?;
        let watch = understudy_gateway::spawn_policy_watch(state.clone(), store.clone(), POLICY_POLL);
        let n_keys = state.refresh_keys().await?;
        if config_auth == understudy_config::Auth::Keys && n_keys == 0 {
            eprintln!(
                "warning: no gateway keys yet, so every request gets 401; make one with \
                 `understudy keys create --name NAME`"
            );
        }
        let key_watch = understudy_gateway::spawn_key_watch(state.clone(), KEY_POLL);
        let retention = understudy_gateway::spawn_retention(store.clone(), &state.config().store, RETENTION_EVERY);
        let listener =
            tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        // The dashboard (`/ui`) shares the port, the keys and the store.
        let server =
            tokio::spawn(understudy_gateway::serve_with(listener, state, understudy_dashboard::routes(), async move {
                let _ = stopped.await;
            }));
        Ok(RunningGateway {
            addr,
            store,
            stop,
            server,
            recorder_handle,
            stats,
            watch,
            key_watch,
            retention,
            shutdown_timeout,
            spill_file,
            dead_letter_file,
        })
    }

    /// Stops accepting, lets requests in flight finish, then writes every
    /// queued record, all within `[server] shutdown_timeout_secs`: after it,
    /// open connections are dropped and what is still queued goes to the
    /// spill file, which the next start replays.
    pub async fn stop(self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        let _ = self.stop.send(());
        let mut server = self.server;
        match tokio::time::timeout_at(deadline, &mut server).await {
            Ok(served) => served.context("gateway task failed")??,
            Err(_elapsed) => {
                eprintln!("shutdown deadline passed with requests in flight; closing their connections");
                server.abort();
            }
        }
        self.watch.abort();
        self.key_watch.abort();
        if let Some(retention) = &self.retention {
            retention.abort();
        }
        eprintln!("shutting down: writing {} queued records", self.stats.pending());
        // Spilling what is left takes a moment; leave it that much.
        let report = self.recorder_handle.shutdown_by(deadline).await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.store.close()).await;
        let mut summary = format!("done: {} of {} records of this run are written", report.written, report.queued);
        if report.spilled > 0 {
            summary.push_str(&format!(
                "; {} went to the spill file {} and are written at the next start",
                report.spilled,
                self.spill_file.display()
            ));
        }
        if report.dead_lettered > 0 {
            summary.push_str(&format!(
                "; {} the store refused are in {}",
                report.dead_lettered,
                self.dead_letter_file.display()
            ));
        }
        if report.lost_with_deleted_file > 0 {
            summary.push_str(&format!(
                "; {} were written to a database file that was then deleted, and are gone",
                report.lost_with_deleted_file
            ));
        }
        eprintln!("{summary}");
        Ok(())
    }
}

/// SIGTERM or Ctrl-C. The handlers are installed when this is called, not
/// when the future is first polled: a signal that arrives between "listening"
/// and the first poll would otherwise kill the process with its queue unwritten.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for Ctrl-C")?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
}
