//! RTP port pool: even RTP ports (RTCP = RTP + 1), each pair belonging to one media
//! thread (shard): pair `i` is served by shard `i % shards`.
//!
//! A pair's sockets, once bound, stay bound (and registered with their media thread)
//! between calls: a call usually takes a pair without a single system call. Each shard
//! keeps two FIFO queues of free pairs:
//!
//! - bound pairs, each with the time it was freed. One is handed out again only after
//!   [`QUARANTINE`], so packets still in flight for an ended call do not reach the next
//!   call on the same ports, and round-robin: a freed pair waits behind every other.
//! - never-bound pairs (or unbound again), taken when no bound pair is out of
//!   quarantine; the caller binds them.
//!
//! So the node holds about as many sockets as its peak concurrency (plus a quarantine's
//! worth of call set-ups), not the whole range: the open-files limit is usually lower
//! than the range. Pairs idle for [`IDLE_UNBIND`] are unbound by their media thread
//! (`trim`), so a peak's sockets do not stay forever.
//!
//! Nor may media take every descriptor the process has: at capacity calls live
//! longer (they queue), hold more pairs, and a range as large as the open-files
//! limit would leave nothing for SIP connections (TCP, TLS, WebSocket) or the
//! store. Pairs are bound only up to [`max_bound_pairs`] of the limit; past it a
//! call takes a pair still in quarantine, as when the kernel says EMFILE.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::engine::PairSocks;

/// A freed bound pair is not handed out again before this (unless nothing else is left).
pub(crate) const QUARANTINE: Duration = Duration::from_millis(500);

/// A bound pair free for this long is unbound (its sockets closed).
pub(crate) const IDLE_UNBIND: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct ShardPool {
    /// Free pairs with sockets, oldest-freed first.
    bound: VecDeque<(u16, Instant)>,
    /// Free pairs without sockets, in the order they will be bound.
    unbound: VecDeque<u16>,
}

#[derive(Debug)]
pub(crate) struct PortPool {
    /// First RTP port of the range (even).
    base: u16,
    /// Number of RTP/RTCP pairs in the range.
    pairs: usize,
    shards: Vec<Mutex<ShardPool>>,
    /// The bound sockets of each pair, once bound (by pair index).
    socks: Vec<Mutex<Option<Arc<PairSocks>>>>,
    /// Pairs bound now, and the most that may be (see [`max_bound_pairs`]).
    bound_count: AtomicUsize,
    max_bound: usize,
}

/// How many RTP/RTCP pairs (two descriptors each) media may hold open under an
/// open-files limit of `nofile`: the limit less a reserve for everything else (a
/// tenth of it, at least 256 and at most half).
pub(crate) fn max_bound_pairs(nofile: u64) -> usize {
    let reserve = (nofile / 10).clamp(256.min(nofile / 2), nofile / 2);
    usize::try_from(nofile.saturating_sub(reserve) / 2).unwrap_or(usize::MAX)
}

/// What `take` hands out: a pair, and whether it still has to be bound.
pub(crate) struct Taken {
    pub(crate) idx: u16,
    pub(crate) bound: bool,
}

impl PortPool {
    /// `port_min` must be even and `port_max >= port_min + 1`, `shards >= 1`; checked
    /// by the caller.
    pub(crate) fn new(port_min: u16, port_max: u16, shards: usize) -> Self {
        // A pair needs both p and p+1 inside [min, max]: floor((max - min + 1) / 2).
        let pairs = (usize::from(port_max) - usize::from(port_min)).div_ceil(2);
        let shards = shards.max(1);
        let mut pools: Vec<ShardPool> = (0..shards).map(|_| ShardPool::default()).collect();
        // pairs <= 32768, so every index fits in u16.
        for i in (0..pairs).filter_map(|i| u16::try_from(i).ok()) {
            pools[usize::from(i) % shards].unbound.push_back(i);
        }
        let nofile = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(u64::MAX, |(soft, _)| soft);
        Self {
            base: port_min,
            pairs,
            shards: pools.into_iter().map(Mutex::new).collect(),
            socks: (0..pairs).map(|_| Mutex::new(None)).collect(),
            bound_count: AtomicUsize::new(0),
            max_bound: max_bound_pairs(nofile),
        }
    }

