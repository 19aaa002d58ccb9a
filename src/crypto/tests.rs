use super::*;

fn t(s: &str) -> TenantId {
    TenantId::new(s).unwrap()
}

fn rec(kind: RecordKind, id: &str) -> SealContext<'_> {
    SealContext::Record { kind, id }
}

/// A keyring holding exactly the given key bytes under id 1, for tests that need two tenants
/// with the *same* key so that only the associated data differs.
fn keyring_with(tenant: &str, key: [u8; KEY_LEN]) -> Keyring {
    let mut keys = BTreeMap::new();
    keys.insert(KeyId(1), DataKey::new(Zeroizing::new(key)));
    Keyring {
        tenant: t(tenant),
        state: RwLock::new(KeyringState {
            keys,
            destroyed: false,
        }),
    }
}

fn tmp_dir(label: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!(
        "crossbar-crypto-{label}-{}-{}",
        std::process::id(),
        hex::encode(rand::random::<[u8; 6]>())
    ));
    std::fs::create_dir_all(&p).unwrap();
    p
}

#[test]
fn seal_open_round_trip() {
    let master = MasterKey::generate().unwrap();
    let (kr, _) = Keyring::generate(&t("acme"), &master).unwrap();
    for pt in [&b""[..], b"x", b"acme1001pw", &[0u8; 4096]] {
        let sealed = kr.seal(rec(RecordKind::Secret, "sip-1001"), pt).unwrap();
        assert_eq!(sealed.len(), MIN_SEALED_LEN + pt.len());
        assert_eq!(sealed[0], SEALED_VERSION);
        assert_eq!(
            kr.open(rec(RecordKind::Secret, "sip-1001"), &sealed)
                .unwrap(),
            pt
        );
    }
    let ev = kr.seal(SealContext::Event, b"call started").unwrap();
    assert_eq!(kr.open(SealContext::Event, &ev).unwrap(), b"call started");
    // Random nonces: equal plaintexts never give equal ciphertexts.
    let a = kr.seal(rec(RecordKind::Config, "x"), b"same").unwrap();
    let b = kr.seal(rec(RecordKind::Config, "x"), b"same").unwrap();
    assert_ne!(a, b);
}

/// A value as crossbar sealed it before version 2: XChaCha20-Poly1305, 24-byte nonce.
fn seal_v1(kr: &Keyring, ctx: SealContext<'_>, pt: &[u8]) -> Vec<u8> {
    let aad = kr.aad(ctx);
    let s = kr.state.read();
    let (id, key) = s.keys.iter().next_back().unwrap();
    let nonce: [u8; NONCE_LEN] = rand::random();
    let ct = key.cipher().encrypt(XNonce::from_slice(&nonce), Payload { msg: pt, aad: &aad }).unwrap();
    let mut out = vec![SEALED_VERSION_XCHACHA];
    out.extend_from_slice(&id.0.to_be_bytes());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    out
}

#[test]
fn values_sealed_by_the_previous_version_still_open() {
    let master = MasterKey::generate().unwrap();
    let (kr, _) = Keyring::generate(&t("acme"), &master).unwrap();
    let ctx = rec(RecordKind::Cdr, "1700000000000-00ff");
    let old = seal_v1(&kr, ctx, b"{\"disposition\":\"answered\"}");
    assert_eq!(old.len(), HEADER_LEN + 26 + TAG_LEN);
    assert_eq!(sealed_key_id(&old).unwrap(), KeyId(1));
    assert_eq!(kr.open(ctx, &old).unwrap(), b"{\"disposition\":\"answered\"}");
    // Its context binding holds as before.
    assert!(matches!(kr.open(rec(RecordKind::Cdr, "other"), &old), Err(CryptoError::OpenFailed { .. })));
    let mut flipped = old.clone();
    *flipped.last_mut().unwrap() ^= 1;
    assert!(kr.open(ctx, &flipped).is_err());
    // New values are version 2, and a version-2 header on version-1 bytes does not open.
    assert_eq!(kr.seal(ctx, b"x").unwrap()[0], 2);
    let mut relabelled = old.clone();
    relabelled[0] = 2;
    assert!(kr.open(ctx, &relabelled).is_err());
}

