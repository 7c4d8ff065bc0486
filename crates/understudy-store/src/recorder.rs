//! The recorder: a bounded queue between request handlers and the store.
//!
//! Handlers hand a finished [`CallRecord`] to [`Recorder::record`] and move on;
//! one writer task drains the queue in batches, each batch one transaction.
//! A full queue makes `record` wait (backpressure) instead of dropping.
//!
//! No record is ever blocked by another, and none is dropped silently:
//! - A batch that fails is retried. When the store answers a trivial query
//!   but refuses the batch, the fault is in the records: the batch is split
//!   in halves until the record at fault is alone, and that one goes to the
//!   dead-letter file with the store's error (the store already keeps
//!   records in a safe form, so this is the last resort).
//! - When the store does not answer at all, it is down: the writer keeps the
//!   batch, backs off and opens a fresh pool (SQLite connections that saw an
//!   I/O error never recover; a database recreated empty is migrated again).
//!   Handlers go on serving while the queue has room.
//! - A SQLite file deleted under a running store is noticed after each
//!   batch: the loss is logged loudly, counted, and the batch is written
//!   again to a new file.
//! - Shutdown has a deadline. What is still queued after it goes to the
//!   spill file, which the next [`Recorder::start`] replays into the store
//!   before anything else (a replayed id already stored is skipped).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use understudy_types::CallRecord;

use crate::{record_file, Store, StoreError};

/// How long the writer waits to fill a batch once it holds a record.
const LINGER: Duration = Duration::from_millis(20);
/// Failed attempts on a store that answers pings before its refusal is
/// taken to be about the records rather than the store.
const ATTEMPTS_BEFORE_SPLIT: u32 = 3;
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct RecorderConfig {
    pub queue_capacity: usize,
    pub batch_size: usize,
    /// Records still queued when a shutdown's deadline passes go here, and
    /// are replayed by the next start. `None`: they are logged in full.
    pub spill_file: Option<PathBuf>,
    /// Records the store refuses go here with the store's error. `None`:
    /// they are logged in full.
    pub dead_letter_file: Option<PathBuf>,
    /// How long [`RecorderHandle::shutdown`] keeps trying the store.
    pub shutdown_deadline: Duration,
}

impl Default for RecorderConfig {
    fn default() -> RecorderConfig {
        RecorderConfig {
            queue_capacity: 16_384,
            batch_size: 512,
            spill_file: None,
            dead_letter_file: None,
            shutdown_deadline: Duration::from_secs(30),
        }
    }
}

/// Counters that tests, `/healthz` and shutdown read to prove nothing was
/// lost: every queued record ends up written, dead-lettered or spilled.
#[derive(Debug, Default)]
pub struct RecorderStats {
    pub queued: AtomicU64,
    pub written: AtomicU64,
    /// Attempts to write a batch that failed (each retry counts).
    pub failed_writes: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub spilled: AtomicU64,
    /// Records counted as written to a SQLite file that was then deleted.
    pub lost_with_deleted_file: AtomicU64,
    /// Records replayed from the spill file at start.
    pub replayed: AtomicU64,
}

impl RecorderStats {
    /// Records queued and not yet written, dead-lettered or spilled,
    /// including a batch the writer holds while the store is down.
    pub fn pending(&self) -> u64 {
        let done = self.written.load(Ordering::Relaxed)
            + self.dead_lettered.load(Ordering::Relaxed)
            + self.spilled.load(Ordering::Relaxed);
        self.queued.load(Ordering::Relaxed).saturating_sub(done)
    }
}

#[derive(Clone)]
pub struct Recorder {
    sender: mpsc::Sender<CallRecord>,
    stats: Arc<RecorderStats>,
    store: Store,
    spill_file: Option<PathBuf>,
}

/// Owns the writer task; dropping every [`Recorder`] and awaiting
/// [`RecorderHandle::shutdown`] flushes.
pub struct RecorderHandle {
    writer: JoinHandle<()>,
    give_up: watch::Sender<bool>,
    deadline: Duration,
    stats: Arc<RecorderStats>,
}

