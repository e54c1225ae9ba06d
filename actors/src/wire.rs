//! WebSocket frames as the message relay sees them (RFC 6455 §5). The encoding of the frames
//! the gateway makes itself is tungstenite's (`Frame::format`); what is here is the relay's
//! reading of a header — what kind of frame it is, how long, whether it may pass on unchanged,
//! decoded from the slice in [`parse`] — and the checks a gateway makes on the way:
//! masking by direction, no reserved bits (no extension is negotiated in message mode),
//! control-frame rules, and the configured size limits.
//!
//! Why frames can pass unchanged: a client masks every frame it sends and a backend expects
//! masked frames from the gateway (a client too), while neither a backend nor the gateway
//! masks toward a client. So a valid frame in either direction is already valid on the other
//! socket, byte for byte, and the relay writes it on without decoding its payload.

use crate::relay::Side;
use async_tungstenite::tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use async_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};

/// What a frame is, by its opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Binary,
    Continue,
    Ping,
    Pong,
    Close,
}

/// A parsed frame header: its kind, FIN bit, mask, and the sizes of header and payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub kind: Kind,
    pub fin: bool,
    pub mask: Option<[u8; 4]>,
    /// Header bytes (2 to 14).
    pub len: usize,
    pub payload: u64,
}

impl Head {
    /// The whole frame's size in bytes. `parse` caps the payload at the frame limit, so this
    /// fits a `usize` on any platform the limit fits.
    pub fn total(&self) -> usize {
        self.len + self.payload as usize
    }
}

/// The outcome of reading a header at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not enough bytes for the header yet.
    Incomplete,
    Frame(Head),
    /// The peer broke the protocol or a limit: the close code it gets (1002 or 1009), and why.
    Bad(u16, &'static str),
}

/// Reads the frame header at the start of `buf`, sent by `from`, and checks it.
///
/// The header (RFC 6455 §5.2: two bytes, then 0, 2 or 8 bytes of extended length, then the
/// 4-byte mask if the mask bit is set) is decoded here, straight from the slice. tungstenite's
/// `FrameHeader::parse` reads the same fields through `std::io::Read` on a `Cursor`, which cost
/// ~250 instructions a frame on the relay's path (bench/profile.sh callgrind); the unit tests
/// check that the two read every header alike.
#[inline]
pub fn parse(buf: &[u8], from: Side, max_frame: usize) -> Parsed {
    let [b0, b1, ..] = *buf else {
        return Parsed::Incomplete;
    };
    let masked = b1 & 0x80 != 0;
    let ext = match b1 & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let len = 2 + ext + if masked { 4 } else { 0 };
    let Some(head) = buf.get(..len) else {
        return Parsed::Incomplete;
    };
    let kind = match b0 & 0x0f {
        0 => Kind::Continue,
        1 => Kind::Text,
        2 => Kind::Binary,
        8 => Kind::Close,
        9 => Kind::Ping,
        10 => Kind::Pong,
        _ => return Parsed::Bad(1002, "reserved opcode"),
    };
    if b0 & 0x70 != 0 {
        return Parsed::Bad(1002, "reserved bits set (no extension was negotiated)");
    }
    match (from, masked) {
        (Side::Client, false) => return Parsed::Bad(1002, "unmasked frame from a client"),
        (Side::Backend, true) => return Parsed::Bad(1002, "masked frame from a server"),
        _ => {}
    }
    let fin = b0 & 0x80 != 0;
    let payload = match ext {
        0 => u64::from(b1 & 0x7f),
        2 => u64::from(u16::from_be_bytes([head[2], head[3]])),
        _ => {
            let mut n = [0u8; 8];
            n.copy_from_slice(&head[2..10]);
            u64::from_be_bytes(n)
        }
    };
    let control = matches!(kind, Kind::Ping | Kind::Pong | Kind::Close);
    if control && (payload > 125 || !fin) {
        return Parsed::Bad(1002, "control frame fragmented or over 125 bytes");
    }
    if payload > max_frame as u64 {
        return Parsed::Bad(1009, "frame over max_frame_bytes");
    }
    let mask = masked.then(|| [head[len - 4], head[len - 3], head[len - 2], head[len - 1]]);
    Parsed::Frame(Head {
        kind,
        fin,
        mask,
        len,
        payload,
    })
}

