//! Redis backend: the shared store of a cluster of crossbar nodes.
//!
//! Key layout (`ns` is the configured namespace, `{...}` a Redis Cluster hash tag so all keys
//! of one tenant live in one slot and multi-key scripts stay legal):
//!
//! * `ns:t:{tenant}:r:{kind}` HASH id → sealed bytes
//! * `ns:t:{tenant}:i:{kind}` ZSET of ids (all score 0), for id-ordered paging via ZRANGEBYLEX
//! * `ns:t:{tenant}:ev` STREAM with ids `0-{seq}`, field `d`; `ns:t:{tenant}:evseq` its counter
//! * `ns:node:{n}:r` HASH / `ns:node:{n}:i` ZSET for node-level records
//!
//! The connection is a [`ConnectionManager`], which reconnects in the background after the
//! server goes away. Idempotent operations are retried a few times on connection errors, so a
//! Redis restart shows up as a short delay rather than a failed call; `append_event` is not
//! retried, because a retry after a lost reply could append the event twice.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};

use super::{check_page, NodeKey, RecordKind, Store, StoreError, StoreKey, TenantId};

/// Connection settings for [`RedisStore`].
#[derive(Clone, Debug)]
pub struct RedisStoreConfig {
    /// e.g. `redis://127.0.0.1:6379/0`
    pub url: String,
    /// Prefix of every key, so several deployments (or tests) can share one server.
    pub namespace: String,
    /// Bound on establishing a connection.
    pub connect_timeout: Duration,
    /// Bound on waiting for a reply.
    pub response_timeout: Duration,
    /// How often an idempotent operation is retried after a connection error.
    pub retries: u32,
}

impl RedisStoreConfig {
    pub fn new(url: impl Into<String>) -> Self {
        RedisStoreConfig {
            url: url.into(),
            namespace: "crossbar".into(),
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(5),
            retries: 3,
        }
    }
}

// Ordered page of a hash via its ZSET index, read atomically.
// KEYS[1]=zset KEYS[2]=hash ARGV[1]=min ARGV[2]=max ARGV[3]=limit.
// Returns a flat array id1, value1, id2, value2, ...
const LIST_SCRIPT: &str = r#"
local ids = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[1], ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for i = 1, #ids do
  local v = redis.call('HGET', KEYS[2], ids[i])
  if v then
    out[#out + 1] = ids[i]
    out[#out + 1] = v
  end
end
return out
"#;

// KEYS[1]=counter KEYS[2]=stream ARGV[1]=data. Atomic so sequence numbers and stream order
// always agree, even with many concurrent appenders.
const APPEND_SCRIPT: &str = r#"
local seq = redis.call('INCR', KEYS[1])
redis.call('XADD', KEYS[2], '0-' .. seq, 'd', ARGV[1])
return seq
"#;

// KEYS = index zsets (one per kind), then hashes, then stream, then counter; ARGV[1] = number
// of kinds. Counts what it removes, then deletes everything in one step.
const DELETE_TENANT_SCRIPT: &str = r#"
local n = tonumber(ARGV[1])
local count = 0
for i = 1, n do
  count = count + redis.call('HLEN', KEYS[n + i])
end
count = count + redis.call('XLEN', KEYS[2 * n + 1])
redis.call('DEL', unpack(KEYS))
return count
"#;

/// Redis-backed [`Store`]. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    ns: String,
    retries: u32,
    list_script: Script,
    append_script: Script,
    delete_tenant_script: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("namespace", &self.ns)
            .finish()
    }
}

fn redis_err(op: &'static str) -> impl Fn(RedisError) -> StoreError {
    move |source| StoreError::Redis { op, source }
}

/// Errors worth retrying after the connection manager has had a chance to reconnect.
fn is_transient(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout()
}

