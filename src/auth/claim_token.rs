//! Claim tokens (the seckill "hidden claim URL") and proof of work.
//!
//! `/act/detail` hands a logged-in user a claim token only once the activity
//! has started; `/ticket/get` requires it. A token is
//!
//! ```text
//! base64url(user_id:u64be expires_at_ms:i64be) "." base64url(tag[..16])
//! tag = HMAC-SHA256(claim_key, payload || activity_id || start_ms:i64be)
//! ```
//!
//! so it is bound to one user and one activity (and that activity's current
//! start time), expires, and cannot be made without the server's key: no
//! request can be pre-fired before the start and no token works for another
//! account. `claim_key` is derived from the session secret, so the two never
//! share a MAC domain.
//!
//! Proof of work (per activity, `pow_difficulty` bits): the claim carries a
//! `powNonce` such that SHA-256(claimToken ":" nonce) starts with that many
//! zero bits. The client pays ~2^bits hashes per token; the server checks one.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// Why a claim token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimTokenError {
    /// Malformed, forged, or for another user or activity.
    Invalid,
    /// Past its expiry.
    Expired,
}

/// Issues and checks claim tokens, and the waiting room's passes.
///
/// A pass is a claim token under its own key (derived like the claim key,
/// with another label): bound to one user and activity and expiring with
/// the pass, so any node checks it without asking the room; and no claim
/// token of a race works as a pass, nor a pass as a claim token.
pub struct ClaimTokens {
    claims: Signer,
    passes: Signer,
}

/// Makes tokens under one key and checks them under it or, during a
/// rotation of the session secret, the key derived from the previous one.
struct Signer {
    mac: HmacSha256,
    previous: Option<HmacSha256>,
}

impl ClaimTokens {
    /// Derives the claim and pass keys from the session secret, and from
    /// the previous one while a rotation accepts it (as sessions are): a
    /// token or pass a fan holds stays good across the rotation, and nodes
    /// part-way through a rolling one accept each other's.
    pub fn new(session_secret: &[u8], previous_secret: Option<&[u8]>) -> ClaimTokens {
        let key = |secret: &[u8], label: &[u8]| {
            let mut derive = HmacSha256::new_from_slice(secret).expect("any key length");
            derive.update(label);
            HmacSha256::new_from_slice(&derive.finalize().into_bytes()).expect("any key length")
        };
        let derive = |label: &[u8]| Signer {
            mac: key(session_secret, label),
            previous: previous_secret.map(|p| key(p, label)),
        };
        ClaimTokens {
            claims: derive(b"ticketd claim tokens v1"),
            passes: derive(b"ticketd queue passes v1"),
        }
    }

    /// A token for `user_id` in `activity_id` (starting at `start_ms`), valid until `expires_at_ms`.
    pub fn issue(&self, user_id: u64, activity_id: &str, start_ms: i64, expires_at_ms: i64) -> String {
        self.claims.issue(user_id, activity_id, start_ms, expires_at_ms)
    }

    /// Checks `token` for this user, activity and start at `now_ms`.
    pub fn verify(
        &self,
        token: &str,
        user_id: u64,
        activity_id: &str,
        start_ms: i64,
        now_ms: i64,
    ) -> Result<(), ClaimTokenError> {
        self.claims
            .verify(token, user_id, activity_id, start_ms, now_ms)
            .map(|_| ())
    }

    /// A pass for `user_id` in `activity_id`, valid until `expires_at_ms`.
    pub fn issue_pass(&self, user_id: u64, activity_id: &str, start_ms: i64, expires_at_ms: i64) -> String {
        self.passes.issue(user_id, activity_id, start_ms, expires_at_ms)
    }

    /// Checks a pass as [`ClaimTokens::verify`] checks a claim token;
    /// returns when it expires (Unix ms), which a claim made with it
    /// carries to the store: a cluster records it only before then.
    pub fn verify_pass(
        &self,
        token: &str,
        user_id: u64,
        activity_id: &str,
        start_ms: i64,
        now_ms: i64,
    ) -> Result<i64, ClaimTokenError> {
        self.passes.verify(token, user_id, activity_id, start_ms, now_ms)
    }
}

