//! Known-answer tests from RFC 3711, RFC 7714 and libSRTP's own validation
//! vectors, then the receive rules (index estimation, replay window, new
//! streams). Interworking with str0m's SRTP is tested in `webrtc/tests.rs`.

use super::*;

fn hex(s: &str) -> Vec<u8> {
    hex::decode(s.replace([' ', '\n'], "")).unwrap()
}

/// RFC 3711 Appendix B.3: the key derivation.
#[test]
fn derives_the_rfc_3711_session_keys() {
    let master = hex("E1F97A0D3E018BE0D64FA32C06DE4139");
    let salt = hex("0EC675AD498AFEEBB6960B3AABE6");
    let mut key = [0u8; 16];
    derive(&master, &salt, LABEL_RTP_KEY, &mut key);
    assert_eq!(key.to_vec(), hex("C61E7A93744F39EE10734AFE3FF7A087"));
    let mut auth = [0u8; 20];
    derive(&master, &salt, LABEL_RTP_AUTH, &mut auth);
    assert_eq!(auth.to_vec(), hex("CEBE321F6FF7716B6FD4AB49AF256A156D38BAA4"));
    let mut session_salt = [0u8; 14];
    derive(&master, &salt, LABEL_RTP_SALT, &mut session_salt);
    assert_eq!(session_salt.to_vec(), hex("30CBBC08863D8C85D49DB34A9AE1"));
}

const PLAIN_REF: &str = "800f1234decafbadcafebabeabababababababababababababababab";

/// libSRTP's `srtp_validate` packet (AES_CM_128_HMAC_SHA1_80, SSRC 0xcafebabe,
/// sequence number 0x1234, ROC 0) from its master key and salt.
#[test]
fn protects_the_libsrtp_aes_cm_reference_packet() {
    let master = hex("e1f97a0d3e018be0d64fa32c06de4139");
    let salt = hex("0ec675ad498afeebb6960b3aabe6");
    let mut tx = Sender { cipher: Cipher::new(Profile::Aes128CmSha1_80, &master, &salt) };
    let plain = hex(PLAIN_REF);
    let mut out = [0u8; 64];
    out[..12].copy_from_slice(&plain[..12]);
    let n = tx.protect(&mut out, 12, &plain[12..], 0xcafebabe, 0x1234).unwrap();
    let expected = hex("800f1234decafbadcafebabe4e55dc4ce79978d88ca4d215949d2402b78d6acc99ea179b8dbb");
    assert_eq!(out[..n].to_vec(), expected);

    let mut rx = Receiver { cipher: Cipher::new(Profile::Aes128CmSha1_80, &master, &salt), streams: [None; STREAMS] };
    let mut back = [0u8; 64];
    let m = rx.unprotect(&expected, &mut back).unwrap();
    assert_eq!(back[..m].to_vec(), plain);
}

// RFC 7714 §16: AEAD_AES_128_GCM and AEAD_AES_256_GCM RTP packets
// (session keys given directly; SSRC 0x5501a0b2, sequence number 0xf17b).
const GCM_PLAIN: &str = "8040f17b8041f8d35501a0b247616c6c696120657374206f6d6e69732064697669736120696e207061727465732074726573";
const GCM_SALT: &str = "517569642070726f2071756f";

fn gcm_known_answer(profile: Profile, key: &str, protected: &str) {
    let (key, salt, plain, protected) = (hex(key), hex(GCM_SALT), hex(GCM_PLAIN), hex(protected));
    let mut tx = Sender { cipher: Cipher::from_session_keys(profile, &key, &[], &salt) };
    let mut out = [0u8; 128];
    out[..12].copy_from_slice(&plain[..12]);
    let n = tx.protect(&mut out, 12, &plain[12..], 0x5501a0b2, 0xf17b).unwrap();
    assert_eq!(out[..n].to_vec(), protected, "{profile:?} protect");
    let mut rx = Receiver { cipher: Cipher::from_session_keys(profile, &key, &[], &salt), streams: [None; STREAMS] };
    let mut back = [0u8; 128];
    let m = rx.unprotect(&protected, &mut back).unwrap();
    assert_eq!(back[..m].to_vec(), plain, "{profile:?} unprotect");
}

#[test]
fn protects_the_rfc_7714_gcm_packets() {
    gcm_known_answer(
        Profile::AeadAes128Gcm,
        "000102030405060708090a0b0c0d0e0f",
        "8040f17b8041f8d35501a0b2f24de3a3fb34de6cacba861c9d7e4bcabe633bd50d294e6f42a5f47a51c7d19b36de3adf8833899d7f27beb16a9152cf765ee4390cce",
    );
    gcm_known_answer(
        Profile::AeadAes256Gcm,
        "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
        "8040f17b8041f8d35501a0b232b1de78a822fe12ef9f78fa332e33aab18012389a58e2f3b50b2a0276ffae0f1ba63799b87b7aa3db36dfffd6b0f9bb7878d7a76c13",
    );
}

