//! Digest authentication for the registrar and, client side, for trunks:
//! RFC 2617 and RFC 7616 digest with `qop=auth` (or without qop, RFC 2069
//! style), MD5 and SHA-256 (RFC 8760 brings SHA-256 to SIP).
//!
//! Nonces are stateless: a nonce carries its own issue time and a MAC over
//! (time, salt, realm) under a node-wide [`NonceSecret`], so any node that
//! shares the secret can check it and nothing is stored per challenge. The
//! price is that a nonce can be replayed until it goes stale; nonce-count
//! tracking, if ever wanted, needs state and lives above this module.
//!
//! What [`verify`] does not check, and the registrar must: that
//! `creds.realm` is the tenant's realm, that [`NonceSecret::check_nonce`]
//! accepts `creds.nonce` for that realm, and that `creds.uri` is the
//! request's Request-URI (RFC 2617 §3.2.2.5).

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use md5::Md5;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Refuse header values longer than this: no legitimate digest header is
/// near it, and it bounds the work done on hostile input.
const MAX_HEADER_LEN: usize = 8 * 1024;

/// How far in the future a nonce's timestamp may be: another node of the
/// cluster with a slightly fast clock may have issued it.
const MAX_CLOCK_SKEW: Duration = Duration::from_secs(30);

/// Errors of the digest module.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The header uses another scheme (Basic, Bearer, …) or none.
    #[error("not a Digest header")]
    NotDigest,
    /// The parameter list does not parse.
    #[error("malformed digest header: {0}")]
    Malformed(&'static str),
    /// A parameter the digest computation needs is absent.
    #[error("digest header lacks the {0} parameter")]
    MissingParam(&'static str),
    /// A parameter appears twice; RFC 7616 §3.4 forbids it and accepting
    /// either copy would let a middlebox choose what we verify.
    #[error("digest parameter {0} appears more than once")]
    DuplicateParam(String),
    /// An algorithm other than MD5 and SHA-256 (e.g. the -sess variants).
    #[error("unsupported digest algorithm {0:?}")]
    UnsupportedAlgorithm(String),
    /// A challenge that offers no `qop=auth` (e.g. only `auth-int`).
    #[error("unsupported qop {0:?}")]
    UnsupportedQop(String),
}

/// Digest hash algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DigestAlgorithm {
    /// RFC 2617; what an absent `algorithm` parameter means.
    Md5,
    /// RFC 7616 / RFC 8760.
    Sha256,
}

impl DigestAlgorithm {
    /// The token used on the wire.
    pub fn as_str(&self) -> &'static str {
        match self {
            DigestAlgorithm::Md5 => "MD5",
            DigestAlgorithm::Sha256 => "SHA-256",
        }
    }

    /// Parse an `algorithm` value, case-insensitively. "SHA256" is accepted
    /// because some SIP stacks send it.
    pub fn parse(value: &str) -> Result<Self, AuthError> {
        let value = value.trim();
        if value.eq_ignore_ascii_case("MD5") {
            Ok(DigestAlgorithm::Md5)
        } else if value.eq_ignore_ascii_case("SHA-256") || value.eq_ignore_ascii_case("SHA256") {
            Ok(DigestAlgorithm::Sha256)
        } else {
            Err(AuthError::UnsupportedAlgorithm(value.to_string()))
        }
    }

    /// Lowercase hex digest of `data`.
    fn hex(&self, data: &str) -> String {
        match self {
            DigestAlgorithm::Md5 => hex::encode(Md5::digest(data.as_bytes())),
            DigestAlgorithm::Sha256 => hex::encode(Sha256::digest(data.as_bytes())),
        }
    }
}

impl std::fmt::Display for DigestAlgorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Result of [`NonceSecret::check_nonce`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceCheck {
    /// Ours, for this realm, and young enough.
    Valid,
    /// Ours and for this realm, but too old: challenge again with
    /// `stale=true` so the client retries without asking the user.
    Stale,
    /// Not issued by us, for another realm, tampered with, or malformed.
    Invalid,
}

/// Node-wide (or cluster-wide) key that makes nonces stateless. Never
/// printed.
#[derive(Clone)]
pub struct NonceSecret([u8; 32]);

impl std::fmt::Debug for NonceSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NonceSecret(..)")
    }
}

