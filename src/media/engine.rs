//! The media threads: every RTP/RTCP socket of the node is served by one of a few
//! dedicated OS threads ("shards", `media.threads`), each running a level-triggered
//! epoll loop over the sockets of its port pairs. No tokio task, waker or timer is
//! involved per packet.
//!
//! Why not tokio: a relayed packet through a tokio socket costs an edge-triggered wake,
//! a task poll, the receive, the send and a second receive that only finds the socket
//! empty (to re-arm the edge), and the worker threads park and unpark around it. Here
//! the loop takes exactly one datagram per readiness event (level-triggered, so what is
//! left shows up again next turn) and sends it on.
//!
//! I/O: io_uring, or system calls (`media.io`). With a ring ([`super::uring`]) a turn
//! pushes one receive per ready socket and submits them all at once, relays what came
//! in (the relayer only decides: [`Relayer::route`]), queues each send pointing at the
//! datagram's receive slot (no copy), submits all the sends at once and then counts and
//! records what went out ([`Relayer::sent`]). One `io_uring_enter` per direction and turn
//! replaces a `recvfrom` and a `sendto` per packet: measured ~18 % less CPU per relayed
//! packet at 500 calls (README figures). Every operation carries `MSG_DONTWAIT`, so it
//! completes during the submit, and the turn waits for exactly what it pushed: nothing
//! is in flight between turns. A connected socket (latched party) is read with `recv`,
//! since its source can only be the party. A bridge's output is copied into send slots
//! of the same batch. A late turn (see [`LATE`]) drains sockets with plain `recvfrom`
//! loops and sends at once, as the system-call path does.
//!
//! Fallback: io_uring is often blocked (the default seccomp profiles of docker and
//! Kubernetes, `kernel.io_uring_disabled`) and needs kernel 6.0. A thread that cannot
//! make its ring at start, with `media.io = "auto"`, says so once at info level and does
//! a `recvfrom` and a `sendto` (or `send` on a connected socket) per datagram, the
//! relay logic being the same [`Relayer`] either way; `media.io = "uring"` makes the
//! engine refuse to start instead. A ring that fails later (an `io_uring_enter` error)
//! is dropped and the thread goes on with system calls.
//!
//! Batching: after a turn that found packets, the thread sleeps [`BATCH`] before the
//! next `epoll_wait`, so one wake-up serves every packet that arrived meanwhile (at 500
//! calls, ~50). That adds at most [`BATCH`] of latency to a packet, far below any jitter
//! buffer; an idle node blocks in `epoll_wait` and costs nothing.
//!
//! A port pair's sockets are bound and registered once and then kept between calls
//! (`ports::PortPool`; unbound here after a minute unused): opening a call's media is
//! usually a lease and a message to the thread, with no system call. Packets that reach a pair
//! no call holds (late packets of an ended call) are read and dropped as they come. (No
//! draining at detach: commands run after the fact, and a drain then could eat the first
//! packets of the next call on the same ports.) The pool's round-robin makes a pair wait
//! for every other free pair before it is used again.
//!
//! Sessions with a WebRTC leg run their [`Bridge`](super::webrtc::Bridge) on the same
//! thread: datagrams in, the bridge's output sent, its timeouts kept per session.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rustix::event::epoll;
use rustix::event::{eventfd, EventfdFlags, Timespec};
use tracing::{debug, error, trace};

use super::ports::{PortPool, IDLE_UNBIND};
use super::relay::{unmap, Relayer, SessionInner};
use super::uring::{Ring, SLOT_LEN};
use super::webrtc::{Bridge, BridgeShared};
use super::{MediaIo, Side};

/// Sleep after a turn that found packets, so the next turn serves many at once.
pub(crate) const BATCH: Duration = Duration::from_micros(1000);

/// How often idle bound pairs are looked for (and unbound).
const TRIM_EVERY: Duration = Duration::from_secs(5);

