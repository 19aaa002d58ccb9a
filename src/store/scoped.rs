//! The tenant-facing API: [`Vault`] manages tenant keys, [`ScopedStore`] reads and writes one
//! tenant's data, sealing on the way in and opening on the way out.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{
    BatchOp,
    validate_record_id, NodeKey, RecordKind, Store, StoreError, StoreKey, TenantId, MAX_PAGE,
};
use crate::crypto::{CryptoError, KeyId, Keyring, MasterKey, SealContext, WrappedKey};

/// Node key space of wrapped tenant data keys: `keys/{tenant}/{key id, 10 digits}`.
/// Zero-padding keeps the listing in key id order.
const KEYS_PREFIX: &str = "keys/";

fn tenant_keys_prefix(tenant: &TenantId) -> String {
    format!("{KEYS_PREFIX}{}/", tenant.as_str())
}

fn wrapped_key_node_key(tenant: &TenantId, id: KeyId) -> Result<NodeKey, StoreError> {
    NodeKey::new(format!("{}{:010}", tenant_keys_prefix(tenant), id.0))
}

/// The tenant a `keys/{tenant}/{id}` node record belongs to.
fn tenant_of_key_record(key: &str) -> Result<TenantId, StoreError> {
    key.strip_prefix(KEYS_PREFIX)
        .and_then(|rest| rest.split('/').next())
        .and_then(|name| TenantId::new(name).ok())
        .ok_or_else(|| StoreError::Corrupt {
            what: format!("node record {key}"),
            detail: "its name does not contain a valid tenant id".into(),
        })
}

/// Proof that the holder resolved a tenant through the [`Vault`]: the tenant id plus that
/// tenant's keyring. It has no public constructor, so tenant data can only be reached through
/// a scope the vault handed out.
#[derive(Clone, Debug)]
pub struct TenantScope {
    tenant: TenantId,
    keyring: Arc<Keyring>,
}

impl TenantScope {
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    pub fn keyring(&self) -> &Arc<Keyring> {
        &self.keyring
    }
}

/// What [`Vault::delete_tenant`] removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TenantDeletion {
    /// Wrapped data keys destroyed (crypto-shredding).
    pub keys_destroyed: u64,
    /// Records and events removed afterwards.
    pub records_deleted: u64,
}

struct VaultInner {
    store: Arc<dyn Store>,
    master: RwLock<Arc<MasterKey>>,
    keyrings: Mutex<HashMap<TenantId, Arc<Keyring>>>,
    /// Key management (create/rotate/rewrap/delete) takes this exclusively; opening a tenant
    /// takes it shared, so an open can never resurrect a keyring that a concurrent delete is
    /// shredding.
    admin: tokio::sync::RwLock<()>,
}

/// Tenant key management on top of a [`Store`]: creates tenants, hands out [`ScopedStore`]s,
/// rotates and rewraps keys, and deletes tenants (keys first). Cheap to clone.
#[derive(Clone)]
pub struct Vault {
    inner: Arc<VaultInner>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("backend", &self.inner.store.backend())
            .finish_non_exhaustive()
    }
}

impl Vault {
    pub fn new(store: Arc<dyn Store>, master: MasterKey) -> Self {
        Vault {
            inner: Arc::new(VaultInner {
                store,
                master: RwLock::new(Arc::new(master)),
                keyrings: Mutex::new(HashMap::new()),
                admin: tokio::sync::RwLock::new(()),
            }),
        }
    }