impl NonceSecret {
    /// A fresh random key from the OS.
    pub fn generate() -> Self {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        Self(key)
    }

    /// A key shared by the nodes of a cluster, so each can check the others'
    /// nonces.
    pub fn from_bytes(key: [u8; 32]) -> Self {
        Self(key)
    }

    /// A stateless nonce for `realm`: 64 hex digits, the issue time in
    /// seconds (16), a random salt so no two nonces are equal (16), and the
    /// first 128 bits of HMAC-SHA-256(secret, time ‖ salt ‖ realm) (32).
    pub fn nonce(&self, realm: &str, now: SystemTime) -> String {
        let mut salt = [0u8; 8];
        rand::thread_rng().fill_bytes(&mut salt);
        self.nonce_with_salt(realm, unix_secs(now), salt)
    }

    fn nonce_with_salt(&self, realm: &str, issued: u64, salt: [u8; 8]) -> String {
        let mac = self.mac(issued, &salt, realm);
        let mut nonce = String::with_capacity(64);
        nonce.push_str(&hex::encode(issued.to_be_bytes()));
        nonce.push_str(&hex::encode(salt));
        nonce.push_str(&hex::encode(&mac[..16]));
        nonce
    }

    /// HMAC-SHA-256 under this secret for another purpose than nonces. `purpose`
    /// (e.g. `"softphone-sip-password"`) separates the domains: a MAC made for one
    /// purpose never verifies for another, nor as a nonce (nonce MACs start with 8 time bytes,
    /// these with the purpose and a 0 byte).
    pub fn sign(&self, purpose: &str, msg: &[u8]) -> [u8; 32] {
        let mut m = Vec::with_capacity(purpose.len() + 1 + msg.len());
        m.extend_from_slice(purpose.as_bytes());
        m.push(0);
        m.extend_from_slice(msg);
        hmac_sha256(&self.0, &m)
    }

    fn mac(&self, issued: u64, salt: &[u8; 8], realm: &str) -> [u8; 32] {
        let mut msg = Vec::with_capacity(16 + realm.len());
        msg.extend_from_slice(&issued.to_be_bytes());
        msg.extend_from_slice(salt);
        msg.extend_from_slice(realm.as_bytes());
        hmac_sha256(&self.0, &msg)
    }

