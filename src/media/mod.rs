//! Media anchoring: the RTP port pool and the RTP/RTCP relay between a call's two legs.
//!
//! Every call gets a [`MediaSession`] from the node-wide [`MediaEngine`]: two RTP/RTCP
//! port pairs (one facing each party), served by one of the engine's media threads,
//! which moves packets between them.
//! Signalling (the Call actor) only tells the session where each party said it receives
//! media ([`MediaSession::set_remote`]); packets never pass through actors or channels.
//!
//! Symmetric RTP: the first packet received on a side's socket after each
//! `set_remote` (or after opening) fixes that side's destination to the packet's source,
//! so parties behind NAT get their media back where they actually send from.
//!
//! Recording ([`MediaSession::start_recording`], [`MediaSession::finish_recording`]): the
//! media thread copies the G.711 audio of the packets it relays into buffers it owns,
//! and hands them over when asked; decoding and the stereo WAV are built afterwards, off
//! the media thread.
//!
//! # Layout
//!
//! - `ports`: the RTP port pool (pairs stay bound between calls).
//! - `engine`: the media threads (epoll loops) serving every media socket.
//! - `uring`: the io_uring those threads batch their socket I/O through (the crate's
//!   only `unsafe` code).
//! - `relay`: per-session shared state and what happens to one relayed datagram.
//! - `recording`: capture of relayed audio and its rendering to WAV (sans-IO).
//! - `g711`: µ-law / A-law decoding.

mod engine;
mod g711;
mod ports;
mod recording;
mod relay;
mod uring;
pub mod webrtc;

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::oneshot;
use serde::Deserialize;
use tracing::{debug, info, warn};

use engine::{Cmd, PairSocks, Shard};
use ports::{PairLease, PortPool};
use recording::{Budget, Track};
use relay::{rtcp_default, RecArm, SessionInner, TrackReply, A_RTP, B_RTP};

pub use recording::{Recording, RecordingOptions};

/// Media addressing and port range of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaConfig {
    /// Address the RTP sockets bind to.
    pub bind_ip: IpAddr,
    /// Address advertised in SDP (differs from `bind_ip` behind 1:1 NAT).
    pub public_ip: IpAddr,
    /// First port of the range; must be even (RTP even, RTCP = RTP + 1).
    pub port_min: u16,
    /// Last port of the range (inclusive).
    pub port_max: u16,
}

/// How the media threads do their socket I/O (`media.io`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MediaIo {
    /// io_uring where the kernel allows it (container seccomp profiles often block it),
    /// else system calls, said once in the log at start.
    #[default]
    Auto,
    /// io_uring: the receives of a loop turn in one submission, its sends in another.
    /// Without it the engine does not start.
    Uring,
    /// A `recvfrom` and a `sendto` per datagram.
    Syscalls,
}

/// Whether this process may use io_uring as the media threads do (the check
/// [`MediaIo::Uring`] makes at start); the reason when not.
pub fn uring_available() -> io::Result<()> {
    uring::Ring::new(1, 2).map(drop)
}

/// One leg of a call: A = caller, B = callee.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    A,
    B,
}

impl Side {
    /// The other leg.
    pub fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }

    /// Index of this side's RTP socket/slot in the relay (RTCP is the next one).
    fn rtp_idx(self) -> usize {
        match self {
            Side::A => A_RTP,
            Side::B => B_RTP,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("invalid media configuration: {0}")]
    Config(&'static str),
    /// Every port pair of the range is in use (or taken by another process): answer 503.
    #[error("media ports exhausted")]
    PortsExhausted,
    /// `MediaIo::Uring` was asked for and this process cannot use io_uring.
    #[error("io_uring unavailable for the media threads: {0}")]
    Uring(io::Error),
    #[error("media socket error: {0}")]
    Io(#[from] io::Error),
}

/// Traffic of one direction and kind (e.g. A→B RTP).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// Packets received and relayed to the other side.
    pub packets: u64,
    /// Payload bytes (UDP payload) of those packets.
    pub bytes: u64,
    /// Packets received but not relayed: no destination known yet, oversize, or the
    /// send failed (socket buffer full).
    pub dropped: u64,
}

/// Counters of one session, per direction and per RTP/RTCP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    pub a_to_b_rtp: FlowStats,
    pub a_to_b_rtcp: FlowStats,
    pub b_to_a_rtp: FlowStats,
    pub b_to_a_rtcp: FlowStats,
    /// RTP packets of browser legs that crossbar's own SRTP protected or
    /// unprotected (rather than str0m); 0 for plain calls.
    pub own_srtp_packets: u64,
}

