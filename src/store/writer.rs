//! The record writer: one task per node that group-commits tenant records and
//! events, so a call's CDR costs a share of one transaction instead of an fsync
//! of its own. Writers that need durability before going on (a call's CDR at
//! start) wait for the acknowledgement; the rest fire and forget.

use super::{BatchOp, Store, StoreError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Most ops committed in one transaction.
const MAX_BATCH: usize = 2048;

type Ack = oneshot::Sender<Result<(), String>>;

#[derive(Clone)]
pub struct RecordWriter {
    tx: mpsc::UnboundedSender<(Vec<BatchOp>, Option<Ack>)>,
}

impl RecordWriter {
    /// Starts the writer task on the current runtime.
    pub fn start(store: Arc<dyn Store>) -> RecordWriter {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(store, rx));
        RecordWriter { tx }
    }

    /// Queues ops; the returned receiver resolves once they are durable.
    pub fn write(&self, ops: Vec<BatchOp>) -> oneshot::Receiver<Result<(), String>> {
        let (ack, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError((_, Some(ack)))) = self.tx.send((ops, Some(ack))) {
            let _ = ack.send(Err("the record writer has stopped".into()));
        }
        rx
    }

    /// Resolves once everything queued before is durable.
    pub async fn flush(&self) -> Result<(), String> {
        self.write(Vec::new()).await.unwrap_or_else(|_| Err("the record writer has stopped".into()))
    }

    /// Queues ops without waiting.
    pub fn write_detached(&self, ops: Vec<BatchOp>) {
        if self.tx.send((ops, None)).is_err() {
            tracing::error!("record writer stopped: records lost");
        }
    }
}

/// Commits start at most this often: what arrives meanwhile shares the next
/// transaction. Every commit costs an fsync and a rewrite of the B-tree pages
/// it touches (about 15 page writes, nearly as many for one call as for fifty),
/// so under load this bounds the store's work per second instead of letting it
/// grow with the rate. A call's CDR is still durable before its caller can be
/// answered: its start waits up to this long more (hidden behind the callee's
/// ringing on a real call); other records reach the file as much later. A write
/// after a quiet spell is committed at once. 40 ms rather than 10: with
/// `bench/cps.sh`'s calls (answered and hung up at once) crossbar used ~7 % less
/// CPU per call (two nodes measured side by side at 2,000 calls/s each); 100 ms
/// saved nothing more.
const COMMIT_PACE: Duration = Duration::from_millis(40);

/// Unsynced writes are made durable at least this often.
const SYNC_EVERY: Duration = Duration::from_secs(1);

async fn run(store: Arc<dyn Store>, mut rx: mpsc::UnboundedReceiver<(Vec<BatchOp>, Option<Ack>)>) {
    let mut tick = tokio::time::interval(SYNC_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dirty = false;
    let mut last_commit: Option<Instant> = None;
    loop {
        let first = tokio::select! {
            m = rx.recv() => match m {
                Some(m) => m,
                None => break,
            },
            _ = tick.tick() => {
                if dirty {
                    match store.write_batch(Arc::new([]), true).await {
                        Ok(()) => dirty = false,
                        Err(e) => tracing::warn!("periodic sync of records failed: {e}"),
                    }
                }
                continue;
            }
        };
        let mut ops = first.0;
        let mut acks: Vec<Ack> = first.1.into_iter().collect();
        gather(&mut rx, &mut ops, &mut acks);
        // Under load, wait out the pace: one transaction (and fsync) for more calls.
        if let Some(wait) = last_commit.and_then(|t| COMMIT_PACE.checked_sub(t.elapsed())) {
            if ops.len() < MAX_BATCH {
                tokio::time::sleep(wait).await;
                gather(&mut rx, &mut ops, &mut acks);
            }
        }
        // Synced only when someone waits for durability (a call's CDR at start);
        // the rest is fsynced by the next synced commit.
        let sync = !acks.is_empty();
        let n = ops.len();
        last_commit = Some(Instant::now());
        let result = write_with_retry(&*store, ops.into(), sync).await;
        dirty = !sync || (dirty && result.is_err());
        if let Err(e) = &result {
            tracing::error!("cannot write {n} records: {e}");
        }
        let msg = result.map_err(|e| e.to_string());
        for ack in acks {
            let _ = ack.send(msg.clone());
        }
    }
}

/// Adds what is queued, up to [`MAX_BATCH`] ops, to the batch.
fn gather(rx: &mut mpsc::UnboundedReceiver<(Vec<BatchOp>, Option<Ack>)>, ops: &mut Vec<BatchOp>, acks: &mut Vec<Ack>) {
    while ops.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok((more, ack)) => {
                ops.extend(more);
                acks.extend(ack);
            }
            Err(_) => break,
        }
    }
}

async fn write_with_retry(store: &dyn Store, ops: Arc<[BatchOp]>, sync: bool) -> Result<(), StoreError> {
    let mut delay = Duration::from_millis(20);
    let mut attempt = 1;
    loop {
        match store.write_batch(Arc::clone(&ops), sync).await {
            Ok(()) => return Ok(()),
            Err(e) if attempt < 5 => {
                tracing::warn!("record batch failed (attempt {attempt}): {e}; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}
