//! The recorder: a bounded queue between request handlers and the store.
//!
//! Handlers hand a finished [`CallRecord`] to [`Recorder::record`] and move on;
//! one writer task drains the queue in batches, each batch one transaction.
//! A full queue makes `record` wait (backpressure) instead of dropping. A batch
//! that fails to write is retried with backoff, never discarded while the
//! recorder runs. [`Recorder::shutdown`] flushes everything queued.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use understudy_types::CallRecord;

use crate::Store;

/// How long the writer waits to fill a batch once it holds a record.
const LINGER: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, Copy)]
pub struct RecorderConfig {
    pub queue_capacity: usize,
    pub batch_size: usize,
}

/// Counters that tests and benchmarks read to prove nothing was lost.
#[derive(Debug, Default)]
pub struct RecorderStats {
    pub queued: AtomicU64,
    pub written: AtomicU64,
    pub failed_writes: AtomicU64,
}

#[derive(Clone)]
pub struct Recorder {
    sender: mpsc::Sender<CallRecord>,
    stats: Arc<RecorderStats>,
    store: Store,
}

/// Owns the writer task; dropping every [`Recorder`] and awaiting this flushes.
pub struct RecorderHandle {
    writer: JoinHandle<()>,
}

impl Recorder {
    /// Starts the writer task on the current tokio runtime.
    pub fn start(store: Store, config: RecorderConfig) -> (Recorder, RecorderHandle) {
        let (sender, receiver) = mpsc::channel(config.queue_capacity.max(1));
        let stats = Arc::new(RecorderStats::default());
        let writer = tokio::spawn(write_batches(store.clone(), receiver, config.batch_size.max(1), stats.clone()));
        (Recorder { sender, stats, store }, RecorderHandle { writer })
    }

    /// Queues a record, waiting while the queue is full.
    ///
    /// Fails only if the writer has stopped, and then hands the record back
    /// so the caller can report it rather than lose it silently.
    pub async fn record(&self, call: CallRecord) -> Result<(), Box<CallRecord>> {
        match self.sender.send(call).await {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(mpsc::error::SendError(call)) => Err(Box::new(call)),
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

    /// Records waiting to be written.
    pub fn pending(&self) -> usize {
        self.sender.max_capacity() - self.sender.capacity()
    }
}

impl RecorderHandle {
    /// Waits until every queued record is written. Call it after the last
    /// [`Recorder`] clone is dropped (for example after the server stopped).
    pub async fn shutdown(self) {
        if let Err(error) = self.writer.await {
            tracing::error!(%error, "recorder writer task failed");
        }
    }
}

async fn write_batches(
    store: Store,
    mut receiver: mpsc::Receiver<CallRecord>,
    batch_size: usize,
    stats: Arc<RecorderStats>,
) {
    let mut batch = Vec::with_capacity(batch_size);
    loop {
        if receiver.recv_many(&mut batch, batch_size).await == 0 {
            break;
        }
        // Linger a little for more records: one commit per few hundred
        // records costs far less than one per record under load.
        let deadline = tokio::time::Instant::now() + LINGER;
        while batch.len() < batch_size {
            let room = batch_size - batch.len();
            match tokio::time::timeout_at(deadline, receiver.recv_many(&mut batch, room)).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let mut backoff = Duration::from_millis(50);
        loop {
            match store.insert_calls(&batch).await {
                Ok(()) => {
                    stats.written.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    break;
                }
                Err(error) => {
                    // Keep the batch and try again: a store that is down for a
                    // while fills the queue, which then slows handlers down.
                    stats.failed_writes.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(%error, n_records = batch.len(), "writing records failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        batch.clear();
    }
    tracing::debug!("recorder drained");
}
