//! Checks of the `[[activity]]` tables, their ticket types and codes; reads
//! `codes_file` lists.

use std::collections::HashSet;

use super::report::{valid_id, Report, Seg, MAX_CODE_LEN, MAX_GENERATE, MAX_ID_LEN};
use crate::{
    config::{
        model::{ActivityConfig, AdmissionMode, Config, StorageMode, TicketConfig},
        units::TimeSpec,
    },
    vocab::is_invisible,
};

pub(super) fn activities(r: &mut Report<'_>, config: &mut Config) {
    let k = Seg::Key;
    let mut activity_ids = HashSet::new();
    let mut ticket_ids = HashSet::new();
    let mut all_codes: HashSet<String> = HashSet::new();
    let base_dir = config.base_dir.clone();
    for (ai, act) in config.activities.iter_mut().enumerate() {
        check_activity(r, ai, act, config.storage.mode, &mut activity_ids);
        check_tickets(r, ai, act, &mut ticket_ids);
        check_names(r, ai, act);
        for (ti, ticket) in act.tickets.iter_mut().enumerate() {
            let tpath = |f: &'static str| [k("activity"), Seg::Index(ai), k("ticket"), Seg::Index(ti), k(f)];
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
                        // "UTF-8 with BOM", as spreadsheets and editors save
                        // it: the mark is not part of the first code.
                        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
                        // A file caught while being written (copied, saved
                        // in place, appended to) ends mid-code: its last,
                        // cut-off code would go on sale for good.
                        if text.rsplit('\n').next().is_some_and(|last| !last.trim().is_empty()) {
                            r.add(
                                &tpath("codes_file"),
                                format!(
                                    "ticket `{}`: codes_file {} does not end with a line break, so its last code may be \
                                     cut off (a file still being written); end every code with a line break, and write \
                                     the file elsewhere and move it into place",
                                    ticket.id,
                                    full.display()
                                ),
                            );
                            continue;
                        }
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
            check_codes(r, &tpath("codes"), ticket, &mut all_codes);
        }
    }
}

