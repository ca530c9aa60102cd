//! The claim decision: may this user have a code of this activity now, and
//! which one?
//!
//! The order of checks is the order of cost. Everything before the commit is
//! in memory and lock-free or shard-locked for a few instructions, but for
//! one read of a cluster's store: a keyed retry that would be refused for a
//! change since its claim (paused, ended, a lapsed token or pass) or sold
//! out is first looked up there, within the user's budget of such reads
//! ([`Claimer::may_read_store`]):
//!
//! 1. the activity in the catalog snapshot (404), paused (409), the sale
//!    window (409 NOT_STARTED / ENDED); when every pool is empty, the
//!    caller's own LIMIT_REACHED / idempotent replay, else 410 SOLD_OUT at
//!    once if no code can come back, or 503 STOCK_IN_FLIGHT while one still
//!    may (see [`Claimer::no_code`]); with leases (a cluster) a claim first
//!    waits briefly for the lease worker while a master list has codes —
//!    only one that could take a code (its claim token and the user's
//!    limit are checked before: the lease is made for it) — and then
//!    checks the window again and judges its pass as of after the wait;
//! 2. the claim token and proof of work (403) — for an activity with a
//!    waiting room, its pass (403 QUEUE_PASS_REQUIRED / QUEUE_PASS_EXPIRED),
//!    whatever `require_claim_token` says;
//! 3. in-flight budgets, global and per activity (503, so a burst cannot
//!    queue without bound);
//! 4. the user's slot in the activity's [`Ledger`]: an idempotency key that
//!    already has a claim is answered again; a user at the limit is refused
//!    with their codes (409 LIMIT_REACHED);
//! 5. a code from the ticket's [`CodePool`] (as in 1. if the last one went
//!    to someone else a moment ago);
//! 6. the commit: the claim goes to the store ([`Store::commit`]: the local
//!    journal, or in a cluster the Redis commit script, which also enforces
//!    the per-user limit across nodes), which answers in its own terms
//!    ([`CommitOutcome`]). Only here does that answer become what the user
//!    hears (a [`Rejection`]) and what happens to the code and the slot:
//!    confirmed in the ledger; or the code back in the pool and the slot
//!    released; or, when another node took the code, another code tried.
//!
//! # A client that hangs up
//! The request's future may be dropped while the store works (the client
//! went away). The reservation is then settled without it: a [`Settle`]
//! guard owns the code and the slot, and on drop hands the pending answer
//! to a small task that applies it when it comes. So a durable claim is
//! always confirmed in the ledger and a failed one always gives its code
//! back, whoever is still listening (a claim whose outcome is unknown
//! leaves its code to the store, which settles it once it can tell; a code
//! another node took was never this node's to give back).

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use arc_swap::ArcSwap;

use crate::{
    auth::{claim_token::pow_ok, ClaimTokenError, ClaimTokens, Guard},
    catalog::{Activity, Catalog, Status, TicketType},
    clock::now_ms,
    config::Config,
    inventory::{CodeIdx, CodePool, Inventory, Ledger, Reservation, Stock},
    metrics,
    store::{Store, StoreError, UserClaims},
    vocab::{Claim, ClaimOutcome, Claimed, CommitOutcome, CommitReply, PendingClaim, Rejection},
};

/// How often a claim whose code turned out to be another node's is retried
/// with another code before it is answered STOCK_IN_FLIGHT (503: whether
/// codes are left is for a fresh look to say, not this one).
const CODE_TAKEN_RETRIES: usize = 4;

/// A claim request after authentication and parsing.
#[derive(Debug)]
pub struct ClaimRequest<'a> {
    /// The user.
    pub user_id: u64,
    /// When the user's account was made, as the session says (`None`:
    /// a session token from before tokens carried it).
    pub account_created_ms: Option<i64>,
    /// `actId`.
    pub activity_id: &'a str,
    /// `ticketId`; `None` means any ticket type with stock.
    pub ticket_id: Option<&'a str>,
    /// The `Idempotency-Key` header.
    pub idempotency_key: Option<Arc<str>>,
    /// The `claimToken` from `/act/detail`.
    pub claim_token: Option<&'a str>,
    /// The proof-of-work nonce, for activities with `pow_difficulty`.
    pub pow_nonce: Option<&'a str>,
}

/// Makes claim decisions against the current catalog.
pub struct Claimer {
    store: Arc<Store>,
    inventory: Arc<Inventory>,
    /// For the user's budget of reads of a shared store.
    guard: Arc<Guard>,
    tokens: ClaimTokens,
    settings: ArcSwap<ClaimSettings>,
    in_flight: AtomicUsize,
}

/// The reloadable knobs of the claim decision.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimSettings {
    /// `limits.max_in_flight_claims`.
    pub max_in_flight: usize,
    /// `limits.max_in_flight_per_activity`.
    pub max_in_flight_per_activity: usize,
    /// `security.require_claim_token`.
    pub require_claim_token: bool,
    /// `security.claim_token_ttl` in ms.
    pub claim_token_ttl_ms: i64,
}

