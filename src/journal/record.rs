//! The on-disk format of the claim journal.
//!
//! A journal is a directory of segment files named `{first_seq:020}.journal`.
//! Each segment starts with the 8-byte magic `TKDJRNL1`, followed by records:
//!
//! ```text
//! record  := len:u32le crc:u32le body[len]        crc = crc32c(body)
//! body    := seq:u64le kind:u8 claimed_at_ms:i64le user_id:u64le
//!            activity_id:str ticket_id:str code:str idempotency_key:str
//! str     := len:u16le utf8[len]                  (an empty key means none)
//! kind    := 1 (a claim) | 2 (void: the sequence number was lost; body is seq and kind only)
//!          | 3 (a write's mark: body is seq kind count:u32le; seq is the first claim of the
//!            group commit that follows, count its records; it takes no sequence number)
//! ```
//!
//! Sequence numbers increase by one across segments and are the claim ids.
//! A crash can leave the last record of the last segment half-written (a
//! *torn tail*): replay detects it by length or checksum, truncates the file
//! there and carries on. That record was never acknowledged, because a claim
//! is answered only after its whole group commit was written. A bad record
//! anywhere else is corruption and stops the node with a clear error;
//! `ticketd verify --repair` keeps every valid record and writes a *void*
//! record for each sequence number it could not keep, so the sequence has
//! no unexplained gap.
//!
//! Each group commit starts with a *mark*. A crash can also leave a sector
//! of the last write unwritten (still the zeros the writer laid ahead) while
//! later sectors of it reached the disk: that hole is a torn write only when
//! no mark follows it, that is, when it lies in the last group commit (see
//! `SegmentScan::torn_from`).

use std::sync::Arc;

use crate::vocab::Claim;

/// The first bytes of every segment.
pub const MAGIC: &[u8; 8] = b"TKDJRNL1";
const KIND_CLAIM: u8 = 1;
const KIND_VOID: u8 = 2;
const KIND_MARK: u8 = 3;
/// Bytes before the body: length and checksum.
pub const HEADER_LEN: usize = 8;
/// Largest body we accept on replay (four strings of at most 64 KiB plus fixed fields).
const MAX_BODY: usize = 4 * (u16::MAX as usize + 2) + 32;