    /// The same pool allowed at most `max_bound` bound pairs (tests).
    #[cfg(test)]
    pub(crate) fn with_max_bound(mut self, max_bound: usize) -> Self {
        self.max_bound = max_bound;
        self
    }

    /// The most pairs that may be bound at once (the descriptor budget).
    pub(crate) fn max_bound(&self) -> usize {
        self.max_bound
    }

    /// Number of RTP/RTCP pairs the range holds.
    pub(crate) fn capacity(&self) -> usize {
        self.pairs
    }

    /// Media threads the range is split between.
    pub(crate) fn shards(&self) -> usize {
        self.shards.len()
    }

    /// Pairs currently handed out (including ones being bound right now).
    pub(crate) fn pairs_in_use(&self) -> usize {
        let free: usize = self
            .shards
            .iter()
            .map(|s| {
                let s = s.lock();
                s.bound.len() + s.unbound.len()
            })
            .sum();
        self.pairs - free
    }

    /// Pairs of one shard that are free now (bound or not).
    pub(crate) fn free_in_shard(&self, shard: usize) -> usize {
        let s = self.shards[shard].lock();
        s.bound.len() + s.unbound.len()
    }

    /// Bound pairs held by the pool or by calls (sockets open: 2 per pair).
    pub(crate) fn bound_pairs(&self) -> usize {
        self.socks.iter().filter(|s| s.lock().is_some()).count()
    }

    /// Takes a free pair of `shard`: a bound one out of quarantine, else one to bind
    /// (`prefer_bound`: any bound one, quarantine or not, e.g. when binding failed for
    /// lack of file descriptors). None when the shard has no free pair.
    pub(crate) fn take(&self, shard: usize, prefer_bound: bool, now: Instant) -> Option<Taken> {
        let mut s = self.shards[shard].lock();
        let ready = s.bound.front().is_some_and(|&(_, freed)| prefer_bound || now.duration_since(freed) >= QUARANTINE);
        if ready {
            return s.bound.pop_front().map(|(idx, _)| Taken { idx, bound: true });
        }
        if let Some(idx) = s.unbound.pop_front() {
            return Some(Taken { idx, bound: false });
        }
        s.bound.pop_front().map(|(idx, _)| Taken { idx, bound: true })
    }

    /// Puts a pair back at the tail of its queue.
    fn give_back(&self, idx: u16) {
        let bound = self.socks[usize::from(idx)].lock().is_some();
        let mut s = self.shards[usize::from(idx) % self.shards.len()].lock();
        if bound {
            s.bound.push_back((idx, Instant::now()));
        } else {
            s.unbound.push_back(idx);
        }
    }

    /// Unbinds the pairs of `shard` free for longer than `idle`: returns them (their
    /// media thread drops its handles, which closes the sockets).
    pub(crate) fn trim(&self, shard: usize, idle: Duration, now: Instant) -> Vec<u16> {
        let mut out = Vec::new();
        let mut s = self.shards[shard].lock();
        while let Some(&(idx, freed)) = s.bound.front() {
            if now.duration_since(freed) < idle {
                break;
            }
            s.bound.pop_front();
            if self.socks[usize::from(idx)].lock().take().is_some() {
                self.bound_count.fetch_sub(1, Ordering::Relaxed);
            }
            s.unbound.push_back(idx);
            out.push(idx);
        }
        out
    }

    pub(crate) fn rtp_port(&self, idx: u16) -> u16 {
        self.base + idx * 2
    }

    /// The pair's sockets: bound before, else `bind(rtp_port)`'s, kept for next time.
    /// With the descriptor budget spent, fails as the kernel would (EMFILE) without
    /// trying.
    pub(crate) fn sockets(&self, idx: u16, bind: impl FnOnce(u16) -> std::io::Result<Arc<PairSocks>>) -> std::io::Result<Arc<PairSocks>> {
        let mut slot = self.socks[usize::from(idx)].lock();
        if let Some(s) = &*slot {
            return Ok(Arc::clone(s));
        }
        if self.bound_count.load(Ordering::Relaxed) >= self.max_bound {
            return Err(std::io::Error::from_raw_os_error(super::EMFILE));
        }
        let s = bind(self.rtp_port(idx))?;
        self.bound_count.fetch_add(1, Ordering::Relaxed);
        *slot = Some(Arc::clone(&s));
        Ok(s)
    }
}

