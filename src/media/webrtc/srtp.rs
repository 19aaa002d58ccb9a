//! crossbar's own SRTP for a browser leg's RTP (RFC 3711; AEAD AES-GCM, RFC 7714).
//!
//! str0m runs a browser leg's ICE, DTLS and RTCP. Once DTLS is up, the leg's
//! RTP no longer passes through str0m: the bridge protects and unprotects it
//! here, one packet at a time, into its own buffers. str0m's RTP path does
//! per-packet stream bookkeeping, pacing and polling that a G.711 bridge has no
//! use for; it was about 40 % of a bridged call's CPU (`bench/webrtc.sh`).
//! RTCP stays with str0m: SRTCP has its own keys and index, so the two never
//! share a counter.
//!
//! **Keys.** The DTLS-SRTP keying material (RFC 5764 §4.2) comes from str0m's
//! DTLS as it exports it: str0m builds its DTLS through a pluggable crypto
//! provider, and crossbar's provider ([`build_rtc`]) wraps str0m's own
//! (RustCrypto) one and copies the material into the leg's [`KeySlot`]. The
//! DTLS client's half protects what the client sends.
//!
//! **Receiving** follows RFC 3711 §3.3: the packet index is estimated from
//! the highest sequence number seen and the rollover counter (Appendix A),
//! the packet is authenticated before anything else, and a 64-packet replay
//! window refuses repeats and packets older than it. A new SSRC starts a new
//! stream.

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use aes::cipher::{BlockEncrypt, InnerIvInit, KeyInit, StreamCipher};
use aes::{Aes128, Aes256};
use aes_gcm::{AeadInPlace, Aes128Gcm, Aes256Gcm, Nonce, Tag};
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use sha1::Sha1;
use str0m::crypto::dtls::{DtlsCert, DtlsImplError, DtlsInstance, DtlsOutput, DtlsProvider, DtlsVersion, ProtocolVersion, SrtpProfile};
use str0m::crypto::{CryptoError, CryptoProvider};
use str0m::{Rtc, RtcConfig};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// The SRTP protection profiles str0m's DTLS negotiates (RFC 5764, RFC 7714).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Aes128CmSha1_80,
    AeadAes128Gcm,
    AeadAes256Gcm,
}

impl Profile {
    fn key_len(self) -> usize {
        match self {
            Profile::Aes128CmSha1_80 | Profile::AeadAes128Gcm => 16,
            Profile::AeadAes256Gcm => 32,
        }
    }

    fn salt_len(self) -> usize {
        match self {
            Profile::Aes128CmSha1_80 => 14,
            Profile::AeadAes128Gcm | Profile::AeadAes256Gcm => 12,
        }
    }
}

const CM_TAG_LEN: usize = 10;
const GCM_TAG_LEN: usize = 16;

/// DTLS-SRTP keying material of one DTLS association.
pub struct Keys {
    profile: Profile,
    /// client key | server key | client salt | server salt (RFC 5764 §4.2).
    material: Zeroizing<Vec<u8>>,
    /// crossbar was the DTLS client.
    client: bool,
}

impl Keys {
    pub fn new(profile: Profile, material: &[u8], client: bool) -> Option<Keys> {
        let (k, s) = (profile.key_len(), profile.salt_len());
        (material.len() == 2 * (k + s)).then(|| Keys { profile, material: Zeroizing::new(material.to_vec()), client })
    }

    /// The master key and salt of what the DTLS client (`true`) or server sends.
    fn master(&self, of_client: bool) -> (&[u8], &[u8]) {
        let (k, s) = (self.profile.key_len(), self.profile.salt_len());
        let m = &self.material[..];
        if of_client {
            (&m[..k], &m[2 * k..2 * k + s])
        } else {
            (&m[k..2 * k], &m[2 * k + s..2 * k + 2 * s])
        }
    }

    /// What protects crossbar's RTP to the peer.
    pub fn sender(&self) -> Sender {
        let (key, salt) = self.master(self.client);
        Sender { cipher: Cipher::new(self.profile, key, salt) }
    }

    /// What checks and decrypts the peer's RTP.
    pub fn receiver(&self) -> Receiver {
        let (key, salt) = self.master(!self.client);
        Receiver { cipher: Cipher::new(self.profile, key, salt), streams: [None; STREAMS] }
    }

    pub fn profile(&self) -> Profile {
        self.profile
    }
}

