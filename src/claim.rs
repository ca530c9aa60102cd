//! The claim decision: may this user have a code of this activity now, and
//! which one?
//!
//! The order of checks is the order of cost. Everything before the commit is
//! in memory and lock-free or shard-locked for a few instructions:
//!
//! 1. the activity in the catalog snapshot (404), paused (409), the sale
//!    window (409 NOT_STARTED / ENDED); when every pool is empty, SOLD_OUT
//!    (or the caller's own LIMIT_REACHED / idempotent replay) at once — in
//!    cluster mode only once the master lists are empty too (while they are
//!    not, the claim waits briefly for the node to lease more);
//! 2. the claim token and proof of work (403);
//! 3. in-flight budgets, global and per activity (503, so a burst cannot
//!    queue without bound);
//! 4. the user's slot in the activity's [`Ledger`]: an idempotency key that
//!    already has a claim is answered again; a user at the limit is refused
//!    with their codes (409 LIMIT_REACHED);
//! 5. a code from the ticket's [`CodePool`] (410 SOLD_OUT if the last one
//!    went to someone else a moment ago);
//! 6. the commit: the claim goes to the store ([`Store::commit`]: the local
//!    journal, or in cluster mode the Redis commit script, which also
//!    enforces the per-user limit across nodes), which makes it durable and
//!    *settles* it — confirming it in the ledger, or on
//!    failure putting the code back and releasing the slot. Settlement runs
//!    in the committer, not in the request, so a client that hangs up while
//!    waiting can never leave a durable claim unrecorded or a code lost.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use arc_swap::ArcSwap;
use tokio::sync::oneshot;

use crate::{
    auth::{claim_token::pow_ok, ClaimTokenError, ClaimTokens},
    catalog::{Activity, Catalog, Status, TicketType},
    config::{now_ms, Config},
    inventory::{CodeIdx, CodePool, Ledger, Reservation},
    journal,
    metrics::{self, ClaimOutcome},
    store::Store,
};

/// A code given to a user: durable once it has an id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The claim id (the journal sequence number); 0 until committed.
    pub id: u64,
    /// The activity.
    pub activity_id: Arc<str>,
    /// The ticket type.
    pub ticket_id: Arc<str>,
    /// The redeemable code.
    pub code: Arc<str>,
    /// The user who holds it.
    pub user_id: u64,
    /// When it was claimed, Unix milliseconds.
    pub claimed_at_ms: i64,
    /// The `Idempotency-Key` the claim was made with, if any.
    pub idempotency_key: Option<Arc<str>>,
}

/// Why a commit did not make a claim durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    /// The commit queue is full.
    #[error("the claim queue is full")]
    Overloaded,
    /// The journal or store cannot take writes.
    #[error("claims cannot be stored right now")]
    Unavailable,
    /// Cluster mode: this node's MongoDB backlog is full.
    #[error("the backlog of claims waiting for MongoDB is full")]
    BacklogFull,
    /// Cluster mode: the user reached the limit through other nodes.
    #[error("the user holds the limit already")]
    LimitReached,
}

/// A claim request after authentication and parsing.
#[derive(Debug)]
pub struct ClaimRequest<'a> {
    /// The user.
    pub user_id: u64,
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

/// A successful claim.
#[derive(Debug)]
pub struct Claimed {
    /// The claim.
    pub claim: Claim,
    /// True when this answers a retry with an already used idempotency key.
    pub replayed: bool,
}

/// Why a claim was refused. Each maps to one API error code.
#[derive(Debug, PartialEq, Eq)]
pub enum Rejection {
    /// No such activity.
    UnknownActivity,
    /// No such ticket type in this activity.
    UnknownTicket,
    /// The organiser paused the activity.
    Paused,
    /// Before the start; the start and end in Unix milliseconds.
    NotStarted {
        /// Start.
        start_ms: i64,
        /// End.
        end_ms: i64,
    },
    /// After the end.
    Ended {
        /// Start.
        start_ms: i64,
        /// End.
        end_ms: i64,
    },
    /// The user holds the limit already; their codes.
    LimitReached(Vec<Arc<str>>),
    /// A claim with the same idempotency key is being committed.
    InProgress,
    /// No stock left.
    SoldOut,
    /// Too many claims in flight or queued.
    Overloaded,
    /// The store cannot take claims.
    Unavailable,
    /// Cluster mode: too many claims are waiting for MongoDB on this node.
    BacklogFull,
    /// Claim tokens are required and none was sent.
    ClaimTokenRequired,
    /// The claim token is forged, or another user's or activity's.
    ClaimTokenInvalid,
    /// The claim token expired; fetch a new one.
    ClaimTokenExpired,
    /// The activity needs proof of work; the nonce is missing or wrong.
    ProofOfWork {
        /// Required leading zero bits.
        difficulty: u8,
    },
}