impl RelayStats {
    fn flows(&self) -> [&FlowStats; 4] {
        [
            &self.a_to_b_rtp,
            &self.a_to_b_rtcp,
            &self.b_to_a_rtp,
            &self.b_to_a_rtcp,
        ]
    }

    /// All packets relayed, both directions, RTP and RTCP.
    pub fn relayed_packets(&self) -> u64 {
        self.flows().iter().map(|f| f.packets).sum()
    }

    /// All packets dropped, both directions, RTP and RTCP.
    pub fn dropped(&self) -> u64 {
        self.flows().iter().map(|f| f.dropped).sum()
    }
}

/// The node's media engine: port pool and media threads. Cheap to clone.
#[derive(Clone)]
pub struct MediaEngine {
    inner: Arc<EngineInner>,
}

struct EngineInner {
    cfg: MediaConfig,
    pool: Arc<PortPool>,
    shards: Vec<Arc<Shard>>,
    /// The I/O the media threads do: `Uring` or `Syscalls`.
    io: MediaIo,
    /// Round-robin over the shards for new sessions.
    next: AtomicUsize,
    /// Times binding failed for lack of file descriptors (logged sparingly).
    emfile: AtomicUsize,
}

impl Drop for EngineInner {
    fn drop(&mut self) {
        for s in &self.shards {
            s.send(Cmd::Shutdown);
        }
    }
}

impl fmt::Debug for MediaEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MediaEngine")
            .field("cfg", &self.inner.cfg)
            .field("threads", &self.inner.shards.len())
            .field("io", &self.inner.io)
            .field("ports_in_use", &self.ports_in_use())
            .finish()
    }
}

impl MediaEngine {
    /// One media thread (enough for thousands of relayed calls; see README figures).
    pub fn new(cfg: MediaConfig) -> Result<Self, MediaError> {
        Self::with_threads(cfg, 1)
    }

    /// Like [`MediaEngine::new`] with `threads` media threads (at least one); the port
    /// range is split between them, pair by pair.
    pub fn with_threads(cfg: MediaConfig, threads: usize) -> Result<Self, MediaError> {
        Self::with_io(cfg, threads, MediaIo::Auto)
    }

    /// Like [`MediaEngine::with_threads`], with the media threads' I/O chosen by `io`.
    /// `Err(MediaError::Uring)` when `io` is [`MediaIo::Uring`] and io_uring cannot be
    /// used here.
    pub fn with_io(cfg: MediaConfig, threads: usize, io: MediaIo) -> Result<Self, MediaError> {
        validate(&cfg)?;
        let threads = threads.max(1);
        let pool = Arc::new(PortPool::new(cfg.port_min, cfg.port_max, threads));
        if pool.capacity() > pool.max_bound() {
            info!(
                pairs = pool.capacity(),
                max_bound_pairs = pool.max_bound(),
                "media: the RTP port range has more pairs than the open-files limit lets media bind (a tenth of it is kept for SIP connections and the store); past that, ports still in quarantine are reused (raise the open-files limit to use the whole range)"
            );
        }
        let mut shards = Vec::with_capacity(threads);
        let mut io = io;
        for i in 0..threads {
            let (shard, failed) = Shard::start(i, Arc::clone(&pool), io)?;
            // A shard that started is shut down when dropped, on error too.
            shards.push(shard);
            if let Some(e) = failed {
                if io == MediaIo::Uring {
                    drop(EngineInner { cfg, pool, shards, io, next: AtomicUsize::new(0), emfile: AtomicUsize::new(0) });
                    return Err(MediaError::Uring(e));
                }
                info!(error = %e, "media threads: io_uring unavailable, using system calls (media.io = \"auto\")");
                // The others would fail alike: not tried again.
                io = MediaIo::Syscalls;
            }
        }
        let io = if io == MediaIo::Syscalls { MediaIo::Syscalls } else { MediaIo::Uring };
        info!(threads, io = if io == MediaIo::Uring { "io_uring" } else { "system calls" }, "media threads started");
        Ok(Self {
            inner: Arc::new(EngineInner { cfg, pool, shards, io, next: AtomicUsize::new(0), emfile: AtomicUsize::new(0) }),
        })
    }

