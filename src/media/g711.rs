//! G.711 decoding (ITU-T Recommendation G.711, 1988) to 16-bit linear PCM.
//!
//! Both laws are 256-entry tables built at compile time from the standard's segment
//! rules, so decoding a sample is one lookup. Values use the scale telephony software
//! conventionally gives G.711 (the reference `g711.c` of Sun and ITU-T G.191): µ-law's
//! 14-bit and A-law's 13-bit magnitudes shifted to 16 bits, so full scale is ±32124
//! (µ-law) and ±32256 (A-law).

/// The two companding laws, as RTP names them (RFC 3551 §4.5.14): PCMU (payload type 0)
/// is µ-law, PCMA (payload type 8) is A-law.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Law {
    Mu,
    A,
}

impl Law {
    pub(crate) fn decode(self, code: u8) -> i16 {
        match self {
            Law::Mu => ULAW[usize::from(code)],
            Law::A => ALAW[usize::from(code)],
        }
    }
}

const ULAW: [i16; 256] = table(Law::Mu);
const ALAW: [i16; 256] = table(Law::A);

const fn table(law: Law) -> [i16; 256] {
    let mut t = [0i16; 256];
    let mut code = 0usize;
    while code < 256 {
        t[code] = match law {
            Law::Mu => ulaw_decode(code as u8),
            Law::A => alaw_decode(code as u8),
        };
        code += 1;
    }
    t
}

/// µ-law bias (33 at 14-bit scale), added before the segment shift and removed after it:
/// it is what makes segment boundaries fall on powers of two.
const ULAW_BIAS: i16 = 0x84;

/// G.711 Table 2a. The code goes on the line inverted; once inverted it is
/// sign (1 = negative), 3 segment bits, 4 step bits, and each segment doubles the step.
const fn ulaw_decode(code: u8) -> i16 {
    let c = !code;
    let segment = (c >> 4) & 0x07;
    let step = (c & 0x0f) as i16;
    // At most ((15 << 3) + 132) << 7 = 32256: no overflow.
    let magnitude = (((step << 3) + ULAW_BIAS) << segment) - ULAW_BIAS;
    if c & 0x80 != 0 {
        -magnitude
    } else {
        magnitude
    }
}

/// G.711 Table 1a. Even bits go on the line inverted (XOR 0x55); then it is sign
/// (1 = positive), 3 segment bits, 4 step bits. Segment 0 and 1 share the step size,
/// every later one doubles it; a decoded value sits in the middle of its step.
const fn alaw_decode(code: u8) -> i16 {
    let c = code ^ 0x55;
    let segment = (c >> 4) & 0x07;
    let step = ((c & 0x0f) as i16) << 4;
    let magnitude = if segment == 0 {
        step + 8
    } else {
        // At most (240 + 264) << 6 = 32256: no overflow.
        (step + 0x108) << (segment - 1)
    };
    if c & 0x80 != 0 {
        magnitude
    } else {
        -magnitude
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulaw_known_values() {
        // Both zeros, full scale, and one code per sign in the middle of the range.
        assert_eq!(Law::Mu.decode(0xff), 0);
        assert_eq!(Law::Mu.decode(0x7f), 0);
        assert_eq!(Law::Mu.decode(0x00), -32124);
        assert_eq!(Law::Mu.decode(0x80), 32124);
        assert_eq!(Law::Mu.decode(0xa0), 7932);
        assert_eq!(Law::Mu.decode(0x20), -7932);
        assert_eq!(Law::Mu.decode(0xfe), 8);
        assert_eq!(Law::Mu.decode(0xef), 132);
    }

    #[test]
    fn alaw_known_values() {
        assert_eq!(Law::A.decode(0xd5), 8);
        assert_eq!(Law::A.decode(0x55), -8);
        assert_eq!(Law::A.decode(0xaa), 32256);
        assert_eq!(Law::A.decode(0x2a), -32256);
        assert_eq!(Law::A.decode(0x9a), 4032);
        assert_eq!(Law::A.decode(0x1a), -4032);
        // First step of segment 1: same step size as segment 0, continuing it.
        assert_eq!(Law::A.decode(0xc5), 264);
        assert_eq!(Law::A.decode(0xd4), 24);
    }

    /// Within each sign half, larger magnitude codes decode to strictly larger values,
    /// and the two halves mirror each other.
    #[test]
    fn monotonic_and_symmetric() {
        for law in [Law::Mu, Law::A] {
            let magnitude = |k: u8| -> i16 {
                // k = 0 is the smallest magnitude, 127 the largest.
                let code = match law {
                    Law::Mu => 0xff - k,
                    Law::A => (0x80 | k) ^ 0x55,
                };
                law.decode(code)
            };
            for k in 1..128u8 {
                assert!(magnitude(k) > magnitude(k - 1), "{law:?} k={k}");
            }
            for code in 0..=255u8 {
                assert_eq!(
                    law.decode(code),
                    -law.decode(code ^ 0x80),
                    "{law:?} {code:#x}"
                );
            }
        }
    }
}
