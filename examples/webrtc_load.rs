//! Load client for `bench/webrtc.sh`: N "browsers" (str0m, full ICE, DTLS-SRTP)
//! each call an external number over SIP/WebSocket through crossbar; the carrier
//! (SIPp with -rtp_echo) answers, so every RTP packet a client sends through the
//! WebRTC ↔ RTP bridge comes back the same way. While all calls are up it
//! samples crossbar's CPU (utime+stime from /proc/PID/stat) and RSS.
//!
//! usage: webrtc_load HTTP_ADDR CROSSBAR_PID N [HOLD_S] [RATE_CPS] [WINDOW_S]
//! prints: `RESULT calls_ok=.. sent=.. received=.. loss_pct=.. cpu_pct=.. rss_kb_idle=.. rss_kb_loaded=..`

use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use str0m::change::SdpAnswer;
use str0m::media::{Direction, MediaKind};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{RtpWrite, SeqNo};
use str0m::{Candidate, Event, Input, Output, RtcConfig};
use tokio::net::UdpSocket;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

struct Totals {
    sent: AtomicU64,
    received: AtomicU64,
    up: AtomicUsize,
    ok: AtomicUsize,
}

fn header<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    msg.split("\r\n").find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn status(msg: &str) -> u16 {
    if !msg.starts_with("SIP/2.0 ") {
        return 0;
    }
    msg[8..11].parse().unwrap_or(0)
}

async fn call(i: usize, http: SocketAddr, hold: Duration, totals: Arc<Totals>, media: std::sync::mpsc::Sender<Media>) -> Result<(), String> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    let local = sock.local_addr().map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut rtc = RtcConfig::new().set_rtp_mode(true).clear_codecs().enable_pcma(true, false).build(start);
    rtc.add_local_candidate(Candidate::host(local, "udp").map_err(|e| e.to_string())?);
    let mut api = rtc.sdp_api();
    let mid = api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
    let (offer, pending) = api.apply().ok_or("no offer")?;
    let offer = offer.to_sdp_string();

    let tcp = tokio::net::TcpStream::connect(http).await.map_err(|e| e.to_string())?;
    let mut req = format!("ws://acme.localhost:{}/sip", http.port()).into_client_request().map_err(|e| e.to_string())?;
    req.headers_mut().insert("Sec-WebSocket-Protocol", "sip".parse().expect("static"));
    let (mut ws, _) = tokio_tungstenite::client_async(req, tcp).await.map_err(|e| e.to_string())?;
    let host = format!("load{i}.invalid");
    let call_id = format!("load-{i}-{}", start.elapsed().as_nanos());
    let number = "15551234567";
    let ruri = format!("sip:{number}@acme.localhost");
    let invite = |cseq: u32, auth: Option<&str>| {
        format!(
            "INVITE {ruri} SIP/2.0\r\nVia: SIP/2.0/WS {host};branch=z9hG4bK{i}x{cseq}\r\nMax-Forwards: 70\r\nFrom: <sip:1001@acme.localhost>;tag=l{i}\r\nTo: <sip:{number}@acme.localhost>\r\nCall-ID: {call_id}\r\nCSeq: {cseq} INVITE\r\nContact: <sip:l{i}@{host};transport=ws>\r\n{}Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{offer}",
            auth.map(|a| format!("Proxy-Authorization: {a}\r\n")).unwrap_or_default(),
            offer.len()
        )
    };
    ws.send(Message::text(invite(1, None))).await.map_err(|e| e.to_string())?;
    let mut cseq = 1;
    let answer = loop {
        let m = match tokio::time::timeout(Duration::from_secs(15), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => t.to_string(),
            Ok(Some(Ok(_))) => continue,
            _ => return Err("no answer to INVITE".into()),
        };
        match status(&m) {
            407 if cseq == 1 => {
                let ack = format!("ACK {ruri} SIP/2.0\r\nVia: SIP/2.0/WS {host};branch=z9hG4bK{i}x1\r\nMax-Forwards: 70\r\nFrom: <sip:1001@acme.localhost>;tag=l{i}\r\nTo: {}\r\nCall-ID: {call_id}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n", header(&m, "To").unwrap_or(""));
                ws.send(Message::text(ack)).await.map_err(|e| e.to_string())?;
                let ch = header(&m, "Proxy-Authenticate").ok_or("407 without challenge")?;
                let auth = crossbar::sip::auth::respond(ch, "INVITE", &ruri, "1001", "acme1001pw").map_err(|e| e.to_string())?;
                cseq = 2;
                ws.send(Message::text(invite(2, Some(&auth)))).await.map_err(|e| e.to_string())?;
            }
            200 => break m,
            c if c >= 300 => return Err(format!("call refused: {c}")),
            _ => {}
        }
    };
    let to = header(&answer, "To").unwrap_or("").to_string();
    let contact = header(&answer, "Contact").map(|c| c.trim_start_matches('<').split('>').next().unwrap_or("").to_string()).unwrap_or_else(|| ruri.clone());
    let ack = format!("ACK {contact} SIP/2.0\r\nVia: SIP/2.0/WS {host};branch=z9hG4bK{i}a\r\nMax-Forwards: 70\r\nFrom: <sip:1001@acme.localhost>;tag=l{i}\r\nTo: {to}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} ACK\r\nContent-Length: 0\r\n\r\n");
    ws.send(Message::text(ack)).await.map_err(|e| e.to_string())?;
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    rtc.sdp_api().accept_answer(pending, SdpAnswer::from_sdp_string(body).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;

    // Media runs on the media thread (see `media_thread`) until `hold` is over.
    let (done, finished) = tokio::sync::oneshot::channel();
    let sock = sock.into_std().map_err(|e| e.to_string())?;
    media.send(Media { rtc, sock, local, mid, end: Instant::now() + hold, done }).map_err(|_| "media thread gone")?;
    finished.await.map_err(|_| "media thread dropped the call")?;
    let bye = format!("BYE {contact} SIP/2.0\r\nVia: SIP/2.0/WS {host};branch=z9hG4bK{i}b\r\nMax-Forwards: 70\r\nFrom: <sip:1001@acme.localhost>;tag=l{i}\r\nTo: {to}\r\nCall-ID: {call_id}\r\nCSeq: {} BYE\r\nContent-Length: 0\r\n\r\n", cseq + 1);
    ws.send(Message::text(bye)).await.map_err(|e| e.to_string())?;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Text(t) = m {
                if status(&t) == 200 && t.contains("BYE") {
                    break;
                }
            }
        }
    })
    .await;
    totals.ok.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// A call's media, handed to the media thread once SIP set the call up.