/// The SRTP key derivation function (RFC 3711 §4.3, AES-CM PRF, key derivation
/// rate 0; as RFC 7714 uses it with a 96-bit salt and AES-256 master keys).
fn derive(master: &[u8], salt: &[u8], label: u8, out: &mut [u8]) {
    let mut x = [0u8; 16];
    x[..salt.len()].copy_from_slice(salt);
    x[7] ^= label;
    let encrypt = |block: &mut aes::Block| match master.len() {
        32 => Aes256::new(master.into()).encrypt_block(block),
        _ => Aes128::new(master.into()).encrypt_block(block),
    };
    for (i, chunk) in out.chunks_mut(16).enumerate() {
        let mut block = aes::Block::from(x);
        block[14..16].copy_from_slice(&(i as u16).to_be_bytes());
        encrypt(&mut block);
        chunk.copy_from_slice(&block[..chunk.len()]);
    }
}

const LABEL_RTP_KEY: u8 = 0;
const LABEL_RTP_AUTH: u8 = 1;
const LABEL_RTP_SALT: u8 = 2;

/// One direction's session keys, keyed once.
enum Cipher {
    Cm { aes: Box<Aes128>, auth: Box<Hmac<Sha1>>, salt: [u8; 14] },
    Gcm128 { aead: Box<Aes128Gcm>, salt: [u8; 12] },
    Gcm256 { aead: Box<Aes256Gcm>, salt: [u8; 12] },
}

impl Cipher {
    fn new(profile: Profile, master: &[u8], master_salt: &[u8]) -> Cipher {
        match profile {
            Profile::Aes128CmSha1_80 => {
                let mut key = Zeroizing::new([0u8; 16]);
                let mut auth = Zeroizing::new([0u8; 20]);
                let mut salt = [0u8; 14];
                derive(master, master_salt, LABEL_RTP_KEY, &mut key[..]);
                derive(master, master_salt, LABEL_RTP_AUTH, &mut auth[..]);
                derive(master, master_salt, LABEL_RTP_SALT, &mut salt);
                let auth = <Hmac<Sha1> as Mac>::new_from_slice(&auth[..]).expect("HMAC takes any key length");
                Cipher::Cm { aes: Box::new(Aes128::new((&*key).into())), auth: Box::new(auth), salt }
            }
            Profile::AeadAes128Gcm => {
                let (key, salt) = gcm_session::<16>(master, master_salt);
                Cipher::Gcm128 { aead: Box::new(Aes128Gcm::new((&*key).into())), salt }
            }
            Profile::AeadAes256Gcm => {
                let (key, salt) = gcm_session::<32>(master, master_salt);
                Cipher::Gcm256 { aead: Box::new(Aes256Gcm::new((&*key).into())), salt }
            }
        }
    }

    #[cfg(test)]
    fn from_session_keys(profile: Profile, key: &[u8], auth: &[u8], salt: &[u8]) -> Cipher {
        match profile {
            Profile::Aes128CmSha1_80 => Cipher::Cm { aes: Box::new(Aes128::new(key.into())), auth: Box::new(<Hmac<Sha1> as Mac>::new_from_slice(auth).unwrap()), salt: salt.try_into().unwrap() },
            Profile::AeadAes128Gcm => Cipher::Gcm128 { aead: Box::new(Aes128Gcm::new(key.into())), salt: salt.try_into().unwrap() },
            Profile::AeadAes256Gcm => Cipher::Gcm256 { aead: Box::new(Aes256Gcm::new(key.into())), salt: salt.try_into().unwrap() },
        }
    }

    fn tag_len(&self) -> usize {
        match self {
            Cipher::Cm { .. } => CM_TAG_LEN,
            _ => GCM_TAG_LEN,
        }
    }
}

/// An AEAD profile's RTP session key and salt (no authentication key: GCM has its tag).
fn gcm_session<const K: usize>(master: &[u8], master_salt: &[u8]) -> (Zeroizing<[u8; K]>, [u8; 12]) {
    let mut key = Zeroizing::new([0u8; K]);
    let mut salt = [0u8; 12];
    derive(master, master_salt, LABEL_RTP_KEY, &mut key[..]);
    derive(master, master_salt, LABEL_RTP_SALT, &mut salt);
    (key, salt)
}

/// AES-CM IV (RFC 3711 §4.1.1): salt ⊕ (SSRC · 2^64) ⊕ (index · 2^16).
fn cm_iv(salt: &[u8; 14], ssrc: u32, index: u64) -> aes::Block {
    let mut iv = [0u8; 16];
    iv[4..8].copy_from_slice(&ssrc.to_be_bytes());
    iv[8..14].copy_from_slice(&index.to_be_bytes()[2..8]);
    for (b, s) in iv.iter_mut().zip(salt) {
        *b ^= s;
    }
    aes::Block::from(iv)
}

