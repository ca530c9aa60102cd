//! Who is calling: accounts, passwords and session tokens.
//!
//! [`Auth`] registers users, checks passwords (argon2id, on blocking
//! threads), issues HMAC-signed session tokens and revokes them on logout.
//! Checking a token — on every claim — is a signature check and one
//! revocation-set lookup, with no store access.
//!
//! Login answers the same error, after the same argon2 work, for an unknown
//! user and a wrong password, so responses do not reveal which usernames exist.
//!
//! Argon2 is memory-hard on purpose (`auth.argon2_memory_kib` per hash), so
//! hashes are rationed: at most `auth.max_concurrent_hashes` run at once and
//! at most `auth.hash_queue` more wait for a turn; beyond that a login or a
//! registration is answered 503 with Retry-After at once ([`AuthError::Busy`]).
//! A burst of logins costs a fixed amount of memory and leaves the other
//! cores to the claims. Each client holds at most `auth.hashes_per_ip` of
//! those turns and places ([`share`]), so a few cannot hold them all.

pub mod bounded;
pub mod claim_token;
pub mod guard;
pub mod password;
pub mod ratelimit;
mod revoked;
pub mod session;
pub mod share;
pub mod username;

use std::{
    net::IpAddr,
    sync::{
        atomic::{AtomicBool, AtomicI64, Ordering},
        Arc,
    },
    time::Instant,
};

use arc_swap::ArcSwap;
use rand::RngCore;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use claim_token::{ClaimTokenError, ClaimTokens};
pub use guard::{Denied, Guard, LoginAttempt};
pub use password::HashCost;
use revoked::Revoked;
pub use session::{Session, SessionKey, TokenError};
use share::{Share, Shares};
pub use username::Username;

use crate::{
    clock::now_ms,
    config::Config,
    metrics::{self, Rejected},
    store::{Revocation, Store, StoreError, User},
};

/// How far back a refresh of the revoked sessions reads past the last one
/// ([`Auth::refresh_revoked`]): a logout is stamped with the revoking
/// node's clock and read by another's, and a write may land just after a
/// read began. A minute covers any skew a cluster should run with.
const REVOKED_OVERLAP_MS: i64 = 60_000;

/// The session signing secret: the environment, the config, or one generated
/// once and kept in the store.
pub fn resolve_secret(config: &Config, store: &Store) -> Result<String, StoreError> {
    if let Some(s) = config.auth.session_secret() {
        // The one generated before goes: a later start without this one
        // (the variable dropped from the unit) fell back to it and brought
        // back every session it had signed, ended by the switch — those of
        // a restore's re-issued user ids among them (an accounts
        // walkthrough). Such a start now makes a new secret: all log in.
        if store.forget_secret("session")? {
            tracing::warn!(
                "The session secret is set (auth.session_secret or TICKETD_SESSION_SECRET): the one generated \
                 and kept in the store is deleted, and the sessions it signed have ended. Keep this secret set \
                 from now on."
            );
        }
        return Ok(s);
    }
    let made = std::cell::RefCell::new(String::new());
    let secret = store.secret("session", &|| {
        let mut bytes = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        let mut more = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut more);
        let secret = session::token_id_hex(&bytes) + &session::token_id_hex(&more);
        made.replace(secret.clone());
        secret
    })?;
    // Made now, for a store that has accounts: their sessions were signed
    // with a secret that is gone (a restore without it, a row deleted),
    // and every fan is logged out. That was silent.
    if secret == *made.borrow() && store.has_users()? {
        tracing::warn!(
            "The store had accounts but no session secret: a new one was made, so every session signed before \
             has ended and fans log in again. (Was the store restored from an incomplete copy?)"
        );
    }
    Ok(secret)
}

/// Why an account operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// `auth.open_registration` is false.
    #[error("registration is closed")]
    RegistrationClosed,
    /// The username exists.
    #[error("this username, or one that looks like it, is taken")]
    UsernameTaken,
    /// Unknown user or wrong password (deliberately the same).
    #[error("wrong username or password")]
    BadCredentials,
    /// A field is unacceptable.
    #[error("{0}")]
    InvalidField(String),
    /// The token is missing, malformed or forged.
    #[error("the token is invalid")]
    TokenInvalid,
    /// The session was logged out (by its holder, or ended by a block of
    /// its account, which the caller then names while it lasts).
    #[error("the session is logged out")]
    LoggedOut {
        /// The account.
        user: u64,
    },
    /// The token expired.
    #[error("the token has expired; log in again")]
    TokenExpired,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Every password-hashing slot and queue place is taken; retry shortly.
    #[error("too many logins at once; retry shortly")]
    Busy,
    /// This client holds its whole share of the hashing ([`share`]).
    #[error("other logins or registrations from this address are being checked")]
    Throttled,
    /// A hashing task died.
    #[error("internal error")]
    Internal,
}