impl Recorder {
    /// Starts the writer task on the current tokio runtime. Records in the
    /// spill file are written before any new one.
    pub fn start(store: Store, config: RecorderConfig) -> (Recorder, RecorderHandle) {
        let (sender, receiver) = mpsc::channel(config.queue_capacity.max(1));
        let stats = Arc::new(RecorderStats::default());
        let (give_up, give_up_receiver) = watch::channel(false);
        let writer = Writer {
            store: store.clone(),
            stats: stats.clone(),
            spill_file: config.spill_file.clone(),
            dead_letter_file: config.dead_letter_file.clone(),
            give_up: give_up_receiver,
            written_to_this_file: 0,
        };
        let writer = tokio::spawn(writer.run(receiver, config.batch_size.max(1)));
        let handle = RecorderHandle { writer, give_up, deadline: config.shutdown_deadline, stats: stats.clone() };
        (Recorder { sender, stats, store, spill_file: config.spill_file }, handle)
    }

    /// Queues a record, waiting while the queue is full.
    ///
    /// If the writer has stopped (a shutdown gave up on the store), the
    /// record goes straight to the spill file; only if that fails too is it
    /// handed back, for the caller to report.
    pub async fn record(&self, call: CallRecord) -> Result<(), Box<CallRecord>> {
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        match self.sender.send(call).await {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendError(call)) => {
                if let Some(path) = &self.spill_file {
                    if record_file::append(path, std::slice::from_ref(&call), None).is_ok() {
                        self.stats.spilled.fetch_add(1, Ordering::Relaxed);
                        return Ok(());
                    }
                }
                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                Err(Box::new(call))
            }
        }
    }

    pub fn stats(&self) -> Arc<RecorderStats> {
        self.stats.clone()
    }

    /// The store the records go to, for handlers that read or write it
    /// directly (feedback on calls).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Records waiting to be written, including a batch being retried.
    pub fn pending(&self) -> u64 {
        self.stats.pending()
    }
}

/// What became of the records when the recorder stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    pub queued: u64,
    pub written: u64,
    pub dead_lettered: u64,
    pub spilled: u64,
    pub lost_with_deleted_file: u64,
}

impl RecorderHandle {
    /// Waits until every queued record is written, or the configured
    /// deadline passes; then what is left goes to the spill file. Call it
    /// after the last [`Recorder`] clone is dropped (after the server stopped).
    pub async fn shutdown(self) -> ShutdownReport {
        let deadline = Instant::now() + self.deadline;
        self.shutdown_by(deadline).await
    }

    /// Like [`RecorderHandle::shutdown`], with the deadline given.
    pub async fn shutdown_by(self, deadline: Instant) -> ShutdownReport {
        let RecorderHandle { mut writer, give_up, stats, .. } = self;
        let finished = tokio::select! {
            joined = &mut writer => Some(joined),
            () = tokio::time::sleep_until(deadline) => None,
        };
        let joined = match finished {
            Some(joined) => joined,
            None => {
                tracing::warn!(pending = stats.pending(), "shutdown deadline passed; spilling queued records");
                let _ = give_up.send(true);
                writer.await
            }
        };
        if let Err(error) = joined {
            tracing::error!(%error, "recorder writer task failed");
        }
        ShutdownReport {
            queued: stats.queued.load(Ordering::Relaxed),
            written: stats.written.load(Ordering::Relaxed),
            dead_lettered: stats.dead_lettered.load(Ordering::Relaxed),
            spilled: stats.spilled.load(Ordering::Relaxed),
            lost_with_deleted_file: stats.lost_with_deleted_file.load(Ordering::Relaxed),
        }
    }
}

struct Writer {
    store: Store,
    stats: Arc<RecorderStats>,
    spill_file: Option<PathBuf>,
    dead_letter_file: Option<PathBuf>,
    give_up: watch::Receiver<bool>,
    /// Records committed to the current SQLite file, lost if it is deleted.
    written_to_this_file: u64,
}

/// Whether a batch reached the store.
enum Written {
    Yes,
    /// Shutdown gave up on the store; the records were spilled.
    Spilled,
}

