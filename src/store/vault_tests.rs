//! Tests of the tenant-facing layer ([`Vault`], [`ScopedStore`]) on real backends: isolation
//! under attack, rotation, rewrap, crypto-shredding, and that no plaintext reaches disk.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::testutil::{RedisServer, TempDir};
use super::*;
use crate::crypto::{sealed_key_id, CryptoError, KeyId, MasterKey};

fn t(s: &str) -> TenantId {
    TenantId::new(s).unwrap()
}

fn k(tenant: &TenantId, kind: RecordKind, id: &str) -> StoreKey {
    StoreKey::new(tenant, kind, id).unwrap()
}

/// Keeps a backend's resources (temp dir or redis-server) alive for the test's duration.
#[allow(dead_code)] // held only for its Drop
enum Guard {
    Dir(TempDir),
    Redis(RedisServer),
}

async fn embedded() -> (Arc<dyn Store>, Guard) {
    let dir = TempDir::new("vault");
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    (Arc::new(store), Guard::Dir(dir))
}

async fn redis() -> (Arc<dyn Store>, Guard) {
    let server = RedisServer::start();
    let mut cfg = RedisStoreConfig::new(server.url());
    cfg.namespace = "vault".into();
    let store = RedisStore::connect(cfg).await.unwrap();
    (Arc::new(store), Guard::Redis(server))
}

async fn both_backends() -> Vec<(Arc<dyn Store>, Guard)> {
    vec![embedded().await, redis().await]
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct SipUser {
    extension: String,
    password: String,
    caller_id: String,
}

#[tokio::test]
async fn scoped_store_round_trips_on_both_backends() {
    for (store, _guard) in both_backends().await {
        let backend = store.backend();
        let vault = Vault::new(store.clone(), MasterKey::generate().unwrap());
        let acme = vault.create_tenant(&t("acme")).await.unwrap();
        assert_eq!(acme.tenant().as_str(), "acme");

        let user = SipUser {
            extension: "1001".into(),
            password: "acme1001pw".into(),
            caller_id: "15550001000".into(),
        };
        acme.put_json(RecordKind::User, "1001", &user)
            .await
            .unwrap();
        assert_eq!(
            acme.get_json::<SipUser>(RecordKind::User, "1001")
                .await
                .unwrap(),
            Some(user)
        );
        assert_eq!(
            acme.get_json::<SipUser>(RecordKind::User, "1002")
                .await
                .unwrap(),
            None
        );

        for i in 0..5 {
            acme.put(
                RecordKind::Cdr,
                &format!("cdr-{i}"),
                format!("call {i}").as_bytes(),
            )
            .await
            .unwrap();
        }
        let page = acme.list(RecordKind::Cdr, Some("cdr-1"), 2).await.unwrap();
        assert_eq!(
            page,
            vec![
                ("cdr-2".to_string(), b"call 2".to_vec()),
                ("cdr-3".to_string(), b"call 3".to_vec())
            ],
            "[{backend}]"
        );
        assert!(acme.delete(RecordKind::Cdr, "cdr-0").await.unwrap());
        assert!(!acme.delete(RecordKind::Cdr, "cdr-0").await.unwrap());

        let users: Vec<(String, SipUser)> =
            acme.list_json(RecordKind::User, None, 10).await.unwrap();
        assert_eq!(users.len(), 1);
        // A value that is not the requested type is a clear error, not a panic.
        let err = acme
            .get_json::<SipUser>(RecordKind::Cdr, "cdr-1")
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Json { .. }), "{err}");

        assert_eq!(
            acme.append_event_json(&serde_json::json!({"call": 1}))
                .await
                .unwrap(),
            1
        );
        assert_eq!(acme.append_event(b"raw").await.unwrap(), 2);
        let evs = acme.read_events(None, 10).await.unwrap();
        assert_eq!(evs[1], (2, b"raw".to_vec()));
        let json: Vec<(u64, serde_json::Value)> = acme.read_events_json(None, 1).await.unwrap();
        assert_eq!(json, vec![(1, serde_json::json!({"call": 1}))]);

        // What the backend holds is sealed, never the plaintext.
        let raw = store
            .get(&k(&t("acme"), RecordKind::User, "1001"))
            .await
            .unwrap()
            .unwrap();
        assert!(
            !contains(&raw, b"acme1001pw") && !contains(&raw, b"15550001000"),
            "[{backend}]"
        );
        assert_eq!(sealed_key_id(&raw).unwrap(), KeyId(1));

        let bad_id = acme
            .put(RecordKind::User, "../globex/user/1001", b"x")
            .await
            .unwrap_err();
        assert!(
            matches!(bad_id, StoreError::InvalidRecordId { .. }),
            "{bad_id}"
        );
    }
}

