//! Password hashing with argon2id.
//!
//! Costs come from `[auth]`; each hash records its own parameters (PHC
//! string), so raising the cost later does not lock anybody out. Hashing is
//! deliberately slow and always runs on a blocking thread.
//!
//! A password is hashed in one Unicode form ([`normalise`]): the same
//! password typed on a phone that composes `é` and on a laptop that sends
//! `e` and a combining accent is the same password. Hashes made before
//! that still verify against the password as typed, and a login that
//! matches one that way re-hashes it.

use std::borrow::Cow;

use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};

use crate::config::{MAX_ARGON2_ITERATIONS, MAX_ARGON2_MEMORY_KIB};
use argon2::{
    password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    Algorithm, Argon2, Params, Version,
};

/// Counts one argon2 computation (`ticketd_password_hashes_total`): the
/// hashing load, and proof that a login for a name nobody has does the
/// same work as one with a wrong password.
fn counted() {
    crate::metrics::global()
        .password_hashes
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Argon2id costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashCost {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes.
    pub iterations: u32,
}

fn hasher(cost: HashCost) -> Argon2<'static> {
    // Params are validated by the config (memory >= 8 KiB, iterations >= 1).
    let params = Params::new(cost.memory_kib.max(8), cost.iterations.max(1), 1, None).expect("valid argon2 params");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// The form a password is hashed in: RFC 8265's OpaqueString profile,
/// which is every non-ASCII space (U+00A0 and the rest of Unicode's
/// category Zs) as an ASCII space, then Unicode normalisation form C. Not
/// NFKC: a full-width `Ａ` is a different key from `A`, and folding them
/// would make passwords weaker, not more stable. Borrows when the password
/// is already in that form (nearly always).
pub fn normalise(password: &str) -> Cow<'_, str> {
    let spaced = password.chars().any(|c| c != ' ' && is_space(c));
    if !spaced && is_nfc_quick(password.chars()) == IsNormalized::Yes {
        return Cow::Borrowed(password);
    }
    Cow::Owned(
        password
            .chars()
            .map(|c| if is_space(c) { ' ' } else { c })
            .nfc()
            .collect(),
    )
}

/// Unicode's category Zs (space separators), as of Unicode 15.
fn is_space(c: char) -> bool {
    matches!(
        c,
        ' ' | '\u{a0}' | '\u{1680}' | '\u{2000}'..='\u{200a}' | '\u{202f}' | '\u{205f}' | '\u{3000}'
    )
}

/// Hashes `password`, in its [`normalise`]d form, into a PHC string.
pub fn hash(password: &str, cost: HashCost) -> String {
    counted();
    let salt = SaltString::generate(&mut OsRng);
    hasher(cost)
        .hash_password(normalise(password).as_bytes(), &salt)
        .expect("argon2 hashing cannot fail with valid params")
        .to_string()
}

/// Whether the PHC string `phc` is an argon2id hash at `cost` (what
/// [`hash`] makes now). One made at an earlier cost still verifies; a
/// login re-hashes it, since an unknown name is checked at the current cost
/// and the difference in time would tell old accounts from names nobody has.
pub fn has_cost(phc: &str, cost: HashCost) -> bool {
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    let Ok(params) = Params::try_from(&parsed) else {
        return false;
    };
    parsed.algorithm == Algorithm::Argon2id.ident()
        && params.m_cost() == cost.memory_kib.max(8)
        && params.t_cost() == cost.iterations.max(1)
        && params.p_cost() == 1
}

/// How a password matched a stored hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// It did not.
    No,
    /// In its [`normalise`]d form, as [`hash`] hashes passwords now.
    Yes,
    /// Only as typed: the hash was made before passwords were normalised,
    /// of a password typed in another form. Re-hash it, so the same
    /// password typed in any form logs in from now on.
    AsTyped,
}

impl Verified {
    /// Whether the password is the account's.
    pub fn matched(self) -> bool {
        self != Verified::No
    }
}

