//! The B2BUA driven with a virtual clock: no sockets, microseconds per test.

use super::*;
use crate::sip::msg::Proto;

const T0_SDP: &str = "v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n";
const B_SDP: &str = "v=0\r\no=- 2 2 IN IP4 10.0.0.2\r\ns=-\r\nc=IN IP4 10.0.0.2\r\nt=0 0\r\nm=audio 5000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";

fn a_peer() -> Peer {
    Peer { proto: Proto::Udp, addr: "10.0.0.1:5060".parse().unwrap() }
}
fn b_peer() -> Peer {
    Peer { proto: Proto::Udp, addr: "10.0.0.2:5060".parse().unwrap() }
}

fn a_request(method: &str, cseq: u32, branch: &str, to_tag: Option<&str>, body: &str) -> String {
    let to = match to_tag {
        Some(t) => format!("<sip:1001@acme.localhost>;tag={t}"),
        None => "<sip:1001@acme.localhost>".into(),
    };
    let ct = if body.is_empty() { String::new() } else { "Content-Type: application/sdp\r\n".into() };
    let cseq_method = if method == "ACK" && cseq == 1 { "ACK" } else { method };
    format!(
        "{method} sip:1001@acme.localhost SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch={branch}\r\nMax-Forwards: 70\r\nFrom: <sip:caller@carrier>;tag=atag\r\nTo: {to}\r\nCall-ID: call-a\r\nCSeq: {cseq} {cseq_method}\r\nContact: <sip:caller@10.0.0.1:5060>\r\n{ct}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn incoming(text: &str, peer: Peer) -> Incoming {
    Incoming::parse(text.as_bytes(), peer).expect("test message parses")
}

/// A response from B to a request crossbar sent it.
fn b_response(req: &[u8], code: u16, to_tag: &str, body: &str) -> String {
    let m = rsipstack::sip::parser::parse_message(req).unwrap();
    let SipMessage::Request(r) = m else { panic!("expected a request") };
    let mut resp = msg::response_to(&r, code, Some(to_tag));
    msg::push(&mut resp.headers, "Contact", "<sip:callee@10.0.0.2:5060>");
    if !body.is_empty() {
        msg::set_body(&mut resp.headers, &mut resp.body, Some("application/sdp"), body.as_bytes().to_vec());
    }
    String::from_utf8(resp.to_bytes()).unwrap()
}

struct Harness {
    call: B2bua,
    now: Instant,
    to_a: Vec<String>,
    to_b: Vec<String>,
    media: Vec<(Side, SocketAddr)>,
    ended: Vec<EndInfo>,
    progress: Vec<&'static str>,
}

fn o_name(o: &CallOutput) -> &'static str {
    match o {
        CallOutput::Ringing => "ringing",
        CallOutput::Answered => "answered",
        _ => "other",
    }
}

impl Harness {
    fn new() -> Harness {
        let now = Instant::now();
        let setup = default_setup();
        let call = B2bua::new(&setup, now).unwrap();
        let mut h = Harness { call, now, to_a: vec![], to_b: vec![], media: vec![], ended: vec![], progress: vec![] };
        h.drain();
        h
    }

    fn drain(&mut self) {
        while let Some(o) = self.call.poll_output() {
            match o.clone() {
                CallOutput::Send { side: Side::A, bytes } => self.to_a.push(String::from_utf8(bytes).unwrap()),
                CallOutput::Send { side: Side::B, bytes } => self.to_b.push(String::from_utf8(bytes).unwrap()),
                CallOutput::Media { side, rtp, .. } => self.media.push((side, rtp)),
                CallOutput::Ended(e) => self.ended.push(e),
                CallOutput::Ringing | CallOutput::Answered => self.progress.push(o_name(&o)),
            }
        }
    }

    fn recv_a(&mut self, text: &str) {
        let m = incoming(text, a_peer());
        self.call.handle_message(Side::A, m, self.now);
        self.drain();
    }

    fn recv_b(&mut self, text: &str) {
        let m = incoming(text, b_peer());
        self.call.handle_message(Side::B, m, self.now);
        self.drain();
    }