#[tokio::test]
async fn tenant_lifecycle_errors_are_explicit() {
    let (store, _g) = embedded().await;
    let vault = Vault::new(store, MasterKey::generate().unwrap());
    let acme = t("acme");
    let e = vault.open_tenant(&acme).await.unwrap_err();
    assert!(matches!(e, StoreError::UnknownTenant(_)), "{e}");
    assert!(
        e.to_string().contains("create_tenant"),
        "says what to do: {e}"
    );
    vault.create_tenant(&acme).await.unwrap();
    let e = vault.create_tenant(&acme).await.unwrap_err();
    assert!(matches!(e, StoreError::TenantExists(_)), "{e}");
    vault.open_or_create_tenant(&t("globex")).await.unwrap();
    vault.open_or_create_tenant(&t("globex")).await.unwrap();
    vault.create_tenant(&t("acme-2")).await.unwrap();
    assert_eq!(
        vault.list_tenants().await.unwrap(),
        vec![acme.clone(), t("acme-2"), t("globex")]
    );
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Tries every ScopedStore path of globex with acme's record ids (and a few hostile variants of
/// them), plus replays of acme's sealed bytes into globex's key space. Any access to acme's
/// data counts as a breach.
async fn adversarial_isolation(store: Arc<dyn Store>) -> (usize, usize) {
    let vault = Vault::new(store.clone(), MasterKey::generate().unwrap());
    let acme = vault.create_tenant(&t("acme")).await.unwrap();
    let globex = vault.create_tenant(&t("globex")).await.unwrap();

    let mut acme_data: BTreeMap<(RecordKind, String), Vec<u8>> = BTreeMap::new();
    for kind in RecordKind::ALL {
        for id in ["1001", "main", "15550001000"] {
            let v = format!("acme {kind} {id} secret acme1001pw").into_bytes();
            acme.put(*kind, id, &v).await.unwrap();
            acme_data.insert((*kind, id.to_string()), v);
        }
    }
    for i in 0..3 {
        acme.append_event(format!("acme event {i}").as_bytes())
            .await
            .unwrap();
    }

    let mut attempts = 0usize;
    let mut breaches = Vec::new();
    let mut note = |ok: bool, what: String| {
        attempts += 1;
        if !ok {
            breaches.push(what);
        }
    };

    for ((kind, id), value) in &acme_data {
        let kind = *kind;
        // Straight reuse of acme's id plus hostile spellings that try to climb out of the
        // globex prefix. Those must either be refused or stay inside globex.
        let variants = [
            id.clone(),
            format!("../acme/{kind}/{id}"),
            format!("acme/{kind}/{id}"),
            format!("/acme/{kind}/{id}"),
            format!("..\\acme\\{kind}\\{id}"),
            format!("{id}\0"),
            format!("{{acme}}:r:{kind}"),
        ];
        for v in &variants {
            let got = globex.get(kind, v).await;
            note(
                !matches!(got, Ok(Some(_))),
                format!("get {kind}/{v:?} -> {got:?}"),
            );
            let got = globex.get_json::<serde_json::Value>(kind, v).await;
            note(
                !matches!(got, Ok(Some(_))),
                format!("get_json {kind}/{v:?}"),
            );
            let got = globex.delete(kind, v).await;
            note(
                !matches!(got, Ok(true)),
                format!("delete {kind}/{v:?} -> {got:?}"),
            );
            // A put may succeed, but only as globex's own record: acme's must be unchanged.
            let _ = globex.put(kind, v, b"globex overwrite").await;
            let _ = globex.put_json(kind, v, &"globex overwrite json").await;
            let still = acme.get(kind, id).await.unwrap();
            note(
                still.as_ref() == Some(value),
                format!("put {kind}/{v:?} changed acme's record"),
            );
            let _ = globex.delete(kind, v).await;
        }
        for after in [None, Some(""), Some(id.as_str()), Some("0")] {
            let got = globex.list(kind, after, MAX_PAGE).await;
            let leaked = matches!(&got, Ok(rows) if rows.iter().any(|(_, v)| v == value));
            note(
                !leaked,
                format!("list {kind} after {after:?} leaked acme data"),
            );
            let got = globex
                .list_json::<serde_json::Value>(kind, after, MAX_PAGE)
                .await;
            note(
                !matches!(&got, Ok(rows) if !rows.is_empty()),
                format!("list_json {kind} after {after:?}"),
            );
        }

        // Replay: a backend-level copy of acme's sealed bytes into globex's key must not open.
        let sealed = store.get(&k(&t("acme"), kind, id)).await.unwrap().unwrap();
        store
            .put(&k(&t("globex"), kind, id), sealed.clone())
            .await
            .unwrap();
        let got = globex.get(kind, id).await;
        note(
            matches!(got, Err(StoreError::Crypto { .. })),
            format!("replayed {kind}/{id} opened under globex: {got:?}"),
        );
        let got = globex.list(kind, None, MAX_PAGE).await;
        note(
            got.is_err(),
            format!("replayed {kind}/{id} listed under globex"),
        );
        store.delete(&k(&t("globex"), kind, id)).await.unwrap();
    }

    let got = globex.read_events(None, MAX_PAGE).await.unwrap();
    note(got.is_empty(), format!("globex read acme events: {got:?}"));
    for (_, sealed) in store.read_events(&t("acme"), None, MAX_PAGE).await.unwrap() {
        store.append_event(&t("globex"), sealed).await.unwrap();
    }
    let got = globex.read_events(None, MAX_PAGE).await;
    note(
        got.is_err(),
        "replayed acme events opened under globex".to_string(),
    );

    // Nothing globex did changed acme.
    for ((kind, id), value) in &acme_data {
        assert_eq!(acme.get(*kind, id).await.unwrap().as_ref(), Some(value));
    }
    assert_eq!(acme.read_events(None, 10).await.unwrap().len(), 3);

    assert!(breaches.is_empty(), "isolation breaches: {breaches:#?}");
    (attempts, breaches.len())
}

#[tokio::test]
async fn adversarial_isolation_embedded() {
    let (store, _g) = embedded().await;
    let (attempts, succeeded) = adversarial_isolation(store).await;
    println!("embedded: adversarial isolation: {attempts} attempts by globex on acme's data, {succeeded} succeeded");
    assert!(attempts >= 1000, "{attempts}");
}

#[tokio::test]
async fn adversarial_isolation_redis() {
    let (store, _g) = redis().await;
    let (attempts, succeeded) = adversarial_isolation(store).await;
    println!("redis: adversarial isolation: {attempts} attempts by globex on acme's data, {succeeded} succeeded");
    assert!(attempts >= 1000, "{attempts}");
}

#[tokio::test]
async fn values_moved_within_a_tenant_do_not_open() {
    let (store, _g) = embedded().await;
    let vault = Vault::new(store.clone(), MasterKey::generate().unwrap());
    let acme = vault.create_tenant(&t("acme")).await.unwrap();
    acme.put(RecordKind::Secret, "1001", b"acme1001pw")
        .await
        .unwrap();
    let sealed = store
        .get(&k(&t("acme"), RecordKind::Secret, "1001"))
        .await
        .unwrap()
        .unwrap();
    store
        .put(&k(&t("acme"), RecordKind::Secret, "1002"), sealed.clone())
        .await
        .unwrap();
    store
        .put(&k(&t("acme"), RecordKind::Config, "1001"), sealed.clone())
        .await
        .unwrap();
    store.append_event(&t("acme"), sealed).await.unwrap();
    for r in [
        acme.get(RecordKind::Secret, "1002").await,
        acme.get(RecordKind::Config, "1001").await,
    ] {
        let e = r.unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::Crypto {
                    source: CryptoError::OpenFailed { .. },
                    ..
                }
            ),
            "{e}"
        );
    }
    assert!(
        acme.read_events(None, 10).await.is_err(),
        "a record is not an event"
    );
}