#[test]
fn open_in_wrong_context_fails() {
    let key: [u8; 32] = rand::random();
    let acme = keyring_with("acme", key);
    let globex = keyring_with("globex", key); // same key: only the AAD differs
    let sealed = acme
        .seal(rec(RecordKind::Secret, "1001"), b"acme1001pw")
        .unwrap();
    assert!(acme.open(rec(RecordKind::Secret, "1001"), &sealed).is_ok());

    let wrong_tenant = globex.open(rec(RecordKind::Secret, "1001"), &sealed);
    let wrong_kind = acme.open(rec(RecordKind::Config, "1001"), &sealed);
    let wrong_id = acme.open(rec(RecordKind::Secret, "1002"), &sealed);
    let as_event = acme.open(SealContext::Event, &sealed);
    for (what, r) in [
        ("tenant", wrong_tenant),
        ("kind", wrong_kind),
        ("id", wrong_id),
        ("event", as_event),
    ] {
        let e = r.expect_err(what);
        assert!(matches!(e, CryptoError::OpenFailed { .. }), "{what}: {e}");
        assert!(e.to_string().contains("another tenant, kind or id"), "{e}");
    }

    // Another key for the same tenant and id.
    let other = keyring_with("acme", rand::random());
    assert!(matches!(
        other.open(rec(RecordKind::Secret, "1001"), &sealed),
        Err(CryptoError::OpenFailed { .. })
    ));
    // A key id the keyring does not have.
    let mut renumbered = sealed.clone();
    renumbered[1..5].copy_from_slice(&7u32.to_be_bytes());
    assert!(matches!(
        acme.open(rec(RecordKind::Secret, "1001"), &renumbered),
        Err(CryptoError::UnknownKeyId {
            key_id: KeyId(7),
            ..
        })
    ));
}

#[test]
fn aad_fields_are_unambiguous() {
    assert_ne!(
        build_aad(b"d", &[b"ab", b"c"]),
        build_aad(b"d", &[b"a", b"bc"])
    );
    assert_ne!(build_aad(b"d", &[b"", b"x"]), build_aad(b"d", &[b"x", b""]));
}

#[test]
fn tampering_fails_without_panicking() {
    let master = MasterKey::generate().unwrap();
    let (kr, _) = Keyring::generate(&t("acme"), &master).unwrap();
    let ctx = rec(RecordKind::Cdr, "c1");
    let sealed = kr.seal(ctx, b"15550001000 called 15550002000").unwrap();
    let mut failures = 0;
    for i in 0..sealed.len() {
        for bit in [0x01u8, 0x80] {
            let mut bad = sealed.clone();
            bad[i] ^= bit;
            assert!(kr.open(ctx, &bad).is_err(), "flip at byte {i} accepted");
            failures += 1;
        }
    }
    for len in 0..sealed.len() {
        assert!(
            kr.open(ctx, &sealed[..len]).is_err(),
            "truncation to {len} accepted"
        );
        failures += 1;
    }
    let mut extended = sealed.clone();
    extended.push(0);
    assert!(kr.open(ctx, &extended).is_err());
    let mut version = sealed.clone();
    version[0] = 3;
    assert!(matches!(
        kr.open(ctx, &version),
        Err(CryptoError::Malformed(_))
    ));
    assert!(matches!(sealed_key_id(&[]), Err(CryptoError::Malformed(_))));
    println!("tampering: {failures} altered values, all refused");
}

#[test]
fn rotation_keeps_old_values_readable() {
    let master = MasterKey::generate().unwrap();
    let (kr, w1) = Keyring::generate(&t("acme"), &master).unwrap();
    assert_eq!(w1.key_id(), KeyId(1));
    let old = kr.seal(rec(RecordKind::User, "u"), b"old").unwrap();
    assert_eq!(sealed_key_id(&old).unwrap(), KeyId(1));

    let w2 = kr.rotate(&master).unwrap();
    assert_eq!(w2.key_id(), KeyId(2));
    assert_eq!(kr.current_key_id(), Some(KeyId(2)));
    let new = kr.seal(rec(RecordKind::User, "u"), b"new").unwrap();
    assert_eq!(
        sealed_key_id(&new).unwrap(),
        KeyId(2),
        "new writes use the new key"
    );
    assert_eq!(kr.open(rec(RecordKind::User, "u"), &old).unwrap(), b"old");
    assert_eq!(kr.open(rec(RecordKind::User, "u"), &new).unwrap(), b"new");

    // A keyring rebuilt from storage (e.g. after restart) has both keys, current = newest.
    let rebuilt = Keyring::from_wrapped(&t("acme"), &master, &[w1, w2]).unwrap();
    assert_eq!(rebuilt.current_key_id(), Some(KeyId(2)));
    assert_eq!(
        rebuilt.open(rec(RecordKind::User, "u"), &old).unwrap(),
        b"old"
    );

    // Prepared but uncommitted keys are not used.
    let pending = kr.prepare_rotation(&master).unwrap();
    assert_eq!(pending.key_id(), KeyId(3));
    assert_eq!(kr.current_key_id(), Some(KeyId(2)));
    assert_eq!(kr.commit_rotation(pending), KeyId(3));
    assert_eq!(kr.key_ids(), vec![KeyId(1), KeyId(2), KeyId(3)]);
}