/// A turn starting this long after the previous one is late: sockets are drained.
/// Below it a socket of a 20 ms stream holds at most one RTP packet (and now and then
/// an RTCP or STUN one, read next turn): a drain would mostly cost a read that finds
/// the socket empty (measured: +75 % reads with 300 bridged calls at a 3 ms threshold).
const LATE: Duration = Duration::from_millis(10);

/// Datagrams read from one socket per readiness event when late.
const LATE_BUDGET: usize = 64;

/// Readiness events taken per `epoll_wait`.
const MAX_EVENTS: usize = 512;

/// Receive buffer of the system-call path, as long as a ring's receive slot: carrier RTP
/// and browser SRTP/DTLS are far below the Ethernet MTU; a datagram that fills the whole
/// buffer may have been truncated and is dropped (on both paths).
const BUF_LEN: usize = SLOT_LEN;

/// A bridge's outgoing datagram (SRTP or plain RTP, far below the MTU) fits here.
const BRIDGE_OUT_LEN: usize = 2048;

/// Longest `epoll_wait` when no bridge needs a timeout earlier.
const IDLE_WAIT: Duration = Duration::from_secs(1);

/// The epoll token of the shard's command eventfd.
const WAKE_TOKEN: u64 = u64::MAX;

/// No session holds this pair.
const NO_OWNER: u32 = u32::MAX;

/// A pair's sockets are not in the ring's file table.
const NO_FILE: [u32; 2] = [u32::MAX; 2];

/// The tag of a bridge's send on the ring (a relayed datagram's tag is its session slot
/// and receiving socket, see [`relay_tag`]).
const BRIDGE_TAG: u64 = u64::MAX;

/// The tag of a relayed datagram's send: session slot and the socket it came in on.
fn relay_tag(slot: u32, idx: usize) -> u64 {
    (u64::from(slot) << 2) | idx as u64
}

/// The two sockets of one port pair (RTP on the even port, RTCP on the next).
#[derive(Debug)]
pub(crate) struct PairSocks {
    pub(crate) rtp: std::net::UdpSocket,
    pub(crate) rtcp: std::net::UdpSocket,
}

/// Sends one datagram (the sockets are non-blocking: a full buffer is an error, and
/// the datagram is dropped, never queued).
pub(crate) fn send_to(sock: &UdpSocket, data: &[u8], dest: SocketAddr) -> io::Result<usize> {
    sock.send_to(data, dest)
}

/// What the rest of the node asks of a media thread.
pub(crate) enum Cmd {
    /// Pair `idx` was bound (once in the node's life): its sockets, to read them.
    Register { idx: u16, socks: Arc<PairSocks> },
    /// A session took `pairs` (A, B): relay (or bridge) them from now on.
    Attach {
        pairs: [u16; 2],
        inner: Arc<SessionInner>,
        bridge: Option<Arc<BridgeShared>>,
    },
    /// The session holding pair `key` (its A pair) ended: stop serving it.
    Detach { key: u16 },
    /// The bridge of session `key` changed (SDP): run it now.
    Kick { key: u16 },
    /// A `finish_recording` is waiting on session `key`.
    FinishRecording { key: u16 },
    Shutdown,
}

/// One media thread's mailbox and epoll instance.
#[derive(Debug)]
pub(crate) struct Shard {
    epfd: OwnedFd,
    wake: OwnedFd,
    cmds: Mutex<Mailbox>,
}

#[derive(Debug, Default)]
struct Mailbox {
    cmds: Vec<Cmd>,
    /// The eventfd was written since the thread last took the commands.
    woken: bool,
}

