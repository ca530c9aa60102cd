//! SIGHUP reload: build, validate, diff, swap — or refuse and keep serving.

use std::sync::{
    atomic::{AtomicBool, AtomicUsize, Ordering},
    Arc,
};

use crate::common::{assert_error, base_config, claim_body, open_activity, Act, Codes, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_change_applies_under_load_without_failing_a_request() {
    let v1 = base_config() + &open_activity("live", 3000, 1);
    let app = TestApp::start(&v1);
    let tokens = app.users("l", 400).await;

    // Load: claims and catalog reads until told to stop; any unexpected answer fails.
    let stop = Arc::new(AtomicBool::new(false));
    let bad = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for chunk in tokens.chunks(50) {
        let (client, stop, bad, done, chunk) = (
            app.client_clone(),
            stop.clone(),
            bad.clone(),
            done.clone(),
            chunk.to_vec(),
        );
        load.push(tokio::spawn(async move {
            let mut bodies = Vec::new();
            for token in &chunk {
                bodies.push(claim_body(&client, token, "live").await);
            }
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let token = &chunk[i % chunk.len()];
                let body = &bodies[i % chunk.len()];
                i += 1;
                let claim = client.post("/ticket/get", Some(token), body).await;
                let list = client.get("/act/list", None).await;
                let ok = matches!(&claim, Ok(r) if r.status == 200 || r.error_code() == Some("LIMIT_REACHED"))
                    && matches!(&list, Ok(r) if r.status == 200);
                if !ok {
                    eprintln!("unexpected: {claim:?} {list:?}");
                    bad.fetch_add(1, Ordering::Relaxed);
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    // v2: rename, raise the limit, add codes, add an activity.
    let v2 = base_config()
        + &open_activity("live", 3500, 2).replace("Activity live", "Renamed live")
        + &open_activity("new", 10, 1);
    // Reload only once the load is flowing.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while done.load(Ordering::Relaxed) < 200 {
        assert!(std::time::Instant::now() < deadline, "the load never started");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let before_reload = done.load(Ordering::Relaxed);
    let outcome = app.reload(&v2);
    assert_eq!(outcome["message"], "Config reloaded.", "{outcome}");
    assert_eq!(outcome["codes_added"], 510);
    let requests_during = done.load(Ordering::Relaxed) - before_reload;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    assert_eq!(bad.load(Ordering::Relaxed), 0, "requests failed around the reload");
    assert!(requests_during > 0, "no request was answered while the reload ran");

    let live = app.detail("live").await;
    assert_eq!(live["name"], "Renamed live");
    assert_eq!(live["perUserLimit"], 2);
    assert_eq!(live["tickets"][0]["total"], 3500);
    assert_eq!(
        live["claimed"].as_u64().unwrap() + live["remaining"].as_u64().unwrap(),
        3500
    );
    assert_eq!(app.detail("new").await["remaining"], 10);
    // The raised limit applies at once.
    let fresh = app.register("fresh").await;
    assert_eq!(app.claim(&fresh, "live").await.status, 200);
    let second = app.claim(&fresh, "live").await;
    assert_eq!(second.status, 200, "{}", second.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_or_restart_only_change_is_refused_and_the_old_config_serves() {
    let v1 = base_config() + &open_activity("keep", 5, 1);
    let app = TestApp::start(&v1);
    let token = app.register("kim").await;

    let broken = v1.replace("per_user_limit = 1", "per_user_limit = \"one\"");
    let outcome = app.reload(&broken);
    assert_eq!(outcome["message"], "Reload refused; still serving the previous config.");
    let reason = outcome["reason"].as_str().unwrap();
    assert!(reason.contains("line"), "the reason names the line: {reason}");

    let inconsistent = v1.replace("start_time = \"-1m\"", "start_time = \"+2h\"");
    let outcome = app.reload(&inconsistent);
    assert!(
        outcome["reason"].as_str().unwrap().contains("must end after it starts"),
        "{outcome}"
    );

    let moved = v1.replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"");
    let outcome = app.reload(&moved);
    assert!(
        outcome["reason"].as_str().unwrap().contains("server.listen"),
        "{outcome}"
    );
    // Sized at start, so restart-only too (a reload once took these and
    // kept the old values without a word).
    for (section, key) in [
        ("[auth]", "max_concurrent_hashes = 3"),
        ("[auth]", "hash_queue = 7"),
        ("[security]", "max_tracked_clients = 12345"),
    ] {
        let resized = v1.replace(section, &format!("{section}\n{key}"));
        let outcome = app.reload(&resized);
        let name = key.split(' ').next().unwrap();
        assert!(
            outcome["reason"].as_str().is_some_and(|r| r.contains(name)),
            "{key}: {outcome}"
        );
    }

    // A duration no clock can be counted on past: it passed as valid, the
    // reload applied it, and then every new connection's task panicked
    // adding it to the time (`/healthz` included).
    let forever = v1.replace(
        "[server]\n",
        "[server]\nheader_read_timeout = \"10000000000000000000s\"\n",
    );
    assert_ne!(forever, v1);
    let outcome = app.reload(&forever);
    assert!(
        outcome["reason"]
            .as_str()
            .is_some_and(|r| r.contains("at most 100 years")),
        "{outcome}"
    );
    assert_eq!(app.client.get("/healthz", None).await.unwrap().status, 200);

    // A ticket type moved to another activity (here: the activity renamed).
    let moved = v1.replace("id = \"keep\"\n", "id = \"kept\"\n");
    assert_ne!(moved, v1);
    let outcome = app.reload(&moved);
    assert!(
        outcome["reason"]
            .as_str()
            .unwrap()
            .contains("ticket type `keep-t` moved from activity `keep` to `kept`"),
        "{outcome}"
    );

    // Still serving v1.
    assert_eq!(app.detail("keep").await["perUserLimit"], 1);
    assert_eq!(app.claim(&token, "keep").await.status, 200);
    assert_eq!(app.detail("keep").await["remaining"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_refuses_claims_and_unpausing_resumes_with_stock_intact() {
    let v1 = base_config() + &open_activity("p", 3, 1);
    let app = TestApp::start(&v1);
    let a = app.register("pauline").await;
    let b = app.register("paul").await;
    assert_eq!(app.claim(&a, "p").await.status, 200);

    let paused = v1
        .replace("per_user_limit = 1", "per_user_limit = 1\npaused = true")
        .replace("[security]", "[security]\nblocked_users = [\"mallory\", \"trudy\"]");
    assert_ne!(paused.matches("mallory").count(), 0);
    // The log says who reloaded and what changed (it said `codes_added`
    // alone: who paused the sale, or blocked whom, was nowhere).
    let said = app.reload(&paused);
    assert_eq!(said["message"], "Config reloaded.");
    assert_eq!(said["by"], "SIGHUP", "{said}");
    assert_eq!(
        said["changes"], "security.blocked_users +mallory +trudy; activity `p`: paused",
        "{said}"
    );
    let res = app.claim(&b, "p").await;
    assert_eq!((res.status, res.error_code()), (409, Some("PAUSED")), "{}", res.body);
    assert_eq!(app.detail("p").await["paused"], true);

    let said = app.reload(&v1);
    assert_eq!(said["message"], "Config reloaded.");
    assert_eq!(
        said["changes"], "security.blocked_users -mallory -trudy; activity `p`: resumed",
        "{said}"
    );
    // A ticket type's name, and a key of the activity's it names by no
    // name of its own, are said too (they read "none").
    let renamed = v1
        .replace("name = \"Ticket p\"", "name = \"Seat p\"")
        .replace("per_user_limit = 1", "per_user_limit = 1\ndesc = \"Row A\"");
    assert_ne!(renamed.matches("Seat p").count(), 0);
    let said = app.reload(&renamed);
    assert_eq!(said["changes"], "activity `p`: ticket `p-t`, other settings", "{said}");
    assert_eq!(app.reload(&v1)["message"], "Config reloaded.");
    assert_eq!(app.detail("p").await["remaining"], 2);
    assert_eq!(app.claim(&b, "p").await.status, 200);
    assert_eq!(app.detail("p").await["remaining"], 1);
}

/// Issue 12, item 3: codes that `ticketd import` (another process) added
/// while the node served never reached its pools before a restart — the
/// node's own re-import on SIGHUP found them already stored and added
/// nothing. Now a reload puts every code the node never held in stock, and
/// says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codes_imported_by_another_process_are_sold_after_sighup() {
    use crate::common::{Act, Codes};
    let act = |codes: &[&str]| {
        Act::new("more")
            .window("-1m", "+1h")
            .limit(1)
            .ticket("more-t", "Seat", Codes::List(codes))
            .toml()
    };
    let v1 = base_config() + &act(&["M1", "M2"]);
    let app = TestApp::start(&v1);
    let mut tokens = Vec::new();
    for i in 0..4 {
        tokens.push(app.register(&format!("more-{i}")).await);
    }
    for t in &tokens[..2] {
        assert_eq!(app.claim(t, "more").await.status, 200);
    }
    let res = app.claim(&tokens[2], "more").await;
    assert_eq!(res.error_code(), Some("SOLD_OUT"), "{}", res.body);

    // The organiser adds two codes and imports them from the command line.
    let v2 = base_config() + &act(&["M1", "M2", "M3", "M4"]);
    std::fs::write(app.config_path(), &v2).unwrap();
    let out = app.cli(&["import"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let outcome = app.reload(&v2);
    assert_eq!(outcome["message"], "Config reloaded.", "{outcome}");
    assert_eq!(outcome["codes_added"], 2, "{outcome}");
    assert!(app
        .logs_text()
        .contains("Codes imported by another process are now in stock."));

    let mut got = Vec::new();
    for t in &tokens[2..] {
        let res = app.claim(t, "more").await;
        assert_eq!(res.status, 200, "{}", res.body);
        got.push(res.data()["code"].as_str().unwrap().to_owned());
    }
    got.sort();
    assert_eq!(got, ["M3", "M4"], "only the new codes; M1 and M2 never come back");
    assert_eq!(app.detail("more").await["remaining"], 0);
}

/// A reload that overlaps `ticketd import` puts the import's codes in
/// stock. The reload read what other processes had imported, then waited
/// for SQLite's write lock, which the import held; once the import
/// committed, the reload's own write found every code stored and added
/// none. The new ticket type was served with no stock, answered SOLD_OUT
/// ("every code has been claimed", final) until another reload (a reload
/// walkthrough). The SIGHUP is sent while the import is seen holding the
/// write lock, as it is for most of its run. (Not too large an import: a
/// reload waits 10 s for the lock at most, then is refused, and a loaded
/// CI box took longer than that to import 200,000 codes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_beside_an_import_in_progress_stocks_what_it_imported() {
    const CODES: u32 = 50_000;
    let act = |big: bool| {
        let a = Act::new("race")
            .window("-1m", "+1h")
            .ticket("race-a", "A", Codes::Generate(1));
        match big {
            true => a.ticket("race-b", "B", Codes::Generate(CODES)),
            false => a,
        }
        .toml()
    };
    let app = TestApp::start(&(base_config() + &act(false)));
    let token = app.register("race-fan").await;
    std::fs::write(app.config_path(), base_config() + &act(true)).unwrap();
    let mut import = crate::common::spawn_ticketd(app.dir.path(), &["import"]);
    // The import's write transaction, seen from beside it.
    let db = app.sqlite();
    db.busy_timeout(std::time::Duration::ZERO).unwrap();
    loop {
        match db.execute_batch("BEGIN IMMEDIATE") {
            Ok(()) => db.execute_batch("ROLLBACK").unwrap(),
            Err(_) => break,
        }
        assert!(
            import.try_wait().unwrap().is_none(),
            "the import ended before its write was seen: {:?}",
            import.wait_with_output()
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let reloads = app.count_logs("Config reloaded.");
    app.signal(libc::SIGHUP);
    let out = import.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let outcome = app.wait_for_log("Config reloaded.", reloads + 1);
    assert_eq!(outcome["codes_added"], CODES, "{outcome}");
    let tickets = app.detail("race").await["tickets"].clone();
    let b = tickets
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["ticketId"] == "race-b")
        .unwrap();
    assert_eq!(
        (b["total"].as_u64(), b["remaining"].as_u64()),
        (Some(u64::from(CODES)), Some(u64::from(CODES))),
        "{b}"
    );
    let body = serde_json::json!({ "actId": "race", "ticketId": "race-b", "claimToken": app.claim_body(&token, "race").await["claimToken"] });
    let res = app.client.post("/ticket/get", Some(&token), &body).await.unwrap();
    assert_eq!(res.status, 200, "{}", res.body);
}

/// A SIGHUP while the node starts is a reload once it has started. Until
/// the runtime's handler was installed, after the whole config (codes
/// files included) was read, SIGHUP's default action ended the node at
/// once: exit 129, not a line in the log (a reload walkthrough: a `kill
/// -HUP` right after a restart). The config is a FIFO here, so the node
/// waits in the middle of reading it while the signal comes: it must be
/// catching SIGHUP by then (`SigCgt` in /proc).
#[test]
fn a_sighup_while_the_node_starts_is_a_reload_not_its_end() {
    use std::{
        io::{BufRead, Write},
        os::unix::fs::OpenOptionsExt,
        time::{Duration, Instant},
    };
    /// The node, killed if the test ends early (it may be waiting on the FIFO).
    struct Node(std::process::Child);
    impl Drop for Node {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let config = base_config() + &open_activity("boot", 5, 1);
    let app = TestApp::prepare(&config, &[("config.real", &config)]);
    let fifo = app.config_path();
    std::fs::remove_file(&fifo).unwrap();
    let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    let mut node = Node(
        std::process::Command::new(crate::common::BIN)
            .args(["--config", "config.toml", "--log-format", "json", "serve"])
            .current_dir(app.dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let pid = node.0.id() as i32;
    let catches_hup = || {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .is_some_and(|mask| mask & (1 << (libc::SIGHUP - 1)) != 0)
    };
    // Nothing of the config is read yet: the FIFO has no writer.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !catches_hup() {
        assert!(
            node.0.try_wait().unwrap().is_none(),
            "the node ended before it read its config"
        );
        assert!(
            Instant::now() < deadline,
            "the node does not catch SIGHUP while it reads its config"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: a signal to our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    // Opened once the node has it open (until then: ENXIO); the file put in
    // its place before the node reads on, for the reload to read.
    let mut writer = loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
        {
            Ok(writer) => break writer,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                assert!(node.0.try_wait().unwrap().is_none(), "the node ended: {e}");
                assert!(Instant::now() < deadline, "the node never opened its config");
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("{e}"),
        }
    };
    std::fs::rename(app.dir.path().join("config.real"), &fifo).unwrap();
    // Far less than a pipe holds: written whole at once.
    writer.write_all(config.as_bytes()).unwrap();
    drop(writer);
    let stderr = node.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut said = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !said.iter().any(|l: &String| l.contains("\"Config reloaded.\"")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => said.push(line),
            Err(_) => panic!("no reload: {:?}\n{}", node.0.try_wait(), said.join("\n")),
        }
    }
    let said = said.join("\n");
    assert!(
        said.contains("A SIGHUP came while the node was starting; reloading."),
        "{said}"
    );
    assert!(node.0.try_wait().unwrap().is_none());
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert_eq!(node.0.wait().unwrap().code(), Some(0));
}

/// A reload refused after its catalog was built changes nothing. Here
/// SQLite refuses it: ticket type `r-b` still belongs to activity `r`
/// there, though the running config dropped it, and the reload gives it to
/// a new queue activity. Before, the build had opened that activity's
/// waiting room and kept it; its queue had opened, so every later reload
/// naming the activity was refused for changing a queue nobody ever saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_refused_after_its_build_leaves_no_waiting_room_behind() {
    let r = |tickets: &[&str]| {
        tickets
            .iter()
            .fold(Act::new("r").window("-1m", "+1h"), |act, t| {
                act.ticket(t, t, Codes::Generate(3))
            })
            .toml()
    };
    let q = |queue: bool, ticket: &str| {
        let act = Act::new("q").window("+30m", "+1h");
        let act = if queue {
            act.with("admission = \"queue\"").with("queue_opens = \"-1m\"")
        } else {
            act
        };
        act.ticket(ticket, ticket, Codes::Generate(3)).toml()
    };
    let app = TestApp::start(&(base_config() + &r(&["r-a", "r-b"])));
    let dropped = base_config() + &r(&["r-a"]);
    assert_eq!(app.reload(&dropped)["message"], "Config reloaded.");

    let refused = app.reload(&(dropped.clone() + &q(true, "r-b")));
    assert_eq!(refused["message"], "Reload refused; still serving the previous config.");
    assert!(refused["reason"].as_str().unwrap().contains("r-b"), "{refused}");

    // The same activity, fixed: a ticket type of its own, and a race.
    let fixed = app.reload(&(dropped + &q(false, "q-t")));
    assert_eq!(fixed["message"], "Config reloaded.", "{fixed}");
    assert_eq!(app.detail("q").await["admission"], "race");
}

/// A per-user limit lowered by a reload does not take back codes claimed
/// under the old one, and `ticketd verify` no longer calls them a problem:
/// it held every user to the limit SQLite had last, and failed (from a
/// review). It holds them to the highest the activity has had; over that is
/// still a problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_made_under_a_limit_a_reload_lowered_are_not_a_problem() {
    let three = base_config()
        + &Act::new("lim")
            .window("-1m", "+1h")
            .limit(3)
            .ticket("lim-t", "T", Codes::Generate(9))
            .toml();
    let mut app = TestApp::start(&three);
    let token = app.register("keeper").await;
    for _ in 0..3 {
        assert_eq!(app.claim(&token, "lim").await.status, 200);
    }
    let one = three.replace("per_user_limit = 3", "per_user_limit = 1");
    assert_ne!(one, three);
    assert_eq!(app.reload(&one)["message"], "Config reloaded.");
    assert_error(&app.claim(&token, "lim").await, 409, "LIMIT_REACHED");
    assert_eq!(app.stop(), 0);

    let out = app.cli(&["verify"], None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("3 claimed") && !stdout.contains("holds 3 codes"),
        "{stdout}"
    );
}

/// A reload that made a race a lottery whose draw had passed (its times
/// in order, all before now) was applied: the room drew nobody at once and
/// took no entry after, every claim wanted a pass nobody could get, and a
/// drawn room's admission cannot change, so no reload (and no restart)
/// could sell the activity again. Such a lottery is now refused, and the
/// race goes on (from a review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lottery_whose_draw_has_passed_is_refused_not_drawn_empty() {
    let race = |extra: &[&str]| {
        let mut act = Act::new("ld").window("-10m", "+1h");
        for line in extra {
            act = act.with(line);
        }
        act.ticket("ld-t", "Seat", Codes::Generate(3)).toml()
    };
    let app = TestApp::start(&(base_config() + &race(&[])));
    let late = base_config()
        + &race(&[
            "admission = \"lottery\"",
            "queue_opens = \"-20m\"",
            "draw_time = \"-15m\"",
        ]);
    let refused = app.reload(&late);
    assert_eq!(
        refused["message"], "Reload refused; still serving the previous config.",
        "{refused}"
    );
    assert!(
        refused.to_string().contains("its lottery's draw_time") && refused.to_string().contains("has passed"),
        "{refused}"
    );
    let token = app.register("ld-fan").await;
    assert_eq!(app.claim(&token, "ld").await.status, 200, "the race goes on");
}

/// A code is its ticket type's for good. A config that gave a ticket type
/// a new id (the organiser renaming it) listed its codes under the new
/// id; they were skipped with a warning in the log, so the new ticket type
/// had no stock and answered `SOLD_OUT`, and the reload said it succeeded.
/// A reload, `ticketd import` and a start now refuse such a config, naming
/// the codes, and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_that_lists_another_ticket_types_codes_is_refused() {
    let v1 = base_config()
        + &Act::new("rn")
            .ticket("rn-a", "Seat", Codes::List(&["R-1", "R-2"]))
            .toml();
    let app = TestApp::start(&v1);
    let renamed = v1.replace("id = \"rn-a\"", "id = \"rn-b\"");
    assert_ne!(renamed, v1);
    const SAID: &str = "code `R-1` of ticket `rn-b` already belongs to ticket `rn-a`";
    let outcome = app.reload(&renamed);
    assert_eq!(outcome["message"], "Reload refused; still serving the previous config.");
    let reason = outcome["reason"].as_str().unwrap();
    assert!(
        reason.contains(SAID) && reason.contains("change its `name`"),
        "{reason}"
    );

    let out = app.cli(&["import"], None);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stderr).contains(SAID));

    // Nothing changed: the ticket type still sells both codes under its id.
    let d = app.detail("rn").await;
    assert_eq!(d["tickets"].as_array().unwrap().len(), 1, "{d}");
    assert_eq!(
        (&d["tickets"][0]["ticketId"], &d["tickets"][0]["remaining"]),
        (&"rn-a".into(), &2.into())
    );
    let stored: i64 = app
        .sqlite()
        .query_row("SELECT COUNT(*) FROM tickets WHERE id = 'rn-b'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(stored, 0, "the refused import wrote the new ticket type");
    let token = app.register("rn-fan").await;
    let res = app.claim(&token, "rn").await;
    assert_eq!(res.status, 200, "{}", res.body);

    // A node starting on such a config (a store an earlier version wrote
    // meets it at every start) serves, skipping the codes and saying so
    // at error level. Its reloads skip those too (a pause is a reload),
    // and refuse any other code of another ticket type.
    let mut app = app;
    assert_eq!(app.stop(), 0);
    std::fs::write(app.config_path(), &renamed).unwrap();
    app.boot();
    let said = app.logs_text();
    assert!(
        said.contains("Codes skipped: the store holds them under other ticket types.") && said.contains(SAID),
        "{said}"
    );
    assert_eq!(app.detail("rn").await["tickets"][0]["remaining"], 0);
    let paused = renamed.replace("[[activity.ticket]]", "paused = true\n\n[[activity.ticket]]");
    assert_ne!(paused, renamed);
    assert_eq!(app.reload(&paused)["message"], "Config reloaded.");
    let again = renamed.replace("id = \"rn-b\"", "id = \"rn-c\"");
    let outcome = app.reload(&again);
    assert!(
        outcome["reason"]
            .as_str()
            .unwrap()
            .contains("code `R-1` of ticket `rn-c` already belongs to ticket `rn-a`"),
        "{outcome}"
    );
}
