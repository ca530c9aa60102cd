//! The guard: who may knock at all, and how often.
//!
//! It answers, cheaply and before any real work: is this client address or
//! user blocked; does a browser request come from another site; is this
//! address or user over its claim rate (token buckets); may this login
//! attempt be checked at all (failure backoff); is this address registering
//! too many accounts. The client address is the TCP peer, or — only when the
//! peer is a configured trusted proxy — the nearest untrusted hop in
//! `X-Forwarded-For`.
//!
//! # Per address means per /64 for IPv6
//! One IPv6 subscriber is handed a /64 (or more): counting each of its 2^64
//! addresses separately would give one person unlimited registrations. Rate
//! limits and login backoff key IPv6 clients by their /64 ([`client_key`]);
//! blocklists match the full address against their CIDRs.
//!
//! # Login policy
//! Failures are counted twice, and neither count ever locks an account for
//! everybody:
//! - **per address** (every username): `4 × login_max_failures` failures lock
//!   *that address* out of logging in, with a doubling backoff — it stops one
//!   source guessing many accounts (credential stuffing);
//! - **per account at an address**: `login_max_failures` failures lock *that
//!   account from that address*, doubling — it stops one source guessing one
//!   password. The real owner, from any address without failures, still logs
//!   in: a victim cannot be locked out by somebody else's guesses;
//! - **per account at an IPv6 /48**: [`SITE_LOGINS`] times that, so a site
//!   with 65,536 /64s does not get 65,536 budgets of guesses at one
//!   account. Per account, not for the whole /48: an attacker there locks
//!   nobody else out (a mobile carrier puts many subscribers in one /48).
//!
//! An attempt is counted when it begins, in the same step as the check
//! ([`Backoff::begin`]): concurrent guesses share one budget, so 64 at once
//! against a budget of 5 get 5 password checks and 59 answers of 429
//! `LOGIN_THROTTLED` (Retry-After: 1) — not a lockout: the attempts being
//! checked may succeed. A success forgets that account-at-address's failures
//! (not the address's).
//!
//! # Bounded tables
//! Every table here is a [`BoundedMap`](super::bounded::BoundedMap) of
//! `security.max_tracked_clients` entries evicting the least recently used
//! one. For buckets an eviction means a fresh, full bucket — what an idle
//! client has anyway. For login failures it means a forgotten count: to push
//! out a given entry an attacker must make failed logins under
//! `max_tracked_clients / 64` other keys landing in the same (randomly keyed)
//! shard, each costing a rationed argon2 check — slower than waiting out the
//! lockout. (A login refused as busy never reaches these tables: it is
//! refused before the guard counts it, see `Auth::reserve_hashing`.)
//!
//! Settings are swapped whole on reload; the counters live on.

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use http::{header, HeaderMap};

use crate::vocab::{client_key, site_key, SITE_BUDGETS};

use super::{
    ratelimit::{Backoff, BackoffPolicy, Rate, Refusal, TokenBuckets},
    username::skeleton_key,
};
use crate::config::{any_contains, Config, IpNet};

/// Why the guard turned a request away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// The address or user is on a blocklist.
    Blocked,
    /// Over the claim rate; retry after this long.
    RateLimited(Duration),
    /// Too many failed logins; retry after this long.
    LoginLocked(Duration),
    /// As many login attempts as may still fail are being checked now;
    /// retry after this long.
    LoginThrottled(Duration),
    /// A browser request from a page of another site.
    CrossSite,
    /// A trusted proxy sent an `X-Forwarded-For` whose nearest hops cannot be read.
    UnreadableForwardedFor,
}

struct Settings {
    trusted: Vec<IpNet>,
    blocked_ips: Vec<IpNet>,
    /// Look-alike keys ([`skeleton_key`]) of `security.blocked_users`.
    blocked_usernames: HashSet<String>,
    blocked_user_ids: HashSet<u64>,
    allowed_origins: Vec<String>,
    user_rate: Rate,
    ip_rate: Rate,
    register_rate: Rate,
    login: BackoffPolicy,
}

/// An allowed origin as a browser's `Origin` header writes it: lower case,
/// without the scheme's default port (`https://x.example:443` never came,
/// so its cross-site posts were refused).
fn as_browsers_send(origin: &str) -> String {
    let origin = origin.to_ascii_lowercase();
    for (scheme, port) in [("https://", ":443"), ("http://", ":80")] {
        if origin.starts_with(scheme) {
            if let Some(bare) = origin.strip_suffix(port) {
                return bare.to_owned();
            }
        }
    }
    origin
}