    /// The backend. Raw access returns sealed bytes only; use it for maintenance, not data.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    fn master(&self) -> Arc<MasterKey> {
        self.inner.master.read().clone()
    }

    fn keys_err(tenant: &TenantId) -> impl Fn(CryptoError) -> StoreError + '_ {
        move |source| StoreError::Keys {
            tenant: tenant.to_string(),
            source,
        }
    }

    /// Every wrapped key of `tenant` in key id order.
    async fn load_wrapped(&self, tenant: &TenantId) -> Result<Vec<WrappedKey>, StoreError> {
        let prefix = tenant_keys_prefix(tenant);
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .inner
                .store
                .list_node(&prefix, after.as_deref(), MAX_PAGE)
                .await?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (k, v) in page {
                let w = WrappedKey::from_bytes(tenant, &v).map_err(Self::keys_err(tenant))?;
                // The record's name must agree with the key id bound inside it.
                let named = k
                    .strip_prefix(prefix.as_str())
                    .and_then(|n| n.parse::<u32>().ok());
                if named != Some(w.key_id().0) {
                    return Err(StoreError::Corrupt {
                        what: format!("node record {k}"),
                        detail: format!("holds key id {} under another name", w.key_id()),
                    });
                }
                out.push(w);
            }
        }
        Ok(out)
    }

    /// Brings the cached keyring of `tenant` in line with storage and returns it. Keys rotated
    /// elsewhere are added; if storage no longer holds the cached keys (the tenant was deleted,
    /// maybe re-created), the cached keyring is destroyed so no handle keeps using them.
    async fn sync_keyring(&self, tenant: &TenantId) -> Result<Arc<Keyring>, StoreError> {
        let wrapped = self.load_wrapped(tenant).await?;
        let master = self.master();
        let cached = self.inner.keyrings.lock().get(tenant).cloned();
        if wrapped.is_empty() {
            if let Some(k) = cached {
                k.destroy();
                self.inner.keyrings.lock().remove(tenant);
            }
            return Err(StoreError::UnknownTenant(tenant.clone()));
        }
        if let Some(k) = cached {
            let stored: BTreeSet<KeyId> = wrapped.iter().map(|w| w.key_id()).collect();
            let still_valid = !k.is_destroyed() && k.key_ids().iter().all(|id| stored.contains(id));
            if still_valid {
                match k.merge_wrapped(&master, &wrapped) {
                    Ok(_) => return Ok(k),
                    // The stored key under an id we hold differs: the tenant was re-created.
                    Err(CryptoError::KeyMismatch { .. }) => {}
                    Err(e) => return Err(Self::keys_err(tenant)(e)),
                }
            }
            k.destroy();
        }
        let fresh = Arc::new(
            Keyring::from_wrapped(tenant, &master, &wrapped).map_err(Self::keys_err(tenant))?,
        );
        self.inner
            .keyrings
            .lock()
            .insert(tenant.clone(), fresh.clone());
        Ok(fresh)
    }

    fn scoped(&self, tenant: &TenantId, keyring: Arc<Keyring>) -> ScopedStore {
        ScopedStore {
            vault: self.clone(),
            scope: TenantScope {
                tenant: tenant.clone(),
                keyring,
            },
        }
    }

    /// Creates a tenant with a fresh data key. Fails with `TenantExists` if it has keys.
    pub async fn create_tenant(&self, tenant: &TenantId) -> Result<ScopedStore, StoreError> {
        let _admin = self.inner.admin.write().await;
        let master = self.master();
        let (keyring, wrapped) =
            Keyring::generate(tenant, &master).map_err(Self::keys_err(tenant))?;
        let key = wrapped_key_node_key(tenant, wrapped.key_id())?;
        // put-if-absent: if two nodes create the same tenant at once, exactly one key wins.
        if !self
            .inner
            .store
            .put_node_if_absent(&key, wrapped.to_bytes())
            .await?
        {
            return Err(StoreError::TenantExists(tenant.clone()));
        }
        let keyring = Arc::new(keyring);
        if let Some(old) = self
            .inner
            .keyrings
            .lock()
            .insert(tenant.clone(), keyring.clone())
        {
            old.destroy();
        }
        tracing::info!(tenant = %tenant, backend = self.inner.store.backend(), "created tenant keys");
        Ok(self.scoped(tenant, keyring))
    }

    /// Opens an existing tenant. Re-reads its wrapped keys, so keys rotated by other nodes are
    /// picked up and a deleted tenant is refused.
    pub async fn open_tenant(&self, tenant: &TenantId) -> Result<ScopedStore, StoreError> {
        let _admin = self.inner.admin.read().await;
        let keyring = self.sync_keyring(tenant).await?;
        Ok(self.scoped(tenant, keyring))
    }

    /// Opens the tenant, creating it if it does not exist yet.
    pub async fn open_or_create_tenant(
        &self,
        tenant: &TenantId,
    ) -> Result<ScopedStore, StoreError> {
        match self.open_tenant(tenant).await {
            Err(StoreError::UnknownTenant(_)) => match self.create_tenant(tenant).await {
                Err(StoreError::TenantExists(_)) => self.open_tenant(tenant).await,
                other => other,
            },
            other => other,
        }
    }

    /// Tenants that have keys, in id order.
    pub async fn list_tenants(&self) -> Result<Vec<TenantId>, StoreError> {
        let mut tenants = BTreeSet::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .inner
                .store
                .list_node(KEYS_PREFIX, after.as_deref(), MAX_PAGE)
                .await?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (k, _) in page {
                let t = tenant_of_key_record(&k)?;
                tenants.insert(t);
            }
        }
        Ok(tenants.into_iter().collect())
    }

    /// Adds a new data key for `tenant` and makes it current; values sealed before stay
    /// readable with their old key. Returns the new key id.
    pub async fn rotate_tenant_key(&self, tenant: &TenantId) -> Result<KeyId, StoreError> {
        let _admin = self.inner.admin.write().await;
        let master = self.master();
        for _ in 0..5 {
            let keyring = self.sync_keyring(tenant).await?;
            let pending = keyring
                .prepare_rotation(&master)
                .map_err(Self::keys_err(tenant))?;
            let key = wrapped_key_node_key(tenant, pending.key_id())?;
            // Persist (claiming the id) before anything can seal with the key.
            if self
                .inner
                .store
                .put_node_if_absent(&key, pending.wrapped().to_bytes())
                .await?
            {
                let id = keyring.commit_rotation(pending);
                tracing::info!(tenant = %tenant, key_id = %id, "rotated tenant data key");
                return Ok(id);
            }
            // Another node claimed this id first; reload and try the next one.
        }
        Err(StoreError::RotationContended(tenant.clone()))
    }

    /// Re-encrypts every stored tenant data key under `new_master`, then uses `new_master` from
    /// now on. Returns how many wrapped keys were rewritten.
    ///
    /// Store `new_master` (environment / key file) *before* calling this: once a key is
    /// rewrapped, only the new master opens it. Keys already under `new_master` are skipped, so
    /// an interrupted rewrap can simply be run again. Other nodes must be restarted with the
    /// new master key afterwards.
    pub async fn rewrap(&self, new_master: MasterKey) -> Result<u64, StoreError> {
        let _admin = self.inner.admin.write().await;
        let old = self.master();
        let mut count = 0u64;
        let mut after: Option<String> = None;
        loop {
            let page = self
                .inner
                .store
                .list_node(KEYS_PREFIX, after.as_deref(), MAX_PAGE)
                .await?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (k, v) in page {
                let tenant = tenant_of_key_record(&k)?;
                let w = WrappedKey::from_bytes(&tenant, &v).map_err(Self::keys_err(&tenant))?;
                // Already under the new master (an earlier, interrupted run): nothing to do.
                if w.verify(&new_master).is_ok() {
                    continue;
                }
                let nw = w
                    .rewrap(&old, &new_master)
                    .map_err(Self::keys_err(&tenant))?;
                self.inner
                    .store
                    .put_node(&NodeKey::new(k)?, nw.to_bytes())
                    .await?;
                count += 1;
            }
        }
        *self.inner.master.write() = Arc::new(new_master);
        tracing::info!(
            keys = count,
            "rewrapped tenant data keys under the new master key"
        );
        Ok(count)
    }

    /// Deletes a tenant: its wrapped data keys are destroyed first (crypto-shredding: from
    /// then on its sealed data is unreadable even if a copy survives somewhere), then its
    /// records and events. Safe to re-run if interrupted.
    pub async fn delete_tenant(&self, tenant: &TenantId) -> Result<TenantDeletion, StoreError> {
        let _admin = self.inner.admin.write().await;
        let prefix = tenant_keys_prefix(tenant);
        let mut keys_destroyed = 0u64;
        loop {
            let page = self.inner.store.list_node(&prefix, None, MAX_PAGE).await?;
            if page.is_empty() {
                break;
            }
            for (k, _) in page {
                if self.inner.store.delete_node(&NodeKey::new(k)?).await? {
                    keys_destroyed += 1;
                }
            }
        }
        if let Some(k) = self.inner.keyrings.lock().remove(tenant) {
            k.destroy();
        }
        let records_deleted = self.inner.store.delete_tenant(tenant).await?;
        tracing::info!(tenant = %tenant, keys_destroyed, records_deleted, "deleted tenant");
        Ok(TenantDeletion {
            keys_destroyed,
            records_deleted,
        })
    }
}

