//! The verifiable draw: a committed seed, and an order anyone can recompute.
//!
//! Before anyone may join, the room holds a 32-byte seed from the OS CSPRNG
//! and publishes only its commitment, `SHA-256(seed)`. At the shuffle the
//! seed is revealed and the order of the entrants is
//!
//! ```text
//! digest = SHA-256(entrant ids, ascending, each as u64 big-endian)
//! key(u) = HMAC-SHA256(seed, digest || u as u64 big-endian)
//! order  = entrants sorted by key, ascending (ties, never seen, by id)
//! ```
//!
//! so the order is a public function of the seed and the entrant list:
//! [`DrawRecord::verify`] (`ticketd verify-draw`) recomputes it. Keying every
//! entrant with the digest of the whole list means adding or dropping one
//! account reshuffles everybody: nobody — the operator included, who knows
//! the seed — can place an account by choosing its id alone.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    config::AdmissionMode,
    hex::{from_hex, to_hex},
};

type HmacSha256 = Hmac<Sha256>;

/// The file format `ticketd export --what draw` writes.
pub const FORMAT: &str = "ticketd-draw-v1";

/// A room's secret seed.
#[derive(Clone, PartialEq, Eq)]
pub struct Seed([u8; 32]);

impl std::fmt::Debug for Seed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Seed(..)")
    }
}

impl Seed {
    /// 32 bytes from the OS CSPRNG.
    pub fn generate() -> Seed {
        use rand::RngCore;
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Seed(bytes)
    }

    /// A seed written by [`Seed::to_hex`].
    pub fn from_hex(hex: &str) -> Option<Seed> {
        Some(Seed(from_hex(hex)?))
    }

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }

    /// `SHA-256(seed)` in hex: published before the room opens.
    pub fn commitment(&self) -> String {
        to_hex(&Sha256::digest(self.0))
    }
}

/// SHA-256 over the entrant ids, ascending, each as u64 big-endian.
fn entrants_digest(ascending: &[u64]) -> [u8; 32] {
    let mut h = Sha256::new();
    for id in ascending {
        h.update(id.to_be_bytes());
    }
    h.finalize().into()
}

/// The draw's order of `entrants` (any order in; duplicates are one entrant).
pub fn shuffle(seed: &Seed, entrants: &[u64]) -> Vec<u64> {
    let mut ascending = entrants.to_vec();
    ascending.sort_unstable();
    ascending.dedup();
    let digest = entrants_digest(&ascending);
    let mac = HmacSha256::new_from_slice(&seed.0).expect("any key length");
    let mut keyed: Vec<([u8; 32], u64)> = ascending
        .iter()
        .map(|&id| {
            let mut m = mac.clone();
            m.update(&digest);
            m.update(&id.to_be_bytes());
            (m.finalize().into_bytes().into(), id)
        })
        .collect();
    keyed.sort_unstable();
    keyed.into_iter().map(|(_, id)| id).collect()
}

/// What a draw was: enough for anyone to recompute and check it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DrawRecord {
    /// [`FORMAT`].
    pub format: String,
    /// The activity.
    pub activity: String,
    /// `SHA-256(seed)`, as published before the room opened.
    pub commitment: String,
    /// The seed, revealed at the shuffle.
    pub seed: String,
    /// When the shuffle was made (RFC 3339).
    pub shuffled_at: String,
    /// Everyone who joined before the shuffle (user ids, ascending).
    pub entrants: Vec<u64>,
    /// The drawn order of `entrants`.
    pub order: Vec<u64>,
    /// Who joined after the shuffle, in arrival order, queued behind `order`
    /// (a fan passed over who joined again is here again).
    pub late: Vec<u64>,
    /// `queue` or `lottery`, as the activity's page says (records written
    /// before this field have none). A lottery takes no entry after its
    /// draw, so its `late` must be empty: a drawn entrant moved there would
    /// otherwise verify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admission: Option<AdmissionMode>,
}