impl ClaimSettings {
    /// The settings in `config`.
    pub fn from_config(config: &Config) -> ClaimSettings {
        ClaimSettings {
            max_in_flight: config.limits.max_in_flight_claims,
            max_in_flight_per_activity: config.limits.max_in_flight_per_activity,
            require_claim_token: config.security.require_claim_token,
            claim_token_ttl_ms: i64::try_from(config.security.claim_token_ttl.0.as_millis()).unwrap_or(i64::MAX),
        }
    }
}

/// What `ledger` says of a request with `key`: its claim again, or
/// IN_PROGRESS while that claim is being committed; `None` when it knows no
/// claim with the key (or there is no key). Read-only.
fn keyed(ledger: &Ledger, user: u64, key: Option<&str>) -> Option<Result<Claimed, Rejection>> {
    ledger.peek(user, u32::MAX, Some(key?)).and_then(answer_of)
}

/// What the ledger says of `req` without a code: its claim again (a key it
/// holds), IN_PROGRESS, or LIMIT_REACHED; `None` if it may claim. Read-only.
fn peeked(activity: &Activity, req: &ClaimRequest<'_>) -> Option<Result<Claimed, Rejection>> {
    activity
        .ledger
        .peek(req.user_id, activity.per_user_limit, req.idempotency_key.as_deref())
        .and_then(answer_of)
}

/// A reservation the ledger refused or answered, as the claim's answer;
/// `None` for one it would make.
fn answer_of(r: Reservation) -> Option<Result<Claimed, Rejection>> {
    match r {
        Reservation::Replay(claim) => Some(Ok(Claimed { claim, replayed: true })),
        Reservation::InProgress => Some(Err(Rejection::InProgress)),
        Reservation::LimitReached(codes) => Some(Err(Rejection::LimitReached(codes))),
        Reservation::Reserved => None,
    }
}

