//! The kernel's floor for relaying RTP on this machine: what `recvfrom` +
//! `sendto` alone cost per packet, with no relay logic at all.
//!
//! `N` calls, each with crossbar's two sockets (A towards the caller, B towards
//! the callee, both registered for reading in one epoll set and connected to
//! their party, as crossbar's media thread has them once both are latched) and the two parties' sockets (registered in another set, as
//! SIPp's are). Each round, every caller sends a 172-byte packet (a 20 ms G.711
//! RTP packet) to its A socket; then the "relay" receives it on A and sends it
//! from B to the callee; the callee's socket is drained (not counted). Then the
//! same the other way. Only the relay's `recvfrom` and `sendto` are timed, with
//! the thread's CPU clock, so time other processes take the core is not counted.
//!
//! A real relay also waits in epoll, wakes up, looks the packet up and wakes the
//! receiving process; none of that is here. The figure is therefore a lower
//! bound for any user-space relay with one socket per port: a call of 50
//! packets/s each way costs `100 × (recv + send)` µs per second of one core.
//!
//! usage: cargo run --release --example udp_floor [N] [ROUNDS]   (default 500 calls, 400 rounds)
//! prints: `RESULT recv_us=.. send_us=.. pct_per_call=..`

use rustix::event::epoll;
use rustix::time::{clock_gettime, ClockId};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::time::Duration;

fn thread_cpu() -> Duration {
    let t = clock_gettime(ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

fn bind() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    s.set_nonblocking(true).expect("non-blocking");
    s
}

struct Call {
    caller: UdpSocket,
    callee: UdpSocket,
    a: UdpSocket,
    b: UdpSocket,
    caller_addr: SocketAddr,
    callee_addr: SocketAddr,
    a_addr: SocketAddr,
    b_addr: SocketAddr,
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(500);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(400);
    let relay_set = epoll::create(epoll::CreateFlags::CLOEXEC).expect("epoll");
    let party_set = epoll::create(epoll::CreateFlags::CLOEXEC).expect("epoll");
    let calls: Vec<Call> = (0..n)
        .map(|i| {
            let (caller, callee, a, b) = (bind(), bind(), bind(), bind());
            for (set, s, k) in [(&relay_set, &a, 4 * i), (&relay_set, &b, 4 * i + 1), (&party_set, &caller, 4 * i + 2), (&party_set, &callee, 4 * i + 3)] {
                epoll::add(set, s.as_fd(), epoll::EventData::new_u64(k as u64), epoll::EventFlags::IN).expect("epoll add");
            }
            Call {
                caller_addr: caller.local_addr().unwrap(),
                callee_addr: callee.local_addr().unwrap(),
                a_addr: a.local_addr().unwrap(),
                b_addr: b.local_addr().unwrap(),
                caller,
                callee,
                a,
                b,
            }
        })
        .collect();
    // As crossbar's relay does once a party is latched: each socket connected to its party.
    for c in &calls {
        c.a.connect(c.caller_addr).expect("connect");
        c.b.connect(c.callee_addr).expect("connect");
    }
    let pkt = [0x80u8; 172];
    let mut buf = [0u8; 2048];
    let (mut recv_t, mut send_t, mut packets) = (Duration::ZERO, Duration::ZERO, 0u64);
    for round in 0..rounds {
        for forward in [true, false] {
            // The parties send (not counted).
            for c in &calls {
                let (from, to) = if forward { (&c.caller, c.a_addr) } else { (&c.callee, c.b_addr) };
                from.send_to(&pkt, to).expect("party send");
            }
            // The relay: receive on one leg...
            let t = thread_cpu();
            let mut got = 0;
            for c in &calls {
                let s = if forward { &c.a } else { &c.b };
                if let Ok((len, _)) = s.recv_from(&mut buf) {
                    got += len;
                }
            }
            let t1 = thread_cpu();
            // ...and send from the other.
            for c in &calls {
                let s = if forward { &c.b } else { &c.a };
                s.send(&buf[..172]).expect("relay send");
            }
            let t2 = thread_cpu();
            // The parties drain (not counted).
            for c in &calls {
                let s = if forward { &c.callee } else { &c.caller };
                while s.recv_from(&mut buf).is_ok() {}
            }
            assert_eq!(got, 172 * n, "a datagram was lost on loopback");
            if round >= rounds / 10 {
                // the first tenth warms caches and allocations up
                recv_t += t1 - t;
                send_t += t2 - t1;
                packets += n as u64;
            }
        }
    }
    let recv_us = recv_t.as_secs_f64() * 1e6 / packets as f64;
    let send_us = send_t.as_secs_f64() * 1e6 / packets as f64;
    // 100 packets a second per call (50 each way), as a percentage of one core.
    let pct = 100.0 * (recv_us + send_us) * 1e-6 * 100.0;
    println!("{n} calls, {packets} packets relayed: recvfrom {recv_us:.2} µs + sendto {send_us:.2} µs per packet");
    println!("RESULT recv_us={recv_us:.3} send_us={send_us:.3} pct_per_call={pct:.4}");
}
