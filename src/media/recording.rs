//! Call recording: capture of G.711 audio in the relay's hot path, and its rendering to
//! a stereo WAV once the recording is finished.
//!
//! Sans-IO: the media thread feeds each relayed RTP datagram to [`Track::record`] (it owns
//! the track while recording, so capturing takes no lock), and [`render`] turns the two
//! tracks handed back at finish into a WAV. Neither touches a socket; the clock is read
//! only through the `now` the caller passes.
//!
//! Capturing is cheap on purpose: a payload copy and a 12-byte record per packet into
//! vectors reserved at start. Everything else (decoding, reordering, dropping
//! duplicates, filling gaps, aligning the two directions) happens in [`render`], off the
//! media thread.

use std::collections::HashSet;
use std::fmt;
use std::io::Cursor;
use std::mem::size_of;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tracing::warn;

use super::g711::Law;

/// G.711's RTP clock and sample rate (RFC 3551 §4.5.14): one payload byte is one sample
/// and one timestamp tick.
const SAMPLE_RATE: u32 = 8000;
const SAMPLES_PER_MS: u64 = SAMPLE_RATE as u64 / 1000;

/// Capture reserved per direction at start: 10 s of audio. Enough that short calls never
/// grow a vector, small enough that thousands of recorded calls do not reserve much for
/// nothing; longer calls grow by doubling.
const INITIAL_RESERVE_BYTES: usize = 10 * SAMPLE_RATE as usize;

/// The usual 20 ms G.711 packet, to size the per-packet records along with the audio.
const TYPICAL_PAYLOAD: usize = 160;

/// How far behind the end of a channel a packet may land and still be a late packet
/// written in place (1 s, far more than any jitter). Further back, the sender's
/// timestamps jumped back: its audio continues at the end of the channel instead.
const REORDER_WINDOW: i64 = SAMPLE_RATE as i64;

/// Silence a channel may hold beyond the wall-clock time it covers (2 s): room for the
/// sender's clock running a little fast and for jitter.
const SILENCE_SLACK: usize = 2 * SAMPLE_RATE as usize;

/// The WAV header hound writes for 16-bit PCM (RIFF, fmt, data chunk headers).
const WAV_HEADER_LEN: usize = 44;

/// Frames (one sample per channel) that fit in a WAV: its sizes are 32-bit.
const MAX_FRAMES: usize = (u32::MAX as usize - WAV_HEADER_LEN) / 4;

/// Frames handed to hound at a time, so its staging buffer stays small.
const WAV_CHUNK_FRAMES: usize = 4096;

/// What [`start_recording`](super::MediaSession::start_recording) takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordingOptions {
    /// Cap on the raw G.711 audio kept, both directions together (8 000 bytes per second
    /// of audio per direction). Beyond it the recording stops, the call does not, and the
    /// result says `truncated`. A packet counts for at least 12 bytes (its bookkeeping),
    /// so a stream of tiny packets cannot grow memory far past the cap.
    pub max_bytes: usize,
}

/// A finished recording.
#[derive(Clone, PartialEq, Eq)]
pub struct Recording {
    /// RIFF WAVE, 16-bit PCM, 8 kHz, 2 channels: left = A (caller), right = B (callee).
    pub wav: Vec<u8>,
    /// Length of the audio in `wav`.
    pub duration_ms: u64,
    /// Recording stopped before it was finished: `max_bytes` was reached (or, past 37
    /// hours, the 4 GiB a WAV can hold).
    pub truncated: bool,
}

impl fmt::Debug for Recording {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recording")
            .field("wav_bytes", &self.wav.len())
            .field("duration_ms", &self.duration_ms)
            .field("truncated", &self.truncated)
            .finish()
    }
}

/// The raw-audio allowance of one recording, shared by its two directions' tracks,
/// which are made by the session and filled on the media thread (so the share must be
/// `Sync`), hence an atomic: one uncontended add per recorded packet.
#[derive(Debug)]
pub(crate) struct Budget {
    max: usize,
    used: AtomicUsize,
}

