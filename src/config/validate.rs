//! Semantic checks that serde cannot express, each reported with its line.
//!
//! Problems are collected, not returned at the first one, so an organiser
//! fixing a large config sees everything at once. Lines come from a second,
//! span-keeping parse of the same text with `toml_edit`.

use std::{collections::HashSet, fmt::Write as _};

use toml_edit::{ImDocument, Item, Table};

use super::{Config, TicketConfig, TimeSpec};

/// Longest accepted activity or ticket id, in bytes.
const MAX_ID_LEN: usize = 64;
/// Longest accepted code, in bytes.
const MAX_CODE_LEN: usize = 128;
/// Most codes one ticket may generate.
const MAX_GENERATE: u32 = 10_000_000;

/// One thing wrong with a config, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line in the config file, when known.
    pub line: Option<usize>,
    /// What is wrong, as a sentence.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

pub(super) fn list(problems: &[Problem]) -> String {
    let mut out = String::new();
    for p in problems {
        let _ = writeln!(out, "  - {p}");
    }
    out.trim_end().to_owned()
}

/// A path into the TOML document: `activity[1].ticket[0].codes`.
#[derive(Clone, Copy)]
enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

struct Lines<'t> {
    text: &'t str,
    doc: Option<ImDocument<&'t str>>,
}

impl Lines<'_> {
    /// The line of the deepest item on `path` that the document has.
    fn of(&self, path: &[Seg<'_>]) -> Option<usize> {
        let doc = self.doc.as_ref()?;
        let mut table: &Table = doc.as_table();
        let mut best = None;
        let mut segs = path.iter().peekable();
        while let Some(seg) = segs.next() {
            let Seg::Key(key) = *seg else { break };
            let Some(item) = table.get(key) else { break };
            best = item.span().or(best);
            match (item, segs.peek()) {
                (Item::Table(t), _) => table = t,
                (Item::ArrayOfTables(array), Some(Seg::Index(i))) => {
                    let Some(t) = array.get(*i) else { break };
                    best = t.span().or(best);
                    table = t;
                    segs.next();
                }
                _ => break,
            }
        }
        self.line_at(best)
    }

    fn line_at(&self, span: Option<std::ops::Range<usize>>) -> Option<usize> {
        let start = span?.start;
        Some(self.text.get(..start)?.matches('\n').count() + 1)
    }
}

struct Report<'t> {
    lines: Lines<'t>,
    problems: Vec<Problem>,
}