    /// The I/O the media threads do: [`MediaIo::Uring`] or [`MediaIo::Syscalls`].
    pub fn io(&self) -> MediaIo {
        self.inner.io
    }

    pub fn config(&self) -> &MediaConfig {
        &self.inner.cfg
    }

    /// Media threads serving this engine's sockets.
    pub fn threads(&self) -> usize {
        self.inner.shards.len()
    }

    /// Leases a port pair for each side and hands them to a media thread, which relays
    /// from then on. No system call in the usual case: the pairs' sockets are bound the
    /// first time they are used and stay bound. Async only for the callers' sake.
    ///
    /// `Err(MediaError::PortsExhausted)` when no two pairs can be had (answer 503).
    pub async fn open_session(&self) -> Result<MediaSession, MediaError> {
        self.open_session_with([webrtc::LegKind::Plain; 2]).await
    }

    /// Like [`MediaEngine::open_session`], with the kind of each side's media: a
    /// session with a WebRTC side runs a [`webrtc::Bridge`] instead of the plain relay,
    /// and its SDP goes through [`MediaSession::sdp_adapter`].
    pub async fn open_session_with(&self, kinds: [webrtc::LegKind; 2]) -> Result<MediaSession, MediaError> {
        let n = self.inner.shards.len();
        let first = self.inner.next.fetch_add(1, Ordering::Relaxed) % n;
        for k in 0..n {
            let shard = (first + k) % n;
            match self.open_on(shard, kinds) {
                Err(MediaError::PortsExhausted) => continue,
                other => return other,
            }
        }
        warn!("no bindable media port pair left in the range");
        Err(MediaError::PortsExhausted)
    }

    fn open_on(&self, shard_idx: usize, kinds: [webrtc::LegKind; 2]) -> Result<MediaSession, MediaError> {
        let shard = &self.inner.shards[shard_idx];
        let (lease_a, socks_a) = self.bind_next_pair(shard_idx)?;
        // On error below, lease_a drops here and the pair goes back.
        let (lease_b, socks_b) = self.bind_next_pair(shard_idx)?;
        let public = self.inner.cfg.public_ip;
        let local = [
            SocketAddr::new(public, lease_a.rtp_port()),
            SocketAddr::new(public, lease_b.rtp_port()),
        ];
        let v6_sockets = self.inner.cfg.bind_ip.is_ipv6();
        let inner = Arc::new(SessionInner::new([socks_a, socks_b], v6_sockets));
        let key = lease_a.idx();
        let bridge = kinds.contains(&webrtc::LegKind::WebRtc).then(|| {
            webrtc::BridgeShared::new(webrtc::Bridge::new(kinds, local), Arc::clone(shard), key)
        });
        shard.send(Cmd::Attach {
            pairs: [lease_a.idx(), lease_b.idx()],
            inner: Arc::clone(&inner),
            bridge: bridge.clone(),
        });
        debug!(a = %local[0], b = %local[1], "media session opened");
        Ok(MediaSession {
            inner,
            shard: Arc::clone(shard),
            key,
            _leases: [lease_a, lease_b],
            local,
            bind_ip: self.inner.cfg.bind_ip,
            recording: Mutex::new(None),
            bridge,
        })
    }

    /// UDP ports currently held by sessions (4 per session); 0 when no call is up.
    pub fn ports_in_use(&self) -> usize {
        self.inner.pool.pairs_in_use() * 2
    }

    /// UDP sockets bound now, in use or kept for the next calls (see `ports`).
    pub fn sockets_bound(&self) -> usize {
        self.inner.pool.bound_pairs() * 2
    }

    /// Total UDP ports usable in the configured range (4 per session).
    pub fn ports_total(&self) -> usize {
        self.inner.pool.capacity() * 2
    }