impl Rejection {
    /// The outcome this rejection is counted as.
    pub fn outcome(&self) -> ClaimOutcome {
        match self {
            Rejection::UnknownActivity | Rejection::UnknownTicket => ClaimOutcome::NotFound,
            Rejection::Paused => ClaimOutcome::Paused,
            Rejection::NotStarted { .. } => ClaimOutcome::NotStarted,
            Rejection::Ended { .. } => ClaimOutcome::Ended,
            Rejection::LimitReached(_) => ClaimOutcome::LimitReached,
            Rejection::InProgress => ClaimOutcome::InProgress,
            Rejection::SoldOut => ClaimOutcome::SoldOut,
            Rejection::Overloaded => ClaimOutcome::Overloaded,
            Rejection::Unavailable | Rejection::BacklogFull => ClaimOutcome::Unavailable,
            Rejection::ClaimTokenRequired | Rejection::ClaimTokenInvalid | Rejection::ClaimTokenExpired => {
                ClaimOutcome::BadClaimToken
            }
            Rejection::ProofOfWork { .. } => ClaimOutcome::BadProofOfWork,
        }
    }
}

/// A claim on its way to durability, holding what it needs to settle itself.
pub struct PendingClaim {
    claim: Claim,
    limit: u32,
    pool: Arc<CodePool>,
    code_idx: CodeIdx,
    ledger: Arc<Ledger>,
    reply: oneshot::Sender<Result<Claimed, Rejection>>,
}

impl PendingClaim {
    /// The activity's per-user limit when the claim was decided.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Replaces a code this node turned out not to own any more (its lease
    /// was reclaimed) with another from the same pool. The lost code is not
    /// put back. `false` when the pool is empty.
    pub fn retake(&mut self) -> bool {
        match self.pool.take() {
            Some(idx) => {
                self.code_idx = idx;
                self.claim.code = self.pool.code(idx);
                true
            }
            None => false,
        }
    }

    /// Another node already committed a claim with this idempotency key:
    /// answer that one, and give back the code and the slot.
    pub fn settle_replay(self, existing: Claim) {
        self.pool.put_back(self.code_idx);
        self.ledger
            .release(self.claim.user_id, self.claim.idempotency_key.as_ref());
        let _ = self.reply.send(Ok(Claimed {
            claim: existing,
            replayed: true,
        }));
    }

    /// The code's commit failed in a way that leaves its ownership unknown
    /// (the store may or may not have recorded it): answer `error`, release
    /// the slot, and hand the code to the caller instead of the pool.
    pub fn settle_in_doubt(self, error: CommitError) -> (Arc<CodePool>, CodeIdx) {
        self.ledger
            .release(self.claim.user_id, self.claim.idempotency_key.as_ref());
        let _ = self.reply.send(Err(rejection(error, &self.ledger, self.claim.user_id)));
        (self.pool, self.code_idx)
    }

    /// The pool ran dry while retaking: nothing to give back but the slot.
    pub fn settle_sold_out(self) {
        self.ledger
            .release(self.claim.user_id, self.claim.idempotency_key.as_ref());
        let _ = self.reply.send(Err(Rejection::SoldOut));
    }

    /// The store refused the claim with `rejection`: the code goes back to
    /// the pool and the slot is released.
    pub fn settle_rejected(self, rejection: Rejection) {
        self.pool.put_back(self.code_idx);
        self.ledger
            .release(self.claim.user_id, self.claim.idempotency_key.as_ref());
        let _ = self.reply.send(Err(rejection));
    }
}

fn rejection(error: CommitError, ledger: &Ledger, user: u64) -> Rejection {
    match error {
        CommitError::Overloaded => Rejection::Overloaded,
        CommitError::Unavailable => Rejection::Unavailable,
        CommitError::BacklogFull => Rejection::BacklogFull,
        CommitError::LimitReached => {
            Rejection::LimitReached(ledger.claims_of(user).into_iter().map(|c| c.code).collect())
        }
    }
}

impl journal::Entry for PendingClaim {
    fn claim(&self) -> &Claim {
        &self.claim
    }

    fn settle(self, result: Result<u64, CommitError>) {
        let PendingClaim {
            mut claim,
            limit: _,
            pool,
            code_idx,
            ledger,
            reply,
        } = self;
        let answer = match result {
            Ok(id) => {
                claim.id = id;
                ledger.confirm(claim.clone());
                Ok(Claimed { claim, replayed: false })
            }
            Err(e) => {
                pool.put_back(code_idx);
                ledger.release(claim.user_id, claim.idempotency_key.as_ref());
                Err(rejection(e, &ledger, claim.user_id))
            }
        };
        // The requester may have gone; the claim stands regardless.
        let _ = reply.send(answer);
    }
}

/// Makes claim decisions against the current catalog.
pub struct Claimer {
    store: Arc<Store>,
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
    /// A claimer committing to `store`, checking claim tokens with `tokens`.
    pub fn new(store: Arc<Store>, tokens: ClaimTokens, settings: ClaimSettings) -> Claimer {
        Claimer {
            store,
            tokens,
            settings: ArcSwap::from_pointee(settings),
            in_flight: AtomicUsize::new(0),
        }
    }

