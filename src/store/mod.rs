//! Tenant-scoped persistent storage.
//!
//! Two layers:
//!
//! * [`Store`] — the backend trait (embedded redb file or Redis). It moves opaque bytes and
//!   never sees plaintext tenant data. Every tenant key ([`StoreKey`]) carries its
//!   [`TenantId`]; there is no method that takes a bare record id. Node-level records
//!   (wrapped tenant keys and other per-deployment bookkeeping) live in a separate key space
//!   addressed by [`NodeKey`], which tenant paths can never reach.
//! * [`ScopedStore`] — the only API the rest of the code should use for tenant data. It is
//!   obtained from a [`Vault`] for one tenant, seals values with that tenant's data key before
//!   they reach the backend and opens them on read.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::crypto::CryptoError;

pub mod embedded;
pub mod redis;
mod scoped;
pub mod writer;

#[cfg(test)]
mod conformance;
#[cfg(test)]
pub(crate) mod testutil;
#[cfg(test)]
mod vault_tests;

pub use embedded::EmbeddedStore;
pub use redis::{RedisStore, RedisStoreConfig};
pub use scoped::{ScopedStore, TenantDeletion, TenantScope, Vault};

/// Largest page a `list`/`read_events`/`list_node` call may ask for. Bounded so a single call
/// cannot pull an unbounded amount of data into memory (and so the Redis Lua scripts stay
/// small); callers paginate with `after`.
pub const MAX_PAGE: usize = 1000;

/// Longest record id accepted, in bytes. Ids end up inside backend keys; keeping them short
/// keeps indexes compact and leaves room for the tenant/kind prefix under backend key limits.
pub const MAX_RECORD_ID_LEN: usize = 255;

/// Longest node key accepted, in bytes.
pub const MAX_NODE_KEY_LEN: usize = 512;