impl Settings {
    fn from_config(config: &Config, blocked_user_ids: HashSet<u64>) -> Settings {
        let s = &config.security;
        Settings {
            trusted: s.trusted_proxies.clone(),
            blocked_ips: s.blocked_ips.clone(),
            blocked_usernames: s.blocked_users.iter().map(|u| skeleton_key(u)).collect(),
            blocked_user_ids,
            allowed_origins: s.allowed_origins.iter().map(|o| as_browsers_send(o)).collect(),
            user_rate: Rate {
                per_sec: s.claim_rate_per_user,
                burst: f64::from(s.claim_burst_per_user),
            },
            ip_rate: Rate {
                per_sec: s.claim_rate_per_ip,
                burst: f64::from(s.claim_burst_per_ip),
            },
            register_rate: Rate {
                per_sec: f64::from(s.registrations_per_ip_per_hour) / 3600.0,
                burst: f64::from(s.registrations_per_ip_per_hour),
            },
            login: BackoffPolicy {
                max_failures: s.login_max_failures,
                base: s.login_backoff.0,
                cap: s.login_backoff_max.0,
            },
        }
    }

    /// An address gets more room than one account: several people share NATs.
    fn address_login(&self) -> BackoffPolicy {
        BackoffPolicy {
            max_failures: self.login.max_failures.saturating_mul(4),
            ..self.login
        }
    }

    /// An account at an IPv6 /48 gets [`SITE_LOGINS`] addresses' room.
    fn site_login(&self) -> BackoffPolicy {
        BackoffPolicy {
            max_failures: self.login.max_failures.saturating_mul(SITE_LOGINS),
            ..self.login
        }
    }
}

/// How many /64s' worth of registrations a /48 gets ([`SITE_BUDGETS`]).
const SITE_REGISTRATIONS: f64 = SITE_BUDGETS as f64;

/// How many /64s' worth of failures at one account a /48 may make before
/// that account is locked from the /48 ([`SITE_BUDGETS`]).
const SITE_LOGINS: u32 = SITE_BUDGETS;

/// Successful logins of one account from one address: ten, then one every
/// six seconds. Failures have their backoff; successes were never counted,
/// so an account's owner (or a farm of them) could keep every password
/// hash busy with right passwords, and every login and registration heard
/// 503 BUSY. Nobody logs in ten times a minute from one place for real.
const SUCCESSFUL_LOGINS: Rate = Rate {
    per_sec: 1.0 / 6.0,
    burst: 10.0,
};

/// Reads of a user's claims from a cluster's shared store (`/ticket/*`,
/// `/act/detail`), per user: twenty, then five a second. Each is a Redis
/// script per activity on the Redis that runs every node's commits one at
/// a time; unbounded, one logged-in client looping `/ticket/list` slowed
/// every node's claims. A fan's page reads far less.
const STORE_READS: Rate = Rate {
    per_sec: 5.0,
    burst: 20.0,
};

/// Blocklists, rate limits, login backoff and the same-site check.
pub struct Guard {
    settings: ArcSwap<Settings>,
    claims_by_user: TokenBuckets<u64>,
    claims_by_ip: TokenBuckets<IpAddr>,
    registrations_by_ip: TokenBuckets<IpAddr>,
    /// Registrations per IPv6 /48 ([`site_key`]), beside the /64's.
    registrations_by_site: TokenBuckets<IpAddr>,
    /// Login failures per (account, address key); the account as a 128-bit
    /// digest of its identity key, so an entry has a fixed size however
    /// long a made-up username is.
    logins_by_account: Backoff<([u8; 16], IpAddr)>,
    logins_by_ip: Backoff<IpAddr>,
    /// Login failures per (account, IPv6 /48 ([`site_key`])), beside the
    /// (account, /64)'s.
    logins_by_site: Backoff<([u8; 16], IpAddr)>,
    /// Successful logins per (account, address key): [`SUCCESSFUL_LOGINS`].
    logins_succeeded: TokenBuckets<([u8; 16], IpAddr)>,
    /// Reads of a user's claims from a shared store: [`STORE_READS`].
    store_reads_by_user: TokenBuckets<u64>,
}