/// AEAD IV (RFC 7714 §8.1): salt ⊕ (0 0 | SSRC | ROC | SEQ).
fn gcm_iv(salt: &[u8; 12], ssrc: u32, index: u64) -> [u8; 12] {
    let mut iv = [0u8; 12];
    iv[2..6].copy_from_slice(&ssrc.to_be_bytes());
    iv[6..12].copy_from_slice(&index.to_be_bytes()[2..8]);
    for (b, s) in iv.iter_mut().zip(salt) {
        *b ^= s;
    }
    iv
}

/// AES-128 in counter mode from `iv`, with the session key's schedule expanded once.
fn keystream(aes: &Aes128, iv: &aes::Block) -> ctr::Ctr128BE<Aes128> {
    ctr::Ctr128BE::<Aes128>::from_core(ctr::CtrCore::inner_iv_init(aes.clone(), iv))
}

fn hmac_tag(auth: &Hmac<Sha1>, authenticated: &[u8], roc: u32) -> [u8; CM_TAG_LEN] {
    let mut mac = auth.clone();
    mac.update(authenticated);
    mac.update(&roc.to_be_bytes());
    let full = mac.finalize().into_bytes();
    let mut tag = [0u8; CM_TAG_LEN];
    tag.copy_from_slice(&full[..CM_TAG_LEN]);
    tag
}

/// Protects the RTP crossbar sends to one peer.
pub struct Sender {
    cipher: Cipher,
}

impl Sender {
    /// `out[..hlen]` already holds the RTP header (SSRC `ssrc`); `payload` is
    /// encrypted after it and the tag appended. `index` is the packet's 48-bit
    /// SRTP index (rollover counter · 2^16 + sequence number). The SRTP
    /// packet's length, or `None` if `out` is too small.
    pub fn protect(&mut self, out: &mut [u8], hlen: usize, payload: &[u8], ssrc: u32, index: u64) -> Option<usize> {
        let n = hlen + payload.len();
        let total = n + self.cipher.tag_len();
        let buf = out.get_mut(..total)?;
        buf[hlen..n].copy_from_slice(payload);
        match &mut self.cipher {
            Cipher::Cm { aes, auth, salt } => {
                let mut ctr = keystream(aes, &cm_iv(salt, ssrc, index));
                ctr.apply_keystream(&mut buf[hlen..n]);
                let tag = hmac_tag(auth, &buf[..n], (index >> 16) as u32);
                buf[n..].copy_from_slice(&tag);
            }
            Cipher::Gcm128 { aead, salt } => seal(&**aead, &gcm_iv(salt, ssrc, index), buf, hlen, n)?,
            Cipher::Gcm256 { aead, salt } => seal(&**aead, &gcm_iv(salt, ssrc, index), buf, hlen, n)?,
        }
        Some(total)
    }
}

fn seal<A: AeadInPlace>(aead: &A, iv: &[u8; 12], buf: &mut [u8], hlen: usize, n: usize) -> Option<()> {
    let (head, rest) = buf.split_at_mut(hlen);
    let (body, tag_out) = rest.split_at_mut(n - hlen);
    let tag = aead.encrypt_in_place_detached(Nonce::from_slice(iv), head, body).ok()?;
    tag_out.copy_from_slice(&tag);
    Some(())
}

fn open<A: AeadInPlace>(aead: &A, iv: &[u8; 12], buf: &mut [u8], hlen: usize, tag: &[u8]) -> bool {
    let (head, body) = buf.split_at_mut(hlen);
    aead.decrypt_in_place_detached(Nonce::from_slice(iv), head, body, Tag::from_slice(tag)).is_ok()
}

/// The receive state of one of the peer's streams (SSRCs).
#[derive(Debug, Clone, Copy)]
struct Stream {
    ssrc: u32,
    /// Highest authenticated packet index.
    highest: u64,
    /// Bit i: packet `highest - i` was received.
    window: u64,
}

const REPLAY_WINDOW: u64 = 64;

/// SSRCs whose replay state is kept. A browser changes its SSRC now and then
/// (renegotiation, a new track): the streams it left keep their windows, so
/// their packets, captured and replayed, are still refused. Beyond this many,
/// the least recently used stream is forgotten.
const STREAMS: usize = 4;

/// Why a packet from the peer was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Not an RTP packet, or shorter than its header and tag.
    Malformed,
    /// The authentication tag does not match.
    Unauthentic,
    /// Received before, or older than the replay window.
    Replayed,
}

/// Checks and decrypts the peer's RTP.
pub struct Receiver {
    cipher: Cipher,
    /// Most recently used first.
    streams: [Option<Stream>; STREAMS],
}