    /// Advances the virtual clock, firing timers as they fall due.
    fn advance(&mut self, by: Duration) {
        let end = self.now + by;
        while let Some(t) = self.call.poll_timeout() {
            if t > end {
                break;
            }
            self.now = t.max(self.now);
            self.call.handle_timeout(self.now);
            self.drain();
        }
        self.now = end;
    }

    fn last_b_request(&self, method: &str) -> String {
        self.to_b.iter().rev().find(|m| m.starts_with(method)).cloned().unwrap_or_else(|| panic!("no {method} sent to B: {:?}", self.to_b))
    }

    fn count(msgs: &[String], start: &str) -> usize {
        msgs.iter().filter(|m| m.starts_with(start)).count()
    }

    /// Answered and ACKed call.
    fn established() -> Harness {
        let mut h = Harness::new();
        let inv = h.last_b_request("INVITE");
        h.recv_b(&b_response(inv.as_bytes(), 200, "btag", B_SDP));
        h.recv_a(&a_request("ACK", 1, "z9hG4bKack", Some(&a_tag(&h)), ""));
        h
    }
}

fn a_tag(h: &Harness) -> String {
    let ok = h.to_a.iter().find(|m| m.starts_with("SIP/2.0 200") || m.starts_with("SIP/2.0 180")).expect("A got a tagged response");
    let to = ok.lines().find(|l| l.starts_with("To:")).unwrap();
    msg::param(to, "tag").unwrap().to_string()
}

#[test]
fn invite_is_relayed_with_anchored_sdp_and_answer_reaches_caller() {
    let mut h = Harness::new();
    assert!(h.to_a[0].starts_with("SIP/2.0 100"), "caller gets 100 Trying at once");
    let inv = h.last_b_request("INVITE");
    assert!(inv.contains("Call-ID: call-b"), "B leg has its own Call-ID");
    assert!(inv.contains("c=IN IP4 192.0.2.1") && inv.contains("m=audio 20002 "), "offer to B points at crossbar: {inv}");
    assert_eq!(h.media, vec![(Side::A, "10.0.0.1:4000".parse().unwrap())]);

    h.recv_b(&b_response(inv.as_bytes(), 180, "btag", ""));
    assert!(h.to_a.last().unwrap().starts_with("SIP/2.0 180"));
    h.recv_b(&b_response(inv.as_bytes(), 200, "btag", B_SDP));
    let ok = h.to_a.last().unwrap();
    assert!(ok.starts_with("SIP/2.0 200") && ok.contains("m=audio 20000 ") && ok.contains("c=IN IP4 192.0.2.1"), "{ok}");
    assert!(h.to_b.last().unwrap().starts_with("ACK sip:callee@10.0.0.2:5060"), "crossbar ACKs B's 2xx to its Contact");
    assert!(h.media.contains(&(Side::B, "10.0.0.2:5000".parse().unwrap())));
    assert_eq!(h.progress, vec!["ringing", "answered"], "progress is reported once each");
}

#[test]
fn lost_invite_to_callee_is_retransmitted() {
    let mut h = Harness::new();
    assert_eq!(Harness::count(&h.to_b, "INVITE"), 1);
    // The first INVITE is lost: Timer A fires at T1, then 2*T1 later.
    h.advance(Duration::from_millis(600));
    assert_eq!(Harness::count(&h.to_b, "INVITE"), 2);
    h.advance(Duration::from_millis(1000));
    assert_eq!(Harness::count(&h.to_b, "INVITE"), 3);
    let inv = h.last_b_request("INVITE");
    h.recv_b(&b_response(inv.as_bytes(), 180, "btag", ""));
    h.advance(Duration::from_secs(10));
    assert_eq!(Harness::count(&h.to_b, "INVITE"), 3, "a provisional stops retransmission");
}

#[test]
fn caller_invite_retransmission_is_absorbed() {
    let mut h = Harness::new();
    h.recv_a(&a_request("INVITE", 1, "z9hG4bKinv", None, T0_SDP));
    assert_eq!(Harness::count(&h.to_a, "SIP/2.0 100"), 2, "100 re-sent");
    assert_eq!(Harness::count(&h.to_b, "INVITE"), 1, "no second call towards B");
}