impl Cmd {
    /// Whether the thread must be woken for this command. A plain relay's attach and
    /// any detach need not be: the thread reads its mailbox at the start of every turn,
    /// and a turn comes with the first packet for the session (so it is attached before
    /// that packet is read) or within [`IDLE_WAIT`] (a detach only lets go of the
    /// pairs, and a new session on them is queued behind it). At a call's set-up and
    /// end this saves the eventfd write and the wake-up of an idle thread: ~5 % of a
    /// short call's CPU (`bench/cps.sh`, calls without RTP).
    fn urgent(&self) -> bool {
        match self {
            Cmd::Attach { bridge, .. } => bridge.is_some(),
            Cmd::Detach { .. } => false,
            Cmd::Register { .. } | Cmd::Kick { .. } | Cmd::FinishRecording { .. } | Cmd::Shutdown => true,
        }
    }
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cmd::Register { idx, .. } => write!(f, "Register({idx})"),
            Cmd::Attach { pairs, bridge, .. } => write!(f, "Attach({pairs:?}, bridge: {})", bridge.is_some()),
            Cmd::Detach { key } => write!(f, "Detach({key})"),
            Cmd::Kick { key } => write!(f, "Kick({key})"),
            Cmd::FinishRecording { key } => write!(f, "FinishRecording({key})"),
            Cmd::Shutdown => f.write_str("Shutdown"),
        }
    }
}

impl Shard {
    /// Creates the epoll instance and starts the thread serving shard `index` of `pool`,
    /// with an io_uring unless `io` says system calls. Also returns why the ring could
    /// not be made, if it was tried and could not (the thread then uses system calls,
    /// unless `io` is [`MediaIo::Uring`]: then the thread has ended).
    pub(crate) fn start(index: usize, pool: Arc<PortPool>, io: MediaIo) -> io::Result<(Arc<Shard>, Option<io::Error>)> {
        let epfd = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let wake = eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC)?;
        epoll::add(&epfd, &wake, epoll::EventData::new_u64(WAKE_TOKEN), epoll::EventFlags::IN)?;
        let shard = Arc::new(Shard { epfd, wake, cmds: Mutex::new(Mailbox::default()) });
        let s = Arc::clone(&shard);
        let (report, started) = mpsc::sync_channel(1);
        thread::Builder::new().name(format!("crossbar-media-{index}")).spawn(move || {
            // Made on the thread that uses it: the ring is set up for a single submitter.
            let ring = match io {
                MediaIo::Syscalls => Ok(None),
                MediaIo::Auto | MediaIo::Uring => ring_for(&pool).map(Some),
            };
            let (ring, failed) = match ring {
                Ok(r) => (r, None),
                Err(e) => (None, Some(e)),
            };
            let stop = failed.is_some() && io == MediaIo::Uring;
            // The receiver waits for this report.
            let _ = report.send(failed);
            if !stop {
                Worker::new(s, pool, index, ring).run();
            }
        })?;
        let failed = started
            .recv()
            .map_err(|_| io::Error::other("media thread ended before starting"))?;
        Ok((shard, failed))
    }

    /// Registers a freshly bound pair (level-triggered, for good: the pool keeps it) and
    /// hands its sockets to the thread.
    pub(crate) fn register_pair(&self, idx: u16, socks: &Arc<PairSocks>) -> io::Result<()> {
        for (kind, sock) in [(0u64, &socks.rtp), (1u64, &socks.rtcp)] {
            let token = (u64::from(idx) << 1) | kind;
            epoll::add(&self.epfd, sock, epoll::EventData::new_u64(token), epoll::EventFlags::IN)?;
        }
        self.send(Cmd::Register { idx, socks: Arc::clone(socks) });
        Ok(())
    }

    /// Queues a command; wakes the thread if it is urgent (one eventfd write per burst).
    pub(crate) fn send(&self, cmd: Cmd) {
        let wake = {
            let mut m = self.cmds.lock();
            let wake = cmd.urgent() && !m.woken;
            m.woken |= wake;
            m.cmds.push(cmd);
            wake
        };
        if wake {
            // Fails only if the counter is saturated, and then the thread is woken anyway.
            let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
        }
    }
}

/// The thread's state of one session.
struct Session {
    inner: Arc<SessionInner>,
    pairs: [u16; 2],
    relayer: Relayer,
    bridge: Option<Arc<BridgeShared>>,
    touched: bool,
}