    /// Check a nonce a client sent back: issued by this secret for `realm`,
    /// and at most `max_age` old.
    pub fn check_nonce(
        &self,
        nonce: &str,
        realm: &str,
        now: SystemTime,
        max_age: Duration,
    ) -> NonceCheck {
        let Some(raw) = (nonce.len() == 64)
            .then(|| hex::decode(nonce).ok())
            .flatten()
        else {
            return NonceCheck::Invalid;
        };
        let (Ok(issued), Ok(salt)) = (
            <[u8; 8]>::try_from(&raw[..8]),
            <[u8; 8]>::try_from(&raw[8..16]),
        ) else {
            return NonceCheck::Invalid;
        };
        let issued = u64::from_be_bytes(issued);
        let mac = self.mac(issued, &salt, realm);
        if !constant_time_eq(&mac[..16], &raw[16..]) {
            return NonceCheck::Invalid;
        }
        let now = unix_secs(now);
        if issued > now.saturating_add(MAX_CLOCK_SKEW.as_secs()) {
            return NonceCheck::Invalid;
        }
        if Duration::from_secs(now.saturating_sub(issued)) > max_age {
            NonceCheck::Stale
        } else {
            NonceCheck::Valid
        }
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// RFC 2104 HMAC over SHA-256, written out to avoid a dependency for ten
/// lines.
fn hmac_sha256(key: &[u8; 32], msg: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut ipad = [0x36u8; BLOCK];
    let mut opad = [0x5cu8; BLOCK];
    for ((i, o), k) in ipad.iter_mut().zip(opad.iter_mut()).zip(key.iter()) {
        *i ^= k;
        *o ^= k;
    }
    let inner = Sha256::new()
        .chain_update(ipad)
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(opad)
        .chain_update(inner)
        .finalize()
        .into()
}

/// Compare without an early exit, so the time taken does not tell an
/// attacker how many leading bytes of a guess were right. Lengths are public.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Quote a value as a quoted-string. Control characters are dropped so a
/// realm or username cannot break the header line.
fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars().filter(|c| !c.is_control()) {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// The `WWW-Authenticate` (registrar) or `Proxy-Authenticate` values to send
/// with a 401/407: one per algorithm, SHA-256 first so that clients that know
/// it pick it (RFC 7616 §3.7, RFC 8760 §2.4), MD5 for the rest; `qop="auth"`;
/// `stale=true` when the client's nonce was only too old.
pub fn challenges(realm: &str, nonce: &str, stale: bool) -> Vec<String> {
    [DigestAlgorithm::Sha256, DigestAlgorithm::Md5]
        .into_iter()
        .map(|algorithm| {
            let mut value = format!(
                "Digest realm={}, nonce={}, algorithm={}, qop=\"auth\"",
                quote(realm),
                quote(nonce),
                algorithm
            );
            if stale {
                value.push_str(", stale=true");
            }
            value
        })
        .collect()
}

/// A parsed `Authorization` / `Proxy-Authorization` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub realm: String,
    pub nonce: String,
    /// The digest-uri the client hashed; should equal the Request-URI.
    pub uri: String,
    /// Hex digest, as sent.
    pub response: String,
    /// [`DigestAlgorithm::Md5`] when the parameter is absent.
    pub algorithm: DigestAlgorithm,
    /// As sent (`auth` is the only value [`verify`] accepts).
    pub qop: Option<String>,
    /// Nonce count, as sent (8 hex digits); present whenever qop is.
    pub nc: Option<String>,
    /// Present whenever qop is.
    pub cnonce: Option<String>,
    pub opaque: Option<String>,
}

/// Parse an `Authorization` / `Proxy-Authorization` header value
/// (`Digest username="…", …`). Names are case-insensitive, quoted strings may
/// hold commas and escapes, unknown parameters are ignored; anything that
/// does not parse is an error.
pub fn parse_credentials(header_value: &str) -> Result<Credentials, AuthError> {
    let params = parse_digest(header_value)?;
    let mut slots: [Option<String>; 10] = Default::default();
    const NAMES: [&str; 10] = [
        "username",
        "realm",
        "nonce",
        "uri",
        "response",
        "algorithm",
        "qop",
        "nc",
        "cnonce",
        "opaque",
    ];
    for (name, value) in params {
        if let Some(i) = NAMES.iter().position(|n| *n == name) {
            if slots[i].replace(value).is_some() {
                return Err(AuthError::DuplicateParam(name));
            }
        }
    }
    let [username, realm, nonce, uri, response, algorithm, qop, nc, cnonce, opaque] = slots;
    let algorithm = match algorithm {
        Some(a) => DigestAlgorithm::parse(&a)?,
        None => DigestAlgorithm::Md5,
    };
    if qop.is_some() {
        if nc.is_none() {
            return Err(AuthError::MissingParam("nc"));
        }
        if cnonce.is_none() {
            return Err(AuthError::MissingParam("cnonce"));
        }
    }
    Ok(Credentials {
        username: username.ok_or(AuthError::MissingParam("username"))?,
        realm: realm.ok_or(AuthError::MissingParam("realm"))?,
        nonce: nonce.ok_or(AuthError::MissingParam("nonce"))?,
        uri: uri.ok_or(AuthError::MissingParam("uri"))?,
        response: response.ok_or(AuthError::MissingParam("response"))?,
        algorithm,
        qop,
        nc,
        cnonce,
        opaque,
    })
}

/// Check `creds` against the plaintext password for a request with `method`
/// (RFC 2617 §3.2.2.1, with `qop=auth` or without qop). The comparison is
/// constant time. Realm, nonce freshness and digest-uri are the caller's to
/// check (see the module docs).
pub fn verify(creds: &Credentials, method: &str, password: &str) -> bool {
    let qop = match creds.qop.as_deref() {
        None => None,
        Some(qop) if qop.eq_ignore_ascii_case("auth") => {
            match (creds.nc.as_deref(), creds.cnonce.as_deref()) {
                (Some(nc), Some(cnonce)) => Some(QopAuth { qop, nc, cnonce }),
                _ => return false,
            }
        }
        // auth-int would need the body; we never offer it.
        Some(_) => return false,
    };
    let expected = digest_response(
        creds.algorithm,
        &creds.username,
        &creds.realm,
        password,
        method,
        &creds.uri,
        &creds.nonce,
        qop,
    );
    let given = creds.response.trim().to_ascii_lowercase();
    constant_time_eq(expected.as_bytes(), given.as_bytes())
}

/// The `qop=auth` inputs of the response computation.
#[derive(Debug, Clone, Copy)]
struct QopAuth<'a> {
    qop: &'a str,
    nc: &'a str,
    cnonce: &'a str,
}

/// RFC 2617 §3.2.2.1 / RFC 7616 §3.4.1 request-digest.
#[allow(clippy::too_many_arguments)]
fn digest_response(
    algorithm: DigestAlgorithm,
    username: &str,
    realm: &str,
    password: &str,
    method: &str,
    uri: &str,
    nonce: &str,
    qop: Option<QopAuth<'_>>,
) -> String {
    let ha1 = algorithm.hex(&format!("{username}:{realm}:{password}"));
    let ha2 = algorithm.hex(&format!("{method}:{uri}"));
    match qop {
        Some(QopAuth { qop, nc, cnonce }) => {
            algorithm.hex(&format!("{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}"))
        }
        None => algorithm.hex(&format!("{ha1}:{nonce}:{ha2}")),
    }
}

/// Build an `Authorization` (or `Proxy-Authorization`) value answering a
/// `WWW-Authenticate` / `Proxy-Authenticate` challenge value, with a random
/// cnonce and nonce count 1.
pub fn respond(
    challenge_value: &str,
    method: &str,
    uri: &str,
    username: &str,
    password: &str,
) -> Result<String, AuthError> {
    let mut cnonce = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut cnonce);
    respond_with_cnonce(
        challenge_value,
        method,
        uri,
        username,
        password,
        &hex::encode(cnonce),
        1,
    )
}

