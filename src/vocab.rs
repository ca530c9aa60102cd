//! The claim's vocabulary, shared by every layer: what a claim is, what the
//! store answers when asked to make one durable, why a claim is refused, and
//! how a claim request is counted.
//!
//! This module is the ground floor of the house: it imports nothing of the
//! node, so the claim decision, the inventory, the journal, the store and the
//! HTTP layer can all speak these words without importing one another.
//!
//! - [`Claim`]: a code given to a user ([`Claimed`]: the answer to a claim request);
//! - [`PendingClaim`]: a claim on its way to the store, which answers it with
//!   a [`CommitOutcome`] — in the store's own terms; a store answering many
//!   at once uses [`answer_all`], which delivers them to each claim's
//!   [`Home`] thread in one message;
//! - [`Rejection`]: why the claim decision refused a request (one per API
//!   error code; the HTTP layer maps it to a status);
//! - [`ClaimOutcome`]: the label a claim request is counted under in
//!   metrics, statistics and reports; [`client_key`]: the client it is
//!   counted for (the rate limits count the same way).

use std::{
    cell::Cell,
    net::{IpAddr, Ipv6Addr},
    sync::Arc,
};

use tokio::sync::{mpsc, oneshot};

/// The key a client's requests count under, in the rate limits and in the
/// rush statistics: the address, the IPv4 address of an IPv4-mapped IPv6
/// one, or the /64 of any other IPv6 address (one subscriber is handed a
/// /64; counting its 2^64 addresses apart would give it 2^64 budgets).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

/// How many /64s' worth of a per-address budget (registrations, login
/// failures at one account, a share of the password hashing) an IPv6 /48
/// gets: a site with a few networks is not held to one's budget, and one
/// holding 65,536 of them does not get 65,536 budgets.
pub const SITE_BUDGETS: u32 = 8;

/// The /48 of an IPv6 client (a site: what one customer is commonly given),
/// for the budgets a site's /64s share; `None` for IPv4 (and IPv4 mapped
/// into IPv6), whose address is the key already.
pub fn site_key(ip: IpAddr) -> Option<IpAddr> {
    match client_key(ip) {
        IpAddr::V4(_) => None,
        IpAddr::V6(v6) => Some(IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 80) - 1)))),
    }
}

/// Bidi controls, zero-width and other default-ignorable format characters:
/// they change how text *looks* without changing what it *is*. Refused in
/// usernames, nicknames and codes (a code that carries one is another code
/// than the one printed, and slips past the duplicate check).
pub fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'                      // soft hyphen
            | '\u{034F}'                // combining grapheme joiner
            | '\u{061C}'                // Arabic letter mark
            | '\u{115F}' | '\u{1160}'   // Hangul fillers
            | '\u{17B4}' | '\u{17B5}'
            | '\u{180B}'..='\u{180F}'   // Mongolian variation selectors, vowel separator
            | '\u{200B}'..='\u{200F}'   // zero-width space/joiners, LRM, RLM
            | '\u{202A}'..='\u{202E}'   // LRE, RLE, PDF, LRO, RLO
            | '\u{2028}' | '\u{2029}'   // line and paragraph separators (no control, yet they break lines)
            | '\u{2060}'..='\u{206F}'   // word joiner, invisible operators, LRI..PDI
            | '\u{2800}'                // braille pattern blank (a blank "letter", as the Hangul filler)
            | '\u{3164}'                // Hangul filler
            | '\u{FE00}'..='\u{FE0F}'   // variation selectors
            | '\u{FEFF}'                // BOM / zero-width no-break space
            | '\u{FFA0}'
            | '\u{FFF0}'..='\u{FFFB}'   // interlinear annotations
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E0FFF}' // tags, variation selectors supplement
    )
}

/// A code given to a user: durable once it has an id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The claim id (the journal sequence number, or the cluster's id); 0 until committed.
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

/// A successful claim.
#[derive(Debug)]
pub struct Claimed {
    /// The claim.
    pub claim: Claim,
    /// True when this answers a retry with an already used idempotency key.
    pub replayed: bool,
}

/// Why a store did not record a claim (and knows that it did not).
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
}