impl Writer {
    async fn run(mut self, mut receiver: mpsc::Receiver<CallRecord>, batch_size: usize) {
        self.replay_spill_file(batch_size).await;
        let mut give_up = self.give_up.clone();
        let mut batch = Vec::with_capacity(batch_size);
        loop {
            if self.giving_up() {
                // Spill what is queued now; the channel stays open for
                // nobody, so later records go to the spill file directly.
                receiver.close();
                while let Ok(call) = receiver.try_recv() {
                    batch.push(call);
                }
                self.spill(std::mem::take(&mut batch));
                break;
            }
            let n_received = tokio::select! {
                n_received = receiver.recv_many(&mut batch, batch_size) => n_received,
                // Handlers may still hold the queue open; stop waiting on them.
                _ = give_up.wait_for(|given_up| *given_up) => continue,
            };
            if n_received == 0 {
                break;
            }
            // Linger a little for more records: one commit per few hundred
            // records costs far less than one per record under load. The
            // writer sleeps through it and then takes what came, rather than
            // waking for each record as it is queued (a wakeup per record
            // cost more than queueing it). A full batch does not linger, so
            // a queue that fills faster than the linger still drains at the
            // store's pace.
            if batch.len() < batch_size {
                tokio::time::sleep(LINGER).await;
                while batch.len() < batch_size {
                    match receiver.try_recv() {
                        Ok(call) => batch.push(call),
                        Err(_) => break,
                    }
                }
            }
            self.write(std::mem::take(&mut batch)).await;
        }
        tracing::debug!("recorder drained");
    }

    fn giving_up(&self) -> bool {
        *self.give_up.borrow()
    }

    /// Writes the spill file's records first. The file is removed only once
    /// all of them are in the store; a crash before that replays them again,
    /// and the ids already stored are skipped.
    async fn replay_spill_file(&mut self, batch_size: usize) {
        let Some(path) = self.spill_file.clone() else { return };
        let records = match record_file::read(&path) {
            Ok(records) => records,
            Err(error) => {
                tracing::error!(%error, "cannot replay the spill file; it is left as it is");
                return;
            }
        };
        if records.is_empty() {
            return;
        }
        let n_records = records.len();
        tracing::warn!(path = %path.display(), n_records, "replaying records spilled by an earlier shutdown");
        // The spill file is being emptied into the store: records spilled
        // again by a shutdown during the replay go to a fresh file.
        let replaying = path.with_extension("replaying.jsonl");
        if let Err(error) = std::fs::rename(&path, &replaying) {
            tracing::error!(%error, "cannot move the spill file aside; it is left as it is");
            return;
        }
        let records: Vec<CallRecord> = records.into_iter().map(|(record, _)| record).collect();
        self.stats.queued.fetch_add(n_records as u64, Ordering::Relaxed);
        self.stats.replayed.fetch_add(n_records as u64, Ordering::Relaxed);
        for chunk in records.chunks(batch_size) {
            self.write(chunk.to_vec()).await;
        }
        if let Err(error) = std::fs::remove_file(&replaying) {
            tracing::warn!(%error, path = %replaying.display(), "cannot remove the replayed spill file");
        }
    }

    /// Writes `batch`, splitting it around records the store refuses; gives
    /// up on the store only when shutdown says so.
    async fn write(&mut self, batch: Vec<CallRecord>) {
        let mut work = vec![batch];
        while let Some(batch) = work.pop() {
            if batch.is_empty() {
                continue;
            }
            match self.write_whole(&batch).await {
                Ok(Written::Yes | Written::Spilled) => {}
                Err(error) if batch.len() == 1 => self.dead_letter(&batch, &error),
                Err(_) => {
                    let mut first = batch;
                    let second = first.split_off(first.len() / 2);
                    work.push(second);
                    work.push(first);
                }
            }
        }
    }

