//! The configuration tree, modelled once.
//!
//! `config.toml` is parsed into [`Config`] with `deny_unknown_fields`, so a
//! misspelt key is an error, not a silently ignored setting. Every field has a
//! documented default (a named function in [`model`]). [`Config::load`] reads the
//! file, resolves `codes_file` lists relative to the config's directory and
//! runs `validate::validate`, which collects *every* problem with
//! the line it came from — `ticketd check-config` prints them all.
//!
//! Reloading (SIGHUP) builds a new `Config` the same way and then asks
//! [`Config::restart_only_changes`] whether it touches settings that only a
//! restart can apply (the listen address, the node's id, connection and
//! thread counts, storage, journal, `[cluster]`, session secrets, hashing
//! limits, `[admin]`, `[log]`: the list is that function's); such a reload
//! is refused whole, naming each.
//!
//! - [`model`]: the tree itself (one struct per section, defaults, env overrides);
//! - [`units`]: durations, sizes, address ranges, activity times;
//! - `validate`: the checks, section by section, with line numbers.

pub mod model;
pub mod units;
mod validate;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

pub use model::*;
pub use units::{any_contains, ByteSize, HumanDuration, IpNet, TimeSpec};
pub use validate::Problem;

/// Checks activity definitions read from a cluster's MongoDB (see
/// `validate::definitions`); every problem, listed, on failure.
pub fn check_definitions(activities: &[ActivityConfig]) -> Result<(), ConfigError> {
    let problems = validate::definitions(activities);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError::Stored { problems })
    }
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error: in the sentence, not a `source`, so a report of
        /// the whole chain (`{:#}`) does not say it twice.
        error: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema.
    #[error("config file {path} is invalid: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's sentence, with line and column.
        message: String,
    },
    /// The file parsed but its values are inconsistent; every problem is listed.
    #[error("config file {path} has {}", validate::list(problems))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Each problem with its line.
        problems: Vec<Problem>,
    },
    /// The activity definitions a cluster's MongoDB holds are inconsistent
    /// (edited by hand since `ticketd import` checked them).
    #[error("the activities stored in MongoDB have {}", validate::list(problems))]
    Stored {
        /// Each problem.
        problems: Vec<Problem>,
    },
}

/// The parser's sentence with its line and column, without the source line
/// it would quote: that line may hold a secret (`session_secret`,
/// `admin.token`, a password in `redis_url`), and the sentence goes to the
/// log, to stderr and into a refused reload's answer.
fn parse_error(error: &toml::de::Error, text: &str) -> String {
    let message = without_value(error.message().trim_end());
    match error_at(error, text) {
        Some((line, column)) => format!("TOML parse error at line {line}, column {column}: {message}"),
        None => format!("TOML parse error: {message}"),
    }
}

/// The line and column (1-based) an error points at.
fn error_at(error: &toml::de::Error, text: &str) -> Option<(usize, usize)> {
    let mut at = error.span()?.start.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or_default().chars().count() + 1;
    Some((line, column))
}