impl Signer {
    fn tag(mac: &HmacSha256, payload: &[u8; 16], activity_id: &str, start_ms: i64) -> [u8; 16] {
        let mut mac = mac.clone();
        mac.update(payload);
        mac.update(activity_id.as_bytes());
        mac.update(&start_ms.to_be_bytes());
        let full = mac.finalize().into_bytes();
        full[..16].try_into().expect("16 bytes")
    }

    /// A token for `user_id` in `activity_id` (starting at `start_ms`), valid until `expires_at_ms`.
    fn issue(&self, user_id: u64, activity_id: &str, start_ms: i64, expires_at_ms: i64) -> String {
        let mut payload = [0u8; 16];
        payload[..8].copy_from_slice(&user_id.to_be_bytes());
        payload[8..].copy_from_slice(&expires_at_ms.to_be_bytes());
        let tag = Signer::tag(&self.mac, &payload, activity_id, start_ms);
        format!("{}.{}", URL_SAFE_NO_PAD.encode(payload), URL_SAFE_NO_PAD.encode(tag))
    }

    /// Checks `token` for this user, activity and start at `now_ms`;
    /// returns its expiry (Unix ms).
    fn verify(
        &self,
        token: &str,
        user_id: u64,
        activity_id: &str,
        start_ms: i64,
        now_ms: i64,
    ) -> Result<i64, ClaimTokenError> {
        let (p, t) = token.split_once('.').ok_or(ClaimTokenError::Invalid)?;
        if p.len() != 22 || t.len() != 22 {
            return Err(ClaimTokenError::Invalid);
        }
        let mut payload = [0u8; 18];
        let mut tag = [0u8; 18];
        let n = URL_SAFE_NO_PAD
            .decode_slice(p, &mut payload)
            .map_err(|_| ClaimTokenError::Invalid)?;
        let m = URL_SAFE_NO_PAD
            .decode_slice(t, &mut tag)
            .map_err(|_| ClaimTokenError::Invalid)?;
        if n != 16 || m != 16 {
            return Err(ClaimTokenError::Invalid);
        }
        let payload: [u8; 16] = payload[..16].try_into().expect("16 bytes");
        let signed_by = |mac: &HmacSha256| -> bool {
            let expected = Signer::tag(mac, &payload, activity_id, start_ms);
            subtle::ConstantTimeEq::ct_eq(&expected[..], &tag[..16]).into()
        };
        let same = signed_by(&self.mac) || self.previous.as_ref().is_some_and(signed_by);
        if !same || u64::from_be_bytes(payload[..8].try_into().expect("8")) != user_id {
            return Err(ClaimTokenError::Invalid);
        }
        let expires_ms = i64::from_be_bytes(payload[8..].try_into().expect("8"));
        if now_ms >= expires_ms {
            return Err(ClaimTokenError::Expired);
        }
        Ok(expires_ms)
    }
}

fn leading_zero_bits(hash: &[u8]) -> u32 {
    let mut bits = 0;
    for byte in hash {
        if *byte == 0 {
            bits += 8;
        } else {
            return bits + byte.leading_zeros();
        }
    }
    bits
}

/// Whether `nonce` solves the proof of work for `challenge` at `difficulty` bits.
pub fn pow_ok(challenge: &str, nonce: &str, difficulty: u8) -> bool {
    if nonce.len() > 32 {
        return false;
    }
    let mut h = Sha256::new();
    h.update(challenge.as_bytes());
    h.update(b":");
    h.update(nonce.as_bytes());
    leading_zero_bits(&h.finalize()) >= u32::from(difficulty)
}

