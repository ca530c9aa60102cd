//! One activity's claims per user, and the claims being committed right now.
//!
//! The per-user limit is enforced here: a claim first *reserves* a slot under
//! the user's map entry (a short DashMap shard lock, never held across an
//! await), so fifty parallel requests of one user cannot all pass the check.
//! A reservation ends exactly once: confirmed when the claim is durable,
//! released when it is not, or when its outcome is unknown (OUTCOME_UNKNOWN).
//! Such a claim may have been kept; on one node the journal then takes no
//! claim until a restart, which rebuilds the ledger from the store, and in a
//! cluster the commit script holds the limit across nodes, so a user who
//! holds the limit this way hears SOLD_OUT or STOCK_IN_FLIGHT here where
//! LIMIT_REACHED would be the truer answer, but gets no further code.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use dashmap::DashMap;

use crate::vocab::Claim;

/// One activity's claims per user, and the claims being committed right now.
///
/// The per-user limit is enforced here: a claim first *reserves* a slot under
/// the user's map entry (a short DashMap shard lock, never held across an
/// await), so fifty parallel requests of one user cannot all pass the check.
#[derive(Default)]
pub struct Ledger {
    /// Keyed by user id, hashed with ahash: the ids are ours, and a claim
    /// hashes one twice (reserve, confirm), where SipHash showed in profiles.
    users: DashMap<u64, UserClaims, ahash::RandomState>,
    claimed: AtomicUsize,
    /// Claims of this activity being decided or committed (admission control).
    pub in_flight: AtomicUsize,
}

/// What one user holds in one activity.
#[derive(Default)]
struct UserClaims {
    claims: Vec<Claim>,
    /// Claims reserved but not yet durable.
    pending: u32,
    /// Idempotency keys of the pending claims.
    pending_keys: Vec<Arc<str>>,
}

/// The answer of [`Ledger::reserve`].
#[derive(Debug)]
pub enum Reservation {
    /// A slot is reserved; commit or release it.
    Reserved,
    /// This idempotency key already has a claim: answer it again.
    Replay(Claim),
    /// A claim with this idempotency key is being committed right now.
    InProgress,
    /// The user holds (or is committing) the limit; here are their codes.
    LimitReached(Vec<Arc<str>>),
}

impl Ledger {
    /// Reserves a claim slot for `user` if they are under `limit`.
    pub fn reserve(&self, user: u64, limit: u32, key: Option<&Arc<str>>) -> Reservation {
        let mut entry = self.users.entry(user).or_default();
        let held = &mut *entry;
        if let Some(key) = key {
            if let Some(c) = held
                .claims
                .iter()
                .find(|c| c.idempotency_key.as_deref() == Some(&**key))
            {
                return Reservation::Replay(c.clone());
            }
            if held.pending_keys.iter().any(|k| **k == **key) {
                return Reservation::InProgress;
            }
        }
        if held.claims.len() as u64 + u64::from(held.pending) >= u64::from(limit) {
            return Reservation::LimitReached(held.claims.iter().map(|c| c.code.clone()).collect());
        }
        if held.claims.capacity() == 0 {
            // Room for the whole limit at once, up to four: a `Vec`'s first
            // growth takes four, and most buyers of a rush hold one code (a
            // `Claim` is 88 bytes: 264 bytes of slack per buyer otherwise).
            held.claims.reserve_exact(limit.min(4) as usize);
        }
        held.pending += 1;
        if let Some(key) = key {
            held.pending_keys.push(key.clone());
        }
        Reservation::Reserved
    }

    /// The answer `reserve` would give without reserving, as of the claims
    /// held (the ones being committed are not counted): a replay, a claim
    /// with this key in progress, the limit reached, or `None`. Takes only a
    /// read lock and never inserts.
    pub fn peek(&self, user: u64, limit: u32, key: Option<&str>) -> Option<Reservation> {
        let held = self.users.get(&user)?;
        if let Some(key) = key {
            if let Some(c) = held.claims.iter().find(|c| c.idempotency_key.as_deref() == Some(key)) {
                return Some(Reservation::Replay(c.clone()));
            }
            if held.pending_keys.iter().any(|k| &**k == key) {
                return Some(Reservation::InProgress);
            }
        }
        (held.claims.len() as u64 >= u64::from(limit))
            .then(|| Reservation::LimitReached(held.claims.iter().map(|c| c.code.clone()).collect()))
    }

    /// Turns a reservation into a held claim (it is durable now).
    pub fn confirm(&self, claim: Claim) {
        let mut entry = self.users.entry(claim.user_id).or_default();
        entry.end_pending(claim.idempotency_key.as_ref());
        entry.claims.push(claim);
        self.claimed.fetch_add(1, Ordering::Relaxed);
    }

    /// Gives a reservation back (the claim failed).
    pub fn release(&self, user: u64, key: Option<&Arc<str>>) {
        if let Some(mut entry) = self.users.get_mut(&user) {
            entry.end_pending(key);
        }
    }

    /// Records a claim loaded from the store at start-up.
    pub fn restore(&self, claim: Claim) {
        self.users.entry(claim.user_id).or_default().claims.push(claim);
        self.claimed.fetch_add(1, Ordering::Relaxed);
    }