/// Parses `text`, past every misspelled key: the parser stops at the first
/// key the schema does not know, so a file with three typos took three
/// runs of `check-config` to see them. A `key = value` line the parser
/// stops at is noted and blanked (its line numbers kept), and the parse
/// goes on. Returns the parse, the keys noted, and the text parsed last
/// (for the line numbers of what validation finds in it). Any other stop
/// ends the parse: a syntax error, a value of the wrong type, or an
/// unknown `[table]` (blanked, its keys would land in the table before).
fn parse_past_unknown_keys(text: &str) -> (Result<Config, toml::de::Error>, Vec<Problem>, String) {
    /// More than this many is not a file of typos.
    const MOST: usize = 100;
    let mut text = text.to_owned();
    let mut unknown = Vec::new();
    loop {
        let error = match toml::from_str::<Config>(&text) {
            Ok(config) => return (Ok(config), unknown, text),
            Err(error) => error,
        };
        let at = error_at(&error, &text);
        let key_line = at.and_then(|(n, column)| text.split('\n').nth(n - 1).map(|l| (n, column, l)));
        // A line that is a whole `key = value` on its own (not a table
        // header, not the start of a value spanning lines), whose key is
        // the one the parser stopped at (not one inside an inline table,
        // whose line holds known keys too). `\r`: a file saved on Windows.
        let whole_key = key_line
            .filter(|&(_, column, l)| {
                let line = l.trim_end_matches('\r');
                let before: String = line.chars().take(column - 1).collect();
                before.trim().is_empty()
                    && !line.trim_start().starts_with('[')
                    && toml::from_str::<toml::Table>(line).is_ok_and(|t| t.len() == 1)
            })
            .map(|(n, _, l)| (n, l));
        match whole_key {
            Some((n, l)) if error.message().starts_with("unknown field") && unknown.len() < MOST => {
                unknown.push(Problem {
                    line: Some(n),
                    message: without_value(error.message().trim_end()),
                });
                let start = text.split('\n').take(n - 1).map(|l| l.len() + 1).sum::<usize>();
                let blank = " ".repeat(l.len());
                text.replace_range(start..start + l.len(), &blank);
            }
            _ => return (Err(error), unknown, text),
        }
    }
}

/// serde's "invalid type: integer `5`, expected a string" names the value
/// it found (a secret written unquoted, say): the value is left out. Other
/// sentences name fields and expectations, which help, and are kept.
fn without_value(message: &str) -> String {
    let Some(rest) = ["invalid type: ", "invalid value: "]
        .iter()
        .find_map(|prefix| message.strip_prefix(prefix).map(|rest| (prefix, rest)))
    else {
        return message.to_owned();
    };
    let (prefix, rest) = rest;
    // "<kind> <value>, expected <what>": keep the kind and the expectation.
    let kind = rest.split([' ', ',']).next().unwrap_or_default();
    match rest.rfind(", expected ") {
        Some(at) => format!("{prefix}{kind}{}", &rest[at..]),
        None => format!("{prefix}{kind}"),
    }
}

/// `key +a +b -c`: what a list gained and lost (the first ten of each,
/// then how many more); `None` if neither.
fn listed<T: std::fmt::Display>(key: &str, new: &[T], old: &[T]) -> Option<String> {
    const SHOWN: usize = 10;
    let text = |list: &[T]| list.iter().map(ToString::to_string).collect::<Vec<_>>();
    let (new, old) = (text(new), text(old));
    let (in_new, in_old): (HashSet<&str>, HashSet<&str>) = (
        new.iter().map(String::as_str).collect(),
        old.iter().map(String::as_str).collect(),
    );
    let mut parts = Vec::new();
    for (sign, from, other) in [('+', &new, &in_old), ('-', &old, &in_new)] {
        let moved: Vec<&String> = from.iter().filter(|x| !other.contains(x.as_str())).collect();
        parts.extend(moved.iter().take(SHOWN).map(|x| format!("{sign}{x}")));
        if moved.len() > SHOWN {
            parts.push(format!("{sign}{} more", moved.len() - SHOWN));
        }
    }
    (!parts.is_empty()).then(|| format!("{key} {}", parts.join(" ")))
}

impl Config {
    /// Logs each key the file sets to no effect ([`Config::warnings`]): at
    /// start, and at each reload that applies.
    pub fn log_warnings(&self) {
        for warning in &self.warnings {
            tracing::warn!(%warning, "The config sets a key that has no effect.");
        }
    }

