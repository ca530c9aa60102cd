//! What each subcommand does, on top of the library.
//!
//! Errors are `anyhow` here (the edge of the program); `main` prints them as
//! one sentence and exits non-zero.

use std::{
    collections::HashMap,
    io::{self, BufRead, IsTerminal, Write},
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{bail, Context};
use tokio::net::TcpListener;

use crate::{
    admission::{
        draw::{DrawRecord, Seed},
        report::QueueReport,
        Room, Rooms,
    },
    app::App,
    auth::{password, username::skeleton_key, validate_account, HashCost},
    cli::{ExportArgs, ExportWhat, ReportArgs, UserCommand},
    clock::{now_ms, parse_rfc3339_ms},
    config::{AdmissionMode, Config},
    export::{self, report::RoomRecord, ExportFormat},
    signals,
    store::{Access, ClusterError, InTransit, NewUser, Store, StoreError},
    worker::Runner,
};

/// Loads the config, with the file name in the error.
pub fn load_config(path: &Path) -> anyhow::Result<Config> {
    Ok(Config::load(path)?)
}

/// The config for a tool that only reads the store (`export`, `report`):
/// a file with problems is read anyway, with a warning, as its
/// `[storage]` is all such a tool needs. Mid-sale, with an edit the node
/// refused, they would not run until the file was fixed.
pub fn load_config_to_read(path: &Path) -> anyhow::Result<Config> {
    let (config, problems) = Config::load_with_problems(path)?;
    if !problems.is_empty() {
        eprintln!(
            "warning: {} has {} (`ticketd check-config` lists them); reading the store with it anyway",
            path.display(),
            count(problems.len(), "problem", "problems")
        );
    }
    Ok(config)
}

/// Connections the kernel completes for a listener before the node
/// accepts them, as `ticketd.socket`'s `Backlog=` (the kernel caps it at
/// `net.core.somaxconn`, 4096 by default). `TcpListener::bind` asks for
/// 128: at the opening second a burst of fans connecting straight to the
/// node had their SYNs dropped, and waited a second or three for the
/// retry (an operations walkthrough counted 561 drops in 3,000 connects).
const LISTEN_BACKLOG: u32 = 4096;

/// A listening socket on `addr`, with [`LISTEN_BACKLOG`] (and, as `bind`
/// does, `SO_REUSEADDR`: a restart binds beside the last run's closing
/// connections).
fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// `ticketd serve`.
pub fn serve(config: Config, config_path: &Path) -> anyhow::Result<()> {
    if config.admin.listen.is_some() && config.admin.token().is_none() {
        bail!("{}", no_admin_token());
    }
    config.log_warnings();
    // Everything the node writes is its own alone: the journal's segments
    // hold the codes claimed (a code is the ticket), the rooms' logs who
    // waited, the access log addresses. Under the usual umask 022 they
    // were world-readable, in a directory systemd or an operator made.
    // SAFETY: umask only swaps the process's file-mode mask.
    unsafe {
        libc::umask(0o077);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ticketd-worker")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let addr = config.server.listen;
        let listener = match activated_listener()? {
            Some(listener) => {
                tracing::info!("Using the listening socket passed by the service manager (socket activation).");
                listener
            }
            None => listen(addr).with_context(|| format!("cannot listen on {addr}"))?,
        };
        let admin = match config.admin.listen {
            Some(addr) => Some(listen(addr).with_context(|| format!("cannot listen on {addr} (admin)"))?),
            None => None,
        };
        let workers = Arc::new(Runner::new());
        let signals = signals::install(&workers).context("cannot install signal handlers")?;
        let app = match App::start(config, config_path.to_owned(), workers) {
            Ok(app) => app,
            // Asked to stop while waiting for a cluster node id: a stop,
            // not a failure (systemd would mark the unit failed). Any other
            // start failure stays one, stop or no stop.
            Err(error) if stopped_while_waiting(&error) => {
                tracing::info!(error = %format!("{error:#}"), "Stopped before serving.");
                return Ok(());
            }
            Err(error) => return Err(error),
        };
        app.run(listener, admin, signals).await
    })
}

/// Whether `error` is the start-up's wait for a node id ended by a stop.
fn stopped_while_waiting(error: &anyhow::Error) -> bool {
    // (A `StoreError` wraps it transparently: it is not a cause of its own.)
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<StoreError>(),
            Some(StoreError::Cluster(ClusterError::StoppedWhileWaiting))
        )
    })
}

/// The listening socket systemd passes as fd 3 (`LISTEN_FDS`), if any.
///
/// With `ticketd.socket`, systemd owns the socket: across a restart it keeps
/// accepting into the kernel's queue, and the new process serves what queued
/// — a restart without refused connections. `LISTEN_PID`, when set, must be
/// our pid (the protocol's guard against inheriting someone else's fds).
fn activated_listener() -> anyhow::Result<Option<TcpListener>> {
    use std::os::fd::FromRawFd;
    let fds: u32 = match std::env::var("LISTEN_FDS").ok().and_then(|v| v.parse().ok()) {
        Some(n) if n >= 1 => n,
        _ => return Ok(None),
    };
    if let Some(pid) = std::env::var("LISTEN_PID").ok().and_then(|v| v.parse::<u32>().ok()) {
        if pid != std::process::id() {
            return Ok(None);
        }
    }
    if fds > 1 {
        tracing::warn!(fds, "Several sockets were passed; using the first.");
    }
    // SAFETY: the service manager passed fd 3 to us, open and listening;
    // `serve` calls this once, so the fd is owned exactly once.
    let std_listener = unsafe { std::net::TcpListener::from_raw_fd(3) };
    std_listener
        .set_nonblocking(true)
        .context("the passed socket is not usable")?;
    Ok(Some(
        TcpListener::from_std(std_listener).context("the passed socket is not a TCP listener")?,
    ))
}

