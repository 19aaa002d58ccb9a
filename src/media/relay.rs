//! The packet relay: per-session shared state and what happens to one datagram.
//!
//! Socket indices: 0 = A RTP, 1 = A RTCP, 2 = B RTP, 3 = B RTCP. A packet received on
//! socket `i` comes from the party of that side and leaves through socket `i ^ 2`
//! towards the other party's slot `i ^ 2`.
//!
//! The sockets are served by the media threads ([`super::engine`]); a [`Relayer`] is the
//! thread's private state of one session. Hot-path rules: no allocation, no lock and no
//! channel per packet. The relayer keeps a private copy of the destinations and re-reads
//! the shared copy only when a generation counter says it changed (set_remote, a latch,
//! a recording started), which is one atomic load per packet.
//!
//! Recording: `start_recording` leaves one [`RecArm`] per direction in the shared state
//! and bumps the generation; the relayer claims them on the next packet (or when asked
//! to finish) and from then on owns the capture, so recording a packet is a copy into its
//! own vectors, with no lock. `finish_recording` sends a reply line through the arm's
//! oneshot and asks the media thread to answer: the track goes back with every packet
//! relayed until then.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use parking_lot::Mutex;
use tokio::sync::oneshot;
use tracing::{debug, trace};

use super::engine::{send_to, PairSocks};
use super::recording::Track;
use super::{FlowStats, RelayStats};

pub(crate) const A_RTP: usize = 0;
pub(crate) const B_RTP: usize = 2;

/// Recording arms are indexed by side: 0 = A, 1 = B, i.e. RTP socket index / 2.
fn rec_side(rtp_idx: usize) -> usize {
    rtp_idx / 2
}

/// Where `finish_recording` wants a track back.
pub(crate) type TrackReply = oneshot::Sender<Track>;

/// One direction of a recording, on its way to (or owned by) the relayer.
#[derive(Debug)]
pub(crate) struct RecArm {
    pub(crate) track: Track,
    /// `finish_recording` sends a reply line here. Closed without one: the recording was
    /// abandoned (finish cancelled), and the track is dropped.
    pub(crate) finish: oneshot::Receiver<TrackReply>,
}

/// Where one party receives one kind of traffic (RTP or RTCP).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Slot {
    /// From signalling (SDP), if any.
    pub(crate) sdp: Option<SocketAddr>,
    /// Source of the first packet received since the last `set_remote` (symmetric RTP).
    pub(crate) latched: Option<SocketAddr>,
}

impl Slot {
    pub(crate) fn dest(&self) -> Option<SocketAddr> {
        self.latched.or(self.sdp)
    }
}

#[derive(Debug, Default)]
struct Counters {
    packets: AtomicU64,
    bytes: AtomicU64,
    dropped: AtomicU64,
}

