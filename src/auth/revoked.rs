//! Logged-out sessions, in memory: at most [`REVOKED_PER_ACCOUNT`] per
//! account one by one, and past them a mark that logs out every session of
//! the account expiring by then (the store keeps the same; see
//! [`REVOKED_PER_ACCOUNT`] for why).
//!
//! Looked up on every authenticated request, claims included: one map
//! entry per account, by its id, and a scan of at most a few token ids.

use std::sync::atomic::{AtomicBool, Ordering};

use dashmap::DashMap;

use super::session::Session;
use crate::store::{Revocation, REVOKED_PER_ACCOUNT};

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
    /// Every session expiring at or before this is logged out (0: none).
    before: i64,
    /// Sessions logged out one by one, with their expiry: at most
    /// [`REVOKED_PER_ACCOUNT`], each expiring after `before`.
    sessions: Vec<([u8; 16], i64)>,
}

impl Account {
    fn covers(&self, session: &Session) -> bool {
        session.expires_at_ms <= self.before || self.sessions.iter().any(|(id, _)| *id == session.token_id)
    }

    /// Moves the mark to `before` if that is later, and drops what it covers.
    fn mark(&mut self, before: i64) {
        self.before = self.before.max(before);
        let mark = self.before;
        self.sessions.retain(|(_, exp)| *exp > mark);
    }

    /// Adds a logout; past [`REVOKED_PER_ACCOUNT`], the earliest to expire
    /// fold into the mark (as the store folds them).
    fn add(&mut self, token_id: [u8; 16], expires_at_ms: i64) {
        if expires_at_ms <= self.before || self.sessions.iter().any(|(id, _)| *id == token_id) {
            return;
        }
        self.sessions.push((token_id, expires_at_ms));
        if self.sessions.len() > REVOKED_PER_ACCOUNT {
            self.sessions.sort_unstable_by_key(|(_, exp)| std::cmp::Reverse(*exp));
            let past = self.sessions[REVOKED_PER_ACCOUNT].1;
            self.mark(past);
        }
    }
}

impl Revoked {
    /// Whether `session` was logged out (it need not have expired).
    pub(super) fn contains(&self, session: &Session) -> bool {
        if self.by_account.get(&session.user_id).is_some_and(|a| a.covers(session)) {
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
                let Some(id) = parse_hex16(&token_id) else { return };
                match user {
                    Some(user) => self.by_account.entry(user).or_default().add(id, expires_at_ms),
                    None => {
                        self.legacy.insert(id, expires_at_ms);
                        self.has_legacy.store(true, Ordering::Relaxed);
                    }
                }
            }
            Revocation::Before { user, expires_at_ms } => self.by_account.entry(user).or_default().mark(expires_at_ms),
        }
    }

    /// Forgets what has expired by `now_ms`: a mark once its time has
    /// passed covers only expired sessions.
    pub(super) fn forget_expired(&self, now_ms: i64) {
        self.by_account.retain(|_, a| {
            a.sessions.retain(|(_, exp)| *exp >= now_ms);
            if a.before < now_ms {
                a.before = 0;
            }
            a.before > 0 || !a.sessions.is_empty()
        });
        self.legacy.retain(|_, exp| *exp >= now_ms);
    }
}

fn parse_hex16(s: &str) -> Option<[u8; 16]> {
    let mut out = [0u8; 16];
    if s.len() != 32 {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(user: u64, n: u8, expires_at_ms: i64) -> Session {
        Session {
            user_id: user,
            expires_at_ms,
            token_id: [n; 16],
            account_created_ms: None,
        }
    }

    /// However many logouts an account makes, it keeps at most
    /// [`REVOKED_PER_ACCOUNT`] one by one; every session logged out stays
    /// out, as does one that expires before the latest folded away, while
    /// a later session never logged out stays in.
    #[test]
    fn an_account_keeps_a_bounded_number_of_logouts_and_loses_none() {
        let revoked = Revoked::default();
        let sessions: Vec<Session> = (0..40).map(|n| session(7, n, 1_000 + i64::from(n))).collect();
        for s in &sessions {
            revoked.add(s);
        }
        assert!(revoked.by_account.get(&7).unwrap().sessions.len() <= REVOKED_PER_ACCOUNT);
        assert!(sessions.iter().all(|s| revoked.contains(s)));
        assert!(revoked.contains(&session(7, 200, 1_000)));
        assert!(!revoked.contains(&session(7, 201, 2_000)));
        assert!(!revoked.contains(&session(8, 0, 1_000)));
        revoked.forget_expired(1_040);
        assert!(revoked.by_account.is_empty());
    }
}
