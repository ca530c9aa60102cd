//! Semantic checks that serde cannot express, each reported with its line.
//!
//! Problems are collected, not returned at the first one, so an organiser
//! fixing a large config sees everything at once.
//!
//! - `report`: a problem, its line, and the report they are gathered in;
//! - `node`: the node's own sections; `activity`: activities, tickets, codes.

mod activity;
mod node;
mod report;

use toml_edit::ImDocument;

pub(super) use report::list;
pub use report::Problem;
use report::{Lines, Report};

use super::model::{ActivityConfig, Config, StorageMode};

/// Checks `config` against its source `text`, one section at a time; reads
/// `codes_file` lists into `codes`. Returns every problem found (empty when
/// the config is usable); keys set to no effect go to `config.warnings`.
pub(super) fn validate(config: &mut Config, text: &str) -> Vec<Problem> {
    let mut r = Report {
        lines: Lines {
            text,
            doc: ImDocument::parse(text).ok(),
        },
        problems: Vec::new(),
        warnings: Vec::new(),
    };
    node::server(&mut r, config);
    node::storage(&mut r, config);
    node::cluster(&mut r, config);
    node::journal(&mut r, config);
    node::limits(&mut r, config);
    node::auth(&mut r, config);
    node::security(&mut r, config);
    node::admin(&mut r, config);
    node::log(&mut r, config);
    activity::activities(&mut r, config);
    config.warnings = r.warnings.iter().map(ToString::to_string).collect();
    r.problems
}

