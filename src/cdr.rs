//! Call detail records and the tenant event stream.
//!
//! A CDR is written (durably, through the node's [`RecordWriter`]) when a call
//! starts, together with an `active-call` marker, and completed when it ends;
//! the marker goes at the same time. After a crash, [`close_interrupted`] finds
//! the markers left behind and closes their CDRs as `interrupted`: no call is
//! lost, none is counted twice.

use crate::store::writer::RecordWriter;
use crate::store::{BatchOp, RecordKind, ScopedStore, StoreError};
use serde::{Deserialize, Serialize};
use std::time::SystemTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CdrState {
    InProgress,
    Completed,
    Interrupted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// From a carrier to a DID.
    Inbound,
    /// From an extension out through a trunk.
    Outbound,
    /// Extension to extension.
    Internal,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cdr {
    /// Record id: start time (ms) + a hash of the Call-ID, so listings are chronological.
    pub id: String,
    pub tenant: String,
    /// The caller's Call-ID.
    pub call_id: String,
    pub direction: Direction,
    pub from: String,
    pub to: String,
    pub did: Option<String>,
    pub trunk: Option<String>,
    /// RFC 3339 times.
    pub start: String,
    pub answer: Option<String>,
    pub end: Option<String>,
    /// Seconds from start to end, and from answer to end.
    pub duration_s: Option<f64>,
    pub billable_s: Option<f64>,
    /// answered, busy, no-answer, cancelled, failed, refused, interrupted.
    pub disposition: String,
    pub hangup_code: Option<u16>,
    pub hangup_reason: Option<String>,
    /// `caller`, `callee` or `system`.
    pub hangup_side: Option<String>,
    pub agent: Option<String>,
    pub queue: Option<String>,
    pub state: CdrState,
    /// Id of the call's recording, when recorded.
    pub recording: Option<String>,
    pub node: String,
}

/// An entry of a tenant's event stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// `call.started`, `call.ringing`, `call.answered`, `call.ended`,
    /// `registration.added`, `registration.removed`, `limit.refused`.
    pub kind: String,
    pub at: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub call: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub detail: Option<String>,
}

impl Event {
    pub fn new(kind: &str, call: Option<&str>, detail: Option<String>) -> Event {
        Event { kind: kind.to_string(), at: rfc3339(SystemTime::now()), call: call.map(str::to_string), detail }
    }
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// A CDR id that sorts by start time.
pub fn new_id(start: SystemTime, call_id: &str) -> String {
    use std::hash::{Hash, Hasher};
    let ms = start.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    call_id.hash(&mut h);
    format!("{ms:013}-{:016x}", h.finish())
}

fn seconds_between(a: &str, b: &str) -> Option<f64> {
    let a = humantime::parse_rfc3339(a).ok()?;
    let b = humantime::parse_rfc3339(b).ok()?;
    Some(b.duration_since(a).ok()?.as_secs_f64())
}

impl Cdr {
    /// Fills the end fields and the durations.
    pub fn finish(&mut self, end: SystemTime, state: CdrState) {
        let end = rfc3339(end);
        self.duration_s = seconds_between(&self.start, &end);
        self.billable_s = self.answer.as_deref().and_then(|a| seconds_between(a, &end)).or(Some(0.0));
        self.end = Some(end);
        self.state = state;
    }

    /// The ops that record a call's start: the CDR, its active marker, an event.
    pub fn start_ops(&self, store: &ScopedStore) -> Result<Vec<BatchOp>, StoreError> {
        Ok(vec![
            store.sealed_put(RecordKind::Cdr, &self.id, &json(self))?,
            store.sealed_put(RecordKind::ActiveCall, &self.id, b"")?,
            store.sealed_event(&json(&Event::new("call.started", Some(&self.id), Some(format!("{} -> {}", self.from, self.to)))))?,
        ])
    }

    /// The ops that record a call's answer.
    pub fn answer_ops(&self, store: &ScopedStore) -> Result<Vec<BatchOp>, StoreError> {
        Ok(vec![
            store.sealed_put(RecordKind::Cdr, &self.id, &json(self))?,
            store.sealed_event(&json(&Event::new("call.answered", Some(&self.id), None)))?,
        ])
    }

    /// The ops that record a call's end.
    pub fn end_ops(&self, store: &ScopedStore) -> Result<Vec<BatchOp>, StoreError> {
        Ok(vec![
            store.sealed_put(RecordKind::Cdr, &self.id, &json(self))?,
            store.batch_delete(RecordKind::ActiveCall, &self.id)?,
            store.sealed_event(&json(&Event::new("call.ended", Some(&self.id), Some(self.disposition.clone()))))?,
        ])
    }
}

pub fn json<T: Serialize>(v: &T) -> Vec<u8> {
    // A CDR is ~600 bytes: room for it up front instead of growing from serde_json's 128.
    let mut out = Vec::with_capacity(1024);
    serde_json::to_writer(&mut out, v).expect("CDRs and events always serialize");
    out
}

/// Queues an event without waiting.
pub fn emit(writer: &RecordWriter, store: &ScopedStore, event: Event) {
    match store.sealed_event(&json(&event)) {
        Ok(op) => writer.write_detached(vec![op]),
        Err(e) => tracing::error!(tenant = %store.tenant(), "cannot seal event: {e}"),
    }
}

/// Closes the CDRs of calls that were in progress when the node stopped
/// without ending them (crash, kill -9). Returns how many were closed.
pub async fn close_interrupted(store: &ScopedStore, node_started: SystemTime) -> Result<usize, StoreError> {
    let mut closed = 0;
    loop {
        let page = store.list(RecordKind::ActiveCall, None, 500).await?;
        if page.is_empty() {
            return Ok(closed);
        }
        let mut ops = Vec::new();
        for (id, _) in page {
            match store.get_json::<Cdr>(RecordKind::Cdr, &id).await? {
                Some(mut cdr) if cdr.state == CdrState::InProgress => {
                    cdr.disposition = "interrupted".into();
                    cdr.hangup_side = Some("system".into());
                    cdr.hangup_reason = Some("node stopped while the call was in progress".into());
                    cdr.finish(node_started, CdrState::Interrupted);
                    ops.extend(cdr.end_ops(store)?);
                    closed += 1;
                }
                // Completed but the marker survived (crash between the two): just drop the marker.
                _ => ops.push(store.batch_delete(RecordKind::ActiveCall, &id)?),
            }
        }
        // The markers are deleted in the same batch, so the next page makes progress.
        store.write_batch(ops).await?;
    }
}

/// A tenant's CDRs, oldest first (`limit` at most, after the id `after`).
pub async fn list(store: &ScopedStore, after: Option<&str>, limit: usize) -> Result<Vec<Cdr>, StoreError> {
    let mut out = Vec::new();
    let mut cursor = after.map(str::to_string);
    while out.len() < limit {
        let page = store.list_json::<Cdr>(RecordKind::Cdr, cursor.as_deref(), (limit - out.len()).min(1000)).await?;
        if page.is_empty() {
            break;
        }
        cursor = page.last().map(|(id, _)| id.clone());
        out.extend(page.into_iter().map(|(_, c)| c));
    }
    Ok(out)
}