/// Settings that a reload may change.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Settings {
    open_registration: bool,
    cost: HashCost,
    session_ttl_ms: i64,
    hashes_per_ip: u32,
}

impl Settings {
    fn from_config(config: &Config) -> Settings {
        Settings {
            open_registration: config.auth.open_registration,
            cost: HashCost {
                memory_kib: config.auth.argon2_memory_kib,
                iterations: config.auth.argon2_iterations,
            },
            session_ttl_ms: config.session_ttl_ms(),
            hashes_per_ip: config.auth.hashes_per_ip,
        }
    }
}

/// A reserved turn to hash a password, or a place in the queue for one
/// ([`Auth::reserve_hashing`]), and the client's share it counts against.
pub struct HashingSlot {
    place: Place,
    share: Share,
}

enum Place {
    /// A turn, held.
    Turn(OwnedSemaphorePermit),
    /// A place in the queue for a turn.
    Queued(OwnedSemaphorePermit),
}

/// A turn to hash, held until the hash ends (it moves into the hashing
/// task), with the client's share.
struct Turn {
    _permit: OwnedSemaphorePermit,
    _share: Share,
}

/// The hash an unknown name's password is checked against, and the cost
/// it is (being) made at.
struct Dummy {
    hash: ArcSwap<String>,
    cost: parking_lot::Mutex<HashCost>,
    /// A thread is making it: one at a time, however often reloads change
    /// the cost (each hash may take a gigabyte).
    making: AtomicBool,
}

/// Accounts and sessions.
pub struct Auth {
    key: SessionKey,
    settings: ArcSwap<Settings>,
    /// Logged-out sessions, bounded per account.
    revoked: Revoked,
    /// When [`Auth::refresh_revoked`] last read the store (0: never).
    revoked_read_ms: AtomicI64,
    /// Verified against when the username is unknown, to spend the same
    /// time; made again, off the reload's path, when the cost changes.
    dummy: Arc<Dummy>,
    /// Turns to run argon2: `max_concurrent_hashes` permits. A permit moves
    /// into the blocking task and is released when the hash ends, not when
    /// the request does: a client hanging up cannot free a turn early.
    hashing: Arc<Semaphore>,
    /// Places in the queue for a turn: `hash_queue` permits, taken without waiting.
    hash_queue: Arc<Semaphore>,
    /// The permits each of the two was made with, for [`Auth::hashing_load`].
    hash_limits: (usize, usize),
    /// What each client holds of the two.
    shares: Arc<Shares>,
    store: Arc<Store>,
}

/// Checks a username, password and nickname; returns the username and the
/// nickname to use (the username as typed when none is given).
pub fn validate_account(
    username: &str,
    password: &str,
    nickname: Option<&str>,
) -> Result<(Username, String), AuthError> {
    let username = Username::parse(username).map_err(AuthError::InvalidField)?;
    validate_password(password)?;
    // None given: the username as typed, or composed if typed longer than
    // a nickname may be (`e` and a combining accent, twenty times, is a
    // valid name of 20: its typed form of 40 was refused as a nickname
    // nobody sent).
    let typed = username.display();
    let composed: String;
    let nickname = match nickname.map(str::trim).filter(|n| !n.is_empty()) {
        Some(given) => given,
        None if typed.chars().count() > 32 => {
            composed = unicode_normalization::UnicodeNormalization::nfkc(typed).collect();
            &composed
        }
        None => typed,
    };
    if nickname.chars().count() > 32 {
        return Err(AuthError::InvalidField(
            "nickname must be at most 32 printable characters".into(),
        ));
    }
    username::check_display_text(nickname).map_err(AuthError::InvalidField)?;
    let nickname = nickname.to_owned();
    Ok((username, nickname))
}

/// The password rule of registration (and of `ticketd user passwd`),
/// counted in the form it is hashed in: eight characters typed as four
/// letters and four combining accents are four.
pub fn validate_password(password: &str) -> Result<(), AuthError> {
    if !(8..=128).contains(&password::normalise(password).chars().count()) {
        return Err(AuthError::InvalidField("password must be 8-128 characters".into()));
    }
    Ok(())
}