const PROFILES: [Profile; 3] = [Profile::Aes128CmSha1_80, Profile::AeadAes128Gcm, Profile::AeadAes256Gcm];

/// Keying material of the right length for `p`, with distinct bytes per half.
fn material(p: Profile) -> Vec<u8> {
    (0..2 * (p.key_len() + p.salt_len())).map(|i| (i * 7 + 3) as u8).collect()
}

/// What the DTLS client sends with, and what the server opens it with.
fn client_to_server(p: Profile) -> (Sender, Receiver) {
    let m = material(p);
    (Keys::new(p, &m, true).unwrap().sender(), Keys::new(p, &m, false).unwrap().receiver())
}

fn packet(tx: &mut Sender, ssrc: u32, index: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 12 + payload.len() + 16];
    out[0] = 0x80;
    out[1] = 8;
    out[2..4].copy_from_slice(&(index as u16).to_be_bytes());
    out[8..12].copy_from_slice(&ssrc.to_be_bytes());
    let n = tx.protect(&mut out, 12, payload, ssrc, index).unwrap();
    out.truncate(n);
    out
}

fn open_payload(rx: &mut Receiver, pkt: &[u8]) -> Result<Vec<u8>, Refused> {
    let mut out = vec![0u8; pkt.len()];
    let n = rx.unprotect(pkt, &mut out)?;
    Ok(out[12..n].to_vec())
}

/// What the DTLS client sends, the server's receiver opens, and the other way;
/// a side never opens its own packets (each direction has its own keys).
#[test]
fn each_direction_uses_its_half_of_the_keying_material() {
    for p in PROFILES {
        let m = material(p);
        let client = Keys::new(p, &m, true).unwrap();
        let server = Keys::new(p, &m, false).unwrap();
        let to_server = packet(&mut client.sender(), 7, 1, b"hello");
        assert_eq!(open_payload(&mut server.receiver(), &to_server).unwrap(), b"hello", "{p:?}");
        let to_client = packet(&mut server.sender(), 7, 1, b"world");
        assert_eq!(open_payload(&mut client.receiver(), &to_client).unwrap(), b"world", "{p:?}");
        assert_eq!(open_payload(&mut client.receiver(), &to_server), Err(Refused::Unauthentic), "{p:?}");
    }
    assert!(Keys::new(Profile::AeadAes128Gcm, &[0u8; 10], true).is_none(), "material of the wrong length");
}

#[test]
fn a_changed_byte_anywhere_is_refused() {
    for p in PROFILES {
        let m = material(p);
        let pkt = packet(&mut Keys::new(p, &m, true).unwrap().sender(), 9, 5, &[0x55; 160]);
        for at in [1, 5, 11, 12, 100, pkt.len() - 1] {
            let mut bad = pkt.clone();
            bad[at] ^= 0x01;
            let mut rx = Keys::new(p, &m, false).unwrap().receiver();
            assert_eq!(open_payload(&mut rx, &bad), Err(Refused::Unauthentic), "{p:?} byte {at}");
        }
        let mut rx = Keys::new(p, &m, false).unwrap().receiver();
        assert_eq!(open_payload(&mut rx, &pkt[..14]), Err(Refused::Malformed), "{p:?} truncated");
        assert_eq!(open_payload(&mut rx, &[0x40; 40]), Err(Refused::Malformed), "{p:?} not RTP v2");
    }
}

/// Sequence numbers wrap: the rollover counter (authenticated under AES-CM,
/// part of the nonce under GCM) is estimated right across the wrap, and for a
/// late packet from before it.
#[test]
fn the_rollover_counter_follows_sequence_number_wraps() {
    for p in PROFILES {
        let (mut tx, mut rx) = client_to_server(p);
        let late = packet(&mut tx, 1, 0x1_ffc0, b"late");
        for index in [0xfff0u64, 0xffff, 0x1_0000, 0x1_0001, 0x1_7000, 0x1_c000, 0x2_0005] {
            let pkt = packet(&mut tx, 1, index, &index.to_be_bytes());
            assert_eq!(open_payload(&mut rx, &pkt).unwrap(), index.to_be_bytes(), "{p:?} index {index:#x}");
        }
        // From the previous roll, estimated right, and 69 behind: older than the window.
        assert_eq!(open_payload(&mut rx, &late), Err(Refused::Replayed), "{p:?}");
    }
    assert_eq!(estimate_index(0x1_0005, 0xfffa), Some(0xfffa), "late packet from the previous roll");
    assert_eq!(estimate_index(0xfffa, 0x0003), Some(0x1_0003), "next roll");
    assert_eq!(estimate_index(0x0005, 0xfffa), None, "before the first roll");
}