/// The store's answer for one claim it was asked to commit.
///
/// These are the store's terms, not the API's: the claim decision maps each
/// to a [`Rejection`] and to what happens to the code and the user's slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Durable, with this claim id.
    Committed(u64),
    /// A claim with the same idempotency key was committed before (through
    /// any node): that claim, and nothing new was recorded.
    Duplicate(Claim),
    /// The code is not this node's to give any more (its lease was
    /// reclaimed while the node was unreachable); nothing was recorded.
    CodeTaken,
    /// The user already holds the limit (counted across nodes); their codes.
    LimitReached(Vec<Arc<str>>),
    /// The claim's waiting-room pass had expired by the store's clock
    /// before the claim reached it ([`PendingClaim::valid_until`]); nothing
    /// was recorded.
    Lapsed,
    /// The activity has a waiting room that fans have joined (the store
    /// says so: in a cluster, another node's config may have made it a room
    /// while this node's makes it a race), and the claim carries no pass;
    /// nothing was recorded.
    PassRequired,
    /// Nothing was recorded.
    Failed(CommitError),
    /// The store lost contact mid-commit: the claim may or may not be
    /// recorded. The store settles the code itself once it can tell, so the
    /// code must not go back to the pool.
    InDoubt,
}

/// A claim handed to the store, with the channel its answer goes back on.
///
/// Every pending claim is answered exactly once: by the store
/// ([`PendingClaim::answer`]), or — if a store drops it unanswered (a worker
/// gone at shutdown) — by its own `Drop`, with [`CommitOutcome::InDoubt`],
/// since nobody can say whether it was recorded. The claim travels back with
/// the answer, so nothing is cloned on the way.
#[derive(Debug)]
pub struct PendingClaim {
    /// `None` only once answered (by value, so never observed).
    inner: Option<(Claim, oneshot::Sender<(Claim, CommitOutcome)>)>,
    limit: u32,
    valid_until: Option<i64>,
    /// The thread the claim was made on, if it is a [`Home`].
    home: Option<&'static Home>,
}

/// Answers for the claims made on one home thread, with their outcomes.
pub type Answers = Vec<(PendingClaim, CommitOutcome)>;

/// A thread that takes its claims' answers itself: a lane of the HTTP layer
/// (a single-threaded runtime), whose settler task reads [`Home::settle_here`]'s
/// channel and answers each claim there.
///
/// Why: a single-threaded tokio runtime writes its eventfd for every task
/// woken from another thread. The journal writer answering a group commit
/// of 17 claims made 17 such writes; through [`answer_all`] it sends each
/// home one message (one wake-up), and the claims' tasks are woken on their
/// own thread, where a wake is a queue push.
#[derive(Debug)]
pub struct Home(mpsc::UnboundedSender<Answers>);

thread_local! {
    static HOME: Cell<Option<&'static Home>> = const { Cell::new(None) };
}

impl Home {
    /// Makes the calling thread a home: claims made on it from now on are
    /// answered through the returned channel, which the thread must drain,
    /// passing each message to [`answer_each`]. (One small allocation per
    /// home, kept for the process's life: homes are a node's lanes.)
    pub fn settle_here() -> mpsc::UnboundedReceiver<Answers> {
        let (tx, rx) = mpsc::unbounded_channel();
        let home: &'static Home = Box::leak(Box::new(Home(tx)));
        HOME.with(|h| h.set(Some(home)));
        rx
    }
}

/// Answers each claim of `answers` (what a home's settler does with a message).
pub fn answer_each(answers: Answers) {
    answers
        .into_iter()
        .for_each(|(pending, outcome)| pending.answer(outcome));
}