/// One leased RTP/RTCP pair; returned to the pool when dropped.
#[derive(Debug)]
pub(crate) struct PairLease {
    pool: Arc<PortPool>,
    idx: u16,
}

impl PairLease {
    /// Leases a free pair of `shard` (see [`PortPool::take`]), or None when the shard
    /// is full. Also says whether the pair was bound already.
    pub(crate) fn take(pool: &Arc<PortPool>, shard: usize, prefer_bound: bool) -> Option<(Self, bool)> {
        pool.take(shard, prefer_bound, Instant::now()).map(|t| {
            (
                Self {
                    pool: Arc::clone(pool),
                    idx: t.idx,
                },
                t.bound,
            )
        })
    }

    pub(crate) fn idx(&self) -> u16 {
        self.idx
    }

    pub(crate) fn rtp_port(&self) -> u16 {
        self.pool.rtp_port(self.idx)
    }
}

impl Drop for PairLease {
    fn drop(&mut self) {
        self.pool.give_back(self.idx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_not_lifo() {
        let pool = Arc::new(PortPool::new(30000, 30007, 1));
        assert_eq!(pool.capacity(), 4);
        let a = PairLease::take(&pool, 0, false).unwrap().0;
        assert_eq!(a.rtp_port(), 30000);
        drop(a);
        // The freed pair goes to the back: the next three allocations are fresh ports.
        let got: Vec<u16> = (0..4)
            .map(|_| {
                let l = PairLease::take(&pool, 0, false).unwrap().0;
                let p = l.rtp_port();
                std::mem::forget(l); // keep it out of the pool for this check
                p
            })
            .collect();
        assert_eq!(got, vec![30002, 30004, 30006, 30000]);
        assert!(PairLease::take(&pool, 0, false).is_none());
        assert_eq!(pool.pairs_in_use(), 4);
    }

    #[test]
    fn odd_and_even_max() {
        // max even: the last port cannot carry RTCP, so it is unused.
        assert_eq!(PortPool::new(10000, 10004, 1).capacity(), 2);
        assert_eq!(PortPool::new(10000, 10005, 1).capacity(), 3);
        assert_eq!(PortPool::new(2, 65535, 1).capacity(), 32767);
    }

    #[test]
    fn lease_returns_on_drop() {
        let pool = Arc::new(PortPool::new(30100, 30103, 1));
        {
            let _a = PairLease::take(&pool, 0, false).unwrap().0;
            let _b = PairLease::take(&pool, 0, false).unwrap().0;
            assert_eq!(pool.pairs_in_use(), 2);
            assert!(PairLease::take(&pool, 0, false).is_none());
        }
        assert_eq!(pool.pairs_in_use(), 0);
    }

    #[test]
    fn shards_split_the_range() {
        let pool = Arc::new(PortPool::new(30200, 30215, 2)); // 8 pairs
        assert_eq!(pool.shards(), 2);
        let a = PairLease::take(&pool, 0, false).unwrap().0;
        let b = PairLease::take(&pool, 1, false).unwrap().0;
        assert_eq!((a.rtp_port(), b.rtp_port()), (30200, 30202));
        assert_eq!(PairLease::take(&pool, 0, false).unwrap().0.rtp_port(), 30204);
        assert_eq!(pool.free_in_shard(0), 3, "the dropped lease went back to shard 0");
        drop(b);
        assert_eq!(pool.free_in_shard(1), 4);
        assert_eq!(pool.pairs_in_use(), 1);
    }

    fn socks() -> std::io::Result<Arc<PairSocks>> {
        let b = || std::net::UdpSocket::bind("127.0.0.1:0");
        Ok(Arc::new(PairSocks { rtp: b()?, rtcp: b()? }))
    }

    #[test]
    fn bound_pairs_come_back_after_quarantine_then_unbind_when_idle() {
        let pool = Arc::new(PortPool::new(30300, 30307, 1)); // 4 pairs
        let t0 = Instant::now();
        let a = pool.take(0, false, t0).unwrap();
        assert!(!a.bound);
        pool.sockets(a.idx, |_| socks()).unwrap();
        pool.give_back(a.idx);
        assert_eq!(pool.bound_pairs(), 1);
        // Just freed: a never-bound pair is taken instead.
        let b = pool.take(0, false, t0).unwrap();
        assert_ne!(b.idx, a.idx);
        assert!(!b.bound);
        pool.give_back(b.idx);
        // Out of quarantine: the bound pair again, no bind needed.
        let again = pool.take(0, false, t0 + QUARANTINE + Duration::from_millis(10)).unwrap();
        assert_eq!((again.idx, again.bound), (a.idx, true));
        pool.give_back(again.idx);
        // Out of descriptors: a bound pair even in quarantine.
        let forced = pool.take(0, true, Instant::now()).unwrap();
        assert_eq!((forced.idx, forced.bound), (a.idx, true));
        pool.give_back(forced.idx);
        // Idle long enough: unbound, and its sockets forgotten.
        assert!(pool.trim(0, IDLE_UNBIND, Instant::now()).is_empty());
        let trimmed = pool.trim(0, IDLE_UNBIND, Instant::now() + IDLE_UNBIND + Duration::from_secs(1));
        assert_eq!(trimmed, vec![a.idx]);
        assert_eq!(pool.bound_pairs(), 0);
        assert_eq!(pool.pairs_in_use(), 0);
    }

    #[test]
    fn the_descriptor_budget_leaves_a_reserve() {
        assert_eq!(max_bound_pairs(20_000), 9_000, "2,000 descriptors kept for SIP and the store");
        assert_eq!(max_bound_pairs(1_048_576), 471_859);
        assert_eq!(max_bound_pairs(1_024), 384, "at least 256 kept");
        assert_eq!(max_bound_pairs(300), 75, "at most half kept");
        assert_eq!(max_bound_pairs(0), 0);
    }

    #[test]
    fn past_the_budget_no_pair_is_bound_and_an_unbound_one_frees_room() {
        let pool = Arc::new(PortPool::new(30500, 30507, 1).with_max_bound(1)); // 4 pairs, 1 may be bound
        let now = Instant::now();
        let a = pool.take(0, false, now).unwrap();
        pool.sockets(a.idx, |_| socks()).unwrap();
        let b = pool.take(0, false, now).unwrap();
        assert!(!b.bound);
        let err = pool.sockets(b.idx, |_| panic!("must not bind past the budget")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(super::super::EMFILE));
        assert_eq!(pool.bound_pairs(), 1);
        // The bound pair is still usable: the caller falls back to it (quarantine or not).
        pool.give_back(b.idx);
        pool.give_back(a.idx);
        let again = pool.take(0, true, now).unwrap();
        assert_eq!((again.idx, again.bound), (a.idx, true));
        pool.give_back(again.idx);
        // Once idle pairs are unbound, binding is possible again.
        let trimmed = pool.trim(0, IDLE_UNBIND, now + IDLE_UNBIND + Duration::from_secs(1));
        assert_eq!(trimmed, vec![a.idx]);
        let c = pool.take(0, false, now).unwrap();
        pool.sockets(c.idx, |_| socks()).unwrap();
        assert_eq!(pool.bound_pairs(), 1);
    }

    #[test]
    fn with_every_pair_bound_and_in_quarantine_the_oldest_is_reused() {
        let pool = Arc::new(PortPool::new(30400, 30403, 1)); // 2 pairs
        let now = Instant::now();
        for _ in 0..2 {
            let t = pool.take(0, false, now).unwrap();
            pool.sockets(t.idx, |_| socks()).unwrap();
            pool.give_back(t.idx);
        }
        let t = pool.take(0, false, now).unwrap();
        assert!(t.bound, "no unbound pair left: a bound one rather than a refusal");
    }
}