#[test]
fn repeats_and_packets_older_than_the_window_are_refused() {
    let p = Profile::AeadAes256Gcm;
    let (mut tx, mut rx) = client_to_server(p);
    let pkts: Vec<Vec<u8>> = (0..100u64).map(|i| packet(&mut tx, 4, 1000 + i, &[i as u8])).collect();
    open_payload(&mut rx, &pkts[10]).unwrap();
    assert_eq!(open_payload(&mut rx, &pkts[10]), Err(Refused::Replayed));
    // Reordered, within the window: accepted once.
    open_payload(&mut rx, &pkts[80]).unwrap();
    assert_eq!(open_payload(&mut rx, &pkts[30]).unwrap(), [30]);
    assert_eq!(open_payload(&mut rx, &pkts[30]), Err(Refused::Replayed));
    assert_eq!(open_payload(&mut rx, &pkts[17]).unwrap(), [17], "63 behind the highest is the window's oldest");
    assert_eq!(open_payload(&mut rx, &pkts[16]), Err(Refused::Replayed), "64 behind");
    // A packet that fails authentication does not move the window.
    let mut forged = pkts[99].clone();
    forged[20] ^= 1;
    assert_eq!(open_payload(&mut rx, &forged), Err(Refused::Unauthentic));
    assert_eq!(open_payload(&mut rx, &pkts[18]).unwrap(), [18], "the forged packet did not move the window");
}

/// A new SSRC is a new stream with its own sequence numbers.
#[test]
fn a_new_ssrc_starts_a_new_stream() {
    let p = Profile::AeadAes128Gcm;
    let (mut tx, mut rx) = client_to_server(p);
    open_payload(&mut rx, &packet(&mut tx, 1, 40000, b"a")).unwrap();
    assert_eq!(open_payload(&mut rx, &packet(&mut tx, 2, 10, b"b")).unwrap(), b"b");
    assert_eq!(open_payload(&mut rx, &packet(&mut tx, 2, 11, b"c")).unwrap(), b"c");
}

/// Streams the peer left keep their replay state: their packets, replayed
/// after a change of SSRC, are refused, for the last few SSRCs.
#[test]
fn replays_of_an_earlier_ssrc_are_refused() {
    let p = Profile::AeadAes128Gcm;
    let (mut tx, mut rx) = client_to_server(p);
    let old: Vec<_> = (0..3).map(|i| packet(&mut tx, 1, 500 + i, b"old")).collect();
    for pkt in &old {
        open_payload(&mut rx, pkt).unwrap();
    }
    // The browser moves to a new SSRC (new sequence numbers, below the old ones).
    for i in 0..3 {
        assert_eq!(open_payload(&mut rx, &packet(&mut tx, 2, 7 + i, b"new")).unwrap(), b"new");
    }
    for pkt in &old {
        assert_eq!(open_payload(&mut rx, pkt), Err(Refused::Replayed), "a replay of the old stream");
    }
    // A late packet of the old stream, never received, is still accepted once.
    let late = packet(&mut tx, 1, 503, b"late");
    assert_eq!(open_payload(&mut rx, &late).unwrap(), b"late");
    assert_eq!(open_payload(&mut rx, &late), Err(Refused::Replayed));
    // The new stream goes on; after it and STREAMS - 2 more SSRCs the old stream is
    // still known, the least recently used of STREAMS; one more SSRC forgets it.
    open_payload(&mut rx, &packet(&mut tx, 2, 10, b"new")).unwrap();
    for ssrc in 3..=STREAMS as u32 {
        open_payload(&mut rx, &packet(&mut tx, ssrc, 1, b"x")).unwrap();
    }
    assert_eq!(open_payload(&mut rx, &old[0]), Err(Refused::Replayed), "still among the last {STREAMS}");
    open_payload(&mut rx, &packet(&mut tx, 100, 1, b"x")).unwrap();
    assert_eq!(open_payload(&mut rx, &old[0]).unwrap(), b"old", "forgotten: the least recently used of {STREAMS} + 1");
}

#[test]
fn header_lengths_count_csrcs_and_the_extension() {
    let mut pkt = vec![0x80u8; 12];
    assert_eq!(rtp_header_len(&pkt), Some(12));
    pkt[0] = 0x82; // two CSRCs
    assert_eq!(rtp_header_len(&pkt), None, "CSRCs missing");
    pkt.extend_from_slice(&[0; 8]);
    assert_eq!(rtp_header_len(&pkt), Some(20));
    pkt[0] = 0x92; // and an extension of one word
    pkt.extend_from_slice(&[0xbe, 0xde, 0, 1, 0x40, b'0', 0, 0]);
    assert_eq!(rtp_header_len(&pkt), Some(28));
}