impl Report<'_> {
    fn add(&mut self, path: &[Seg<'_>], message: String) {
        let line = self.lines.of(path);
        self.problems.push(Problem { line, message });
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Checks `config` against its source `text`; reads `codes_file` lists into
/// `codes`. Returns every problem found (empty when the config is usable).
pub(super) fn validate(config: &mut Config, text: &str) -> Vec<Problem> {
    let mut r = Report {
        lines: Lines {
            text,
            doc: ImDocument::parse(text).ok(),
        },
        problems: Vec::new(),
    };
    let k = Seg::Key;

    if config.server.max_connections == 0 {
        r.add(
            &[k("server"), k("max_connections")],
            "server.max_connections must be at least 1".into(),
        );
    }
    if let Some(node) = &config.server.node_id {
        if !valid_id(node) {
            r.add(
                &[k("server"), k("node_id")],
                format!("server.node_id `{node}` must be 1-{MAX_ID_LEN} letters, digits, '-', '_' or '.'"),
            );
        }
    }
    if config.storage.mode == super::StorageMode::Cluster {
        if config.storage.redis_url().is_none() {
            r.add(
                &[k("storage"), k("mode")],
                format!(
                    "storage.mode = \"cluster\" needs storage.redis_url (or {})",
                    super::REDIS_URL_ENV
                ),
            );
        }
        if config.storage.mongodb_uri().is_none() {
            r.add(
                &[k("storage"), k("mode")],
                format!(
                    "storage.mode = \"cluster\" needs storage.mongodb_uri (or {})",
                    super::MONGODB_URI_ENV
                ),
            );
        }
        if !valid_id(&config.storage.database) {
            r.add(
                &[k("storage"), k("database")],
                "storage.database must be a plain name".into(),
            );
        }
    }
    let c = &config.cluster;
    if c.lease_min_batch == 0 || c.lease_max_batch < c.lease_min_batch || c.commit_batch == 0 || c.mongo_batch == 0 {
        r.add(
            &[k("cluster")],
            "cluster batch sizes must be at least 1, and lease_max_batch at least lease_min_batch".into(),
        );
    }
    if c.lease_ttl.0 < std::time::Duration::from_secs(1) || c.max_backlog == 0 {
        r.add(
            &[k("cluster")],
            "cluster.lease_ttl must be at least 1s and cluster.max_backlog at least 1".into(),
        );
    }
    if config.server.max_body.0 < 256 {
        r.add(
            &[k("server"), k("max_body")],
            "server.max_body must be at least 256 bytes".into(),
        );
    }
    if config.server.header_read_timeout.0.is_zero() || config.server.request_timeout.0.is_zero() {
        r.add(&[k("server")], "server timeouts must be greater than zero".into());
    }
    if config.journal.max_batch == 0 || config.journal.queue_capacity == 0 {
        r.add(
            &[k("journal")],
            "journal.max_batch and journal.queue_capacity must be at least 1".into(),
        );
    }
    if config.journal.segment_size.0 < 4096 {
        r.add(
            &[k("journal"), k("segment_size")],
            "journal.segment_size must be at least 4KiB".into(),
        );
    }
    if config.limits.max_in_flight_claims == 0 {
        r.add(
            &[k("limits"), k("max_in_flight_claims")],
            "limits.max_in_flight_claims must be at least 1".into(),
        );
    }
    if config.auth.argon2_memory_kib < 8 {
        r.add(
            &[k("auth"), k("argon2_memory_kib")],
            "auth.argon2_memory_kib must be at least 8".into(),
        );
    }
    if config.auth.argon2_iterations == 0 {
        r.add(
            &[k("auth"), k("argon2_iterations")],
            "auth.argon2_iterations must be at least 1".into(),
        );
    }
    if let Some(secret) = &config.auth.session_secret {
        if secret.len() < 32 {
            r.add(
                &[k("auth"), k("session_secret")],
                "auth.session_secret must be at least 32 characters".into(),
            );
        }
    }
    if config.session_ttl_ms() <= 0 {
        r.add(
            &[k("auth"), k("session_ttl")],
            "auth.session_ttl must be greater than zero".into(),
        );
    }

    check_security(&mut r, config);

    let mut activity_ids = HashSet::new();
    let mut ticket_ids = HashSet::new();
    let mut all_codes: HashSet<String> = HashSet::new();
    let base_dir = config.base_dir.clone();
    for (ai, act) in config.activities.iter_mut().enumerate() {
        let at = [k("activity"), Seg::Index(ai)];
        let field = |f: &'static str| [k("activity"), Seg::Index(ai), k(f)];
        if !valid_id(&act.id) {
            r.add(
                &field("id"),
                format!(
                    "activity id `{}` must be 1-{MAX_ID_LEN} letters, digits, '-', '_' or '.'",
                    act.id
                ),
            );
        } else if !activity_ids.insert(act.id.clone()) {
            r.add(&field("id"), format!("activity id `{}` is used twice", act.id));
        }
        if act.name.trim().is_empty() {
            r.add(&field("name"), format!("activity `{}` needs a name", act.id));
        }
        let relative = |t: TimeSpec| matches!(t, TimeSpec::Relative(_));
        if config.storage.mode == super::StorageMode::Cluster && (relative(act.start_time) || relative(act.end_time)) {
            r.add(
                &field("start_time"),
                format!(
                    "activity `{}`: cluster mode needs absolute times (RFC 3339); a relative time counts from each node's own start, so nodes would disagree",
                    act.id
                ),
            );
        }
        if !ends_after_start(act.start_time, act.end_time) {
            r.add(
                &field("end_time"),
                format!("activity `{}` must end after it starts", act.id),
            );
        }
        if act.pow_difficulty > 32 {
            r.add(
                &field("pow_difficulty"),
                format!("activity `{}`: pow_difficulty must be 0-32 bits", act.id),
            );
        }
        if act.per_user_limit == 0 || act.per_user_limit > 1000 {
            r.add(
                &field("per_user_limit"),
                format!("activity `{}`: per_user_limit must be 1-1000", act.id),
            );
        }
        if act.tickets.is_empty() {
            r.add(&at, format!("activity `{}` has no [[activity.ticket]]", act.id));
        }
        for (ti, ticket) in act.tickets.iter_mut().enumerate() {
            let tpath = |f: &'static str| [k("activity"), Seg::Index(ai), k("ticket"), Seg::Index(ti), k(f)];
            if !valid_id(&ticket.id) {
                r.add(
                    &tpath("id"),
                    format!(
                        "ticket id `{}` must be 1-{MAX_ID_LEN} letters, digits, '-', '_' or '.'",
                        ticket.id
                    ),
                );
            } else if !ticket_ids.insert(ticket.id.clone()) {
                r.add(
                    &tpath("id"),
                    format!(
                        "ticket id `{}` is used twice (ticket ids are unique across activities)",
                        ticket.id
                    ),
                );
            }
            if ticket.name.trim().is_empty() {
                r.add(&tpath("name"), format!("ticket `{}` needs a name", ticket.id));
            }
            if let (Some(s), Some(e)) = (ticket.start_time, ticket.end_time) {
                if !ends_after_start(s, e) {
                    r.add(
                        &tpath("end_time"),
                        format!("ticket `{}` must end after it starts", ticket.id),
                    );
                }
            }
            let sources = [
                ticket.codes.is_some(),
                ticket.codes_file.is_some(),
                ticket.generate.is_some(),
            ];
            if sources.iter().filter(|s| **s).count() != 1 {
                r.add(
                    &tpath("id"),
                    format!(
                        "ticket `{}` needs exactly one of `codes`, `codes_file` or `generate`",
                        ticket.id
                    ),
                );
                continue;
            }
            if let Some(n) = ticket.generate {
                if n == 0 || n > MAX_GENERATE {
                    r.add(
                        &tpath("generate"),
                        format!("ticket `{}`: generate must be 1-{MAX_GENERATE}", ticket.id),
                    );
                }
            }
            if let Some(file) = &ticket.codes_file {
                let full = base_dir.join(file);
                match std::fs::read_to_string(&full) {
                    Ok(text) => {
                        ticket.codes = Some(
                            text.lines()
                                .map(str::trim)
                                .filter(|l| !l.is_empty())
                                .map(str::to_owned)
                                .collect(),
                        );
                    }
                    Err(e) => {
                        r.add(
                            &tpath("codes_file"),
                            format!("ticket `{}`: cannot read codes_file {}: {e}", ticket.id, full.display()),
                        );
                        continue;
                    }
                }
            }
            check_codes(&mut r, &tpath("codes"), ticket, &mut all_codes);
        }
    }
    r.problems
}

fn check_security(r: &mut Report<'_>, config: &Config) {
    let k = Seg::Key;
    let s = &config.security;
    for (key, list) in [("trusted_proxies", &s.trusted_proxies), ("blocked_ips", &s.blocked_ips)] {
        for entry in list {
            if let Err(e) = entry.parse::<crate::auth::ipnet::IpNet>() {
                r.add(&[k("security"), k(key)], format!("security.{key}: {e}"));
            }
        }
    }
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
    if s.login_max_failures == 0 {
        r.add(
            &[k("security"), k("login_max_failures")],
            "security.login_max_failures must be at least 1".into(),
        );
    }
    if s.claim_token_ttl.0.as_secs() < 1 {
        r.add(
            &[k("security"), k("claim_token_ttl")],
            "security.claim_token_ttl must be at least 1s".into(),
        );
    }
    if let Some(prev) = &config.auth.previous_session_secret {
        if prev.len() < 32 {
            r.add(
                &[k("auth"), k("previous_session_secret")],
                "auth.previous_session_secret must be at least 32 characters".into(),
            );
        }
    }
    if let Some(token) = &config.admin.token {
        if token.len() < 32 {
            r.add(
                &[k("admin"), k("token")],
                "admin.token must be at least 32 characters".into(),
            );
        }
    }
    let env_token = std::env::var(crate::app::ADMIN_TOKEN_ENV).is_ok_and(|t| !t.is_empty());
    if config.admin.listen.is_some() && config.admin.token.is_none() && !env_token {
        r.add(
            &[k("admin"), k("listen")],
            format!(
                "admin.listen is set but there is no admin token: set admin.token or {}",
                crate::app::ADMIN_TOKEN_ENV
            ),
        );
    }
}

fn check_codes(r: &mut Report<'_>, path: &[Seg<'_>], ticket: &TicketConfig, all: &mut HashSet<String>) {
    let Some(codes) = &ticket.codes else { return };
    if codes.is_empty() && ticket.codes_file.is_some() {
        r.add(path, format!("ticket `{}`: codes_file has no codes", ticket.id));
    }
    let mut reported = 0;
    for code in codes {
        let bad = if code.is_empty() || code.len() > MAX_CODE_LEN {
            Some(format!(
                "ticket `{}`: code `{code}` must be 1-{MAX_CODE_LEN} bytes",
                ticket.id
            ))
        } else if code.chars().any(|c| c.is_control() || c.is_whitespace()) {
            Some(format!(
                "ticket `{}`: code `{}` contains whitespace or control characters",
                ticket.id,
                code.escape_debug()
            ))
        } else if !all.insert(code.clone()) {
            Some(format!(
                "ticket `{}`: code `{code}` appears twice (a code is unique across all tickets)",
                ticket.id
            ))
        } else {
            None
        };
        if let Some(message) = bad {
            reported += 1;
            if reported <= 20 {
                r.add(path, message);
            }
        }
    }
    if reported > 20 {
        r.add(
            path,
            format!("ticket `{}`: {} more code problems not shown", ticket.id, reported - 20),
        );
    }
}

/// Relative and absolute times cannot be compared without a start moment;
/// only same-kind pairs are checked here, mixed pairs at catalog build.
fn ends_after_start(start: TimeSpec, end: TimeSpec) -> bool {
    match (start, end) {
        (TimeSpec::Relative(s), TimeSpec::Relative(e)) => e > s,
        (TimeSpec::Absolute(s), TimeSpec::Absolute(e)) => e > s,
        _ => true,
    }
}

impl Config {
    /// `auth.session_ttl` in milliseconds.
    pub fn session_ttl_ms(&self) -> i64 {
        i64::try_from(self.auth.session_ttl.0.as_millis()).unwrap_or(i64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Config, ConfigError};

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("test.toml"), Default::default())
    }

    #[test]
    fn reports_every_problem_with_its_line() {
        let text = r#"
[server]
listen = "127.0.0.1:0"

[[activity]]
id = "a"
name = "A"
start_time = "+1h"
end_time = "+1m"
per_user_limit = 0
  [[activity.ticket]]
  id = "t"
  name = "T"
  codes = ["X1", "X1"]

[[activity]]
id = "a"
name = "dup"
start_time = "+0s"
end_time = "+1h"
  [[activity.ticket]]
  id = "t"
  name = "T2"
  generate = 5
"#;
        let Err(ConfigError::Invalid { problems, .. }) = load(text) else {
            panic!("must be invalid")
        };
        let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert!(
            shown.contains(&"line 9: activity `a` must end after it starts".to_owned()),
            "{shown:?}"
        );
        assert!(
            shown
                .iter()
                .any(|p| p.starts_with("line 10: ") && p.contains("per_user_limit")),
            "{shown:?}"
        );
        assert!(
            shown
                .iter()
                .any(|p| p.starts_with("line 14: ") && p.contains("appears twice")),
            "{shown:?}"
        );
        assert!(
            shown
                .iter()
                .any(|p| p.starts_with("line 17: ") && p.contains("used twice")),
            "{shown:?}"
        );
        assert!(
            shown
                .iter()
                .any(|p| p.starts_with("line 22: ") && p.contains("ticket id `t` is used twice")),
            "{shown:?}"
        );
    }

    #[test]
    fn unknown_keys_are_refused_with_a_line() {
        let err = load("[server]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("line 3"), "{text}");
        assert!(text.contains("lisen"), "{text}");
    }

    #[test]
    fn the_bundled_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
        Config::load(&path).unwrap();
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
            let _ = load(&text);
        }

        #[test]
        fn dropping_any_line_of_the_bundled_config_never_panics(skip in 0usize..200) {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
            let text = std::fs::read_to_string(path).unwrap();
            let cut: String = text.lines().enumerate().filter(|(i, _)| *i != skip).map(|(_, l)| format!("{l}\n")).collect();
            if let Err(e) = load(&cut) {
                proptest::prop_assert!(!e.to_string().is_empty());
            }
        }
    }
}