/// Decrements an in-flight count when the request finishes or is dropped.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    /// Counts one more; `None` (and no count) when `limit` was reached.
    fn enter(counter: &'a AtomicUsize, limit: usize) -> Option<InFlight<'a>> {
        let guard = InFlight(counter);
        (counter.fetch_add(1, Ordering::Relaxed) < limit).then_some(guard)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Claimer {
    /// A claimer taking codes from `inventory`, committing to `store`,
    /// checking claim tokens with `tokens`.
    pub fn new(
        store: Arc<Store>,
        inventory: Arc<Inventory>,
        guard: Arc<Guard>,
        tokens: ClaimTokens,
        settings: ClaimSettings,
    ) -> Claimer {
        Claimer {
            store,
            inventory,
            guard,
            tokens,
            settings: ArcSwap::from_pointee(settings),
            in_flight: AtomicUsize::new(0),
        }
    }

    /// Applies reloaded settings.
    pub fn apply(&self, settings: ClaimSettings) {
        self.settings.store(Arc::new(settings));
    }

    /// A claim token for `user_id` in `activity`, if it is open now. In a
    /// queue or lottery it is the pass, and only for a fan admitted by the
    /// waiting room; it expires with the pass.
    pub fn claim_token(&self, user_id: u64, activity: &Activity, now: i64) -> Option<String> {
        if activity.status(now) != Status::Open {
            return None;
        }
        if let Some(room) = &activity.room {
            let expires = room.pass_of(user_id, now)?;
            return Some(
                self.tokens
                    .issue_pass(user_id, &activity.id, activity.start_ms, expires),
            );
        }
        let expires = now.saturating_add(self.settings.load().claim_token_ttl_ms);
        Some(self.tokens.issue(user_id, &activity.id, activity.start_ms, expires))
    }

    /// Claims currently being decided or committed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// What is left of `activity` (see [`Inventory::stock`]).
    pub fn stock(&self, activity: &Activity) -> Stock {
        self.inventory
            .stock(activity.tickets.iter().map(|t| (&*t.id, &*t.pool)), &activity.ledger)
    }

    /// Every claim `user` holds, in the catalog's activities and in those
    /// taken off sale: what the store sees when it sees every node's claims
    /// (a cluster), this node's ledgers otherwise.
    pub async fn claims_of_user(&self, catalog: &Catalog, user: u64) -> Result<UserClaims, StoreError> {
        let activities: Vec<Arc<str>> = catalog.activities().iter().map(|a| a.id.clone()).collect();
        match self.store.every_claim_of_user(user, &activities).await {
            Some(claims) => claims,
            None => Ok(UserClaims {
                claims: self.inventory.claims_of_user(user),
                complete: true,
            }),
        }
    }

    /// A claim this request would be refused — but the claim with its
    /// Idempotency-Key may have been made through another node (or before a
    /// restart that this node's ledger does not remember, or answered
    /// OUTCOME_UNKNOWN and kept): then the store has it and the retry gets
    /// its code. Only a claim that carries a key in a shared
    /// store pays for the look-up, and only the caller's own claims are
    /// searched. `Ok(None)` when there is no such claim.
    async fn replay_from_store(
        &self,
        activity: &Activity,
        user: u64,
        key: Option<&str>,
    ) -> Result<Option<Claimed>, Rejection> {
        let Some(key) = key else {
            return Ok(None);
        };
        if !self.store.shared_with_nodes() {
            return Ok(None);
        }
        let activities = [activity.id.clone()];
        let keyed = |claims: Vec<Claim>| {
            claims
                .into_iter()
                .find(|c| c.activity_id == activity.id && c.idempotency_key.as_deref() == Some(key))
        };
        let unavailable = |e: StoreError| {
            tracing::warn!(error = %e, "Could not look a retry up in the store.");
            Rejection::Unavailable
        };
        // Read as the master has it; only a claim found there is read again
        // confirmed by the replicas before it is answered (a look-up that
        // finds nothing, as most do once a sale sold out, waits for none).
        let found = match self.store.claims_of_user(user, &activities).await {
            Some(claims) => keyed(claims.map_err(unavailable)?),
            None => return Ok(None),
        };
        if found.is_none() {
            return Ok(None);
        }
        let confirmed = match self.store.confirmed_claims_of_user(user, &activities).await {
            Some(claims) => keyed(claims.map_err(unavailable)?),
            None => found,
        };
        Ok(confirmed.map(|claim| Claimed { claim, replayed: true }))
    }

    /// What a claim that found no code in `tickets` hears. SOLD_OUT is
    /// final — a client (the fans' page included) stops at 410 — so it is
    /// said only when no code can come back: none is being committed here (a
    /// failed commit puts its code back), none is in doubt, and in a cluster
    /// none is left on a master list or in any node's lease, a dead node's
    /// included (the cluster-wide counts, as of the last look: they only
    /// ever overstate what is left). Otherwise the answer is the retryable
    /// STOCK_IN_FLIGHT, NOT_IMPORTED when only an import can bring a code
    /// (a ticket type asked for has no code at all in Redis, the others
    /// none left), or STORE_UNAVAILABLE while a cluster's Redis is
    /// unreachable.
    fn no_code(&self, tickets: &[TicketType], one_ticket_type: bool) -> Rejection {
        // The pools first: a commit that ended in doubt marked the store
        // before it ended, so once its end is seen here, so is the doubt.
        let settling = tickets.iter().any(|t| !t.pool.drained());
        if self.store.has_unsettled_doubts() {
            return Rejection::Unavailable;
        }
        if settling || self.inventory.unsold_elsewhere(tickets.iter().map(|t| &*t.id)) {
            // Codes may come back, but with Redis unreachable no lease can
            // bring them: the store is what is missing, and says so (as a
            // claim with a code in the pool hears from its commit). A sell-out
            // already known stays final below.
            if self.inventory.leases_unreachable() {
                Rejection::Unavailable
            } else if self.inventory.not_imported(tickets.iter().map(|t| &*t.id)) {
                Rejection::NotImported
            } else {
                Rejection::StockInFlight
            }
        } else {
            Rejection::SoldOut { one_ticket_type }
        }
    }

    /// [`replay_from_store`](Self::replay_from_store) within the user's
    /// budget of store reads, else [`no_code`](Self::no_code). Past the
    /// budget a keyed claim after the sell-out hears what an unkeyed one
    /// does: each look-up is a script on the Redis every node commits
    /// through, and a flood of keyed claims after the sell-out made one
    /// each. With Redis out of reach it hears STORE_UNAVAILABLE, to retry.
    async fn replay_or_no_code(
        &self,
        activity: &Activity,
        tickets: &[TicketType],
        one_ticket_type: bool,
        user: u64,
        key: Option<&str>,
    ) -> Result<Claimed, Rejection> {
        let stored = match key {
            // Redis away: the claim this key names may be there, and a final
            // SOLD_OUT would hide it from the fan whose answer was lost.
            Some(_) if self.store.shared_with_nodes() && !self.store.reachable() => {
                return Err(Rejection::Unavailable);
            }
            Some(_) if self.may_read_store(user) => self.replay_from_store(activity, user, key).await?,
            _ => None,
        };
        match stored {
            Some(claimed) => Ok(claimed),
            None => match self.no_code(tickets, one_ticket_type) {
                // SOLD_OUT is final. The claim with this key may have ended
                // its commit since the ledger was read: a pool's code counts
                // as committed only after the ledger holds the claim, so one
                // more look sees it.
                sold_out @ Rejection::SoldOut { .. } => match keyed(&activity.ledger, user, key) {
                    Some(Ok(claimed)) => Ok(claimed),
                    _ => Err(sold_out),
                },
                other => Err(other),
            },
        }
    }

    /// Decides `req` against `catalog`, commits, and records the outcome in metrics.
    pub async fn claim(&self, catalog: &Catalog, req: ClaimRequest<'_>) -> Result<Claimed, Rejection> {
        let asked = req.ticket_id;
        // A key names one claim: its replay must be what this request asks
        // for, not quietly a code of another ticket type.
        let result = self.decide(catalog, req).await.and_then(|c| match asked {
            Some(ticket) if c.replayed && *c.claim.ticket_id != *ticket => Err(Rejection::KeyReused),
            _ => Ok(c),
        });
        metrics::global().claims.inc(ClaimOutcome::of(&result));
        result
    }

    async fn decide(&self, catalog: &Catalog, req: ClaimRequest<'_>) -> Result<Claimed, Rejection> {
        let Some(activity) = catalog.activity(req.activity_id) else {
            // A reload may have taken the activity out after this key's
            // claim was made; the claim stands, and the ledger keeps it.
            let ledger = self.inventory.existing_ledger(req.activity_id);
            return ledger
                .and_then(|l| keyed(&l, req.user_id, req.idempotency_key.as_deref()))
                .unwrap_or(Err(Rejection::UnknownActivity));
        };
        // A retry of a claim already made gets that claim, whatever changed
        // since: paused, ended, a claim token gone stale. Its first answer may
        // have been lost; answering PAUSED now would hide a ticket the fan
        // holds, and a client that took that as final would try again with
        // a new key. (Read-only, and only for a request with a key.)
        // So does a retry of one still being committed: IN_PROGRESS, not
        // what a change since would say.
        if let Some(answer) = keyed(&activity.ledger, req.user_id, req.idempotency_key.as_deref()) {
            return answer;
        }
        let (user, key) = (req.user_id, req.idempotency_key.clone());
        match self.decide_anew(activity, req).await {
            // The ledger knows this node's claims since it started. A claim
            // made with this key through another node, or one answered
            // OUTCOME_UNKNOWN that was kept, is only in the store: a
            // refusal that only a change since its claim explains (paused,
            // ended, a lapsed token or pass) would hide it, so the store is
            // asked first — for a keyed request, on a shared store that is
            // up, within the user's budget of such reads.
            Err(refusal) if refusal.may_hide_a_claim() && key.is_some() && self.may_read_store(user) => {
                match self.replay_from_store(activity, user, key.as_deref()).await {
                    Ok(Some(claimed)) => Ok(claimed),
                    _ => Err(refusal),
                }
            }
            decided => decided,
        }
    }

    /// Whether a read of the shared store that something can do without
    /// (a refusal's look-up here, a detail's claims, a room's catch-up) is
    /// made for `user` now: only in a cluster, with Redis answering, and
    /// within the user's budget of such reads (each is a Redis script
    /// beside every node's commits). Takes from that budget.
    pub fn may_read_store(&self, user: u64) -> bool {
        self.store.shared_with_nodes()
            && self.store.reachable()
            && self.guard.admit_store_read(user, std::time::Instant::now()).is_ok()
    }

    /// [`decide`](Self::decide) for a request the ledger has no claim for.
    async fn decide_anew(&self, activity: &Activity, req: ClaimRequest<'_>) -> Result<Claimed, Rejection> {
        let mut now = now_ms();
        check_window(activity, now)?;
        activity.admits_account(req.account_created_ms)?;
        let settings = self.settings.load();
        let ticket = match req.ticket_id {
            Some(id) => Some(activity.ticket(id).ok_or(Rejection::UnknownTicket)?),
            None => None,
        };
        let tickets = ticket.map_or(&activity.tickets[..], std::slice::from_ref);
        // A sell-out of one ticket type is not the activity's.
        let one_of_many = ticket.is_some() && activity.tickets.len() > 1;
        let mut in_stock = tickets.iter().any(|t| t.pool.remaining() > 0);
        if !in_stock && self.inventory.lease_would_wait(tickets.iter().map(|t| &*t.id)) {
            // A lease is made for this claim only if it could take a code:
            // one refused anyway (no claim token, a user at the limit) made
            // an idle node lease codes, give them back two seconds later and
            // lease them again at the next such claim, each lease a copy of
            // the codes in the pool's arena, which never shrinks. Judged as
            // of before the wait (the token first, as with codes in stock),
            // and the token again below, as of after it.
            self.check_tokens(activity, &req, settings.require_claim_token, now)?;
            if let Some(answer) = peeked(activity, &req) {
                return answer;
            }
        }
        if !in_stock {
            // With leases, this node's codes are gone but a master list may
            // still have some; the lease worker fetches them while we wait.
            in_stock = self
                .inventory
                .wait_for_stock(tickets.iter().map(|t| (&*t.id, &*t.pool)))
                .await;
            // The wait (up to half a second) may have outlasted the sale or
            // the fan's pass: what follows is checked as of now. A pass
            // checked as of before could be spent after it lapsed, when the
            // admitter had already given its code to the next fan.
            now = now_ms();
            check_window(activity, now)?;
        }
        if !in_stock {
            // Sold out is answered from memory with read-only look-ups, so the
            // flood after the sell-out costs no allocation and no write lock
            // (but a keyed claim's take from its user's budget of store reads).
            if let Some(answer) = peeked(activity, &req) {
                return answer;
            }
            let key = req.idempotency_key.as_deref();
            return self
                .replay_or_no_code(activity, tickets, one_of_many, req.user_id, key)
                .await;
        }
        // Only a claim that could take a code pays for the token check.
        let pass_expires = self.check_tokens(activity, &req, settings.require_claim_token, now)?;
        let key = req.idempotency_key;

        let _global = InFlight::enter(&self.in_flight, settings.max_in_flight).ok_or(Rejection::Overloaded)?;
        let _local = InFlight::enter(&activity.ledger.in_flight, settings.max_in_flight_per_activity)
            .ok_or(Rejection::Overloaded)?;

        match activity
            .ledger
            .reserve(req.user_id, activity.per_user_limit, key.as_ref())
        {
            Reservation::Reserved => {}
            Reservation::Replay(claim) => return Ok(Claimed { claim, replayed: true }),
            Reservation::InProgress => return Err(Rejection::InProgress),
            Reservation::LimitReached(codes) => return Err(Rejection::LimitReached(codes)),
        }
        let Some((ticket, code_idx)) = take_code(tickets) else {
            activity.ledger.release(req.user_id, key.as_ref());
            return self
                .replay_or_no_code(activity, tickets, one_of_many, req.user_id, key.as_deref())
                .await;
        };
        let claim = Claim {
            id: 0,
            activity_id: activity.id.clone(),
            ticket_id: ticket.id.clone(),
            code: ticket.pool.code(code_idx),
            user_id: req.user_id,
            claimed_at_ms: now,
            idempotency_key: key,
        };
        let slot = Slot {
            pool: ticket.pool.clone(),
            code_idx,
            ledger: activity.ledger.clone(),
        };
        commit(&self.store, slot, claim, activity.per_user_limit, pass_expires).await
    }
}

/// A code taken and a user's slot reserved: what a commit must settle.
struct Slot {
    pool: Arc<CodePool>,
    code_idx: CodeIdx,
    ledger: Arc<Ledger>,
}

/// What to do after a store's answer.
enum Next {
    Done(Result<Claimed, Rejection>),
    /// The code was another node's: try again with this claim (a new code).
    Retry(Claim),
}

impl Slot {
    /// Applies the store's answer about `claim` to the code and the slot,
    /// and says what the user hears (or that another code is worth a try,
    /// when `may_retry`). Every answer but a retry ends the code's commit in
    /// its pool ([`CodePool::commit_ended`] or, when the code goes back,
    /// [`CodePool::commit_failed`]), so the pool can tell when it is sold
    /// out for good.
    fn settle(&mut self, mut claim: Claim, outcome: CommitOutcome, may_retry: bool) -> Next {
        let rejected = |slot: &Slot, claim: &Claim, put_back: bool| {
            if put_back {
                slot.pool.commit_failed(slot.code_idx);
            } else {
                slot.pool.commit_ended();
            }
            slot.ledger.release(claim.user_id, claim.idempotency_key.as_ref());
        };
        match outcome {
            CommitOutcome::Committed(id) => {
                claim.id = id;
                self.ledger.confirm(claim.clone());
                self.pool.commit_ended();
                Next::Done(Ok(Claimed { claim, replayed: false }))
            }
            CommitOutcome::Duplicate(existing) => {
                rejected(self, &claim, true);
                Next::Done(Ok(Claimed {
                    claim: existing,
                    replayed: true,
                }))
            }
            CommitOutcome::LimitReached(codes) => {
                rejected(self, &claim, true);
                Next::Done(Err(Rejection::LimitReached(codes)))
            }
            CommitOutcome::Lapsed => {
                rejected(self, &claim, true);
                Next::Done(Err(Rejection::QueuePassExpired))
            }
            CommitOutcome::PassRequired => {
                rejected(self, &claim, true);
                Next::Done(Err(Rejection::QueuePassRequired))
            }
            CommitOutcome::Failed(error) => {
                rejected(self, &claim, true);
                Next::Done(Err(error.into()))
            }
            CommitOutcome::InDoubt => {
                // The store settles this code once it can tell; it is not
                // ours to put back. (Embedded, it stays in doubt until the
                // restart, and the store says so: see `Claimer::no_code`.)
                rejected(self, &claim, false);
                Next::Done(Err(Rejection::OutcomeUnknown))
            }
            // The lost code is not put back: it is not this node's any more.
            // The next one keeps this slot's place among the committing.
            CommitOutcome::CodeTaken => match may_retry.then(|| self.pool.take()).flatten() {
                Some(idx) => {
                    self.code_idx = idx;
                    claim.code = self.pool.code(idx);
                    Next::Retry(claim)
                }
                None => {
                    rejected(self, &claim, false);
                    // Not SOLD_OUT: which codes are left is for a fresh
                    // look (`Claimer::no_code`) to say, at the retry.
                    Next::Done(Err(Rejection::StockInFlight))
                }
            },
        }
    }
}

/// Holds a slot while its commit is in the store. Dropped before the answer
/// came (the client hung up), it settles the slot when the answer comes —
/// and one always comes, since a [`PendingClaim`] answers even when dropped.
struct Settle {
    slot: Option<Slot>,
    reply: Option<CommitReply>,
}

impl Drop for Settle {
    fn drop(&mut self) {
        let (Some(mut slot), Some(mut reply)) = (self.slot.take(), self.reply.take()) else {
            return;
        };
        if let Ok((claim, outcome)) = reply.try_recv() {
            slot.settle(claim, outcome, false);
        } else if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Ok((claim, outcome)) = reply.await {
                    slot.settle(claim, outcome, false);
                }
            });
        }
        // Without a runtime the process is ending: a durable claim is in
        // the store and comes back with the next start.
    }
}