impl Budget {
    pub(crate) fn new(max_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            // Keeps `used` far from wrapping: past the cap each track adds once more at
            // most, then stops.
            max: max_bytes.min(isize::MAX as usize),
            used: AtomicUsize::new(0),
        })
    }

    /// Takes `n` bytes; false once the cap is reached. Failed takes are not given back,
    /// so once one direction hits the cap the other stops too.
    fn take(&self, n: usize) -> bool {
        let before = self.used.fetch_add(n, Ordering::Relaxed);
        before.checked_add(n).is_some_and(|after| after <= self.max)
    }
}

/// The fields of one RTP packet (RFC 3550 §5.1) that recording needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RtpAudio<'a> {
    law: Law,
    seq: u16,
    ts: u32,
    ssrc: u32,
    payload: &'a [u8],
}

impl<'a> RtpAudio<'a> {
    /// `None` for anything but a well-formed RTP packet carrying G.711 audio: other
    /// payload types (telephone-event, comfort noise, RTCP on a muxed port), another
    /// version, lengths that do not add up, or no audio at all.
    fn parse(p: &'a [u8]) -> Option<Self> {
        let fixed = p.get(..12)?;
        let (b0, b1) = (fixed[0], fixed[1]);
        if b0 >> 6 != 2 {
            return None;
        }
        let law = match b1 & 0x7f {
            0 => Law::Mu,
            8 => Law::A,
            _ => return None,
        };
        let csrc_count = usize::from(b0 & 0x0f);
        let mut start = 12 + 4 * csrc_count;
        if b0 & 0x10 != 0 {
            // §5.3.1: 16 bits profile-defined, then the length in 32-bit words not
            // counting this 4-byte header.
            let ext = p.get(start..start + 4)?;
            let words = usize::from(u16::from_be_bytes([ext[2], ext[3]]));
            start += 4 + 4 * words;
        }
        let mut end = p.len();
        if b0 & 0x20 != 0 {
            // The last octet counts the padding, itself included, so 0 is malformed.
            let pad = usize::from(*p.last()?);
            if pad == 0 {
                return None;
            }
            end = end.checked_sub(pad)?;
        }
        // `get` refuses start > end as well as end > len.
        let payload = p.get(start..end)?;
        if payload.is_empty() {
            return None;
        }
        Some(Self {
            law,
            seq: u16::from_be_bytes([fixed[2], fixed[3]]),
            ts: u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]),
            ssrc: u32::from_be_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]),
            payload,
        })
    }
}

/// One captured packet; its payload is the next `len` bytes of [`Track::audio`].
#[derive(Debug, Clone, Copy)]
struct PacketMeta {
    ts: u32,
    seq: u16,
    len: u16,
    law: Law,
}

/// A run of packets from one SSRC, and when its first packet arrived: a new SSRC (a
/// re-INVITE towards another endpoint, a transfer) starts a new timestamp timeline,
/// which only the wall clock can place.
#[derive(Debug, Clone, Copy)]
struct Segment {
    /// Index of its first packet in [`Track::packets`].
    first_packet: usize,
    ssrc: u32,
    arrival: Instant,
}

/// The capture of one direction. Owned by the media thread while recording.
pub(crate) struct Track {
    budget: Arc<Budget>,
    audio: Vec<u8>,
    packets: Vec<PacketMeta>,
    segments: Vec<Segment>,
    /// The budget ran out: nothing more is kept.
    truncated: bool,
}

impl fmt::Debug for Track {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Track")
            .field("audio_bytes", &self.audio.len())
            .field("packets", &self.packets.len())
            .field("segments", &self.segments.len())
            .field("truncated", &self.truncated)
            .finish()
    }
}

impl Track {
    /// Reserves up front (in the caller of `start_recording`, not the media thread).
    pub(crate) fn new(budget: Arc<Budget>) -> Self {
        let bytes = budget.max.min(INITIAL_RESERVE_BYTES);
        Self {
            budget,
            audio: Vec::with_capacity(bytes),
            packets: Vec::with_capacity(bytes / TYPICAL_PAYLOAD + 1),
            segments: Vec::with_capacity(1),
            truncated: false,
        }
    }