    /// Reads, parses and validates the file at `path`, reading `codes_file` lists.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let (config, problems) = Config::load_with_problems(path)?;
        match problems.is_empty() {
            true => Ok(config),
            false => Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            }),
        }
    }

    /// Like [`Config::load`], with a file that parsed but has problems
    /// given back with them: for the tools that only read the store
    /// (`export`, `report`), which need its `[storage]` alone. An organiser
    /// whose edit a node refused mid-sale could not export until the file
    /// was fixed (an exports walkthrough).
    pub fn load_with_problems(path: &Path) -> Result<(Config, Vec<Problem>), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        let base_dir = path.parent().map(Path::to_owned).unwrap_or_default();
        Config::parse_with_problems(&text, path, base_dir)
    }

    /// Parses and validates config text; `path` only names it in errors.
    pub fn from_toml(text: &str, path: &Path, base_dir: PathBuf) -> Result<Config, ConfigError> {
        let (config, problems) = Config::parse_with_problems(text, path, base_dir)?;
        match problems.is_empty() {
            true => Ok(config),
            false => Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            }),
        }
    }

    /// Parses and validates config text: the config and its problems, or
    /// an error if it did not parse.
    fn parse_with_problems(text: &str, path: &Path, base_dir: PathBuf) -> Result<(Config, Vec<Problem>), ConfigError> {
        let (parsed, mut problems, parsed_text) = parse_past_unknown_keys(text);
        let mut config = match parsed {
            Ok(config) => config,
            Err(e) if problems.is_empty() => {
                return Err(ConfigError::Parse {
                    path: path.to_owned(),
                    message: parse_error(&e, &parsed_text),
                })
            }
            // Misspelled keys, then a stop: all of them, the stop last.
            Err(e) => {
                let message = without_value(e.message().trim_end());
                problems.push(match error_at(&e, &parsed_text) {
                    Some((line, column)) => Problem {
                        line: Some(line),
                        message: format!("column {column}: {message}"),
                    },
                    None => Problem { line: None, message },
                });
                return Err(ConfigError::Invalid {
                    path: path.to_owned(),
                    problems,
                });
            }
        };
        config.base_dir = base_dir;
        problems.extend(validate::validate(&mut config, &parsed_text));
        Ok((config, problems))
    }

    /// Ticket types that belong to another activity here than in `running`
    /// (a sentence each). A ticket type's codes, stock and claims are its
    /// activity's, in the store and in Redis: moved, its codes could not be
    /// claimed where it went, nor returned where it was. A new id is a new
    /// ticket type.
    pub fn moved_ticket_types(&self, running: &Config) -> Vec<String> {
        let was: HashMap<&str, &str> = running
            .activities
            .iter()
            .flat_map(|a| a.tickets.iter().map(move |t| (t.id.as_str(), a.id.as_str())))
            .collect();
        self.moved_from(|ticket| was.get(ticket).map(|a| a.to_string()))
    }

    /// [`moved_ticket_types`](Config::moved_ticket_types) against what a
    /// store holds: `was` names the activity a ticket type belongs to there.
    /// `ticketd import` and a node's own import at start refuse such a
    /// config, as a reload does.
    pub fn moved_from(&self, was: impl Fn(&str) -> Option<String>) -> Vec<String> {
        self.activities
            .iter()
            .flat_map(|a| a.tickets.iter().map(move |t| (t.id.as_str(), a.id.as_str())))
            .filter_map(|(ticket, activity)| {
                let before = was(ticket)?;
                (before != activity).then(|| {
                    format!(
                        "ticket type `{ticket}` moved from activity `{before}` to `{activity}`: a ticket type stays \
                         with its activity (give it a new id)"
                    )
                })
            })
            .collect()
    }

    /// What a reload to `self` changes of `running`, a phrase each, for the
    /// log line that says it reloaded: which activity was paused, which
    /// limit moved, who was blocked. It said `codes_added` alone, and an
    /// operator asking afterwards who paused the sale, or since when an
    /// account was blocked, found nothing (an operations walkthrough).
    pub fn changes_from(&self, running: &Config) -> Vec<String> {
        let mut said = Vec::new();
        for (section, changed) in [
            ("[server]", self.server != running.server),
            ("[auth]", self.auth != running.auth),
            ("[limits]", self.limits != running.limits),
        ] {
            if changed {
                said.push(format!("{section} changed"));
            }
        }
        let (new, old) = (&self.security, &running.security);
        said.extend(listed("security.blocked_users", &new.blocked_users, &old.blocked_users));
        said.extend(listed("security.blocked_ips", &new.blocked_ips, &old.blocked_ips));
        let unlisted = |s: &model::SecurityConfig| model::SecurityConfig {
            blocked_users: Vec::new(),
            blocked_ips: Vec::new(),
            ..s.clone()
        };
        if unlisted(new) != unlisted(old) {
            said.push("[security] changed".into());
        }
        for a in &self.activities {
            let Some(was) = running.activities.iter().find(|r| r.id == a.id) else {
                said.push(format!("activity `{}` added", a.id));
                continue;
            };
            let mut what = Vec::new();
            if a.paused != was.paused {
                what.push(if a.paused { "paused" } else { "resumed" }.to_owned());
            }
            if a.per_user_limit != was.per_user_limit {
                what.push(format!("per_user_limit {} → {}", was.per_user_limit, a.per_user_limit));
            }
            for (key, changed) in [
                ("start_time", a.start_time != was.start_time),
                ("end_time", a.end_time != was.end_time),
                ("name", a.name != was.name),
                ("pow_difficulty", a.pow_difficulty != was.pow_difficulty),
                ("min_account_age", a.min_account_age != was.min_account_age),
                ("admission", a.admission != was.admission),
            ] {
                if changed {
                    what.push(key.to_owned());
                }
            }
            let ids = |acts: &ActivityConfig| acts.tickets.iter().map(|t| t.id.clone()).collect::<Vec<_>>();
            what.extend(listed("tickets", &ids(a), &ids(was)));
            // A ticket type's own keys (its codes are `codes_added`'s).
            let bare = |t: &model::TicketConfig| model::TicketConfig {
                codes: None,
                ..t.clone()
            };
            for t in &a.tickets {
                if was.tickets.iter().any(|w| w.id == t.id && bare(w) != bare(t)) {
                    what.push(format!("ticket `{}`", t.id));
                }
            }
            // And whatever else moved (a lottery's draw time, the room's
            // rate, the description), said at least.
            let mut rest = a.clone();
            rest.paused = was.paused;
            rest.per_user_limit = was.per_user_limit;
            rest.start_time = was.start_time;
            rest.end_time = was.end_time;
            rest.name.clone_from(&was.name);
            rest.pow_difficulty = was.pow_difficulty;
            rest.min_account_age = was.min_account_age;
            rest.admission = was.admission;
            rest.tickets.clone_from(&was.tickets);
            if rest != *was {
                what.push("other settings".to_owned());
            }
            if !what.is_empty() {
                said.push(format!("activity `{}`: {}", a.id, what.join(", ")));
            }
        }
        for was in &running.activities {
            if !self.activities.iter().any(|a| a.id == was.id) {
                said.push(format!("activity `{}` removed", was.id));
            }
        }
        said
    }

    /// Names the settings that differ from `running` but only apply on restart.
    pub fn restart_only_changes(&self, running: &Config) -> Vec<&'static str> {
        let (new, old) = (self, running);
        [
            (new.server.listen != old.server.listen, "server.listen"),
            (new.server.node_id != old.server.node_id, "server.node_id"),
            (
                new.server.max_connections != old.server.max_connections,
                "server.max_connections",
            ),
            (
                new.server.max_connections_per_ip != old.server.max_connections_per_ip,
                "server.max_connections_per_ip",
            ),
            (new.server.threads != old.server.threads, "server.threads"),
            (new.storage != old.storage, "storage"),
            (new.cluster != old.cluster, "cluster"),
            (new.journal != old.journal, "journal"),
            (
                new.auth.session_secret != old.auth.session_secret
                    || new.auth.previous_session_secret != old.auth.previous_session_secret,
                "auth.session_secret",
            ),
            // Sized once at start: the hashing pool and its queue, and the
            // guard's per-client tables.
            (
                new.auth.max_concurrent_hashes != old.auth.max_concurrent_hashes,
                "auth.max_concurrent_hashes",
            ),
            (new.auth.hash_queue != old.auth.hash_queue, "auth.hash_queue"),
            (
                new.security.max_tracked_clients != old.security.max_tracked_clients,
                "security.max_tracked_clients",
            ),
            (new.admin != old.admin, "admin"),
            (new.log != old.log, "log"),
        ]
        .into_iter()
        .filter_map(|(changed, name)| changed.then_some(name))
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A typo on a secret's line put the secret in the error (the parser
    /// quotes the line), and so in the log and a refused reload's answer.
    #[test]
    fn a_parse_error_names_its_place_but_quotes_no_line() {
        let secret = "EXAMPLE-do-not-log-0123456789abcdef";
        let text = format!("[auth]\nsession_secret = \"{secret}\" oops\n");
        let error = Config::from_toml(&text, Path::new("c.toml"), PathBuf::new())
            .unwrap_err()
            .to_string();
        assert!(!error.contains(secret), "{error}");
        assert!(error.contains("line 2, column"), "{error}");
        // serde's sentence names the value it found: left out.
        let typed = Config::from_toml(
            "[auth]\nsession_secret = 123456789\n",
            Path::new("c.toml"),
            PathBuf::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            typed.contains("line 2") && typed.contains("invalid type: integer, expected"),
            "{typed}"
        );
        assert!(!typed.contains("123456789"), "{typed}");
        // A span inside a character is no panic and no wrong line.
        let wide = "# 票票票\n[auth]\nsession_secret = \"x\" 票\n";
        let error = Config::from_toml(wide, Path::new("c.toml"), PathBuf::new())
            .unwrap_err()
            .to_string();
        assert!(error.contains("line 3"), "{error}");
    }

    fn problems_of(text: &str) -> String {
        Config::from_toml(text, Path::new("c.toml"), PathBuf::new())
            .unwrap_err()
            .to_string()
    }

    /// Every misspelled key with its line, in a file saved on Windows too;
    /// one inside an inline table stops the list there (its line holds
    /// known keys, which blanked would be reported missing); the stop
    /// comes last, with its line, and quotes no value.
    #[test]
    fn misspelled_keys_are_listed_each_with_its_line() {
        let text = "[server]\nmax_bdy = 5\n[auth]\nsesion_ttl = \"EXAMPLE-secretish\"\n[limits]\nmax_in_flght = 3\n";
        let said = problems_of(text);
        for (line, key) in [(2, "max_bdy"), (4, "sesion_ttl"), (6, "max_in_flght")] {
            assert!(said.contains(&format!("line {line}: unknown field `{key}`")), "{said}");
        }
        assert!(!said.contains("EXAMPLE-secretish"), "{said}");
        let windows = problems_of(&text.replace('\n', "\r\n"));
        assert!(
            windows.contains("3 problem(s)") && windows.contains("line 6: unknown field"),
            "{windows}"
        );

        let inline = "[server]\nmax_bdy = 5\n[[activity]]\nid = \"a\"\nname = \"A\"\n\
                      start_time = \"+1m\"\nend_time = \"+1h\"\nticket = [{ id = \"t\", nmae = \"T\" }]\n";
        let said = problems_of(inline);
        assert!(said.contains("line 2: unknown field `max_bdy`"), "{said}");
        assert!(
            said.contains("line 8: column") && said.contains("unknown field `nmae`"),
            "{said}"
        );
        assert!(said.contains("2 problem(s)"), "{said}");
    }
}