/// The tickets' own keys: there is one, ids unique across activities,
/// names, windows. Also checked of definitions read from a cluster's
/// MongoDB (their codes, like the activity's, were the import's business).
pub(super) fn check_tickets(r: &mut Report<'_>, ai: usize, act: &ActivityConfig, ids: &mut HashSet<String>) {
    let k = Seg::Key;
    if act.tickets.is_empty() {
        r.add(
            &[k("activity"), Seg::Index(ai)],
            format!("activity `{}` has no [[activity.ticket]]", act.id),
        );
    }
    for (ti, ticket) in act.tickets.iter().enumerate() {
        let tpath = |f: &'static str| [k("activity"), Seg::Index(ai), k("ticket"), Seg::Index(ti), k(f)];
        if !valid_id(&ticket.id) {
            r.add(
                &tpath("id"),
                format!(
                    "ticket id `{}` must be 1-{MAX_ID_LEN} letters, digits, '-', '_' or '.'",
                    ticket.id
                ),
            );
        } else if !ids.insert(ticket.id.clone()) {
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
    }
}

/// The activity's own keys (not its tickets): id, name, window, limits, and
/// its admission. Also what a node checks of definitions it reads from a
/// cluster's MongoDB, whose codes were the import's business.
pub(super) fn check_activity(
    r: &mut Report<'_>,
    ai: usize,
    act: &ActivityConfig,
    mode: StorageMode,
    activity_ids: &mut HashSet<String>,
) {
    let k = Seg::Key;
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
    if mode == StorageMode::Cluster && (relative(act.start_time) || relative(act.end_time)) {
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
    // Ten years is generous for "accounts made before the sale was
    // announced", and keeps the cut-off a date anyone can read.
    const MAX_ACCOUNT_AGE: std::time::Duration = std::time::Duration::from_secs(10 * 366 * 24 * 3600);
    if act
        .min_account_age
        .is_some_and(|age| age.0.is_zero() || age.0 > MAX_ACCOUNT_AGE)
    {
        r.add(
            &field("min_account_age"),
            format!(
                "activity `{}`: min_account_age must be more than 0 and at most 10 years (leave it out to admit any account)",
                act.id
            ),
        );
    }
    if act.per_user_limit == 0 || act.per_user_limit > 1000 {
        r.add(
            &field("per_user_limit"),
            format!("activity `{}`: per_user_limit must be 1-1000", act.id),
        );
    }
    check_admission(r, ai, act, mode);
}

fn check_codes(r: &mut Report<'_>, path: &[Seg<'_>], ticket: &TicketConfig, all: &mut HashSet<String>) {
    let Some(codes) = &ticket.codes else { return };
    if codes.is_empty() {
        // A ticket type with no code never sells, and in a cluster could
        // never be called sold out: Redis cannot tell it from one nobody has
        // imported yet.
        let why = if ticket.codes_file.is_some() {
            format!("ticket `{}`: codes_file has no codes", ticket.id)
        } else {
            format!(
                "ticket `{}` has no codes: list at least one (or use codes_file or generate)",
                ticket.id
            )
        };
        r.add(path, why);
    }
    let mut reported = 0;
    for code in codes {
        let bad = if code.is_empty() || code.len() > MAX_CODE_LEN {
            Some(format!(
                "ticket `{}`: code `{code}` must be 1-{MAX_CODE_LEN} bytes",
                ticket.id
            ))
        } else if code
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || is_invisible(c))
        {
            Some(format!(
                "ticket `{}`: code `{}` contains whitespace, control or invisible characters",
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

/// The waiting room's keys: present where the mode needs them, absent
/// where it ignores them, and in order (`queue_opens` < `draw_time` <=
/// `start_time`).
fn check_admission(r: &mut Report<'_>, ai: usize, act: &ActivityConfig, mode: StorageMode) {
    let k = Seg::Key;
    let field = |f: &'static str| [k("activity"), Seg::Index(ai), k(f)];
    let id = &act.id;
    // Set to no effect: said, not refused (an earlier version ran it).
    let ignored: &[(&str, &str)] = match act.admission {
        AdmissionMode::Race => &[
            ("admit_rate", "a race has no waiting room"),
            ("pass_ttl", "a race has no waiting room"),
            ("grace", "a race has no waiting room"),
            ("queue_capacity", "a race has no waiting room"),
        ],
        AdmissionMode::Lottery => &[(
            "admit_rate",
            "a lottery admits the drawn as far as the stock goes; admit_rate paces a queue",
        )],
        AdmissionMode::Queue => &[],
    };
    for (key, why) in ignored {
        if r.lines.sets(&field(key)) {
            r.warn(
                &field(key),
                format!(
                    "activity `{id}`: {key} has no effect with admission = \"{}\" ({why})",
                    mode_name(act.admission)
                ),
            );
        }
    }
    if act.admission == AdmissionMode::Race {
        for (key, set) in [
            ("queue_opens", act.queue_opens.is_some()),
            ("draw_time", act.draw_time.is_some()),
        ] {
            if set {
                r.add(
                    &field(key),
                    format!("activity `{id}`: {key} needs admission = \"queue\" or \"lottery\""),
                );
            }
        }
        return;
    }
    let relative = |t: Option<TimeSpec>| matches!(t, Some(TimeSpec::Relative(_)));
    if mode == StorageMode::Cluster && (relative(act.queue_opens) || relative(act.draw_time)) {
        r.add(
            &field("queue_opens"),
            format!("activity `{id}`: cluster mode needs absolute times (RFC 3339) for queue_opens and draw_time"),
        );
    }
    match act.queue_opens {
        None => r.add(
            &field("queue_opens"),
            format!(
                "activity `{id}`: admission = \"{}\" needs queue_opens (before start_time)",
                mode_name(act.admission)
            ),
        ),
        Some(opens) => {
            if !ends_after_start(opens, act.start_time) {
                r.add(
                    &field("queue_opens"),
                    format!("activity `{id}`: queue_opens must be before start_time"),
                );
            }
            if let Some(draw) = act.draw_time {
                if !ends_after_start(opens, draw) {
                    r.add(
                        &field("draw_time"),
                        format!("activity `{id}`: draw_time must be after queue_opens"),
                    );
                }
            }
        }
    }
    if let Some(draw) = act.draw_time {
        if act.admission != AdmissionMode::Lottery {
            r.add(
                &field("draw_time"),
                format!("activity `{id}`: draw_time is for admission = \"lottery\""),
            );
        } else if draw != act.start_time && !ends_after_start(draw, act.start_time) {
            r.add(
                &field("draw_time"),
                format!("activity `{id}`: draw_time must not be after start_time"),
            );
        }
    }
    if !(act.admit_rate.is_finite() && act.admit_rate >= 0.1 && act.admit_rate <= 1_000_000.0) {
        r.add(
            &field("admit_rate"),
            format!("activity `{id}`: admit_rate must be 0.1-1000000 places per second"),
        );
    }
    if act.pass_ttl.0 < std::time::Duration::from_secs(5) || act.pass_ttl.0 > std::time::Duration::from_secs(86_400) {
        r.add(&field("pass_ttl"), format!("activity `{id}`: pass_ttl must be 5s-24h"));
    }
    if act.grace.0 < std::time::Duration::from_secs(3) || act.grace.0 > std::time::Duration::from_secs(86_400) {
        r.add(
            &field("grace"),
            format!("activity `{id}`: grace must be 3s-24h (an event stream or the fans' page checks in every second)"),
        );
    }
    if act.queue_capacity == 0 || act.queue_capacity > 10_000_000 {
        r.add(
            &field("queue_capacity"),
            format!("activity `{id}`: queue_capacity must be 1-10000000"),
        );
    }
}

/// Names in the file hold no character that no page, report or
/// spreadsheet should show: a control character (a bell went raw into the
/// report's HTML), or an embedding or override that turns the text after
/// it around (U+202E shows "Concert\u{202E}PIV" backwards). The marks and
/// isolates that mixed Arabic or Hebrew text is written with (U+200E,
/// U+200F, U+061C, U+2066–2069), emoji joiners and variation selectors
/// are a name's own. Only the file's: definitions a cluster stored before
/// this check are served as they are (a node refusing them would not
/// start after an upgrade).
fn check_names(r: &mut Report<'_>, ai: usize, act: &ActivityConfig) {
    let k = Seg::Key;
    let unshowable = |name: &str| {
        name.chars()
            .find(|&c| c.is_control() || matches!(c, '\u{202A}'..='\u{202E}'))
            .map(|c| {
                format!(
                    "U+{:04X}, a control character or a direction override: a name is shown as it is written",
                    u32::from(c)
                )
            })
    };
    if let Some(why) = unshowable(&act.name) {
        r.add(
            &[k("activity"), Seg::Index(ai), k("name")],
            format!("activity `{}`: its name holds {why}", act.id),
        );
    }
    for (ti, ticket) in act.tickets.iter().enumerate() {
        if let Some(why) = unshowable(&ticket.name) {
            r.add(
                &[k("activity"), Seg::Index(ai), k("ticket"), Seg::Index(ti), k("name")],
                format!("ticket `{}`: its name holds {why}", ticket.id),
            );
        }
    }
}

fn mode_name(mode: AdmissionMode) -> &'static str {
    match mode {
        AdmissionMode::Race => "race",
        AdmissionMode::Queue => "queue",
        AdmissionMode::Lottery => "lottery",
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