/// Whether `password` matches the PHC string `phc`. A malformed stored
/// hash never matches, nor does one whose costs no config could have set:
/// the hash names its own memory and passes, and argon2 allocates what it
/// names, so a stored `m=4294967295` (4 TiB) would abort the process at the
/// first login, and a huge `t` hold a hashing thread for hours.
///
/// A password typed in a form [`normalise`] changes costs two hashes when
/// it is wrong (its normalised form, then as typed, for the hashes made
/// before normalisation), whether or not the account exists: the caller
/// checks an unknown name against a dummy hash through this same function.
pub fn verify(password: &str, phc: &str) -> Verified {
    let Ok(parsed) = PasswordHash::new(phc) else {
        return Verified::No;
    };
    let Ok(params) = Params::try_from(&parsed) else {
        return Verified::No;
    };
    if params.m_cost() > MAX_ARGON2_MEMORY_KIB || params.t_cost() > MAX_ARGON2_ITERATIONS || params.p_cost() > 1 {
        tracing::error!(
            m = params.m_cost(),
            t = params.t_cost(),
            p = params.p_cost(),
            "A stored password hash asks for costs beyond any config's; it was not computed, and the login fails."
        );
        return Verified::No;
    }
    let matches = |form: &str| {
        counted();
        Argon2::default().verify_password(form.as_bytes(), &parsed).is_ok()
    };
    let normalised = normalise(password);
    if matches(&normalised) {
        Verified::Yes
    } else if normalised != password && matches(password) {
        Verified::AsTyped
    } else {
        Verified::No
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_only_their_password() {
        let cost = HashCost {
            memory_kib: 8,
            iterations: 1,
        };
        let h = hash("correct horse", cost);
        assert!(h.starts_with("$argon2id$"));
        assert_eq!(verify("correct horse", &h), Verified::Yes);
        assert_eq!(verify("correct horsE", &h), Verified::No);
        assert_eq!(verify("correct horse", "not a hash"), Verified::No);
        assert!(has_cost(&h, cost));
        let raised = HashCost {
            memory_kib: 16,
            iterations: 1,
        };
        assert!(!has_cost(&h, raised));
        assert!(has_cost(&hash("correct horse", raised), raised));
        assert!(!has_cost("not a hash", cost));
    }

    const CHEAP: HashCost = HashCost {
        memory_kib: 8,
        iterations: 1,
    };

    #[test]
    fn a_password_is_the_same_in_any_unicode_form() {
        let composed = "caf\u{e9} au\u{a0}lait";
        let decomposed = "cafe\u{301} au lait";
        assert_eq!(normalise(composed), decomposed.nfc().collect::<String>());
        assert!(matches!(normalise("plain ascii"), Cow::Borrowed(_)));
        let h = hash(composed, CHEAP);
        assert_eq!(verify(decomposed, &h), Verified::Yes);
        assert_eq!(verify(composed, &h), Verified::Yes);
        assert_eq!(verify("cafe au lait", &h), Verified::No);
        // Full-width letters are other keys, not the same password.
        assert_eq!(verify("ｃａｆé au lait", &h), Verified::No);
    }

    #[test]
    fn a_hash_made_before_normalisation_verifies_as_typed() {
        // What `hash` made before it normalised: the bytes as typed.
        let typed = "cafe\u{301}";
        let salt = SaltString::generate(&mut OsRng);
        let old = hasher(CHEAP)
            .hash_password(typed.as_bytes(), &salt)
            .unwrap()
            .to_string();
        assert_eq!(verify(typed, &old), Verified::AsTyped);
        assert_eq!(verify("other", &old), Verified::No);
        // The re-hash a login then makes takes either form.
        let new = hash(typed, CHEAP);
        assert_eq!(verify("caf\u{e9}", &new), Verified::Yes);
        assert_eq!(verify(typed, &new), Verified::Yes);
    }
}