/// Errors from the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "invalid tenant id {value:?}: {reason}; tenant ids are 1-63 characters of a-z, 0-9 and '-'"
    )]
    InvalidTenantId { value: String, reason: &'static str },

    #[error("invalid record id {value:?}: {reason}; record ids are 1-{MAX_RECORD_ID_LEN} bytes with no '/' and no control characters")]
    InvalidRecordId { value: String, reason: &'static str },

    #[error("invalid node key {value:?}: {reason}; node keys are 1-{MAX_NODE_KEY_LEN} bytes of A-Z, a-z, 0-9 and . _ - : /")]
    InvalidNodeKey { value: String, reason: &'static str },

    #[error(
        "unknown record kind {0:?}; expected one of the RecordKind names (config, cdr, event, ...)"
    )]
    UnknownRecordKind(String),

    #[error("page size {limit} is larger than the maximum of {max}; request smaller pages and continue with `after`")]
    PageTooLarge { limit: usize, max: usize },

    #[error("cannot create or open the embedded database at {path}: {source}; check that the directory is writable and that no other crossbar process has the file open")]
    EmbeddedOpen {
        path: String,
        #[source]
        source: Box<redb::Error>,
    },

    #[error("embedded database failed during {op}: {source}; the data file may be full, read-only or damaged")]
    Embedded {
        op: &'static str,
        #[source]
        source: Box<redb::Error>,
    },

    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "invalid Redis URL {url:?}: {source}; expected redis://[user:password@]host:port[/db]"
    )]
    RedisUrl {
        url: String,
        #[source]
        source: ::redis::RedisError,
    },

    #[error(
        "Redis request {op} failed: {source}; check that the Redis server is reachable and healthy"
    )]
    Redis {
        op: &'static str,
        #[source]
        source: ::redis::RedisError,
    },

    #[error("the storage backend returned malformed data for {what}: {detail}; the backend may be shared with another program or damaged")]
    Corrupt { what: String, detail: String },

    #[error(
        "a background storage task failed: {0}; this is a bug or the runtime is shutting down"
    )]
    Task(String),

    #[error("tenant {0} has no data keys; create it with Vault::create_tenant first (or it was deleted)")]
    UnknownTenant(TenantId),

    #[error("a write for tenant {other} was given to tenant {scope}'s store; scopes never mix (this is a bug in the caller)")]
    CrossTenant { scope: TenantId, other: TenantId },

    #[error("tenant {0} already exists; open it with Vault::open_tenant instead")]
    TenantExists(TenantId),

    #[error(
        "another writer kept changing the keys of tenant {0} while rotating; retry the rotation"
    )]
    RotationContended(TenantId),

    #[error("cannot {op} record {key}: {source}")]
    Crypto {
        op: &'static str,
        key: String,
        #[source]
        source: CryptoError,
    },

    #[error("key management for tenant {tenant} failed: {source}")]
    Keys {
        tenant: String,
        #[source]
        source: CryptoError,
    },

    #[error("record {key} does not (de)serialize as the requested type: {source}; the stored schema may be from another version")]
    Json {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

impl StoreError {
    pub(crate) fn embedded(op: &'static str, e: impl Into<redb::Error>) -> Self {
        StoreError::Embedded {
            op,
            source: Box::new(e.into()),
        }
    }
}

/// Checks a page size against [`MAX_PAGE`]; shared by all backends so they agree.
pub(crate) fn check_page(limit: usize) -> Result<(), StoreError> {
    if limit > MAX_PAGE {
        return Err(StoreError::PageTooLarge {
            limit,
            max: MAX_PAGE,
        });
    }
    Ok(())
}

/// A validated tenant identifier: 1-63 characters of `[a-z0-9-]`.
///
/// The restricted alphabet is what makes prefixing safe: a tenant id can never contain the
/// `/` that separates key segments, nor Redis hash-tag braces, so `acme` can never address
/// keys of `acme-2` or escape its prefix.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TenantId(String);

impl TenantId {
    pub fn new(value: impl Into<String>) -> Result<Self, StoreError> {
        let value = value.into();
        let reason = if value.is_empty() {
            Some("it is empty")
        } else if value.len() > 63 {
            Some("it is longer than 63 characters")
        } else if !value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            Some("it contains a character outside a-z, 0-9 and '-'")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(StoreError::InvalidTenantId { value, reason }),
            None => Ok(TenantId(value)),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TenantId {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TenantId::new(s)
    }
}

impl TryFrom<String> for TenantId {
    type Error = StoreError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        TenantId::new(value)
    }
}

impl From<TenantId> for String {
    fn from(t: TenantId) -> String {
        t.0
    }
}

// One list generates the enum, `ALL`, `as_str` and `parse`, so a new kind can never be
// forgotten by code that must enumerate every kind (e.g. Redis `delete_tenant`).
macro_rules! record_kinds {
    ($($(#[$doc:meta])* $variant:ident => $name:literal,)+) => {
        /// The type of a tenant record. `as_str()` is part of every backend key and of the
        /// AEAD associated data, so names must never change once data exists.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "kebab-case")]
        pub enum RecordKind {
            $($(#[$doc])* $variant,)+
        }

        impl RecordKind {
            pub const ALL: &'static [RecordKind] = &[$(RecordKind::$variant,)+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(RecordKind::$variant => $name,)+
                }
            }

            pub fn parse(s: &str) -> Option<RecordKind> {
                match s {
                    $($name => Some(RecordKind::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

record_kinds! {
    /// Tenant configuration documents (dial plan, settings).
    Config => "config",
    /// SIP users / extensions.
    User => "user",
    /// Provisioned devices.
    Device => "device",
    /// Routes and trunks.
    Route => "route",
    /// Call detail records.
    Cdr => "cdr",
    /// Calls in progress (id = their CDR id): closed as `interrupted` after a crash.
    ActiveCall => "active-call",
    /// Keyed event records (the ordered stream is `append_event`/`read_events`).
    Event => "event",
    /// Call recordings (metadata or small blobs).
    Recording => "recording",
    /// Voicemail messages.
    Voicemail => "voicemail",
    /// Credentials and other secrets.
    Secret => "secret",
    /// SIP registrations (bindings).
    Registration => "registration",
}

impl fmt::Display for RecordKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RecordKind {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RecordKind::parse(s).ok_or_else(|| StoreError::UnknownRecordKind(s.to_string()))
    }
}

/// Validates a record id. `/` is refused so `"{tenant}/{kind}/{id}"` always splits back into
/// exactly its three parts and an id cannot look like a path into another tenant; control
/// characters are refused because ids show up in logs.
pub(crate) fn validate_record_id(id: &str) -> Result<(), StoreError> {
    let reason = if id.is_empty() {
        Some("it is empty")
    } else if id.len() > MAX_RECORD_ID_LEN {
        Some("it is too long")
    } else if id.contains('/') {
        Some("it contains '/'")
    } else if id.chars().any(char::is_control) {
        Some("it contains a control character")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(StoreError::InvalidRecordId {
            value: id.chars().take(80).collect(),
            reason,
        }),
        None => Ok(()),
    }
}

/// The address of one tenant record: tenant + kind + id. Rendered as `"{tenant}/{kind}/{id}"`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StoreKey {
    tenant: TenantId,
    kind: RecordKind,
    id: String,
}

impl StoreKey {
    pub fn new(tenant: &TenantId, kind: RecordKind, id: &str) -> Result<Self, StoreError> {
        validate_record_id(id)?;
        Ok(StoreKey {
            tenant: tenant.clone(),
            kind,
            id: id.to_string(),
        })
    }

    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    pub fn kind(&self) -> RecordKind {
        self.kind
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Appends `"{tenant}/{kind}/{id}"` (the backend key) to `out`, so a batch renders
    /// its keys into one buffer instead of a `String` each.
    pub fn render_into(&self, out: &mut String) {
        out.push_str(self.tenant.as_str());
        out.push('/');
        out.push_str(self.kind.as_str());
        out.push('/');
        out.push_str(&self.id);
    }

    /// `"{tenant}/{kind}/"`: the prefix shared by every record of one kind of one tenant.
    pub fn kind_prefix(tenant: &TenantId, kind: RecordKind) -> String {
        format!("{}/{}/", tenant.as_str(), kind.as_str())
    }
}

impl fmt::Display for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One definition of the backend key's layout: `render_into`.
        let mut key = String::with_capacity(self.tenant.as_str().len() + self.id.len() + 16);
        self.render_into(&mut key);
        f.write_str(&key)
    }
}

/// The address of a node-level record (not owned by any tenant), e.g. `keys/acme/0000000001`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeKey(String);

impl NodeKey {
    pub fn new(value: impl Into<String>) -> Result<Self, StoreError> {
        let value = value.into();
        let reason = if value.is_empty() {
            Some("it is empty")
        } else if value.len() > MAX_NODE_KEY_LEN {
            Some("it is too long")
        } else if !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'/'))
        {
            Some("it contains a character outside A-Z, a-z, 0-9 and . _ - : /")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(StoreError::InvalidNodeKey { value, reason }),
            None => Ok(NodeKey(value)),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One write of a batch (see [`Store::write_batch`]); values are already sealed.
#[derive(Debug, Clone)]
pub enum BatchOp {
    Put(StoreKey, Vec<u8>),
    Delete(StoreKey),
    Event(TenantId, Vec<u8>),
}

/// A storage backend. Moves opaque bytes; tenant values reaching it are already sealed by
/// [`ScopedStore`]. Application code should not call the tenant methods directly.
///
/// Contract shared by all backends (checked by the conformance suite):
/// * `put` is durable (embedded: committed to disk) and visible to `get`/`list` when it returns.
/// * `list` returns records of one tenant and kind ordered by id (byte order), starting strictly
///   after `after`, at most `limit` (≤ [`MAX_PAGE`]) of them; an empty page means the end.
/// * events get strictly increasing sequence numbers per tenant, starting at 1.
/// * `delete_tenant` removes every record and event of that tenant and nothing else; it does
///   not touch node-level records (the [`Vault`] shreds keys separately, before calling it).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Short backend name for logs ("embedded", "redis").
    fn backend(&self) -> &'static str;

    /// Applies many writes at once (group commit: one transaction on the embedded
    /// backend). With `sync`, durable when it returns, like `put`; without, the
    /// data reaches the operating system (it survives the process being killed)
    /// and the disk at the next synced commit. Backends without a cheaper way
    /// apply the ops one by one, in order. Shared, so a retry of the same batch
    /// costs no copy of it.
    async fn write_batch(&self, ops: Arc<[BatchOp]>, sync: bool) -> Result<(), StoreError> {
        let _ = sync;
        for op in ops.iter() {
            match op {
                BatchOp::Put(k, v) => self.put(k, v.clone()).await?,
                BatchOp::Delete(k) => {
                    self.delete(k).await?;
                }
                BatchOp::Event(t, v) => {
                    self.append_event(t, v.clone()).await?;
                }
            }
        }
        Ok(())
    }

    async fn put(&self, key: &StoreKey, value: Vec<u8>) -> Result<(), StoreError>;
    async fn get(&self, key: &StoreKey) -> Result<Option<Vec<u8>>, StoreError>;
    /// Returns whether the record existed.
    async fn delete(&self, key: &StoreKey) -> Result<bool, StoreError>;
    async fn list(
        &self,
        tenant: &TenantId,
        kind: RecordKind,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Removes all records and events of `tenant`; returns how many were removed.
    async fn delete_tenant(&self, tenant: &TenantId) -> Result<u64, StoreError>;

    /// Appends to the tenant's ordered event stream; returns the new sequence number.
    async fn append_event(&self, tenant: &TenantId, data: Vec<u8>) -> Result<u64, StoreError>;
    /// Events with sequence number > `after` (all if `None`), in order, at most `limit`.
    async fn read_events(
        &self,
        tenant: &TenantId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;

    async fn put_node(&self, key: &NodeKey, value: Vec<u8>) -> Result<(), StoreError>;
    /// Writes only if the key does not exist yet; returns whether it wrote. Used to claim key
    /// ids so two nodes can never both write a different data key under the same id.
    async fn put_node_if_absent(&self, key: &NodeKey, value: Vec<u8>) -> Result<bool, StoreError>;
    async fn get_node(&self, key: &NodeKey) -> Result<Option<Vec<u8>>, StoreError>;
    async fn delete_node(&self, key: &NodeKey) -> Result<bool, StoreError>;
    /// Node records whose key starts with `prefix`, ordered by key, strictly after `after`.
    async fn list_node(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
}
