//! Checks of the node's own sections: `[server]`, `[storage]`, `[cluster]`,
//! `[journal]`, `[limits]`, `[auth]`, `[security]`, `[admin]`, `[log]`.

use super::report::{valid_id, Report, Seg, MAX_ID_LEN};
use crate::config::model::{
    Config, StorageMode, ADMIN_TOKEN_ENV, MAX_ARGON2_ITERATIONS, MAX_ARGON2_MEMORY_KIB, MONGODB_URI_ENV,
    PREVIOUS_SESSION_SECRET_ENV, REDIS_URL_ENV, SESSION_SECRET_ENV,
};

const K: fn(&'static str) -> Seg<'static> = Seg::Key;

/// Most lanes a node starts: far beyond any machine's cores, low enough that
/// a typo cannot ask for a hundred thousand threads.
const MAX_THREADS: usize = 1024;
/// The most claims a group commit takes (journal or Redis): its buffer is
/// allocated whole at start, so a typo's billion aborted the node.
const MAX_BATCH: usize = 1 << 16;
/// The most claims queued for the journal writer (or the Redis committer):
/// the queue is allocated whole at start, some hundred bytes a slot.
const MAX_QUEUE: usize = 1 << 22;

pub(super) fn server(r: &mut Report<'_>, config: &Config) {
    let s = &config.server;
    if s.max_connections_per_ip == 0 {
        r.add(
            &[K("server"), K("max_connections_per_ip")],
            "server.max_connections_per_ip must be at least 1".into(),
        );
    }
    if s.max_connections == 0 {
        r.add(
            &[K("server"), K("max_connections")],
            "server.max_connections must be at least 1".into(),
        );
    }
    if s.threads > MAX_THREADS {
        r.add(
            &[K("server"), K("threads")],
            format!("server.threads must be at most {MAX_THREADS} (0: one per CPU core)"),
        );
    }
    if let Some(node) = &s.node_id {
        if !valid_id(node) {
            r.add(
                &[K("server"), K("node_id")],
                format!("server.node_id `{node}` must be 1-{MAX_ID_LEN} letters, digits, '-', '_' or '.'"),
            );
        }
    }
    if s.max_body.0 < 256 {
        r.add(
            &[K("server"), K("max_body")],
            "server.max_body must be at least 256 bytes".into(),
        );
    }
    if s.header_read_timeout.0.is_zero() || s.request_timeout.0.is_zero() || s.write_timeout.0.is_zero() {
        r.add(&[K("server")], "server timeouts must be greater than zero".into());
    }
    if s.write_timeout.0 > std::time::Duration::from_secs(3600) {
        r.add(
            &[K("server"), K("write_timeout")],
            "server.write_timeout must be at most 1h: a client that stops reading holds its connection that long"
                .into(),
        );
    }
}

pub(super) fn storage(r: &mut Report<'_>, config: &Config) {
    let s = &config.storage;
    if s.mode != StorageMode::Cluster {
        return;
    }
    if s.redis_url().is_none() {
        r.add(
            &[K("storage"), K("mode")],
            format!("storage.mode = \"cluster\" needs storage.redis_url (or {REDIS_URL_ENV})"),
        );
    }
    if s.mongodb_uri().is_none() {
        r.add(
            &[K("storage"), K("mode")],
            format!("storage.mode = \"cluster\" needs storage.mongodb_uri (or {MONGODB_URI_ENV})"),
        );
    }
    if !valid_id(&s.database) {
        r.add(
            &[K("storage"), K("database")],
            "storage.database must be a plain name".into(),
        );
    }
}

pub(super) fn cluster(r: &mut Report<'_>, config: &Config) {
    let c = &config.cluster;
    if c.lease_min_batch == 0 || c.lease_max_batch < c.lease_min_batch || c.commit_batch == 0 || c.mongo_batch == 0 {
        r.add(
            &[K("cluster")],
            "cluster batch sizes must be at least 1, and lease_max_batch at least lease_min_batch".into(),
        );
    }
    if c.commit_batch > MAX_BATCH {
        r.add(
            &[K("cluster"), K("commit_batch")],
            format!("cluster.commit_batch must be at most {MAX_BATCH}"),
        );
    }
    if c.lease_ttl.0 < std::time::Duration::from_secs(1) || c.max_backlog == 0 {
        r.add(
            &[K("cluster")],
            "cluster.lease_ttl must be at least 1s and cluster.max_backlog at least 1".into(),
        );
    }
    // Its worker ticks at it (a zero period stops the worker: other nodes'
    // logouts then never reach this one), and leases renew at least as often.
    if c.refresh_interval.0 < std::time::Duration::from_millis(100) {
        r.add(
            &[K("cluster"), K("refresh_interval")],
            "cluster.refresh_interval must be at least 100ms".into(),
        );
    }
}

pub(super) fn journal(r: &mut Report<'_>, config: &Config) {
    let j = &config.journal;
    if j.max_batch == 0 || j.queue_capacity == 0 {
        r.add(
            &[K("journal")],
            "journal.max_batch and journal.queue_capacity must be at least 1".into(),
        );
    }
    if j.max_batch > MAX_BATCH {
        r.add(
            &[K("journal"), K("max_batch")],
            format!("journal.max_batch must be at most {MAX_BATCH}"),
        );
    }
    if j.queue_capacity > MAX_QUEUE {
        r.add(
            &[K("journal"), K("queue_capacity")],
            format!("journal.queue_capacity must be at most {MAX_QUEUE} (it is allocated whole at start)"),
        );
    }
    if j.segment_size.0 < 4096 {
        r.add(
            &[K("journal"), K("segment_size")],
            "journal.segment_size must be at least 4KiB".into(),
        );
    }
    if j.preallocate.0 > j.segment_size.0 {
        r.add(
            &[K("journal"), K("preallocate")],
            "journal.preallocate must not exceed journal.segment_size".into(),
        );
    }
}

pub(super) fn limits(r: &mut Report<'_>, config: &Config) {
    if config.limits.max_in_flight_claims == 0 {
        r.add(
            &[K("limits"), K("max_in_flight_claims")],
            "limits.max_in_flight_claims must be at least 1".into(),
        );
    }
    if config.limits.max_in_flight_per_activity == 0 {
        r.add(
            &[K("limits"), K("max_in_flight_per_activity")],
            "limits.max_in_flight_per_activity must be at least 1: at 0 every claim is refused".into(),
        );
    }
}

/// The most logins and registrations that may wait for a hashing turn.
const MAX_HASH_QUEUE: usize = 1 << 20;

pub(super) fn auth(r: &mut Report<'_>, config: &Config) {
    let a = &config.auth;
    if !(8..=MAX_ARGON2_MEMORY_KIB).contains(&a.argon2_memory_kib) {
        r.add(
            &[K("auth"), K("argon2_memory_kib")],
            format!("auth.argon2_memory_kib must be 8-{MAX_ARGON2_MEMORY_KIB} (1 GiB)"),
        );
    }
    if !(1..=MAX_ARGON2_ITERATIONS).contains(&a.argon2_iterations) {
        r.add(
            &[K("auth"), K("argon2_iterations")],
            format!("auth.argon2_iterations must be 1-{MAX_ARGON2_ITERATIONS}"),
        );
    }
    if a.hash_queue > MAX_HASH_QUEUE {
        r.add(
            &[K("auth"), K("hash_queue")],
            format!("auth.hash_queue must be at most {MAX_HASH_QUEUE}"),
        );
    }
    for (key, secret) in [
        ("session_secret", &a.session_secret),
        ("previous_session_secret", &a.previous_session_secret),
    ] {
        if let Some(why) = secret.as_deref().and_then(weak_secret) {
            r.add(&[K("auth"), K(key)], format!("auth.{key} {why}"));
        }
    }
    // A secret from the environment overrides the file's and meets the same bar.
    for (var, section) in [
        (SESSION_SECRET_ENV, "auth"),
        (PREVIOUS_SESSION_SECRET_ENV, "auth"),
        (ADMIN_TOKEN_ENV, "admin"),
    ] {
        let weak = std::env::var(var)
            .ok()
            .filter(|v| !v.is_empty())
            .and_then(|v| weak_secret(&v));
        if let Some(why) = weak {
            r.add(&[K(section)], format!("the environment variable {var} {why}"));
        }
    }
    if a.max_concurrent_hashes.is_some_and(|n| n == 0 || n > 1024) {
        r.add(
            &[K("auth"), K("max_concurrent_hashes")],
            "auth.max_concurrent_hashes must be 1-1024".into(),
        );
    }
    if config.session_ttl_ms() <= 0 {
        r.add(
            &[K("auth"), K("session_ttl")],
            "auth.session_ttl must be greater than zero".into(),
        );
    }
}

pub(super) fn security(r: &mut Report<'_>, config: &Config) {
    let k = Seg::Key;
    let s = &config.security;
    let rates = [
        ("claim_rate_per_user", s.claim_rate_per_user),
        ("claim_rate_per_ip", s.claim_rate_per_ip),
    ];
    for (key, rate) in rates {
        if !(rate.is_finite() && rate > 0.0) {
            r.add(
                &[k("security"), k(key)],
                format!("security.{key} must be a positive number"),
            );
        }
    }
    if s.claim_burst_per_user == 0 || s.claim_burst_per_ip == 0 || s.registrations_per_ip_per_hour == 0 {
        r.add(
            &[k("security")],
            "security bursts and registrations_per_ip_per_hour must be at least 1".into(),
        );
    }
    if config.auth.hashes_per_ip == 0 {
        r.add(
            &[k("auth"), k("hashes_per_ip")],
            "auth.hashes_per_ip must be at least 1: at 0 nobody could log in or register".into(),
        );
    }
    // A lockout is the backoff doubled per failure, capped by the max.
    if s.login_backoff.0.is_zero() || s.login_backoff_max.0.is_zero() {
        r.add(
            &[k("security"), k("login_backoff_max")],
            "security.login_backoff and login_backoff_max must be greater than zero: a lockout of zero locks \
             nobody out"
                .into(),
        );
    }
    if s.login_max_failures == 0 {
        r.add(
            &[k("security"), k("login_max_failures")],
            "security.login_max_failures must be at least 1".into(),
        );
    }
    if s.max_tracked_clients < 64 {
        r.add(
            &[k("security"), k("max_tracked_clients")],
            "security.max_tracked_clients must be at least 64".into(),
        );
    }
    for origin in &s.allowed_origins {
        let valid = origin.split_once("://").is_some_and(|(scheme, host)| {
            matches!(scheme, "http" | "https") && !host.is_empty() && !host.contains('/')
        });
        if !valid {
            r.add(
                &[k("security"), k("allowed_origins")],
                format!("security.allowed_origins: `{origin}` is not an origin like https://tickets.example.com"),
            );
        }
    }
    if s.claim_token_ttl.0.as_secs() < 1 {
        r.add(
            &[k("security"), k("claim_token_ttl")],
            "security.claim_token_ttl must be at least 1s".into(),
        );
    }
}

/// `log.level` in `RUST_LOG` syntax. A bare word that is no level reads as
/// a target name: `"warning"` logs only a target called `warning`, and the
/// node printed nothing, not even why a reload was refused. So a filter
/// must set a level for everything (`warn`, `3`, `info,hyper=off`) or name
/// a target of this crate (`ticketd`, `ticketd::http=debug`).
pub(super) fn log(r: &mut Report<'_>, config: &Config) {
    use std::str::FromStr;
    use tracing_subscriber::filter::LevelFilter;
    let level = &config.log.level;
    let directives: Vec<&str> = level.split(',').map(str::trim).filter(|d| !d.is_empty()).collect();
    let reaches_the_node = directives
        .iter()
        .any(|d| LevelFilter::from_str(d).is_ok() || d.starts_with(env!("CARGO_CRATE_NAME")) || d.starts_with('['));
    let problem = match tracing_subscriber::EnvFilter::builder().parse(level) {
        Err(e) => Some(e.to_string()),
        Ok(_) if !reaches_the_node => Some(format!(
            "it sets no level for the node's own lines (a word that is no level, such as `{}`, names a target)",
            directives.first().copied().unwrap_or_default()
        )),
        Ok(_) => None,
    };
    if let Some(problem) = problem {
        r.add(
            &[K("log"), K("level")],
            format!(
                "log.level `{level}`: {problem}; use a level (trace, debug, info, warn, error, off) and/or \
                 target=level directives"
            ),
        );
    }
}

/// Why `secret` is no secret to sign or compare with, if it is not: too
/// short, or whitespace at an end — forty spaces passed the length check,
/// and an admin token ending in a stray space or newline (an env file's)
/// can never be sent, since HTTP trims header values.
fn weak_secret(secret: &str) -> Option<&'static str> {
    if secret.len() < 32 {
        Some("must be at least 32 characters")
    } else if secret.trim() != secret {
        Some("must not begin or end with whitespace (nor be blank)")
    } else {
        None
    }
}

pub(super) fn admin(r: &mut Report<'_>, config: &Config) {
    let k = Seg::Key;
    if let Some(token) = &config.admin.token {
        if let Some(why) = weak_secret(token) {
            r.add(&[k("admin"), k("token")], format!("admin.token {why}"));
        }
    }
    // Whether the token is there is `serve`'s to check, not the file's:
    // the token belongs in the node's environment (the unit's env file,
    // mode 0600), which an operator's `import` or `export` does not have.
}