/// A login attempt the guard let through: it holds a place in the address's,
/// the account-at-address's and (IPv6) the account-at-/48's budgets until
/// settled. Dropped unsettled (the client hung up before its hash began, the
/// store failed), it gives the places back uncounted. (A login refused as
/// busy never gets here: it is refused before the guard counts it.) Owned, so the hashing task can settle it:
/// once a hash has begun, its verdict counts whether the client waits or not.
pub struct LoginAttempt {
    guard: Arc<Guard>,
    account: ([u8; 16], IpAddr),
    /// The account at the address's IPv6 /48, counted too.
    site: Option<([u8; 16], IpAddr)>,
    settled: bool,
}

impl LoginAttempt {
    /// The password was wrong (or the account unknown): count it.
    pub fn failed(mut self, now: Instant) {
        let settings = self.guard.settings.load();
        let address = &self.account.1;
        if let Some(lock) = self.guard.logins_by_account.fail(self.account, settings.login, now) {
            tracing::info!(%address, lock_secs = lock.as_secs(), "An account is locked out of logging in from an address.");
        }
        if let Some(lock) = self.guard.logins_by_ip.fail(*address, settings.address_login(), now) {
            tracing::warn!(%address, lock_secs = lock.as_secs(), "An address is locked out of logging in.");
        }
        if let Some(site) = self.site {
            if let Some(lock) = self.guard.logins_by_site.fail(site, settings.site_login(), now) {
                tracing::info!(site = %site.1, lock_secs = lock.as_secs(), "An account is locked out of logging in from an IPv6 /48.");
            }
        }
        self.settled = true;
    }

    /// The password was right: forget this account-at-address's failures.
    pub fn succeeded(mut self) {
        let _ = self
            .guard
            .logins_succeeded
            .take(self.account, SUCCESSFUL_LOGINS, Instant::now());
        self.release(true);
        self.settled = true;
    }

    /// Gives back the places held, uncounted; with `forget`, the
    /// account-at-address's failures go too (see [`Backoff::settle`]).
    fn release(&self, forget: bool) {
        self.guard.logins_by_account.settle(&self.account, forget);
        self.guard.logins_by_ip.settle(&self.account.1, false);
        if let Some(site) = &self.site {
            self.guard.logins_by_site.settle(site, false);
        }
    }
}

impl Drop for LoginAttempt {
    fn drop(&mut self) {
        if !self.settled {
            self.release(false);
        }
    }
}

impl Guard {
    /// A guard with `config`'s `[security]` settings; `blocked_user_ids` are
    /// the ids of `security.blocked_users` (resolved by the caller from the store).
    pub fn new(config: &Config, blocked_user_ids: HashSet<u64>) -> Guard {
        let capacity = config.security.max_tracked_clients;
        Guard {
            settings: ArcSwap::from_pointee(Settings::from_config(config, blocked_user_ids)),
            claims_by_user: TokenBuckets::new(capacity),
            claims_by_ip: TokenBuckets::new(capacity),
            registrations_by_ip: TokenBuckets::new(capacity),
            registrations_by_site: TokenBuckets::new(capacity),
            logins_by_account: Backoff::new(capacity),
            logins_by_ip: Backoff::new(capacity),
            logins_by_site: Backoff::new(capacity),
            logins_succeeded: TokenBuckets::new(capacity),
            store_reads_by_user: TokenBuckets::new(capacity),
        }
    }

    /// The ids of `security.blocked_users` as last applied.
    pub fn blocked_user_ids(&self) -> HashSet<u64> {
        self.settings.load().blocked_user_ids.clone()
    }

    /// Applies reloaded settings; counters (and their capacity) are kept.
    pub fn apply(&self, config: &Config, blocked_user_ids: HashSet<u64>) {
        self.settings
            .store(Arc::new(Settings::from_config(config, blocked_user_ids)));
    }

