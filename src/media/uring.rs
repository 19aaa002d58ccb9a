//! io_uring for the media threads: one `io_uring_enter` for all the receives of a turn
//! and one for all its sends, instead of a `recvfrom` and a `sendto` per datagram.
//!
//! The only module of the crate with `unsafe` code (`#![deny(unsafe_code)]` in lib.rs):
//! the kernel reads and writes the memory a ring operation points to (buffers, socket
//! addresses, `msghdr`s) until its completion is reaped, which the compiler cannot see.
//! What makes the safe API of [`Ring`] sound:
//!
//! - Every buffer, address and header an operation points to is owned by the ring and
//!   never moves: each is boxed on its own, and a pool that grows adds boxes without
//!   moving the ones it has.
//! - No operation outlives the call that submits it: receives and sends carry
//!   `MSG_DONTWAIT`, so an empty socket or a full socket buffer completes the operation
//!   at once with `EAGAIN` instead of leaving it pending in the kernel (checked when a
//!   ring is made, see [`Ring::new`]), and [`Ring::flush`] waits for exactly as many
//!   completions as operations were pushed. Slots are handed out again only by
//!   [`Ring::clear`], which refuses while anything is in flight.
//! - Operations name sockets by their slot in the ring's registered file table, never by
//!   descriptor number: the ring holds its own reference to each registered socket, so
//!   a socket closed by its owner can never become another file under a queued operation.
//! - If the kernel ever fails to complete what was pushed (an `io_uring_enter` error
//!   other than an interruption), the ring is poisoned: it takes no more operations, and
//!   when dropped it leaks its memory rather than free it under operations that may still
//!   be in flight. The media thread then goes on with system calls.
#![allow(unsafe_code)]

use std::io;
use std::mem;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use io_uring::{opcode, squeue, types, IoUring};
use socket2::SockAddr;

/// Bytes a receive slot holds. Carrier RTP and browser SRTP/DTLS are far below the
/// Ethernet MTU; a longer datagram is reported truncated (and dropped by the relay).
pub(crate) const SLOT_LEN: usize = 2048;

/// Submission queue entries. A turn pushes up to one receive per ready socket (at most
/// [`super::engine`]'s events per wait, 512) and about as many sends; when the queue is
/// full it is submitted early, so this bounds no turn.
const SQ_ENTRIES: u32 = 1024;

/// `user_data` of a send (index in `sends`); receives carry their slot index.
const SEND_BIT: u64 = 1 << 63;

/// One receive: its buffer and the header the kernel fills in.
struct RecvSlot {
    buf: [u8; SLOT_LEN],
    name: libc::sockaddr_storage,
    iov: libc::iovec,
    msg: libc::msghdr,
    /// The completion's result: the datagram's length (even when longer than the
    /// buffer: `MSG_TRUNC`), or a negated errno.
    result: i32,
    /// Completed (the kernel is done with the slot).
    done: bool,
    /// The source, known in advance when the socket is connected (a plain `recv`,
    /// without the header).
    peer: Option<SocketAddr>,
}

/// What a send sends.
#[derive(Clone, Copy)]
enum Payload {
    /// The datagram of a receive slot (relayed without a copy).
    Received(usize),
    /// A copy in `copies`.
    Copied(usize),
}

/// One send: its destination (when the socket is not connected) and outcome.
struct SendOp {
    dest: Option<SockAddr>,
    payload: Payload,
    len: usize,
    tag: u64,
    result: i32,
}

/// A datagram a receive slot holds.
#[derive(Debug)]
pub(crate) struct Datagram<'a> {
    pub(crate) data: &'a [u8],
    pub(crate) src: SocketAddr,
    /// Longer than [`SLOT_LEN`]: `data` is its beginning only.
    pub(crate) truncated: bool,
}

/// A media thread's io_uring with the memory its operations use.
// Boxed one by one on purpose: a pool that grows must not move what the kernel points to.
#[allow(clippy::vec_box)]
pub(crate) struct Ring {
    /// Declared first, so dropped (closed) before the memory below is freed.
    ring: IoUring,
    recv: Vec<Box<RecvSlot>>,
    /// Receive slots handed out since the last [`Ring::clear`].
    recvs: usize,
    sends: Vec<Box<SendOp>>,
    /// Sends pushed since the last [`Ring::clear`].
    queued: usize,
    copies: Vec<Box<[u8; SLOT_LEN]>>,
    copies_used: usize,
    /// Operations pushed and not yet reaped.
    in_flight: usize,
    /// Free slots of the registered file table.
    free_files: Vec<u32>,
    poisoned: bool,
}