impl Receiver {
    /// Authenticates and decrypts one SRTP packet into `out` (at least as long
    /// as `pkt`): the plain RTP packet's length there (header as received,
    /// decrypted payload, padding left in place).
    pub fn unprotect(&mut self, pkt: &[u8], out: &mut [u8]) -> Result<usize, Refused> {
        let hlen = rtp_header_len(pkt).ok_or(Refused::Malformed)?;
        let tag_len = self.cipher.tag_len();
        if pkt.len() < hlen + tag_len {
            return Err(Refused::Malformed);
        }
        let n = pkt.len() - tag_len;
        let buf = out.get_mut(..n).ok_or(Refused::Malformed)?;
        let ssrc = u32::from_be_bytes([pkt[8], pkt[9], pkt[10], pkt[11]]);
        let seq = u16::from_be_bytes([pkt[2], pkt[3]]);
        let pos = self.streams.iter().position(|s| s.is_some_and(|s| s.ssrc == ssrc));
        let stream = pos.and_then(|p| self.streams[p]);
        let index = match stream {
            Some(s) => estimate_index(s.highest, seq).ok_or(Refused::Replayed)?,
            None => seq as u64,
        };
        if let Some(s) = stream {
            if index <= s.highest {
                let age = s.highest - index;
                if age >= REPLAY_WINDOW || s.window & (1 << age) != 0 {
                    return Err(Refused::Replayed);
                }
            }
        }
        let tag = &pkt[n..];
        match &mut self.cipher {
            Cipher::Cm { aes, auth, salt } => {
                let expected = hmac_tag(auth, &pkt[..n], (index >> 16) as u32);
                if !bool::from(expected.ct_eq(tag)) {
                    return Err(Refused::Unauthentic);
                }
                buf.copy_from_slice(&pkt[..n]);
                let mut ctr = keystream(aes, &cm_iv(salt, ssrc, index));
                ctr.apply_keystream(&mut buf[hlen..]);
            }
            Cipher::Gcm128 { aead, salt } => {
                buf.copy_from_slice(&pkt[..n]);
                if !open(&**aead, &gcm_iv(salt, ssrc, index), buf, hlen, tag) {
                    return Err(Refused::Unauthentic);
                }
            }
            Cipher::Gcm256 { aead, salt } => {
                buf.copy_from_slice(&pkt[..n]);
                if !open(&**aead, &gcm_iv(salt, ssrc, index), buf, hlen, tag) {
                    return Err(Refused::Unauthentic);
                }
            }
        }
        let updated = match stream {
            Some(s) if index > s.highest => {
                let shift = index - s.highest;
                Stream { ssrc, highest: index, window: if shift >= REPLAY_WINDOW { 1 } else { (s.window << shift) | 1 } }
            }
            Some(s) => Stream { window: s.window | (1 << (s.highest - index)), ..s },
            None => Stream { ssrc, highest: index, window: 1 },
        };
        // To the front; a new stream pushes the least recently used one out.
        let end = pos.unwrap_or(STREAMS - 1);
        self.streams.copy_within(0..end, 1);
        self.streams[0] = Some(updated);
        Ok(n)
    }
}

/// RFC 3711 Appendix A: the index of `seq`, given the highest index so far
/// (its rollover counter and sequence number). `None` for a packet from
/// before the first rollover counter (index below 0).
fn estimate_index(highest: u64, seq: u16) -> Option<u64> {
    let roc = (highest >> 16) as i64;
    let s_l = (highest & 0xffff) as i64;
    let seq = seq as i64;
    let v = if s_l < 32768 {
        if seq - s_l > 32768 {
            roc - 1
        } else {
            roc
        }
    } else if s_l - 32768 > seq {
        roc + 1
    } else {
        roc
    };
    (v >= 0).then_some(((v as u64) << 16) | seq as u64)
}

/// Length of an RTP header with its CSRCs and extension; `None` if `pkt` is
/// not RTP version 2 or shorter than its header.
pub fn rtp_header_len(pkt: &[u8]) -> Option<usize> {
    if pkt.len() < 12 || pkt[0] >> 6 != 2 {
        return None;
    }
    let mut len = 12 + 4 * (pkt[0] & 0x0f) as usize;
    if pkt[0] & 0x10 != 0 {
        let words = pkt.get(len + 2..len + 4)?;
        len += 4 + 4 * u16::from_be_bytes([words[0], words[1]]) as usize;
    }
    (len <= pkt.len()).then_some(len)
}

