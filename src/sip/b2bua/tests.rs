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
        Harness::with_setup(default_setup())
    }

    /// The caller's INVITE has no SDP (late offer).
    fn late_offer() -> Harness {
        let inv = incoming(&a_request("INVITE", 1, "z9hG4bKinv", None, ""), a_peer());
        Harness::with_setup(CallSetup { a_invite: inv.request().unwrap().clone(), ..default_setup() })
    }

    fn with_setup(setup: CallSetup) -> Harness {
        let now = Instant::now();
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
    assert!(h.to_a.is_empty(), "no 100 Trying yet: the callee may ring first {:?}", h.to_a);
    let inv = h.last_b_request("INVITE");
    assert!(inv.contains("Call-ID: call-b"), "B leg has its own Call-ID");
    assert!(inv.contains("c=IN IP4 192.0.2.1") && inv.contains("m=audio 20002 "), "offer to B points at crossbar: {inv}");
    assert_eq!(h.media, vec![(Side::A, "10.0.0.1:4000".parse().unwrap())]);

    h.recv_b(&b_response(inv.as_bytes(), 180, "btag", ""));
    assert!(h.to_a.last().unwrap().starts_with("SIP/2.0 180"));
    h.advance(Duration::from_millis(300));
    assert_eq!(Harness::count(&h.to_a, "SIP/2.0 100"), 0, "a caller that heard 180 gets no 100 later");
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
    assert_eq!(Harness::count(&h.to_a, "SIP/2.0"), 0, "nothing to re-send yet");
    h.advance(Duration::from_millis(150));
    h.recv_a(&a_request("INVITE", 1, "z9hG4bKinv", None, T0_SDP));
    assert_eq!(Harness::count(&h.to_a, "SIP/2.0 100"), 2, "100 re-sent");
    assert_eq!(Harness::count(&h.to_b, "INVITE"), 1, "no second call towards B");
}