impl Ring {
    /// A ring with `receives` receive slots and a registered file table of `files`
    /// sockets, after checking on a pair of loopback sockets that this kernel does what
    /// the media thread relies on: a `MSG_DONTWAIT` receive on an empty socket completes
    /// with `EAGAIN` (rather than stay pending), a send takes a destination address, a
    /// receive reports its source. Fails where io_uring is not available (seccomp
    /// profiles of containers, `kernel.io_uring_disabled`, kernels before 6.0).
    pub(crate) fn new(receives: usize, files: u32) -> io::Result<Ring> {
        let ring = IoUring::builder().setup_coop_taskrun().setup_single_issuer().build(SQ_ENTRIES)?;
        ring.submitter().register_files_sparse(files)?;
        let mut r = Ring {
            ring,
            recv: (0..receives).map(|_| RecvSlot::new()).collect(),
            recvs: 0,
            sends: Vec::new(),
            queued: 0,
            copies: Vec::new(),
            copies_used: 0,
            in_flight: 0,
            free_files: (0..files).rev().collect(),
            poisoned: false,
        };
        r.self_test()?;
        Ok(r)
    }

    fn self_test(&mut self) -> io::Result<()> {
        let bind = || -> io::Result<UdpSocket> {
            let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
            s.set_nonblocking(true)?;
            Ok(s)
        };
        let (a, b) = (bind()?, bind()?);
        let (a_addr, b_addr) = (a.local_addr()?, b.local_addr()?);
        let fa = self.register(a.as_fd())?;
        let fb = match self.register(b.as_fd()) {
            Ok(f) => f,
            Err(e) => {
                self.unregister(fa);
                return Err(e);
            }
        };
        let result = (|| {
            let unsupported = |what: &str| io::Error::new(io::ErrorKind::Unsupported, format!("io_uring: {what}"));
            let slot = self.recv(fa, None).ok_or_else(|| unsupported("no receive slot"))?;
            // Submitted without waiting: a receive that stayed pending would block a wait.
            self.submit_and_reap(0)?;
            if self.in_flight != 0 {
                self.poisoned = true;
                return Err(unsupported("a MSG_DONTWAIT receive on an empty socket stayed pending"));
            }
            match self.received(slot) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => return Err(unsupported(&format!("a receive on an empty socket gave {other:?}"))),
            }
            self.clear();
            if !self.send_copy(fb, b"probe", Some(a_addr), 0) {
                return Err(unsupported("no send slot"));
            }
            self.flush()?;
            if let Some((_, Err(e), _)) = self.sent().next() {
                return Err(unsupported(&format!("a send with a destination failed: {e}")));
            }
            self.clear();
            let slot = self.recv(fa, None).ok_or_else(|| unsupported("no receive slot"))?;
            self.flush()?;
            match self.received(slot) {
                Ok(d) if d.data == b"probe" && d.src == b_addr => {}
                other => return Err(unsupported(&format!("a receive gave {other:?}"))),
            }
            self.clear();
            Ok(())
        })();
        self.unregister(fa);
        self.unregister(fb);
        result
    }

    /// Puts a socket into the file table: its slot, which operations name it by. The
    /// table keeps its own reference to the socket until [`Ring::unregister`].
    pub(crate) fn register(&mut self, sock: BorrowedFd<'_>) -> io::Result<u32> {
        let file = self
            .free_files
            .pop()
            .ok_or_else(|| io::Error::other("io_uring file table full"))?;
        match self.ring.submitter().register_files_update(file, &[sock.as_raw_fd()]) {
            Ok(_) => Ok(file),
            Err(e) => {
                self.free_files.push(file);
                Err(e)
            }
        }
    }

    /// Takes a socket out of the file table (the table's reference is dropped: the
    /// socket closes when its owner closes it).
    pub(crate) fn unregister(&mut self, file: u32) {
        // -1 empties the slot. An operation queued on it would fail with EBADF: it can
        // never reach another file.
        match self.ring.submitter().register_files_update(file, &[-1]) {
            Ok(_) => self.free_files.push(file),
            // The slot is lost, not reused: it may still name the socket.
            Err(e) => tracing::warn!(error = %e, file, "io_uring: unregistering a socket failed"),
        }
    }

    /// Frees every receive slot, send and copy for the next turn. Refused (a no-op)
    /// while operations are in flight, i.e. only when poisoned.
    pub(crate) fn clear(&mut self) {
        if self.in_flight == 0 {
            self.recvs = 0;
            self.queued = 0;
            self.copies_used = 0;
        }
    }

    /// Pushes a receive on registered socket `file` into the next free slot; None when
    /// every slot of this turn is taken (or the ring is poisoned). `peer`: the address
    /// the socket is connected to, if it is (the kernel then takes no other source, and
    /// a plain `recv` is cheaper than a `recvmsg`).
    pub(crate) fn recv(&mut self, file: u32, peer: Option<SocketAddr>) -> Option<usize> {
        if self.poisoned || self.recvs == self.recv.len() {
            return None;
        }
        let idx = self.recvs;
        let slot = &mut *self.recv[idx];
        slot.done = false;
        slot.peer = peer;
        // MSG_TRUNC: the result is the datagram's length, which tells a truncated one.
        let flags = libc::MSG_DONTWAIT | libc::MSG_TRUNC;
        let entry = if peer.is_some() {
            opcode::Recv::new(types::Fixed(file), slot.buf.as_mut_ptr(), SLOT_LEN as u32).flags(flags).build()
        } else {
            slot.iov = libc::iovec { iov_base: slot.buf.as_mut_ptr().cast(), iov_len: SLOT_LEN };
            slot.msg.msg_name = std::ptr::addr_of_mut!(slot.name).cast();
            slot.msg.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            slot.msg.msg_iov = &mut slot.iov;
            slot.msg.msg_iovlen = 1;
            slot.msg.msg_control = std::ptr::null_mut();
            slot.msg.msg_controllen = 0;
            slot.msg.msg_flags = 0;
            opcode::RecvMsg::new(types::Fixed(file), &mut slot.msg).flags(flags as u32).build()
        };
        let entry = entry.user_data(idx as u64);
        // SAFETY: the header, iovec, buffer and name this points to live in the boxed
        // slot `idx`, owned by the ring, which never moves or frees it while the
        // operation is in flight: the slot is handed out again only by `clear`, which
        // needs every operation reaped, and a ring dropped with operations in flight
        // leaks its slots (see `Drop`).
        if !unsafe { self.push(&entry) } {
            return None;
        }
        self.recvs += 1;
        Some(idx)
    }

    /// The outcome of receive slot `slot` (after [`Ring::flush`]).
    pub(crate) fn received(&self, slot: usize) -> io::Result<Datagram<'_>> {
        let s = match self.recv.get(slot) {
            Some(s) if slot < self.recvs && s.done => s,
            _ => return Err(io::Error::other("receive slot not completed")),
        };
        if s.result < 0 {
            return Err(io::Error::from_raw_os_error(-s.result));
        }
        let src = match s.peer {
            Some(peer) => peer,
            None => {
                // SAFETY: `name` is a sockaddr_storage the kernel filled in (any bytes
                // are a valid sockaddr_storage) and the length is at most its size.
                let name = unsafe { SockAddr::new(s.name, s.msg.msg_namelen.min(mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t)) };
                name.as_socket().ok_or_else(|| io::Error::other("datagram from a non-IP source"))?
            }
        };
        let len = s.result as usize;
        Ok(Datagram { data: &s.buf[..len.min(SLOT_LEN)], src, truncated: len > SLOT_LEN })
    }

    /// Queues a send of receive slot `slot`'s datagram (no copy) out of registered socket
    /// `file`, to `dest` (None: the socket is connected). `tag` comes back with its
    /// outcome from [`Ring::sent`]. False when it could not be queued (the slot holds no
    /// datagram, or the ring is poisoned).
    pub(crate) fn send_received(&mut self, file: u32, slot: usize, dest: Option<SocketAddr>, tag: u64) -> bool {
        let len = match self.recv.get(slot) {
            Some(s) if slot < self.recvs && s.done && s.result >= 0 => (s.result as usize).min(SLOT_LEN),
            _ => return false,
        };
        self.send(file, Payload::Received(slot), len, dest, tag)
    }

    /// Queues a send of a copy of `data` (at most [`SLOT_LEN`] bytes), as
    /// [`Ring::send_received`] does.
    pub(crate) fn send_copy(&mut self, file: u32, data: &[u8], dest: Option<SocketAddr>, tag: u64) -> bool {
        if self.poisoned || data.len() > SLOT_LEN {
            return false;
        }
        if self.copies_used == self.copies.len() {
            self.copies.push(Box::new([0; SLOT_LEN]));
        }
        let c = self.copies_used;
        self.copies[c][..data.len()].copy_from_slice(data);
        if !self.send(file, Payload::Copied(c), data.len(), dest, tag) {
            return false;
        }
        self.copies_used += 1;
        true
    }

    fn send(&mut self, file: u32, payload: Payload, len: usize, dest: Option<SocketAddr>, tag: u64) -> bool {
        if self.poisoned {
            return false;
        }
        if self.queued == self.sends.len() {
            self.sends.push(Box::new(SendOp { dest: None, payload, len, tag, result: 0 }));
        }
        let idx = self.queued;
        let op = &mut *self.sends[idx];
        *op = SendOp { dest: dest.map(SockAddr::from), payload, len, tag, result: 0 };
        let buf = match payload {
            Payload::Received(s) => self.recv[s].buf.as_ptr(),
            Payload::Copied(c) => self.copies[c].as_ptr(),
        };
        let mut send = opcode::Send::new(types::Fixed(file), buf, len as u32).flags(libc::MSG_DONTWAIT);
        if let Some(d) = &op.dest {
            send = send.dest_addr(d.as_ptr()).dest_addr_len(d.len());
        }
        let entry = send.build().user_data(SEND_BIT | idx as u64);
        // SAFETY: the data is a completed receive slot's buffer or a copy buffer, and
        // the destination lives in the boxed send `idx`: all owned by the ring, never
        // moved, and neither written nor reused until `clear`, which needs every
        // operation reaped (a ring dropped with operations in flight leaks them).
        if !unsafe { self.push(&entry) } {
            return false;
        }
        self.queued += 1;
        true
    }

    /// Pushes one entry, submitting what is queued when the queue is full. False when
    /// the ring is poisoned.
    ///
    /// # Safety
    ///
    /// Whatever `entry` points to must stay valid, unmoved and (but for the kernel)
    /// untouched until its completion is reaped.
    unsafe fn push(&mut self, entry: &squeue::Entry) -> bool {
        loop {
            // SAFETY: the caller's promise, passed on.
            let pushed = unsafe { self.ring.submission().push(entry) };
            if pushed.is_ok() {
                self.in_flight += 1;
                return true;
            }
            if self.submit_and_reap(0).is_err() {
                return false;
            }
        }
    }

    /// Submits everything queued and waits until every operation pushed so far has
    /// completed; their outcomes are then in [`Ring::received`] and [`Ring::sent`]. An
    /// error poisons the ring.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        while self.in_flight > 0 {
            self.submit_and_reap(self.in_flight)?;
        }
        Ok(())
    }

    /// Submits, waits for `want` completions (0: none), and reaps what completed.
    fn submit_and_reap(&mut self, want: usize) -> io::Result<()> {
        match self.ring.submit_and_wait(want) {
            Ok(_) => {}
            // Interrupted, or the completion queue is full (reaped below): try again.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)) => {}
            Err(e) => {
                self.poisoned = true;
                return Err(e);
            }
        }
        for cqe in self.ring.completion() {
            let ud = cqe.user_data();
            if ud & SEND_BIT != 0 {
                if let Some(op) = self.sends.get_mut((ud & !SEND_BIT) as usize) {
                    op.result = cqe.result();
                }
            } else if let Some(slot) = self.recv.get_mut(ud as usize) {
                slot.result = cqe.result();
                slot.done = true;
            }
            self.in_flight -= 1;
        }
        Ok(())
    }

    /// The sends of this turn (after [`Ring::flush`]): tag, outcome, data sent.
    pub(crate) fn sent(&self) -> impl Iterator<Item = (u64, io::Result<()>, &[u8])> + '_ {
        self.sends[..self.queued].iter().map(|op| {
            let data = match op.payload {
                Payload::Received(s) => &self.recv[s].buf[..op.len],
                Payload::Copied(c) => &self.copies[c][..op.len],
            };
            let result = if op.result < 0 { Err(io::Error::from_raw_os_error(-op.result)) } else { Ok(()) };
            (op.tag, result, data)
        })
    }
}