/// `ticketd import`.
pub fn import(config: &Config) -> anyhow::Result<()> {
    // Said here too: in a cluster, the nodes serving what this stores
    // never read the file.
    for warning in &config.warnings {
        eprintln!("warning: {warning}");
    }
    let store = Store::open(config, Access::Tool)?;
    let report = store.import(config, now_ms())?;
    for t in &report.tickets {
        println!(
            "ticket {}: {} codes added, {} in total",
            t.ticket_id,
            t.added.len(),
            t.total
        );
    }
    for c in &report.conflicts {
        eprintln!("skipped: {c}");
    }
    for a in &report.revived {
        println!("activity `{a}` had been retired: this import puts it back on sale.");
    }
    if store.shared_with_nodes() {
        println!(
            "{} imported; their unclaimed codes are on the Redis master lists, where running nodes lease them.",
            count(report.activities, "activity", "activities")
        );
        // An import adds and changes; it never takes an activity away, so
        // say which others the nodes following MongoDB still sell.
        if let Some(stored) = store.shared_activities() {
            let others: Vec<String> = stored?
                .into_iter()
                .filter(|a| !config.activities.iter().any(|c| c.id == a.id))
                .map(|a| a.id)
                .collect();
            if !others.is_empty() {
                println!(
                    "Also stored, and served by nodes whose config names no activity: {} (`ticketd retire --activity ID` takes one off sale).",
                    others.join(", ")
                );
            }
        }
    } else {
        println!(
            "{} imported. A running node picks new codes up on SIGHUP.",
            count(report.activities, "activity", "activities")
        );
    }
    Ok(())
}

/// `ticketd retire --activity ID`.
pub fn retire(config: &Config, activity: &str) -> anyhow::Result<()> {
    let store = Store::open(config, Access::Tool)?;
    match store.retire(activity) {
        None => bail!(
            "an embedded node serves the activities in its config: take `{activity}` out of the file and reload (SIGHUP)"
        ),
        Some(Ok(true)) => {
            println!(
                "activity {activity} retired: nodes whose config names no activity stop listing and selling it within \
                 cluster.refresh_interval; its claims stay (ticketd import with it brings it back)"
            );
            Ok(())
        }
        Some(Ok(false)) => bail!("MongoDB holds no imported definition of `{activity}` (never imported, or retired already)"),
        Some(Err(e)) => Err(e.into()),
    }
}

/// `ticketd check-config`.
pub fn check_config(path: &Path) -> anyhow::Result<()> {
    // The warnings too when there are problems: a file is mended once.
    let (config, problems) = Config::load_with_problems(path)?;
    for warning in &config.warnings {
        println!("warning: {warning}");
    }
    if !problems.is_empty() {
        return Err(crate::config::ConfigError::Invalid {
            path: path.to_owned(),
            problems,
        }
        .into());
    }
    // Relative times next to absolute ones, as a node starting now would
    // resolve them: `serve` would refuse these.
    let problems = crate::catalog::time_problems(&config, now_ms());
    if !problems.is_empty() {
        bail!(
            "{} is not valid for a node starting now:\n  {}",
            path.display(),
            problems.join("\n  ")
        );
    }
    // Not a problem of the file: the token is meant to come from the node's
    // environment, which this shell need not have.
    if config.admin.listen.is_some() && config.admin.token().is_none() {
        println!("note: {}", no_admin_token());
    }
    let tickets: Vec<_> = config.activities.iter().flat_map(|a| &a.tickets).collect();
    let listed: usize = tickets.iter().map(|t| t.explicit_codes().len()).sum();
    let generated: u64 = tickets.iter().filter_map(|t| t.generate).map(u64::from).sum();
    println!(
        "{} is valid: {} activities, {} ticket types; {listed} codes listed, {generated} to generate.",
        path.display(),
        config.activities.len(),
        tickets.len(),
    );
    Ok(())
}

/// What `serve` says of an admin listener without a token (and
/// `check-config`, as a note).
fn no_admin_token() -> String {
    format!(
        "admin.listen is set but there is no admin token: `serve` needs {} in its environment (the systemd unit \
         reads it from /etc/ticketd/env) or admin.token in the file",
        crate::config::ADMIN_TOKEN_ENV
    )
}

