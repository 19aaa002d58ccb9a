//! RTP port pool: even RTP ports (RTCP = RTP + 1) handed out round-robin, each pair
//! belonging to one media thread (shard): pair `i` is served by shard `i % shards`.
//!
//! Every shard's pool is a FIFO of free pair indices: allocation pops the front,
//! release pushes the back. Both are O(1), and a just-freed pair is reused only after
//! every other free pair of the shard has been handed out, so stray late packets of an
//! old call don't reach the call that gets its ports next.
//!
//! A pair's sockets, once bound, stay bound (and registered with their media thread)
//! for the life of the node: a call takes a pair without a single system call. The pool
//! keeps them here between calls.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;

use super::engine::PairSocks;

#[derive(Debug)]
pub(crate) struct PortPool {
    /// First RTP port of the range (even).
    base: u16,
    /// Number of RTP/RTCP pairs in the range.
    pairs: usize,
    /// Free pair indices per shard, in the order they will be handed out.
    free: Vec<Mutex<VecDeque<u16>>>,
    /// The bound sockets of each pair, once bound (by pair index).
    socks: Vec<Mutex<Option<Arc<PairSocks>>>>,
}

impl PortPool {
    /// `port_min` must be even and `port_max >= port_min + 1`, `shards >= 1`; checked
    /// by the caller.
    pub(crate) fn new(port_min: u16, port_max: u16, shards: usize) -> Self {
        // A pair needs both p and p+1 inside [min, max]: floor((max - min + 1) / 2).
        let pairs = (usize::from(port_max) - usize::from(port_min)).div_ceil(2);
        let shards = shards.max(1);
        let mut free: Vec<VecDeque<u16>> = (0..shards).map(|_| VecDeque::new()).collect();
        // pairs <= 32768, so every index fits in u16.
        for i in (0..pairs).filter_map(|i| u16::try_from(i).ok()) {
            free[usize::from(i) % shards].push_back(i);
        }
        Self {
            base: port_min,
            pairs,
            free: free.into_iter().map(Mutex::new).collect(),
            socks: (0..pairs).map(|_| Mutex::new(None)).collect(),
        }
    }

    /// Number of RTP/RTCP pairs the range holds.
    pub(crate) fn capacity(&self) -> usize {
        self.pairs
    }

    #[cfg(test)]
    pub(crate) fn shards(&self) -> usize {
        self.free.len()
    }

    /// Pairs currently handed out (including ones being bound right now).
    pub(crate) fn pairs_in_use(&self) -> usize {
        self.pairs - self.free.iter().map(|f| f.lock().len()).sum::<usize>()
    }

    /// Pairs of one shard that are free now.
    pub(crate) fn free_in_shard(&self, shard: usize) -> usize {
        self.free[shard].lock().len()
    }

    /// Takes the next free pair of `shard`: its index, or None when the shard is full.
    fn take(&self, shard: usize) -> Option<u16> {
        self.free[shard].lock().pop_front()
    }

    /// Puts a pair back at the tail of its shard's queue.
    fn give_back(&self, idx: u16) {
        self.free[usize::from(idx) % self.free.len()].lock().push_back(idx);
    }

    pub(crate) fn rtp_port(&self, idx: u16) -> u16 {
        self.base + idx * 2
    }

    /// The pair's sockets if bound before, else `bind(rtp_port)`'s, kept for next time.
    pub(crate) fn sockets(&self, idx: u16, bind: impl FnOnce(u16) -> std::io::Result<Arc<PairSocks>>) -> std::io::Result<Arc<PairSocks>> {
        let mut slot = self.socks[usize::from(idx)].lock();
        if let Some(s) = &*slot {
            return Ok(Arc::clone(s));
        }
        let s = bind(self.rtp_port(idx))?;
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
    /// Leases the next free pair of `shard`, or None when the shard is full.
    pub(crate) fn take(pool: &Arc<PortPool>, shard: usize) -> Option<Self> {
        pool.take(shard).map(|idx| Self {
            pool: Arc::clone(pool),
            idx,
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
        let a = PairLease::take(&pool, 0).unwrap();
        assert_eq!(a.rtp_port(), 30000);
        drop(a);
        // The freed pair goes to the back: the next three allocations are fresh ports.
        let got: Vec<u16> = (0..4)
            .map(|_| {
                let l = PairLease::take(&pool, 0).unwrap();
                let p = l.rtp_port();
                std::mem::forget(l); // keep it out of the pool for this check
                p
            })
            .collect();
        assert_eq!(got, vec![30002, 30004, 30006, 30000]);
        assert!(PairLease::take(&pool, 0).is_none());
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
            let _a = PairLease::take(&pool, 0).unwrap();
            let _b = PairLease::take(&pool, 0).unwrap();
            assert_eq!(pool.pairs_in_use(), 2);
            assert!(PairLease::take(&pool, 0).is_none());
        }
        assert_eq!(pool.pairs_in_use(), 0);
    }

    #[test]
    fn shards_split_the_range() {
        let pool = Arc::new(PortPool::new(30200, 30215, 2)); // 8 pairs
        assert_eq!(pool.shards(), 2);
        let a = PairLease::take(&pool, 0).unwrap();
        let b = PairLease::take(&pool, 1).unwrap();
        assert_eq!((a.rtp_port(), b.rtp_port()), (30200, 30202));
        assert_eq!(PairLease::take(&pool, 0).unwrap().rtp_port(), 30204);
        assert_eq!(pool.free_in_shard(0), 3, "the dropped lease went back to shard 0");
        drop(b);
        assert_eq!(pool.free_in_shard(1), 4);
        assert_eq!(pool.pairs_in_use(), 1);
    }
}