struct Worker {
    shard: Arc<Shard>,
    pool: Arc<PortPool>,
    index: usize,
    /// Pair index → session slot << 1 | side (B = 1), or NO_OWNER.
    owner: Vec<u32>,
    /// Pair index → its sockets, once bound.
    socks: Vec<Option<Arc<PairSocks>>>,
    sessions: Vec<Option<Session>>,
    free_slots: Vec<u32>,
    /// Slots touched this turn (counters to publish).
    touched: Vec<u32>,
    /// By slot: when that session's bridge next needs `handle_timeout` (None: no
    /// bridge or no timeout). Kept apart from the sessions so that finding the due ones
    /// each turn reads one small array.
    deadlines: Vec<Option<Instant>>,
    /// The system-call path's receive buffer.
    buf: Box<[u8]>,
    /// What a bridge sends is written here first.
    out: Box<[u8]>,
    /// Datagrams that reached a pair no session holds.
    stale: u64,
    /// The io_uring doing this thread's socket I/O, if any (else system calls).
    ring: Option<Ring>,
    /// Pair index → its sockets' slots in the ring's file table (RTP, RTCP).
    files: Vec<[u32; 2]>,
    /// The epoll token each receive slot of this turn's ring batch was pushed for.
    batch: Vec<u64>,
}

/// A ring for a media thread: a receive slot per readiness event of a turn, and a file
/// table for every socket of the thread's share of the pool (bounded by the open-files
/// limit, which bounds the sockets that can be open at once).
fn ring_for(pool: &PortPool) -> io::Result<Ring> {
    // Test hook: a node started with this variable behaves as one whose seccomp profile
    // refuses io_uring, so that tests can prove the fallback.
    #[cfg(feature = "fault-injection")]
    if std::env::var_os("CROSSBAR_FAULT_NO_URING").is_some() {
        return Err(io::Error::new(io::ErrorKind::Unsupported, "io_uring refused (fault injection: CROSSBAR_FAULT_NO_URING)"));
    }
    let sockets = 2 * pool.capacity().div_ceil(pool.shards());
    let nofile = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(u64::MAX, |(soft, _)| soft);
    let files = (sockets as u64).min(nofile).max(2);
    Ring::new(MAX_EVENTS, u32::try_from(files).unwrap_or(u32::MAX))
}

impl Worker {
    fn new(shard: Arc<Shard>, pool: Arc<PortPool>, index: usize, ring: Option<Ring>) -> Self {
        let pairs = pool.capacity();
        Self {
            shard,
            pool,
            index,
            owner: vec![NO_OWNER; pairs],
            socks: vec![None; pairs],
            sessions: Vec::new(),
            free_slots: Vec::new(),
            touched: Vec::new(),
            deadlines: Vec::new(),
            buf: vec![0u8; BUF_LEN].into_boxed_slice(),
            out: vec![0u8; BRIDGE_OUT_LEN].into_boxed_slice(),
            stale: 0,
            ring,
            files: vec![NO_FILE; pairs],
            batch: Vec::with_capacity(MAX_EVENTS),
        }
    }

