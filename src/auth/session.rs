//! Session tokens: stateless, HMAC-SHA256 signed, revocable.
//!
//! ```text
//! token   := base64url(payload) "." base64url(tag)
//! payload := user_id:u64be expires_at_ms:i64be token_id:[u8;16] account_created_ms:i64be
//! tag     := HMAC-SHA256(key, payload)
//! ```
//!
//! The account's creation time lets an activity with `min_account_age`
//! refuse young accounts on the claim path without a store look-up. Tokens
//! from before it (a 32-byte payload, no creation time) stay valid; such a
//! session's account age is unknown.
//!
//! Verifying needs no store access and no allocation: the token is decoded
//! into stack buffers and the tag compared in constant time. Logout records
//! the token id in a revocation set (kept in the store until the token would
//! have expired anyway).
//!
//! A token id begins with its issue time (Unix ms, big-endian), then eight
//! random bytes: an account's mark of logouts covers the sessions issued
//! before it, whatever their lifetime ([`issued_ms`]).

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use crate::store::types::issue_time;

type HmacSha256 = Hmac<Sha256>;

const PAYLOAD_LEN: usize = 40;
/// The payload of tokens issued before the account's creation time was added.
const PAYLOAD_V1_LEN: usize = 32;
const TAG_LEN: usize = 32;

/// What a valid token says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    /// The user.
    pub user_id: u64,
    /// Expiry, Unix ms.
    pub expires_at_ms: i64,
    /// Random id, for revocation.
    pub token_id: [u8; 16],
    /// When the account was made, Unix ms; `None` for a token issued before
    /// tokens carried it.
    pub account_created_ms: Option<i64>,
}

/// Why a token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token, or a bad signature.
    #[error("the token is invalid")]
    Invalid,
    /// Past its expiry.
    #[error("the token has expired")]
    Expired,
}

/// Signs and verifies session tokens.
pub struct SessionKey {
    mac: HmacSha256,
    /// During a key rotation: the old key, still accepted, never used to sign.
    previous: Option<HmacSha256>,
}

impl SessionKey {
    /// A key from secret bytes (at least 32 recommended; the config enforces it).
    pub fn new(secret: &[u8]) -> SessionKey {
        SessionKey {
            mac: HmacSha256::new_from_slice(secret).expect("HMAC accepts any key length"),
            previous: None,
        }
    }

    /// Also accepts tokens signed with `previous` (key rotation).
    pub fn with_previous(mut self, previous: &[u8]) -> SessionKey {
        self.previous = Some(HmacSha256::new_from_slice(previous).expect("HMAC accepts any key length"));
        self
    }

    /// Issues a token for `user_id`, whose account was made at
    /// `account_created_ms`, valid until `expires_at_ms`.
    pub fn issue(&self, user_id: u64, account_created_ms: i64, expires_at_ms: i64) -> (String, Session) {
        let mut token_id = [0u8; 16];
        token_id[..8].copy_from_slice(&crate::clock::now_ms().to_be_bytes());
        rand::rngs::OsRng.fill_bytes(&mut token_id[8..]);
        let session = Session {
            user_id,
            expires_at_ms,
            token_id,
            account_created_ms: Some(account_created_ms),
        };
        let payload = encode_payload(&session);
        let mut mac = self.mac.clone();
        mac.update(&payload);
        let tag = mac.finalize().into_bytes();
        let token = format!("{}.{}", URL_SAFE_NO_PAD.encode(payload), URL_SAFE_NO_PAD.encode(tag));
        (token, session)
    }

    /// Checks the signature and expiry of `token` at `now_ms`.
    pub fn verify(&self, token: &str, now_ms: i64) -> Result<Session, TokenError> {
        let (payload_b64, tag_b64) = token.split_once('.').ok_or(TokenError::Invalid)?;
        // Exact encoded lengths: 40 bytes are 54 base64url characters, 32 are 43.
        let payload_len = match payload_b64.len() {
            54 => PAYLOAD_LEN,
            43 => PAYLOAD_V1_LEN,
            _ => return Err(TokenError::Invalid),
        };
        if tag_b64.len() != 43 {
            return Err(TokenError::Invalid);
        }
        let mut payload = [0u8; PAYLOAD_LEN + 2];
        let mut tag = [0u8; TAG_LEN + 2];
        let n = URL_SAFE_NO_PAD
            .decode_slice(payload_b64, &mut payload)
            .map_err(|_| TokenError::Invalid)?;
        let m = URL_SAFE_NO_PAD
            .decode_slice(tag_b64, &mut tag)
            .map_err(|_| TokenError::Invalid)?;
        if n != payload_len || m != TAG_LEN {
            return Err(TokenError::Invalid);
        }
        let signed_by = |key: &HmacSha256| {
            let mut mac = key.clone();
            mac.update(&payload[..payload_len]);
            mac.verify_slice(&tag[..TAG_LEN]).is_ok()
        };
        if !signed_by(&self.mac) && !self.previous.as_ref().is_some_and(signed_by) {
            return Err(TokenError::Invalid);
        }
        let session = Session {
            user_id: u64::from_be_bytes(payload[0..8].try_into().expect("8 bytes")),
            expires_at_ms: i64::from_be_bytes(payload[8..16].try_into().expect("8 bytes")),
            token_id: payload[16..32].try_into().expect("16 bytes"),
            account_created_ms: (payload_len == PAYLOAD_LEN)
                .then(|| i64::from_be_bytes(payload[32..40].try_into().expect("8 bytes"))),
        };
        if now_ms >= session.expires_at_ms {
            return Err(TokenError::Expired);
        }
        Ok(session)
    }
}