/// Commits `claim` (made under `limit`, with a pass that expires at
/// `pass_expires`) and settles `slot` with the answer, trying another code
/// when the store says this one is another node's.
async fn commit(
    store: &Store,
    slot: Slot,
    mut claim: Claim,
    limit: u32,
    pass_expires: Option<i64>,
) -> Result<Claimed, Rejection> {
    let mut guard = Settle {
        slot: Some(slot),
        reply: None,
    };
    for round in 0..=CODE_TAKEN_RETRIES {
        let (pending, reply) = PendingClaim::new(claim, limit);
        store.commit(pending.until(pass_expires));
        let reply = guard.reply.insert(reply);
        let Ok((returned, outcome)) = reply.await else {
            // Unreachable: a pending claim answers even when dropped.
            return Err(Rejection::Unavailable);
        };
        guard.reply = None;
        let slot = guard.slot.as_mut().expect("held until settled");
        match slot.settle(returned, outcome, round < CODE_TAKEN_RETRIES) {
            Next::Done(result) => {
                guard.slot = None;
                return result;
            }
            Next::Retry(next) => claim = next,
        }
    }
    unreachable!("the last round never retries")
}

impl Claimer {
    /// The claim token (bound to user, activity and start) and the proof of
    /// work. For a waiting room's activity, returns when the pass expires.
    fn check_tokens(
        &self,
        activity: &Activity,
        req: &ClaimRequest<'_>,
        required: bool,
        now: i64,
    ) -> Result<Option<i64>, Rejection> {
        if let Some(room) = &activity.room {
            // A waiting room's activity takes its pass, whatever the node's
            // claim-token setting: the pass is the whole point of the room.
            let token = req.claim_token.ok_or(Rejection::QueuePassRequired)?;
            let expires = self
                .tokens
                .verify_pass(token, req.user_id, &activity.id, activity.start_ms, now)
                .map_err(|e| match e {
                    ClaimTokenError::Invalid => Rejection::QueuePassRequired,
                    // The pass may have lapsed during a pause whose resume
                    // (which gives it its time back) the room has not logged.
                    ClaimTokenError::Expired if room.log_paused() => Rejection::Paused,
                    ClaimTokenError::Expired => Rejection::QueuePassExpired,
                })?;
            return check_pow(activity, token, req.pow_nonce).map(|()| Some(expires));
        }
        let token = match req.claim_token {
            Some(t) => t,
            None if required || activity.pow_difficulty > 0 => return Err(Rejection::ClaimTokenRequired),
            None => return Ok(None),
        };
        self.tokens
            .verify(token, req.user_id, &activity.id, activity.start_ms, now)
            .map_err(|e| match e {
                ClaimTokenError::Invalid => Rejection::ClaimTokenInvalid,
                ClaimTokenError::Expired => Rejection::ClaimTokenExpired,
            })?;
        check_pow(activity, token, req.pow_nonce).map(|()| None)
    }
}

