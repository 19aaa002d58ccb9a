//! Embedded backend: one redb file under the data directory. The default for a single node.
//!
//! Tables:
//! * `records`: `"{tenant}/{kind}/{id}"` → sealed bytes. Tenant ids cannot contain `/`, so the
//!   prefix `"{tenant}/"` selects exactly one tenant and byte order gives id order.
//! * `event_segments`: `(tenant, first seq)` → the events of one commit, in order,
//!   each as a little-endian `u32` length and its sealed bytes. A busy tenant's
//!   events cost one B-tree insert per commit instead of one each.
//! * `events`: `(tenant, seq)` → sealed bytes, one event per entry: written by
//!   earlier versions, still read (their sequence numbers all precede the segments').
//! * `node`: node key → bytes; a separate table, so tenant paths can never reach it.
//!
//! redb is synchronous, so every call runs on tokio's blocking pool. Write transactions use
//! redb's default `Durability::Immediate`: when `put` returns, the commit is on disk.

use std::collections::{HashMap, HashSet};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableTable, TableDefinition};

use super::{check_page, BatchOp, NodeKey, RecordKind, Store, StoreError, StoreKey, TenantId};

const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
const EVENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("events");
const SEGMENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("event_segments");
const NODE: TableDefinition<&str, &[u8]> = TableDefinition::new("node");

/// File name of the database inside the data directory.
pub const DB_FILE_NAME: &str = "crossbar.redb";

/// redb-backed [`Store`]. Cheap to clone; all clones share the open database.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    path: PathBuf,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .finish()
    }
}

/// The ops of a batch without the record writes a later op of the same batch
/// overrides (a call's CDR put at answer and again at its end, its active-call
/// marker put and deleted): the transaction ends in the same state with fewer
/// B-tree writes. Events are all kept, in order.
fn latest_record_ops(ops: &[BatchOp]) -> impl Iterator<Item = &BatchOp> {
    let mut seen: HashSet<&StoreKey> = HashSet::with_capacity(ops.len());
    let mut keep = vec![true; ops.len()];
    for (i, op) in ops.iter().enumerate().rev() {
        if let BatchOp::Put(k, _) | BatchOp::Delete(k) = op {
            keep[i] = seen.insert(k);
        }
    }
    ops.iter().zip(keep).filter_map(|(op, keep)| keep.then_some(op))
}

/// Smallest string greater than every string starting with `prefix` (whose last byte is
/// `/`, as all prefixes used here are): `"acme/"` → `"acme0"`.
fn prefix_end(prefix: &str) -> String {
    debug_assert!(prefix.ends_with('/'));
    let mut end = prefix[..prefix.len() - 1].to_string();
    end.push('0'); // '0' is the byte right after '/'
    end
}

/// Appends one event to a segment being built.
fn push_event(segment: &mut Vec<u8>, event: &[u8]) {
    segment.extend_from_slice(&(event.len() as u32).to_le_bytes());
    segment.extend_from_slice(event);
}

/// The events of a segment, in order; a malformed segment is reported as corrupt.
fn segment_events<'a>(tenant: &str, first: u64, segment: &'a [u8]) -> Result<Vec<&'a [u8]>, StoreError> {
    let mut out = Vec::new();
    let mut rest = segment;
    while !rest.is_empty() {
        let len = rest.get(..4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
        match len.and_then(|n| rest.get(4..4 + n)) {
            Some(event) => {
                out.push(event);
                rest = &rest[4 + event.len()..];
            }
            None => {
                return Err(StoreError::Corrupt {
                    what: format!("event segment {first} of tenant {tenant}"),
                    detail: format!("truncated after {} events", out.len()),
                })
            }
        }
    }
    Ok(out)
}