#[test]
fn lost_200_is_retransmitted_to_caller_until_ack() {
    let mut h = Harness::new();
    let inv = h.last_b_request("INVITE");
    h.recv_b(&b_response(inv.as_bytes(), 200, "btag", B_SDP));
    assert_eq!(Harness::count(&h.to_a, "SIP/2.0 200"), 1);
    h.advance(Duration::from_millis(510));
    assert_eq!(Harness::count(&h.to_a, "SIP/2.0 200"), 2, "2xx re-sent at T1");
    h.advance(Duration::from_millis(1010));
    assert_eq!(Harness::count(&h.to_a, "SIP/2.0 200"), 3, "then at 2*T1");
    let tag = a_tag(&h);
    h.recv_a(&a_request("ACK", 1, "z9hG4bKack", Some(&tag), ""));
    h.advance(Duration::from_secs(20));
    assert_eq!(Harness::count(&h.to_a, "SIP/2.0 200"), 3, "ACK stops retransmission");
    assert!(h.ended.is_empty(), "the call is up");
}

#[test]
fn unacked_200_tears_the_call_down() {
    let mut h = Harness::new();
    let inv = h.last_b_request("INVITE");
    h.recv_b(&b_response(inv.as_bytes(), 200, "btag", B_SDP));
    h.advance(Duration::from_secs(40));
    let byes: std::collections::HashSet<&str> = h.to_b.iter().filter(|m| m.starts_with("BYE")).filter_map(|m| m.lines().find(|l| l.starts_with("Via:"))).collect();
    assert_eq!(byes.len(), 1, "callee hung up (one BYE transaction) when the caller never ACKs");
    assert_eq!(h.ended.len(), 1);
}

#[test]
fn bye_from_caller_ends_both_legs() {
    let mut h = Harness::established();
    let tag = a_tag(&h);
    h.recv_a(&a_request("BYE", 2, "z9hG4bKbye", Some(&tag), ""));
    assert!(h.to_a.last().unwrap().starts_with("SIP/2.0 200"));
    let bye = h.last_b_request("BYE");
    assert!(bye.contains("Call-ID: call-b") && bye.contains("tag=btag"));
    assert_eq!(h.ended[0].hangup_side, Some(Side::A));
    assert_eq!(h.ended[0].disposition, Disposition::Answered);
    assert!(!h.call.is_finished(), "waits for B's answer to the BYE");
    h.recv_b(&b_response(bye.as_bytes(), 200, "btag", ""));
    assert!(h.call.is_finished());
}

#[test]
fn bye_from_callee_reaches_caller() {
    let mut h = Harness::established();
    let inv = h.last_b_request("INVITE");
    let bye = format!(
        "BYE sip:crossbar@192.0.2.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKbbye\r\nMax-Forwards: 70\r\nFrom: <sip:1001@acme.localhost>;tag=btag\r\nTo: {}\r\nCall-ID: call-b\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n",
        inv.lines().find(|l| l.starts_with("From:")).unwrap().trim_start_matches("From: ")
    );
    h.recv_b(&bye);
    assert!(h.to_b.last().unwrap().starts_with("SIP/2.0 200"));
    let to_a = h.to_a.last().unwrap();
    assert!(to_a.starts_with("BYE sip:caller@10.0.0.1:5060"), "BYE goes to the caller's Contact: {to_a}");
    assert!(to_a.contains("Call-ID: call-a") && to_a.contains("To: <sip:caller@carrier>;tag=atag"));
    assert_eq!(h.ended[0].hangup_side, Some(Side::B));
}

#[test]
fn bye_glare_sends_one_bye_each_way_at_most() {
    let mut h = Harness::established();
    let tag = a_tag(&h);
    h.recv_a(&a_request("BYE", 2, "z9hG4bKbye", Some(&tag), ""));
    let our_bye = h.last_b_request("BYE");
    // B's own BYE crosses ours.
    let inv = h.last_b_request("INVITE");
    let bye = format!(
        "BYE sip:crossbar@192.0.2.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKglare\r\nMax-Forwards: 70\r\nFrom: <sip:1001@acme.localhost>;tag=btag\r\nTo: {}\r\nCall-ID: call-b\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n",
        inv.lines().find(|l| l.starts_with("From:")).unwrap().trim_start_matches("From: ")
    );
    h.recv_b(&bye);
    assert!(h.to_b.last().unwrap().starts_with("SIP/2.0 200"), "B's BYE is answered");
    assert_eq!(Harness::count(&h.to_a, "BYE"), 0, "no BYE to a caller who already hung up");
    assert_eq!(Harness::count(&h.to_b, "BYE"), 1);
    h.recv_b(&b_response(our_bye.as_bytes(), 481, "btag", ""));
    assert!(h.call.is_finished());
    assert_eq!(h.ended.len(), 1);
}