#[tokio::test]
async fn rotation_through_the_vault() {
    for (store, _guard) in both_backends().await {
        let backend = store.backend();
        let master = [7u8; 32];
        let vault = Vault::new(store.clone(), MasterKey::from_bytes(master));
        let acme_id = t("acme");
        let acme = vault.create_tenant(&acme_id).await.unwrap();
        acme.put(RecordKind::Config, "old", b"before rotation")
            .await
            .unwrap();

        assert_eq!(vault.rotate_tenant_key(&acme_id).await.unwrap(), KeyId(2));
        acme.put(RecordKind::Config, "new", b"after rotation")
            .await
            .unwrap();
        let raw_old = store
            .get(&k(&acme_id, RecordKind::Config, "old"))
            .await
            .unwrap()
            .unwrap();
        let raw_new = store
            .get(&k(&acme_id, RecordKind::Config, "new"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(sealed_key_id(&raw_old).unwrap(), KeyId(1), "[{backend}]");
        assert_eq!(
            sealed_key_id(&raw_new).unwrap(),
            KeyId(2),
            "[{backend}] the open handle uses the new key"
        );
        assert_eq!(
            acme.get(RecordKind::Config, "old").await.unwrap().unwrap(),
            b"before rotation"
        );

        // Another node (its own vault, same storage and master): it has only key 1 cached
        // when this node rotates again; reading a key-3 value makes it reload.
        let other = Vault::new(store.clone(), MasterKey::from_bytes(master));
        let other_acme = other.open_tenant(&acme_id).await.unwrap();
        assert_eq!(vault.rotate_tenant_key(&acme_id).await.unwrap(), KeyId(3));
        acme.put(RecordKind::Config, "newer", b"key 3")
            .await
            .unwrap();
        assert_eq!(
            other_acme
                .get(RecordKind::Config, "newer")
                .await
                .unwrap()
                .unwrap(),
            b"key 3"
        );
        assert_eq!(
            other_acme
                .get(RecordKind::Config, "old")
                .await
                .unwrap()
                .unwrap(),
            b"before rotation"
        );
        assert_eq!(
            other_acme.scope().keyring().current_key_id(),
            Some(KeyId(3))
        );

        // Both nodes rotating at once never reuse an id.
        let (a, b) = tokio::join!(
            vault.rotate_tenant_key(&acme_id),
            other.rotate_tenant_key(&acme_id)
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_ne!(a, b, "[{backend}]");
        assert_eq!(a.0.max(b.0), 5);
        let fresh = Vault::new(store.clone(), MasterKey::from_bytes(master));
        let reopened = fresh.open_tenant(&acme_id).await.unwrap();
        assert_eq!(reopened.scope().keyring().key_ids().len(), 5);
        for id in ["old", "new", "newer"] {
            assert!(
                reopened
                    .get(RecordKind::Config, id)
                    .await
                    .unwrap()
                    .is_some(),
                "[{backend}] {id}"
            );
        }
    }
}

#[tokio::test]
async fn rewrap_under_new_master() {
    for (store, _guard) in both_backends().await {
        let backend = store.backend();
        let (old, new) = ([1u8; 32], [2u8; 32]);
        let vault = Vault::new(store.clone(), MasterKey::from_bytes(old));
        let acme = vault.create_tenant(&t("acme")).await.unwrap();
        let globex = vault.create_tenant(&t("globex")).await.unwrap();
        acme.put(RecordKind::Secret, "a1", b"acme v1")
            .await
            .unwrap();
        vault.rotate_tenant_key(&t("acme")).await.unwrap();
        acme.put(RecordKind::Secret, "a2", b"acme v2")
            .await
            .unwrap();
        globex
            .put(RecordKind::Secret, "g1", b"globex v1")
            .await
            .unwrap();

        assert_eq!(
            vault.rewrap(MasterKey::from_bytes(new)).await.unwrap(),
            3,
            "[{backend}] 2 acme keys + 1 globex key"
        );
        // Running it again (e.g. after an interruption) finds nothing left to do.
        assert_eq!(vault.rewrap(MasterKey::from_bytes(new)).await.unwrap(), 0);
        // The running vault keeps working, and now wraps new keys under the new master.
        assert_eq!(
            acme.get(RecordKind::Secret, "a1").await.unwrap().unwrap(),
            b"acme v1"
        );
        vault.create_tenant(&t("initech")).await.unwrap();

        let restarted = Vault::new(store.clone(), MasterKey::from_bytes(new));
        let acme2 = restarted.open_tenant(&t("acme")).await.unwrap();
        assert_eq!(
            acme2.get(RecordKind::Secret, "a1").await.unwrap().unwrap(),
            b"acme v1"
        );
        assert_eq!(
            acme2.get(RecordKind::Secret, "a2").await.unwrap().unwrap(),
            b"acme v2"
        );
        let globex2 = restarted.open_tenant(&t("globex")).await.unwrap();
        assert_eq!(
            globex2
                .get(RecordKind::Secret, "g1")
                .await
                .unwrap()
                .unwrap(),
            b"globex v1"
        );
        restarted.open_tenant(&t("initech")).await.unwrap();

        let stale = Vault::new(store.clone(), MasterKey::from_bytes(old));
        for tenant in ["acme", "globex", "initech"] {
            let e = stale.open_tenant(&t(tenant)).await.unwrap_err();
            assert!(
                matches!(
                    e,
                    StoreError::Keys {
                        source: CryptoError::UnwrapFailed { .. },
                        ..
                    }
                ),
                "[{backend}] old master must no longer unwrap {tenant}: {e}"
            );
        }
    }
}

#[tokio::test]
async fn delete_tenant_shreds_keys_first() {
    for (store, _guard) in both_backends().await {
        let backend = store.backend();
        let vault = Vault::new(store.clone(), MasterKey::generate().unwrap());
        let acme_id = t("acme");
        let acme = vault.create_tenant(&acme_id).await.unwrap();
        let globex = vault.create_tenant(&t("globex")).await.unwrap();
        acme.put(RecordKind::Secret, "sip-1001", b"acme1001pw")
            .await
            .unwrap();
        acme.put(RecordKind::Cdr, "c1", b"15550001000")
            .await
            .unwrap();
        acme.append_event(b"ev").await.unwrap();
        vault.rotate_tenant_key(&acme_id).await.unwrap();
        globex
            .put(RecordKind::Secret, "sip-1001", b"globex pw")
            .await
            .unwrap();

        // The attacker's (or a stale backup's) copy of the raw sealed bytes.
        let kept = store
            .get(&k(&acme_id, RecordKind::Secret, "sip-1001"))
            .await
            .unwrap()
            .unwrap();

        let d = vault.delete_tenant(&acme_id).await.unwrap();
        assert_eq!(
            d,
            TenantDeletion {
                keys_destroyed: 2,
                records_deleted: 3
            },
            "[{backend}]"
        );
        assert!(store
            .list_node("keys/acme/", None, 10)
            .await
            .unwrap()
            .is_empty());
        assert!(store
            .get(&k(&acme_id, RecordKind::Secret, "sip-1001"))
            .await
            .unwrap()
            .is_none());

        // Handles opened before the deletion are dead, even for the restored bytes.
        let e = acme.put(RecordKind::Secret, "x", b"y").await.unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::Crypto {
                    source: CryptoError::KeysDestroyed(_),
                    ..
                }
            ),
            "{e}"
        );
        store
            .put(&k(&acme_id, RecordKind::Secret, "sip-1001"), kept.clone())
            .await
            .unwrap();
        let e = acme.get(RecordKind::Secret, "sip-1001").await.unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::Crypto {
                    source: CryptoError::KeysDestroyed(_),
                    ..
                }
            ),
            "{e}"
        );
        assert!(matches!(
            vault.open_tenant(&acme_id).await,
            Err(StoreError::UnknownTenant(_))
        ));

        // Restoring the kept bytes does not bring the data back: the key is gone, and a
        // re-created tenant of the same name has a new, unrelated key with the same id.
        let reborn = vault.create_tenant(&acme_id).await.unwrap();
        store
            .put(&k(&acme_id, RecordKind::Secret, "sip-1001"), kept.clone())
            .await
            .unwrap();
        let e = reborn
            .get(RecordKind::Secret, "sip-1001")
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::Crypto {
                    source: CryptoError::OpenFailed { .. },
                    ..
                }
            ),
            "[{backend}] {e}"
        );
        let mut renumbered = kept.clone();
        renumbered[1..5].copy_from_slice(&2u32.to_be_bytes()); // the id of the rotated key
        store
            .put(&k(&acme_id, RecordKind::Secret, "sip-1001"), renumbered)
            .await
            .unwrap();
        assert!(reborn.get(RecordKind::Secret, "sip-1001").await.is_err());

        // globex is untouched.
        assert_eq!(
            globex
                .get(RecordKind::Secret, "sip-1001")
                .await
                .unwrap()
                .unwrap(),
            b"globex pw"
        );
        // Deleting again is harmless (re-running an interrupted delete).
        vault.delete_tenant(&acme_id).await.unwrap();
        let again = vault.delete_tenant(&acme_id).await.unwrap();
        assert_eq!(
            again,
            TenantDeletion {
                keys_destroyed: 0,
                records_deleted: 0
            }
        );
    }
}