/// Where str0m's DTLS leaves the keying material of one leg.
#[derive(Default)]
pub struct KeySlot(Mutex<Option<Keys>>);

impl KeySlot {
    pub fn take(&self) -> Option<Keys> {
        self.0.lock().take()
    }
}

thread_local! {
    /// The slot the next DTLS instance built on this thread reports to.
    static NEXT_SLOT: RefCell<Option<Arc<KeySlot>>> = const { RefCell::new(None) };
}

/// Builds `cfg`'s `Rtc` with crossbar's DTLS provider: its DTLS-SRTP keys
/// also go to the returned slot. The slot is `None` if str0m did not build
/// its DTLS through the provider (its RTP then stays with str0m).
pub fn build_rtc(cfg: RtcConfig, now: Instant) -> (Rtc, Option<Arc<KeySlot>>) {
    let slot = Arc::new(KeySlot::default());
    NEXT_SLOT.with(|n| *n.borrow_mut() = Some(slot.clone()));
    let rtc = cfg.set_crypto_provider(provider()).build(now);
    let claimed = NEXT_SLOT.with(|n| n.borrow_mut().take()).is_none();
    (rtc, claimed.then_some(slot))
}

/// str0m's own (RustCrypto) provider, with crossbar's DTLS wrapper.
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    static DTLS: KeyCapturingDtls = KeyCapturingDtls;
    PROVIDER
        .get_or_init(|| {
            let mut p = str0m::crypto::from_feature_flags();
            p.dtls_provider = &DTLS;
            Arc::new(p)
        })
        .clone()
}

fn inner_dtls() -> &'static dyn DtlsProvider {
    static INNER: OnceLock<&'static dyn DtlsProvider> = OnceLock::new();
    *INNER.get_or_init(|| str0m::crypto::from_feature_flags().dtls_provider)
}

#[derive(Debug)]
struct KeyCapturingDtls;

impl DtlsProvider for KeyCapturingDtls {
    fn generate_certificate(&self) -> Option<DtlsCert> {
        inner_dtls().generate_certificate()
    }

    fn new_dtls(&self, cert: &DtlsCert, now: Instant, version: DtlsVersion, mtu: Option<usize>) -> Result<Box<dyn DtlsInstance>, CryptoError> {
        let inner = inner_dtls().new_dtls(cert, now, version, mtu)?;
        Ok(match NEXT_SLOT.with(|n| n.borrow_mut().take()) {
            Some(slot) => Box::new(KeyCapturing { inner, slot }),
            None => inner,
        })
    }

    fn is_test(&self) -> bool {
        inner_dtls().is_test()
    }
}

struct KeyCapturing {
    inner: Box<dyn DtlsInstance>,
    slot: Arc<KeySlot>,
}

impl std::fmt::Debug for KeyCapturing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyCapturing")
    }
}

impl DtlsInstance for KeyCapturing {
    fn set_active(&mut self, active: bool) {
        self.inner.set_active(active)
    }

    fn handle_packet(&mut self, packet: &[u8]) -> Result<(), DtlsImplError> {
        self.inner.handle_packet(packet)
    }

    fn poll_output<'a>(&mut self, buf: &'a mut [u8]) -> DtlsOutput<'a> {
        let out = self.inner.poll_output(buf);
        if let DtlsOutput::KeyingMaterial(km, profile) = &out {
            let profile = match profile {
                SrtpProfile::AES128_CM_SHA1_80 => Some(Profile::Aes128CmSha1_80),
                SrtpProfile::AEAD_AES_128_GCM => Some(Profile::AeadAes128Gcm),
                SrtpProfile::AEAD_AES_256_GCM => Some(Profile::AeadAes256Gcm),
                #[allow(unreachable_patterns)]
                _ => None,
            };
            let keys = profile.and_then(|p| Keys::new(p, km, self.inner.is_active()));
            if keys.is_none() {
                tracing::warn!(?profile, "DTLS-SRTP keying material crossbar cannot use: this leg's RTP stays with str0m");
            }
            *self.slot.0.lock() = keys;
        }
        out
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), DtlsImplError> {
        self.inner.handle_timeout(now)
    }

    fn send_application_data(&mut self, data: &[u8]) -> Result<(), DtlsImplError> {
        self.inner.send_application_data(data)
    }

    fn is_active(&self) -> bool {
        self.inner.is_active()
    }

    fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.inner.protocol_version()
    }

    fn is_closing(&self) -> bool {
        self.inner.is_closing()
    }

    fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }

    fn close(&mut self) -> Result<(), DtlsImplError> {
        self.inner.close()
    }
}

#[cfg(test)]
mod tests;