impl DrawRecord {
    /// Checks the record: the seed matches the commitment, the entrants are a
    /// set, and the order is exactly the draw of the seed and the entrants.
    pub fn verify(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!("unknown format `{}` (expected `{FORMAT}`)", self.format));
        }
        let seed = Seed::from_hex(&self.seed).ok_or("the seed is not 64 hex digits")?;
        if seed.commitment() != self.commitment.to_ascii_lowercase() {
            return Err(format!(
                "the seed does not match the commitment: SHA-256(seed) = {}, published {}",
                seed.commitment(),
                self.commitment
            ));
        }
        if self.entrants.windows(2).any(|w| w[0] >= w[1]) {
            return Err("the entrant list is not ascending without repeats".into());
        }
        match self.admission {
            None | Some(AdmissionMode::Queue) => {}
            Some(AdmissionMode::Lottery) if self.late.is_empty() => {}
            Some(AdmissionMode::Lottery) => {
                return Err(format!(
                    "a lottery takes no entry after its draw, yet {} user(s) are listed as late (first: {})",
                    self.late.len(),
                    self.late[0]
                ))
            }
            Some(AdmissionMode::Race) => return Err("a race has no draw (expected `queue` or `lottery`)".into()),
        }
        let expected = shuffle(&seed, &self.entrants);
        if expected != self.order {
            let at = expected.iter().zip(&self.order).position(|(a, b)| a != b);
            return Err(match at {
                Some(i) => format!(
                    "the order differs from the draw at place {}: the draw gives user {}, the record user {}",
                    i + 1,
                    expected[i],
                    self.order[i]
                ),
                None => format!(
                    "the order has {} places, the draw of {} entrants {}",
                    self.order.len(),
                    self.entrants.len(),
                    expected.len()
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_is_hex_digits_only() {
        let hex = Seed::generate().to_hex();
        assert!(Seed::from_hex(&hex).is_some());
        // `from_str_radix` takes a sign: "+a" read as 0x0a, a second
        // spelling of the same seed that `xxd -r -p` reads differently.
        let signed = format!("+{}", &hex[1..]);
        assert!(Seed::from_hex(&signed).is_none());
    }

    fn record(seed: &Seed, entrants: Vec<u64>) -> DrawRecord {
        let order = shuffle(seed, &entrants);
        DrawRecord {
            format: FORMAT.into(),
            activity: "a".into(),
            commitment: seed.commitment(),
            seed: seed.to_hex(),
            shuffled_at: "2026-12-04T00:00:00Z".into(),
            entrants,
            order,
            late: vec![],
            admission: Some(AdmissionMode::Lottery),
        }
    }

    #[test]
    fn a_draw_verifies_and_any_change_is_caught() {
        let seed = Seed::from_hex(&"ab".repeat(32)).unwrap();
        let good = record(&seed, (1..=100).collect());
        assert_eq!(good.verify(), Ok(()));
        assert_ne!(good.order, good.entrants, "the order is shuffled");

        // A lottery's drawn entrant moved to `late` (and the order drawn
        // again without them) is caught; a queue's late arrivals are normal.
        let mut demoted = record(&seed, (2..=100).collect());
        demoted.late = vec![1];
        assert!(demoted.verify().unwrap_err().contains("no entry after its draw"));
        demoted.admission = Some(AdmissionMode::Queue);
        assert_eq!(demoted.verify(), Ok(()));
        demoted.admission = Some(AdmissionMode::Race);
        assert!(demoted.verify().unwrap_err().contains("a race has no draw"));
        let text = serde_json::to_string(&good).unwrap();
        assert!(text.contains(r#""admission":"lottery""#), "{text}");
        let unknown = text.replace(r#""admission":"lottery""#, r#""admission":"raffle""#);
        assert!(
            serde_json::from_str::<DrawRecord>(&unknown).is_err(),
            "an unknown admission is refused"
        );

        let mut swapped = good.clone();
        swapped.order.swap(0, 1);
        assert!(swapped.verify().unwrap_err().contains("place 1"));

        let mut other_seed = good.clone();
        other_seed.seed = "cd".repeat(32);
        assert!(other_seed.verify().unwrap_err().contains("commitment"));

        let mut dropped = good.clone();
        dropped.entrants.retain(|&u| u != 50);
        assert!(dropped.verify().is_err(), "dropping an entrant changes the draw");
    }

    #[test]
    fn one_more_entrant_reshuffles_everybody() {
        let seed = Seed::generate();
        let a = shuffle(&seed, &(1..=1000).collect::<Vec<_>>());
        let b = shuffle(&seed, &(1..=1001).collect::<Vec<_>>());
        let b_without: Vec<u64> = b.into_iter().filter(|&u| u != 1001).collect();
        let same_place = a.iter().zip(&b_without).filter(|(x, y)| x == y).count();
        assert!(same_place < 50, "{same_place} of 1000 kept their place");
    }

    /// Spearman's rho between join order (the ids, joined 1, 2, 3, ...) and the drawn place.
    fn rho_of_draw(seed: &Seed, n: u64) -> f64 {
        let order = shuffle(seed, &(1..=n).collect::<Vec<_>>());
        let n = n as f64;
        let d2: f64 = order
            .iter()
            .enumerate()
            .map(|(place, id)| (place as f64 - (*id - 1) as f64).powi(2))
            .sum();
        1.0 - 6.0 * d2 / (n * (n * n - 1.0))
    }

    #[test]
    fn places_are_uncorrelated_with_join_order_for_a_fixed_seed() {
        let rho = rho_of_draw(&Seed::from_hex(&"5e".repeat(32)).unwrap(), 2000);
        assert!(rho.abs() < 0.1, "rho = {rho}");
    }

    /// Over many seeds — fixed ones, so the test is deterministic: with
    /// 2,000 entrants rho's spread is about 0.022, so a bound of 0.1 is
    /// 4.5 of them, and random seeds would fail one run in a few thousand.
    #[test]
    fn places_are_uncorrelated_with_join_order_for_many_seeds() {
        for i in 0u32..64 {
            let bytes: [u8; 32] =
                Sha256::digest([b"ticketd draw test seed ".as_slice(), &i.to_be_bytes()].concat()).into();
            let rho = rho_of_draw(&Seed(bytes), 2000);
            assert!(rho.abs() < 0.1, "seed {i}: rho = {rho}");
        }
    }

    #[test]
    fn hex_round_trips_and_junk_is_refused() {
        let seed = Seed::generate();
        assert_eq!(Seed::from_hex(&seed.to_hex()), Some(seed));
        for junk in ["", "zz", &"g".repeat(64), &"é".repeat(32)] {
            assert_eq!(Seed::from_hex(junk), None);
        }
    }
}