/// `ticketd verify [--repair]`: the reconciliation to run after any
/// incident. Embedded: first the journal's segments (damage, gaps; with
/// `--repair`, rewritten keeping every valid record), then the store's
/// invariants; in a cluster, Redis and MongoDB's. Prints a line per
/// activity and every problem, and fails if there is one.
pub fn verify(config: &Config, repair: bool) -> anyhow::Result<()> {
    if config.storage.mode != crate::config::StorageMode::Embedded && repair {
        bail!("--repair rewrites the embedded store's journal; a cluster has none");
    }
    let embedded = config.storage.mode == crate::config::StorageMode::Embedded;
    // First: there must be a store to verify.
    let store = match Store::open(config, Access::Inspect) {
        Ok(store) => store,
        // A journal whose database is gone (deleted by hand): the journal
        // is checked (and repaired, if asked), and the way on said.
        Err(crate::store::StoreError::NoStore(dir)) if embedded && crate::store::journal_dir(&dir).is_dir() => {
            verify_journal(config, repair)?;
            bail!("{}", crate::store::StoreError::JournalWithoutStore(dir));
        }
        Err(e) => return Err(e.into()),
    };
    if embedded {
        verify_journal(config, repair)?;
    }
    let found = store.reconcile()?;
    for line in &found.summary {
        println!("{line}");
    }
    if found.problems.is_empty() {
        println!(
            "consistent: every claim's code exists and is its ticket's, no code twice, nobody over the limit, \
             and the store's parts agree"
        );
        return Ok(());
    }
    for p in &found.problems {
        println!("PROBLEM: {p}");
    }
    bail!("{} problem(s) found; each is listed above", found.problems.len())
}

/// The journal half of [`verify`] (embedded).
fn verify_journal(config: &Config, repair: bool) -> anyhow::Result<()> {
    let dir = config.storage.path.clone();
    // Held for the whole check: no node starts (and trims its journal)
    // while the journal is compared with what the store accounted for.
    let lock = crate::store::lock_data_dir(&dir)?;
    if repair && lock.is_none() {
        bail!("a node is serving from {}; stop it before --repair", dir.display());
    }
    // Only with no node serving: a serving node trims its journal as it
    // applies, and would seem to skip numbers.
    let accounted = match lock {
        Some(_) => Some(crate::store::journal_accounted(&dir)?),
        None => None,
    };
    let reports = crate::journal::verify_from(&crate::store::journal_dir(&dir), repair, accounted)?;
    let mut broken = 0;
    for r in &reports {
        let state = if r.is_broken() {
            broken += 1;
            "BROKEN"
        } else if r.torn_tail_only {
            "torn tail (truncated at the next start)"
        } else {
            "ok"
        };
        println!("{}: {} claims, {state}", r.path.display(), r.claims);
        for (start, end) in &r.damaged {
            println!("  damaged bytes {start}..{end}");
        }
        for (from, to) in &r.gaps {
            println!("  missing claims {from}..={to}");
        }
        if let Some(kept) = &r.kept_as {
            println!(
                "  repaired: every valid record kept, missing numbers voided; the original is {}",
                kept.display()
            );
        }
    }
    println!("{} segments, {broken} broken", reports.len());
    if broken > 0 && !repair {
        bail!("{broken} journal segment(s) would stop a node from starting; run `ticketd verify --repair`");
    }
    Ok(())
}

fn cost(config: &Config) -> HashCost {
    HashCost {
        memory_kib: config.auth.argon2_memory_kib,
        iterations: config.auth.argon2_iterations,
    }
}