#[test]
fn cancel_racing_200_hangs_up_the_callee() {
    let mut h = Harness::new();
    let inv = h.last_b_request("INVITE");
    h.recv_b(&b_response(inv.as_bytes(), 180, "btag", ""));
    let cancel = a_request("CANCEL", 1, "z9hG4bKinv", None, "");
    h.recv_a(&cancel);
    assert!(h.to_a.iter().any(|m| m.starts_with("SIP/2.0 200") && m.contains("CSeq: 1 CANCEL")));
    assert!(h.to_a.iter().any(|m| m.starts_with("SIP/2.0 487")));
    assert_eq!(Harness::count(&h.to_b, "CANCEL"), 1);
    // B had already answered: its 200 crosses our CANCEL.
    h.recv_b(&b_response(inv.as_bytes(), 200, "btag", B_SDP));
    assert!(h.to_b.iter().any(|m| m.starts_with("ACK")), "the 2xx is ACKed");
    assert_eq!(Harness::count(&h.to_b, "BYE"), 1, "and the callee hung up");
    assert!(!h.to_a.iter().any(|m| m.starts_with("SIP/2.0 200") && m.contains("CSeq: 1 INVITE")), "the caller never sees a 200");
    assert_eq!(h.ended[0].disposition, Disposition::Cancelled);
}

#[test]
fn cancel_before_provisional_waits_for_it() {
    let mut h = Harness::new();
    h.recv_a(&a_request("CANCEL", 1, "z9hG4bKinv", None, ""));
    assert!(h.to_a.iter().any(|m| m.starts_with("SIP/2.0 487")));
    assert_eq!(Harness::count(&h.to_b, "CANCEL"), 0, "RFC 3261 §9.1: no CANCEL before a provisional");
    let inv = h.last_b_request("INVITE");
    h.recv_b(&b_response(inv.as_bytes(), 180, "btag", ""));
    assert_eq!(Harness::count(&h.to_b, "CANCEL"), 1);
}

#[test]
fn callee_never_answers_gives_408() {
    let mut h = Harness::new();
    h.advance(Duration::from_secs(40));
    // Timer A: 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s → 7 INVITEs; Timer B at 32 s.
    assert_eq!(Harness::count(&h.to_b, "INVITE"), 7);
    assert!(h.to_a.iter().any(|m| m.starts_with("SIP/2.0 408")), "{:?}", h.to_a);
    assert_eq!(h.ended[0].disposition, Disposition::NoAnswer);
    assert!(h.call.is_finished() || h.call.poll_timeout().is_some());
}

#[test]
fn busy_callee_is_passed_on() {
    let mut h = Harness::new();
    let inv = h.last_b_request("INVITE");
    h.recv_b(&b_response(inv.as_bytes(), 486, "btag", ""));
    assert!(h.to_b.iter().any(|m| m.starts_with("ACK")), "the transaction ACKs the 486");
    assert!(h.to_a.last().unwrap().starts_with("SIP/2.0 486"));
    assert_eq!(h.ended[0].disposition, Disposition::Busy);
}

#[test]
fn reinvite_hold_is_relayed_with_rewritten_sdp() {
    let mut h = Harness::established();
    let tag = a_tag(&h);
    let hold = T0_SDP.replace("a=rtpmap:101", "a=sendonly\r\na=rtpmap:101");
    h.recv_a(&a_request("INVITE", 2, "z9hG4bKre", Some(&tag), &hold));
    let re = h.last_b_request("INVITE");
    assert!(re.contains("CSeq: 2 INVITE") && re.contains("a=sendonly") && re.contains("m=audio 20002 "), "{re}");
    h.recv_b(&b_response(re.as_bytes(), 200, "btag", &B_SDP.replace("a=rtpmap:0 PCMU/8000", "a=rtpmap:0 PCMU/8000\r\na=recvonly")));
    let ok = h.to_a.last().unwrap();
    assert!(ok.starts_with("SIP/2.0 200") && ok.contains("CSeq: 2 INVITE") && ok.contains("a=recvonly") && ok.contains("m=audio 20000 "), "{ok}");
    assert!(h.to_b.last().unwrap().starts_with("ACK"), "crossbar ACKs B's answer to the re-INVITE");
}