/// The account a login names: by `key`, the [`username::identity_key`] of
/// `typed` (the name as sent), else by `typed` itself — an account made
/// before usernames were normalised keeps the exact name it was registered
/// with. A login and `ticketd user passwd` find accounts alike.
pub fn account_named(store: &Store, key: &str, typed: &str) -> Result<Option<User>, StoreError> {
    match store.user_by_name(key)? {
        None if key != typed => store.user_by_name(typed),
        found => Ok(found),
    }
}

impl Auth {
    /// Sets up signing with `secret` (see [`resolve_secret`]) and loads the
    /// revocation set.
    pub fn new(config: &Config, store: Arc<Store>, secret: &str) -> Result<Auth, StoreError> {
        let mut key = SessionKey::new(secret.as_bytes());
        if let Some(previous) = config.auth.previous_session_secret() {
            key = key.with_previous(previous.as_bytes());
        }
        let settings = Settings::from_config(config);
        let auth = Auth {
            key,
            dummy: Arc::new(Dummy {
                hash: ArcSwap::from_pointee(password::hash("dummy password", settings.cost)),
                cost: parking_lot::Mutex::new(settings.cost),
                making: AtomicBool::new(false),
            }),
            settings: ArcSwap::from_pointee(settings),
            revoked: Revoked::default(),
            revoked_read_ms: AtomicI64::new(0),
            hashing: Arc::new(Semaphore::new(config.auth.max_concurrent_hashes())),
            hash_queue: Arc::new(Semaphore::new(config.auth.hash_queue)),
            hash_limits: (config.auth.max_concurrent_hashes(), config.auth.hash_queue),
            shares: Shares::new(config.security.max_tracked_clients),
            store,
        };
        auth.refresh_revoked()?;
        let keyed = auth.store.index_skeletons(username::skeleton_key)?;
        if keyed > 0 {
            tracing::info!(
                accounts = keyed,
                "Keyed existing accounts against look-alike usernames."
            );
        }
        Ok(auth)
    }

    /// Loads the sessions revoked in the store: at start all of them,
    /// then those revoked since the last read, less [`REVOKED_OVERLAP_MS`].
    /// A cluster node calls it every `cluster.refresh_interval`, so a
    /// logout through another node takes effect here within that. (It read
    /// every revocation each time: a day of logouts, at the login rate, a
    /// second.) Expired entries go with [`Auth::forget_expired_revocations`].
    pub fn refresh_revoked(&self) -> Result<(), StoreError> {
        let now = now_ms();
        let last = self.revoked_read_ms.load(Ordering::Relaxed);
        let since = (last > 0).then(|| last - REVOKED_OVERLAP_MS);
        for revocation in self.store.revoked_sessions(now, since)? {
            self.revoked.learn(revocation);
        }
        self.revoked_read_ms.store(now, Ordering::Relaxed);
        Ok(())
    }

    /// Forgets logged-out sessions that have expired anyway (called every
    /// minute, in both modes: before, only a cluster's refresher pruned
    /// them, and an embedded node kept every logout until it restarted).
    pub fn forget_expired_revocations(&self, now_ms: i64) {
        self.revoked.forget_expired(now_ms);
    }

    /// Applies reloadable settings (registration, argon2 cost, session TTL).
    ///
    /// A new cost's dummy hash is made on a thread of its own: at the most
    /// memory and passes a config allows it takes seconds, which the reload
    /// (holding the config's lock, half applied) must not wait for. Until
    /// it is ready, an unknown name is checked against the last one.
    pub fn apply(&self, config: &Config) {
        let new = Settings::from_config(config);
        let cost = new.cost;
        let changed = {
            let mut wanted = self.dummy.cost.lock();
            std::mem::replace(&mut *wanted, cost) != cost
        };
        self.settings.store(Arc::new(new));
        // A thread already making one sees the new cost when it is done.
        if changed && !self.dummy.making.swap(true, Ordering::AcqRel) {
            let dummy = self.dummy.clone();
            let made = std::thread::Builder::new()
                .name("dummy-hash".into())
                .spawn(move || loop {
                    let cost = *dummy.cost.lock();
                    let hash = password::hash("dummy password", cost);
                    // Kept only if no later reload asked for another cost.
                    let wanted = dummy.cost.lock();
                    if *wanted == cost {
                        dummy.hash.store(Arc::new(hash));
                        dummy.making.store(false, Ordering::Release);
                        return;
                    }
                });
            if let Err(error) = made {
                self.dummy.making.store(false, Ordering::Release);
                tracing::warn!(%error, "Could not make the dummy hash at the new cost.");
            }
        }
    }