/// `ticketd user ...`.
pub fn user(config: &Config, command: UserCommand) -> anyhow::Result<()> {
    let store = Store::open(config, Access::Tool)?;
    // New accounts are checked against look-alikes of the existing ones.
    if matches!(command, UserCommand::Add { .. } | UserCommand::Import { .. }) {
        store.index_skeletons(skeleton_key)?;
    }
    match command {
        UserCommand::Add { username, nickname } => {
            let password = read_password()?;
            let (name, nickname) = validate_account(&username, &password, nickname.as_deref())?;
            let hash = password::hash(&password, cost(config));
            let account = name.account(&nickname, hash, crate::clock::now_ms());
            let user = store.create_user(&account).map_err(|e| match e {
                crate::store::StoreError::UsernameTaken => {
                    anyhow::anyhow!("the username `{username}`, or one that looks like it, is taken")
                }
                other => other.into(),
            })?;
            println!("user {} created with id {}", user.username, user.id);
        }
        UserCommand::Import { file } => {
            let rows = read_user_csv(&file)?;
            let cost = cost(config);
            let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
            let chunk = rows.len().div_ceil(threads).max(1);
            let hashed: Vec<NewUser> = std::thread::scope(|s| {
                let handles: Vec<_> = rows
                    .chunks(chunk)
                    .map(|part| {
                        s.spawn(move || {
                            part.iter()
                                .map(|row| NewUser {
                                    username: row.username.clone(),
                                    skeleton: skeleton_key(&row.username),
                                    nickname: row.nickname.clone(),
                                    password_hash: password::hash(&row.password, cost),
                                    created_at_ms: row.created_at_ms,
                                })
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .flat_map(|h| h.join().expect("hashing thread"))
                    .collect()
            });
            let created = store.create_users(&hashed)?;
            println!(
                "{} created, {} skipped (the username, or one that looks like it, exists)",
                count(created, "user", "users"),
                hashed.len() - created
            );
        }
        UserCommand::Passwd { username } => {
            let password = read_password()?;
            crate::auth::validate_password(&password)?;
            // Found as a login finds it (not held to today's username rules).
            let key = crate::auth::username::identity_key(&username);
            let user = crate::auth::account_named(&store, &key, &username)?
                .with_context(|| format!("no user `{username}`"))?;
            store.set_password_hash(user.id, &password::hash(&password, cost(config)))?;
            println!(
                "password of {} (id {}) set. Sessions already open stay valid until they expire (auth.session_ttl); \
                 to end them at once, add the account to security.blocked_users and reload (a block ends them for \
                 good: take it out again and reload, and the account logs in afresh).",
                user.username, user.id
            );
        }
        UserCommand::List => {
            to_stdout(|out| {
                let mut out = crate::export::spreadsheet_csv(out);
                out.write_record(["id", "username", "nickname", "created_at"])?;
                store.each_user(&mut |u| {
                    out.write_record([
                        u.id.to_string().as_str(),
                        &crate::export::cell(&u.username),
                        &crate::export::cell(&u.nickname),
                        &crate::clock::rfc3339_ms(u.created_at_ms),
                    ])
                    .map_err(std::io::Error::from)
                })?;
                Ok(out.flush()?)
            })?;
        }
    }
    Ok(())
}

fn read_password() -> anyhow::Result<String> {
    let password = if io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ")?;
        let again = rpassword::prompt_password("Again: ")?;
        if first != again {
            bail!("the passwords differ");
        }
        first
    } else {
        let mut line = String::new();
        let read = io::stdin()
            .lock()
            .read_line(&mut line)
            .context("cannot read the password from stdin")?;
        if read == 0 {
            bail!("no password on stdin: pipe one line in, or run on a terminal to be asked for it");
        }
        line.trim_end_matches(['\r', '\n']).to_owned()
    };
    Ok(password)
}

/// One row of a user CSV.
struct UserRow {
    username: String,
    password: String,
    nickname: String,
    /// The `created_at` column, or now.
    created_at_ms: i64,
}

/// Reads `username,password,nickname[,created_at]` rows, validating each;
/// errors name the line. `created_at` (RFC 3339, not in the future) carries
/// an account's registration over from another system, so that an
/// activity's `min_account_age` sees members as old as they are.
fn read_user_csv(file: &Path) -> anyhow::Result<Vec<UserRow>> {
    let now = now_ms();
    let data = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    // A spreadsheet's "CSV UTF-8" starts with a byte-order mark: the header
    // was then not known for one, and refused for an invisible character.
    let data = data.strip_prefix("\u{feff}".as_bytes()).unwrap_or(&data);
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(data);
    let mut rows = Vec::new();
    // Each account's look-alike key, and the line that named it.
    let mut seen: HashMap<String, u64> = HashMap::new();
    let mut lines = Lines { data, byte: 0, line: 1 };
    let mut record = csv::StringRecord::new();
    for i in 0.. {
        let read = reader.read_record(&mut record);
        // The line a record starts on: a quoted field may span lines, so
        // the count of records named the wrong one.
        let at = record.position().map_or(0, |p| lines.of(p.byte() as usize));
        let read = match read {
            // At the line counted here: the csv crate's is a line early in a
            // CRLF file.
            Err(e) if matches!(e.kind(), csv::ErrorKind::Utf8 { .. }) => {
                bail!("{} line {at}: not UTF-8 text; save the file as UTF-8", file.display())
            }
            read => read.with_context(|| format!("cannot read {}", file.display()))?,
        };
        if !read {
            break;
        }
        // Every field trimmed but the password, which is what it says, as
        // registration and `user add` take it.
        let field = |n: usize| record.get(n).unwrap_or("").trim().to_owned();
        let password = record.get(1).unwrap_or("").to_owned();
        let (username, nickname) = (field(0), field(2));
        if i == 0 && username.eq_ignore_ascii_case("username") && password.trim().eq_ignore_ascii_case("password") {
            continue;
        }
        let line = || format!("{} line {at}", file.display());
        // An unquoted comma in a password or nickname shifts the columns:
        // refused, not read as another password and nickname. (Empty ones
        // past the fourth are a spreadsheet's, and mean nothing.)
        if record.iter().skip(4).any(|f| !f.trim().is_empty()) {
            bail!(
                "{}: {} columns; a row has at most four (username,password,nickname,created_at), \
                 and a field holding a comma is quoted",
                line(),
                record.len()
            );
        }
        // A spreadsheet saved with `;` or tabs (many locales' default) is
        // one field per row here: said as such, not as a bad username.
        if record.len() == 1 {
            if let Some(sep) = [';', '\t', '|'].into_iter().find(|s| username.contains(*s)) {
                bail!(
                    "{}: one column, holding {sep:?}: the file must be comma-separated \
                     (username,password,nickname,created_at)",
                    line()
                );
            }
        }
        let (name, nickname) = validate_account(&username, &password, Some(&nickname)).with_context(line)?;
        // Named twice (or as a look-alike): the second row was skipped as
        // if the account already existed, its password dropped unsaid.
        if let Some(first) = seen.insert(skeleton_key(name.key()), at) {
            bail!(
                "{}: `{username}` is the account of line {first} (the same name, or one that looks like it); \
                 a file names each account once",
                line()
            );
        }
        let created_at_ms = match field(3).as_str() {
            "" => now,
            text => created_at(text, now).with_context(line)?,
        };
        rows.push(UserRow {
            username: name.key().to_owned(),
            password,
            nickname,
            created_at_ms,
        });
    }
    Ok(rows)
}

/// The line numbers of a CSV file's records, counted on from one record
/// to the next (they come in order).
struct Lines<'a> {
    data: &'a [u8],
    /// Where the last record started, and on which line.
    byte: usize,
    line: u64,
}

impl Lines<'_> {
    /// The line of the record that starts at byte `at`. The csv crate puts
    /// a record's start before the line ending that precedes it when the
    /// ending is CRLF (it reads the `\n` with the next record), and before
    /// any blank lines: those bytes are skipped first, or every record of a
    /// Windows file was named a line early.
    fn of(&mut self, mut at: usize) -> u64 {
        while matches!(self.data.get(at), Some(b'\r' | b'\n')) {
            at += 1;
        }
        let at = at.min(self.data.len()).max(self.byte);
        // Lines end in `\n`, `\r\n` or a lone `\r` (an old Mac's).
        let ends = |(i, &b): (usize, &u8)| b == b'\n' || (b == b'\r' && self.data.get(i + 1) != Some(&b'\n'));
        self.line += (self.byte..at)
            .zip(&self.data[self.byte..at])
            .filter(|&e| ends(e))
            .count() as u64;
        self.byte = at;
        self.line
    }
}

/// A `created_at` cell: an RFC 3339 time, not after `now`.
fn created_at(text: &str, now: i64) -> anyhow::Result<i64> {
    let ms = parse_rfc3339_ms(text)
        // Escaped: a file's terminal escapes went raw to the operator's terminal.
        .with_context(|| {
            format!(
                "created_at `{}` is not an RFC 3339 time, like 2024-03-01T09:30:00+08:00",
                text.escape_debug()
            )
        })?;
    if ms > now {
        bail!("created_at `{text}` is in the future");
    }
    // No account is older than Unix time: a year 1 or 1900 is a
    // spreadsheet's empty date, and would pass every `min_account_age`.
    if ms < 0 {
        bail!("created_at `{text}` is before 1970");
    }
    Ok(ms)
}

/// Where an output file must not go: the node's own files. `--out` is
/// written beside its place and renamed over it, so a mistyped or
/// tab-completed `--out data/ticketd.db` replaced the store's database
/// (every account, code and claim) with a CSV, and said "rows written";
/// `--out config.toml` the config, and `--out codes.txt` would feed CSV rows
/// to the next import. Only those: the store's directory may be the
/// working directory too (`/var/lib/ticketd` is both in the shipped unit),
/// where a report lands by default. Resolved through symbolic links and
/// `..`, as the rename would.
struct NodeFiles {
    /// The store's files, its journal's and rooms' directories (what is
    /// in them too), the config and its codes files; resolved.
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
}

impl NodeFiles {
    fn of(config: &Config, config_path: &Path) -> NodeFiles {
        let mut files: Vec<PathBuf> = std::fs::canonicalize(config_path).into_iter().collect();
        let mut dirs = Vec::new();
        if let Ok(store) = std::fs::canonicalize(&config.storage.path) {
            // Each as named and, if it is a link (a journal on a disk of
            // its own, say), where it leads: the write follows it.
            let both = |p: PathBuf| [std::fs::canonicalize(&p).ok(), Some(p)].into_iter().flatten();
            files.extend(crate::store::own_files(&store).into_iter().flat_map(both));
            dirs.extend(both(crate::store::journal_dir(&store)));
            dirs.extend(both(Rooms::dir_in(&store)));
        }
        // The access log: the node would go on appending to a deleted file.
        files.extend(
            config
                .log
                .access_log
                .iter()
                .filter_map(|f| std::fs::canonicalize(f).ok()),
        );
        files.extend(
            config
                .activities
                .iter()
                .flat_map(|a| &a.tickets)
                .filter_map(|t| t.codes_file.as_ref())
                .filter_map(|f| std::fs::canonicalize(config.base_dir.join(f)).ok()),
        );
        NodeFiles { files, dirs }
    }

    /// Refuses `out` if it is one of the node's files.
    fn refuse(&self, out: &Path) -> anyhow::Result<()> {
        let Some(resolved) = resolved(out) else {
            // Its directory is not there: the write fails, and says so.
            return Ok(());
        };
        if self.files.contains(&resolved) || self.dirs.iter().any(|d| resolved.starts_with(d)) {
            bail!(
                "{} is the node's own ({}): writing there would replace it; write it elsewhere",
                out.display(),
                resolved.display()
            );
        }
        Ok(())
    }
}

/// `path` as the write would reach it: the file itself through any link if
/// it exists, else its resolved directory joined with its name.
fn resolved(path: &Path) -> Option<PathBuf> {
    if let Ok(p) = std::fs::canonicalize(path) {
        return Some(p);
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    Some(std::fs::canonicalize(dir).ok()?.join(path.file_name()?))
}

/// The `--out` of a tool: `-` is standard output, as the convention goes
/// (it made a file named `-`); any other path is checked against
/// [`NodeFiles`].
fn out_file(args_out: Option<&Path>, config: &Config, config_path: &Path) -> anyhow::Result<Option<PathBuf>> {
    match args_out {
        None => Ok(None),
        Some(p) if p == Path::new("-") => Ok(None),
        Some(p) => {
            NodeFiles::of(config, config_path).refuse(p)?;
            Ok(Some(p.to_owned()))
        }
    }
}

/// `ticketd export`.
pub fn export(config: &Config, config_path: &Path, mut args: ExportArgs) -> anyhow::Result<()> {
    args.out = out_file(args.out.as_deref(), config, config_path)?;
    if args.what == ExportWhat::Draw {
        if let Some(format) = args.format.and_then(|f| clap::ValueEnum::to_possible_value(&f)) {
            let name = format.get_name();
            bail!("a draw exports as one JSON document, not {name}; leave out --format");
        }
        return export_draw(config, &args);
    }
    let format = args.format.unwrap_or(ExportFormat::Csv);
    if args.what == ExportWhat::Rejections && format == ExportFormat::Parquet {
        bail!("rejections export as csv or jsonl; Parquet is for claims");
    }
    if format == ExportFormat::Parquet && args.out.is_none() {
        bail!("a Parquet export needs --out FILE");
    }
    if args.bom && format != ExportFormat::Csv {
        bail!("--bom is for CSV (Excel reads UTF-8 by it); JSON lines and Parquet take no byte-order mark");
    }
    let store = Store::open_with_activity(config, &args.activity)?;
    // Counted before the export reads: an overstatement at worst.
    let (in_transit, conflicts) = match args.what {
        ExportWhat::Claims => (
            store.claims_in_transit(&args.activity)?,
            store.claim_conflicts(&args.activity)?,
        ),
        _ => (InTransit::Counted(0), 0),
    };
    let bom = args.bom;
    let write = |out: &mut (dyn Write + Send)| -> anyhow::Result<u64> {
        if bom {
            out.write_all("\u{feff}".as_bytes())
                .context("cannot write the export")?;
        }
        Ok(match args.what {
            ExportWhat::Claims => export::claims(&store, &args.activity, format, out)?,
            ExportWhat::Rejections => export::rejections(&store, &args.activity, format, out)?,
            ExportWhat::Draw => unreachable!("exported above"),
        })
    };
    match &args.out {
        Some(path) => {
            let n = write_whole(path, write)?;
            eprintln!("{} written to {}", count(n as usize, "row", "rows"), path.display());
        }
        None => {
            if to_stdout(write)?.is_none() {
                return Ok(());
            }
        }
    }
    warn_in_transit(&in_transit, "this export");
    warn_conflicts(conflicts, "this export");
    Ok(())
}

/// Says on stderr that `what` lacks acknowledged claims kept apart as
/// conflicts ([`Store::claim_conflicts`]).
fn warn_conflicts(n: u64, what: &str) {
    if n > 0 {
        eprintln!(
            "warning: {} answered success but met another stored claim of the same code (or of the same user's \
             claim number); they are kept in MongoDB's claim_conflicts, and {what} lacks them. Redis lost writes \
             it had acknowledged: run `ticketd verify`, and settle each with the users concerned",
            count(n as usize, "claim was", "claims were")
        );
    }
}

/// Says on stderr that `what` lacks claims still on their way to the store
/// it reads, or may lack some (Redis, which holds a cluster's backlogs,
/// did not answer).
fn warn_in_transit(in_transit: &InTransit, what: &str) {
    match in_transit {
        InTransit::Counted(0) => {}
        InTransit::Counted(n) => eprintln!(
            "warning: {} committed but not yet where {what} reads them (a cluster node's backlog for \
             MongoDB, or a serving node's journal not yet applied to SQLite): {what} lacks them; run it \
             again in a moment (in a cluster, once ticketd_mongo_backlog is 0 on every node: a dead \
             node's backlog is written once a live node reaps it)",
            count(*n as usize, "claim is", "claims are")
        ),
        InTransit::Unknown(why) => eprintln!(
            "warning: Redis could not be asked how many claims are still on their way to MongoDB ({why}): \
             {what} holds every claim MongoDB has, and lacks any still in a node's backlog (there are \
             some only if MongoDB was out of reach, or a node died, since they were made); run it again \
             once Redis is back to be sure"
        ),
    }
}

/// `ticketd export --what draw`: the room's log, read beside a serving node.
fn export_draw(config: &Config, args: &ExportArgs) -> anyhow::Result<()> {
    let store = Store::open(config, Access::Tool)?;
    let record = match store.room_source() {
        // A cluster: the room's log is in Redis.
        Some(source) => source.whole_log(&args.activity)?.and_then(|(seed, events)| {
            let seed = Seed::from_hex(&seed)?;
            Room::from_shared_log(args.activity.as_str().into(), seed, &events).draw_record()
        }),
        None => Room::recorded_draw(&Rooms::dir_in(&config.storage.path), &args.activity)
            .with_context(|| format!("cannot read the waiting room of `{}`", args.activity))?,
    };
    let mut record = record.with_context(|| {
        format!(
            "activity `{}` has no draw yet: it has no waiting room on this node's store, or its order is not drawn yet",
            args.activity
        )
    })?;
    // The log says how the room drew (from this version on: its shuffle
    // line carries the mode). An earlier version's does not; then the
    // activity's definition does (a change is refused once the room is
    // open): the config's, or in a cluster whose nodes serve what `import`
    // stored, MongoDB's. Without one the record names no mode rather than
    // a wrong one: a lottery's record must say so, or a drawn entrant moved
    // to `late` would verify.
    if record.admission.is_none() {
        record.admission = admission_of(config, &store, &args.activity)?.filter(|mode| !mode.is_race());
    }
    let json = serde_json::to_vec_pretty(&record)?;
    match &args.out {
        Some(path) => {
            write_whole(path, |out| Ok(out.write_all(&json)?))?;
            eprintln!(
                "draw of {} (and {}) written to {}",
                count(record.entrants.len(), "entrant", "entrants"),
                count(record.late.len(), "later arrival", "later arrivals"),
                path.display()
            );
        }
        None => {
            to_stdout(|out| {
                out.write_all(&json)?;
                Ok(out.write_all(b"\n")?)
            })?;
        }
    }
    Ok(())
}

/// `ticketd verify-draw FILE [--commitment HEX]`. The file alone only
/// proves it agrees with itself (a seed picked after the entrants were
/// known, with its own commitment, would too): the commitment published
/// before the room opened is what ties it down, given here or compared by
/// whoever reads the output.
pub fn verify_draw(file: &Path, published: Option<&str>) -> anyhow::Result<()> {
    let text = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let record: DrawRecord =
        serde_json::from_slice(&text).with_context(|| format!("{} is not a draw export", file.display()))?;
    if let Some(published) = published {
        if !published.trim().eq_ignore_ascii_case(&record.commitment) {
            bail!(
                "the draw does NOT verify: its commitment {} is not the published one ({})",
                record.commitment,
                published.trim()
            );
        }
    }
    match record.verify() {
        Ok(()) => {
            let tie = if published.is_some() {
                "the published commitment"
            } else {
                "the record's commitment (compare it with the one published before the room opened, or \
                 pass --commitment)"
            };
            println!(
                "draw verified: activity `{}`, {}; SHA-256(seed) = {} is {tie}, \
                 and the order is the seed's draw of the entrants",
                record.activity,
                count(record.entrants.len(), "entrant", "entrants"),
                record.commitment
            );
            if record.admission.is_none() && !record.late.is_empty() {
                println!(
                    "note: the record does not say whether the room was a queue or a lottery (exports \
                     made before the record named it do not), so nothing checked that a lottery's rule of no \
                     entry after the draw holds for the {} listed as late",
                    count(record.late.len(), "user", "users")
                );
            }
            Ok(())
        }
        Err(problem) => bail!("the draw does NOT verify: {problem}"),
    }
}

/// How `activity` admits fans: by the config's definition, or in a cluster
/// whose nodes serve what `import` stored, by MongoDB's; `None` if neither
/// has it.
fn admission_of(config: &Config, store: &Store, activity: &str) -> anyhow::Result<Option<AdmissionMode>> {
    let stored = match config.activities.iter().any(|a| a.id == activity) {
        true => None,
        false => store.shared_activities().transpose()?,
    };
    Ok(config
        .activities
        .iter()
        .chain(stored.iter().flatten())
        .find(|a| a.id == activity)
        .map(|a| a.admission))
}

/// The waiting room's section of the report, when the activity has a room
/// log: `Unread` when it is in Redis and Redis cannot be reached (the rest
/// of the report, read from MongoDB, does not need it).
fn queue_report(
    config: &Config,
    store: &Store,
    activity: &str,
    data: &crate::store::ReportData,
) -> anyhow::Result<RoomRecord> {
    let dir = Rooms::dir_in(&config.storage.path);
    let shared = match store.room_source() {
        Some(source) => match source.whole_log(activity) {
            Ok(Some(log)) => Some(log),
            Ok(None) => return Ok(RoomRecord::None),
            Err(e) if e.is_redis_out_of_reach() => {
                // Only a queue or a lottery has a room to miss. A retired
                // activity's, or one no longer in the config, is not known
                // here: it may have had one.
                return Ok(match admission_of(config, store, activity)? {
                    Some(mode) if mode.is_race() => RoomRecord::None,
                    Some(_) => RoomRecord::Unread(e.to_string()),
                    None => RoomRecord::Unread(format!(
                        "{e}; this config and MongoDB's definitions no longer say how the activity admitted \
                         fans, so it may have had none"
                    )),
                });
            }
            Err(e) => return Err(e.into()),
        },
        None if !dir.join(format!("{activity}.log")).exists() => return Ok(RoomRecord::None),
        None => None,
    };
    // The activity's claims as the export reads them, from either store
    // (`for_each_claim` warms a node at start and reads nothing in a
    // cluster: there every admitted fan counted as never having claimed).
    let mut first_claim: HashMap<u64, i64> = HashMap::new();
    store.export_claims(activity, &mut |c| {
        let at = first_claim.entry(c.user_id).or_insert(c.claimed_at_ms);
        *at = (*at).min(c.claimed_at_ms);
        Ok(())
    })?;
    let start_ms = data.activity.as_ref().map_or(0, |a| a.1);
    match shared {
        Some((seed, events)) => Ok(RoomRecord::Read(QueueReport::of(
            Some(&seed),
            &events,
            start_ms,
            &first_claim,
        ))),
        None => QueueReport::read(&dir, activity, start_ms, &first_claim)
            .map(|q| q.map_or(RoomRecord::None, RoomRecord::Read))
            .with_context(|| format!("cannot read the waiting room of `{activity}`")),
    }
}

/// `ticketd report`.
pub fn report(config: &Config, config_path: &Path, args: ReportArgs) -> anyhow::Result<()> {
    // Without --out, the report is named for its activity.
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("report-{}.html", args.activity)));
    let out = out_file(Some(&out), config, config_path)?;
    let store = Store::open_with_activity(config, &args.activity)?;
    let data = store.report_data(&args.activity, args.top)?;
    let room = queue_report(config, &store, &args.activity, &data)?;
    let html = export::report::render(&args.activity, &data, &room, now_ms());
    match &out {
        Some(path) => write_whole(path, |out| Ok(out.write_all(html.as_bytes())?))?,
        None => {
            if to_stdout(|out| Ok(out.write_all(html.as_bytes())?))?.is_none() {
                return Ok(());
            }
        }
    }
    let s = export::report::summary(&data);
    warn_in_transit(&data.in_transit, "the report");
    if let RoomRecord::Unread(why) = &room {
        eprintln!(
            "warning: the waiting room's record is in Redis, which did not answer ({why}): the report does not \
             show it; generate it again once Redis is back"
        );
    }
    warn_conflicts(store.claim_conflicts(&args.activity)?, "the report");
    eprintln!(
        "report written to {}: {} of {} codes claimed by {}",
        out.as_deref()
            .map_or_else(|| "standard output".to_owned(), |p| p.display().to_string()),
        s.claimed,
        s.codes,
        count(s.users as usize, "user", "users")
    );
    Ok(())
}