/// The proof of work over `token`, for activities that ask for one.
fn check_pow(activity: &Activity, token: &str, nonce: Option<&str>) -> Result<(), Rejection> {
    if activity.pow_difficulty > 0 && !nonce.is_some_and(|n| pow_ok(token, n, activity.pow_difficulty)) {
        return Err(Rejection::ProofOfWork {
            difficulty: activity.pow_difficulty,
        });
    }
    Ok(())
}

fn check_window(activity: &Activity, now: i64) -> Result<(), Rejection> {
    if activity.paused {
        return Err(Rejection::Paused);
    }
    let (start_ms, end_ms) = (activity.start_ms, activity.end_ms);
    if now < start_ms {
        return Err(Rejection::NotStarted { start_ms, end_ms });
    }
    if now >= end_ms {
        return Err(Rejection::Ended { start_ms, end_ms });
    }
    Ok(())
}

/// Takes a code of the first of `tickets` with stock, to be committed.
fn take_code(tickets: &[TicketType]) -> Option<(&TicketType, CodeIdx)> {
    tickets
        .iter()
        .find_map(|t| t.pool.take_for_commit().map(|idx| (t, idx)))
}

#[cfg(test)]
mod tests {
    use std::{path::Path, time::Duration};

    use super::*;
    use crate::{store::Access, worker::Runner};