    /// Applies reloaded settings.
    pub fn apply(&self, settings: ClaimSettings) {
        self.settings.store(Arc::new(settings));
    }

    /// A claim token for `user_id` in `activity`, if it is open now.
    pub fn claim_token(&self, user_id: u64, activity: &Activity, now: i64) -> Option<String> {
        if activity.status(now) != Status::Open {
            return None;
        }
        let expires = now.saturating_add(self.settings.load().claim_token_ttl_ms);
        Some(self.tokens.issue(user_id, &activity.id, activity.start_ms, expires))
    }

    /// Claims currently being decided or committed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Decides `req` against `catalog`, commits, and records the outcome in metrics.
    pub async fn claim(&self, catalog: &Catalog, req: ClaimRequest<'_>) -> Result<Claimed, Rejection> {
        let result = self.decide(catalog, req).await;
        let outcome = match &result {
            Ok(c) if c.replayed => ClaimOutcome::Replayed,
            Ok(_) => ClaimOutcome::Success,
            Err(r) => r.outcome(),
        };
        metrics::global().claims.inc(outcome);
        result
    }

    async fn decide(&self, catalog: &Catalog, req: ClaimRequest<'_>) -> Result<Claimed, Rejection> {
        let activity = catalog.activity(req.activity_id).ok_or(Rejection::UnknownActivity)?;
        let now = now_ms();
        check_window(activity, now)?;
        let settings = self.settings.load();
        let ticket = match req.ticket_id {
            Some(id) => Some(activity.ticket(id).ok_or(Rejection::UnknownTicket)?),
            None => None,
        };
        let mut in_stock = match ticket {
            Some(t) => t.pool.remaining() > 0,
            None => activity.tickets.iter().any(|t| t.pool.remaining() > 0),
        };
        if !in_stock {
            // Cluster: this node's leased codes are gone, but the master list
            // may still have some; the lease loop fetches them while we wait.
            let tickets = ticket.map_or(&activity.tickets[..], std::slice::from_ref);
            in_stock = self.store.wait_for_stock(tickets).await;
        }
        if !in_stock {
            // Sold out is answered from memory with read-only look-ups, so the
            // flood after the sell-out costs no allocation and no write lock.
            return match activity
                .ledger
                .peek(req.user_id, activity.per_user_limit, req.idempotency_key.as_deref())
            {
                Some(Reservation::Replay(claim)) => Ok(Claimed { claim, replayed: true }),
                Some(Reservation::LimitReached(codes)) => Err(Rejection::LimitReached(codes)),
                _ => Err(Rejection::SoldOut),
            };
        }
        // Only a claim that could take a code pays for the token check.
        self.check_tokens(activity, &req, settings.require_claim_token, now)?;
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
        let Some((ticket, code_idx)) = take_code(activity, ticket) else {
            activity.ledger.release(req.user_id, key.as_ref());
            return Err(Rejection::SoldOut);
        };

        let (reply, answer) = oneshot::channel();
        self.store.commit(PendingClaim {
            claim: Claim {
                id: 0,
                activity_id: activity.id.clone(),
                ticket_id: ticket.id.clone(),
                code: ticket.pool.code(code_idx),
                user_id: req.user_id,
                claimed_at_ms: now,
                idempotency_key: key,
            },
            limit: activity.per_user_limit,
            pool: ticket.pool.clone(),
            code_idx,
            ledger: activity.ledger.clone(),
            reply,
        });
        // The committer always settles; a dropped reply means it is gone.
        answer.await.unwrap_or(Err(Rejection::Unavailable))
    }
}

impl Claimer {
    /// The claim token (bound to user, activity and start) and the proof of work.
    fn check_tokens(
        &self,
        activity: &Activity,
        req: &ClaimRequest<'_>,
        required: bool,
        now: i64,
    ) -> Result<(), Rejection> {
        let token = match req.claim_token {
            Some(t) => t,
            None if required || activity.pow_difficulty > 0 => return Err(Rejection::ClaimTokenRequired),
            None => return Ok(()),
        };
        self.tokens
            .verify(token, req.user_id, &activity.id, activity.start_ms, now)
            .map_err(|e| match e {
                ClaimTokenError::Invalid => Rejection::ClaimTokenInvalid,
                ClaimTokenError::Expired => Rejection::ClaimTokenExpired,
            })?;
        if activity.pow_difficulty > 0 {
            let solved = req.pow_nonce.is_some_and(|n| pow_ok(token, n, activity.pow_difficulty));
            if !solved {
                return Err(Rejection::ProofOfWork {
                    difficulty: activity.pow_difficulty,
                });
            }
        }
        Ok(())
    }
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

/// Takes a code of `ticket`, or of the first ticket type with stock.
fn take_code<'a>(activity: &'a Activity, ticket: Option<&'a TicketType>) -> Option<(&'a TicketType, CodeIdx)> {
    match ticket {
        Some(t) => t.pool.take().map(|idx| (t, idx)),
        None => activity.tickets.iter().find_map(|t| t.pool.take().map(|idx| (t, idx))),
    }
}