    fn run(mut self) {
        let blank = epoll::Event { flags: epoll::EventFlags::empty(), data: epoll::EventData::new_u64(0) };
        let mut events = vec![blank; MAX_EVENTS];
        let mut last_turn = Instant::now();
        let mut last_trim = last_turn;
        loop {
            let timeout = self.wait(Instant::now());
            let n = match epoll::wait(&self.shard.epfd, &mut events[..], Some(&timeout)) {
                Ok(n) => n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    error!(error = %e, "media thread: epoll_wait failed");
                    thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            let now = Instant::now();
            // Late (the machine is busy, or a turn was long): sockets may hold several
            // datagrams each, so drain them. On time, a socket holds at most one or two
            // (20 ms media, a turn every ~BATCH) and one read per turn saves the read
            // that would only find it empty; what is left is reported again next turn.
            let late = now.duration_since(last_turn) > LATE;
            last_turn = now;
            let mut packets = false;
            // Commands first: a session attached (or a pair registered) before a packet
            // for it was sent is known when that packet is read in this same turn.
            // Read every turn, woken or not (see `Cmd::urgent`).
            let woken = events[..n].iter().any(|ev| ev.data.u64() == WAKE_TOKEN);
            if (woken || !self.shard.cmds.lock().cmds.is_empty()) && !self.commands(woken, now) {
                debug!(stale = self.stale, "media thread stopped");
                return;
            }
            let ready = events[..n].iter().map(|ev| ev.data.u64()).filter(|&t| t != WAKE_TOKEN);
            if self.ring.is_some() && !late {
                packets = self.receive_batch(ready, now);
            } else {
                let budget = if late { LATE_BUDGET } else { 1 };
                for token in ready {
                    packets = true;
                    self.readable(token, budget, now);
                }
            }
            self.timers(Instant::now());
            self.complete_sends();
            self.publish();
            if now.duration_since(last_trim) >= TRIM_EVERY {
                last_trim = now;
                // Closed here: the pool forgot them, this is the last handle (the ring's
                // reference is dropped first; nothing is in flight between turns).
                for idx in self.pool.trim(self.index, IDLE_UNBIND, now) {
                    let idx = usize::from(idx);
                    self.socks[idx] = None;
                    let files = std::mem::replace(&mut self.files[idx], NO_FILE);
                    if let Some(ring) = self.ring.as_mut().filter(|_| files != NO_FILE) {
                        for f in files {
                            ring.unregister(f);
                        }
                    }
                }
            }
            if packets && n < MAX_EVENTS {
                thread::sleep(BATCH);
            }
        }
    }

    /// How long epoll may block: until the earliest bridge timeout, at most a second.
    fn wait(&self, now: Instant) -> Timespec {
        let next = self.deadlines.iter().flatten().min();
        let d = next.map_or(IDLE_WAIT, |t| t.saturating_duration_since(now).min(IDLE_WAIT));
        Timespec { tv_sec: d.as_secs() as _, tv_nsec: d.subsec_nanos() as _ }
    }

    /// Runs the queued commands; false on shutdown.
    /// `woken`: the eventfd is readable (it is read here, or epoll reports it forever).
    fn commands(&mut self, woken: bool, now: Instant) -> bool {
        let cmds = {
            let mut m = self.shard.cmds.lock();
            // Reset under the lock, so that a sender seeing `woken` false writes again.
            // The eventfd may have been written and not yet seen by epoll: read it anyway
            // (EAGAIN when it was not written yet is fine: it is read next turn).
            if std::mem::take(&mut m.woken) || woken {
                let mut counter = [0u8; 8];
                let _ = rustix::io::read(&self.shard.wake, &mut counter);
            }
            std::mem::take(&mut m.cmds)
        };
        for cmd in cmds {
            trace!(?cmd, "media thread command");
            match cmd {
                Cmd::Register { idx, socks } => self.register(usize::from(idx), socks),
                Cmd::Attach { pairs, inner, bridge } => self.attach(pairs, inner, bridge, now),
                Cmd::Detach { key } => self.detach(key),
                Cmd::Kick { key } => {
                    if let Some(slot) = self.slot_of(key) {
                        self.run_bridge(slot, now);
                    }
                }
                Cmd::FinishRecording { key } => {
                    if let Some(slot) = self.slot_of(key) {
                        if let Some(s) = self.sessions[slot as usize].as_mut() {
                            s.relayer.poll_recording(&s.inner);
                        }
                    }
                }
                Cmd::Shutdown => return false,
            }
        }
        true
    }

    /// Keeps a freshly bound pair's sockets, and puts them into the ring's file table.
    fn register(&mut self, idx: usize, socks: Arc<PairSocks>) {
        if idx >= self.socks.len() {
            return;
        }
        if let Some(ring) = self.ring.as_mut() {
            let rtp = ring.register(socks.rtp.as_fd());
            let rtcp = ring.register(socks.rtcp.as_fd());
            match (rtp, rtcp) {
                (Ok(a), Ok(b)) => self.files[idx] = [a, b],
                (a, b) => {
                    // The table is sized for every socket that can be open at once.
                    let e = a.err().or(b.err()).expect("one of them failed");
                    self.drop_ring(&e);
                }
            }
        }
        self.socks[idx] = Some(socks);
    }

    /// Goes on with system calls for good (the ring failed).
    fn drop_ring(&mut self, e: &io::Error) {
        error!(error = %e, "media thread: io_uring failed; going on with system calls");
        self.ring = None;
        self.files.fill(NO_FILE);
    }

    fn slot_of(&self, key: u16) -> Option<u32> {
        let o = *self.owner.get(usize::from(key))?;
        (o != NO_OWNER).then_some(o >> 1)
    }

    fn attach(&mut self, pairs: [u16; 2], inner: Arc<SessionInner>, bridge: Option<Arc<BridgeShared>>, now: Instant) {
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None => {
                self.sessions.push(None);
                self.deadlines.push(None);
                (self.sessions.len() - 1) as u32
            }
        };
        let is_bridge = bridge.is_some();
        self.sessions[slot as usize] = Some(Session { inner, pairs, relayer: Relayer::new(), bridge, touched: false });
        self.deadlines[slot as usize] = None;
        self.owner[usize::from(pairs[0])] = slot << 1;
        self.owner[usize::from(pairs[1])] = (slot << 1) | 1;
        if is_bridge {
            self.run_bridge(slot, now);
        }
    }