    /// Keeps the audio of one relayed datagram, if it is G.711 RTP. `now` is called at
    /// most once, and only when a new SSRC starts (the first packet included), so the
    /// hot path does not read the clock per packet.
    pub(crate) fn record(&mut self, datagram: &[u8], now: impl FnOnce() -> Instant) {
        if self.truncated {
            return;
        }
        let Some(rtp) = RtpAudio::parse(datagram) else {
            return;
        };
        // Below 64 KiB since datagrams are; a longer one is not ours to record.
        let Ok(len) = u16::try_from(rtp.payload.len()) else {
            return;
        };
        // Tiny packets pay for their record, so they cannot grow memory far past the cap.
        let charge = rtp.payload.len().max(size_of::<PacketMeta>());
        if !self.budget.take(charge) {
            self.truncated = true;
            return;
        }
        if self.segments.last().is_none_or(|s| s.ssrc != rtp.ssrc) {
            self.segments.push(Segment {
                first_packet: self.packets.len(),
                ssrc: rtp.ssrc,
                arrival: now(),
            });
        }
        self.audio.extend_from_slice(rtp.payload);
        self.packets.push(PacketMeta {
            ts: rtp.ts,
            seq: rtp.seq,
            len,
            law: rtp.law,
        });
    }

    fn first_arrival(&self) -> Option<Instant> {
        self.segments.first().map(|s| s.arrival)
    }

    /// Decodes this direction to linear PCM, sample 0 being its first packet's arrival.
    ///
    /// Each packet goes where its RTP timestamp says, relative to the first packet of its
    /// segment; each segment starts where the wall clock says (never over audio already
    /// placed). Gaps become silence, but a channel never holds more silence than the
    /// wall-clock time from its first packet to `now` (plus [`SILENCE_SLACK`]) allows,
    /// whatever the timestamps claim. Duplicates (same sequence number in a segment)
    /// are dropped.
    fn to_pcm(&self, now: Instant) -> Vec<i16> {
        let Some(first_arrival) = self.first_arrival() else {
            return Vec::new();
        };
        let limit = samples_between(first_arrival, now).saturating_add(SILENCE_SLACK);
        let mut out: Vec<i16> = Vec::with_capacity(self.audio.len());
        let mut seen: HashSet<i64> = HashSet::new();
        let mut timeline = Timeline::default();
        let mut segments = self.segments.iter().peekable();
        let mut offset = 0usize;
        for (i, meta) in self.packets.iter().enumerate() {
            let len = usize::from(meta.len);
            let Some(payload) = self.audio.get(offset..offset + len) else {
                // Cannot happen: `record` appends both together.
                break;
            };
            offset += len;

            if let Some(seg) = segments.next_if(|s| s.first_packet == i) {
                let wall = samples_between(first_arrival, seg.arrival);
                let at = wall.max(out.len()).min(limit.max(out.len()));
                timeline = Timeline::start(meta, to_i64(at));
                seen.clear();
            }
            if !seen.insert(timeline.ext_seq(meta.seq)) {
                continue;
            }
            let end = to_i64(out.len());
            let mut pos = timeline.position(meta.ts);
            if pos > end {
                let room = to_i64(limit.saturating_sub(out.len()));
                let fill = (pos - end).min(room);
                timeline.shift(pos - end - fill);
                pos = end + fill;
            } else if pos < end - REORDER_WINDOW {
                timeline.shift(pos - end);
                pos = end;
            }
            write_at(&mut out, pos, payload, meta.law);
        }
        out
    }
}

/// Where one segment's RTP timestamps and sequence numbers fall, unwrapped to 64 bits
/// relative to its first packet (each step is the signed 32/16-bit difference to the
/// previous packet, as RFC 3550 A.1 extends sequence numbers).
#[derive(Debug, Default)]
struct Timeline {
    last_ts: u32,
    ext_ts: i64,
    last_seq: u16,
    ext_seq: i64,
    /// Sample index of timestamp 0 (the segment's first packet) on the channel.
    origin: i64,
}

impl Timeline {
    fn start(first: &PacketMeta, at: i64) -> Self {
        Self {
            last_ts: first.ts,
            ext_ts: 0,
            last_seq: first.seq,
            ext_seq: 0,
            origin: at,
        }
    }