/// [`respond`] with a chosen cnonce and nonce count: for reusing a nonce
/// (count 2, 3, …) and for reproducible tests.
pub fn respond_with_cnonce(
    challenge_value: &str,
    method: &str,
    uri: &str,
    username: &str,
    password: &str,
    cnonce: &str,
    nc: u32,
) -> Result<String, AuthError> {
    let mut realm = None;
    let mut nonce = None;
    let mut algorithm = None;
    let mut qop_options = None;
    let mut opaque = None;
    for (name, value) in parse_digest(challenge_value)? {
        let slot = match name.as_str() {
            "realm" => &mut realm,
            "nonce" => &mut nonce,
            "algorithm" => &mut algorithm,
            "qop" => &mut qop_options,
            "opaque" => &mut opaque,
            _ => continue,
        };
        if slot.replace(value).is_some() {
            return Err(AuthError::DuplicateParam(name));
        }
    }
    let realm = realm.ok_or(AuthError::MissingParam("realm"))?;
    let nonce = nonce.ok_or(AuthError::MissingParam("nonce"))?;
    let algorithm = match algorithm {
        Some(a) => DigestAlgorithm::parse(&a)?,
        None => DigestAlgorithm::Md5,
    };
    // qop in a challenge is a quoted, comma-separated list of options.
    let use_qop = match &qop_options {
        None => false,
        Some(options)
            if options
                .split(',')
                .any(|o| o.trim().eq_ignore_ascii_case("auth")) =>
        {
            true
        }
        Some(options) => return Err(AuthError::UnsupportedQop(options.clone())),
    };
    let nc = format!("{nc:08x}");
    let qop = use_qop.then_some(QopAuth {
        qop: "auth",
        nc: &nc,
        cnonce,
    });
    let response = digest_response(
        algorithm, username, &realm, password, method, uri, &nonce, qop,
    );
    let mut value = format!(
        "Digest username={}, realm={}, nonce={}, uri={}, response=\"{}\", algorithm={}",
        quote(username),
        quote(&realm),
        quote(&nonce),
        quote(uri),
        response,
        algorithm
    );
    if use_qop {
        let _ = write!(value, ", qop=auth, nc={nc}, cnonce={}", quote(cnonce));
    }
    if let Some(opaque) = opaque {
        let _ = write!(value, ", opaque={}", quote(&opaque));
    }
    Ok(value)
}