    fn detach(&mut self, key: u16) {
        let Some(slot) = self.slot_of(key) else {
            return;
        };
        let Some(mut s) = self.sessions[slot as usize].take() else {
            return;
        };
        s.relayer.flush(&s.inner);
        s.relayer.release(&s.inner);
        for p in s.pairs {
            self.owner[usize::from(p)] = NO_OWNER;
        }
        self.deadlines[slot as usize] = None;
        self.touched.retain(|&t| t != slot);
        self.free_slots.push(slot);
    }

    /// Reads the socket named by `token` with system calls: one datagram, or up to
    /// `budget` when the thread was late (see [`Worker::run`]).
    fn readable(&mut self, token: u64, budget: usize, now: Instant) {
        let pair = (token >> 1) as usize;
        let rtcp = (token & 1) as usize;
        // Registered before any session could use the pair (commands run first).
        let Some(socks) = self.socks.get(pair).and_then(Option::as_ref).map(Arc::clone) else {
            return;
        };
        let sock = if rtcp == 0 { &socks.rtp } else { &socks.rtcp };
        for _ in 0..budget {
            match sock.recv_from(&mut self.buf) {
                Ok((n, src)) => self.datagram(pair, rtcp, src, Held::Buf(n), now),
                // Empty (the drain found the end), or an error report: next turn.
                Err(_) => return,
            }
        }
    }

    /// Reads one datagram from each ready socket through the ring, all in one
    /// submission, and relays them (their sends are queued on the ring, submitted by
    /// [`Worker::complete_sends`]). True if a socket was ready.
    fn receive_batch(&mut self, ready: impl Iterator<Item = u64>, now: Instant) -> bool {
        if self.ring.is_none() {
            return false;
        }
        self.batch.clear();
        let mut any = false;
        for token in ready {
            any = true;
            let files = self.files.get((token >> 1) as usize).copied().unwrap_or(NO_FILE);
            // Not registered yet: its Register command comes next turn.
            if files == NO_FILE {
                continue;
            }
            let peer = self.peer(token);
            let Some(ring) = self.ring.as_mut() else {
                break;
            };
            match ring.recv(files[(token & 1) as usize], peer) {
                Some(slot) => {
                    debug_assert_eq!(slot, self.batch.len());
                    self.batch.push(token);
                }
                // Slots are as many as events per wait: only a poisoned ring says no.
                None => break,
            }
        }
        if let Some(Err(e)) = self.ring.as_mut().map(Ring::flush) {
            self.drop_ring(&e);
            return any;
        }
        for slot in 0..self.batch.len() {
            let token = self.batch[slot];
            let Some(ring) = self.ring.as_ref() else {
                break;
            };
            // Empty after all, or an error report (ICMP): next turn.
            let Ok(d) = ring.received(slot) else {
                continue;
            };
            let (src, truncated) = (d.src, d.truncated);
            self.datagram((token >> 1) as usize, (token & 1) as usize, src, Held::Slot { slot, truncated }, now);
        }
        any
    }