#[test]
fn rewrap_moves_keys_to_new_master() {
    let old_master = MasterKey::generate().unwrap();
    let new_master = MasterKey::generate().unwrap();
    let (kr, _) = Keyring::generate(&t("acme"), &old_master).unwrap();
    let v1 = kr.seal(rec(RecordKind::Voicemail, "m1"), b"msg1").unwrap();
    kr.rotate(&old_master).unwrap();
    let v2 = kr.seal(rec(RecordKind::Voicemail, "m2"), b"msg2").unwrap();

    let rewrapped = kr.rewrap(&new_master).unwrap();
    assert_eq!(rewrapped.len(), 2);
    let under_new = Keyring::from_wrapped(&t("acme"), &new_master, &rewrapped).unwrap();
    assert_eq!(
        under_new
            .open(rec(RecordKind::Voicemail, "m1"), &v1)
            .unwrap(),
        b"msg1"
    );
    assert_eq!(
        under_new
            .open(rec(RecordKind::Voicemail, "m2"), &v2)
            .unwrap(),
        b"msg2"
    );
    let e = Keyring::from_wrapped(&t("acme"), &old_master, &rewrapped).unwrap_err();
    assert!(matches!(e, CryptoError::UnwrapFailed { .. }), "{e}");
    assert!(e.to_string().contains("wrong master key"), "{e}");

    // The per-record form used for stored keys.
    let w = &rewrapped[0];
    let back = w.rewrap(&new_master, &old_master).unwrap();
    assert!(back.verify(&old_master).is_ok());
    assert!(back.verify(&new_master).is_err());
}

#[test]
fn wrapped_keys_are_bound_to_tenant_and_id() {
    let master = MasterKey::generate().unwrap();
    let (_, w) = Keyring::generate(&t("acme"), &master).unwrap();
    let bytes = w.to_bytes();
    assert_eq!(bytes.len(), WRAPPED_LEN);
    let same = WrappedKey::from_bytes(&t("acme"), &bytes).unwrap();
    assert!(same.verify(&master).is_ok());
    // Copied under another tenant.
    let moved = WrappedKey::from_bytes(&t("globex"), &bytes).unwrap();
    assert!(matches!(
        moved.verify(&master),
        Err(CryptoError::UnwrapFailed { .. })
    ));
    // Renumbered.
    let mut renum = bytes.clone();
    renum[1..5].copy_from_slice(&2u32.to_be_bytes());
    let renum = WrappedKey::from_bytes(&t("acme"), &renum).unwrap();
    assert!(matches!(
        renum.verify(&master),
        Err(CryptoError::UnwrapFailed { .. })
    ));
    // Malformed records are errors.
    assert!(WrappedKey::from_bytes(&t("acme"), &bytes[..10]).is_err());
    let mut v = bytes.clone();
    v[0] = 9;
    assert!(WrappedKey::from_bytes(&t("acme"), &v).is_err());
    // A keyring refuses another tenant's key outright.
    let (globex, _) = Keyring::generate(&t("globex"), &master).unwrap();
    assert!(globex.merge_wrapped(&master, &[w]).is_err());
}

#[test]
fn merge_detects_replaced_keys() {
    let master = MasterKey::generate().unwrap();
    let (kr, _) = Keyring::generate(&t("acme"), &master).unwrap();
    let (_, other_w1) = Keyring::generate(&t("acme"), &master).unwrap(); // a re-created tenant
    assert!(matches!(
        kr.merge_wrapped(&master, &[other_w1]),
        Err(CryptoError::KeyMismatch {
            key_id: KeyId(1),
            ..
        })
    ));
    // Another node's copy of the same keyring rotates.
    let copy = Keyring::from_wrapped(&t("acme"), &master, &kr.rewrap(&master).unwrap()).unwrap();
    let w2 = copy.rotate(&master).unwrap();
    assert_eq!(
        kr.merge_wrapped(&master, &[w2]).unwrap(),
        1,
        "a key rotated elsewhere is added"
    );
    assert_eq!(kr.current_key_id(), Some(KeyId(2)));
}