    /// Writes `batch` in one transaction, retrying while the store is down.
    /// An error comes back only when the store is up and keeps refusing
    /// this batch.
    async fn write_whole(&mut self, batch: &[CallRecord]) -> Result<Written, StoreError> {
        let mut backoff = FIRST_BACKOFF;
        let mut refusals = 0u32;
        loop {
            if self.giving_up() {
                self.spill(batch.to_vec());
                return Ok(Written::Spilled);
            }
            let mut give_up = self.give_up.clone();
            let attempt = tokio::select! {
                attempt = self.store.record_calls(batch) => attempt,
                // A write stuck on a locked or unreachable store must not
                // hold shutdown past its deadline. Should the transaction
                // have committed after all, the replay skips its ids.
                _ = give_up.wait_for(|given_up| *given_up) => continue,
            };
            let error = match attempt {
                Ok(()) => {
                    if let Some(path) = self.store.vanished_file() {
                        let lost = self.written_to_this_file;
                        self.stats.lost_with_deleted_file.fetch_add(lost, Ordering::Relaxed);
                        tracing::error!(
                            path = %path.display(), lost,
                            "THE STORE'S DATABASE FILE WAS DELETED OR REPLACED while serving: \
                             {lost} records written to it are gone; writing to a new file"
                        );
                        self.written_to_this_file = 0;
                        self.reopen().await;
                        continue;
                    }
                    self.written_to_this_file += batch.len() as u64;
                    self.stats.written.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    return Ok(Written::Yes);
                }
                Err(error) => error,
            };
            self.stats.failed_writes.fetch_add(1, Ordering::Relaxed);
            if is_missing_table(&error) {
                tracing::warn!(%error, "the store lost its tables (recreated empty?); migrating again");
                if let Err(error) = self.store.migrate().await {
                    tracing::error!(%error, "migrating the store again failed");
                }
            } else if is_about_the_records(&error) {
                return Err(error);
            } else if self.store.ping().await.is_ok() {
                refusals += 1;
                if refusals >= ATTEMPTS_BEFORE_SPLIT {
                    return Err(error);
                }
                // The store is up but refused the write; a fresh pool rules
                // out a connection stuck in a bad state.
                tracing::warn!(%error, n_records = batch.len(), "the store refused a batch; retrying on a fresh pool");
                self.reopen().await;
            } else {
                tracing::error!(%error, n_records = batch.len(), "the store is unreachable; keeping the batch and retrying");
                self.sleep_unless_giving_up(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                self.reopen().await;
            }
        }
    }

    async fn reopen(&mut self) {
        match self.store.reopen().await {
            Ok(()) => {
                self.written_to_this_file = 0;
                tracing::info!(store = %self.store.display_url(), "store reopened");
            }
            Err(error) => tracing::warn!(%error, "reopening the store failed; will retry"),
        }
    }

    async fn sleep_unless_giving_up(&mut self, duration: Duration) {
        let mut give_up = self.give_up.clone();
        tokio::select! {
            () = tokio::time::sleep(duration) => {}
            _ = give_up.wait_for(|given_up| *given_up) => {}
        }
    }

    fn dead_letter(&self, batch: &[CallRecord], error: &StoreError) {
        let reason = error.to_string();
        self.stats.dead_lettered.fetch_add(batch.len() as u64, Ordering::Relaxed);
        for record in batch {
            tracing::error!(call_id = %record.id, error = %reason, "the store refused a record; it goes to the dead-letter file");
        }
        self.save_outside(self.dead_letter_file.as_ref(), batch, Some(&reason), "dead-letter");
    }

    fn spill(&self, batch: Vec<CallRecord>) {
        if batch.is_empty() {
            return;
        }
        self.stats.spilled.fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.save_outside(self.spill_file.as_ref(), &batch, None, "spill");
    }

    /// Appends to a record file; without one, or if it cannot be written,
    /// each record is logged in full so that it is never dropped silently.
    fn save_outside(&self, path: Option<&PathBuf>, batch: &[CallRecord], reason: Option<&str>, what: &str) {
        if let Some(path) = path {
            match record_file::append(path, batch, reason) {
                Ok(()) => {
                    tracing::warn!(n_records = batch.len(), path = %path.display(), "records saved to the {what} file");
                    return;
                }
                Err(error) => tracing::error!(%error, "cannot write the {what} file"),
            }
        }
        for record in batch {
            tracing::error!(record = %record_file::encode(record, reason), "a call record that is not in the store");
        }
    }
}

/// A store whose tables are gone: a database dropped and created again.
fn is_missing_table(error: &StoreError) -> bool {
    let StoreError::Query(sqlx::Error::Database(database_error)) = error else { return false };
    // Postgres: undefined_table; SQLite has no code of its own for it.
    database_error.code().as_deref() == Some("42P01") || database_error.message().contains("no such table")
}

/// Whether the store refused these records for what they hold, not for
/// its own state: then retrying the same batch can never succeed.
fn is_about_the_records(error: &StoreError) -> bool {
    let StoreError::Query(sqlx::Error::Database(database_error)) = error else { return false };
    let Some(code) = database_error.code() else { return false };
    match code.len() {
        // Postgres SQLSTATE: data exceptions (22xxx: bad encoding, bad
        // binary data), integrity (23xxx) and program limits (54xxx: an
        // index row too large).
        5 => matches!(&code[..2], "22" | "23" | "54"),
        // SQLite result codes: TOOBIG (18), CONSTRAINT (19 and its extended
        // codes), MISMATCH (20), RANGE (25).
        _ => matches!(code.parse::<i64>().map(|code| code & 0xff), Ok(18..=20 | 25)),
    }
}