    /// A claimer on a real embedded store in `dir`, selling `codes` of one
    /// ticket type; the activity's window and limit as given.
    struct Fixture {
        claimer: Claimer,
        catalog: Catalog,
        runner: Runner,
        tokens: ClaimTokens,
    }

    fn fixture(dir: &Path, codes: &[&str], limit: u32, window: (&str, &str), extra: &str) -> Fixture {
        let text = format!(
            r#"
[storage]
path = "{}"
[journal]
fsync = "never"
[security]
require_claim_token = false
[[activity]]
id = "a"
name = "A"
start_time = "{}"
end_time = "{}"
per_user_limit = {limit}
{extra}
  [[activity.ticket]]
  id = "t"
  name = "T"
  codes = [{}]
"#,
            dir.display(),
            window.0,
            window.1,
            codes.iter().map(|c| format!("\"{c}\"")).collect::<Vec<_>>().join(", ")
        );
        let config = Config::from_toml(&text, Path::new("test.toml"), dir.to_owned()).unwrap();
        let runner = Runner::new();
        let store = Store::open(&config, Access::Serve(&runner)).unwrap();
        let now = now_ms();
        store.serve_import(&config, now, crate::store::Importer::Start).unwrap();
        let inventory = Arc::new(Inventory::default());
        let catalog = Catalog::build(
            &config,
            now,
            &inventory,
            &crate::admission::Rooms::new(std::path::Path::new("unused")),
        )
        .unwrap();
        inventory.pool("t").add_codes(&store.unclaimed_codes("t").unwrap());
        let claimer = Claimer::new(
            store,
            inventory,
            Arc::new(Guard::new(&config, Default::default())),
            ClaimTokens::new(b"a test secret of at least 32 bytes!", None),
            ClaimSettings::from_config(&config),
        );
        Fixture {
            claimer,
            catalog,
            runner,
            tokens: ClaimTokens::new(b"a test secret of at least 32 bytes!", None),
        }
    }