type EventTable<'a> = redb::Table<'a, (&'static str, u64), &'static [u8]>;

/// The tenant's last event sequence number (0 before its first event).
fn last_seq(segments: &EventTable, legacy: &EventTable, tenant: &str) -> Result<u64, StoreError> {
    let e = |e: redb::StorageError| StoreError::embedded("last event", e);
    let range = (tenant, 0)..=(tenant, u64::MAX);
    if let Some((k, v)) = segments.range::<(&str, u64)>(range.clone()).map_err(e)?.next_back().transpose().map_err(e)? {
        let first = k.value().1;
        let n = segment_events(tenant, first, v.value())?.len() as u64;
        return Ok(first + n.max(1) - 1);
    }
    Ok(legacy.range::<(&str, u64)>(range).map_err(e)?.next_back().transpose().map_err(e)?.map(|(k, _)| k.value().1).unwrap_or(0))
}

/// Appends `events` (sealed) as one segment; returns the sequence number of the last.
fn append_segment(segments: &mut EventTable, legacy: &EventTable, tenant: &str, events: &[&[u8]]) -> Result<u64, StoreError> {
    let first = last_seq(segments, legacy, tenant)?.checked_add(1).filter(|f| f.checked_add(events.len() as u64).is_some()).ok_or_else(|| StoreError::Corrupt {
        what: format!("event stream of tenant {tenant}"),
        detail: "sequence number overflow".into(),
    })?;
    if let Some(big) = events.iter().find(|e| u32::try_from(e.len()).is_err()) {
        return Err(StoreError::Corrupt { what: format!("event of tenant {tenant}"), detail: format!("{} bytes: larger than an event can be", big.len()) });
    }
    let mut segment = Vec::with_capacity(events.iter().map(|e| e.len() + 4).sum());
    for ev in events {
        push_event(&mut segment, ev);
    }
    segments.insert((tenant, first), segment.as_slice()).map_err(|e| StoreError::embedded("append events", e))?;
    Ok(first + events.len() as u64 - 1)
}

/// The page cache of the embedded store (`store.cache_mb`), in MB.
pub const DEFAULT_CACHE_MB: usize = 64;

impl EmbeddedStore {
    /// Opens (or creates) `crossbar.redb` in `data_dir`, creating the directory if
    /// needed, with the default page cache.
    pub async fn open(data_dir: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(data_dir, DEFAULT_CACHE_MB).await
    }

    /// [`open`](Self::open) with a page cache of `cache_mb` MB.
    pub async fn open_with_cache(data_dir: &Path, cache_mb: usize) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::DataDir {
            path: data_dir.display().to_string(),
            source,
        })?;
        Self::open_file(&data_dir.join(DB_FILE_NAME), cache_mb).await
    }

    /// Opens (or creates) the database file at `path`.
    pub async fn open_file(path: &Path, cache_mb: usize) -> Result<Self, StoreError> {
        let path = path.to_path_buf();
        let p = path.clone();
        let db = tokio::task::spawn_blocking(move || -> Result<Database, StoreError> {
            let open_err = |e: redb::Error| StoreError::EmbeddedOpen {
                path: p.display().to_string(),
                source: Box::new(e),
            };
            let db = redb::Builder::new().set_cache_size(cache_mb << 20).create(&p).map_err(|e| open_err(e.into()))?;
            // Create every table up front so read transactions never hit "table does not exist".
            let tx = db.begin_write().map_err(|e| open_err(e.into()))?;
            tx.open_table(RECORDS).map_err(|e| open_err(e.into()))?;
            tx.open_table(EVENTS).map_err(|e| open_err(e.into()))?;
            tx.open_table(SEGMENTS).map_err(|e| open_err(e.into()))?;
            tx.open_table(NODE).map_err(|e| open_err(e.into()))?;
            tx.commit().map_err(|e| open_err(e.into()))?;
            Ok(db)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))??;
        Ok(EmbeddedStore {
            db: Arc::new(db),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

/// Ordered scan of a `&str`-keyed table within `[start, end)`, starting strictly after
/// `after` when given.
fn scan(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    start: &str,
    end: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<(String, Vec<u8>)>, redb::StorageError> {
    let lower = match after {
        Some(a) if a >= start => Bound::Excluded(a),
        _ => Bound::Included(start),
    };
    let mut out = Vec::new();
    if limit == 0 {
        return Ok(out);
    }
    for entry in table.range::<&str>((lower, Bound::Excluded(end)))? {
        let (k, v) = entry?;
        out.push((k.value().to_string(), v.value().to_vec()));
        if out.len() >= limit {
            break;
        }
    }
    Ok(out)
}

#[async_trait]
impl Store for EmbeddedStore {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn write_batch(&self, ops: Arc<[BatchOp]>, sync: bool) -> Result<(), StoreError> {
        // An empty synced batch still commits: it makes earlier unsynced commits durable.
        if ops.is_empty() && !sync {
            return Ok(());
        }
        self.run(move |db| {
            let e = |e: redb::StorageError| StoreError::embedded("write_batch", e);
            let mut tx = db.begin_write().map_err(|e| StoreError::embedded("write_batch", e))?;
            // Eventual: written to the file (safe from a killed process), fsynced by the next Immediate commit.
            tx.set_durability(if sync { redb::Durability::Immediate } else { redb::Durability::Eventual });
            {
                let mut records = tx.open_table(RECORDS).map_err(|e| StoreError::embedded("write_batch", e))?;
                // Events grouped by tenant, in order: one segment per tenant.
                let mut events: Vec<(&str, Vec<&[u8]>)> = Vec::new();
                let mut by_tenant: HashMap<&str, usize> = HashMap::new();
                // One buffer for every record key of the batch.
                let mut key = String::new();
                for op in latest_record_ops(&ops) {
                    match op {
                        BatchOp::Put(k, v) => {
                            key.clear();
                            k.render_into(&mut key);
                            records.insert(key.as_str(), v.as_slice()).map_err(e)?;
                        }
                        BatchOp::Delete(k) => {
                            key.clear();
                            k.render_into(&mut key);
                            records.remove(key.as_str()).map_err(e)?;
                        }
                        BatchOp::Event(t, v) => {
                            let i = *by_tenant.entry(t.as_str()).or_insert_with(|| {
                                events.push((t.as_str(), Vec::new()));
                                events.len() - 1
                            });
                            events[i].1.push(v);
                        }
                    }
                }
                if !events.is_empty() {
                    let mut segments = tx.open_table(SEGMENTS).map_err(|e| StoreError::embedded("write_batch", e))?;
                    let legacy = tx.open_table(EVENTS).map_err(|e| StoreError::embedded("write_batch", e))?;
                    for (t, evs) in &events {
                        append_segment(&mut segments, &legacy, t, evs)?;
                    }
                }
            }
            tx.commit().map_err(|e| StoreError::embedded("write_batch", e))
        })
        .await
    }

    async fn put(&self, key: &StoreKey, value: Vec<u8>) -> Result<(), StoreError> {
        let k = key.to_string();
        self.run(move |db| {
            let tx = db
                .begin_write()
                .map_err(|e| StoreError::embedded("put", e))?;
            {
                let mut t = tx
                    .open_table(RECORDS)
                    .map_err(|e| StoreError::embedded("put", e))?;
                t.insert(k.as_str(), value.as_slice())
                    .map_err(|e| StoreError::embedded("put", e))?;
            }
            tx.commit().map_err(|e| StoreError::embedded("put", e))
        })
        .await
    }

    async fn get(&self, key: &StoreKey) -> Result<Option<Vec<u8>>, StoreError> {
        let k = key.to_string();
        self.run(move |db| {
            let tx = db
                .begin_read()
                .map_err(|e| StoreError::embedded("get", e))?;
            let t = tx
                .open_table(RECORDS)
                .map_err(|e| StoreError::embedded("get", e))?;
            let v = t
                .get(k.as_str())
                .map_err(|e| StoreError::embedded("get", e))?;
            Ok(v.map(|g| g.value().to_vec()))
        })
        .await
    }

    async fn delete(&self, key: &StoreKey) -> Result<bool, StoreError> {
        let k = key.to_string();
        self.run(move |db| {
            let tx = db
                .begin_write()
                .map_err(|e| StoreError::embedded("delete", e))?;
            let existed = {
                let mut t = tx
                    .open_table(RECORDS)
                    .map_err(|e| StoreError::embedded("delete", e))?;
                let old = t
                    .remove(k.as_str())
                    .map_err(|e| StoreError::embedded("delete", e))?;
                old.is_some()
            };
            tx.commit().map_err(|e| StoreError::embedded("delete", e))?;
            Ok(existed)
        })
        .await
    }

    async fn list(
        &self,
        tenant: &TenantId,
        kind: RecordKind,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        check_page(limit)?;
        let prefix = StoreKey::kind_prefix(tenant, kind);
        let after = after.map(|a| format!("{prefix}{a}"));
        self.run(move |db| {
            let tx = db
                .begin_read()
                .map_err(|e| StoreError::embedded("list", e))?;
            let t = tx
                .open_table(RECORDS)
                .map_err(|e| StoreError::embedded("list", e))?;
            let end = prefix_end(&prefix);
            let rows = scan(&t, &prefix, &end, after.as_deref(), limit)
                .map_err(|e| StoreError::embedded("list", e))?;
            // Strip the "{tenant}/{kind}/" prefix: callers get bare ids of their own scope.
            rows.into_iter()
                .map(|(k, v)| match k.strip_prefix(prefix.as_str()) {
                    Some(id) => Ok((id.to_string(), v)),
                    None => Err(StoreError::Corrupt {
                        what: format!("records table key {k}"),
                        detail: format!("returned for prefix {prefix}"),
                    }),
                })
                .collect()
        })
        .await
    }

    async fn delete_tenant(&self, tenant: &TenantId) -> Result<u64, StoreError> {
        let prefix = format!("{}/", tenant.as_str());
        let tenant = tenant.as_str().to_string();
        self.run(move |db| {
            let err = |e: redb::StorageError| StoreError::embedded("delete_tenant", e);
            let tx = db
                .begin_write()
                .map_err(|e| StoreError::embedded("delete_tenant", e))?;
            let mut removed = 0u64;
            {
                let mut t = tx
                    .open_table(RECORDS)
                    .map_err(|e| StoreError::embedded("delete_tenant", e))?;
                let end = prefix_end(&prefix);
                t.retain_in::<&str, _>(prefix.as_str()..end.as_str(), |_, _| {
                    removed += 1;
                    false
                })
                .map_err(err)?;
            }
            {
                let mut t = tx
                    .open_table(EVENTS)
                    .map_err(|e| StoreError::embedded("delete_tenant", e))?;
                t.retain_in::<(&str, u64), _>(
                    (tenant.as_str(), 0)..=(tenant.as_str(), u64::MAX),
                    |_, _| {
                        removed += 1;
                        false
                    },
                )
                .map_err(err)?;
                let mut segments = tx.open_table(SEGMENTS).map_err(|e| StoreError::embedded("delete_tenant", e))?;
                segments
                    .retain_in::<(&str, u64), _>((tenant.as_str(), 0)..=(tenant.as_str(), u64::MAX), |(_, first), v| {
                        // A damaged segment goes too (counted as one): the tenant is being shredded.
                        removed += segment_events(&tenant, first, v).map_or(1, |evs| evs.len() as u64);
                        false
                    })
                    .map_err(err)?;
            }
            tx.commit()
                .map_err(|e| StoreError::embedded("delete_tenant", e))?;
            Ok(removed)
        })
        .await
    }

    async fn append_event(&self, tenant: &TenantId, data: Vec<u8>) -> Result<u64, StoreError> {
        let tenant = tenant.as_str().to_string();
        self.run(move |db| {
            let tx = db.begin_write().map_err(|e| StoreError::embedded("append_event", e))?;
            let seq = {
                let mut segments = tx.open_table(SEGMENTS).map_err(|e| StoreError::embedded("append_event", e))?;
                let legacy = tx.open_table(EVENTS).map_err(|e| StoreError::embedded("append_event", e))?;
                // The write transaction is exclusive, so last + 1 cannot race.
                append_segment(&mut segments, &legacy, &tenant, &[data.as_slice()])?
            };
            tx.commit().map_err(|e| StoreError::embedded("append_event", e))?;
            Ok(seq)
        })
        .await
    }

    async fn read_events(
        &self,
        tenant: &TenantId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        check_page(limit)?;
        let tenant = tenant.as_str().to_string();
        let start = match after {
            None => 0,
            Some(u64::MAX) => return Ok(Vec::new()),
            Some(a) => a + 1,
        };
        self.run(move |db| {
            let err = |e: redb::StorageError| StoreError::embedded("read_events", e);
            let tx = db
                .begin_read()
                .map_err(|e| StoreError::embedded("read_events", e))?;
            let legacy = tx.open_table(EVENTS).map_err(|e| StoreError::embedded("read_events", e))?;
            let segments = tx.open_table(SEGMENTS).map_err(|e| StoreError::embedded("read_events", e))?;
            let mut out = Vec::new();
            if limit == 0 {
                return Ok(out);
            }
            let t = tenant.as_str();
            for entry in legacy.range::<(&str, u64)>((t, start)..=(t, u64::MAX)).map_err(err)? {
                let (k, v) = entry.map_err(err)?;
                out.push((k.value().1, v.value().to_vec()));
                if out.len() >= limit {
                    return Ok(out);
                }
            }
            // The segment holding `start` may begin before it.
            let from = segments
                .range::<(&str, u64)>((t, 0)..=(t, start))
                .map_err(err)?
                .next_back()
                .transpose()
                .map_err(err)?
                .map(|(k, _)| k.value().1)
                .unwrap_or(start);
            for entry in segments.range::<(&str, u64)>((t, from)..=(t, u64::MAX)).map_err(err)? {
                let (k, v) = entry.map_err(err)?;
                let first = k.value().1;
                for (seq, ev) in (first..).zip(segment_events(t, first, v.value())?) {
                    if seq >= start {
                        out.push((seq, ev.to_vec()));
                        if out.len() >= limit {
                            return Ok(out);
                        }
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    async fn put_node(&self, key: &NodeKey, value: Vec<u8>) -> Result<(), StoreError> {
        let k = key.as_str().to_string();
        self.run(move |db| {
            let tx = db
                .begin_write()
                .map_err(|e| StoreError::embedded("put_node", e))?;
            {
                let mut t = tx
                    .open_table(NODE)
                    .map_err(|e| StoreError::embedded("put_node", e))?;
                t.insert(k.as_str(), value.as_slice())
                    .map_err(|e| StoreError::embedded("put_node", e))?;
            }
            tx.commit().map_err(|e| StoreError::embedded("put_node", e))
        })
        .await
    }

    async fn put_node_if_absent(&self, key: &NodeKey, value: Vec<u8>) -> Result<bool, StoreError> {
        let k = key.as_str().to_string();
        self.run(move |db| {
            let err = |e: redb::StorageError| StoreError::embedded("put_node_if_absent", e);
            let tx = db
                .begin_write()
                .map_err(|e| StoreError::embedded("put_node_if_absent", e))?;
            {
                let mut t = tx
                    .open_table(NODE)
                    .map_err(|e| StoreError::embedded("put_node_if_absent", e))?;
                if t.get(k.as_str()).map_err(err)?.is_some() {
                    return Ok(false); // dropping the transaction aborts it
                }
                t.insert(k.as_str(), value.as_slice()).map_err(err)?;
            }
            tx.commit()
                .map_err(|e| StoreError::embedded("put_node_if_absent", e))?;
            Ok(true)
        })
        .await
    }

    async fn get_node(&self, key: &NodeKey) -> Result<Option<Vec<u8>>, StoreError> {
        let k = key.as_str().to_string();
        self.run(move |db| {
            let tx = db
                .begin_read()
                .map_err(|e| StoreError::embedded("get_node", e))?;
            let t = tx
                .open_table(NODE)
                .map_err(|e| StoreError::embedded("get_node", e))?;
            let v = t
                .get(k.as_str())
                .map_err(|e| StoreError::embedded("get_node", e))?;
            Ok(v.map(|g| g.value().to_vec()))
        })
        .await
    }

    async fn delete_node(&self, key: &NodeKey) -> Result<bool, StoreError> {
        let k = key.as_str().to_string();
        self.run(move |db| {
            let tx = db
                .begin_write()
                .map_err(|e| StoreError::embedded("delete_node", e))?;
            let existed = {
                let mut t = tx
                    .open_table(NODE)
                    .map_err(|e| StoreError::embedded("delete_node", e))?;
                let old = t
                    .remove(k.as_str())
                    .map_err(|e| StoreError::embedded("delete_node", e))?;
                old.is_some()
            };
            tx.commit()
                .map_err(|e| StoreError::embedded("delete_node", e))?;
            Ok(existed)
        })
        .await
    }

    async fn list_node(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        check_page(limit)?;
        let prefix = prefix.to_string();
        let after = after.map(str::to_string);
        self.run(move |db| {
            let err = |e: redb::StorageError| StoreError::embedded("list_node", e);
            let tx = db
                .begin_read()
                .map_err(|e| StoreError::embedded("list_node", e))?;
            let t = tx
                .open_table(NODE)
                .map_err(|e| StoreError::embedded("list_node", e))?;
            let lower = match after.as_deref() {
                Some(a) if a >= prefix.as_str() => Bound::Excluded(a),
                _ => Bound::Included(prefix.as_str()),
            };
            let mut out = Vec::new();
            if limit == 0 {
                return Ok(out);
            }
            // Arbitrary prefixes have no simple upper bound; stop at the first key that no
            // longer starts with the prefix (keys are ordered, so none after it will).
            for entry in t.range::<&str>((lower, Bound::Unbounded)).map_err(err)? {
                let (k, v) = entry.map_err(err)?;
                let k = k.value();
                if !k.starts_with(prefix.as_str()) {
                    break;
                }
                out.push((k.to_string(), v.value().to_vec()));
                if out.len() >= limit {
                    break;
                }
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testutil::TempDir;

    fn tenant(s: &str) -> TenantId {
        TenantId::new(s).unwrap()
    }

    /// A store written by an earlier version: one event per entry in `events`.
    async fn with_legacy_events(dir: &TempDir, tenant: &str, n: u64) -> EmbeddedStore {
        let store = EmbeddedStore::open(dir.path()).await.unwrap();
        let tx = store.db.begin_write().unwrap();
        {
            let mut t = tx.open_table(EVENTS).unwrap();
            for seq in 1..=n {
                t.insert((tenant, seq), format!("old{seq}").as_bytes()).unwrap();
            }
        }
        tx.commit().unwrap();
        store
    }

    fn batch(events: &[(&TenantId, &str)]) -> Arc<[BatchOp]> {
        events.iter().map(|(t, v)| BatchOp::Event((*t).clone(), v.as_bytes().to_vec())).collect()
    }

    fn texts(evs: &[(u64, Vec<u8>)]) -> Vec<(u64, String)> {
        evs.iter().map(|(s, v)| (*s, String::from_utf8(v.clone()).unwrap())).collect()
    }

    #[tokio::test]
    async fn a_batch_stores_each_tenants_events_as_one_segment_read_back_one_by_one() {
        let dir = TempDir::new("segments");
        let store = EmbeddedStore::open(dir.path()).await.unwrap();
        let (acme, globex) = (tenant("acme"), tenant("globex"));
        store.write_batch(batch(&[(&acme, "a1"), (&globex, "g1"), (&acme, "a2"), (&acme, "a3")]), true).await.unwrap();
        store.write_batch(batch(&[(&acme, "a4"), (&acme, "a5")]), false).await.unwrap();
        assert_eq!(store.append_event(&acme, b"a6".to_vec()).await.unwrap(), 6, "numbering continues after the segments");
        // One B-tree entry per tenant and commit.
        let tx = store.db.begin_read().unwrap();
        let segs = tx.open_table(SEGMENTS).unwrap();
        let firsts: Vec<u64> = segs.range::<(&str, u64)>(("acme", 0)..=("acme", u64::MAX)).unwrap().map(|e| e.unwrap().0.value().1).collect();
        assert_eq!(firsts, [1, 4, 6]);
        let all = store.read_events(&acme, None, 100).await.unwrap();
        assert_eq!(texts(&all), [(1, "a1"), (2, "a2"), (3, "a3"), (4, "a4"), (5, "a5"), (6, "a6")].map(|(s, v)| (s, v.to_string())));
        // From inside a segment, with a limit that ends inside the next one.
        let mid = store.read_events(&acme, Some(1), 3).await.unwrap();
        assert_eq!(texts(&mid), [(2, "a2"), (3, "a3"), (4, "a4")].map(|(s, v)| (s, v.to_string())));
        assert!(store.read_events(&acme, Some(6), 10).await.unwrap().is_empty());
        assert_eq!(texts(&store.read_events(&globex, None, 10).await.unwrap()), [(1, "g1".to_string())], "globex has its own numbering and sees only its events");
        assert_eq!(store.delete_tenant(&acme).await.unwrap(), 6, "delete_tenant counts events, not segments");
        assert!(store.read_events(&acme, None, 10).await.unwrap().is_empty());
        assert_eq!(store.read_events(&globex, None, 10).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn events_of_an_earlier_version_are_read_first_and_numbering_continues() {
        let dir = TempDir::new("legacy-events");
        let store = with_legacy_events(&dir, "acme", 3).await;
        let acme = tenant("acme");
        store.write_batch(batch(&[(&acme, "new4"), (&acme, "new5")]), true).await.unwrap();
        assert_eq!(store.append_event(&acme, b"new6".to_vec()).await.unwrap(), 6);
        let all = store.read_events(&acme, None, 100).await.unwrap();
        let want = [(1, "old1"), (2, "old2"), (3, "old3"), (4, "new4"), (5, "new5"), (6, "new6")];
        assert_eq!(texts(&all), want.map(|(s, v)| (s, v.to_string())));
        assert_eq!(texts(&store.read_events(&acme, Some(2), 3).await.unwrap()), want[2..5].iter().map(|(s, v)| (*s, v.to_string())).collect::<Vec<_>>());
        assert_eq!(store.delete_tenant(&acme).await.unwrap(), 6);
        assert!(store.read_events(&acme, None, 10).await.unwrap().is_empty());
    }

    #[test]
    fn a_truncated_segment_is_reported_as_corrupt() {
        let mut seg = Vec::new();
        push_event(&mut seg, b"one");
        push_event(&mut seg, b"two");
        assert_eq!(segment_events("acme", 1, &seg).unwrap(), [b"one".as_slice(), b"two"]);
        let err = segment_events("acme", 7, &seg[..seg.len() - 1]).unwrap_err().to_string();
        assert!(err.contains("event segment 7 of tenant acme") && err.contains("after 1 events"), "{err}");
    }
}