#[tokio::test]
async fn other_nodes_notice_deletion_and_recreation() {
    let (store, _g) = embedded().await;
    let master = [9u8; 32];
    let a = Vault::new(store.clone(), MasterKey::from_bytes(master));
    let b = Vault::new(store.clone(), MasterKey::from_bytes(master));
    let acme_id = t("acme");
    a.create_tenant(&acme_id).await.unwrap();
    let b_old = b.open_tenant(&acme_id).await.unwrap();

    a.delete_tenant(&acme_id).await.unwrap();
    let a_new = a.create_tenant(&acme_id).await.unwrap();
    a_new
        .put(RecordKind::Config, "c", b"new life")
        .await
        .unwrap();

    // b's cached key 1 is the old tenant's; re-opening must replace it, not reuse it.
    let b_new = b.open_tenant(&acme_id).await.unwrap();
    assert_eq!(
        b_new.get(RecordKind::Config, "c").await.unwrap().unwrap(),
        b"new life"
    );
    assert!(
        b_old.scope().keyring().is_destroyed(),
        "stale handles stop working"
    );
    assert!(b_old.put(RecordKind::Config, "x", b"y").await.is_err());
}

/// Writes the sample secrets through ScopedStore on the embedded backend and checks the
/// redb file's raw bytes never contain them.
#[tokio::test]
async fn no_plaintext_in_the_redb_file() {
    let dir = TempDir::new("plaintext");
    let phone = "15550001000";
    let password = "acme1001pw";
    {
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).await.unwrap());
        let vault = Vault::new(store, MasterKey::generate().unwrap());
        let acme = vault.create_tenant(&t("acme")).await.unwrap();
        let user = SipUser {
            extension: "1001".into(),
            password: password.into(),
            caller_id: phone.into(),
        };
        acme.put_json(RecordKind::User, "user-1001", &user)
            .await
            .unwrap();
        acme.put(RecordKind::Secret, "sip-password-1001", password.as_bytes())
            .await
            .unwrap();
        for i in 0..50 {
            acme.put(
                RecordKind::Cdr,
                &format!("cdr-{i:04}"),
                format!("from {phone} to 1001 #{i}").as_bytes(),
            )
            .await
            .unwrap();
        }
        acme.append_event_json(&serde_json::json!({"caller": phone, "auth": password}))
            .await
            .unwrap();
        vault.rotate_tenant_key(&t("acme")).await.unwrap();
        acme.put(
            RecordKind::Voicemail,
            "vm-1",
            format!("call back {phone}").as_bytes(),
        )
        .await
        .unwrap();
        // Overwrite and delete too, so freed pages would hold old values if anything leaked.
        acme.put_json(RecordKind::User, "user-1001", &user)
            .await
            .unwrap();
        acme.delete(RecordKind::Cdr, "cdr-0000").await.unwrap();
        // Reading back proves the data is really there.
        assert_eq!(
            acme.get_json::<SipUser>(RecordKind::User, "user-1001")
                .await
                .unwrap()
                .unwrap()
                .password,
            password
        );
    }
    let bytes = std::fs::read(dir.path().join(embedded::DB_FILE_NAME)).unwrap();
    // Positive control: record ids are stored in the clear by design, so the scan does see
    // the data pages.
    assert!(
        contains(&bytes, b"acme/user/user-1001"),
        "scan must see the records table"
    );
    assert!(
        !contains(&bytes, phone.as_bytes()),
        "phone number found in plaintext in the redb file"
    );
    assert!(
        !contains(&bytes, password.as_bytes()),
        "password found in plaintext in the redb file"
    );
    println!(
        "plaintext check: scanned {} bytes of {}, no phone number or password found",
        bytes.len(),
        embedded::DB_FILE_NAME
    );
}