/// One tenant's data. Values are sealed with the tenant's current data key, bound to tenant,
/// kind and id; the backend only ever sees ciphertext. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ScopedStore {
    vault: Vault,
    scope: TenantScope,
}

impl ScopedStore {
    pub fn tenant(&self) -> &TenantId {
        &self.scope.tenant
    }

    pub fn scope(&self) -> &TenantScope {
        &self.scope
    }

    fn key(&self, kind: RecordKind, id: &str) -> Result<StoreKey, StoreError> {
        StoreKey::new(&self.scope.tenant, kind, id)
    }

    /// `what` names the record in an error; rendered only then.
    fn seal(
        &self,
        ctx: SealContext<'_>,
        what: impl FnOnce() -> String,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        self.scope
            .keyring
            .seal(ctx, plaintext)
            .map_err(|source| StoreError::Crypto {
                op: "seal",
                key: what(),
                source,
            })
    }

    /// Opens a sealed value; if it names a key id this node has not seen (rotated by another
    /// node), reloads the tenant's keys once and retries.
    async fn open(
        &self,
        ctx: SealContext<'_>,
        what: &(dyn std::fmt::Display + Sync),
        sealed: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        let err = |source| StoreError::Crypto {
            op: "open",
            key: what.to_string(),
            source,
        };
        match self.scope.keyring.open(ctx, sealed) {
            Err(CryptoError::UnknownKeyId { .. }) => {
                let _admin = self.vault.inner.admin.read().await;
                match self.vault.sync_keyring(&self.scope.tenant).await {
                    Ok(_) | Err(StoreError::UnknownTenant(_)) => {}
                    Err(e) => return Err(e),
                }
                self.scope.keyring.open(ctx, sealed).map_err(err)
            }
            other => other.map_err(err),
        }
    }

