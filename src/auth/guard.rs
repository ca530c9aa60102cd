//! The guard: who may knock at all, and how often.
//!
//! It answers, cheaply and before any real work: is this client address or
//! user blocked; is this address or user over its claim rate (token
//! buckets); is this username or address locked out after failed logins
//! (growing backoff); is this address registering too many accounts. The
//! client address is the TCP peer, or — only when the peer is a configured
//! trusted proxy — the nearest untrusted hop in `X-Forwarded-For`.
//!
//! Settings are swapped whole on reload; the counters live on.

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use http::HeaderMap;

use super::ratelimit::{Backoff, BackoffPolicy, Rate, TokenBuckets};
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
}

struct Settings {
    trusted: Vec<IpNet>,
    blocked_ips: Vec<IpNet>,
    blocked_usernames: HashSet<String>,
    blocked_user_ids: HashSet<u64>,
    user_rate: Rate,
    ip_rate: Rate,
    register_rate: Rate,
    login: BackoffPolicy,
}

impl Settings {
    fn from_config(config: &Config, blocked_user_ids: HashSet<u64>) -> Settings {
        let s = &config.security;
        Settings {
            trusted: s.trusted_proxies.clone(),
            blocked_ips: s.blocked_ips.clone(),
            blocked_usernames: s.blocked_users.iter().cloned().collect(),
            blocked_user_ids,
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
}

/// Blocklists, rate limits and login backoff.
pub struct Guard {
    settings: ArcSwap<Settings>,
    claims_by_user: TokenBuckets<u64>,
    claims_by_ip: TokenBuckets<IpAddr>,
    registrations_by_ip: TokenBuckets<IpAddr>,
    logins_by_name: Backoff<String>,
    logins_by_ip: Backoff<IpAddr>,
}

impl Guard {
    /// A guard with `config`'s `[security]` settings; `blocked_user_ids` are
    /// the ids of `security.blocked_users` (resolved by the caller from the store).
    pub fn new(config: &Config, blocked_user_ids: HashSet<u64>) -> Guard {
        Guard {
            settings: ArcSwap::from_pointee(Settings::from_config(config, blocked_user_ids)),
            claims_by_user: TokenBuckets::default(),
            claims_by_ip: TokenBuckets::default(),
            registrations_by_ip: TokenBuckets::default(),
            logins_by_name: Backoff::default(),
            logins_by_ip: Backoff::default(),
        }
    }

    /// Applies reloaded settings; counters are kept.
    pub fn apply(&self, config: &Config, blocked_user_ids: HashSet<u64>) {
        self.settings
            .store(Arc::new(Settings::from_config(config, blocked_user_ids)));
    }

    /// The client's address: the peer, or the nearest untrusted
    /// `X-Forwarded-For` hop when the peer is a trusted proxy.
    pub fn client_ip(&self, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
        let s = self.settings.load();
        let peer_ip = peer.ip();
        if !any_contains(&s.trusted, peer_ip) {
            return peer_ip;
        }
        let Some(xff) = headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) else {
            return peer_ip;
        };
        let hops: Vec<IpAddr> = xff.split(',').filter_map(|h| h.trim().parse().ok()).collect();
        hops.iter()
            .rev()
            .find(|ip| !any_contains(&s.trusted, **ip))
            .or(hops.first())
            .copied()
            .unwrap_or(peer_ip)
    }

    /// Refuses blocked addresses.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Denied> {
        if any_contains(&self.settings.load().blocked_ips, ip) {
            return Err(Denied::Blocked);
        }
        Ok(())
    }

    /// Whether `username` is blocked.
    pub fn is_blocked_user(&self, username: &str) -> bool {
        self.settings.load().blocked_usernames.contains(username)
    }

    /// Whether the user with this id is blocked.
    pub fn is_blocked_id(&self, user_id: u64) -> bool {
        self.settings.load().blocked_user_ids.contains(&user_id)
    }

    /// Takes a claim token from the address's bucket.
    pub fn admit_claim_from(&self, ip: IpAddr, now: Instant) -> Result<(), Denied> {
        let rate = self.settings.load().ip_rate;
        self.claims_by_ip.take(ip, rate, now).map_err(Denied::RateLimited)
    }

    /// Takes a claim token from the user's bucket.
    pub fn admit_claim_by(&self, user_id: u64, now: Instant) -> Result<(), Denied> {
        let rate = self.settings.load().user_rate;
        self.claims_by_user
            .take(user_id, rate, now)
            .map_err(Denied::RateLimited)
    }

    /// Takes a registration token from the address's bucket.
    pub fn admit_registration(&self, ip: IpAddr, now: Instant) -> Result<(), Denied> {
        let rate = self.settings.load().register_rate;
        self.registrations_by_ip
            .take(ip, rate, now)
            .map_err(Denied::RateLimited)
    }

    /// Refuses a login attempt while the username or the address is locked out.
    pub fn check_login(&self, username: &str, ip: IpAddr, now: Instant) -> Result<(), Denied> {
        self.logins_by_name
            .check(&username.to_owned(), now)
            .and_then(|()| self.logins_by_ip.check(&ip, now))
            .map_err(Denied::LoginLocked)
    }

    /// Counts a failed login against the username and the address.
    pub fn login_failed(&self, username: &str, ip: IpAddr, now: Instant) {
        let policy = self.settings.load().login;
        self.logins_by_name.fail(username.to_owned(), policy, now);
        // An address gets more room than one account: several people share NATs.
        let ip_policy = BackoffPolicy {
            max_failures: policy.max_failures.saturating_mul(4),
            ..policy
        };
        self.logins_by_ip.fail(ip, ip_policy, now);
    }

    /// Forgets the username's failures after a successful login.
    pub fn login_succeeded(&self, username: &str) {
        self.logins_by_name.clear(&username.to_owned());
    }

    /// Drops idle counters (called every minute).
    pub fn sweep(&self, now: Instant) {
        let idle = Duration::from_secs(600);
        self.claims_by_user.sweep(now, idle);
        self.claims_by_ip.sweep(now, idle);
        self.registrations_by_ip.sweep(now, Duration::from_secs(3600));
        self.logins_by_name.sweep(now, idle);
        self.logins_by_ip.sweep(now, idle);
    }
}
