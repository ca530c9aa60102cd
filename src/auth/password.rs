//! Password hashing with argon2id.
//!
//! Costs come from `[auth]`; each hash records its own parameters (PHC
//! string), so raising the cost later does not lock anybody out. Hashing is
//! deliberately slow and always runs on a blocking thread.

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

/// Hashes `password` into a PHC string.
pub fn hash(password: &str, cost: HashCost) -> String {
    counted();
    let salt = SaltString::generate(&mut OsRng);
    hasher(cost)
        .hash_password(password.as_bytes(), &salt)
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

/// Whether `password` matches the PHC string `phc`. A malformed stored
/// hash never matches, nor does one whose costs no config could have set:
/// the hash names its own memory and passes, and argon2 allocates what it
/// names, so a stored `m=4294967295` (4 TiB) would abort the process at the
/// first login, and a huge `t` hold a hashing thread for hours.
pub fn verify(password: &str, phc: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    let Ok(params) = Params::try_from(&parsed) else {
        return false;
    };
    if params.m_cost() > MAX_ARGON2_MEMORY_KIB || params.t_cost() > MAX_ARGON2_ITERATIONS || params.p_cost() > 1 {
        tracing::error!(
            m = params.m_cost(),
            t = params.t_cost(),
            p = params.p_cost(),
            "A stored password hash asks for costs beyond any config's; it was not computed, and the login fails."
        );
        return false;
    }
    counted();
    Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok()
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
        assert!(verify("correct horse", &h));
        assert!(!verify("correct horsE", &h));
        assert!(!verify("correct horse", "not a hash"));
        assert!(has_cost(&h, cost));
        let raised = HashCost {
            memory_kib: 16,
            iterations: 1,
        };
        assert!(!has_cost(&h, raised));
        assert!(has_cost(&hash("correct horse", raised), raised));
        assert!(!has_cost("not a hash", cost));
    }
}