#[test]
fn caller_gets_100_trying_when_the_callee_is_slow() {
    let mut h = Harness::new();
    h.advance(TRYING_DELAY - Duration::from_millis(1));
    assert_eq!(Harness::count(&h.to_a, "SIP/2.0"), 0, "the callee may still ring first");
    h.advance(Duration::from_millis(1));
    assert_eq!(Harness::count(&h.to_a, "SIP/2.0 100"), 1, "100 Trying within RFC 3261's 200 ms");
    assert!(TRYING_DELAY < Duration::from_millis(200));
    h.advance(Duration::from_secs(2));
    assert_eq!(Harness::count(&h.to_a, "SIP/2.0 100"), 1, "sent once");
    let inv = h.last_b_request("INVITE");
    h.recv_b(&b_response(inv.as_bytes(), 180, "btag", ""));
    assert!(h.to_a.last().unwrap().starts_with("SIP/2.0 180"));
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

// Late offer (RFC 3261 §13.2.1): INVITE without SDP, offer in the 2xx, answer in the ACK.

const A_ANSWER: &str = "v=0\r\no=- 3 3 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";

fn body(m: &str) -> &str {
    m.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("")
}

#[test]
fn late_offer_takes_the_offer_from_the_callees_200_and_the_answer_from_the_callers_ack() {
    let mut h = Harness::late_offer();
    let inv = h.last_b_request("INVITE");
    assert!(body(&inv).is_empty() && !inv.contains("Content-Type"), "B's INVITE has no SDP either: {inv}");
    assert!(inv.contains("Content-Length: 0"), "{inv}");
    assert!(h.media.is_empty(), "no media address before any SDP");

    h.recv_b(&b_response(inv.as_bytes(), 180, "btag", ""));
    h.recv_b(&b_response(inv.as_bytes(), 200, "btag", B_SDP));
    let ok = h.to_a.last().unwrap().clone();
    assert!(ok.starts_with("SIP/2.0 200") && ok.contains("Content-Type: application/sdp"), "{ok}");
    let offer = body(&ok);
    assert!(offer.contains("c=IN IP4 192.0.2.1") && offer.contains("m=audio 20000 RTP/AVP 0"), "A's 200 carries B's offer with crossbar's A-side address: {offer}");
    assert_eq!(h.media, vec![(Side::B, "10.0.0.2:5000".parse().unwrap())]);
    assert_eq!(Harness::count(&h.to_b, "ACK"), 0, "B's ACK waits for A's answer");
    assert_eq!(h.progress, vec!["ringing", "answered"]);

    h.recv_a(&a_request("ACK", 1, "z9hG4bKack", Some(&a_tag(&h)), A_ANSWER));
    let ack = h.last_b_request("ACK");
    assert!(ack.starts_with("ACK sip:callee@10.0.0.2:5060") && ack.contains("CSeq: 1 ACK"), "{ack}");
    assert!(ack.contains("Content-Type: application/sdp"), "{ack}");
    let answer = body(&ack);
    assert!(answer.contains("c=IN IP4 192.0.2.1") && answer.contains("m=audio 20002 RTP/AVP 0"), "B's ACK carries A's answer with crossbar's B-side address: {answer}");
    assert!(!answer.contains("10.0.0.1"), "A's address does not leak to B: {answer}");
    assert_eq!(h.media, vec![(Side::B, "10.0.0.2:5000".parse().unwrap()), (Side::A, "10.0.0.1:4000".parse().unwrap())]);
    assert!(h.ended.is_empty(), "the call is up");

    // A 2xx retransmitted after the ACK gets the same ACK again.
    h.recv_b(&b_response(inv.as_bytes(), 200, "btag", B_SDP));
    assert_eq!(Harness::count(&h.to_b, "ACK"), 2);
    assert_eq!(h.to_b.last().unwrap(), &ack, "the same ACK, answer included");

    let tag = a_tag(&h);
    h.recv_a(&a_request("BYE", 2, "z9hG4bKbye", Some(&tag), ""));
    let bye = h.last_b_request("BYE");
    h.recv_b(&b_response(bye.as_bytes(), 200, "btag", ""));
    assert_eq!(h.ended[0].disposition, Disposition::Answered);
    assert!(h.call.is_finished());
}

#[test]
fn late_offer_callee_2xx_retransmitted_before_the_callers_ack_is_not_acked() {
    let mut h = Harness::late_offer();
    let inv = h.last_b_request("INVITE");
    let ok = b_response(inv.as_bytes(), 200, "btag", B_SDP);
    h.recv_b(&ok);
    h.recv_b(&ok);
    h.recv_b(&ok);
    assert_eq!(Harness::count(&h.to_b, "ACK"), 0, "no ACK without the caller's answer: {:?}", h.to_b);
    assert_eq!(Harness::count(&h.to_a, "SIP/2.0 200"), 1, "retransmissions are not passed to A");
    h.recv_a(&a_request("ACK", 1, "z9hG4bKack", Some(&a_tag(&h)), A_ANSWER));
    assert_eq!(Harness::count(&h.to_b, "ACK"), 1);
}

#[test]
fn late_offer_callee_2xx_without_sdp_is_488_to_the_caller_and_ack_bye_to_the_callee() {
    let mut h = Harness::late_offer();
    let inv = h.last_b_request("INVITE");
    h.recv_b(&b_response(inv.as_bytes(), 200, "btag", ""));
    let refusal = h.to_a.last().unwrap();
    assert!(refusal.starts_with("SIP/2.0 488"), "{refusal}");
    assert!(refusal.contains("Warning: 399 192.0.2.1 \"late offer: the callee's 200 OK has no SDP offer\""), "{refusal}");
    assert_eq!(Harness::count(&h.to_a, "SIP/2.0 200"), 0);
    let ack_at = h.to_b.iter().position(|m| m.starts_with("ACK")).expect("B's 2xx is ACKed");
    let bye_at = h.to_b.iter().position(|m| m.starts_with("BYE")).expect("and B is hung up");
    assert!(ack_at < bye_at, "ACK before BYE: {:?}", h.to_b);
    assert!(h.to_b[bye_at].contains("Reason: SIP;cause=488;text=\"late offer: the callee's 200 OK has no SDP offer\""), "{}", h.to_b[bye_at]);
    assert_eq!(h.ended[0].disposition, Disposition::Failed);
    assert_eq!(h.ended[0].code, 488);
    let bye = h.to_b[bye_at].clone();
    h.recv_b(&b_response(bye.as_bytes(), 200, "btag", ""));
    h.recv_a(&a_request("ACK", 1, "z9hG4bKinv", Some(&a_tag_any(&h)), ""));
    assert!(h.call.is_finished());
}

#[test]
fn late_offer_callee_2xx_with_unusable_sdp_is_488() {
    let mut h = Harness::late_offer();
    let inv = h.last_b_request("INVITE");
    let opus = B_SDP.replace("RTP/AVP 0", "RTP/AVP 111").replace("a=rtpmap:0 PCMU/8000", "a=rtpmap:111 opus/48000/2");
    h.recv_b(&b_response(inv.as_bytes(), 200, "btag", &opus));
    assert!(h.to_a.last().unwrap().starts_with("SIP/2.0 488"), "{:?}", h.to_a);
    assert!(h.to_a.last().unwrap().contains("not acceptable: incompatible media"), "{:?}", h.to_a);
    assert_eq!(Harness::count(&h.to_b, "ACK"), 1);
    assert_eq!(Harness::count(&h.to_b, "BYE"), 1);
}

#[test]
fn late_offer_caller_ack_without_sdp_hangs_up_both_legs() {
    let mut h = Harness::late_offer();
    let inv = h.last_b_request("INVITE");
    h.recv_b(&b_response(inv.as_bytes(), 200, "btag", B_SDP));
    let tag = a_tag(&h);
    h.recv_a(&a_request("ACK", 1, "z9hG4bKack", Some(&tag), ""));
    let ack_at = h.to_b.iter().position(|m| m.starts_with("ACK")).expect("B's 2xx is ACKed");
    let bye_at = h.to_b.iter().position(|m| m.starts_with("BYE")).expect("B is hung up");
    assert!(ack_at < bye_at, "ACK before BYE: {:?}", h.to_b);
    assert!(body(&h.to_b[ack_at]).is_empty(), "no answer to give B");
    let bye_a = h.to_a.iter().find(|m| m.starts_with("BYE")).expect("A is hung up").clone();
    assert!(bye_a.contains("Reason: SIP;cause=488;text=\"late offer: the caller's ACK has no SDP answer\""), "{bye_a}");
    assert_eq!(h.ended.len(), 1);
    assert_eq!((h.ended[0].disposition, h.ended[0].code), (Disposition::Failed, 200));
    assert_eq!(h.ended[0].reason, "late offer: the caller's ACK has no SDP answer");
    // A 2xx retransmitted now gets the ACK again, and nothing else.
    h.recv_b(&b_response(inv.as_bytes(), 200, "btag", B_SDP));
    assert_eq!(Harness::count(&h.to_b, "ACK"), 2);
    assert_eq!(Harness::count(&h.to_b, "BYE"), 1);
    let bye_b = h.last_b_request("BYE");
    h.recv_b(&b_response(bye_b.as_bytes(), 200, "btag", ""));
    let a_bye_resp = format!(
        "SIP/2.0 200 OK\r\n{}\r\n{}\r\n{}\r\nCall-ID: call-a\r\n{}\r\nContent-Length: 0\r\n\r\n",
        bye_a.lines().find(|l| l.starts_with("Via:")).unwrap(),
        bye_a.lines().find(|l| l.starts_with("From:")).unwrap(),
        bye_a.lines().find(|l| l.starts_with("To:")).unwrap(),
        bye_a.lines().find(|l| l.starts_with("CSeq:")).unwrap(),
    );
    h.recv_a(&a_bye_resp);
    assert!(h.call.is_finished());
}

#[test]
fn late_offer_caller_ack_with_unusable_answer_hangs_up_both_legs() {
    let mut h = Harness::late_offer();
    let inv = h.last_b_request("INVITE");
    h.recv_b(&b_response(inv.as_bytes(), 200, "btag", B_SDP));
    let tag = a_tag(&h);
    h.recv_a(&a_request("ACK", 1, "z9hG4bKack", Some(&tag), "v=0\r\ns=-\r\n"));
    assert_eq!(Harness::count(&h.to_b, "ACK"), 1);
    assert_eq!(Harness::count(&h.to_b, "BYE"), 1);
    assert_eq!(Harness::count(&h.to_a, "BYE"), 1);
    assert!(h.ended[0].reason.starts_with("late offer: the caller's SDP answer is not acceptable"), "{:?}", h.ended);
}

#[test]
fn late_offer_caller_never_acks_the_callee_is_acked_and_hung_up() {
    let mut h = Harness::late_offer();
    let inv = h.last_b_request("INVITE");
    h.recv_b(&b_response(inv.as_bytes(), 200, "btag", B_SDP));
    assert_eq!(Harness::count(&h.to_b, "ACK"), 0);
    h.advance(Duration::from_secs(40));
    let ack_at = h.to_b.iter().position(|m| m.starts_with("ACK")).expect("B's 2xx is ACKed when the caller never answers");
    let bye_at = h.to_b.iter().position(|m| m.starts_with("BYE")).expect("and B is hung up");
    assert!(ack_at < bye_at);
    assert!(Harness::count(&h.to_a, "BYE") >= 1);
    assert_eq!(h.ended.len(), 1);
}

#[test]
fn late_offer_early_media_sdp_is_not_passed_to_the_caller() {
    let mut h = Harness::late_offer();
    let inv = h.last_b_request("INVITE");
    h.recv_b(&b_response(inv.as_bytes(), 183, "btag", B_SDP));
    let early = h.to_a.last().unwrap();
    assert!(early.starts_with("SIP/2.0 183") && body(early).is_empty() && !early.contains("Content-Type"), "{early}");
    assert!(h.media.is_empty());
}

#[test]
fn late_offer_cancel_before_answer_is_487() {
    let mut h = Harness::late_offer();
    let inv = h.last_b_request("INVITE");
    h.recv_b(&b_response(inv.as_bytes(), 180, "btag", ""));
    h.recv_a(&a_request("CANCEL", 1, "z9hG4bKinv", None, ""));
    assert!(h.to_a.iter().any(|m| m.starts_with("SIP/2.0 487")));
    assert_eq!(Harness::count(&h.to_b, "CANCEL"), 1);
    // B's 200 crosses the CANCEL: ACKed (no answer to give) and hung up.
    h.recv_b(&b_response(inv.as_bytes(), 200, "btag", B_SDP));
    assert_eq!(Harness::count(&h.to_b, "ACK"), 1);
    assert_eq!(Harness::count(&h.to_b, "BYE"), 1);
    assert_eq!(h.ended[0].disposition, Disposition::Cancelled);
}

/// The To tag A got in any response (a refusal included).
fn a_tag_any(h: &Harness) -> String {
    let r = h.to_a.iter().rev().find(|m| m.starts_with("SIP/2.0") && m.contains("CSeq: 1 INVITE") && !m.starts_with("SIP/2.0 100")).expect("A got a final response");
    let to = r.lines().find(|l| l.starts_with("To:")).unwrap();
    msg::param(to, "tag").unwrap().to_string()
}

/// The real bridge behind the adapter trait, driven in the test's thread
/// (`BridgeSdp` also kicks a media thread, which a unit test has not got).
struct BridgeAdapter(std::sync::Mutex<crate::media::webrtc::Bridge>);

impl BridgeAdapter {
    fn new(kinds: [crate::media::webrtc::LegKind; 2]) -> std::sync::Arc<BridgeAdapter> {
        let s = default_setup();
        std::sync::Arc::new(BridgeAdapter(std::sync::Mutex::new(crate::media::webrtc::Bridge::new(kinds, [s.media_a, s.media_b]))))
    }
}

impl std::fmt::Debug for BridgeAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BridgeAdapter")
    }
}