    fn ext_seq(&mut self, seq: u16) -> i64 {
        self.ext_seq += i64::from(seq.wrapping_sub(self.last_seq) as i16);
        self.last_seq = seq;
        self.ext_seq
    }

    /// Sample index on the channel for timestamp `ts`.
    fn position(&mut self, ts: u32) -> i64 {
        self.ext_ts += i64::from(ts.wrapping_sub(self.last_ts) as i32);
        self.last_ts = ts;
        self.origin + self.ext_ts
    }

    /// Moves this and later packets `by` samples earlier (a negative `by`: later).
    fn shift(&mut self, by: i64) {
        self.origin -= by;
    }
}

/// Writes decoded `payload` from sample `pos` on, over whatever is there (a late packet
/// filling silence), growing `out` with silence up to `pos` if needed. Samples before 0
/// (a late packet from before the first one) are dropped.
fn write_at(out: &mut Vec<i16>, pos: i64, payload: &[u8], law: Law) {
    let (start, skip) = match usize::try_from(pos) {
        Ok(start) => (start, 0),
        Err(_) => (0, usize::try_from(pos.unsigned_abs()).unwrap_or(usize::MAX)),
    };
    if start > out.len() {
        out.resize(start, 0);
    }
    for (i, &code) in payload.iter().skip(skip).enumerate() {
        let sample = law.decode(code);
        match out.get_mut(start + i) {
            Some(slot) => *slot = sample,
            None => out.push(sample),
        }
    }
}

fn samples_between(from: Instant, to: Instant) -> usize {
    let us = to.saturating_duration_since(from).as_micros();
    usize::try_from(us * u128::from(SAMPLES_PER_MS) / 1000).unwrap_or(usize::MAX)
}

/// Channel lengths are far below 2^63 (they are bounded by memory).
fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Builds the WAV from the tracks of A and B handed back by the relay, `now` being when
/// recording finished. The two directions are aligned by the arrival of their first
/// packets. `None` when no audio was captured.
pub(crate) fn render(tracks: [Option<Track>; 2], now: Instant) -> Option<Recording> {
    let earliest = tracks
        .iter()
        .flatten()
        .filter_map(Track::first_arrival)
        .min()?;
    let mut truncated = false;
    let channels = tracks.map(|track| match track {
        Some(t) => {
            truncated |= t.truncated;
            let lead = t
                .first_arrival()
                .map_or(0, |first| samples_between(earliest, first));
            Channel {
                lead,
                pcm: t.to_pcm(now),
            }
        }
        None => Channel::default(),
    });
    let full = channels
        .iter()
        .map(|c| c.lead.saturating_add(c.pcm.len()))
        .max()
        .unwrap_or(0);
    let frames = full.min(MAX_FRAMES);
    truncated |= frames < full;
    let wav = match write_wav(&channels, frames) {
        Ok(wav) => wav,
        Err(e) => {
            // Writing into memory with sizes kept within the format's cannot fail; if
            // it ever does, the call goes on without its recording.
            warn!(error = %e, "could not write the recording's WAV");
            return None;
        }
    };
    Some(Recording {
        wav,
        duration_ms: frames as u64 / SAMPLES_PER_MS,
        truncated,
    })
}

/// One direction's decoded audio, starting `lead` samples after the recording does.
#[derive(Debug, Default)]
struct Channel {
    lead: usize,
    pcm: Vec<i16>,
}

impl Channel {
    fn sample(&self, frame: usize) -> i16 {
        frame
            .checked_sub(self.lead)
            .and_then(|i| self.pcm.get(i))
            .copied()
            .unwrap_or(0)
    }
}