struct Media {
    rtc: str0m::Rtc,
    sock: std::net::UdpSocket,
    local: SocketAddr,
    mid: str0m::media::Mid,
    end: Instant,
    done: tokio::sync::oneshot::Sender<()>,
}

/// Per call on the media thread.
struct Running {
    m: Media,
    connected: bool,
    counted_up: bool,
    seq: u64,
    next_frame: Instant,
    timeout: Instant,
    /// Got a datagram this turn: its `Rtc` has output to poll.
    input: bool,
}

/// How long the media thread sleeps between turns.
const TURN: Duration = Duration::from_millis(1);

/// Every call's media on one thread, as a remote endpoint would look to crossbar:
/// the sockets sit in an epoll set that nobody waits on, and the thread sleeps
/// [`TURN`] between turns, asking epoll without blocking which sockets have data.
/// Over loopback the kernel runs the receiver's side of a datagram in the sender's
/// `sendto`, waking the receiver if it sleeps on the socket: a client blocked in
/// epoll (tokio) would make crossbar pay for waking it, a cost no real browser
/// across a network puts on crossbar. `LOAD_WAKE=1` keeps the client asleep on
/// its sockets (woken by every burst) to show that difference.
fn media_thread(rx: std::sync::mpsc::Receiver<Media>, totals: Arc<Totals>) {
    use rustix::event::epoll;
    let wake = std::env::var_os("LOAD_WAKE").is_some();
    let ep = epoll::create(epoll::CreateFlags::CLOEXEC).expect("epoll");
    let blank = epoll::Event { flags: epoll::EventFlags::empty(), data: epoll::EventData::new_u64(0) };
    let mut events = vec![blank; 1024];
    let mut calls: Vec<Option<Running>> = Vec::new();
    let mut buf = vec![0u8; 2048];
    let payload: Arc<[u8]> = vec![0xd5u8; 160].into();
    let mut open = true;
    while open || calls.iter().any(Option::is_some) {
        loop {
            match rx.try_recv() {
                Ok(m) => {
                    m.sock.set_nonblocking(true).expect("non-blocking");
                    let slot = calls.iter().position(Option::is_none).unwrap_or_else(|| {
                        calls.push(None);
                        calls.len() - 1
                    });
                    epoll::add(&ep, &m.sock, epoll::EventData::new_u64(slot as u64), epoll::EventFlags::IN).expect("epoll add");
                    let now = Instant::now();
                    calls[slot] = Some(Running { m, connected: false, counted_up: false, seq: 1000, next_frame: now, timeout: now, input: false });
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        let n = if wake {
            let t = rustix::event::Timespec { tv_sec: 0, tv_nsec: TURN.as_nanos() as _ };
            epoll::wait(&ep, &mut events[..], Some(&t)).unwrap_or(0)
        } else {
            std::thread::sleep(TURN);
            epoll::wait(&ep, &mut events[..], Some(&rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 })).unwrap_or(0)
        };
        let now = Instant::now();
        for ev in &events[..n] {
            let Some(Some(c)) = calls.get_mut(ev.data.u64() as usize) else { continue };
            c.input = true;
            while let Ok((len, from)) = c.m.sock.recv_from(&mut buf) {
                if let Ok(contents) = buf[..len].try_into() {
                    let _ = c.m.rtc.handle_input(Input::Receive(now, Receive { proto: Protocol::Udp, source: from, destination: c.m.local, contents }));
                }
            }
        }
        for call in &mut calls {
            let Some(c) = call.as_mut() else { continue };
            if c.connected && now >= c.next_frame {
                c.next_frame += Duration::from_millis(20);
                if let Some(tx) = c.m.rtc.direct_api().stream_tx_by_mid(c.m.mid, None) {
                    c.seq += 1;
                    tx.write_rtp(RtpWrite::new(8.into(), SeqNo::from(c.seq), (c.seq * 160) as u32, now, payload.clone()));
                    totals.sent.fetch_add(1, Ordering::Relaxed);
                }
                c.timeout = now;
            }
            if now >= c.timeout {
                let _ = c.m.rtc.handle_input(Input::Timeout(now));
            } else if !std::mem::take(&mut c.input) && now < c.m.end {
                continue; // nothing new for this call's `Rtc`
            }
            c.input = false;
            loop {
                match c.m.rtc.poll_output() {
                    Ok(Output::Timeout(t)) => {
                        c.timeout = t;
                        break;
                    }
                    Ok(Output::Transmit(t)) => {
                        let _ = c.m.sock.send_to(&t.contents, t.destination);
                    }
                    Ok(Output::Event(Event::Connected)) => {
                        c.connected = true;
                        c.next_frame = now;
                    }
                    Ok(Output::Event(Event::RtpPacket(_))) => {
                        totals.received.fetch_add(1, Ordering::Relaxed);
                        if !c.counted_up {
                            c.counted_up = true;
                            totals.up.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(Output::Event(_)) => {}
                    Err(_) => {
                        c.timeout = c.m.end;
                        break;
                    }
                }
            }
            if now >= c.m.end {
                let c = call.take().expect("present");
                let _ = epoll::delete(&ep, &c.m.sock);
                let _ = c.m.done.send(());
            }
        }
    }
}

fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
            Some(after.get(11)?.parse::<u64>().ok()? + after.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 4 {
        eprintln!("usage: webrtc_load HTTP_ADDR CROSSBAR_PID N [HOLD_S] [RATE_CPS] [WINDOW_S]");
        std::process::exit(2);
    }
    let http: SocketAddr = a[1].parse().expect("HTTP_ADDR as ip:port");
    let pid: u32 = a[2].parse().expect("CROSSBAR_PID");
    let n: usize = a[3].parse().expect("N");
    let hold = Duration::from_secs(a.get(4).and_then(|v| v.parse().ok()).unwrap_or(40));
    let rate: f64 = a.get(5).and_then(|v| v.parse().ok()).unwrap_or(50.0);
    let window = Duration::from_secs(a.get(6).and_then(|v| v.parse().ok()).unwrap_or(15));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async move {
        let totals = Arc::new(Totals { sent: AtomicU64::new(0), received: AtomicU64::new(0), up: AtomicUsize::new(0), ok: AtomicUsize::new(0) });
        let rss_idle = rss_kb(pid);
        let (media_tx, media_rx) = std::sync::mpsc::channel();
        let t = totals.clone();
        let media = std::thread::spawn(move || media_thread(media_rx, t));
        let mut tasks = Vec::new();
        for i in 0..n {
            let (t, m) = (totals.clone(), media_tx.clone());
            tasks.push(tokio::spawn(async move {
                if let Err(e) = call(i, http, hold, t, m).await {
                    eprintln!("call {i}: {e}");
                }
            }));
            tokio::time::sleep(Duration::from_secs_f64(1.0 / rate)).await;
        }
        // Wait (bounded) until every call has media back, then sample.
        let deadline = Instant::now() + Duration::from_secs(30);
        while totals.up.load(Ordering::Relaxed) < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let up = totals.up.load(Ordering::Relaxed);
        println!("UP {up} of {n} calls with media both ways");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (c0, t0) = (cpu_ticks(pid), Instant::now());
        tokio::time::sleep(window / 2).await;
        let rss_loaded = rss_kb(pid);
        tokio::time::sleep(window - window / 2).await;
        let (c1, t1) = (cpu_ticks(pid), Instant::now());
        let hz = 100.0; // USER_HZ on Linux
        let cpu_pct = (c1 - c0) as f64 / hz / (t1 - t0).as_secs_f64() * 100.0;
        for t in tasks {
            let _ = t.await;
        }
        drop(media_tx);
        let _ = tokio::task::spawn_blocking(move || media.join()).await;
        // Packets still in flight when a call hangs up are not loss: allow 2 frames per call.
        let sent = totals.sent.load(Ordering::Relaxed);
        let received = totals.received.load(Ordering::Relaxed);
        let lost = sent.saturating_sub(received).saturating_sub(2 * n as u64);
        println!(
            "RESULT calls_ok={} up={up} sent={sent} received={received} loss_pct={:.3} cpu_pct={cpu_pct:.1} cpu_pct_per_call={:.4} rss_kb_idle={rss_idle} rss_kb_loaded={rss_loaded} rss_kb_per_call={:.1}",
            totals.ok.load(Ordering::Relaxed),
            if sent > 0 { lost as f64 * 100.0 / sent as f64 } else { 0.0 },
            cpu_pct / up.max(1) as f64,
            (rss_loaded as f64 - rss_idle as f64) / up.max(1) as f64,
        );
    });
}
