//! Password hashing with argon2id.
//!
//! Costs come from `[auth]`; each hash records its own parameters (PHC
//! string), so raising the cost later does not lock anybody out. Hashing is
//! deliberately slow and always runs on a blocking thread.
//!
//! A password is hashed in one Unicode form ([`normalise`]): the same
//! password typed on a phone that composes `é` and on a laptop that sends
//! `e` and a combining accent is the same password. Such a hash says so in
//! its argon2 associated data ([`FORM`]). Hashes made before that still
//! verify against the password as typed, and a login re-hashes them.

use std::borrow::Cow;

use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};

use crate::config::{MAX_ARGON2_ITERATIONS, MAX_ARGON2_MEMORY_KIB};
use argon2::{
    password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    Algorithm, Argon2, AssociatedData, Params, ParamsBuilder, Version,
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

/// The associated data of a hash made of a [`normalise`]d password
/// (`data=bmZj` in its PHC string). Argon2 binds it into the hash, so it
/// cannot be stripped to pass one off as a hash of the password as typed;
/// and every version verifies it (a verifier reads the parameters from the
/// hash), so nodes of an earlier version beside this one still log these
/// accounts in. Without it, a wrong password in another Unicode form cost
/// two hashes for every account (normalised, then as typed, for the hashes
/// made before normalisation): a flood of such guesses held each rationed
/// hashing turn twice as long.
const FORM: &[u8] = b"nfc";

fn hasher(cost: HashCost) -> Argon2<'static> {
    // Params are validated by the config (memory >= 8 KiB, iterations >= 1).
    let params = ParamsBuilder::new()
        .m_cost(cost.memory_kib.max(8))
        .t_cost(cost.iterations.max(1))
        .p_cost(1)
        .data(AssociatedData::new(FORM).expect("a short associated data"))
        .build()
        .expect("valid argon2 params");
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

/// Whether the PHC string `phc` is what [`hash`] makes now: an argon2id
/// hash at `cost`, of the [`normalise`]d password ([`FORM`]). One made at
/// an earlier cost, or before normalisation, still verifies; a login
/// re-hashes it, since an unknown name is checked against a hash made now,
/// and the difference in time would tell old accounts from names nobody has.
pub fn is_current(phc: &str, cost: HashCost) -> bool {
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
        && params.data() == FORM
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
/// One hash, against the [`normalise`]d password, for a hash made so
/// ([`FORM`]), as every hash made now is (the dummy an unknown name is
/// checked against too). A hash made before normalisation takes a second,
/// as typed, when the normalised form does not match and differs: until
/// that account logs in again, a wrong password in another Unicode form
/// takes twice as long for it as for a name nobody has (as after a change
/// of `argon2_*`; see [`is_current`]).
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
    let made_before_normalisation = params.data() != FORM;
    if matches(&normalised) {
        Verified::Yes
    } else if made_before_normalisation && normalised != password && matches(password) {
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
        assert!(is_current(&h, cost));
        let raised = HashCost {
            memory_kib: 16,
            iterations: 1,
        };
        assert!(!is_current(&h, raised));
        assert!(is_current(&hash("correct horse", raised), raised));
        assert!(!is_current("not a hash", cost));
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
        // What `hash` made before it normalised: the bytes as typed, and
        // no associated data.
        let typed = "cafe\u{301}";
        let salt = SaltString::generate(&mut OsRng);
        let params = Params::new(CHEAP.memory_kib, CHEAP.iterations, 1, None).unwrap();
        let old = Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password(typed.as_bytes(), &salt)
            .unwrap()
            .to_string();
        assert!(!old.contains("data="));
        assert!(!is_current(&old, CHEAP), "a login re-hashes it");
        assert_eq!(verify(typed, &old), Verified::AsTyped);
        assert_eq!(verify("other", &old), Verified::No);
        // The re-hash a login then makes takes either form.
        let new = hash(typed, CHEAP);
        assert!(new.contains(",data=bmZj$"), "{new}");
        assert_eq!(verify("caf\u{e9}", &new), Verified::Yes);
        assert_eq!(verify(typed, &new), Verified::Yes);
        // The mark is bound into the hash: without it, nothing matches.
        let stripped = new.replace(",data=bmZj", "");
        assert_eq!(verify("caf\u{e9}", &stripped), Verified::No);
        assert_eq!(verify(typed, &stripped), Verified::No);
    }
}
