//! Dynamic batching for models that answer many inputs in one forward pass
//! (the classifier, the encoder).
//!
//! One worker thread owns the model's forward pass. A call queues its input
//! and waits; the worker takes the first queued input, then everything else
//! already queued, up to `max_batch`, and answers them together. There is no
//! fixed wait for a batch to fill ("continuous batching"): a lone call is
//! answered at once, as it would be on its own, and calls that arrive while a
//! pass runs form the next batch. `max_batch = 1` answers each on its own.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// Why a batched call got no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BatchError {
    /// The worker thread is gone (the model was dropped).
    #[error("the batching worker of `{name}` has stopped")]
    Stopped { name: String },
    /// The forward pass of the batch failed.
    #[error("{message}")]
    Failed { message: String },
    /// The forward pass answered a different number of inputs than it was given.
    #[error("the batch of {inputs} inputs came back with {outputs} answers")]
    Mismatch { inputs: usize, outputs: usize },
}

struct Job<I, O> {
    input: I,
    reply: oneshot::Sender<Result<Answered<O>, BatchError>>,
}

/// One input's answer, and its share of the pass that answered it.
#[derive(Debug)]
pub(crate) struct Answered<O> {
    pub output: O,
    /// The pass's wall time over the number of inputs in it: what this
    /// input cost the machine.
    pub compute: Duration,
}

/// A queue in front of a forward pass that answers a batch of inputs, in order.
pub(crate) struct Batcher<I, O> {
    name: String,
    max_batch: usize,
    jobs: mpsc::Sender<Job<I, O>>,
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Starts the worker thread. `forward` answers a batch of at most
    /// `max_batch` inputs with one output per input, in order.
    pub fn start<E, F>(name: &str, max_batch: usize, mut forward: F) -> std::io::Result<Batcher<I, O>>
    where
        E: std::fmt::Display,
        F: FnMut(Vec<I>) -> Result<Vec<O>, E> + Send + 'static,
    {
        let max_batch = max_batch.max(1);
        let (jobs, queue) = mpsc::channel::<Job<I, O>>();
        std::thread::Builder::new().name(format!("batch-{name}")).spawn(move || {
            // The loop ends when every sender (the model) is dropped.
            while let Ok(first) = queue.recv() {
                let mut batch = vec![first];
                while batch.len() < max_batch {
                    match queue.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                let (inputs, replies): (Vec<I>, Vec<_>) = batch.into_iter().map(|job| (job.input, job.reply)).unzip();
                let n_inputs = inputs.len();
                let started = Instant::now();
                // A pass that panics fails its own calls, loudly, and the
                // worker goes on: one bad batch must not leave every later
                // call without its understudy until a restart.
                let result = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| forward(inputs))) {
                    Ok(result) => result.map_err(|error| error.to_string()),
                    Err(panic) => {
                        let what = panic
                            .downcast_ref::<&str>()
                            .map(|text| text.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "a panic".to_string());
                        tracing::error!(batch = n_inputs, panic = %what, "a forward pass panicked; its calls fail");
                        Err(format!("the forward pass panicked: {what}"))
                    }
                };
                let compute = started.elapsed() / n_inputs as u32;
                match result {
                    Ok(outputs) if outputs.len() == n_inputs => {
                        for (reply, output) in replies.into_iter().zip(outputs) {
                            // A caller that stopped waiting (a timeout) is no error.
                            let _ = reply.send(Ok(Answered { output, compute }));
                        }
                    }
                    Ok(outputs) => {
                        let error = BatchError::Mismatch { inputs: n_inputs, outputs: outputs.len() };
                        for reply in replies {
                            let _ = reply.send(Err(error.clone()));
                        }
                    }
                    Err(message) => {
                        let error = BatchError::Failed { message };
                        for reply in replies {
                            let _ = reply.send(Err(error.clone()));
                        }
                    }
                }
            }
        })?;
        Ok(Batcher { name: name.to_string(), max_batch, jobs })
    }

    /// The most inputs one forward pass answers.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Queues `input` and waits for its answer.
    pub async fn call(&self, input: I) -> Result<Answered<O>, BatchError> {
        let stopped = || BatchError::Stopped { name: self.name.clone() };
        let (reply, answer) = oneshot::channel();
        self.jobs.send(Job { input, reply }).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::{Arc, Mutex};

    use super::*;

    /// A forward pass that doubles its inputs, records each batch's inputs,
    /// and holds its first batch until the test releases it, so the test
    /// knows what is queued when the worker frees up.
    fn gated(max_batch: usize) -> (Batcher<u32, u32>, Arc<Mutex<Vec<Vec<u32>>>>, mpsc::Sender<()>, mpsc::Receiver<()>) {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let seen = batches.clone();
        let (release, gate) = mpsc::channel::<()>();
        let (started_tx, started) = mpsc::channel::<()>();
        let mut first = true;
        let batcher = Batcher::start("test", max_batch, move |inputs: Vec<u32>| {
            seen.lock().unwrap().push(inputs.clone());
            if std::mem::take(&mut first) {
                started_tx.send(()).unwrap();
                gate.recv().unwrap();
            }
            if inputs.contains(&13) {
                return Err("thirteen is unlucky");
            }
            assert!(!inputs.contains(&666), "the model cannot take 666");
            Ok(inputs.into_iter().map(|input| input * 2).collect())
        })
        .unwrap();
        (batcher, batches, release, started)
    }

    #[tokio::test]
    async fn what_is_queued_while_a_pass_runs_is_the_next_batch() {
        let (batcher, batches, release, started) = gated(4);
        let mut first = Box::pin(batcher.call(1));
        // One poll queues the call (the send comes before the first await).
        assert!(futures::poll!(&mut first).is_pending());
        // The worker is inside its first pass, holding input 1 alone.
        started.recv().unwrap();
        let mut queued: Vec<_> = (2..=7).map(|input| Box::pin(batcher.call(input))).collect();
        for call in &mut queued {
            assert!(futures::poll!(call).is_pending());
        }
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap().output, 2);
        let answers = futures::future::join_all(queued).await;
        let answers: Vec<u32> = answers.into_iter().map(|answer| answer.unwrap().output).collect();
        assert_eq!(answers, vec![4, 6, 8, 10, 12, 14]);
        // The first pass had one input; the six queued behind it went in
        // batches of at most four, in the order they came.
        assert_eq!(*batches.lock().unwrap(), vec![vec![1], vec![2, 3, 4, 5], vec![6, 7]]);
    }

    #[tokio::test]
    async fn a_failed_pass_fails_each_of_its_calls_and_the_next_pass_runs() {
        let (batcher, _batches, release, _started) = gated(8);
        release.send(()).unwrap();
        let error = batcher.call(13).await.unwrap_err();
        assert!(matches!(&error, BatchError::Failed { message } if message == "thirteen is unlucky"), "{error}");
        assert_eq!(batcher.call(4).await.unwrap().output, 8);
    }

    #[tokio::test]
    async fn a_pass_that_panics_fails_its_calls_and_the_worker_goes_on() {
        let (batcher, _batches, release, _started) = gated(8);
        release.send(()).unwrap();
        let error = batcher.call(666).await.unwrap_err();
        assert!(
            matches!(&error, BatchError::Failed { message } if message.contains("the model cannot take 666")),
            "{error}"
        );
        assert_eq!(batcher.call(4).await.unwrap().output, 8);
    }
}
