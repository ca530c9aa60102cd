//! Logged-out sessions, in memory: at most [`REVOKED_PER_ACCOUNT`] per
//! account one by one, and past them a mark that logs out every session of
//! the account issued by then (the store keeps the same; see
//! [`REVOKED_PER_ACCOUNT`] for why).
//!
//! The mark is an issue time, read from the token id ([`issued_ms`]), not
//! an expiry: with expiries, a reload that shortened `auth.session_ttl`
//! after a fold issued sessions expiring before the mark, which it then
//! refused, and the account could not log in until the mark passed.
//!
//! Looked up on every authenticated request, claims included: one map
//! entry per account, by its id, and a scan of at most a few token ids.

use std::sync::atomic::{AtomicBool, Ordering};

use dashmap::DashMap;

use super::session::{issued_ms, Session};
use crate::{
    hex::from_hex,
    store::{Revocation, REVOKED_PER_ACCOUNT},
};

/// Every logout this node knows of that has not expired.
#[derive(Default)]
pub(super) struct Revoked {
    by_account: DashMap<u64, Account>,
    /// Logouts an earlier version wrote, without their account: read until
    /// they expire, never added to by this version.
    legacy: DashMap<[u8; 16], i64>,
    /// `legacy` has entries: most nodes never look it up.
    has_legacy: AtomicBool,
}

/// One account's logouts.
#[derive(Default)]
struct Account {
    /// The mark: every session issued at or before this is logged out (0:
    /// no mark).
    before: i64,
    /// When the mark may go: the latest expiry of the logouts folded into
    /// it (a session it covers that was never logged out may outlive it,
    /// and is then the account's own again).
    mark_expires: i64,
    /// Sessions logged out one by one, with their expiry: at most
    /// [`REVOKED_PER_ACCOUNT`] with an issue time, each issued after the
    /// mark (and any of an earlier version's, which have none).
    sessions: Vec<([u8; 16], i64)>,
}

impl Account {
    fn covers(&self, token_id: &[u8; 16]) -> bool {
        issued_ms(token_id).is_some_and(|at| at <= self.before) || self.sessions.iter().any(|(id, _)| id == token_id)
    }

    /// Moves the mark to `before` if that is later, and drops what it
    /// covers, the mark lasting as long as what it dropped.
    fn mark(&mut self, before: i64, expires_at_ms: i64) {
        self.before = self.before.max(before);
        let mut expires = self.mark_expires.max(expires_at_ms);
        let mark = self.before;
        self.sessions.retain(|(id, exp)| {
            let covered = issued_ms(id).is_some_and(|at| at <= mark);
            if covered {
                expires = expires.max(*exp);
            }
            !covered
        });
        self.mark_expires = expires;
    }

    /// Adds a logout; past [`REVOKED_PER_ACCOUNT`] with an issue time, the
    /// earliest issued fold into the mark (as the store folds them). One
    /// the mark covers already makes the mark last as long as it.
    fn add(&mut self, token_id: [u8; 16], expires_at_ms: i64) {
        if issued_ms(&token_id).is_some_and(|at| at <= self.before) {
            self.mark_expires = self.mark_expires.max(expires_at_ms);
            return;
        }
        if self.sessions.iter().any(|(id, _)| *id == token_id) {
            return;
        }
        self.sessions.push((token_id, expires_at_ms));
        if self.sessions.len() <= REVOKED_PER_ACCOUNT {
            return;
        }
        let mut timed: Vec<(i64, i64)> = self
            .sessions
            .iter()
            .filter_map(|(id, exp)| Some((issued_ms(id)?, *exp)))
            .collect();
        if timed.len() > REVOKED_PER_ACCOUNT {
            timed.sort_unstable_by_key(|(at, _)| std::cmp::Reverse(*at));
            let folded = &timed[REVOKED_PER_ACCOUNT..];
            let expires = folded.iter().map(|(_, exp)| *exp).max().unwrap_or(0);
            self.mark(folded[0].0, expires);
        }
    }
}

impl Revoked {
    /// Whether `session` was logged out (it need not have expired).
    pub(super) fn contains(&self, session: &Session) -> bool {
        if self
            .by_account
            .get(&session.user_id)
            .is_some_and(|a| a.covers(&session.token_id))
        {
            return true;
        }
        self.has_legacy.load(Ordering::Relaxed) && self.legacy.contains_key(&session.token_id)
    }

    /// A logout through this node, once the store holds it.
    pub(super) fn add(&self, session: &Session) {
        self.by_account
            .entry(session.user_id)
            .or_default()
            .add(session.token_id, session.expires_at_ms);
    }