    /// Leases a free pair of `shard` with its sockets: a bound one, or one bound now. A
    /// pair taken by another process is skipped (it goes back to the tail of the pool
    /// and is retried later); out of file descriptors, a bound pair still in quarantine
    /// is better than no call.
    fn bind_next_pair(&self, shard: usize) -> Result<(PairLease, Arc<PairSocks>), MediaError> {
        let pool = &self.inner.pool;
        let mut prefer_bound = false;
        for _ in 0..pool.free_in_shard(shard).max(1) {
            let Some((lease, _)) = PairLease::take(pool, shard, prefer_bound) else {
                return Err(MediaError::PortsExhausted);
            };
            let bound = pool.sockets(lease.idx(), |port| {
                let (rtp, rtcp) = bind_pair(self.inner.cfg.bind_ip, port)?;
                let socks = Arc::new(PairSocks { rtp, rtcp });
                self.inner.shards[shard].register_pair(lease.idx(), &socks)?;
                Ok(socks)
            });
            match bound {
                Ok(socks) => return Ok((lease, socks)),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                    debug!(port = lease.rtp_port(), "media port in use elsewhere, skipped");
                }
                Err(e) if e.raw_os_error() == Some(EMFILE) && !prefer_bound => {
                    let n = self.inner.emfile.fetch_add(1, Ordering::Relaxed);
                    // Once, then every 1,000th time: under overload this is every call.
                    if n.is_multiple_of(1000) {
                        warn!(times = n + 1, max_pairs = pool.max_bound(), "out of file descriptors for media sockets (the open-files limit, less a reserve for SIP connections and the store): reusing a pair in quarantine (raise the open-files limit)");
                    }
                    prefer_bound = true;
                }
                // Anything else (address not local, permission) is a node problem that
                // no other port will fix.
                Err(e) => return Err(MediaError::Io(e)),
            }
        }
        Err(MediaError::PortsExhausted)
    }
}

/// errno "too many open files" (Linux).
const EMFILE: i32 = 24;

fn validate(cfg: &MediaConfig) -> Result<(), MediaError> {
    if cfg.port_min == 0 {
        return Err(MediaError::Config("port_min must be > 0"));
    }
    if !cfg.port_min.is_multiple_of(2) {
        return Err(MediaError::Config(
            "port_min must be even (RTP even, RTCP odd)",
        ));
    }
    if u32::from(cfg.port_max) < u32::from(cfg.port_min) + 3 {
        return Err(MediaError::Config(
            "port range must hold at least two RTP/RTCP pairs (port_max >= port_min + 3)",
        ));
    }
    if cfg.public_ip.is_unspecified() || cfg.public_ip.is_multicast() {
        // 0.0.0.0 in SDP means "hold" to the far end.
        return Err(MediaError::Config("public_ip must be a unicast address"));
    }
    if cfg.bind_ip.is_multicast() {
        return Err(MediaError::Config("bind_ip must not be multicast"));
    }
    let dual_stack = cfg.bind_ip == IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    if cfg.bind_ip.is_ipv4() != cfg.public_ip.is_ipv4() && !dual_stack {
        return Err(MediaError::Config(
            "bind_ip and public_ip must be of the same address family",
        ));
    }
    Ok(())
}

/// Binds RTP on `port` and RTCP on `port + 1`.
fn bind_pair(ip: IpAddr, port: u16) -> io::Result<(std::net::UdpSocket, std::net::UdpSocket)> {
    let rtcp_port = port
        .checked_add(1)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no RTCP port"))?;
    let rtp = bind_udp(SocketAddr::new(ip, port))?;
    let rtcp = bind_udp(SocketAddr::new(ip, rtcp_port))?;
    Ok((rtp, rtcp))
}