/// What a waiting room's join solves its proof of work over: bound to the
/// account and the activity, so each account pays for its own place. It is
/// known in advance on purpose — joining early buys nothing, so solving
/// early does not either.
pub fn join_challenge(activity: &str, user: u64) -> String {
    format!("join:{activity}:{user}")
}

/// Finds a nonce for `challenge` (what a client, or `ticketd bench`, does).
pub fn solve_pow(challenge: &str, difficulty: u8) -> String {
    (0u64..)
        .map(|n| n.to_string())
        .find(|n| pow_ok(challenge, n, difficulty))
        .expect("a nonce exists")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_bound_to_user_activity_start_and_time() {
        let t = ClaimTokens::new(b"0123456789abcdef0123456789abcdef", None);
        let token = t.issue(7, "1001", 1000, 5000);
        assert_eq!(t.verify(&token, 7, "1001", 1000, 4999), Ok(()));
        assert_eq!(t.verify(&token, 8, "1001", 1000, 0), Err(ClaimTokenError::Invalid));
        assert_eq!(t.verify(&token, 7, "1002", 1000, 0), Err(ClaimTokenError::Invalid));
        assert_eq!(t.verify(&token, 7, "1001", 1001, 0), Err(ClaimTokenError::Invalid));
        assert_eq!(t.verify(&token, 7, "1001", 1000, 5000), Err(ClaimTokenError::Expired));
        let pass = t.issue_pass(7, "1001", 1000, 5000);
        assert_eq!(t.verify_pass(&pass, 7, "1001", 1000, 4999), Ok(5000));
        assert_eq!(t.verify_pass(&token, 7, "1001", 1000, 0), Err(ClaimTokenError::Invalid));
        assert_eq!(t.verify(&pass, 7, "1001", 1000, 0), Err(ClaimTokenError::Invalid));
        assert_eq!(
            t.verify_pass(&pass, 7, "1001", 1000, 5000),
            Err(ClaimTokenError::Expired)
        );
        let other = ClaimTokens::new(b"another secret another secret !!", None);
        assert_eq!(other.verify(&token, 7, "1001", 1000, 0), Err(ClaimTokenError::Invalid));
        // Rotated, with the first secret as the previous one: the old token
        // and pass still hold, each only as what it is.
        let rotated = ClaimTokens::new(
            b"another secret another secret !!",
            Some(b"0123456789abcdef0123456789abcdef"),
        );
        assert_eq!(rotated.verify(&token, 7, "1001", 1000, 0), Ok(()));
        assert_eq!(rotated.verify_pass(&pass, 7, "1001", 1000, 0), Ok(5000));
        assert_eq!(
            rotated.verify_pass(&token, 7, "1001", 1000, 0),
            Err(ClaimTokenError::Invalid)
        );
        assert_eq!(
            rotated.verify(&token, 8, "1001", 1000, 0),
            Err(ClaimTokenError::Invalid)
        );
        for junk in ["", ".", "a.b", &"A".repeat(45)] {
            assert_eq!(t.verify(junk, 7, "1001", 1000, 0), Err(ClaimTokenError::Invalid));
        }
    }

    #[test]
    fn proof_of_work_is_checked_in_one_hash() {
        let nonce = solve_pow("challenge", 12);
        assert!(pow_ok("challenge", &nonce, 12));
        assert!(pow_ok("challenge", &nonce, 0));
        let wrong = (0u64..)
            .map(|n| n.to_string())
            .find(|n| !pow_ok("challenge", n, 12))
            .unwrap();
        assert!(!pow_ok("challenge", &wrong, 12));
        assert_eq!(leading_zero_bits(&[0, 0b0001_0000]), 11);
    }

    proptest::proptest! {
        #[test]
        fn any_string_is_refused_without_panicking(token in ".{0,100}", user in 0u64..10) {
            let t = ClaimTokens::new(b"0123456789abcdef0123456789abcdef", None);
            proptest::prop_assert!(t.verify(&token, user, "1001", 0, 0).is_err());
        }
    }
}