#[test]
fn destroyed_keyring_refuses_everything() {
    let master = MasterKey::generate().unwrap();
    let (kr, _) = Keyring::generate(&t("acme"), &master).unwrap();
    let sealed = kr
        .seal(rec(RecordKind::Secret, "s"), b"acme1001pw")
        .unwrap();
    kr.destroy();
    assert!(kr.is_destroyed());
    assert!(kr.key_ids().is_empty());
    assert_eq!(kr.current_key_id(), None);
    assert!(matches!(
        kr.open(rec(RecordKind::Secret, "s"), &sealed),
        Err(CryptoError::KeysDestroyed(_))
    ));
    assert!(matches!(
        kr.seal(rec(RecordKind::Secret, "s"), b"x"),
        Err(CryptoError::KeysDestroyed(_))
    ));
    assert!(kr.rotate(&master).is_err());
    assert!(kr.rewrap(&master).is_err());
    assert!(matches!(
        Keyring::from_wrapped(&t("acme"), &master, &[]),
        Err(CryptoError::NoKeys(_))
    ));
}

#[test]
fn master_key_parsing() {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    let bytes: [u8; 32] = rand::random();
    let check = |text: &str| {
        let k = MasterKey::parse(text, "test").unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert_eq!(*k.0, bytes);
    };
    check(&hex::encode(bytes));
    check(&hex::encode_upper(bytes));
    check(&format!("  {}\n", hex::encode(bytes)));
    check(&STANDARD.encode(bytes));
    check(&URL_SAFE_NO_PAD.encode(bytes));
    for bad in [
        "",
        "   ",
        "zz",
        &hex::encode([1u8; 31]),
        &STANDARD.encode([1u8; 33]),
        "not-a-key!!",
    ] {
        let e = MasterKey::parse(bad, "test").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("64 hex characters"), "{msg}");
        if bad.len() > 4 {
            assert!(
                !msg.contains(bad.trim()),
                "error must not echo the key text: {msg}"
            );
        }
    }
    let k = MasterKey::from_bytes(bytes);
    let dbg = format!("{k:?}");
    assert!(
        !dbg.contains(&hex::encode(bytes)[..8]) && dbg.contains("redacted"),
        "{dbg}"
    );
}

#[test]
fn master_key_from_env_var() {
    let name = format!("CROSSBAR_TEST_MASTER_KEY_{}", std::process::id());
    assert!(
        MasterKey::from_env_var(&name).unwrap().is_none(),
        "unset is None"
    );
    let bytes: [u8; 32] = rand::random();
    std::env::set_var(&name, hex::encode(bytes));
    assert_eq!(*MasterKey::from_env_var(&name).unwrap().unwrap().0, bytes);
    std::env::set_var(&name, "short");
    let e = MasterKey::from_env_var(&name).unwrap_err();
    assert!(e.to_string().contains(&name), "names the variable: {e}");
    std::env::remove_var(&name);
}

#[cfg(unix)]
#[test]
fn master_key_file_is_generated_once_with_mode_0600() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tmp_dir("gen");
    let path = dir.join("sub").join("master.key");
    let (k1, generated) = MasterKey::load_or_generate(&path).unwrap();
    assert!(generated, "first run generates");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "key file mode is {mode:o}");
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.trim().len(), 64);
    let (k2, generated) = MasterKey::load_or_generate(&path).unwrap();
    assert!(!generated, "second run loads");
    assert_eq!(*k1.0, *k2.0);
    assert_eq!(*MasterKey::load_file(&path).unwrap().0, *k1.0);
    let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "no temporary files left behind");

    // A damaged key file is an error, never silently replaced.
    std::fs::write(&path, "garbage").unwrap();
    let e = MasterKey::load_or_generate(&path).unwrap_err();
    assert!(e.to_string().contains("master.key"), "{e}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "garbage");

    let missing = MasterKey::load_file(&dir.join("nope.key")).unwrap_err();
    assert!(
        matches!(missing, CryptoError::ReadMasterKey { .. }),
        "{missing}"
    );

    // resolve() prefers the environment; only check the file path when it is unset here.
    if std::env::var_os(MASTER_KEY_ENV).is_none() {
        let p = dir.join("resolved.key");
        let (_, src) = MasterKey::resolve(&p).unwrap();
        assert_eq!(src, MasterKeySource::Generated(p.clone()));
        let (_, src) = MasterKey::resolve(&p).unwrap();
        assert_eq!(src, MasterKeySource::File(p));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn concurrent_generation_agrees_on_one_key() {
    let dir = tmp_dir("race");
    let path = dir.join("master.key");
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let p = path.clone();
            std::thread::spawn(move || MasterKey::load_or_generate(&p).unwrap())
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let first = *results[0].0 .0;
    assert!(
        results.iter().all(|(k, _)| *k.0 == first),
        "all threads see the same key"
    );
    assert_eq!(
        results.iter().filter(|(_, g)| *g).count(),
        1,
        "exactly one generated it"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