/// Answers many claims: those with a [`Home`] in one message per home, the
/// rest at once. If a home has gone (its thread ended), its claims are
/// answered here instead.
pub fn answer_all(answers: impl IntoIterator<Item = (PendingClaim, CommitOutcome)>) {
    let mut by_home: Vec<(&'static Home, Answers)> = Vec::new();
    for (pending, outcome) in answers {
        let Some(home) = pending.home else {
            pending.answer(outcome);
            continue;
        };
        match by_home.iter_mut().find(|(h, _)| std::ptr::eq(*h, home)) {
            Some((_, answers)) => answers.push((pending, outcome)),
            None => by_home.push((home, vec![(pending, outcome)])),
        }
    }
    for (home, answers) in by_home {
        if let Err(gone) = home.0.send(answers) {
            answer_each(gone.0);
        }
    }
}

/// Where the store's answer to a [`PendingClaim`] arrives.
pub type CommitReply = oneshot::Receiver<(Claim, CommitOutcome)>;

impl PendingClaim {
    /// A claim for the store, decided under the per-user `limit`.
    pub fn new(claim: Claim, limit: u32) -> (PendingClaim, CommitReply) {
        let (reply, answer) = oneshot::channel();
        let pending = PendingClaim {
            inner: Some((claim, reply)),
            limit,
            valid_until: None,
            home: HOME.with(Cell::get),
        };
        (pending, answer)
    }

    /// The claim may be recorded only before `expires_ms` (Unix ms): the
    /// expiry of the waiting-room pass it was made with.
    pub fn until(mut self, expires_ms: Option<i64>) -> PendingClaim {
        self.valid_until = expires_ms;
        self
    }

    /// When the claim's pass expires, if it was made with one. A cluster's
    /// commit refuses it from then on, by Redis's clock
    /// ([`CommitOutcome::Lapsed`]): the room's admitter counts a pass
    /// that lapsed unused as giving its codes to the next in line, and a
    /// claim still on its way could otherwise take one of them. (The
    /// embedded store needs no check: a claim's code leaves the stock the
    /// admitter counts when the claim takes it, before its commit.)
    pub fn valid_until(&self) -> Option<i64> {
        self.valid_until
    }

    /// The claim to record.
    pub fn claim(&self) -> &Claim {
        &self
            .inner
            .as_ref()
            .expect("a pending claim is answered by value, once")
            .0
    }

    /// The activity's per-user limit when the claim was decided (the cluster
    /// store checks it again across nodes).
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Answers the claim. The requester may have gone; the answer is then
    /// settled without it (see the claim decision).
    pub fn answer(mut self, outcome: CommitOutcome) {
        self.send(outcome);
    }

    fn send(&mut self, outcome: CommitOutcome) {
        if let Some((claim, reply)) = self.inner.take() {
            let _ = reply.send((claim, outcome));
        }
    }
}

impl Drop for PendingClaim {
    fn drop(&mut self) {
        self.send(CommitOutcome::InDoubt);
    }
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
    /// The idempotency key names a claim of another ticket type than this
    /// request asks for.
    KeyReused,
    /// No stock left, for good: no code can come back. Of the one ticket
    /// type the claim named, or of the whole activity.
    SoldOut {
        /// The claim named a ticket type (others may still have codes).
        one_ticket_type: bool,
    },
    /// No code free now, but some may still come back: claims being
    /// committed (a failed one returns its code), or in a cluster codes on
    /// another node's lease (sold, given back idle, or reclaimed from a dead
    /// node). Retry shortly.
    StockInFlight,
    /// Cluster mode: Redis knows no code of the ticket type at all — the
    /// node's config names it, but nobody has run `ticketd import` with it
    /// yet. Not sold out: its codes are still to come.
    NotImported,
    /// Too many claims in flight or queued.
    Overloaded,
    /// The store cannot take claims.
    Unavailable,
    /// The store failed while this claim was being written: it may or may
    /// not have been kept. A retry with the same Idempotency-Key tells.
    OutcomeUnknown,
    /// Cluster mode: too many claims are waiting for MongoDB on this node.
    BacklogFull,
    /// Claim tokens are required and none was sent.
    ClaimTokenRequired,
    /// The claim token is forged, or another user's or activity's.
    ClaimTokenInvalid,
    /// The claim token expired; fetch a new one.
    ClaimTokenExpired,
    /// A queue or lottery activity: no pass, or not a valid one for this
    /// user and activity (the claim token of such an activity is its pass).
    QueuePassRequired,
    /// The pass has expired: its turn goes to the next in line.
    QueuePassExpired,
    /// The activity needs proof of work; the nonce is missing or wrong.
    ProofOfWork {
        /// Required leading zero bits.
        difficulty: u8,
    },
    /// The activity takes accounts made before a time (`min_account_age`
    /// before its start), and this one is younger.
    AccountTooNew {
        /// Accounts made before this time take part, Unix ms.
        accounts_before_ms: i64,
    },
    /// The activity takes accounts by age, and the session token does not
    /// say the account's (an earlier version issued it): log in again.
    SessionPredatesAccountAge,
}

impl Rejection {
    /// A refusal a retry can meet only because something changed after its
    /// claim was made (the sale paused or ended, its token or pass lapsed,
    /// a reload took the ticket type or raised the account age): the claim
    /// its key names may exist all the same. Not the ones any client can
    /// bring about at will (no token, a forged one, no proof of work): those
    /// stay answered from memory.
    pub fn may_hide_a_claim(&self) -> bool {
        matches!(
            self,
            Rejection::Paused
                | Rejection::Ended { .. }
                | Rejection::ClaimTokenExpired
                | Rejection::QueuePassExpired
                | Rejection::AccountTooNew { .. }
                | Rejection::UnknownTicket
        )
    }

    /// The outcome this rejection is counted as.
    pub fn outcome(&self) -> ClaimOutcome {
        match self {
            Rejection::UnknownActivity | Rejection::UnknownTicket => ClaimOutcome::NotFound,
            Rejection::Paused => ClaimOutcome::Paused,
            Rejection::NotStarted { .. } => ClaimOutcome::NotStarted,
            Rejection::Ended { .. } => ClaimOutcome::Ended,
            Rejection::LimitReached(_) => ClaimOutcome::LimitReached,
            Rejection::InProgress => ClaimOutcome::InProgress,
            Rejection::KeyReused => ClaimOutcome::KeyReused,
            Rejection::SoldOut { .. } => ClaimOutcome::SoldOut,
            Rejection::StockInFlight => ClaimOutcome::StockInFlight,
            Rejection::Overloaded => ClaimOutcome::Overloaded,
            Rejection::Unavailable | Rejection::OutcomeUnknown | Rejection::BacklogFull => ClaimOutcome::Unavailable,
            Rejection::NotImported => ClaimOutcome::NotImported,
            Rejection::ClaimTokenRequired | Rejection::ClaimTokenInvalid | Rejection::ClaimTokenExpired => {
                ClaimOutcome::BadClaimToken
            }
            Rejection::ProofOfWork { .. } => ClaimOutcome::BadProofOfWork,
            Rejection::QueuePassRequired | Rejection::QueuePassExpired => ClaimOutcome::NoQueuePass,
            Rejection::AccountTooNew { .. } => ClaimOutcome::AccountTooNew,
            Rejection::SessionPredatesAccountAge => ClaimOutcome::SessionOutdated,
        }
    }
}

impl From<CommitError> for Rejection {
    fn from(e: CommitError) -> Rejection {
        match e {
            CommitError::Overloaded => Rejection::Overloaded,
            CommitError::Unavailable => Rejection::Unavailable,
            CommitError::BacklogFull => Rejection::BacklogFull,
        }
    }
}

/// What happened to a claim request, as metrics, statistics and reports count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum ClaimOutcome {
    /// A code was handed out.
    Success,
    /// An idempotent retry got its earlier claim again.
    Replayed,
    /// Unknown activity or ticket.
    NotFound,
    /// Activity paused.
    Paused,
    /// Before the start.
    NotStarted,
    /// After the end.
    Ended,
    /// User at the limit.
    LimitReached,
    /// Same idempotency key in flight.
    InProgress,
    /// No stock.
    SoldOut,
    /// No stock free now, some may come back.
    StockInFlight,
    /// Cluster: no code of the ticket type is in Redis yet (not imported).
    NotImported,
    /// Shed for load.
    Overloaded,
    /// Store unavailable.
    Unavailable,
    /// Missing, invalid or expired claim token.
    BadClaimToken,
    /// Missing or wrong proof of work.
    BadProofOfWork,
    /// A queue or lottery activity, claimed without a valid pass.
    NoQueuePass,
    /// An account younger than the activity's `min_account_age`.
    AccountTooNew,
    /// A session token too old to carry its account's age, for an activity
    /// with `min_account_age`: the fan is asked to log in again. Counted
    /// apart from `AccountTooNew`, which says the account itself is young.
    SessionOutdated,
    /// Same idempotency key, another ticket type asked.
    KeyReused,
}