impl RedisStore {
    /// Connects (bounded by `connect_timeout`). The connection is re-established automatically
    /// if it later breaks.
    pub async fn connect(config: RedisStoreConfig) -> Result<Self, StoreError> {
        let client =
            redis::Client::open(config.url.as_str()).map_err(|source| StoreError::RedisUrl {
                url: config.url.clone(),
                source,
            })?;
        let mgr_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.response_timeout))
            .set_number_of_retries(3)
            .set_max_delay(Duration::from_secs(2));
        let conn = tokio::time::timeout(
            config.connect_timeout + Duration::from_secs(1),
            client.get_connection_manager_with_config(mgr_config),
        )
        .await
        .map_err(|_| StoreError::Redis {
            op: "connect",
            source: RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no connection to {} within {:?}",
                    config.url, config.connect_timeout
                ),
            )),
        })?
        .map_err(redis_err("connect"))?;
        Ok(RedisStore {
            conn,
            ns: config.namespace,
            retries: config.retries,
            list_script: Script::new(LIST_SCRIPT),
            append_script: Script::new(APPEND_SCRIPT),
            delete_tenant_script: Script::new(DELETE_TENANT_SCRIPT),
        })
    }

    fn records_key(&self, tenant: &TenantId, kind: RecordKind) -> String {
        format!("{}:t:{{{}}}:r:{}", self.ns, tenant.as_str(), kind.as_str())
    }

    fn index_key(&self, tenant: &TenantId, kind: RecordKind) -> String {
        format!("{}:t:{{{}}}:i:{}", self.ns, tenant.as_str(), kind.as_str())
    }

    fn stream_key(&self, tenant: &TenantId) -> String {
        format!("{}:t:{{{}}}:ev", self.ns, tenant.as_str())
    }

    fn seq_key(&self, tenant: &TenantId) -> String {
        format!("{}:t:{{{}}}:evseq", self.ns, tenant.as_str())
    }

    fn node_records_key(&self) -> String {
        format!("{}:node:{{n}}:r", self.ns)
    }

    fn node_index_key(&self) -> String {
        format!("{}:node:{{n}}:i", self.ns)
    }

    /// Runs an idempotent operation, retrying transient connection errors with a short
    /// backoff while the connection manager reconnects.
    async fn retrying<T, F, Fut>(&self, op: &'static str, mut f: F) -> Result<T, StoreError>
    where
        F: FnMut(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        let mut attempt = 0u32;
        loop {
            match f(self.conn.clone()).await {
                Ok(v) => return Ok(v),
                Err(e) if attempt < self.retries && is_transient(&e) => {
                    attempt += 1;
                    tracing::debug!(op, attempt, error = %e, "transient Redis error, retrying");
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                }
                Err(source) => return Err(StoreError::Redis { op, source }),
            }
        }
    }

    async fn list_via_index(
        &self,
        op: &'static str,
        index: String,
        hash: String,
        min: Vec<u8>,
        max: Vec<u8>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let flat: Vec<Vec<u8>> = self
            .retrying(op, |mut c| {
                let mut inv = self.list_script.prepare_invoke();
                inv.key(&index).key(&hash).arg(&min).arg(&max).arg(limit);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        if !flat.len().is_multiple_of(2) {
            return Err(StoreError::Corrupt {
                what: format!("list reply for {hash}"),
                detail: "odd number of elements".into(),
            });
        }
        let mut out = Vec::with_capacity(flat.len() / 2);
        let mut it = flat.into_iter();
        while let (Some(id), Some(v)) = (it.next(), it.next()) {
            let id = String::from_utf8(id).map_err(|_| StoreError::Corrupt {
                what: format!("index {index}"),
                detail: "a member is not UTF-8".into(),
            })?;
            out.push((id, v));
        }
        Ok(out)
    }
}

/// Lexicographic ZRANGEBYLEX bound: exclusive `(x` or inclusive `[x`.
fn lex(prefix: u8, s: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(s.len() + 1);
    v.push(prefix);
    v.extend_from_slice(s);
    v
}

#[async_trait]
impl Store for RedisStore {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn put(&self, key: &StoreKey, value: Vec<u8>) -> Result<(), StoreError> {
        let hash = self.records_key(key.tenant(), key.kind());
        let index = self.index_key(key.tenant(), key.kind());
        let id = key.id();
        self.retrying("put", |mut c| {
            let mut p = redis::pipe();
            p.atomic()
                .hset(&hash, id, value.as_slice())
                .ignore()
                .zadd(&index, id, 0)
                .ignore();
            async move { p.query_async::<()>(&mut c).await }
        })
        .await
    }

    async fn get(&self, key: &StoreKey) -> Result<Option<Vec<u8>>, StoreError> {
        let hash = self.records_key(key.tenant(), key.kind());
        let id = key.id();
        self.retrying("get", |mut c| {
            let cmd = redis::cmd("HGET").arg(&hash).arg(id).clone();
            async move { cmd.query_async::<Option<Vec<u8>>>(&mut c).await }
        })
        .await
    }

    async fn delete(&self, key: &StoreKey) -> Result<bool, StoreError> {
        let hash = self.records_key(key.tenant(), key.kind());
        let index = self.index_key(key.tenant(), key.kind());
        let id = key.id();
        let (removed, _): (u64, u64) = self
            .retrying("delete", |mut c| {
                let mut p = redis::pipe();
                p.atomic().hdel(&hash, id).zrem(&index, id);
                async move { p.query_async::<(u64, u64)>(&mut c).await }
            })
            .await?;
        Ok(removed > 0)
    }

    async fn list(
        &self,
        tenant: &TenantId,
        kind: RecordKind,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        check_page(limit)?;
        let min = match after {
            Some(a) => lex(b'(', a.as_bytes()),
            None => b"-".to_vec(),
        };
        self.list_via_index(
            "list",
            self.index_key(tenant, kind),
            self.records_key(tenant, kind),
            min,
            b"+".to_vec(),
            limit,
        )
        .await
    }

    async fn delete_tenant(&self, tenant: &TenantId) -> Result<u64, StoreError> {
        let mut keys: Vec<String> = RecordKind::ALL
            .iter()
            .map(|k| self.index_key(tenant, *k))
            .collect();
        keys.extend(RecordKind::ALL.iter().map(|k| self.records_key(tenant, *k)));
        keys.push(self.stream_key(tenant));
        keys.push(self.seq_key(tenant));
        let n = RecordKind::ALL.len();
        self.retrying("delete_tenant", |mut c| {
            let mut inv = self.delete_tenant_script.prepare_invoke();
            for k in &keys {
                inv.key(k);
            }
            inv.arg(n);
            async move { inv.invoke_async::<u64>(&mut c).await }
        })
        .await
    }

    async fn append_event(&self, tenant: &TenantId, data: Vec<u8>) -> Result<u64, StoreError> {
        let mut c = self.conn.clone();
        let mut inv = self.append_script.prepare_invoke();
        inv.key(self.seq_key(tenant))
            .key(self.stream_key(tenant))
            .arg(data);
        // Not retried: see the module docs.
        inv.invoke_async::<u64>(&mut c)
            .await
            .map_err(redis_err("append_event"))
    }

    async fn read_events(
        &self,
        tenant: &TenantId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        check_page(limit)?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let start = match after {
            None => 1,
            Some(u64::MAX) => return Ok(Vec::new()),
            Some(a) => a + 1,
        };
        let stream = self.stream_key(tenant);
        // Reply: [[id, [field, value, ...]], ...]
        type Entries = Vec<(String, Vec<Vec<u8>>)>;
        let entries: Entries = self
            .retrying("read_events", |mut c| {
                let cmd = redis::cmd("XRANGE")
                    .arg(&stream)
                    .arg(format!("0-{start}"))
                    .arg("+")
                    .arg("COUNT")
                    .arg(limit)
                    .clone();
                async move { cmd.query_async::<Entries>(&mut c).await }
            })
            .await?;
        let corrupt = |detail: &str| StoreError::Corrupt {
            what: format!("event stream {stream}"),
            detail: detail.to_string(),
        };
        let mut out = Vec::with_capacity(entries.len());
        for (id, mut fields) in entries {
            let seq = id
                .strip_prefix("0-")
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| corrupt("an entry id is not of the form 0-<seq>"))?;
            if fields.len() != 2 || fields[0] != b"d" {
                return Err(corrupt("an entry does not have exactly the field 'd'"));
            }
            out.push((seq, fields.swap_remove(1)));
        }
        Ok(out)
    }

    async fn put_node(&self, key: &NodeKey, value: Vec<u8>) -> Result<(), StoreError> {
        let hash = self.node_records_key();
        let index = self.node_index_key();
        let k = key.as_str();
        self.retrying("put_node", |mut c| {
            let mut p = redis::pipe();
            p.atomic()
                .hset(&hash, k, value.as_slice())
                .ignore()
                .zadd(&index, k, 0)
                .ignore();
            async move { p.query_async::<()>(&mut c).await }
        })
        .await
    }

    async fn put_node_if_absent(&self, key: &NodeKey, value: Vec<u8>) -> Result<bool, StoreError> {
        let hash = self.node_records_key();
        let index = self.node_index_key();
        let k = key.as_str();
        // HSETNX decides; the ZADD is harmless when the member already exists. A retry after a
        // lost reply would report `false` for our own write, which callers treat as "someone
        // else claimed it" and re-read — safe.
        let (written, _): (bool, u64) = self
            .retrying("put_node_if_absent", |mut c| {
                let mut p = redis::pipe();
                p.atomic()
                    .hset_nx(&hash, k, value.as_slice())
                    .zadd(&index, k, 0);
                async move { p.query_async::<(bool, u64)>(&mut c).await }
            })
            .await?;
        Ok(written)
    }

    async fn get_node(&self, key: &NodeKey) -> Result<Option<Vec<u8>>, StoreError> {
        let hash = self.node_records_key();
        let k = key.as_str();
        self.retrying("get_node", |mut c| {
            let cmd = redis::cmd("HGET").arg(&hash).arg(k).clone();
            async move { cmd.query_async::<Option<Vec<u8>>>(&mut c).await }
        })
        .await
    }

    async fn delete_node(&self, key: &NodeKey) -> Result<bool, StoreError> {
        let hash = self.node_records_key();
        let index = self.node_index_key();
        let k = key.as_str();
        let (removed, _): (u64, u64) = self
            .retrying("delete_node", |mut c| {
                let mut p = redis::pipe();
                p.atomic().hdel(&hash, k).zrem(&index, k);
                async move { p.query_async::<(u64, u64)>(&mut c).await }
            })
            .await?;
        Ok(removed > 0)
    }

    async fn list_node(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        check_page(limit)?;
        let min = match after {
            Some(a) if a >= prefix => lex(b'(', a.as_bytes()),
            _ => lex(b'[', prefix.as_bytes()),
        };
        // Node keys are ASCII, so no key starting with `prefix` can sort past prefix + 0xFF.
        let mut max = lex(b'(', prefix.as_bytes());
        max.push(0xFF);
        let max = if prefix.is_empty() {
            b"+".to_vec()
        } else {
            max
        };
        self.list_via_index(
            "list_node",
            self.node_index_key(),
            self.node_records_key(),
            min,
            max,
            limit,
        )
        .await
    }
}