    /// The session behind `token`, if it is valid and not logged out.
    pub fn authenticate(&self, token: &str) -> Result<Session, AuthError> {
        let now = now_ms();
        let session = self.key.verify(token, now).map_err(|e| match e {
            TokenError::Invalid => AuthError::TokenInvalid,
            TokenError::Expired => AuthError::TokenExpired,
        })?;
        // (Expiry is `verify`'s: said above.)
        if self.revoked.contains(&session) {
            return Err(AuthError::LoggedOut { user: session.user_id });
        }
        Ok(session)
    }

    /// Logs out every session `users` hold now, for good: a mark in the
    /// store (read by every node, and by this one after a restart), then
    /// here. A block alone only suspends an account's sessions, and lifting
    /// it gave a stolen one back (an accounts walkthrough). The mark lasts
    /// as long as a session issued now would.
    pub fn end_sessions(&self, users: impl IntoIterator<Item = u64>) -> Result<(), StoreError> {
        let now = now_ms();
        let expires_at_ms = now.saturating_add(self.settings.load().session_ttl_ms);
        for user in users {
            self.store.revoke_issued_before(user, now, expires_at_ms)?;
            self.revoked.learn(Revocation::Before {
                user,
                issued_ms: now,
                expires_at_ms,
            });
        }
        Ok(())
    }

    /// Whether `session` (authenticated earlier) is still good at `now_ms`:
    /// not expired, not logged out. For what outlives its request, as an
    /// event stream does.
    pub fn is_live(&self, session: &Session, now_ms: i64) -> bool {
        now_ms < session.expires_at_ms && !self.revoked.contains(session)
    }

    fn issue(&self, user: &User) -> String {
        let ttl = self.settings.load().session_ttl_ms;
        self.key
            .issue(user.id, user.created_at_ms, now_ms().saturating_add(ttl))
            .0
    }

    /// The account a registration asks for, checked: whether registration
    /// is open, and the fields' rules. Cheap (no hash yet), so a caller can
    /// check before it spends anything of an address's budget.
    pub fn check_registration(
        &self,
        username: &str,
        password: &str,
        nickname: Option<&str>,
    ) -> Result<(Username, String), AuthError> {
        if !self.settings.load().open_registration {
            return Err(AuthError::RegistrationClosed);
        }
        validate_account(username, password, nickname)
    }

    /// Creates the account [`Auth::check_registration`] checked, and logs
    /// it in, hashing in `slot` ([`Auth::reserve_hashing`]).
    pub async fn register(
        self: &Arc<Self>,
        slot: HashingSlot,
        (username, nickname): (Username, String),
        password: String,
    ) -> Result<(User, String), AuthError> {
        let settings = self.settings.load_full();
        let turn = self.hashing_turn(slot).await?;
        let this = self.clone();
        let user = blocking(move || {
            let hash = password::hash(&password, settings.cost);
            drop(turn);
            // The time the store keeps is the one the session token carries.
            this.store
                .create_user(&username.account(&nickname, hash, now_ms()))
                .map_err(|e| match e {
                    StoreError::UsernameTaken => AuthError::UsernameTaken,
                    other => other.into(),
                })
        })
        .await?;
        let token = self.issue(&user);
        Ok((user, token))
    }

    /// Password hashes running and logins or registrations waiting for a
    /// turn, for `/metrics`: a login flood shows here before it shows as
    /// `BUSY` answers.
    pub fn hashing_load(&self) -> (usize, usize) {
        let (turns, places) = self.hash_limits;
        (
            turns.saturating_sub(self.hashing.available_permits()),
            places.saturating_sub(self.hash_queue.available_permits()),
        )
    }