/// XORs `buf` with a frame mask (masking and unmasking are the same operation).
pub fn unmask(buf: &mut [u8], mask: [u8; 4]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// A control frame's payload, unmasked (at most 125 bytes, so it fits on the stack).
pub fn control_payload(frame: &[u8], h: &Head) -> ([u8; 125], usize) {
    let mut out = [0u8; 125];
    let n = (h.payload as usize).min(125);
    out[..n].copy_from_slice(&frame[h.len..h.len + n]);
    if let Some(m) = h.mask {
        unmask(&mut out[..n], m);
    }
    (out, n)
}

/// A close frame's payload: empty (no status code) or a code and a reason. It is passed from
/// one side to the other unchanged, and echoed to the side that sent it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClosePayload(Vec<u8>);

impl ClosePayload {
    pub fn new(code: u16, reason: &str) -> ClosePayload {
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice(reason.as_bytes());
        ClosePayload(p)
    }

    pub fn from_bytes(b: &[u8]) -> ClosePayload {
        ClosePayload(b.to_vec())
    }

    /// The status code, if the frame carried one.
    pub fn code(&self) -> Option<u16> {
        (self.0.len() >= 2).then(|| u16::from_be_bytes([self.0[0], self.0[1]]))
    }

    /// The close frame to write to `to`.
    pub fn frame(&self, to: Side) -> Vec<u8> {
        encode(OpCode::Control(Control::Close), &self.0, to)
    }
}

/// A ping frame with `payload`, to write to `to`.
pub fn ping(payload: &[u8], to: Side) -> Vec<u8> {
    encode(OpCode::Control(Control::Ping), payload, to)
}

/// A whole (unfragmented) data message, to write to `to`.
pub fn message(kind: Kind, payload: &[u8], to: Side) -> Vec<u8> {
    let op = if kind == Kind::Text {
        Data::Text
    } else {
        Data::Binary
    };
    encode(OpCode::Data(op), payload, to)
}

/// One final frame. Frames to a backend are masked (the gateway is its client), with a key
/// from fastrand: it guards no secret, only the RFC's rule that client frames are masked.
fn encode(opcode: OpCode, payload: &[u8], to: Side) -> Vec<u8> {
    let mut f = match opcode {
        OpCode::Data(_) => Frame::message(payload.to_vec(), opcode, true),
        OpCode::Control(Control::Ping) => Frame::ping(payload.to_vec()),
        _ => Frame::from_payload(FrameHeader::default(), payload.to_vec().into()),
    };
    if to == Side::Backend {
        f.header_mut().mask = Some(fastrand::u32(..).to_ne_bytes());
    }
    let mut out = Vec::with_capacity(f.len());
    // Writing into a Vec cannot fail.
    let _ = f.format(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The header as tungstenite reads it, with the same checks in the same order: what
    /// `parse` must agree with on every input.
    fn reference(buf: &[u8], from: Side, max_frame: usize) -> Parsed {
        let mut cur = std::io::Cursor::new(buf);
        let (h, payload) = match FrameHeader::parse(&mut cur) {
            Ok(Some(hp)) => hp,
            Ok(None) => return Parsed::Incomplete,
            Err(_) => return Parsed::Bad(1002, "reserved opcode"),
        };
        if h.rsv1 || h.rsv2 || h.rsv3 {
            return Parsed::Bad(1002, "reserved bits set (no extension was negotiated)");
        }
        match (from, h.mask.is_some()) {
            (Side::Client, false) => return Parsed::Bad(1002, "unmasked frame from a client"),
            (Side::Backend, true) => return Parsed::Bad(1002, "masked frame from a server"),
            _ => {}
        }
        let kind = match h.opcode {
            OpCode::Data(Data::Text) => Kind::Text,
            OpCode::Data(Data::Binary) => Kind::Binary,
            OpCode::Data(Data::Continue) => Kind::Continue,
            OpCode::Control(Control::Ping) => Kind::Ping,
            OpCode::Control(Control::Pong) => Kind::Pong,
            OpCode::Control(Control::Close) => Kind::Close,
            _ => return Parsed::Bad(1002, "reserved opcode"),
        };
        let control = matches!(kind, Kind::Ping | Kind::Pong | Kind::Close);
        if control && (payload > 125 || !h.is_final) {
            return Parsed::Bad(1002, "control frame fragmented or over 125 bytes");
        }
        if payload > max_frame as u64 {
            return Parsed::Bad(1009, "frame over max_frame_bytes");
        }
        Parsed::Frame(Head {
            kind,
            fin: h.is_final,
            mask: h.mask,
            len: cur.position() as usize,
            payload,
        })
    }

    #[test]
    fn every_first_two_bytes_read_as_tungstenite_reads_them() {
        // Each of the 65,536 first byte pairs, followed by a length and mask that vary with
        // them, cut at every length a header can have, from both sides.
        for b0 in 0..=255u8 {
            for b1 in 0..=255u8 {
                let mut f = vec![b0, b1];
                f.extend((0..12u8).map(|i| b0.wrapping_mul(31) ^ b1.wrapping_add(i * 17)));
                for cut in 0..=f.len() {
                    for from in [Side::Client, Side::Backend] {
                        let max = usize::from(b0) << 8 | usize::from(b1);
                        assert_eq!(
                            parse(&f[..cut], from, max),
                            reference(&f[..cut], from, max),
                            "{:02x?} from {from:?}",
                            &f[..cut]
                        );
                    }
                }
            }
        }
    }

    proptest! {
        #[test]
        fn any_header_reads_as_tungstenite_reads_it(
            bytes in proptest::collection::vec(any::<u8>(), 0..16),
            len7 in prop_oneof![0u8..126, Just(126u8), Just(127u8)],
            client in any::<bool>(),
            max_frame in prop_oneof![Just(0usize), Just(125), Just(1 << 16), Just(usize::MAX)],
        ) {
            let mut bytes = bytes;
            if bytes.len() > 1 {
                bytes[1] = bytes[1] & 0x80 | len7;
            }
            let from = if client { Side::Client } else { Side::Backend };
            prop_assert_eq!(parse(&bytes, from, max_frame), reference(&bytes, from, max_frame));
        }
    }

    fn parse_one(bytes: &[u8], from: Side) -> Parsed {
        parse(bytes, from, 1 << 20)
    }

    #[test]
    fn frames_the_gateway_makes_parse_back() {
        let to_backend = ping(b"hi", Side::Backend);
        let Parsed::Frame(h) = parse_one(&to_backend, Side::Client) else {
            panic!("masked ping must parse as a client's frame")
        };
        assert_eq!((h.kind, h.fin, h.payload, h.len), (Kind::Ping, true, 2, 6));
        let (p, n) = control_payload(&to_backend, &h);
        assert_eq!(&p[..n], b"hi");

        let to_client = ClosePayload::new(1014, "bad gateway").frame(Side::Client);
        let Parsed::Frame(h) = parse_one(&to_client, Side::Backend) else {
            panic!("unmasked close must parse as a server's frame")
        };
        assert_eq!(h.kind, Kind::Close);
        let (p, n) = control_payload(&to_client, &h);
        let cp = ClosePayload::from_bytes(&p[..n]);
        assert_eq!(cp.code(), Some(1014));
        assert_eq!(&p[2..n], b"bad gateway");
    }

    #[test]
    fn long_messages_use_the_extended_lengths() {
        for (len, head) in [(125, 2), (126, 4), (65535, 4), (65536, 10)] {
            let f = message(Kind::Binary, &vec![7; len], Side::Client);
            assert_eq!(f.len(), len + head);
            let Parsed::Frame(h) = parse_one(&f, Side::Backend) else {
                panic!("{len}")
            };
            assert_eq!(
                (h.kind, h.payload, h.len, h.total()),
                (Kind::Binary, len as u64, head, f.len())
            );
            let m = message(Kind::Text, &vec![b'a'; len], Side::Backend);
            let Parsed::Frame(h) = parse_one(&m, Side::Client) else {
                panic!("{len}")
            };
            assert_eq!((h.kind, h.len), (Kind::Text, head + 4));
            let mut payload = m[h.len..].to_vec();
            unmask(&mut payload, h.mask.unwrap_or_default());
            assert!(payload.iter().all(|&b| b == b'a'));
        }
    }

    #[test]
    fn incomplete_headers_wait() {
        let f = message(Kind::Binary, &[0; 300], Side::Backend);
        for cut in 0..8 {
            assert_eq!(
                parse_one(&f[..cut], Side::Client),
                Parsed::Incomplete,
                "{cut}"
            );
        }
        assert!(matches!(parse_one(&f[..8], Side::Client), Parsed::Frame(_)));
    }

    #[test]
    fn protocol_rules_by_direction() {
        let unmasked = message(Kind::Text, b"x", Side::Client);
        let masked = message(Kind::Text, b"x", Side::Backend);
        assert_eq!(
            parse_one(&unmasked, Side::Client),
            Parsed::Bad(1002, "unmasked frame from a client")
        );
        assert_eq!(
            parse_one(&masked, Side::Backend),
            Parsed::Bad(1002, "masked frame from a server")
        );
        let mut rsv = unmasked.clone();
        rsv[0] |= 0x40;
        assert!(matches!(
            parse_one(&rsv, Side::Backend),
            Parsed::Bad(1002, _)
        ));
        let mut op = unmasked.clone();
        op[0] = 0x83; // reserved data opcode
        assert!(matches!(
            parse_one(&op, Side::Backend),
            Parsed::Bad(1002, _)
        ));
        let mut frag_ping = ping(b"p", Side::Client);
        frag_ping[0] &= 0x7f;
        assert!(matches!(
            parse_one(&frag_ping, Side::Backend),
            Parsed::Bad(1002, _)
        ));
        let big_ping = [0x89u8, 126, 0, 126];
        assert!(matches!(
            parse_one(&big_ping, Side::Backend),
            Parsed::Bad(1002, _)
        ));
    }

    #[test]
    fn frame_limit_is_checked_from_the_header_alone() {
        // A header announcing 2 MiB, without its payload: refused before anything is buffered.
        let head = [0x82u8, 127, 0, 0, 0, 0, 0, 0x20, 0, 0];
        assert_eq!(
            parse(&head, Side::Backend, 1 << 20),
            Parsed::Bad(1009, "frame over max_frame_bytes")
        );
        assert!(
            matches!(parse(&head, Side::Backend, 4 << 20), Parsed::Frame(h) if h.payload == 2 << 20)
        );
    }

    #[test]
    fn close_payload_without_code() {
        let f = ClosePayload::default().frame(Side::Backend);
        let Parsed::Frame(h) = parse_one(&f, Side::Client) else {
            panic!()
        };
        assert_eq!((h.kind, h.payload), (Kind::Close, 0));
        assert_eq!(ClosePayload::default().code(), None);
    }
}
