//! RTP port pool: even RTP ports (RTCP = RTP + 1) handed out round-robin.
//!
//! The pool is a FIFO of free pair indices: allocation pops the front, release
//! pushes the back. Both are O(1), and a just-freed pair is reused only after
//! every other free pair has been handed out, so stray late packets of an old
//! call don't reach the call that gets its ports next.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;

#[derive(Debug)]
pub(crate) struct PortPool {
    /// First RTP port of the range (even).
    base: u16,
    /// Number of RTP/RTCP pairs in the range.
    pairs: usize,
    /// Free pair indices, in the order they will be handed out.
    free: Mutex<VecDeque<u16>>,
}

impl PortPool {
    /// `port_min` must be even and `port_max >= port_min + 1`; checked by the caller.
    pub(crate) fn new(port_min: u16, port_max: u16) -> Self {
        // A pair needs both p and p+1 inside [min, max]: floor((max - min + 1) / 2).
        let pairs = (usize::from(port_max) - usize::from(port_min)).div_ceil(2);
        // pairs <= 32768, so every index fits in u16.
        let free = (0..pairs).filter_map(|i| u16::try_from(i).ok()).collect();
        Self {
            base: port_min,
            pairs,
            free: Mutex::new(free),
        }
    }

    /// Number of RTP/RTCP pairs the range holds.
    pub(crate) fn capacity(&self) -> usize {
        self.pairs
    }

    /// Pairs currently handed out (including ones being bound right now).
    pub(crate) fn pairs_in_use(&self) -> usize {
        self.pairs - self.free.lock().len()
    }

    /// Takes the next free pair and returns its RTP port, or None when the range is full.
    fn take(&self) -> Option<u16> {
        let idx = self.free.lock().pop_front()?;
        Some(self.base + idx * 2)
    }

    /// Puts a pair back at the tail of the queue.
    fn give_back(&self, rtp_port: u16) {
        let idx = (rtp_port - self.base) / 2;
        self.free.lock().push_back(idx);
    }
}

/// One leased RTP/RTCP pair; returned to the pool when dropped.
#[derive(Debug)]
pub(crate) struct PairLease {
    pool: Arc<PortPool>,
    rtp_port: u16,
}

impl PairLease {
    /// Leases the next free pair, or None when the range is full.
    pub(crate) fn take(pool: &Arc<PortPool>) -> Option<Self> {
        pool.take().map(|rtp_port| Self {
            pool: Arc::clone(pool),
            rtp_port,
        })
    }

    pub(crate) fn rtp_port(&self) -> u16 {
        self.rtp_port
    }
}

impl Drop for PairLease {
    fn drop(&mut self) {
        self.pool.give_back(self.rtp_port);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_not_lifo() {
        let pool = Arc::new(PortPool::new(30000, 30007));
        assert_eq!(pool.capacity(), 4);
        let a = PairLease::take(&pool).unwrap();
        assert_eq!(a.rtp_port(), 30000);
        drop(a);
        // The freed pair goes to the back: the next three allocations are fresh ports.
        let got: Vec<u16> = (0..4)
            .map(|_| {
                let l = PairLease::take(&pool).unwrap();
                let p = l.rtp_port();
                std::mem::forget(l); // keep it out of the pool for this check
                p
            })
            .collect();
        assert_eq!(got, vec![30002, 30004, 30006, 30000]);
        assert!(PairLease::take(&pool).is_none());
        assert_eq!(pool.pairs_in_use(), 4);
    }

    #[test]
    fn odd_and_even_max() {
        // max even: the last port cannot carry RTCP, so it is unused.
        assert_eq!(PortPool::new(10000, 10004).capacity(), 2);
        assert_eq!(PortPool::new(10000, 10005).capacity(), 3);
        assert_eq!(PortPool::new(2, 65535).capacity(), 32767);
    }

    #[test]
    fn lease_returns_on_drop() {
        let pool = Arc::new(PortPool::new(30100, 30103));
        {
            let _a = PairLease::take(&pool).unwrap();
            let _b = PairLease::take(&pool).unwrap();
            assert_eq!(pool.pairs_in_use(), 2);
            assert!(PairLease::take(&pool).is_none());
        }
        assert_eq!(pool.pairs_in_use(), 0);
    }
}
