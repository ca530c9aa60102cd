//! Session tokens: stateless, HMAC-SHA256 signed, revocable.
//!
//! ```text
//! token   := base64url(payload) "." base64url(tag)
//! payload := user_id:u64be expires_at_ms:i64be token_id:[u8;16]
//! tag     := HMAC-SHA256(key, payload)
//! ```
//!
//! Verifying needs no store access and no allocation: the token is decoded
//! into stack buffers and the tag compared in constant time. Logout records
//! the token id in a revocation set (kept in the store until the token would
//! have expired anyway).

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const PAYLOAD_LEN: usize = 32;
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

    /// Issues a token for `user_id`, valid until `expires_at_ms`.
    pub fn issue(&self, user_id: u64, expires_at_ms: i64) -> (String, Session) {
        let mut token_id = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut token_id);
        let session = Session {
            user_id,
            expires_at_ms,
            token_id,
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
        // Exact encoded lengths: 32 bytes is 43 base64url characters.
        if payload_b64.len() != 43 || tag_b64.len() != 43 {
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
        if n != PAYLOAD_LEN || m != TAG_LEN {
            return Err(TokenError::Invalid);
        }
        let signed_by = |key: &HmacSha256| {
            let mut mac = key.clone();
            mac.update(&payload[..PAYLOAD_LEN]);
            mac.verify_slice(&tag[..TAG_LEN]).is_ok()
        };
        if !signed_by(&self.mac) && !self.previous.as_ref().is_some_and(signed_by) {
            return Err(TokenError::Invalid);
        }
        let session = Session {
            user_id: u64::from_be_bytes(payload[0..8].try_into().expect("8 bytes")),
            expires_at_ms: i64::from_be_bytes(payload[8..16].try_into().expect("8 bytes")),
            token_id: payload[16..32].try_into().expect("16 bytes"),
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
    p
}

/// Hex of a token id, as stored in the revocation table.
pub fn token_id_hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_verifies_and_rejects_tampering_and_expiry() {
        let key = SessionKey::new(b"0123456789abcdef0123456789abcdef");
        let (token, s) = key.issue(7, 1_000);
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
        let (fresh, _) = rotated.issue(7, 1_000);
        assert_eq!(
            key.verify(&fresh, 0),
            Err(TokenError::Invalid),
            "new tokens use the new key"
        );
        for junk in ["", ".", "abc", "a.b", &"A".repeat(87), &format!("{}.", "A".repeat(43))] {
            assert_eq!(key.verify(junk, 0), Err(TokenError::Invalid), "{junk}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_string_is_refused_without_panicking(token in ".{0,200}") {
            let key = SessionKey::new(b"0123456789abcdef0123456789abcdef");
            proptest::prop_assert!(key.verify(&token, 0).is_err());
        }

        #[test]
        fn a_changed_character_is_always_refused(pos in 0usize..87, c in "[A-Za-z0-9_.-]") {
            let key = SessionKey::new(b"0123456789abcdef0123456789abcdef");
            let (token, _) = key.issue(9, i64::MAX);
            let mut chars: Vec<char> = token.chars().collect();
            let c = c.chars().next().unwrap();
            proptest::prop_assume!(chars[pos] != c);
            chars[pos] = c;
            let changed: String = chars.into_iter().collect();
            proptest::prop_assert!(key.verify(&changed, 0).is_err());
        }
    }
}