    /// Reserves a turn to hash, or a place in the queue for one, without
    /// waiting (argon2 is rationed: see the module docs); `Busy` when the
    /// queue is full too.
    ///
    /// A login reserves before the guard counts it: one refused as busy
    /// then never made a lockout record, and so never pushed one out of a
    /// full table (a flood of logins that hashed nothing wiped a guesser's
    /// lockout).
    ///
    /// `Throttled` when `ip`'s client holds its share already ([`share`]):
    /// checked first, so a client past its share never takes a place.
    pub fn reserve_hashing(&self, ip: IpAddr) -> Result<HashingSlot, AuthError> {
        let per_address = self.settings.load().hashes_per_ip;
        let share = self
            .shares
            .take(ip, per_address, Instant::now())
            .ok_or(AuthError::Throttled)?;
        if let Ok(turn) = self.hashing.clone().try_acquire_owned() {
            return Ok(HashingSlot {
                place: Place::Turn(turn),
                share,
            });
        }
        let place = self
            .hash_queue
            .clone()
            .try_acquire_owned()
            .map_err(|_| AuthError::Busy)?;
        Ok(HashingSlot {
            place: Place::Queued(place),
            share,
        })
    }

    /// The turn `slot` holds or waits for (its queue place is given up
    /// once the turn comes; its share is kept until the hash ends).
    async fn hashing_turn(&self, slot: HashingSlot) -> Result<Turn, AuthError> {
        let permit = match slot.place {
            Place::Turn(turn) => turn,
            Place::Queued(_place) => self
                .hashing
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| AuthError::Internal)?,
        };
        Ok(Turn {
            _permit: permit,
            _share: slot.share,
        })
    }

    /// Checks a password and issues a token. `username_key` is the
    /// [`username::identity_key`] of `typed`, the username as sent.
    ///
    /// The hashing task settles `attempt` with its verdict, not the caller:
    /// a client that hangs up while its hash runs drops the caller, and the
    /// hash runs to its end regardless. Were the verdict the caller's to
    /// count, hanging up after every try would buy unlimited hashes that
    /// never lock anything. Before its turn, a dropped attempt costs nothing
    /// and is given back.
    pub async fn login(
        self: &Arc<Self>,
        slot: HashingSlot,
        attempt: LoginAttempt,
        username_key: String,
        typed: String,
        password: String,
    ) -> Result<(User, String), AuthError> {
        let turn = self.hashing_turn(slot).await?;
        let this = self.clone();
        let user = blocking(move || {
            let _turn = turn;
            let user = account_named(&this.store, &username_key, &typed)?;
            let hash = match &user {
                Some(u) => u.password_hash.clone(),
                None => this.dummy.hash.load().to_string(),
            };
            let verified = password::verify(&password, &hash);
            match user {
                Some(u) if verified.matched() => {
                    attempt.succeeded();
                    // Made at an earlier cost, or before passwords were
                    // normalised: as `hash` makes them now from now on
                    // (the turn is still held; this login pays for it).
                    let cost = this.settings.load().cost;
                    if verified == password::Verified::AsTyped || !password::is_current(&hash, cost) {
                        let rehashed = password::hash(&password, cost);
                        // Only over the hash just checked: a password set
                        // meanwhile (`ticketd user passwd`) stays.
                        match this.store.rehash_password(u.id, &hash, &rehashed) {
                            Ok(true) => {}
                            Ok(false) => tracing::info!(
                                user_id = u.id,
                                "A password changed while a login re-hashed the old one; the new one is kept."
                            ),
                            Err(error) => tracing::warn!(%error, "Could not re-hash a password at the current cost."),
                        }
                    }
                    Ok(u)
                }
                _ => {
                    attempt.failed(std::time::Instant::now());
                    // Counted here too, hung-up attempts included.
                    metrics::global().reject(Rejected::LoginFailed);
                    Err(AuthError::BadCredentials)
                }
            }
        })
        .await?;
        let token = self.issue(&user);
        Ok((user, token))
    }

    /// Revokes the session until it would have expired: in the store, then
    /// here. A logout the store could not keep is refused and changes
    /// nothing: revoked here first, its retry heard 401 (the session
    /// already gone) while the store, and so every other node and this one
    /// after a restart, still took the session.
    pub async fn logout(self: &Arc<Self>, session: Session) -> Result<(), AuthError> {
        let this = self.clone();
        blocking(move || {
            this.store
                .revoke_session(
                    session.user_id,
                    &session::token_id_hex(&session.token_id),
                    session.expires_at_ms,
                )
                .map_err(AuthError::from)?;
            this.revoked.add(&session);
            Ok(())
        })
        .await
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AuthError> + Send + 'static,
) -> Result<T, AuthError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "An account task panicked.");
        Err(AuthError::Internal)
    })
}