fn encode_payload(s: &Session) -> [u8; PAYLOAD_LEN] {
    let mut p = [0u8; PAYLOAD_LEN];
    p[0..8].copy_from_slice(&s.user_id.to_be_bytes());
    p[8..16].copy_from_slice(&s.expires_at_ms.to_be_bytes());
    p[16..32].copy_from_slice(&s.token_id);
    p[32..40].copy_from_slice(&s.account_created_ms.unwrap_or(0).to_be_bytes());
    p
}

/// Hex of a token id, as stored in the revocation table. (Its first sixteen
/// digits are the issue time: ids sort as the sessions were issued.)
pub fn token_id_hex(id: &[u8; 16]) -> String {
    crate::hex::to_hex(id)
}

/// When the session `token_id` was issued, Unix ms; `None` for a token of
/// an earlier version (random ids: see [`crate::store::ISSUED_RANGE_MS`]).
pub fn issued_ms(token_id: &[u8; 16]) -> Option<i64> {
    issue_time(i64::from_be_bytes(token_id[..8].try_into().expect("8 bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_verifies_and_rejects_tampering_and_expiry() {
        let key = SessionKey::new(b"0123456789abcdef0123456789abcdef");
        let (token, s) = key.issue(7, 5, 1_000);
        assert_eq!(s.account_created_ms, Some(5));
        assert_eq!(key.verify(&token, 999), Ok(s));
        assert_eq!(key.verify(&token, 1_000), Err(TokenError::Expired));
        let other = SessionKey::new(b"another key another key another!");
        assert_eq!(other.verify(&token, 0), Err(TokenError::Invalid));
        let mut forged = token.clone().into_bytes();
        forged[3] = if forged[3] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            key.verify(std::str::from_utf8(&forged).unwrap(), 0),
            Err(TokenError::Invalid)
        );
        let rotated =
            SessionKey::new(b"the new key the new key the new k").with_previous(b"0123456789abcdef0123456789abcdef");
        assert_eq!(rotated.verify(&token, 999), Ok(s), "old tokens live through a rotation");
        let (fresh, _) = rotated.issue(7, 5, 1_000);
        assert_eq!(
            key.verify(&fresh, 0),
            Err(TokenError::Invalid),
            "new tokens use the new key"
        );
        for junk in [
            "",
            ".",
            "abc",
            "a.b",
            &"A".repeat(87),
            &format!("{}.", "A".repeat(43)),
            &format!("{}.{}", "A".repeat(54), "A".repeat(43)),
        ] {
            assert_eq!(key.verify(junk, 0), Err(TokenError::Invalid), "{junk}");
        }
    }

    /// A token issued before tokens carried the account's creation time
    /// (a 32-byte payload) is still accepted, with the age unknown; it
    /// cannot be passed off as a newer one, nor the other way round.
    #[test]
    fn a_token_without_the_account_age_stays_valid_with_the_age_unknown() {
        let key = SessionKey::new(b"0123456789abcdef0123456789abcdef");
        let token_id = [3u8; 16];
        let mut v1 = [0u8; PAYLOAD_V1_LEN];
        v1[0..8].copy_from_slice(&7u64.to_be_bytes());
        v1[8..16].copy_from_slice(&1_000i64.to_be_bytes());
        v1[16..32].copy_from_slice(&token_id);
        let sign = |payload: &[u8]| {
            let mut mac = key.mac.clone();
            mac.update(payload);
            format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(payload),
                URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
            )
        };
        let old = sign(&v1);
        assert_eq!(
            key.verify(&old, 999),
            Ok(Session {
                user_id: 7,
                expires_at_ms: 1_000,
                token_id,
                account_created_ms: None,
            })
        );
        // The old tag over a payload with a creation time appended.
        let tag = old.split_once('.').unwrap().1;
        let mut longer = v1.to_vec();
        longer.extend_from_slice(&0i64.to_be_bytes());
        let spliced = format!("{}.{tag}", URL_SAFE_NO_PAD.encode(&longer));
        assert_eq!(key.verify(&spliced, 0), Err(TokenError::Invalid));
        // And a new token's tag over its first 32 bytes.
        let (new, _) = key.issue(7, 5, 1_000);
        let (payload, tag) = new.split_once('.').unwrap();
        let payload = URL_SAFE_NO_PAD.decode(payload).unwrap();
        let cut = format!("{}.{tag}", URL_SAFE_NO_PAD.encode(&payload[..32]));
        assert_eq!(key.verify(&cut, 0), Err(TokenError::Invalid));
    }

    proptest::proptest! {
        #[test]
        fn any_string_is_refused_without_panicking(token in ".{0,200}") {
            let key = SessionKey::new(b"0123456789abcdef0123456789abcdef");
            proptest::prop_assert!(key.verify(&token, 0).is_err());
        }

        #[test]
        fn a_changed_character_is_always_refused(pos in 0usize..98, c in "[A-Za-z0-9_.-]") {
            let key = SessionKey::new(b"0123456789abcdef0123456789abcdef");
            let (token, _) = key.issue(9, 1, i64::MAX);
            let mut chars: Vec<char> = token.chars().collect();
            let c = c.chars().next().unwrap();
            proptest::prop_assume!(chars[pos] != c);
            chars[pos] = c;
            let changed: String = chars.into_iter().collect();
            proptest::prop_assert!(key.verify(&changed, 0).is_err());
        }
    }
}