    fn req(user: u64, key: Option<&str>) -> ClaimRequest<'static> {
        ClaimRequest {
            user_id: user,
            account_created_ms: Some(0),
            activity_id: "a",
            ticket_id: None,
            idempotency_key: key.map(Arc::from),
            claim_token: None,
            pow_nonce: None,
        }
    }

    async fn stop(f: &Fixture) {
        f.runner.stop(&["journal-writer", "store-applier"]).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn codes_go_once_each_then_the_activity_is_sold_out() {
        let dir = tempfile::tempdir().unwrap();
        let f = fixture(dir.path(), &["C1", "C2"], 1, ("-1m", "+1h"), "");
        let mut unknown = req(1, None);
        unknown.ticket_id = Some("zzz");
        assert_eq!(
            f.claimer.claim(&f.catalog, unknown).await.unwrap_err(),
            Rejection::UnknownTicket
        );
        let mut codes = Vec::new();
        for user in 1..=2 {
            let c = f.claimer.claim(&f.catalog, req(user, None)).await.unwrap();
            assert!(!c.replayed && c.claim.id > 0);
            codes.push(c.claim.code.to_string());
        }
        codes.sort();
        assert_eq!(codes, ["C1", "C2"]);
        assert_eq!(
            f.claimer.claim(&f.catalog, req(3, None)).await.unwrap_err(),
            Rejection::SoldOut { one_ticket_type: false }
        );
        let stock = f.claimer.stock(f.catalog.activity("a").unwrap());
        assert_eq!(
            (stock.remaining, stock.claimed, stock.tickets.clone()),
            (0, 2, vec![(2, 0)])
        );
        stop(&f).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_user_at_the_limit_is_told_their_codes_and_a_key_replays() {
        let dir = tempfile::tempdir().unwrap();
        let f = fixture(dir.path(), &["C1", "C2", "C3"], 1, ("-1m", "+1h"), "");
        let first = f.claimer.claim(&f.catalog, req(7, Some("k"))).await.unwrap();
        let again = f.claimer.claim(&f.catalog, req(7, Some("k"))).await.unwrap();
        assert!(again.replayed);
        assert_eq!(again.claim, first.claim);
        match f.claimer.claim(&f.catalog, req(7, Some("other"))).await.unwrap_err() {
            Rejection::LimitReached(codes) => assert_eq!(codes, vec![first.claim.code.clone()]),
            other => panic!("{other:?}"),
        }
        // Fifty more claims of the user at the limit, polled together: none
        // passes and none keeps a code.
        let results = futures_util::future::join_all((0..50).map(|_| f.claimer.claim(&f.catalog, req(7, None)))).await;
        assert!(results.iter().all(|r| matches!(r, Err(Rejection::LimitReached(_)))));
        let remaining = f.claimer.stock(f.catalog.activity("a").unwrap()).remaining;
        assert_eq!(remaining, 2, "refused claims give their codes back");
        stop(&f).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_window_pause_and_ids_are_checked_before_any_code_moves() {
        let dir = tempfile::tempdir().unwrap();
        let f = fixture(dir.path(), &["C1"], 1, ("+1h", "+2h"), "");
        assert!(matches!(
            f.claimer.claim(&f.catalog, req(1, None)).await,
            Err(Rejection::NotStarted { .. })
        ));
        let mut unknown = req(1, None);
        unknown.activity_id = "nope";
        assert_eq!(
            f.claimer.claim(&f.catalog, unknown).await.unwrap_err(),
            Rejection::UnknownActivity
        );
        stop(&f).await;
        let dir = tempfile::tempdir().unwrap();
        let f = fixture(dir.path(), &["C1"], 1, ("-1m", "+1h"), "paused = true");
        assert_eq!(
            f.claimer.claim(&f.catalog, req(1, None)).await.unwrap_err(),
            Rejection::Paused
        );
        assert_eq!(
            f.claimer.stock(f.catalog.activity("a").unwrap()).remaining,
            1,
            "no code moved"
        );
        stop(&f).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn proof_of_work_needs_a_token_and_a_nonce() {
        let dir = tempfile::tempdir().unwrap();
        let f = fixture(dir.path(), &["C1"], 1, ("-1m", "+1h"), "pow_difficulty = 4");
        assert_eq!(
            f.claimer.claim(&f.catalog, req(1, None)).await.unwrap_err(),
            Rejection::ClaimTokenRequired
        );
        let activity = f.catalog.activity("a").unwrap();
        let token = f.claimer.claim_token(1, activity, now_ms()).unwrap();
        let mut with_token = req(1, None);
        with_token.claim_token = Some(&token);
        assert_eq!(
            f.claimer.claim(&f.catalog, with_token).await.unwrap_err(),
            Rejection::ProofOfWork { difficulty: 4 }
        );
        let forged = f.tokens.issue(2, "a", activity.start_ms, now_ms() + 60_000);
        let mut other_user = req(1, None);
        other_user.claim_token = Some(&forged);
        assert_eq!(
            f.claimer.claim(&f.catalog, other_user).await.unwrap_err(),
            Rejection::ClaimTokenInvalid
        );
        let nonce = crate::auth::claim_token::solve_pow(&token, 4);
        let mut solved = req(1, None);
        solved.claim_token = Some(&token);
        solved.pow_nonce = Some(&nonce);
        assert_eq!(&*f.claimer.claim(&f.catalog, solved).await.unwrap().claim.code, "C1");
        stop(&f).await;
    }

    /// What `decide` holds while the store works: a reserved slot and a taken code.
    fn reserved(user: u64) -> (Slot, Claim) {
        let pool = Arc::new(CodePool::new());
        pool.add_codes(&["C1"]);
        let code_idx = pool.take_for_commit().unwrap();
        let ledger = Arc::new(Ledger::default());
        assert!(matches!(ledger.reserve(user, 1, None), Reservation::Reserved));
        let claim = Claim {
            id: 0,
            activity_id: "a".into(),
            ticket_id: "t".into(),
            code: pool.code(code_idx),
            user_id: user,
            claimed_at_ms: 1,
            idempotency_key: None,
        };
        let slot = Slot { pool, code_idx, ledger };
        (slot, claim)
    }

    async fn eventually(what: &str, done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_whose_client_hung_up_is_still_settled() {
        // The request future is dropped while the store works (hyper drops
        // it when the client goes away); the store answers afterwards.
        let (slot, claim) = reserved(1);
        let (pool, ledger) = (slot.pool.clone(), slot.ledger.clone());
        let (pending, reply) = PendingClaim::new(claim, 1);
        drop(Settle {
            slot: Some(slot),
            reply: Some(reply),
        });
        pending.answer(CommitOutcome::Committed(42));
        eventually("the durable claim was never confirmed", || ledger.claimed() == 1).await;
        assert_eq!(ledger.claims_of(1)[0].id, 42);
        assert_eq!(pool.remaining(), 0, "a durable claim keeps its code");

        // A failure answered after the hang-up gives the code and the slot back.
        let (slot, claim) = reserved(2);
        let (pool, ledger) = (slot.pool.clone(), slot.ledger.clone());
        let (pending, reply) = PendingClaim::new(claim, 1);
        drop(Settle {
            slot: Some(slot),
            reply: Some(reply),
        });
        pending.answer(CommitOutcome::Failed(crate::vocab::CommitError::Overloaded));
        eventually("the failed claim's code never came back", || pool.remaining() == 1).await;
        assert!(
            matches!(ledger.reserve(2, 1, None), Reservation::Reserved),
            "the slot was released"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_code_taken_by_another_node_is_swapped_and_an_unknown_outcome_keeps_the_code_out() {
        let (mut slot, claim) = reserved(1);
        slot.pool.add_codes(&["C2"]);
        match slot.settle(claim.clone(), CommitOutcome::CodeTaken, true) {
            Next::Retry(next) => assert_eq!(&*next.code, "C2"),
            Next::Done(r) => panic!("{r:?}"),
        }
        assert_eq!(slot.pool.remaining(), 0, "the lost code is not put back");
        // Out of retries: a retryable refusal (not SOLD_OUT: the pool still
        // has a code), slot released, and the pool's other codes stay where
        // they are.
        let (mut slot, claim) = reserved(1);
        slot.pool.add_codes(&["C3"]);
        assert!(matches!(
            slot.settle(claim.clone(), CommitOutcome::CodeTaken, false),
            Next::Done(Err(Rejection::StockInFlight))
        ));
        assert_eq!(
            slot.pool.remaining(),
            1,
            "no code is taken for a retry that does not happen"
        );
        assert!(matches!(slot.ledger.reserve(1, 1, None), Reservation::Reserved));
        // Out of codes: the same, and the lost code no longer counts as
        // being committed here.
        let (mut slot, claim) = reserved(1);
        assert!(matches!(
            slot.settle(claim.clone(), CommitOutcome::CodeTaken, true),
            Next::Done(Err(Rejection::StockInFlight))
        ));
        assert!(slot.pool.drained());
        // In doubt: the store settles the code later; it must not come back here.
        let (mut slot, claim) = reserved(1);
        assert!(matches!(
            slot.settle(claim, CommitOutcome::InDoubt, true),
            Next::Done(Err(Rejection::OutcomeUnknown))
        ));
        assert_eq!(slot.pool.remaining(), 0);
        assert!(matches!(slot.ledger.reserve(1, 1, None), Reservation::Reserved));
    }
}