fn bind_udp(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Explicitly off: with SO_REUSEADDR another process could share the port and
    // receive our media; a port must be exclusively ours or skipped.
    sock.set_reuse_address(false)?;
    sock.set_nonblocking(true)?;
    set_dscp_ef(&sock, addr);
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

/// Marks media as Expedited Forwarding (DSCP 46), best effort: a network that ignores
/// it is no reason to fail a call.
#[cfg(target_os = "linux")]
fn set_dscp_ef(sock: &Socket, addr: SocketAddr) {
    const EF: u32 = 46 << 2;
    let res = if addr.is_ipv4() {
        sock.set_tos(EF)
    } else {
        sock.set_tclass_v6(EF)
    };
    if let Err(e) = res {
        debug!(error = %e, "could not set DSCP on media socket");
    }
}

#[cfg(not(target_os = "linux"))]
fn set_dscp_ef(_sock: &Socket, _addr: SocketAddr) {}

/// The media of one call. Owned by the Call actor; dropping it (or [`close`]) stops
/// the relay and returns the four ports to the pool.
///
/// [`close`]: MediaSession::close
pub struct MediaSession {
    inner: Arc<SessionInner>,
    /// The media thread serving the session, and the session's name there (its A pair).
    shard: Arc<Shard>,
    key: u16,
    /// Given back after the thread was told to detach (commands run in order, so the
    /// next session on these pairs is attached after this one is gone).
    _leases: [PairLease; 2],
    /// Advertised RTP address facing A and facing B.
    local: [SocketAddr; 2],
    bind_ip: IpAddr,
    /// The recording in progress, if any.
    recording: Mutex<Option<RecordingControl>>,
    /// Set when a side is WebRTC: the bridge replaces the plain relay.
    bridge: Option<Arc<webrtc::BridgeShared>>,
}

/// The session's end of a recording in progress: per side (A, B), the line on which
/// `finish_recording` asks the media thread for that side's track.
struct RecordingControl {
    finish: [oneshot::Sender<TrackReply>; 2],
}

impl fmt::Debug for MediaSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MediaSession")
            .field("local_a", &self.local[0])
            .field("local_b", &self.local[1])
            .finish()
    }
}

impl MediaSession {
    /// The RTP address crossbar uses towards `side`'s party (public_ip + port): what
    /// goes into the SDP sent to that party.
    pub fn local_rtp(&self, side: Side) -> SocketAddr {
        match side {
            Side::A => self.local[0],
            Side::B => self.local[1],
        }
    }

    /// The RTCP address towards `side`'s party (RTP port + 1).
    pub fn local_rtcp(&self, side: Side) -> SocketAddr {
        let rtp = self.local_rtp(side);
        // The pool only hands out even ports <= 65534, so +1 cannot overflow.
        SocketAddr::new(rtp.ip(), rtp.port().saturating_add(1))
    }

    /// Where `side`'s party said (in its SDP) it receives RTP, and RTCP if it said so
    /// with a=rtcp (else RTP port + 1). Re-arms latching: the next packet received from
    /// that party fixes its address again (re-INVITE, NAT rebinding).
    ///
    /// An unspecified address (0.0.0.0 / ::, i.e. hold) or port 0 gives no destination
    /// until the party sends: sending there would hit this very host. So does one of
    /// this session's own sockets (a looped or forged SDP), which would make the relay
    /// feed itself forever.
    pub fn set_remote(&self, side: Side, rtp: SocketAddr, rtcp: Option<SocketAddr>) {
        let usable = |a: SocketAddr| !a.ip().is_unspecified() && a.port() != 0 && !self.is_own(a);
        let rtp_dest = Some(rtp).filter(|a| usable(*a));
        let rtcp_dest = match rtcp {
            Some(a) => Some(a).filter(|a| usable(*a)),
            None => rtp_dest.and_then(rtcp_default),
        };
        debug!(?side, rtp = ?rtp_dest, rtcp = ?rtcp_dest, "media remote set");
        self.inner.set_remote(side.rtp_idx(), rtp_dest, rtcp_dest);
    }

    /// True when `a` is one of this session's four sockets.
    fn is_own(&self, a: SocketAddr) -> bool {
        let ours = self
            .local
            .iter()
            .any(|l| a.port() == l.port() || a.port() == l.port().wrapping_add(1));
        ours && (a.ip() == self.local[0].ip() || a.ip() == self.bind_ip || a.ip().is_loopback())
    }

    /// Where RTP for `side`'s party is sent now: the latched source, else the SDP address.
    pub fn remote_rtp(&self, side: Side) -> Option<SocketAddr> {
        self.inner.slot(side.rtp_idx()).dest()
    }

    /// Where RTCP for `side`'s party is sent now.
    pub fn remote_rtcp(&self, side: Side) -> Option<SocketAddr> {
        self.inner.slot(side.rtp_idx() + 1).dest()
    }