impl Counters {
    fn load(&self) -> FlowStats {
        FlowStats {
            packets: self.packets.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
}

/// Everything the media thread and the owning `MediaSession` share.
#[derive(Debug)]
pub(crate) struct SessionInner {
    /// The two port pairs (A, B): sockets stay bound in the pool between calls.
    pairs: [Arc<PairSocks>; 2],
    /// The sockets are AF_INET6: IPv4 destinations must be given as v4-mapped.
    v6_sockets: bool,
    slots: Mutex<[Slot; 4]>,
    /// Bumped (under the `slots` or `rec_arms` lock) whenever either changes.
    generation: AtomicU64,
    /// Indexed by the receiving socket.
    counters: [Counters; 4],
    /// Recording arms not yet claimed by the relayer, by side (see [`rec_side`]).
    rec_arms: Mutex<[Option<RecArm>; 2]>,
}

impl SessionInner {
    pub(crate) fn new(pairs: [Arc<PairSocks>; 2], v6_sockets: bool) -> Self {
        Self {
            pairs,
            v6_sockets,
            slots: Mutex::new([Slot::default(); 4]),
            generation: AtomicU64::new(0),
            counters: Default::default(),
            rec_arms: Mutex::default(),
        }
    }
    /// Socket `idx` (0 = A RTP, 1 = A RTCP, 2 = B RTP, 3 = B RTCP).
    pub(crate) fn sock(&self, idx: usize) -> &std::net::UdpSocket {
        let pair = &self.pairs[idx / 2];
        if idx.is_multiple_of(2) {
            &pair.rtp
        } else {
            &pair.rtcp
        }
    }

    /// Hands a new recording to the relay: claimed by the tasks on their next wakeup.
    pub(crate) fn arm_recording(&self, arms: [RecArm; 2]) {
        let mut slot = self.rec_arms.lock();
        *slot = arms.map(Some);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Takes back the arms no task has claimed yet (no packet arrived since the start).
    pub(crate) fn take_unclaimed_arms(&self) -> [Option<RecArm>; 2] {
        std::mem::take(&mut *self.rec_arms.lock())
    }

    /// Sets what signalling says for one party (RTP slot `rtp_idx`, RTCP slot
    /// `rtp_idx + 1`) and re-arms latching on both, under one lock so the relay never
    /// sees a half-applied update.
    pub(crate) fn set_remote(
        &self,
        rtp_idx: usize,
        rtp: Option<SocketAddr>,
        rtcp: Option<SocketAddr>,
    ) {
        let mut slots = self.slots.lock();
        slots[rtp_idx] = Slot {
            sdp: rtp,
            latched: None,
        };
        slots[rtp_idx + 1] = Slot {
            sdp: rtcp,
            latched: None,
        };
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub(crate) fn slot(&self, idx: usize) -> Slot {
        self.slots.lock()[idx]
    }

    pub(crate) fn stats(&self) -> RelayStats {
        RelayStats {
            a_to_b_rtp: self.counters[0].load(),
            a_to_b_rtcp: self.counters[1].load(),
            b_to_a_rtp: self.counters[2].load(),
            b_to_a_rtcp: self.counters[3].load(),
            own_srtp_packets: 0,
        }
    }

    /// `addr` as these sockets need it (v4-mapped when they are AF_INET6).
    pub(crate) fn v6_dest(&self, addr: SocketAddr) -> SocketAddr {
        match addr {
            SocketAddr::V4(v4) if self.v6_sockets => SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0)),
            a => a,
        }
    }
}

/// The relayer's private view of one slot.
#[derive(Clone, Default)]
struct CachedSlot {
    latched: bool,
    dest: Option<SocketAddr>,
}

#[derive(Default, Clone, Copy)]
struct LocalCount {
    packets: u64,
    bytes: u64,
    dropped: u64,
}

/// The media thread's state of one plain session: cached destinations, batched counters
/// and the recordings it captures.
pub(crate) struct Relayer {
    generation: u64,
    cache: [CachedSlot; 4],
    /// What each socket is `connect`ed to (see [`Relayer::on_packet`]).
    connected: [Option<SocketAddr>; 4],
    /// The destination a `connect` was last tried for: tried once per destination, so a
    /// refused connect never costs a system call per packet.
    connect_tried: [Option<SocketAddr>; 4],
    counts: [LocalCount; 4],
    /// Recordings in progress, by side: owned here so capturing takes no lock.
    rec: [Option<RecArm>; 2],
}

/// Where [`Relayer::route`] sends a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Route {
    /// The socket it leaves through (the other side's, same kind).
    pub(crate) out: usize,
    /// Its destination; None when `out` is connected to it (a plain `send`).
    pub(crate) dest: Option<SocketAddr>,
}

/// Forces a reload of the shared state on the next packet.
const STALE: u64 = u64::MAX;

impl Relayer {
    pub(crate) fn new() -> Self {
        Self {
            generation: STALE,
            cache: Default::default(),
            connected: [None; 4],
            connect_tried: [None; 4],
            counts: [LocalCount::default(); 4],
            rec: [None, None],
        }
    }

    pub(crate) fn refresh(&mut self, inner: &SessionInner) {
        let current = inner.generation.load(Ordering::Acquire);
        if current != self.generation {
            // Noted before reading: a change made while we read shows up next time.
            self.generation = current;
            let slots = inner.slots.lock();
            self.load(inner, &slots);
            drop(slots);
            self.claim_recording(inner);
        }
    }

    /// Copies the shared slots; the caller holds the lock. A socket connected to a party
    /// whose latch was re-armed (new SDP) is disconnected, so that it hears the party's
    /// new address again.
    fn load(&mut self, inner: &SessionInner, slots: &[Slot; 4]) {
        for (i, s) in slots.iter().enumerate() {
            let c = &mut self.cache[i];
            c.latched = s.latched.is_some();
            c.dest = s.dest().map(|a| inner.v6_dest(a));
            let party = c.dest.filter(|_| c.latched);
            self.keep_connection(inner, i, party);
        }
    }