/// Split `Digest a=b, c="d, e"` into lowercase names and unquoted values.
fn parse_digest(header_value: &str) -> Result<Vec<(String, String)>, AuthError> {
    if header_value.len() > MAX_HEADER_LEN {
        return Err(AuthError::Malformed("header value too long"));
    }
    let value = header_value.trim_start();
    let scheme_end = value
        .find(|c: char| c.is_whitespace())
        .unwrap_or(value.len());
    if !value[..scheme_end].eq_ignore_ascii_case("Digest") {
        return Err(AuthError::NotDigest);
    }
    let params = parse_auth_params(&value[scheme_end..])?;
    if params.is_empty() {
        return Err(AuthError::Malformed("no parameters"));
    }
    Ok(params)
}

/// RFC 7235 `auth-param *( OWS "," OWS auth-param )`, tolerating empty list
/// elements (`a=b,,c=d`) as RFC 7230 §7 asks.
fn parse_auth_params(input: &str) -> Result<Vec<(String, String)>, AuthError> {
    let mut params = Vec::new();
    let mut rest = input;
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ',');
        if rest.is_empty() {
            return Ok(params);
        }
        let name_end = rest
            .find(|c: char| c == '=' || c == ',' || c == '"' || c.is_whitespace())
            .unwrap_or(rest.len());
        let name = &rest[..name_end];
        if name.is_empty() {
            return Err(AuthError::Malformed("expected a parameter name"));
        }
        rest = rest[name_end..].trim_start();
        rest = rest
            .strip_prefix('=')
            .ok_or(AuthError::Malformed("expected '=' after a parameter name"))?
            .trim_start();
        let value;
        if let Some(quoted) = rest.strip_prefix('"') {
            let (unquoted, after) = read_quoted(quoted)?;
            value = unquoted;
            rest = after;
        } else {
            let end = rest
                .find(|c: char| c == ',' || c.is_whitespace())
                .unwrap_or(rest.len());
            value = rest[..end].to_string();
            if value.contains('"') {
                return Err(AuthError::Malformed("stray quote in a token"));
            }
            rest = &rest[end..];
        }
        rest = rest.trim_start();
        if !(rest.is_empty() || rest.starts_with(',')) {
            return Err(AuthError::Malformed("expected ',' between parameters"));
        }
        params.push((name.to_ascii_lowercase(), value));
    }
}