/// Appends the record of `claim`, numbered `seq`, to `buf`.
pub fn encode(claim: &Claim, seq: u64, buf: &mut Vec<u8>) {
    let start = buf.len();
    buf.extend_from_slice(&[0; HEADER_LEN]);
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.push(KIND_CLAIM);
    buf.extend_from_slice(&claim.claimed_at_ms.to_le_bytes());
    buf.extend_from_slice(&claim.user_id.to_le_bytes());
    for s in [
        &*claim.activity_id,
        &*claim.ticket_id,
        &*claim.code,
        claim.idempotency_key.as_deref().unwrap_or(""),
    ] {
        // Ids, codes and keys are validated far below 64 KiB; clamp defensively.
        let bytes = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
        buf.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
        buf.extend_from_slice(bytes);
    }
    let body_len = (buf.len() - start - HEADER_LEN) as u32;
    let crc = crc32c::crc32c(&buf[start + HEADER_LEN..]);
    buf[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Appends a void record for `seq` to `buf`.
pub fn encode_void(seq: u64, buf: &mut Vec<u8>) {
    let mut body = [0u8; 9];
    body[..8].copy_from_slice(&seq.to_le_bytes());
    body[8] = KIND_VOID;
    frame(&body, buf);
}

/// Appends the mark that starts a group commit of `count` claims, the
/// first numbered `first_seq`.
pub fn encode_mark(first_seq: u64, count: u32, buf: &mut Vec<u8>) {
    let mut body = [0u8; 13];
    body[..8].copy_from_slice(&first_seq.to_le_bytes());
    body[8] = KIND_MARK;
    body[9..].copy_from_slice(&count.to_le_bytes());
    frame(&body, buf);
}

/// Appends `body` with its header: length and checksum.
fn frame(body: &[u8], buf: &mut Vec<u8>) {
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    buf.extend_from_slice(body);
}

/// What [`decode`] found at the start of a byte slice.
#[derive(Debug)]
pub enum Decoded {
    /// A whole, valid record and its encoded length.
    Record(Claim, usize),
    /// A whole, valid void record (its sequence number) and its length.
    Void(u64, usize),
    /// A whole, valid mark (the first sequence number of its group commit)
    /// and its length.
    Mark(u64, usize),
    /// The slice ends inside a record, or its checksum is wrong.
    Invalid,
    /// No bytes left.
    End,
}

/// Decodes the record at the start of `bytes`.
pub fn decode(bytes: &[u8]) -> Decoded {
    if bytes.is_empty() {
        return Decoded::End;
    }
    let Some(header) = bytes.get(..HEADER_LEN) else {
        return Decoded::Invalid;
    };
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    if len > MAX_BODY {
        return Decoded::Invalid;
    }
    let Some(body) = bytes.get(HEADER_LEN..HEADER_LEN + len) else {
        return Decoded::Invalid;
    };
    if crc32c::crc32c(body) != crc {
        return Decoded::Invalid;
    }
    if body.len() == 9 && body[8] == KIND_VOID {
        let seq = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
        return Decoded::Void(seq, HEADER_LEN + 9);
    }
    if body.len() == 13 && body[8] == KIND_MARK {
        let seq = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
        return Decoded::Mark(seq, HEADER_LEN + 13);
    }
    match parse_body(body) {
        Some(claim) => Decoded::Record(claim, HEADER_LEN + len),
        None => Decoded::Invalid,
    }
}

fn parse_body(body: &[u8]) -> Option<Claim> {
    let mut r = Reader(body);
    let seq = u64::from_le_bytes(r.take(8)?.try_into().ok()?);
    if r.take(1)? != [KIND_CLAIM] {
        return None;
    }
    let claimed_at_ms = i64::from_le_bytes(r.take(8)?.try_into().ok()?);
    let user_id = u64::from_le_bytes(r.take(8)?.try_into().ok()?);
    let activity_id = r.str()?;
    let ticket_id = r.str()?;
    let code = r.str()?;
    let key = r.str()?;
    if !r.0.is_empty() {
        return None;
    }
    Some(Claim {
        id: seq,
        activity_id,
        ticket_id,
        code,
        user_id,
        claimed_at_ms,
        idempotency_key: (!key.is_empty()).then_some(key),
    })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = tail;
        Some(head)
    }

    fn str(&mut self) -> Option<Arc<str>> {
        let len = u16::from_le_bytes(self.take(2)?.try_into().ok()?) as usize;
        std::str::from_utf8(self.take(len)?).ok().map(Arc::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(id: u64) -> Claim {
        Claim {
            id,
            activity_id: "act".into(),
            ticket_id: "t-1".into(),
            code: "门票CODE".into(),
            user_id: 42,
            claimed_at_ms: 1_700_000_000_123,
            idempotency_key: Some("k1".into()),
        }
    }

    #[test]
    fn round_trips_and_detects_torn_and_corrupt_records() {
        let mut buf = Vec::new();
        encode(&claim(0), 7, &mut buf);
        let one = buf.len();
        encode(&claim(0), 8, &mut buf);
        let Decoded::Record(c, n) = decode(&buf) else { panic!() };
        assert_eq!(
            (c.id, n, &*c.code, c.idempotency_key.as_deref()),
            (7, one, "门票CODE", Some("k1"))
        );
        let Decoded::Record(c, _) = decode(&buf[one..]) else {
            panic!()
        };
        assert_eq!(c.id, 8);
        // Every proper prefix of a record is a torn tail.
        for cut in 1..one {
            assert!(matches!(decode(&buf[..cut]), Decoded::Invalid), "prefix {cut}");
        }
        let mut bad = buf.clone();
        bad[HEADER_LEN + 3] ^= 1;
        assert!(matches!(decode(&bad), Decoded::Invalid));
        assert!(matches!(decode(&[]), Decoded::End));
        let mut mark = Vec::new();
        encode_mark(9, 17, &mut mark);
        assert!(matches!(decode(&mark), Decoded::Mark(9, n) if n == mark.len()));
        assert!(matches!(decode(&mark[..mark.len() - 1]), Decoded::Invalid));
    }

    proptest::proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn every_claim_round_trips(
            seq in 1u64..u64::MAX, user in proptest::num::u64::ANY, at in proptest::num::i64::ANY,
            act in "[a-z0-9-]{1,64}", ticket in "[a-z0-9-]{1,64}", code in "\\PC{1,40}", key in proptest::option::of("[ -~]{1,128}"),
        ) {
            let claim = Claim {
                id: seq, activity_id: act.into(), ticket_id: ticket.into(), code: code.into(),
                user_id: user, claimed_at_ms: at, idempotency_key: key.map(Into::into),
            };
            let mut buf = Vec::new();
            encode(&claim, seq, &mut buf);
            let Decoded::Record(back, n) = decode(&buf) else { panic!("not decoded") };
            proptest::prop_assert_eq!(n, buf.len());
            proptest::prop_assert_eq!(back, claim);
        }
    }
}