#[test]
fn offer_without_g711_is_refused_with_488() {
    let now = Instant::now();
    let opus = T0_SDP.replace("RTP/AVP 0 101", "RTP/AVP 111").replace("a=rtpmap:0 PCMU/8000", "a=rtpmap:111 opus/48000/2");
    let inv = incoming(&a_request("INVITE", 1, "z9hG4bKx", None, &opus), a_peer());
    let setup = CallSetup { a_invite: inv.request().unwrap().clone(), ..default_setup() };
    let err = B2bua::new(&setup, now).err().unwrap();
    assert_eq!(err.code, 488);
}

fn default_setup() -> CallSetup {
    let a_invite = incoming(&a_request("INVITE", 1, "z9hG4bKinv", None, T0_SDP), a_peer());
    CallSetup {
        a_invite: a_invite.request().unwrap().clone(),
        a_peer: a_peer(),
        b_uri: "sip:1001@10.0.0.2:5060".into(),
        b_peer: b_peer(),
        b_from: "<sip:caller@192.0.2.1>".into(),
        b_to: "<sip:1001@acme.localhost>".into(),
        b_call_id: "call-b".into(),
        a_sent_by: "192.0.2.1:5060".into(),
        b_sent_by: "192.0.2.1:5060".into(),
        media_a: "192.0.2.1:20000".parse().unwrap(),
        media_b: "192.0.2.1:20002".parse().unwrap(),
        timers: TimerConfig::default(),
        ring_timeout: Duration::from_secs(60),
        server_name: "192.0.2.1".into(),
        sdp_adapter: None,
        b_extra_headers: Vec::new(),
    }
}

#[test]
fn cancelled_call_waits_for_the_callees_487_and_acks_it() {
    let mut h = Harness::new();
    let inv = h.last_b_request("INVITE");
    h.recv_b(&b_response(inv.as_bytes(), 180, "btag", ""));
    h.recv_a(&a_request("CANCEL", 1, "z9hG4bKinv", None, ""));
    let tag = a_tag(&h);
    h.recv_a(&a_request("ACK", 1, "z9hG4bKinv", Some(&tag), ""));
    let cancel = h.last_b_request("CANCEL");
    h.recv_b(&b_response(cancel.as_bytes(), 200, "btag", ""));
    assert!(!h.call.is_finished(), "the callee's INVITE has no final response yet");
    h.recv_b(&b_response(inv.as_bytes(), 487, "btag", ""));
    assert!(h.to_b.last().unwrap().starts_with("ACK"), "the 487 is ACKed");
    assert!(h.call.is_finished());
}

#[test]
fn cancelled_call_gives_up_on_a_silent_callee_after_64_t1() {
    let mut h = Harness::new();
    let inv = h.last_b_request("INVITE");
    h.recv_b(&b_response(inv.as_bytes(), 180, "btag", ""));
    h.recv_a(&a_request("CANCEL", 1, "z9hG4bKinv", None, ""));
    let tag = a_tag(&h);
    h.recv_a(&a_request("ACK", 1, "z9hG4bKinv", Some(&tag), ""));
    h.advance(Duration::from_secs(33));
    assert!(h.call.is_finished());
}

#[test]
fn early_media_183_passes_with_anchored_sdp() {
    let mut h = Harness::new();
    let inv = h.last_b_request("INVITE");
    h.recv_b(&b_response(inv.as_bytes(), 183, "btag", B_SDP));
    let early = h.to_a.last().unwrap();
    assert!(early.starts_with("SIP/2.0 183"), "{early}");
    assert!(early.contains("m=audio 20000 ") && early.contains("c=IN IP4 192.0.2.1"), "the caller hears early media through crossbar: {early}");
    assert!(h.media.contains(&(Side::B, "10.0.0.2:5000".parse().unwrap())), "relay learns the callee's address from the 183");
    assert_eq!(h.progress, vec!["ringing"]);
}