    /// Whether `ip` is one of `security.trusted_proxies`.
    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        any_contains(&self.settings.load().trusted, ip)
    }

    /// The client's address: the peer, or — when the peer is a trusted
    /// proxy — the nearest `X-Forwarded-For` hop that is not one.
    ///
    /// Hops are read from the right (the proxy's own, trustworthy end). A hop
    /// that cannot be read before an untrusted one is found makes the chain
    /// unreadable: the request is refused rather than blamed on the proxy,
    /// whose address is nobody's to exhaust or unblock. Hops left of the
    /// client's are whatever the client wrote and never matter.
    pub fn client_ip(&self, peer: SocketAddr, headers: &HeaderMap) -> Result<IpAddr, Denied> {
        let s = self.settings.load();
        let peer_ip = peer.ip();
        if !any_contains(&s.trusted, peer_ip) {
            return Ok(peer_ip);
        }
        let values = headers.get_all("x-forwarded-for");
        let mut nearest_trusted = None;
        for value in values.iter().rev() {
            for hop in value.as_bytes().rsplit(|&b| b == b',') {
                let ip = parse_hop(hop).ok_or(Denied::UnreadableForwardedFor)?;
                if !any_contains(&s.trusted, ip) {
                    return Ok(ip);
                }
                nearest_trusted = Some(ip);
            }
        }
        // Every hop is a trusted proxy (or there are none): the request
        // started at the outermost proxy itself.
        Ok(nearest_trusted.unwrap_or(peer_ip))
    }

    /// Refuses blocked addresses.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Denied> {
        if any_contains(&self.settings.load().blocked_ips, ip) {
            return Err(Denied::Blocked);
        }
        Ok(())
    }

    /// Refuses a browser request sent by a page of another site: an `Origin`
    /// whose host is not the request's `Host` nor in
    /// `security.allowed_origins`, or `Sec-Fetch-Site: cross-site` without an
    /// allowed `Origin`. Requests without either header (curl, apps,
    /// servers) are not browsers' and pass: the defence is against a page
    /// making its visitors' browsers act.
    ///
    /// Hosts are compared without ports (`localhost:8080` behind a proxy
    /// that forwards `Host: localhost` is the same host); browsers call that
    /// same-site as well.
    pub fn check_same_site(&self, headers: &HeaderMap) -> Result<(), Denied> {
        let origin = headers.get(header::ORIGIN).map(|v| v.as_bytes());
        let fetch_site = headers.get("sec-fetch-site").map(|v| v.as_bytes());
        let Some(origin) = origin else {
            return match fetch_site {
                Some(site) if site.eq_ignore_ascii_case(b"cross-site") => Err(Denied::CrossSite),
                _ => Ok(()),
            };
        };
        let origin = std::str::from_utf8(origin).map_err(|_| Denied::CrossSite)?.trim();
        let s = self.settings.load();
        if s.allowed_origins.iter().any(|o| o.eq_ignore_ascii_case(origin)) {
            return Ok(());
        }
        // "null" (sandboxed frames, data: URLs) has no host and never matches.
        let origin_host = origin.split_once("://").map(|(_, rest)| host_of(rest));
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(host_of);
        match (origin_host, host) {
            (Some(o), Some(h)) if !o.is_empty() && o.eq_ignore_ascii_case(h) => Ok(()),
            _ => Err(Denied::CrossSite),
        }
    }

    /// Whether `username` (as typed) is blocked: compared by look-alike
    /// key, as accounts are, so `b1ockme` is no way past `blockme`.
    pub fn is_blocked_user(&self, username: &str) -> bool {
        self.settings.load().blocked_usernames.contains(&skeleton_key(username))
    }

    /// Whether the user with this id is blocked.
    pub fn is_blocked_id(&self, user_id: u64) -> bool {
        self.settings.load().blocked_user_ids.contains(&user_id)
    }

    /// Takes a claim token from the address's bucket.
    pub fn admit_claim_from(&self, ip: IpAddr, now: Instant) -> Result<(), Denied> {
        let rate = self.settings.load().ip_rate;
        self.claims_by_ip
            .take(client_key(ip), rate, now)
            .map_err(Denied::RateLimited)
    }

    /// Takes a claim token from the user's bucket.
    pub fn admit_claim_by(&self, user_id: u64, now: Instant) -> Result<(), Denied> {
        let rate = self.settings.load().user_rate;
        self.claims_by_user
            .take(user_id, rate, now)
            .map_err(Denied::RateLimited)
    }

    /// Takes a token from the user's bucket of reads from a shared store
    /// ([`STORE_READS`]).
    pub fn admit_store_read(&self, user_id: u64, now: Instant) -> Result<(), Denied> {
        self.store_reads_by_user
            .take(user_id, STORE_READS, now)
            .map_err(Denied::RateLimited)
    }

    /// Takes a registration token from the address's bucket (an IPv6
    /// address's /64) and, for IPv6, from its /48's, which holds
    /// [`SITE_REGISTRATIONS`] times as many: counted per /64 alone, a /48
    /// registered 65,536 times what one address may.
    pub fn admit_registration(&self, ip: IpAddr, now: Instant) -> Result<(), Denied> {
        let rate = self.settings.load().register_rate;
        // The /64's first: a client refused there spends nothing of its
        // /48's, which its neighbours share.
        self.registrations_by_ip
            .take(client_key(ip), rate, now)
            .map_err(Denied::RateLimited)?;
        if let Some(site) = site_key(ip) {
            let site_rate = Rate {
                per_sec: rate.per_sec * SITE_REGISTRATIONS,
                burst: rate.burst * SITE_REGISTRATIONS,
            };
            self.registrations_by_site
                .take(site, site_rate, now)
                .map_err(Denied::RateLimited)?;
        }
        Ok(())
    }

    /// Lets a login attempt for the account with identity key `account` from
    /// `ip` be checked, or refuses it while the address, the account at this
    /// address or the account at its IPv6 /48 is locked out (see the module's
    /// login policy).
    pub fn begin_login(self: &Arc<Self>, account: &str, ip: IpAddr, now: Instant) -> Result<LoginAttempt, Denied> {
        let settings = self.settings.load();
        let digest = digest(account);
        let site = site_key(ip).map(|site| (digest, site));
        let ip = client_key(ip);
        let denied = |r: Refusal| match r {
            Refusal::Locked(wait) => Denied::LoginLocked(wait),
            Refusal::Pending(wait) => Denied::LoginThrottled(wait),
        };
        let account = (digest, ip);
        // Checked, not taken: only a login that succeeds takes a token.
        self.logins_succeeded
            .available(&account, SUCCESSFUL_LOGINS, now)
            .map_err(Denied::RateLimited)?;
        if let Some(site) = site {
            self.logins_by_site
                .begin(site, settings.site_login(), now)
                .map_err(denied)?;
        }
        let settle_site = || {
            if let Some(site) = &site {
                self.logins_by_site.settle(site, false);
            }
        };
        if let Err(refusal) = self.logins_by_ip.begin(ip, settings.address_login(), now) {
            settle_site();
            return Err(denied(refusal));
        }
        if let Err(refusal) = self.logins_by_account.begin(account, settings.login, now) {
            self.logins_by_ip.settle(&ip, false);
            settle_site();
            return Err(denied(refusal));
        }
        Ok(LoginAttempt {
            guard: self.clone(),
            account,
            site,
            settled: false,
        })
    }

    /// Drops idle counters (called every minute).
    pub fn sweep(&self, now: Instant) {
        let idle = Duration::from_secs(600);
        let settings = self.settings.load();
        self.claims_by_user.sweep(now, idle);
        self.claims_by_ip.sweep(now, idle);
        self.registrations_by_ip.sweep(now, Duration::from_secs(3600));
        self.registrations_by_site.sweep(now, Duration::from_secs(3600));
        self.logins_by_account.sweep(now, idle, settings.login);
        self.logins_by_ip.sweep(now, idle, settings.address_login());
        self.logins_by_site.sweep(now, idle, settings.site_login());
        self.logins_succeeded.sweep(now, idle);
        self.store_reads_by_user.sweep(now, idle);
    }

    /// `(table, entries, capacity)` of every table, for `/metrics`.
    pub fn tables(&self) -> [(&'static str, usize, usize); 9] {
        [
            (
                "claims_by_user",
                self.claims_by_user.len(),
                self.claims_by_user.capacity(),
            ),
            ("claims_by_ip", self.claims_by_ip.len(), self.claims_by_ip.capacity()),
            (
                "registrations_by_ip",
                self.registrations_by_ip.len(),
                self.registrations_by_ip.capacity(),
            ),
            (
                "registrations_by_site",
                self.registrations_by_site.len(),
                self.registrations_by_site.capacity(),
            ),
            (
                "logins_by_account",
                self.logins_by_account.len(),
                self.logins_by_account.capacity(),
            ),
            ("logins_by_ip", self.logins_by_ip.len(), self.logins_by_ip.capacity()),
            (
                "logins_by_site",
                self.logins_by_site.len(),
                self.logins_by_site.capacity(),
            ),
            (
                "logins_succeeded",
                self.logins_succeeded.len(),
                self.logins_succeeded.capacity(),
            ),
            (
                "store_reads_by_user",
                self.store_reads_by_user.len(),
                self.store_reads_by_user.capacity(),
            ),
        ]
    }
}