/// Read a quoted-string body (after the opening quote): returns the
/// unescaped content and what follows the closing quote.
fn read_quoted(input: &str) -> Result<(String, &str), AuthError> {
    let mut out = String::new();
    let mut chars = input.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((out, &input[i + 1..])),
            '\\' => match chars.next() {
                Some((_, escaped)) => out.push(escaped),
                None => break,
            },
            _ => out.push(c),
        }
    }
    Err(AuthError::Malformed("unterminated quoted string"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC2617_AUTHORIZATION: &str = r#"Digest username="Mufasa",
                 realm="testrealm@host.com",
                 nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",
                 uri="/dir/index.html",
                 qop=auth,
                 nc=00000001,
                 cnonce="0a4f113b",
                 response="6629fae49393a05397450978507c4ef1",
                 opaque="5ccc069c403ebaf9f0171e9517f40e41""#;

    #[test]
    fn rfc2617_section_3_5_example() {
        let creds = parse_credentials(RFC2617_AUTHORIZATION).unwrap();
        assert_eq!(creds.username, "Mufasa");
        assert_eq!(creds.realm, "testrealm@host.com");
        assert_eq!(creds.uri, "/dir/index.html");
        assert_eq!(creds.algorithm, DigestAlgorithm::Md5);
        assert_eq!(creds.qop.as_deref(), Some("auth"));
        assert_eq!(creds.nc.as_deref(), Some("00000001"));
        assert_eq!(
            creds.opaque.as_deref(),
            Some("5ccc069c403ebaf9f0171e9517f40e41")
        );
        assert!(verify(&creds, "GET", "Circle Of Life"));
        assert!(!verify(&creds, "GET", "circle of life"));
        assert!(!verify(&creds, "POST", "Circle Of Life"));

        // And the client side reproduces the same response.
        let challenge = r#"Digest
                 realm="testrealm@host.com",
                 qop="auth,auth-int",
                 nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",
                 opaque="5ccc069c403ebaf9f0171e9517f40e41""#;
        let value = respond_with_cnonce(
            challenge,
            "GET",
            "/dir/index.html",
            "Mufasa",
            "Circle Of Life",
            "0a4f113b",
            1,
        )
        .unwrap();
        assert!(
            value.contains(r#"response="6629fae49393a05397450978507c4ef1""#),
            "{value}"
        );
        assert!(value.contains(r#"opaque="5ccc069c403ebaf9f0171e9517f40e41""#));
        assert_eq!(parse_credentials(&value).unwrap().response, creds.response);
    }

    #[test]
    fn rfc7616_section_3_9_1_examples() {
        let challenge = |algorithm: &str| {
            format!(
                r#"Digest
       realm="http-auth@example.org",
       qop="auth, auth-int",
       algorithm={algorithm},
       nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
       opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS""#
            )
        };
        let cnonce = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ";
        for (algorithm, expected) in [
            (
                "SHA-256",
                "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1",
            ),
            ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
        ] {
            let value = respond_with_cnonce(
                &challenge(algorithm),
                "GET",
                "/dir/index.html",
                "Mufasa",
                "Circle of Life",
                cnonce,
                1,
            )
            .unwrap();
            let creds = parse_credentials(&value).unwrap();
            assert_eq!(creds.response, expected, "{algorithm}");
            assert!(verify(&creds, "GET", "Circle of Life"));
        }

        let authorization = r#"Digest username="Mufasa",
       realm="http-auth@example.org",
       uri="/dir/index.html",
       algorithm=SHA-256,
       nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
       nc=00000001,
       cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
       qop=auth,
       response="753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1",
       opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS""#;
        let creds = parse_credentials(authorization).unwrap();
        assert_eq!(creds.algorithm, DigestAlgorithm::Sha256);
        assert!(verify(&creds, "GET", "Circle of Life"));
        assert!(!verify(&creds, "GET", "Circle Of Life"));
    }

    #[test]
    fn round_trip_through_our_own_challenges() {
        let secret = NonceSecret::generate();
        let now = SystemTime::now();
        let realm = "acme.crossbar.example";
        let nonce = secret.nonce(realm, now);
        let offered = challenges(realm, &nonce, false);
        assert_eq!(offered.len(), 2);
        assert!(offered[0].contains("algorithm=SHA-256"));
        assert!(offered[1].contains("algorithm=MD5"));
        for (challenge, algorithm) in offered
            .iter()
            .zip([DigestAlgorithm::Sha256, DigestAlgorithm::Md5])
        {
            let value = respond(
                challenge,
                "REGISTER",
                "sip:acme.crossbar.example",
                "alice",
                "s3cret \"quoted\"",
            )
            .unwrap();
            let creds = parse_credentials(&value).unwrap();
            assert_eq!(creds.algorithm, algorithm);
            assert_eq!(creds.realm, realm);
            assert_eq!(creds.uri, "sip:acme.crossbar.example");
            assert_eq!(
                secret.check_nonce(&creds.nonce, realm, now, Duration::from_secs(300)),
                NonceCheck::Valid
            );
            assert!(verify(&creds, "REGISTER", "s3cret \"quoted\""));
            assert!(!verify(&creds, "REGISTER", "s3cret"), "wrong password");
            assert!(
                !verify(&creds, "INVITE", "s3cret \"quoted\""),
                "wrong method"
            );
        }
    }

    #[test]
    fn challenge_without_qop_uses_rfc2069_digest() {
        let challenge = r#"Digest realm="r", nonce="n""#;
        let value = respond(challenge, "REGISTER", "sip:r", "bob", "pw").unwrap();
        assert!(!value.contains("qop"));
        let creds = parse_credentials(&value).unwrap();
        assert_eq!(creds.qop, None);
        assert!(verify(&creds, "REGISTER", "pw"));
        assert!(!verify(&creds, "REGISTER", "px"));
    }

    #[test]
    fn wrong_realm_is_detectable() {
        let secret = NonceSecret::generate();
        let now = SystemTime::now();
        let nonce = secret.nonce("tenant-a", now);
        // A client answering as if the realm were another tenant's: the hash
        // is self-consistent, so the registrar must compare the realm…
        let challenge = &challenges("tenant-b", &nonce, false)[0];
        let creds =
            parse_credentials(&respond(challenge, "REGISTER", "sip:a", "u", "p").unwrap()).unwrap();
        assert_ne!(creds.realm, "tenant-a");
        // …and the nonce is bound to the realm it was issued for.
        let max_age = Duration::from_secs(300);
        assert_eq!(
            secret.check_nonce(&nonce, "tenant-b", now, max_age),
            NonceCheck::Invalid
        );
        assert_eq!(
            secret.check_nonce(&nonce, "tenant-a", now, max_age),
            NonceCheck::Valid
        );
        // A password hashed under another realm does not verify.
        let mut moved = creds.clone();
        moved.realm = "tenant-a".into();
        assert!(!verify(&moved, "REGISTER", "p"));
    }

    #[test]
    fn nonce_ageing_and_tampering() {
        let secret = NonceSecret::generate();
        let t0 = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let max_age = Duration::from_secs(300);
        let nonce = secret.nonce("r", t0);
        assert_eq!(nonce.len(), 64);
        assert_ne!(nonce, secret.nonce("r", t0), "salted");
        assert_eq!(
            secret.check_nonce(&nonce, "r", t0 + max_age, max_age),
            NonceCheck::Valid
        );
        assert_eq!(
            secret.check_nonce(&nonce, "r", t0 + max_age + Duration::from_secs(1), max_age),
            NonceCheck::Stale
        );
        // Issued by another node with a slightly fast clock: fine; far in the future: forged.
        assert_eq!(
            secret.check_nonce(&nonce, "r", t0 - Duration::from_secs(10), max_age),
            NonceCheck::Valid
        );
        assert_eq!(
            secret.check_nonce(&nonce, "r", t0 - Duration::from_secs(3600), max_age),
            NonceCheck::Invalid
        );
        // Another secret, an edited timestamp, garbage.
        assert_eq!(
            NonceSecret::generate().check_nonce(&nonce, "r", t0, max_age),
            NonceCheck::Invalid
        );
        let mut younger = nonce.clone().into_bytes();
        younger[15] = if younger[15] == b'f' { b'e' } else { b'f' };
        let younger = String::from_utf8(younger).unwrap();
        assert_eq!(
            secret.check_nonce(&younger, "r", t0, max_age),
            NonceCheck::Invalid
        );
        for junk in [
            "",
            "zz",
            &"g".repeat(64),
            &nonce[..63],
            "é".repeat(32).as_str(),
        ] {
            assert_eq!(
                secret.check_nonce(junk, "r", t0, max_age),
                NonceCheck::Invalid,
                "{junk:?}"
            );
        }
        // A shared secret works across nodes.
        let a = NonceSecret::from_bytes([7; 32]);
        let b = NonceSecret::from_bytes([7; 32]);
        assert_eq!(
            b.check_nonce(&a.nonce("r", t0), "r", t0, max_age),
            NonceCheck::Valid
        );
        assert_eq!(format!("{a:?}"), "NonceSecret(..)");
    }

    #[test]
    fn stale_flag_in_challenges() {
        let fresh = challenges("r", "n", false);
        assert!(fresh.iter().all(|c| !c.contains("stale")));
        let stale = challenges("r", "n", true);
        assert!(stale.iter().all(|c| c.ends_with(", stale=true")));
        assert!(stale.iter().all(|c| c.contains(r#"qop="auth""#)));
        // Realms are quoted safely.
        let odd = challenges("a\"b\\c\r\nX-Injected: 1", "n", false);
        assert!(
            odd[0].starts_with(r#"Digest realm="a\"b\\cX-Injected: 1""#),
            "{}",
            odd[0]
        );
        assert!(!odd[0].contains('\n'));
    }

    #[test]
    fn parser_is_lenient_where_the_grammar_allows() {
        let creds = parse_credentials(
            r#"digest USERNAME="a, b \"c\"",Realm = "x,y" ,, nonce=abc, URI="sip:x;a=b,c", response="ABCDEF", foo="bar, baz", qop=auth,nc=00000001, cnonce="z", Algorithm=sha-256"#,
        )
        .unwrap();
        assert_eq!(creds.username, r#"a, b "c""#);
        assert_eq!(creds.realm, "x,y");
        assert_eq!(creds.nonce, "abc");
        assert_eq!(creds.uri, "sip:x;a=b,c");
        assert_eq!(creds.response, "ABCDEF");
        assert_eq!(creds.algorithm, DigestAlgorithm::Sha256);
        assert_eq!(creds.opaque, None);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let cases: &[(&str, AuthError)] = &[
            ("", AuthError::NotDigest),
            ("Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==", AuthError::NotDigest),
            ("Digestusername=\"a\"", AuthError::NotDigest),
            ("Digest", AuthError::Malformed("no parameters")),
            ("Digest   , ,", AuthError::Malformed("no parameters")),
            (
                "Digest username",
                AuthError::Malformed("expected '=' after a parameter name"),
            ),
            (
                "Digest username=\"unterminated",
                AuthError::Malformed("unterminated quoted string"),
            ),
            (
                "Digest username=\"a\\",
                AuthError::Malformed("unterminated quoted string"),
            ),
            (
                "Digest a=b c=d",
                AuthError::Malformed("expected ',' between parameters"),
            ),
            (
                "Digest =b",
                AuthError::Malformed("expected a parameter name"),
            ),
            (
                "Digest a=b\"c",
                AuthError::Malformed("stray quote in a token"),
            ),
            (
                r#"Digest username="a", realm="r", nonce="n", uri="u""#,
                AuthError::MissingParam("response"),
            ),
            (
                r#"Digest username="a", username="b", realm="r", nonce="n", uri="u", response="x""#,
                AuthError::DuplicateParam("username".into()),
            ),
            (
                r#"Digest username="a", realm="r", nonce="n", uri="u", response="x", algorithm=MD5-sess"#,
                AuthError::UnsupportedAlgorithm("MD5-sess".into()),
            ),
            (
                r#"Digest username="a", realm="r", nonce="n", uri="u", response="x", qop=auth"#,
                AuthError::MissingParam("nc"),
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(
                parse_credentials(input).as_ref(),
                Err(expected),
                "{input:?}"
            );
        }
        assert!(
            parse_credentials(&format!("Digest a=\"{}\"", "x".repeat(MAX_HEADER_LEN))).is_err()
        );

        // Challenges the client side cannot answer.
        assert_eq!(
            respond("Digest nonce=\"n\"", "REGISTER", "sip:x", "u", "p"),
            Err(AuthError::MissingParam("realm"))
        );
        assert_eq!(
            respond(
                r#"Digest realm="r", nonce="n", qop="auth-int""#,
                "REGISTER",
                "sip:x",
                "u",
                "p"
            ),
            Err(AuthError::UnsupportedQop("auth-int".into()))
        );
        assert!(respond("Negotiate abc", "REGISTER", "sip:x", "u", "p").is_err());

        // Odd but parseable credentials never verify.
        let mut creds = parse_credentials(RFC2617_AUTHORIZATION).unwrap();
        creds.qop = Some("auth-int".into());
        assert!(!verify(&creds, "GET", "Circle Of Life"));
        creds.response = String::new();
        assert!(!verify(&creds, "GET", "Circle Of Life"));

        // Pseudo-random byte soup: only errors, never a panic.
        let alphabet: Vec<char> = "Digest =,\"\\ abcqop\u{e9}\u{1F600}\t\r\n"
            .chars()
            .collect();
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..2_000 {
            let len = (seed % 60) as usize;
            let s: String = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    alphabet[(seed % alphabet.len() as u64) as usize]
                })
                .collect();
            let _ = parse_credentials(&s);
            let _ = respond(&s, "REGISTER", "sip:x", "u", "p");
        }
    }
}