    /// A revocation read from the store.
    pub(super) fn learn(&self, revocation: Revocation) {
        match revocation {
            Revocation::Session {
                user,
                token_id,
                expires_at_ms,
            } => {
                let Some(id) = from_hex::<16>(&token_id) else { return };
                match user {
                    Some(user) => self.by_account.entry(user).or_default().add(id, expires_at_ms),
                    None => {
                        self.legacy.insert(id, expires_at_ms);
                        self.has_legacy.store(true, Ordering::Relaxed);
                    }
                }
            }
            Revocation::Before {
                user,
                issued_ms,
                expires_at_ms,
            } => self.by_account.entry(user).or_default().mark(issued_ms, expires_at_ms),
        }
    }

    /// Forgets what has expired by `now_ms`.
    pub(super) fn forget_expired(&self, now_ms: i64) {
        self.by_account.retain(|_, a| {
            a.sessions.retain(|(_, exp)| *exp >= now_ms);
            if a.mark_expires < now_ms {
                (a.before, a.mark_expires) = (0, 0);
            }
            a.before > 0 || !a.sessions.is_empty()
        });
        self.legacy.retain(|_, exp| *exp >= now_ms);
        // Once they have all expired, the claim path stops looking there.
        // (A cluster reads an earlier version's logouts again at every
        // refresh, so one learnt meanwhile sets the flag again within it.)
        self.has_legacy.store(!self.legacy.is_empty(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_800_000_000_000;

    /// A session of `user` issued at `issued`, told apart by `n`.
    fn session(user: u64, issued: i64, n: u8, expires_at_ms: i64) -> Session {
        let mut token_id = [n; 16];
        token_id[..8].copy_from_slice(&issued.to_be_bytes());
        Session {
            user_id: user,
            expires_at_ms,
            token_id,
            account_created_ms: None,
        }
    }

    /// However many logouts an account makes, it keeps at most
    /// [`REVOKED_PER_ACCOUNT`] one by one; every session logged out stays
    /// out, as does one issued before the latest folded away, while one
    /// issued after them stays in, however soon it expires (a shorter
    /// `session_ttl` since).
    #[test]
    fn an_account_keeps_a_bounded_number_of_logouts_and_loses_none() {
        let revoked = Revoked::default();
        let sessions: Vec<Session> = (0..40)
            .map(|n| session(7, T0 + i64::from(n), n, T0 + 86_400_000))
            .collect();
        for s in &sessions {
            revoked.add(s);
        }
        assert!(revoked.by_account.get(&7).unwrap().sessions.len() <= REVOKED_PER_ACCOUNT);
        assert!(sessions.iter().all(|s| revoked.contains(s)));
        assert!(revoked.contains(&session(7, T0, 200, T0 + 86_400_000)));
        assert!(!revoked.contains(&session(7, T0 + 100, 201, T0 + 3_600_000)));
        assert!(!revoked.contains(&session(8, T0, 0, T0 + 86_400_000)));
        revoked.forget_expired(T0 + 86_400_001);
        assert!(revoked.by_account.is_empty());
    }

    /// A mark lasts as long as every logout it covers: one that outlives
    /// the sessions folded in (issued under a longer `session_ttl`), learnt
    /// before the mark or logged out after it, came back once the mark was
    /// forgotten.
    #[test]
    fn a_mark_lasts_as_long_as_the_logouts_it_covers() {
        let revoked = Revoked::default();
        let day = 86_400_000;
        let before = session(7, T0, 1, T0 + 2 * day);
        revoked.add(&before);
        revoked.learn(Revocation::Before {
            user: 7,
            issued_ms: T0 + 10,
            expires_at_ms: T0 + 3_600_000,
        });
        let after = session(7, T0 + 5, 2, T0 + 3 * day);
        revoked.add(&after);
        revoked.forget_expired(T0 + 2 * day - 1);
        assert!(revoked.contains(&before) && revoked.contains(&after));
        revoked.forget_expired(T0 + 3 * day - 1);
        assert!(revoked.contains(&after));
    }

    /// A token of an earlier version has no issue time: its own logout
    /// holds, no mark covers it, and it never counts toward the bound.
    #[test]
    fn a_token_without_an_issue_time_is_kept_by_itself() {
        let revoked = Revoked::default();
        let old = Session {
            user_id: 7,
            expires_at_ms: T0 + 1_000,
            token_id: [0xff; 16],
            account_created_ms: None,
        };
        revoked.add(&old);
        for n in 0..20 {
            revoked.add(&session(7, T0 + i64::from(n), n, T0 + 1_000));
        }
        assert!(revoked.contains(&old));
        let never = Session {
            token_id: [0xfe; 16],
            ..old
        };
        assert!(!revoked.contains(&never));
    }
}