/// Standard output, noting whether its reader went away.
struct Stdout {
    inner: io::Stdout,
    closed: bool,
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let r = self.inner.write(buf);
        self.closed |= r.as_ref().is_err_and(|e| e.kind() == io::ErrorKind::BrokenPipe);
        r
    }

    fn flush(&mut self) -> io::Result<()> {
        let r = self.inner.flush();
        self.closed |= r.as_ref().is_err_and(|e| e.kind() == io::ErrorKind::BrokenPipe);
        r
    }
}

/// Runs `write` on standard output, buffered. A reader that went away
/// (`ticketd export ... | head`) ends it quietly with `None`, as `cat`
/// does: it said "Broken pipe" and exited 1. Any other failure, the store's
/// included, is still the error.
fn to_stdout<T>(write: impl FnOnce(&mut (dyn Write + Send)) -> anyhow::Result<T>) -> anyhow::Result<Option<T>> {
    let mut out = io::BufWriter::new(Stdout {
        inner: io::stdout(),
        closed: false,
    });
    let result = write(&mut out).and_then(|t| Ok(out.flush().map(|()| t)?));
    match result {
        Err(_) if out.get_ref().closed => Ok(None),
        result => result.map(Some),
    }
}

/// Writes the file at `path` whole or not at all: into a new file beside
/// it, synced, then renamed over it. An export that fails halfway (the
/// store stops answering, the disk fills up, the process is killed) used to
/// leave a part that looked whole — a CSV cut at a page of rows, or a
/// header alone, reads like a smaller export — in place of the previous
/// file, which it had already truncated. Now the previous file stays as it
/// was. The new file takes the old one's permissions (an export made
/// private stays private), and a symbolic link is followed: the file it
/// names is replaced, not the link. A path that names no regular file
/// (`/dev/stdout`, a pipe) is written to directly.
fn write_whole<T>(path: &Path, write: impl FnOnce(&mut (dyn Write + Send)) -> anyhow::Result<T>) -> anyhow::Result<T> {
    // One look at what is there: a device or pipe is written in place; a
    // file (through any symlink) is replaced, keeping its permissions.
    let resolved;
    let (path, old) = match std::fs::metadata(path) {
        Ok(meta) if !meta.is_file() => {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            let mut out = io::BufWriter::new(file);
            let written = write(&mut out)?;
            out.flush()
                .with_context(|| format!("cannot write {}", path.display()))?;
            return Ok(written);
        }
        Ok(meta) => {
            resolved = std::fs::canonicalize(path).with_context(|| format!("cannot resolve {}", path.display()))?;
            (resolved.as_path(), Some(meta))
        }
        Err(_) => (path, None),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    // Unique per run (a killed export's leftover never blocks the next).
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let part = path.with_file_name(format!(
        ".{}.{}-{nanos}.part",
        name.to_string_lossy(),
        std::process::id()
    ));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&part)
        .with_context(|| {
            // The file is written beside its place and renamed into it:
            // the error is the place's (a missing directory, no write
            // permission there), and says so in its terms.
            format!("cannot write {}", path.display())
        })?;
    if let Some(old) = &old {
        let _ = file.set_permissions(old.permissions());
    }
    let mut out = io::BufWriter::new(file);
    let result = write(&mut out).and_then(|written| {
        let file = out.into_inner().map_err(io::IntoInnerError::into_error)?;
        file.sync_all()?;
        std::fs::rename(&part, path)?;
        // The rename itself, past a power cut.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(written)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    result.with_context(|| match old {
        Some(_) => format!(
            "cannot write {} (the file already there is left as it was)",
            path.display()
        ),
        None => format!("cannot write {}", path.display()),
    })
}

/// `n` and the noun for it: "1 row", "2 rows".
fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}