/// Checks activity definitions a node reads from a cluster's MongoDB rather
/// than from its own file. `ticketd import` checked them before storing
/// them, but a document edited by hand since, or written by another version,
/// is checked again here: the activity's own keys, its admission and its
/// tickets' keys (its codes were the import's business, and its
/// `codes_file` a path on the importing machine).
pub fn definitions(activities: &[ActivityConfig]) -> Vec<Problem> {
    let mut r = Report {
        lines: Lines { text: "", doc: None },
        problems: Vec::new(),
        warnings: Vec::new(),
    };
    let (mut ids, mut ticket_ids) = (std::collections::HashSet::new(), std::collections::HashSet::new());
    for (ai, act) in activities.iter().enumerate() {
        activity::check_activity(&mut r, ai, act, StorageMode::Cluster, &mut ids);
        activity::check_tickets(&mut r, ai, act, &mut ticket_ids);
    }
    r.problems
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{ActivityConfig, Config, ConfigError};

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("test.toml"), Default::default())
    }

    /// The problems `text` is refused with, as shown.
    fn problems(text: &str) -> Vec<String> {
        let Err(ConfigError::Invalid { problems, .. }) = load(text) else {
            panic!("must be invalid: {text}")
        };
        problems.iter().map(ToString::to_string).collect()
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
        let shown = problems(text);
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
    fn stored_definitions_are_checked_down_to_their_tickets() {
        let text = r#"
[[activity]]
id = "a"
name = "A"
start_time = "2030-01-01T00:00:00Z"
end_time = "2030-01-02T00:00:00Z"
  [[activity.ticket]]
  id = "t"
  name = "T"
  generate = 5
  [[activity.ticket]]
  id = "u"
  name = "U"
  generate = 5
"#;
        let shown = |activities: &[ActivityConfig], what: &str| {
            let shown: Vec<String> = super::definitions(activities).iter().map(ToString::to_string).collect();
            assert!(shown.iter().any(|p| p.contains(what)), "{what}: {shown:?}");
        };
        let mut activities = load(text).unwrap().activities;
        assert!(super::definitions(&activities).is_empty(), "a valid set passes");
        activities[0].tickets[1].id = "t".into();
        shown(&activities, "ticket id `t` is used twice");
        activities[0].tickets.clear();
        shown(&activities, "has no [[activity.ticket]]");
    }

    #[test]
    fn a_thread_count_beyond_reason_is_refused() {
        assert_eq!(
            problems("[server]\nthreads = 100000\n"),
            ["line 2: server.threads must be at most 1024 (0: one per CPU core)"]
        );
        load("[server]\nthreads = 4\n").unwrap();
    }

    #[test]
    fn a_write_timeout_of_nothing_or_of_hours_is_refused() {
        assert_eq!(
            problems("[server]\nwrite_timeout = \"0s\"\n"),
            ["line 1: server timeouts must be greater than zero"]
        );
        assert_eq!(
            problems("[server]\nwrite_timeout = \"2h\"\n"),
            ["line 2: server.write_timeout must be at most 1h: a client that stops reading holds its connection that long"]
        );
        load("[server]\nwrite_timeout = \"1h\"\n").unwrap();
    }

    #[test]
    fn zeros_laid_ahead_fit_in_a_segment() {
        assert_eq!(
            problems("[journal]\nsegment_size = \"64KiB\"\npreallocate = \"1MiB\"\n"),
            ["line 3: journal.preallocate must not exceed journal.segment_size"]
        );
        load("[journal]\npreallocate = 0\n").unwrap();
    }

    /// Each passed `check-config` and then misbehaved: a typo's level
    /// silenced every log line; a billion-claim queue or batch, allocated
    /// whole at start, aborted the node; a lockout cap of nothing locked
    /// nobody out.
    #[test]
    fn values_that_passed_and_then_misbehaved_are_refused() {
        let shown = problems("[log]\nlevel = \"warning\"\n");
        assert_eq!(shown.len(), 1, "{shown:?}");
        assert!(
            shown[0].starts_with("line 2: log.level `warning`: it sets no level for the node's own lines"),
            "{shown:?}"
        );
        assert!(problems("[log]\nlevel = \"info,ticketd=loud\"\n")[0].starts_with("line 2: log.level"));
        assert!(problems("[log]\nlevel = \"hyper=debug\"\n")[0].starts_with("line 2: log.level"));
        for fine in [
            "warn",
            "INFO",
            "3",
            "warn,hyper",
            "ticketd",
            "info,ticketd::http=debug",
            "info,ticketd[span]=debug",
            "ticketd=trace",
            "[{field}]=trace",
            "off",
        ] {
            load(&format!("[log]\nlevel = \"{fine}\"\n")).unwrap_or_else(|e| panic!("{fine}: {e}"));
        }
        assert_eq!(
            problems("[journal]\nqueue_capacity = 1000000000\nmax_batch = 100000000\n"),
            [
                "line 3: journal.max_batch must be at most 65536",
                "line 2: journal.queue_capacity must be at most 4194304 (it is allocated whole at start)",
            ]
        );
        assert_eq!(
            problems("[cluster]\ncommit_batch = 10000000\n"),
            ["line 2: cluster.commit_batch must be at most 65536"]
        );
        load("[cluster]\nlease_max_batch = 100000\n").unwrap();
        for backoff in ["login_backoff_max = \"0s\"", "login_backoff = \"0s\""] {
            let shown = problems(&format!("[security]\n{backoff}\n"));
            assert!(
                shown.len() == 1 && shown[0].contains("a lockout of zero locks nobody out"),
                "{backoff}: {shown:?}"
            );
        }
        // A first lockout past the cap is the cap.
        load("[security]\nlogin_backoff = \"1h\"\nlogin_backoff_max = \"15m\"\n").unwrap();
    }

    #[test]
    fn an_account_age_of_nothing_or_of_ages_is_refused() {
        let act = |age: &str| {
            format!(
                "[[activity]]\nid = \"a\"\nname = \"A\"\nstart_time = \"+1h\"\nend_time = \"+2h\"\n\
                 min_account_age = \"{age}\"\n  [[activity.ticket]]\n  id = \"t\"\n  name = \"T\"\n  generate = 1\n"
            )
        };
        for age in ["0s", "11years"] {
            let shown = problems(&act(age));
            assert_eq!(shown.len(), 1, "{age}: {shown:?}");
            assert!(
                shown[0].starts_with("line 6: activity `a`: min_account_age must be more than 0"),
                "{age}: {shown:?}"
            );
        }
        let config = load(&act("7d")).unwrap();
        assert_eq!(
            config.activities[0].min_account_age.map(|a| a.0.as_secs()),
            Some(7 * 86_400)
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