    /// The claims `user` holds, oldest first.
    pub fn claims_of(&self, user: u64) -> Vec<Claim> {
        self.users.get(&user).map(|e| e.claims.clone()).unwrap_or_default()
    }

    /// How many claims `user` holds (no copy).
    pub fn count_of(&self, user: u64) -> u32 {
        self.users.get(&user).map_or(0, |e| e.claims.len() as u32)
    }

    /// Durable claims in this activity.
    pub fn claimed(&self) -> usize {
        self.claimed.load(Ordering::Relaxed)
    }
}

impl UserClaims {
    fn end_pending(&mut self, key: Option<&Arc<str>>) {
        self.pending = self.pending.saturating_sub(1);
        if let Some(key) = key {
            if let Some(i) = self.pending_keys.iter().position(|k| **k == **key) {
                self.pending_keys.swap_remove(i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(user: u64, code: &str, key: Option<&str>) -> Claim {
        Claim {
            id: 1,
            activity_id: "a".into(),
            ticket_id: "t".into(),
            code: code.into(),
            user_id: user,
            claimed_at_ms: 0,
            idempotency_key: key.map(Arc::from),
        }
    }

    /// A buyer of one code holds room for one claim, not the four a `Vec`
    /// grows to first; a higher limit gets room for up to four at once.
    #[test]
    fn a_buyer_holds_room_for_the_limit_not_more() {
        assert_eq!(
            std::mem::size_of::<Claim>(),
            88,
            "the slack figure in `reserve` is of this size"
        );
        let ledger = Ledger::default();
        for (user, limit, want) in [(1, 1, 1), (2, 2, 2), (3, 10, 4)] {
            assert!(matches!(ledger.reserve(user, limit, None), Reservation::Reserved));
            ledger.confirm(claim(user, &format!("c{user}"), None));
            assert_eq!(
                ledger.users.get(&user).unwrap().claims.capacity(),
                want,
                "limit {limit}"
            );
        }
    }

    #[test]
    fn a_user_reserves_up_to_the_limit_counting_pending_claims() {
        let ledger = Ledger::default();
        assert!(matches!(ledger.reserve(1, 2, None), Reservation::Reserved));
        assert!(matches!(ledger.reserve(1, 2, None), Reservation::Reserved));
        // Two pending, none durable yet: the third is refused already.
        assert!(matches!(ledger.reserve(1, 2, None), Reservation::LimitReached(c) if c.is_empty()));
        ledger.confirm(claim(1, "A", None));
        ledger.release(1, None);
        assert_eq!(ledger.claimed(), 1);
        assert!(matches!(ledger.reserve(1, 2, None), Reservation::Reserved));
        ledger.confirm(claim(1, "B", None));
        match ledger.reserve(1, 2, None) {
            Reservation::LimitReached(codes) => assert_eq!(codes, vec![Arc::from("A"), Arc::from("B")]),
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(ledger.reserve(2, 2, None), Reservation::Reserved),
            "users are independent"
        );
    }

    #[test]
    fn an_idempotency_key_is_in_progress_then_replayed() {
        let ledger = Ledger::default();
        let key: Arc<str> = "k1".into();
        assert!(matches!(ledger.reserve(1, 5, Some(&key)), Reservation::Reserved));
        assert!(matches!(ledger.reserve(1, 5, Some(&key)), Reservation::InProgress));
        ledger.confirm(claim(1, "A", Some("k1")));
        match ledger.reserve(1, 5, Some(&key)) {
            Reservation::Replay(c) => assert_eq!(&*c.code, "A"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(ledger.peek(1, 5, Some("k1")), Some(Reservation::Replay(_))));
        assert!(ledger.peek(1, 5, Some("other")).is_none());
    }

    #[test]
    fn a_released_key_can_be_tried_again() {
        let ledger = Ledger::default();
        let key: Arc<str> = "k".into();
        assert!(matches!(ledger.reserve(1, 1, Some(&key)), Reservation::Reserved));
        ledger.release(1, Some(&key));
        assert!(matches!(ledger.reserve(1, 1, Some(&key)), Reservation::Reserved));
        assert_eq!(ledger.claimed(), 0);
    }

    #[test]
    fn peek_never_inserts_and_restore_counts() {
        let ledger = Ledger::default();
        assert!(ledger.peek(9, 1, None).is_none());
        assert!(ledger.users.is_empty());
        ledger.restore(claim(9, "R", None));
        assert!(matches!(ledger.peek(9, 1, None), Some(Reservation::LimitReached(c)) if c.len() == 1));
        assert_eq!((ledger.claimed(), ledger.claims_of(9).len()), (1, 1));
    }

    #[test]
    fn fifty_parallel_reservations_of_one_user_stop_at_the_limit() {
        let ledger = Ledger::default();
        let reserved = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..50 {
                s.spawn(|| {
                    if matches!(ledger.reserve(1, 3, None), Reservation::Reserved) {
                        reserved.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        assert_eq!(reserved.load(Ordering::Relaxed), 3);
    }
}