impl SdpAdapter for BridgeAdapter {
    fn offer(&self, from: Side, sdp: &[u8]) -> Result<Vec<u8>, String> {
        self.0.lock().unwrap().offer(from, sdp, Instant::now())
    }
    fn answer(&self, from: Side, sdp: &[u8]) -> Result<Vec<u8>, String> {
        self.0.lock().unwrap().answer(from, sdp, Instant::now())
    }
    fn late_offer(&self, to: Side) -> Result<Vec<u8>, String> {
        self.0.lock().unwrap().late_offer(to, Instant::now())
    }
    fn late_answer(&self, from: Side, sdp: &[u8]) -> Result<(), String> {
        self.0.lock().unwrap().late_answer(from, sdp)
    }
}

/// A carrier's late offer to a browser: crossbar offers DTLS/SAVPF itself, a
/// str0m peer (the browser) answers in its 200, which is ACKed at once; the
/// carrier gets a plain offer with the browser's codec and answers in its ACK.
#[test]
fn late_offer_to_a_browser_gets_crossbars_own_offer_and_the_browser_is_acked_at_once() {
    use crate::media::webrtc::LegKind;
    let inv = incoming(&a_request("INVITE", 1, "z9hG4bKinv", None, ""), a_peer());
    let adapter = BridgeAdapter::new([LegKind::Plain, LegKind::WebRtc]);
    let mut h = Harness::with_setup(CallSetup { a_invite: inv.request().unwrap().clone(), sdp_adapter: Some(adapter), ..default_setup() });
    let inv = h.last_b_request("INVITE");
    let offer = body(&inv);
    assert!(offer.contains("UDP/TLS/RTP/SAVPF") && offer.contains("a=group:BUNDLE") && offer.contains("a=rtcp-mux"), "{offer}");
    assert!(offer.contains("PCMU/8000") && offer.contains("PCMA/8000") && offer.contains("telephone-event/8000"), "{offer}");

    let now = Instant::now();
    let mut browser = str0m::RtcConfig::new().set_rtp_mode(true).clear_codecs().enable_pcma(true, false).enable_opus(true, false).build(now);
    browser.add_local_candidate(str0m::Candidate::host("127.0.0.1:50000".parse().unwrap(), "udp").unwrap());
    let answer = browser.sdp_api().accept_offer(str0m::change::SdpOffer::from_sdp_string(offer).unwrap()).unwrap().to_sdp_string();
    h.recv_b(&b_response(inv.as_bytes(), 200, "btag", &answer));
    assert_eq!(Harness::count(&h.to_b, "ACK"), 1, "the browser answered crossbar's offer: its ACK waits for nothing");
    assert!(body(&h.last_b_request("ACK")).is_empty());
    let ok = h.to_a.last().unwrap().clone();
    let to_carrier = body(&ok);
    assert!(ok.starts_with("SIP/2.0 200") && to_carrier.contains("c=IN IP4 192.0.2.1") && to_carrier.contains("m=audio 20000 RTP/AVP 8"), "the carrier is offered what the browser chose (PCMA): {ok}");
    assert!(!to_carrier.contains("PCMU"), "{to_carrier}");

    h.recv_a(&a_request("ACK", 1, "z9hG4bKack", Some(&a_tag(&h)), &A_ANSWER.replace("RTP/AVP 0", "RTP/AVP 8").replace("0 PCMU", "8 PCMA")));
    assert!(h.ended.is_empty(), "the call is up: {:?}", h.ended);
    assert_eq!(Harness::count(&h.to_b, "ACK"), 1);
    assert_eq!(Harness::count(&h.to_b, "BYE") + Harness::count(&h.to_a, "BYE"), 0);
}