    /// The party the socket named by `token` is connected to (its relayer connected it),
    /// if it is: its only possible source.
    fn peer(&self, token: u64) -> Option<SocketAddr> {
        let owner = *self.owner.get((token >> 1) as usize)?;
        if owner == NO_OWNER {
            return None;
        }
        let s = self.sessions.get((owner >> 1) as usize)?.as_ref()?;
        let side = if owner & 1 == 0 { Side::A } else { Side::B };
        s.relayer.connected(side.rtp_idx() + (token & 1) as usize)
    }

    /// One datagram from `src` on pair `pair`, held in `held`.
    fn datagram(&mut self, pair: usize, rtcp: usize, src: SocketAddr, held: Held, now: Instant) {
        let owner = self.owner.get(pair).copied().unwrap_or(NO_OWNER);
        if owner == NO_OWNER {
            self.stale += 1;
            return;
        }
        let slot = owner >> 1;
        let side = if owner & 1 == 0 { Side::A } else { Side::B };
        let Some(s) = self.sessions[slot as usize].as_mut() else {
            return;
        };
        if !s.touched {
            s.touched = true;
            self.touched.push(slot);
        }
        let idx = side.rtp_idx() + rtcp;
        let data = match held {
            Held::Buf(n) if n < BUF_LEN => &self.buf[..n],
            Held::Slot { slot, truncated: false } => match self.ring.as_ref().map(|r| r.received(slot)) {
                Some(Ok(d)) => d.data,
                _ => return,
            },
            _ => {
                s.relayer.count_dropped(idx);
                return;
            }
        };
        match &s.bridge {
            None => match held {
                Held::Buf(_) => {
                    s.relayer.on_packet(&s.inner, idx, data, src);
                }
                Held::Slot { slot: recv_slot, .. } => {
                    let Some(route) = s.relayer.route(&s.inner, idx, src) else {
                        return;
                    };
                    let file = self.files[usize::from(s.pairs[route.out / 2])][route.out % 2];
                    let ring = self.ring.as_mut().expect("the datagram is in the ring");
                    if !ring.send_received(file, recv_slot, route.dest, relay_tag(slot, idx)) {
                        // Poisoned meanwhile: the datagram is lost, as on a full buffer.
                        s.relayer.count_dropped(idx);
                    }
                }
            },
            Some(b) => {
                // Browsers multiplex RTCP (rtcp-mux); a plain party's RTCP port is not
                // bridged (str0m makes the browser leg's own reports).
                if rtcp == 1 {
                    return;
                }
                let from = unmap(src);
                let mut g = b.bridge.lock();
                g.handle_receive(side, from, data, now);
                let via = Via { ring: self.ring.as_mut(), files: s.pairs.map(|p| self.files[usize::from(p)]) };
                self.deadlines[slot as usize] = transmit(&mut g, &s.inner, &mut s.relayer, &mut self.out, via);
            }
        }
    }