    /// A sealed put for [`Store::write_batch`] (the record writer's group commit).
    pub fn sealed_put(&self, kind: RecordKind, id: &str, value: &[u8]) -> Result<BatchOp, StoreError> {
        let key = self.key(kind, id)?;
        let sealed = self.seal(SealContext::Record { kind, id }, || key.to_string(), value)?;
        Ok(BatchOp::Put(key, sealed))
    }

    /// Writes a batch of this tenant's ops (from the `sealed_*`/`batch_*` helpers)
    /// in one transaction. Ops of another tenant are refused: scopes never mix.
    pub async fn write_batch(&self, ops: Vec<BatchOp>) -> Result<(), StoreError> {
        for op in &ops {
            let t = match op {
                BatchOp::Put(k, _) | BatchOp::Delete(k) => k.tenant(),
                BatchOp::Event(t, _) => t,
            };
            if t != &self.scope.tenant {
                return Err(StoreError::CrossTenant { scope: self.scope.tenant.clone(), other: t.clone() });
            }
        }
        self.vault.inner.store.write_batch(ops.into(), true).await
    }

    /// A delete for [`Store::write_batch`].
    pub fn batch_delete(&self, kind: RecordKind, id: &str) -> Result<BatchOp, StoreError> {
        Ok(BatchOp::Delete(self.key(kind, id)?))
    }

    /// A sealed event append for [`Store::write_batch`].
    pub fn sealed_event(&self, data: &[u8]) -> Result<BatchOp, StoreError> {
        let sealed = self.seal(SealContext::Event, || format!("{}/events", self.scope.tenant), data)?;
        Ok(BatchOp::Event(self.scope.tenant.clone(), sealed))
    }