#[test]
fn late_offer_to_a_browser_with_an_answer_that_changes_codec_hangs_up() {
    use crate::media::webrtc::LegKind;
    let inv = incoming(&a_request("INVITE", 1, "z9hG4bKinv", None, ""), a_peer());
    let adapter = BridgeAdapter::new([LegKind::Plain, LegKind::WebRtc]);
    let mut h = Harness::with_setup(CallSetup { a_invite: inv.request().unwrap().clone(), sdp_adapter: Some(adapter), ..default_setup() });
    let inv = h.last_b_request("INVITE");
    let now = Instant::now();
    let mut browser = str0m::RtcConfig::new().set_rtp_mode(true).clear_codecs().enable_pcma(true, false).build(now);
    browser.add_local_candidate(str0m::Candidate::host("127.0.0.1:50000".parse().unwrap(), "udp").unwrap());
    let answer = browser.sdp_api().accept_offer(str0m::change::SdpOffer::from_sdp_string(body(&inv)).unwrap()).unwrap().to_sdp_string();
    h.recv_b(&b_response(inv.as_bytes(), 200, "btag", &answer));
    // The carrier answers PCMU to a PCMA offer: no transcoding, so no call.
    h.recv_a(&a_request("ACK", 1, "z9hG4bKack", Some(&a_tag(&h)), A_ANSWER));
    assert_eq!(Harness::count(&h.to_a, "BYE"), 1);
    assert_eq!(Harness::count(&h.to_b, "BYE"), 1);
    assert!(h.ended[0].reason.contains("drops the offered codec"), "{:?}", h.ended);
}

#[test]
fn late_offer_from_a_browser_is_refused_with_488() {
    use crate::media::webrtc::LegKind;
    let inv = incoming(&a_request("INVITE", 1, "z9hG4bKinv", None, ""), a_peer());
    let setup = CallSetup { a_invite: inv.request().unwrap().clone(), sdp_adapter: Some(BridgeAdapter::new([LegKind::WebRtc, LegKind::Plain])), ..default_setup() };
    let err = B2bua::new(&setup, Instant::now()).err().unwrap();
    assert_eq!(err.code, 488);
    assert!(err.reason.contains("late offer") && err.reason.contains("WebRTC leg must send its SDP offer"), "{}", err.reason);
}
