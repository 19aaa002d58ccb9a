//! Embedded backend: one redb file under the data directory. The default for a single node.
//!
//! Tables:
//! * `records`: `"{tenant}/{kind}/{id}"` → sealed bytes. Tenant ids cannot contain `/`, so the
//!   prefix `"{tenant}/"` selects exactly one tenant and byte order gives id order.
//! * `events`: `(tenant, seq)` → sealed bytes.
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

impl EmbeddedStore {
    /// Opens (or creates) `crossbar.redb` in `data_dir`, creating the directory if needed.
    pub async fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::DataDir {
            path: data_dir.display().to_string(),
            source,
        })?;
        Self::open_file(&data_dir.join(DB_FILE_NAME)).await
    }

    /// Opens (or creates) the database file at `path`.
    pub async fn open_file(path: &Path) -> Result<Self, StoreError> {
        let path = path.to_path_buf();
        let p = path.clone();
        let db = tokio::task::spawn_blocking(move || -> Result<Database, StoreError> {
            let open_err = |e: redb::Error| StoreError::EmbeddedOpen {
                path: p.display().to_string(),
                source: Box::new(e),
            };
            let db = Database::create(&p).map_err(|e| open_err(e.into()))?;
            // Create every table up front so read transactions never hit "table does not exist".
            let tx = db.begin_write().map_err(|e| open_err(e.into()))?;
            tx.open_table(RECORDS).map_err(|e| open_err(e.into()))?;
            tx.open_table(EVENTS).map_err(|e| open_err(e.into()))?;
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
                let mut events = tx.open_table(EVENTS).map_err(|e| StoreError::embedded("write_batch", e))?;
                // Sequence numbers: one lookup per tenant and batch, not per event.
                let mut next_seq: HashMap<&str, u64> = HashMap::new();
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
                            let t = t.as_str();
                            let seq = match next_seq.get_mut(t) {
                                Some(seq) => seq,
                                None => {
                                    let last = events
                                        .range::<(&str, u64)>((t, 0)..=(t, u64::MAX))
                                        .map_err(e)?
                                        .next_back()
                                        .transpose()
                                        .map_err(e)?
                                        .map(|(k, _)| k.value().1)
                                        .unwrap_or(0);
                                    next_seq.entry(t).or_insert(last)
                                }
                            };
                            *seq += 1;
                            events.insert((t, *seq), v.as_slice()).map_err(e)?;
                        }
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
            let err = |e: redb::StorageError| StoreError::embedded("append_event", e);
            let tx = db
                .begin_write()
                .map_err(|e| StoreError::embedded("append_event", e))?;
            let seq = {
                let mut t = tx
                    .open_table(EVENTS)
                    .map_err(|e| StoreError::embedded("append_event", e))?;
                // The write transaction is exclusive, so last + 1 cannot race.
                let last = t
                    .range::<(&str, u64)>((tenant.as_str(), 0)..=(tenant.as_str(), u64::MAX))
                    .map_err(err)?
                    .next_back()
                    .transpose()
                    .map_err(err)?
                    .map(|(k, _)| k.value().1)
                    .unwrap_or(0);
                let seq = last.checked_add(1).ok_or_else(|| StoreError::Corrupt {
                    what: format!("event stream of tenant {tenant}"),
                    detail: "sequence number overflow".into(),
                })?;
                t.insert((tenant.as_str(), seq), data.as_slice())
                    .map_err(err)?;
                seq
            };
            tx.commit()
                .map_err(|e| StoreError::embedded("append_event", e))?;
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
            let t = tx
                .open_table(EVENTS)
                .map_err(|e| StoreError::embedded("read_events", e))?;
            let mut out = Vec::new();
            if limit == 0 {
                return Ok(out);
            }
            for entry in t
                .range::<(&str, u64)>((tenant.as_str(), start)..=(tenant.as_str(), u64::MAX))
                .map_err(err)?
            {
                let (k, v) = entry.map_err(err)?;
                out.push((k.value().1, v.value().to_vec()));
                if out.len() >= limit {
                    break;
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