    pub async fn put(&self, kind: RecordKind, id: &str, value: &[u8]) -> Result<(), StoreError> {
        let key = self.key(kind, id)?;
        let sealed = self.seal(SealContext::Record { kind, id }, || key.to_string(), value)?;
        self.vault.inner.store.put(&key, sealed).await
    }

    pub async fn get(&self, kind: RecordKind, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.key(kind, id)?;
        match self.vault.inner.store.get(&key).await? {
            None => Ok(None),
            Some(sealed) => self
                .open(SealContext::Record { kind, id }, &key, &sealed)
                .await
                .map(Some),
        }
    }

    /// Returns whether the record existed.
    pub async fn delete(&self, kind: RecordKind, id: &str) -> Result<bool, StoreError> {
        let key = self.key(kind, id)?;
        self.vault.inner.store.delete(&key).await
    }

    /// Records of `kind` ordered by id, strictly after `after`, at most `limit`
    /// (≤ [`MAX_PAGE`]). Continue with the last id returned until a page is empty.
    pub async fn list(
        &self,
        kind: RecordKind,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let rows = self
            .vault
            .inner
            .store
            .list(&self.scope.tenant, kind, after, limit)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (id, sealed) in rows {
            // Never trust the backend's id: validate it and bind the open to it.
            validate_record_id(&id)?;
            let key = self.key(kind, &id)?;
            let value = self
                .open(SealContext::Record { kind, id: &id }, &key, &sealed)
                .await?;
            out.push((id, value));
        }
        Ok(out)
    }

    pub async fn put_json<T: Serialize + ?Sized>(
        &self,
        kind: RecordKind,
        id: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(|source| StoreError::Json {
            key: format!("{}/{}/{}", self.scope.tenant, kind, id),
            source,
        })?;
        self.put(kind, id, &bytes).await
    }

    pub async fn get_json<T: DeserializeOwned>(
        &self,
        kind: RecordKind,
        id: &str,
    ) -> Result<Option<T>, StoreError> {
        match self.get(kind, id).await? {
            None => Ok(None),
            Some(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|source| StoreError::Json {
                        key: format!("{}/{}/{}", self.scope.tenant, kind, id),
                        source,
                    })
            }
        }
    }

    pub async fn list_json<T: DeserializeOwned>(
        &self,
        kind: RecordKind,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let rows = self.list(kind, after, limit).await?;
        rows.into_iter()
            .map(|(id, bytes)| {
                let v = serde_json::from_slice(&bytes).map_err(|source| StoreError::Json {
                    key: format!("{}/{}/{}", self.scope.tenant, kind, id),
                    source,
                })?;
                Ok((id, v))
            })
            .collect()
    }

    /// Appends to the tenant's event stream; returns the sequence number.
    pub async fn append_event(&self, data: &[u8]) -> Result<u64, StoreError> {
        let BatchOp::Event(tenant, sealed) = self.sealed_event(data)? else {
            unreachable!("sealed_event always returns an Event op")
        };
        self.vault.inner.store.append_event(&tenant, sealed).await
    }

    /// Events after sequence number `after` (from the start if `None`), in order.
    pub async fn read_events(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let rows = self
            .vault
            .inner
            .store
            .read_events(&self.scope.tenant, after, limit)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (seq, sealed) in rows {
            let what = format!("{}/events/{seq}", self.scope.tenant);
            out.push((seq, self.open(SealContext::Event, &what, &sealed).await?));
        }
        Ok(out)
    }

    pub async fn append_event_json<T: Serialize + ?Sized>(
        &self,
        event: &T,
    ) -> Result<u64, StoreError> {
        let bytes = serde_json::to_vec(event).map_err(|source| StoreError::Json {
            key: format!("{}/events", self.scope.tenant),
            source,
        })?;
        self.append_event(&bytes).await
    }

    pub async fn read_events_json<T: DeserializeOwned>(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, T)>, StoreError> {
        let rows = self.read_events(after, limit).await?;
        rows.into_iter()
            .map(|(seq, bytes)| {
                let v = serde_json::from_slice(&bytes).map_err(|source| StoreError::Json {
                    key: format!("{}/events/{seq}", self.scope.tenant),
                    source,
                })?;
                Ok((seq, v))
            })
            .collect()
    }
}