/// 128 bits of SHA-256: a fixed-size stand-in for an identity key.
fn digest(key: &str) -> [u8; 16] {
    use sha2::{Digest, Sha256};
    let full = Sha256::digest(key.as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&full[..16]);
    out
}

/// One `X-Forwarded-For` hop: an address, `ip:port` or `[v6]:port`.
fn parse_hop(hop: &[u8]) -> Option<IpAddr> {
    let hop = std::str::from_utf8(hop).ok()?.trim();
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

/// The host of `authority` (`host`, `host:port`, `[v6]:port`), without the port.
fn host_of(authority: &str) -> &str {
    let authority = authority.trim();
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    authority.split(':').next().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(security: &str) -> Arc<Guard> {
        let config: Config = toml::from_str(&format!("[security]\n{security}")).unwrap();
        Arc::new(Guard::new(&config, HashSet::new()))
    }

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_bytes(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn an_unreadable_forwarded_chain_never_becomes_the_proxy() {
        let g = guard(r#"trusted_proxies = ["10.0.0.1"]"#);
        let proxy: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let xff = |v: &[u8]| g.client_ip(proxy, &headers(&[("x-forwarded-for", v)]));
        // nginx appends the real peer to whatever the client sent.
        assert_eq!(xff(b"\xc3\xa9, 203.0.113.9"), Ok("203.0.113.9".parse().unwrap()));
        assert_eq!(
            xff(b"1.1.1.1, 203.0.113.9, 10.0.0.1"),
            Ok("203.0.113.9".parse().unwrap())
        );
        assert_eq!(xff(b"[2001:db8::1]:443"), Ok("2001:db8::1".parse().unwrap()));
        assert_eq!(xff(b"203.0.113.9, junk"), Err(Denied::UnreadableForwardedFor));
        assert_eq!(xff(b"\xff"), Err(Denied::UnreadableForwardedFor));
        // From an untrusted peer the header is ignored.
        let stranger: SocketAddr = "198.51.100.7:1".parse().unwrap();
        let h = headers(&[("x-forwarded-for", b"junk")]);
        assert_eq!(g.client_ip(stranger, &h), Ok(stranger.ip()));
    }

    #[test]
    fn ipv6_clients_count_per_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(other));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(client_key(mapped), "192.0.2.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn cross_site_browser_requests_are_refused() {
        let g = guard(r#"allowed_origins = ["https://partner.example"]"#);
        let check = |pairs: &[(&str, &[u8])]| g.check_same_site(&headers(pairs));
        assert_eq!(check(&[]), Ok(()));
        assert_eq!(
            check(&[("host", b"t.example"), ("origin", b"https://t.example")]),
            Ok(())
        );
        assert_eq!(
            check(&[("host", b"t.example"), ("origin", b"http://T.example:8080")]),
            Ok(())
        );
        assert_eq!(
            check(&[("host", b"t.example"), ("origin", b"https://partner.example")]),
            Ok(())
        );
        assert_eq!(
            check(&[("host", b"t.example"), ("origin", b"https://evil.example")]),
            Err(Denied::CrossSite)
        );
        assert_eq!(
            check(&[("host", b"t.example"), ("origin", b"null")]),
            Err(Denied::CrossSite)
        );
        assert_eq!(check(&[("sec-fetch-site", b"cross-site")]), Err(Denied::CrossSite));
        assert_eq!(check(&[("sec-fetch-site", b"same-origin")]), Ok(()));
        // Written with the scheme's default port, which no browser sends.
        let g = guard(
            r#"allowed_origins = ["HTTPS://Partner.example:443", "http://old.example:80", "https://x.example:8443"]"#,
        );
        let check = |origin: &[u8]| g.check_same_site(&headers(&[("host", b"t.example"), ("origin", origin)]));
        assert_eq!(check(b"https://partner.example"), Ok(()));
        assert_eq!(check(b"http://old.example"), Ok(()));
        assert_eq!(check(b"https://x.example:8443"), Ok(()));
        assert_eq!(check(b"https://x.example"), Err(Denied::CrossSite));
    }

    #[test]
    fn a_victim_is_not_locked_out_by_another_addresses_failures() {
        let g = guard("login_max_failures = 2\nlogin_backoff = \"1h\"");
        let attacker: IpAddr = "198.51.100.1".parse().unwrap();
        let owner: IpAddr = "203.0.113.5".parse().unwrap();
        let t = Instant::now();
        for _ in 0..2 {
            g.begin_login("victim", attacker, t).unwrap().failed(t);
        }
        assert!(matches!(
            g.begin_login("victim", attacker, t),
            Err(Denied::LoginLocked(_))
        ));
        let attempt = g
            .begin_login("victim", owner, t)
            .expect("the owner's address has no failures");
        attempt.succeeded();
    }
}