    /// Submits the sends queued on the ring this turn, waits for them (they never wait:
    /// `MSG_DONTWAIT`), and counts (and records) what was relayed.
    fn complete_sends(&mut self) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        if let Err(e) = ring.flush() {
            self.drop_ring(&e);
            return;
        }
        for (tag, result, data) in ring.sent() {
            if tag == BRIDGE_TAG {
                if let Err(e) = result {
                    trace!(error = %e, "bridge send failed");
                }
                continue;
            }
            let (slot, idx) = ((tag >> 2) as usize, (tag & 3) as usize);
            if let Some(s) = self.sessions.get_mut(slot).and_then(Option::as_mut) {
                s.relayer.sent(idx, idx ^ 2, data, result);
            }
        }
        ring.clear();
    }

    /// Feeds due timeouts to the bridges.
    fn timers(&mut self, now: Instant) {
        for slot in 0..self.deadlines.len() {
            if self.deadlines[slot].is_some_and(|d| d <= now) {
                self.run_bridge(slot as u32, now);
            }
        }
    }

    /// Runs a bridge's timers now and sends what it has to send.
    fn run_bridge(&mut self, slot: u32, now: Instant) {
        let Some(s) = self.sessions[slot as usize].as_mut() else {
            return;
        };
        let Some(b) = &s.bridge else {
            return;
        };
        let mut g = b.bridge.lock();
        g.handle_timeout(now);
        // A party whose latch ended (a plain party's new SDP, a quiet browser) is heard
        // again from anywhere.
        for side in [Side::A, Side::B] {
            let latched = g.latched(side).map(|a| s.inner.v6_dest(a));
            s.relayer.keep_connection(&s.inner, side.rtp_idx(), latched);
        }
        let via = Via { ring: self.ring.as_mut(), files: s.pairs.map(|p| self.files[usize::from(p)]) };
        self.deadlines[slot as usize] = transmit(&mut g, &s.inner, &mut s.relayer, &mut self.out, via);
    }

    /// Publishes the counters of the sessions that saw packets this turn.
    fn publish(&mut self) {
        for slot in self.touched.drain(..) {
            if let Some(s) = self.sessions[slot as usize].as_mut() {
                s.touched = false;
                s.relayer.flush(&s.inner);
            }
        }
    }
}

/// Where a received datagram is.
#[derive(Debug, Clone, Copy)]
enum Held {
    /// The first `n` bytes of the system-call path's buffer.
    Buf(usize),
    /// A receive slot of the ring.
    Slot { slot: usize, truncated: bool },
}

/// How a bridge's datagrams leave: queued on the ring (as copies) when the thread has
/// one, else sent at once.
struct Via<'a> {
    ring: Option<&'a mut Ring>,
    /// The ring's file slots of the session's pairs (A, B).
    files: [[u32; 2]; 2],
}

/// Sends what the bridge has to send (through `out`); returns its next timeout.
/// A party's socket is connected to it once latched (see [`Bridge::latched`]), as a
/// relay's is (see [`Relayer::send_dest`]): no route lookup per send, and no stranger
/// heard on it.
fn transmit(b: &mut Bridge, inner: &SessionInner, relayer: &mut Relayer, out: &mut [u8], mut via: Via<'_>) -> Option<Instant> {
    while let Some((side, dest, n)) = b.poll_transmit(out) {
        // A bridge sends from its RTP sockets only (rtcp-mux on the browser's side).
        let idx = side.rtp_idx();
        let latched = b.latched(side).map(|a| inner.v6_dest(a));
        let dest = relayer.send_dest(inner, idx, inner.v6_dest(dest), latched);
        let file = via.files[idx / 2][0];
        let queued = match via.ring.as_deref_mut() {
            Some(ring) if file != u32::MAX => ring.send_copy(file, &out[..n], dest, BRIDGE_TAG),
            _ => false,
        };
        if !queued {
            let sock = inner.sock(idx);
            let sent = match dest {
                Some(dest) => send_to(sock, &out[..n], dest).map(drop),
                None => sock.send(&out[..n]).map(drop),
            };
            if let Err(e) = sent {
                trace!(?side, error = %e, "bridge send failed");
            }
        }
    }
    b.poll_timeout()
}