    /// Disconnects the sockets this session connected: the pair goes back to the pool.
    pub(crate) fn release(&mut self, inner: &SessionInner) {
        for (i, c) in self.connected.iter_mut().enumerate() {
            if c.take().is_some() {
                disconnect(inner.sock(i));
            }
        }
        self.connect_tried = [None; 4];
    }

    /// Latches slot `idx` to `src` and reloads the slots at once. The generation is left
    /// stale, so the next packet reloads everything, including what changed meanwhile.
    fn latch(&mut self, inner: &SessionInner, idx: usize, src: SocketAddr) {
        let mut slots = inner.slots.lock();
        if slots[idx].latched.is_none() {
            slots[idx].latched = Some(unmap(src));
            inner.generation.fetch_add(1, Ordering::Release);
            debug!(slot = idx, %src, sdp = ?slots[idx].sdp, "media latched");
        }
        self.load(inner, &slots);
    }

    /// Takes the recording arms. A side still busy with the previous recording (its
    /// finish not answered yet) claims the new arm after the answer (`poll_recording`
    /// marks the state stale).
    fn claim_recording(&mut self, inner: &SessionInner) {
        let mut arms = inner.rec_arms.lock();
        for side in 0..2 {
            if self.rec[side].is_none() {
                if let Some(arm) = arms[side].take() {
                    debug!(side, "recording claimed by the relay");
                    self.rec[side] = Some(arm);
                }
            }
        }
    }

    /// Answers `finish_recording` for each side that asked (the media thread calls this
    /// when told a finish is waiting; the oneshot is polled without a waker).
    pub(crate) fn poll_recording(&mut self, inner: &SessionInner) {
        self.refresh(inner);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut answered = false;
        for slot in &mut self.rec {
            let Some(arm) = slot else {
                continue;
            };
            let Poll::Ready(request) = Pin::new(&mut arm.finish).poll(&mut cx) else {
                continue;
            };
            // Either way the arm is done: taken out here, handed over or dropped.
            if let (Some(arm), Ok(reply)) = (slot.take(), request) {
                // The finisher may have gone meanwhile; the track is dropped then.
                let _ = reply.send(arm.track);
            }
            answered = true;
        }
        if answered {
            self.generation = STALE;
        }
    }

    /// One datagram received on socket `idx` from `src`, relayed at once with a system
    /// call: [`Relayer::route`], the send, [`Relayer::sent`]. Returns false when it was
    /// dropped.
    pub(crate) fn on_packet(&mut self, inner: &SessionInner, idx: usize, data: &[u8], src: SocketAddr) -> bool {
        let Some(route) = self.route(inner, idx, src) else {
            return false;
        };
        let sock = inner.sock(route.out);
        let sent = match route.dest {
            None => sock.send(data),
            Some(dest) => send_to(sock, data, dest),
        };
        self.sent(idx, route.out, data, sent.map(drop))
    }

    /// Where a datagram received on socket `idx` from `src` goes: latches, drops a
    /// stranger's, and connects the outgoing socket to a latched party. None when it is
    /// dropped (counted). The caller sends it and reports with [`Relayer::sent`].
    pub(crate) fn route(&mut self, inner: &SessionInner, idx: usize, src: SocketAddr) -> Option<Route> {
        self.refresh(inner);
        if !self.cache[idx].latched {
            self.latch(inner, idx, src);
        } else if self.connected[idx].is_none() && self.cache[idx].dest.map(unmap) != Some(unmap(src)) {
            // Latched, not yet connected (nothing sent to the party so far): a stranger's
            // packet is dropped here, as the kernel drops it on a connected socket.
            self.counts[idx].dropped += 1;
            return None;
        }
        let out = idx ^ 2;
        let Some(dest) = self.cache[out].dest else {
            self.counts[idx].dropped += 1;
            return None;
        };
        // Once the party on `out` is latched, its socket is connected to it: the kernel
        // then skips the route lookup on every send (about a tenth of a send's cost) and
        // drops datagrams from anyone else on that port, as a latched relay should.
        let party = self.cache[out].latched.then_some(dest);
        Some(Route { out, dest: self.send_dest(inner, out, dest, party) })
    }