impl RecvSlot {
    fn new() -> Box<RecvSlot> {
        Box::new(RecvSlot {
            buf: [0; SLOT_LEN],
            // SAFETY: all-zero bytes are a valid sockaddr_storage, iovec and msghdr
            // (integers, and pointers that are null).
            name: unsafe { mem::zeroed() },
            iov: unsafe { mem::zeroed() },
            msg: unsafe { mem::zeroed() },
            result: 0,
            done: false,
            peer: None,
        })
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        if self.in_flight != 0 {
            // Only a poisoned ring gets here. The kernel may still write into (or read)
            // this memory until it has cancelled the operations, after the ring is
            // closed: leaked, never freed.
            mem::forget(mem::take(&mut self.recv));
            mem::forget(mem::take(&mut self.sends));
            mem::forget(mem::take(&mut self.copies));
        }
    }
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("receive_slots", &self.recv.len())
            .field("in_flight", &self.in_flight)
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind() -> UdpSocket {
        let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        s.set_nonblocking(true).unwrap();
        s
    }

    /// The kernel behaviour the media thread relies on (kernel 6.18 here): `new`
    /// checks it, and fails where io_uring is blocked, which this test then reports.
    #[test]
    fn dontwait_completes_empty_receives_and_relays_a_batch() {
        let mut ring = match Ring::new(8, 16) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("io_uring unavailable here, not tested: {e}");
                return;
            }
        };
        let (relay_a, relay_b, party_a, party_b) = (bind(), bind(), bind(), bind());
        let fa = ring.register(relay_a.as_fd()).unwrap();
        let fb = ring.register(relay_b.as_fd()).unwrap();
        party_a.send_to(b"one", relay_a.local_addr().unwrap()).unwrap();
        // One full and one empty socket in the same submission.
        let full = ring.recv(fa, None).unwrap();
        let empty = ring.recv(fb, None).unwrap();
        ring.flush().unwrap();
        let d = ring.received(full).unwrap();
        assert_eq!((d.data, d.src, d.truncated), (&b"one"[..], party_a.local_addr().unwrap(), false));
        assert_eq!(ring.received(empty).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        // Relayed without a copy, to an address; and a copy to a connected socket.
        assert!(ring.send_received(fb, full, Some(party_b.local_addr().unwrap()), 7));
        relay_a.connect(party_a.local_addr().unwrap()).unwrap();
        assert!(ring.send_copy(fa, b"two", None, 8));
        assert!(!ring.send_received(fb, empty, None, 9), "an empty slot has nothing to send");
        ring.flush().unwrap();
        let tags: Vec<_> = ring.sent().map(|(t, r, d)| (t, r.is_ok(), d.to_vec())).collect();
        assert_eq!(tags, vec![(7, true, b"one".to_vec()), (8, true, b"two".to_vec())]);
        let mut buf = [0u8; 16];
        assert_eq!(party_b.recv_from(&mut buf).unwrap(), (3, relay_b.local_addr().unwrap()));
        assert_eq!(party_a.recv_from(&mut buf).unwrap(), (3, relay_a.local_addr().unwrap()));
        // A datagram longer than a slot is reported truncated, through recvmsg and
        // through recv (a connected socket: the source is the peer).
        ring.clear();
        let big = [1u8; SLOT_LEN + 10];
        party_a.send_to(&big, relay_a.local_addr().unwrap()).unwrap();
        party_a.send_to(&big[..SLOT_LEN], relay_a.local_addr().unwrap()).unwrap();
        party_b.send_to(&big, relay_b.local_addr().unwrap()).unwrap();
        let s1 = ring.recv(fa, Some(party_a.local_addr().unwrap())).unwrap();
        let s2 = ring.recv(fa, Some(party_a.local_addr().unwrap())).unwrap();
        let s3 = ring.recv(fb, None).unwrap();
        ring.flush().unwrap();
        for (s, truncated, src) in [(s1, true, &party_a), (s2, false, &party_a), (s3, true, &party_b)] {
            let d = ring.received(s).unwrap();
            assert_eq!((d.truncated, d.data.len(), d.src), (truncated, SLOT_LEN, src.local_addr().unwrap()));
        }
        // Every slot is taken until cleared.
        ring.clear();
        for _ in 0..8 {
            assert!(ring.recv(fb, None).is_some());
        }
        assert!(ring.recv(fb, None).is_none());
        ring.flush().unwrap();
        ring.unregister(fa);
        ring.unregister(fb);
    }
}