impl ClaimOutcome {
    /// Every outcome, in counter order.
    pub const ALL: [ClaimOutcome; 19] = [
        ClaimOutcome::Success,
        ClaimOutcome::Replayed,
        ClaimOutcome::NotFound,
        ClaimOutcome::Paused,
        ClaimOutcome::NotStarted,
        ClaimOutcome::Ended,
        ClaimOutcome::LimitReached,
        ClaimOutcome::InProgress,
        ClaimOutcome::SoldOut,
        ClaimOutcome::StockInFlight,
        ClaimOutcome::NotImported,
        ClaimOutcome::Overloaded,
        ClaimOutcome::Unavailable,
        ClaimOutcome::BadClaimToken,
        ClaimOutcome::BadProofOfWork,
        ClaimOutcome::NoQueuePass,
        ClaimOutcome::AccountTooNew,
        ClaimOutcome::SessionOutdated,
        ClaimOutcome::KeyReused,
    ];

    /// The outcome of a finished claim request.
    pub fn of(result: &Result<Claimed, Rejection>) -> ClaimOutcome {
        match result {
            Ok(c) if c.replayed => ClaimOutcome::Replayed,
            Ok(_) => ClaimOutcome::Success,
            Err(r) => r.outcome(),
        }
    }

    /// The label in metrics, stats and reports.
    pub fn label(self) -> &'static str {
        match self {
            ClaimOutcome::Success => "success",
            ClaimOutcome::Replayed => "replayed",
            ClaimOutcome::NotFound => "not_found",
            ClaimOutcome::Paused => "paused",
            ClaimOutcome::NotStarted => "not_started",
            ClaimOutcome::Ended => "ended",
            ClaimOutcome::LimitReached => "limit_reached",
            ClaimOutcome::InProgress => "in_progress",
            ClaimOutcome::KeyReused => "key_reused",
            ClaimOutcome::SoldOut => "sold_out",
            ClaimOutcome::StockInFlight => "stock_in_flight",
            ClaimOutcome::NotImported => "not_imported",
            ClaimOutcome::Overloaded => "overloaded",
            ClaimOutcome::Unavailable => "unavailable",
            ClaimOutcome::BadClaimToken => "bad_claim_token",
            ClaimOutcome::BadProofOfWork => "bad_proof_of_work",
            ClaimOutcome::NoQueuePass => "no_queue_pass",
            ClaimOutcome::AccountTooNew => "account_too_new",
            ClaimOutcome::SessionOutdated => "session_outdated",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counters and the rush statistics index by `outcome as usize` and
    /// name an index by `ALL[i]`: the list must be in declaration order.
    #[test]
    fn every_outcome_is_listed_once_in_counter_order() {
        for (i, outcome) in ClaimOutcome::ALL.iter().enumerate() {
            assert_eq!(*outcome as usize, i, "{}", outcome.label());
        }
    }

    fn claim() -> Claim {
        Claim {
            id: 0,
            activity_id: "a".into(),
            ticket_id: "t".into(),
            code: "C".into(),
            user_id: 7,
            claimed_at_ms: 1,
            idempotency_key: None,
        }
    }

    #[test]
    fn an_answer_carries_the_claim_back() {
        let (pending, mut reply) = PendingClaim::new(claim(), 2);
        assert_eq!((pending.limit(), pending.claim().user_id), (2, 7));
        pending.answer(CommitOutcome::Committed(9));
        assert_eq!(reply.try_recv().unwrap(), (claim(), CommitOutcome::Committed(9)));
    }

    #[test]
    fn answers_go_home_in_one_message_per_home_and_the_rest_at_once() {
        // Two claims made on a home thread, one on this thread (no home).
        let (made, home) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let mut answers = Home::settle_here();
            let (pendings, replies): (Vec<_>, Vec<_>) = (0..2).map(|_| PendingClaim::new(claim(), 1)).unzip();
            made.send(pendings).unwrap();
            let batch = answers.blocking_recv().expect("one message");
            assert_eq!(batch.len(), 2, "both answers in it");
            assert!(answers.try_recv().is_err(), "and no second message");
            answer_each(batch);
            replies
                .into_iter()
                .map(|mut r| r.try_recv().unwrap().1)
                .collect::<Vec<_>>()
        });
        let pendings = home.recv().unwrap();
        let (here, mut here_reply) = PendingClaim::new(claim(), 1);
        let outcomes = pendings.into_iter().chain([here]).enumerate();
        answer_all(outcomes.map(|(i, p)| (p, CommitOutcome::Committed(i as u64 + 1))));
        assert_eq!(
            here_reply.try_recv().unwrap().1,
            CommitOutcome::Committed(3),
            "answered at once"
        );
        assert_eq!(
            thread.join().unwrap(),
            [CommitOutcome::Committed(1), CommitOutcome::Committed(2)]
        );
    }

    #[test]
    fn claims_whose_home_has_gone_are_answered_anyway() {
        let (pending, mut reply) = std::thread::spawn(|| {
            let answers = Home::settle_here();
            let made = PendingClaim::new(claim(), 1);
            drop(answers);
            made
        })
        .join()
        .unwrap();
        answer_all([(pending, CommitOutcome::Committed(5))]);
        assert_eq!(reply.try_recv().unwrap().1, CommitOutcome::Committed(5));
    }

    #[test]
    fn a_claim_dropped_unanswered_is_answered_in_doubt() {
        let (pending, mut reply) = PendingClaim::new(claim(), 1);
        drop(pending);
        assert_eq!(reply.try_recv().unwrap(), (claim(), CommitOutcome::InDoubt));
    }

    #[test]
    fn every_store_error_has_a_rejection() {
        assert_eq!(Rejection::from(CommitError::Overloaded), Rejection::Overloaded);
        assert_eq!(Rejection::from(CommitError::Unavailable), Rejection::Unavailable);
        assert_eq!(Rejection::from(CommitError::BacklogFull), Rejection::BacklogFull);
        assert_eq!(Rejection::BacklogFull.outcome(), ClaimOutcome::Unavailable);
    }
}