    /// The outcome of sending `data` (received on socket `idx`) out of socket `out`:
    /// counted, and captured if recording. Returns false when it was dropped.
    pub(crate) fn sent(&mut self, idx: usize, out: usize, data: &[u8], result: io::Result<()>) -> bool {
        // A UDP send only fails for a full socket buffer (or an unreachable network, or
        // an ICMP error reported on a connected socket): media is then dropped, never
        // queued (late audio is useless).
        match result {
            Ok(()) => {
                let c = &mut self.counts[idx];
                c.packets += 1;
                c.bytes += data.len() as u64;
                // Only RTP (even sockets) carries audio.
                if idx.is_multiple_of(2) {
                    if let Some(arm) = &mut self.rec[rec_side(idx)] {
                        arm.track.record(data, Instant::now);
                    }
                }
                true
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::WouldBlock {
                    trace!(slot = out, error = %e, "media send error");
                }
                self.counts[idx].dropped += 1;
                false
            }
        }
    }

    /// A send out of socket `idx` to `dest`, `party` being where the latched party on
    /// that socket sends from (None: not latched, or a browser leg): the socket is
    /// connected to a latched party (tried once per address, so a refused connect never
    /// costs a system call per packet). Returns the destination to name, None when the
    /// socket is connected to it. Used by [`Relayer::route`] and by bridges.
    pub(crate) fn send_dest(&mut self, inner: &SessionInner, idx: usize, dest: SocketAddr, party: Option<SocketAddr>) -> Option<SocketAddr> {
        self.keep_connection(inner, idx, party);
        if party == Some(dest) && self.connect_tried[idx] != Some(dest) {
            self.connect_tried[idx] = Some(dest);
            if inner.sock(idx).connect(dest).is_ok() {
                self.connected[idx] = Some(dest);
            }
        }
        (self.connected[idx] != Some(dest)).then_some(dest)
    }

    /// The party on socket `idx` is now latched to `party` (None: not latched, e.g.
    /// after a new SDP address): a socket connected to anyone else is disconnected, so
    /// that it hears the party wherever it sends from now.
    pub(crate) fn keep_connection(&mut self, inner: &SessionInner, idx: usize, party: Option<SocketAddr>) {
        if self.connected[idx].is_some() && self.connected[idx] != party {
            disconnect(inner.sock(idx));
            self.connected[idx] = None;
        }
        if self.connect_tried[idx] != party {
            self.connect_tried[idx] = None;
        }
    }

    /// The party socket `idx` is connected to: the only source it can receive from.
    pub(crate) fn connected(&self, idx: usize) -> Option<SocketAddr> {
        self.connected[idx]
    }

    /// Counts a datagram received on `idx` and not relayed (oversize, unreadable).
    pub(crate) fn count_dropped(&mut self, idx: usize) {
        self.counts[idx].dropped += 1;
    }

    /// Publishes the batched counters: a few atomic adds per loop turn, not per packet.
    pub(crate) fn flush(&mut self, inner: &SessionInner) {
        for (local, shared) in self.counts.iter_mut().zip(inner.counters.iter()) {
            if local.packets != 0 {
                shared.packets.fetch_add(local.packets, Ordering::Relaxed);
                shared.bytes.fetch_add(local.bytes, Ordering::Relaxed);
            }
            if local.dropped != 0 {
                shared.dropped.fetch_add(local.dropped, Ordering::Relaxed);
            }
            *local = LocalCount::default();
        }
    }
}

/// Dissolves a UDP socket's association (connect to AF_UNSPEC): it hears everyone again.
fn disconnect(sock: &std::net::UdpSocket) {
    if let Err(e) = rustix::net::connect_unspec(sock) {
        debug!(error = %e, "media socket: disconnect failed");
    }
}

/// Socket address for a party's RTCP when signalling gave only the RTP address.
pub(crate) fn rtcp_default(rtp: SocketAddr) -> Option<SocketAddr> {
    rtp.port()
        .checked_add(1)
        .map(|p| SocketAddr::new(rtp.ip(), p))
}

/// Normalises v4-mapped IPv6 sources so latched addresses print and compare as IPv4.
pub(crate) fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}