fn write_wav([left, right]: &[Channel; 2], frames: usize) -> Result<Vec<u8>, hound::Error> {
    let spec = hound::WavSpec {
        channels: 2,
        sample_rate: SAMPLE_RATE,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut wav = Vec::with_capacity(WAV_HEADER_LEN + frames * 4);
    let mut writer = hound::WavWriter::new(Cursor::new(&mut wav), spec)?;
    let mut frame = 0;
    while frame < frames {
        let n = (frames - frame).min(WAV_CHUNK_FRAMES);
        // hound panics unless exactly this many samples are written: two per frame.
        let mut chunk = writer.get_i16_writer(2 * n as u32);
        for f in frame..frame + n {
            chunk.write_sample(left.sample(f));
            chunk.write_sample(right.sample(f));
        }
        chunk.flush()?;
        frame += n;
    }
    writer.finalize()?;
    Ok(wav)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const PCMU: u8 = 0;
    const PCMA: u8 = 8;
    /// µ-law codes for +7932 / -7932 / 0.
    const MU_HI: u8 = 0xa0;
    const MU_LO: u8 = 0x20;
    const MU_ZERO: u8 = 0xff;

    fn rtp(pt: u8, seq: u16, ts: u32, ssrc: u32, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x80, pt];
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&ts.to_be_bytes());
        p.extend_from_slice(&ssrc.to_be_bytes());
        p.extend_from_slice(payload);
        p
    }

    fn track(max_bytes: usize) -> Track {
        Track::new(Budget::new(max_bytes))
    }

    /// Feeds (seq, ts, payload byte) as 160-byte PCMU packets, all arriving at `t0`.
    fn feed(t: &mut Track, t0: Instant, packets: &[(u16, u32, u8)]) {
        for &(seq, ts, code) in packets {
            t.record(&rtp(PCMU, seq, ts, 7, &[code; 160]), || t0);
        }
    }

    #[test]
    fn parses_plain_csrc_extension_and_padding() {
        let payload = [1u8, 2, 3, 4];
        let plain = rtp(PCMU, 9, 1234, 0xabcd, &payload);
        let got = RtpAudio::parse(&plain).unwrap();
        assert_eq!(
            (got.law, got.seq, got.ts, got.ssrc, got.payload),
            (Law::Mu, 9, 1234, 0xabcd, &payload[..])
        );

        // Marker bit set, PCMA, 2 CSRCs, a 1-word extension and 3 bytes of padding.
        let mut p = vec![0x80 | 0x20 | 0x10 | 2, 0x80 | PCMA];
        p.extend_from_slice(&[0, 1, 0, 0, 0, 2, 0, 0, 0, 3]);
        p.extend_from_slice(&[0xaa; 8]); // CSRCs
        p.extend_from_slice(&[0xbe, 0xde, 0, 1, 0x11, 0x22, 0x33, 0x44]); // extension
        p.extend_from_slice(&payload);
        p.extend_from_slice(&[0, 0, 3]);
        let got = RtpAudio::parse(&p).unwrap();
        assert_eq!(got.law, Law::A);
        assert_eq!(got.payload, &payload[..]);
    }

    #[test]
    fn refuses_malformed_and_other_payload_types() {
        let good = rtp(PCMU, 1, 0, 1, &[0xff; 20]);
        let mut cases: Vec<Vec<u8>> = vec![
            vec![],
            good[..11].to_vec(),
            good[..12].to_vec(),                  // no payload
            rtp(101, 1, 0, 1, &[0, 0x8a, 0, 80]), // telephone-event
            rtp(13, 1, 0, 1, &[0x40]),            // comfort noise
            rtp(200 - 128, 1, 0, 1, &[0; 20]),    // RTCP SR on a muxed port
        ];
        let mut v1 = good.clone();
        v1[0] = 0x40;
        cases.push(v1);
        let mut csrc_past_end = good.clone();
        csrc_past_end[0] |= 0x0f;
        cases.push(csrc_past_end);
        let mut ext_past_end = good.clone();
        ext_past_end[0] |= 0x10;
        ext_past_end[14..16].copy_from_slice(&[0xff, 0xff]);
        cases.push(ext_past_end);
        let mut pad_zero = good.clone();
        pad_zero[0] |= 0x20;
        *pad_zero.last_mut().unwrap() = 0;
        cases.push(pad_zero);
        let mut pad_too_long = good.clone();
        pad_too_long[0] |= 0x20;
        *pad_too_long.last_mut().unwrap() = 0xff;
        cases.push(pad_too_long);
        let mut pad_everything = good.clone();
        pad_everything[0] |= 0x20;
        *pad_everything.last_mut().unwrap() = 20;
        cases.push(pad_everything);
        for (i, c) in cases.iter().enumerate() {
            assert_eq!(RtpAudio::parse(c), None, "case {i}");
        }
    }

    #[test]
    fn garbage_is_ignored_without_panic() {
        // A fixed pseudo-random sequence: RTP-looking headers with random flags, lengths
        // and payload types, fed through capture and rendering.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let t0 = Instant::now();
        let mut t = track(1 << 20);
        for _ in 0..20_000 {
            let len = (next() % 80) as usize;
            let mut p: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if let Some(b0) = p.first_mut() {
                *b0 = 0x80 | (*b0 & 0x3f);
            }
            if let Some(b1) = p.get_mut(1) {
                *b1 &= 0x88; // PT 0 or 8, marker or not
            }
            t.record(&p, || t0);
        }
        assert!(!t.packets.is_empty(), "some garbage is valid G.711 RTP");
        let rec = render([Some(t), None], t0 + Duration::from_secs(5)).unwrap();
        // Bounded by the wall clock (5 s) + slack, whatever the random timestamps said,
        // plus the audio itself.
        assert!(rec.duration_ms <= 7_000 + 20_000 * 80 / 8, "{rec:?}");
    }

    #[test]
    fn contiguous_packets_decode_in_order() {
        let t0 = Instant::now();
        let mut t = track(1 << 20);
        feed(
            &mut t,
            t0,
            &[(10, 1000, MU_HI), (11, 1160, MU_LO), (12, 1320, MU_ZERO)],
        );
        let pcm = t.to_pcm(t0 + Duration::from_secs(1));
        assert_eq!(pcm.len(), 480);
        assert!(pcm[..160].iter().all(|&s| s == 7932));
        assert!(pcm[160..320].iter().all(|&s| s == -7932));
        assert!(pcm[320..].iter().all(|&s| s == 0));
    }

    #[test]
    fn lost_packet_becomes_silence_and_late_one_fills_it() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(1);
        let mut t = track(1 << 20);
        feed(&mut t, t0, &[(1, 0, MU_HI), (3, 320, MU_HI)]);
        let pcm = t.to_pcm(now);
        assert_eq!(pcm.len(), 480);
        assert!(pcm[160..320].iter().all(|&s| s == 0), "gap is silence");
        assert!(pcm[320..].iter().all(|&s| s == 7932));

        // Packet 2 arrives late: it goes in its place, nothing moves.
        feed(&mut t, t0, &[(2, 160, MU_LO), (4, 480, MU_HI)]);
        let pcm = t.to_pcm(now);
        assert_eq!(pcm.len(), 640);
        assert!(pcm[160..320].iter().all(|&s| s == -7932));
        assert!(pcm[320..].iter().all(|&s| s == 7932));
    }

    #[test]
    fn timestamp_jump_fills_bounded_silence() {
        let t0 = Instant::now();
        let mut t = track(1 << 20);
        // 2^30 ticks is 37 hours; the call has lasted 3 s.
        feed(
            &mut t,
            t0,
            &[
                (1, 0, MU_HI),
                (2, 1 << 30, MU_LO),
                (3, (1 << 30) + 160, MU_LO),
            ],
        );
        let pcm = t.to_pcm(t0 + Duration::from_secs(3));
        let limit = 3 * 8000 + SILENCE_SLACK;
        assert_eq!(pcm.len(), limit + 320, "silence capped, audio kept");
        assert!(pcm[160..limit].iter().all(|&s| s == 0));
        assert!(pcm[limit..].iter().all(|&s| s == -7932));

        // A normal gap (100 ms of lost packets) is filled exactly.
        let mut t = track(1 << 20);
        feed(&mut t, t0, &[(1, 0, MU_HI), (7, 960, MU_HI)]);
        let pcm = t.to_pcm(t0 + Duration::from_secs(3));
        assert_eq!(pcm.len(), 1120);
        assert_eq!(pcm.iter().filter(|&&s| s == 0).count(), 800);
    }

    #[test]
    fn timestamp_jump_back_continues_at_the_end() {
        let t0 = Instant::now();
        let mut t = track(1 << 20);
        // The sender restarts its timestamps 5 s back: not a late packet, a new timeline.
        feed(
            &mut t,
            t0,
            &[
                (1, 80_000, MU_HI),
                (2, 80_160, MU_HI),
                (3, 40_000, MU_LO),
                (4, 40_160, MU_LO),
            ],
        );
        let pcm = t.to_pcm(t0 + Duration::from_secs(10));
        assert_eq!(pcm.len(), 640);
        assert!(pcm[..320].iter().all(|&s| s == 7932));
        assert!(pcm[320..].iter().all(|&s| s == -7932));
    }

    #[test]
    fn duplicate_sequence_is_dropped() {
        let t0 = Instant::now();
        let mut t = track(1 << 20);
        // Seq 2 comes twice with different audio; then once more after the window.
        feed(
            &mut t,
            t0,
            &[
                (1, 0, MU_HI),
                (2, 160, MU_HI),
                (2, 160, MU_LO),
                (3, 320, MU_HI),
            ],
        );
        for seq in 4..100u16 {
            feed(&mut t, t0, &[(seq, u32::from(seq - 1) * 160, MU_HI)]);
        }
        feed(&mut t, t0, &[(2, 160, MU_LO)]);
        let pcm = t.to_pcm(t0 + Duration::from_secs(10));
        assert_eq!(pcm.len(), 99 * 160, "the late duplicate is not appended");
        assert!(pcm.iter().all(|&s| s == 7932), "the first copy wins");
    }

    #[test]
    fn sequence_and_timestamp_wrap() {
        let t0 = Instant::now();
        let mut t = track(1 << 20);
        feed(
            &mut t,
            t0,
            &[
                (65534, u32::MAX - 159, MU_HI),
                (65535, 0, MU_LO),
                (0, 160, MU_HI),
                (1, 320, MU_LO),
            ],
        );
        let pcm = t.to_pcm(t0 + Duration::from_secs(1));
        assert_eq!(pcm.len(), 640);
        assert_eq!(
            [pcm[0], pcm[160], pcm[320], pcm[480]],
            [7932, -7932, 7932, -7932]
        );
    }

    #[test]
    fn new_ssrc_is_placed_by_wall_clock() {
        let t0 = Instant::now();
        let mut t = track(1 << 20);
        t.record(&rtp(PCMU, 1, 0, 111, &[MU_HI; 160]), || t0);
        // 500 ms later another source (random seq and ts) takes over.
        let t1 = t0 + Duration::from_millis(500);
        t.record(&rtp(PCMU, 40_000, 9_999_999, 222, &[MU_LO; 160]), || t1);
        t.record(&rtp(PCMU, 40_001, 10_000_159, 222, &[MU_LO; 160]), || t1);
        assert_eq!(t.segments.len(), 2);
        let pcm = t.to_pcm(t0 + Duration::from_secs(1));
        assert_eq!(pcm.len(), 4000 + 320);
        assert!(pcm[160..4000].iter().all(|&s| s == 0));
        assert!(pcm[4000..].iter().all(|&s| s == -7932));
    }

    #[test]
    fn telephone_event_and_other_types_are_skipped() {
        let t0 = Instant::now();
        let mut t = track(1 << 20);
        t.record(&rtp(PCMU, 1, 0, 1, &[MU_HI; 160]), || t0);
        t.record(&rtp(101, 2, 160, 1, &[1, 0x0a, 0, 160]), || t0);
        t.record(&rtp(PCMA, 3, 160, 1, &[0x9a; 160]), || t0);
        assert_eq!(t.packets.len(), 2);
        let pcm = t.to_pcm(t0 + Duration::from_secs(1));
        assert_eq!((pcm[0], pcm[160], pcm.len()), (7932, 4032, 320));
    }

    #[test]
    fn budget_is_shared_and_truncates() {
        let t0 = Instant::now();
        // Room for four packets and a bit, not five.
        let budget = Budget::new(160 * 4 + 100);
        let (mut a, mut b) = (Track::new(budget.clone()), Track::new(budget));
        for seq in 0..3u16 {
            a.record(
                &rtp(PCMU, seq, u32::from(seq) * 160, 1, &[MU_HI; 160]),
                || t0,
            );
            b.record(
                &rtp(PCMA, seq, u32::from(seq) * 160, 2, &[0x9a; 160]),
                || t0,
            );
        }
        // A's third packet (the fifth in all) does not fit: both directions stop there.
        assert!(a.truncated && b.truncated);
        assert_eq!((a.packets.len(), b.packets.len()), (2, 2));
        // Once truncated, nothing more is kept.
        let kept = (a.packets.len(), b.packets.len());
        a.record(&rtp(PCMU, 9, 1440, 1, &[MU_HI; 1]), || t0);
        b.record(&rtp(PCMA, 9, 1440, 2, &[0x9a; 1]), || t0);
        assert_eq!((a.packets.len(), b.packets.len()), kept);
        let rec = render([Some(a), Some(b)], t0).unwrap();
        assert!(rec.truncated);
    }

    #[test]
    fn tiny_packets_pay_for_their_bookkeeping() {
        let t0 = Instant::now();
        let mut t = track(1200);
        for seq in 0..1000u16 {
            t.record(&rtp(PCMU, seq, u32::from(seq), 1, &[MU_HI]), || t0);
        }
        assert!(t.truncated);
        assert!(t.packets.len() * size_of::<PacketMeta>() <= 1200);
    }

    #[test]
    fn nothing_captured_renders_nothing() {
        let t0 = Instant::now();
        assert!(render([None, None], t0).is_none());
        let mut t = track(1000);
        t.record(&rtp(101, 1, 0, 1, &[1, 2, 3, 4]), || t0);
        assert!(render([Some(t), Some(track(1000))], t0).is_none());
    }

    #[test]
    fn wav_is_stereo_8k_16bit_and_aligned_by_arrival() {
        let t0 = Instant::now();
        let (mut a, mut b) = (track(1 << 20), track(1 << 20));
        for seq in 0..50u16 {
            a.record(
                &rtp(PCMU, seq, u32::from(seq) * 160, 1, &[MU_HI; 160]),
                || t0,
            );
        }
        // B starts 100 ms after A, for 0.5 s.
        let tb = t0 + Duration::from_millis(100);
        for seq in 0..25u16 {
            b.record(
                &rtp(PCMA, seq, u32::from(seq) * 160, 2, &[0x9a; 160]),
                || tb,
            );
        }
        let rec = render([Some(a), Some(b)], t0 + Duration::from_secs(2)).unwrap();
        assert!(!rec.truncated);
        assert_eq!(rec.duration_ms, 1000);
        assert_eq!(&rec.wav[..4], b"RIFF");
        assert_eq!(&rec.wav[8..16], b"WAVEfmt ");
        assert_eq!(
            u16::from_le_bytes([rec.wav[20], rec.wav[21]]),
            1,
            "plain PCM"
        );
        assert_eq!(rec.wav.len(), WAV_HEADER_LEN + 8000 * 4);

        let mut reader = hound::WavReader::new(Cursor::new(&rec.wav)).unwrap();
        let spec = reader.spec();
        assert_eq!(
            (spec.channels, spec.sample_rate, spec.bits_per_sample),
            (2, 8000, 16)
        );
        assert_eq!(spec.sample_format, hound::SampleFormat::Int);
        assert_eq!(reader.duration(), 8000);
        let samples: Vec<i16> = reader.samples::<i16>().map(Result::unwrap).collect();
        let left: Vec<i16> = samples.iter().step_by(2).copied().collect();
        let right: Vec<i16> = samples.iter().skip(1).step_by(2).copied().collect();
        assert!(left.iter().all(|&s| s == 7932));
        assert!(right[..800].iter().all(|&s| s == 0), "B not yet there");
        assert!(right[800..4800].iter().all(|&s| s == 4032));
        assert!(right[4800..].iter().all(|&s| s == 0), "B is done");
    }
}