    pub fn stats(&self) -> RelayStats {
        match &self.bridge {
            Some(b) => b.stats(),
            None => self.inner.stats(),
        }
    }

    /// The SDP adapter the B2BUA must use when a side is WebRTC (None: plain relay,
    /// the B2BUA rewrites SDP itself).
    pub fn sdp_adapter(&self) -> Option<Arc<dyn crate::sip::b2bua::SdpAdapter>> {
        self.bridge.as_ref().map(|b| Arc::new(webrtc::BridgeSdp(b.clone())) as Arc<dyn crate::sip::b2bua::SdpAdapter>)
    }

    /// Starts recording both directions from now on: the G.711 audio (PCMU, PCMA) of
    /// every RTP packet relayed after this call. Other payload types (telephone-event,
    /// comfort noise, other codecs) are not recorded. Idempotent: while a recording
    /// runs, further calls change nothing, `opts` included.
    ///
    /// The capture buffers are reserved here, in the caller, not in the media thread.
    pub fn start_recording(&self, opts: RecordingOptions) {
        let mut control = self.recording.lock();
        if control.is_some() {
            return;
        }
        let budget = Budget::new(opts.max_bytes);
        let (finish_a, arm_a) = oneshot::channel();
        let (finish_b, arm_b) = oneshot::channel();
        self.inner.arm_recording([
            RecArm {
                track: Track::new(Arc::clone(&budget)),
                finish: arm_a,
            },
            RecArm {
                track: Track::new(budget),
                finish: arm_b,
            },
        ]);
        *control = Some(RecordingControl {
            finish: [finish_a, finish_b],
        });
        debug!(max_bytes = opts.max_bytes, "recording started");
    }

    /// Stops recording and returns the call's audio as a WAV (see [`Recording`]): left
    /// channel A (caller), right channel B (callee), each packet placed by its RTP
    /// timestamp, the two directions aligned by the arrival of their first packets.
    /// `None` if recording was never started (returns at once, the relay is not asked)
    /// or no G.711 audio was relayed since.
    ///
    /// Call it before (or instead of) [`close`](MediaSession::close). Async because the
    /// media thread owns the captured audio, which is what keeps capturing lock-free: it
    /// hands its buffers over when it next runs its commands, with every packet it
    /// relayed up to then. The WAV is built on tokio's blocking pool, away from the
    /// media thread and the caller.
    /// Recording can be started again afterwards.
    pub async fn finish_recording(&self) -> Option<Recording> {
        let (control, unclaimed) = {
            let mut control = self.recording.lock();
            let c = control.take()?;
            // Under the control lock, so no new start can slip its arms in meanwhile.
            (c, self.inner.take_unclaimed_arms())
        };
        let mut tracks: [Option<Track>; 2] = [None, None];
        let mut answers: [Option<oneshot::Receiver<Track>>; 2] = [None, None];
        for (((track, answer), request), arm) in tracks.iter_mut().zip(answers.iter_mut()).zip(control.finish).zip(unclaimed) {
            match arm {
                // No packet reached the relay since the start: nothing was captured.
                Some(arm) => *track = Some(arm.track),
                None => {
                    let (reply, rx) = oneshot::channel();
                    // Fails only if the media thread dropped the arm, and with it the audio.
                    if request.send(reply).is_ok() {
                        *answer = Some(rx);
                    }
                }
            }
        }
        if answers.iter().any(Option::is_some) {
            self.shard.send(Cmd::FinishRecording { key: self.key });
        }
        for (track, answer) in tracks.iter_mut().zip(answers) {
            if let Some(rx) = answer {
                *track = rx.await.ok();
            }
        }
        let now = std::time::Instant::now();
        match tokio::task::spawn_blocking(move || recording::render(tracks, now)).await {
            Ok(rec) => {
                debug!(rec = ?rec, "recording finished");
                rec
            }
            Err(e) => {
                warn!(error = %e, "recording could not be rendered");
                None
            }
        }
    }

    /// Stops relaying and frees the ports (same as dropping the session).
    pub fn close(self) {
        drop(self);
    }
}

impl Drop for MediaSession {
    fn drop(&mut self) {
        // Queued before the leases go back (they drop right after this), so the thread
        // has let go of the pairs before any new session can be attached to them.
        self.shard.send(Cmd::Detach { key: self.key });
    }
}
