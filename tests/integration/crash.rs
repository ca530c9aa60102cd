//! `kill -9` in the middle of a rush loses no acknowledged claim and
//! oversells nothing.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use crate::{
    common::{base_config, claim_body, fill_disk, open_activity, parse_csv, username, TestApp, Tmpfs},
    rush::rush,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_rush_keeps_every_acknowledged_claim() {
    let config = base_config() + &open_activity("crash", 1000, 1);
    let mut app = TestApp::start(&config);
    let tokens = app.users("c", 3000).await;

    // Phase 1: rush, and kill -9 the node once 300 claims were acknowledged.
    let acked: Arc<Mutex<Vec<(usize, String)>>> = Arc::default();
    let count = Arc::new(AtomicUsize::new(0));
    let killed = Arc::new(tokio::sync::Notify::new());
    // Set just before the kill: an answer seen while it is unset came from
    // the live node, and must be a code (2,000 fans, 1,000 codes, the kill
    // at 300: no sell-out, no limit met).
    let dying = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    let sem = Arc::new(tokio::sync::Semaphore::new(128));
    // Claim tokens first, as clients fetch them when the sale opens.
    let mut bodies = Vec::new();
    for token in tokens.iter().take(2000) {
        bodies.push(claim_body(&app.client, token, "crash").await);
    }
    for (i, (token, body)) in tokens.iter().zip(bodies).enumerate() {
        let client = app.client_clone();
        let (acked, count, killed, sem, token, dying) = (
            acked.clone(),
            count.clone(),
            killed.clone(),
            sem.clone(),
            token.clone(),
            dying.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await.unwrap();
            let answer = client.post("/ticket/get", Some(&token), &body).await;
            if !dying.load(Ordering::SeqCst) {
                let res = answer.as_ref().expect("a transport error before the kill");
                assert_eq!(res.status, 200, "before the kill: {}", res.body);
            }
            if let Ok(res) = answer {
                if res.status == 200 {
                    acked
                        .lock()
                        .unwrap()
                        .push((i, res.data()["code"].as_str().unwrap().to_owned()));
                    if count.fetch_add(1, Ordering::SeqCst) + 1 == 300 {
                        killed.notify_one();
                    }
                }
            }
        }));
    }
    // If the rush never reached 300 codes, fail saying so (not hang until
    // nextest ends the test).
    tokio::time::timeout(std::time::Duration::from_secs(60), killed.notified())
        .await
        .unwrap_or_else(|_| panic!("300 claims were never acknowledged: {}", count.load(Ordering::SeqCst)));
    dying.store(true, Ordering::SeqCst);
    app.kill9();
    for t in tasks {
        t.await.unwrap();
    }
    // The reconciliation an operator runs after the crash finds nothing wrong.
    app.assert_verified();
    let before: Vec<(usize, String)> = acked.lock().unwrap().clone();
    assert!(
        before.len() >= 300 && before.len() < 1000,
        "acknowledged {}",
        before.len()
    );
    let codes: HashSet<&String> = before.iter().map(|(_, c)| c).collect();
    assert_eq!(codes.len(), before.len(), "a code was acknowledged twice");

    // Restart: every acknowledged claim is there; unacknowledged takes are back in stock.
    app.boot();
    for (i, code) in &before {
        assert_eq!(app.held(&tokens[*i], "crash").await, vec![code.clone()], "user c{i}");
    }
    let detail = app.detail("crash").await;
    let claimed = detail["claimed"].as_u64().unwrap();
    assert!(claimed >= before.len() as u64);
    assert_eq!(claimed + detail["remaining"].as_u64().unwrap(), 1000);
    // The kill lost the node's last second of request statistics, and the
    // report says how many claims have no recorded request (it showed
    // fewer successes than claims without a word).
    let recorded: u64 = app
        .sqlite()
        .query_row(
            "SELECT COALESCE(SUM(count), 0) FROM stats_outcome_ticks WHERE activity_id = 'crash' AND outcome = 'success'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .unwrap() as u64;
    let html = app.report_html("crash");
    eprintln!(
        "{} of {claimed} claims have no recorded request",
        claimed.saturating_sub(recorded)
    );
    if recorded < claimed {
        let says = format!(
            "{} of the {claimed} claims have no recorded request",
            claimed - recorded
        );
        assert!(html.contains(&says), "the report does not say `{says}`");
    } else {
        // A flush between the last commit and the kill: nothing was lost.
        assert!(!html.contains("id=\"unrecorded\""));
    }

    // Phase 2: everyone rushes again; the activity sells out exactly.
    let (after, _) = rush(&app, "crash", &tokens, 1, 256).await;
    let detail = app.detail("crash").await;
    assert_eq!(
        (detail["claimed"].as_u64(), detail["remaining"].as_u64()),
        (Some(1000), Some(0))
    );
    for (i, codes) in after.iter().enumerate() {
        assert!(
            codes.is_empty() || !before.iter().any(|(j, _)| *j == i),
            "user c{i} got a second code"
        );
    }

    assert_eq!(app.stop(), 0, "the node stopped cleanly");
    let out = app.cli(&["export", "--activity", "crash"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows = parse_csv(&out.stdout);
    assert_eq!(rows.len(), 1000);
    let by_code: HashMap<&str, &str> = rows
        .iter()
        .map(|r| (r["code"].as_str(), r["username"].as_str()))
        .collect();
    assert_eq!(by_code.len(), 1000, "a code appears twice in the export");
    let users: HashSet<&str> = by_code.values().copied().collect();
    assert_eq!(users.len(), 1000, "a user appears twice in the export");
    for (i, code) in &before {
        assert_eq!(by_code.get(code.as_str()), Some(&username("c", *i).as_str()));
    }
    let report = app.assert_verified();
    assert!(report.contains("1000 codes, 1000 claimed, 0 in stock"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_journal_tail_is_truncated_on_restart() {
    let config = base_config() + &open_activity("torn", 10, 1);
    let mut app = TestApp::start(&config);
    let token = app.register("tina").await;
    let res = app.claim(&token, "torn").await;
    assert_eq!(res.status, 200);
    app.kill9();
    // Write half a record after the last one in the live segment (over the
    // zeros laid ahead), as a crash mid-write would.
    let segment = newest_segment(&app);
    let mut bytes = std::fs::read(&segment).unwrap();
    let end = ticketd::journal::scan_segment(&bytes).end;
    assert!(bytes.len() > end + 9, "zeros are laid ahead of the records");
    bytes[end..end + 9].copy_from_slice(&[40, 0, 0, 0, 1, 2, 3, 4, 5]);
    std::fs::write(&segment, bytes).unwrap();
    app.boot();
    assert!(app.logs_text().contains("torn write"), "{}", app.logs_text());
    assert_eq!(
        app.held(&token, "torn").await,
        vec![res.data()["code"].as_str().unwrap().to_owned()]
    );
    assert_eq!(app.detail("torn").await["remaining"], 9);
    app.assert_verified();
}

/// The newest segment of `app`'s journal.
fn newest_segment(app: &TestApp) -> std::path::PathBuf {
    std::fs::read_dir(app.dir.path().join("data/journal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "journal"))
        .max()
        .expect("a journal segment")
}

/// `ticketd verify` looked at each journaled claim not yet in SQLite against
/// SQLite alone: two of them giving one code passed, and it said
/// "consistent" of a data directory the node then refused to start on (its
/// applier refuses a second claim of a code). Now it names both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_two_journaled_claims_of_one_code() {
    use ticketd::{journal::record, vocab::Claim};
    let mut app = TestApp::start(&(base_config() + &open_activity("dj", 3, 1)));
    let token = app.register("dj-a").await;
    assert_eq!(app.claim(&token, "dj").await.status, 200);
    assert_eq!(app.stop(), 0);
    let out = app.cli(&["verify"], None);
    assert!(out.status.success(), "{out:?}");
    let db = app.sqlite();
    let (code, next): (String, u64) = db
        .query_row(
            "SELECT (SELECT code FROM codes WHERE code NOT IN (SELECT code FROM claims) LIMIT 1),
                    (SELECT max(CAST(value AS INTEGER)) + 1 FROM meta WHERE key = 'applied_seq')",
            [],
            |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)),
        )
        .unwrap();
    drop(db);
    // Two claims of one unclaimed code, by two users, past what SQLite applied.
    let mut bytes = record::MAGIC.to_vec();
    for (i, user) in [(0, 9001), (1, 9002)] {
        let claim = Claim {
            id: 0,
            activity_id: "dj".into(),
            ticket_id: "dj-t".into(),
            code: code.as_str().into(),
            user_id: user,
            claimed_at_ms: ticketd::clock::now_ms(),
            idempotency_key: None,
        };
        record::encode(&claim, next + i, &mut bytes);
    }
    let segment = app.dir.path().join(format!("data/journal/{next:020}.journal"));
    std::fs::write(&segment, &bytes).unwrap();
    let out = app.cli(&["verify"], None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    let said = format!("journaled claims {next} and {} both give code `{code}`", next + 1);
    assert!(stdout.contains(&said), "{stdout}");
}

/// Issue 12, item 1: one flipped byte in the middle of the journal used to
/// truncate the segment there, deleting every acknowledged claim after it.
/// Now the node refuses to start and says where; `ticketd verify` reports
/// it, `--repair` keeps every valid record, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_journal_record_stops_the_node_and_verify_repair_keeps_every_claim() {
    let config = base_config() + &open_activity("rot", 10, 1);
    let mut app = TestApp::start(&config);
    let mut held = Vec::new();
    for name in ["rot-a", "rot-b", "rot-c"] {
        let token = app.register(name).await;
        let res = app.claim(&token, "rot").await;
        assert_eq!(res.status, 200, "{}", res.body);
        held.push((token, res.data()["code"].as_str().unwrap().to_owned()));
    }
    assert_eq!(app.stop(), 0);
    let segment = newest_segment(&app);
    let mut bytes = std::fs::read(&segment).unwrap();
    // The second record: after the 8-byte magic and the first record.
    let first_len = 8 + u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
    let second = 8 + first_len;
    bytes[second + 20] ^= 0x40;
    std::fs::write(&segment, &bytes).unwrap();

    // The node refuses, names the segment and the offset, and truncates nothing.
    let stderr = crate::common::serve_refused(
        app.dir.path(),
        std::time::Duration::from_secs(20),
        "the node started on a corrupt journal",
    );
    let name = segment.file_name().unwrap().to_str().unwrap();
    assert!(
        stderr.contains(name) && stderr.contains(&format!("byte {second}")) && stderr.contains("verify --repair"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&segment).unwrap(), bytes, "nothing was truncated");

    let out = app.cli(&["verify"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("BROKEN"), "{out:?}");
    let out = app.cli(&["verify", "--repair"], None);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("repaired"), "{out:?}");

    app.boot();
    for (token, code) in &held {
        assert_eq!(&app.held(token, "rot").await, &vec![code.clone()]);
    }
    assert_eq!(app.detail("rot").await["remaining"], 7);
    // The next claim gets a new id; no id is reused.
    let token = app.register("rot-d").await;
    let res = app.claim(&token, "rot").await;
    assert_eq!(res.status, 200, "{}", res.body);
    assert_eq!(res.data()["claimId"], 4);
    app.assert_verified();
}

/// A damaged header of the newest segment. Recovery used to remove the
/// newest segment whenever its header was not the magic, records and all:
/// claims SQLite had not applied yet were lost and their codes sold again.
/// Now the node refuses to start and removes nothing, and `verify --repair`
/// keeps every record behind the header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_segment_header_stops_the_node_and_loses_no_claim() {
    let config = base_config() + &open_activity("hdr", 10, 1);
    let mut app = TestApp::start(&config);
    let mut held = Vec::new();
    for name in ["hdr-a", "hdr-b"] {
        let token = app.register(name).await;
        let res = app.claim(&token, "hdr").await;
        assert_eq!(res.status, 200, "{}", res.body);
        held.push((token, res.data()["code"].as_str().unwrap().to_owned()));
    }
    assert_eq!(app.stop(), 0);
    // The claims as if SQLite had not applied them yet (a stop applies
    // everything): the damaged segment holds their only copy.
    let db = app.sqlite();
    db.execute_batch("DELETE FROM claims; UPDATE meta SET value = '0' WHERE key = 'applied_seq';")
        .unwrap();
    drop(db);
    let segment = newest_segment(&app);
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[0] ^= 0x01;
    std::fs::write(&segment, &bytes).unwrap();

    let stderr = crate::common::serve_refused(
        app.dir.path(),
        std::time::Duration::from_secs(20),
        "the node started on a journal segment with a damaged header",
    );
    let name = segment.file_name().unwrap().to_str().unwrap();
    assert!(stderr.contains(name) && stderr.contains("verify --repair"), "{stderr}");
    assert_eq!(
        std::fs::read(&segment).unwrap(),
        bytes,
        "the segment was removed or changed"
    );
    let out = app.cli(&["verify", "--repair"], None);
    assert!(out.status.success(), "{out:?}");
    app.boot();
    for (token, code) in &held {
        assert_eq!(&app.held(token, "hdr").await, &vec![code.clone()]);
    }
    assert_eq!(app.detail("hdr").await["remaining"], 8);
    app.assert_verified();
}

/// Issue 12, item 2: a failed journal write (a full disk mid-rush) used to
/// answer "failed" while records of that batch could be on disk and become
/// claims at the next start. Now such claims are answered as in doubt, and
/// after the restart the store agrees with every answer given: each
/// acknowledged claim is there, every other stored claim belongs to a user
/// told "unknown", no code is held twice, and a retry with the same
/// Idempotency-Key returns the kept code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_mid_rush_leaves_the_store_agreeing_with_every_answer() {
    use std::collections::{HashMap, HashSet};
    // A small reserve of zeros laid ahead in the journal (1 MiB by default,
    // more than this rush writes): the journal overwrites it, fails to lay
    // more, appends, and then meets ENOSPC mid-rush. Group commits of at
    // most 16 claims stay within the quarter of the reserve left when more
    // is laid, so laying meets the full disk before any append does.
    let config =
        base_config() + "\n[journal]\npreallocate = \"8KiB\"\nmax_batch = 16\n" + &open_activity("full", 2000, 1);
    let mut app = TestApp::prepare(&config, &[]);
    let data = app.dir.path().join("data");
    let _disk = Tmpfs::mount(&data, "8m");
    app.boot();
    let tokens = app.users("fd", 800).await;
    let mut bodies = Vec::new();
    for t in &tokens {
        bodies.push(app.claim_body(t, "full").await);
    }
    // Fill the disk, then give back a little: the journal takes its first
    // records and then meets ENOSPC mid-rush.
    let filler = data.join("filler");
    let f = fill_disk(&filler, 64 << 10);
    let _ = f.sync_all();
    let len = f.metadata().unwrap().len();
    f.set_len(len.saturating_sub(24 << 10)).unwrap();
    drop(f);

    let mut acknowledged: HashMap<String, String> = HashMap::new();
    let mut in_doubt: HashSet<String> = HashSet::new();
    let client = app.client_clone();
    let mut tasks = Vec::new();
    for (i, (token, body)) in tokens.iter().zip(&bodies).enumerate() {
        let (client, token, body) = (client.clone(), token.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let key = format!("full-key-{i}");
            let res = client
                .call(
                    http::Method::POST,
                    "/ticket/get",
                    Some(&token),
                    Some(&body),
                    &[("Idempotency-Key", &key)],
                )
                .await
                .unwrap();
            (i, res)
        }));
    }
    let mut outcomes: HashMap<String, usize> = HashMap::new();
    for t in tasks {
        let (i, res) = t.await.unwrap();
        let name = crate::common::username("fd", i);
        let label = format!("{} {}", res.status, res.error_code().unwrap_or("ok"));
        *outcomes.entry(label).or_default() += 1;
        match res.status {
            200 => {
                acknowledged.insert(name, res.data()["code"].as_str().unwrap().to_owned());
            }
            // Nothing of it was written: the journal had already failed.
            503 if res.error_code() == Some("STORE_UNAVAILABLE") => {}
            503 if res.error_code() == Some("OUTCOME_UNKNOWN") => {
                in_doubt.insert(name);
            }
            _ => panic!("unexpected answer: {} {}", res.status, res.body),
        }
    }
    assert!(
        !acknowledged.is_empty() && !in_doubt.is_empty(),
        "the disk never filled mid-rush: {outcomes:?}"
    );
    assert!(
        app.logs_text().contains("Could not lay zeros ahead"),
        "{}",
        app.logs_text()
    );

    // Crash, free the disk, start again.
    app.kill9();
    std::fs::remove_file(&filler).unwrap();
    app.boot();
    let out = app.cli(&["export", "--activity", "full"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows = crate::common::parse_csv(&out.stdout);
    let mut codes = HashSet::new();
    let mut stored: HashMap<String, String> = HashMap::new();
    for r in &rows {
        assert!(codes.insert(r["code"].clone()), "code {} held twice", r["code"]);
        assert!(
            stored.insert(r["username"].clone(), r["code"].clone()).is_none(),
            "{} holds two codes",
            r["username"]
        );
    }
    for (user, code) in &acknowledged {
        assert_eq!(
            stored.get(user),
            Some(code),
            "an acknowledged claim of {user} was lost ({outcomes:?})"
        );
    }
    for user in stored.keys() {
        assert!(
            acknowledged.contains_key(user) || in_doubt.contains(user),
            "{user} holds a code though told it failed or never told ({outcomes:?})"
        );
    }
    // Those told "unknown": a retry with the same key returns what was kept.
    for (i, token) in tokens.iter().enumerate() {
        let name = crate::common::username("fd", i);
        if !in_doubt.contains(&name) {
            continue;
        }
        // A client fetches a fresh claim token after the node restarted.
        let body = app.claim_body(token, "full").await;
        let key = format!("full-key-{i}");
        let res = app
            .client
            .call(
                http::Method::POST,
                "/ticket/get",
                Some(token),
                Some(&body),
                &[("Idempotency-Key", &key)],
            )
            .await
            .unwrap();
        match stored.get(&name) {
            // Kept: the retry is answered with it.
            Some(code) => {
                assert_eq!(res.status, 200, "{}", res.body);
                assert_eq!(res.data()["code"].as_str(), Some(code.as_str()));
                assert_eq!(res.data()["replayed"], true);
            }
            // Not kept: the key has no claim, so the retry is a new claim,
            // and there is stock for it (800 fans, 2,000 codes).
            None => {
                assert_eq!(res.status, 200, "{}", res.body);
                assert_ne!(res.data()["replayed"], true, "{}", res.body);
            }
        }
    }
    println!("outcomes: {outcomes:?}; {} stored", stored.len());
    app.assert_verified();
}

/// A journal segment the writer could not start (the disk full when it
/// wrote the header) was left behind empty while claims went on in the
/// current segment; the next such attempt left another, and the next
/// start refused the journal as corrupt at byte 0 of the first, even with
/// the disk freed. A failed start now removes its file, and recovery drops
/// a segment too short to hold a record wherever it sits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_that_could_not_start_on_a_full_disk_do_not_stop_the_next_start() {
    // Small segments with their zeros laid ahead: a segment fills, and the
    // roll to the next meets the full disk while the claims still go into
    // the current one (in its laid zeros and its last page).
    let config = base_config()
        + "\n[journal]\nsegment_size = \"16KiB\"\npreallocate = \"16KiB\"\n"
        + &open_activity("roll", 2000, 1);
    let mut app = TestApp::prepare(&config, &[]);
    let data = app.dir.path().join("data");
    let _disk = Tmpfs::mount(&data, "8m");
    app.boot();
    let tokens = app.users("rl", 400).await;
    let mut bodies = Vec::new();
    for t in &tokens {
        bodies.push(app.claim_body(t, "roll").await);
    }
    let filler = data.join("filler");
    drop(fill_disk(&filler, 4096));

    // One at a time: each claim is a group commit of its own, and each
    // commit past the segment's size tries (and fails) to start the next.
    let mut acknowledged = Vec::new();
    for (token, body) in tokens.iter().zip(&bodies) {
        let res = app.client.post("/ticket/get", Some(token), body).await.unwrap();
        match res.status {
            200 => acknowledged.push(res.data()["code"].as_str().unwrap().to_owned()),
            503 => break,
            _ => panic!("unexpected answer: {} {}", res.status, res.body),
        }
    }
    let failed_rolls = app.count_logs("Could not start a new journal segment; continuing in the current one.");
    assert!(
        failed_rolls >= 2,
        "the rolls never met the full disk ({failed_rolls}, {} claims)",
        acknowledged.len()
    );
    let journal = data.join("journal");
    let empty: Vec<_> = std::fs::read_dir(&journal)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.metadata().unwrap().len() == 0)
        .map(|e| e.file_name())
        .collect();
    assert!(empty.is_empty(), "failed segments left behind: {empty:?}");

    app.kill9();
    std::fs::remove_file(&filler).unwrap();
    app.boot();
    let out = app.cli(&["export", "--activity", "roll"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stored: std::collections::HashSet<String> = crate::common::parse_csv(&out.stdout)
        .iter()
        .map(|r| r["code"].clone())
        .collect();
    for code in &acknowledged {
        assert!(stored.contains(code), "acknowledged code {code} lost");
    }
    app.assert_verified();
}

/// Issue 12, item 7: `ticketd verify` names each broken invariant of an
/// embedded store precisely — a claim of another ticket's code, a code that
/// does not exist, a user over the limit, a claim the journal and SQLite
/// disagree about — and exits non-zero. (Every crash test above ends by
/// running it on the store the crash left, and it must find nothing.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_every_broken_invariant_of_the_embedded_store() {
    let config = base_config() + &open_activity("v", 5, 1) + &open_activity("w", 3, 1);
    let mut app = TestApp::start(&config);
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    for token in [&alice, &bob] {
        let res = app.claim(token, "v").await;
        assert_eq!(res.status, 200, "{}", res.body);
    }
    assert_eq!(app.stop(), 0);
    let report = app.assert_verified();
    assert!(
        report.contains("activity `v`: 5 codes, 2 claimed, 3 in stock"),
        "{report}"
    );

    // Tamper with SQLite behind the store's back.
    let db = app.sqlite();
    let (alice_id, w_code): (i64, String) = (
        db.query_row("SELECT id FROM users WHERE username = 'alice'", [], |r| r.get(0))
            .unwrap(),
        db.query_row("SELECT code FROM codes WHERE ticket_id = 'w-t' LIMIT 1", [], |r| {
            r.get(0)
        })
        .unwrap(),
    );
    let insert = "INSERT INTO claims (id, activity_id, ticket_id, code, user_id, claimed_at_ms) VALUES (?1, 'v', 'v-t', ?2, ?3, 0)";
    db.execute(insert, rusqlite::params![100, w_code, alice_id]).unwrap();
    db.execute(insert, rusqlite::params![101, "NOPE", 77]).unwrap();
    db.execute("UPDATE claims SET user_id = 99 WHERE id = 2", []).unwrap();
    drop(db);

    let out = app.cli(&["verify"], None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    for problem in [
        format!("claim 100: code `{w_code}` belongs to ticket `w-t`, not `v-t`"),
        "claim 101: code `NOPE` is not a code of any ticket".to_owned(),
        format!("activity `v`: user {alice_id} holds 2 codes, over the limit of 1"),
        "claim 2: the journal has code".to_owned(),
    ] {
        assert!(
            stdout.contains(&problem),
            "verify did not report {problem:?}:\n{stdout}"
        );
    }
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("4 problem(s) found"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A ticket type's `total` is every code it had, whatever happened to the
/// process. The store loads only unclaimed codes at start-up, and `total`
/// once counted the codes the pool held, so after a restart it shrank by
/// what had been claimed, and `ticketd bench` reported a false oversell
/// (claimed + remaining != total).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_types_total_survives_a_restart_and_a_kill_9() {
    use crate::common::{Act, Codes};
    let config = base_config()
        + &Act::new("two")
            .limit(10)
            .ticket("two-a", "A", Codes::Generate(6))
            .ticket("two-b", "B", Codes::Generate(4))
            .toml();
    let mut app = TestApp::start(&config);
    let tokens = app.users("t", 2).await;
    for (token, ticket, n) in [(&tokens[0], "two-a", 3), (&tokens[1], "two-b", 2)] {
        for _ in 0..n {
            let mut body = claim_body(&app.client, token, "two").await;
            body["ticketId"] = ticket.into();
            let res = app.client.post("/ticket/get", Some(token), &body).await.unwrap();
            assert_eq!(res.status, 200, "{}", res.body);
        }
    }
    // (total, remaining) per ticket type, and the activity's claimed +
    // remaining, from /act/detail and /act/list.
    let counts = |v: &serde_json::Value| {
        let tickets: Vec<(u64, u64)> = v["tickets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t["total"].as_u64().unwrap(), t["remaining"].as_u64().unwrap()))
            .collect();
        (
            tickets,
            v["claimed"].as_u64().unwrap() + v["remaining"].as_u64().unwrap(),
        )
    };
    let expected = (vec![(6, 3), (4, 2)], 10);
    let listed = |app: &TestApp| {
        let client = app.client_clone();
        async move {
            let list = client.get("/act/list", None).await.unwrap();
            let all = list.data()["activities"].as_array().unwrap().clone();
            all.into_iter().find(|a| a["actId"] == "two").unwrap()
        }
    };
    assert_eq!(counts(&app.detail("two").await), expected, "before any restart");

    app.restart();
    assert_eq!(counts(&app.detail("two").await), expected, "after SIGTERM and a start");
    assert_eq!(counts(&listed(&app).await), expected, "/act/list");

    app.kill9();
    app.boot();
    assert_eq!(counts(&app.detail("two").await), expected, "after kill -9 and a start");
    assert_eq!(counts(&listed(&app).await), expected, "/act/list");
}

/// `ticketd verify` may run beside a serving node, and said problems that
/// were not there. A claim the node applied to SQLite while verify read
/// the journal was counted twice (once in the journal's pending claims,
/// once in SQLite's), and its user was "over the limit"; a segment the
/// node deleted after the listing failed the run with "No such file or
/// directory". Verify now reads SQLite as one snapshot taken before the
/// journal, and steps over a segment deleted since the listing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_beside_a_serving_node_finds_a_rush_consistent() {
    // Small segments: they roll, and are deleted once applied, all along.
    let config = base_config()
        + "\n[journal]\nsegment_size = \"16KiB\"\npreallocate = \"16KiB\"\n"
        + &open_activity("vb", 3000, 1);
    let app = TestApp::start(&config);
    let tokens = app.users("vb", 3000).await;
    let mut bodies = Vec::new();
    for token in &tokens {
        bodies.push(claim_body(&app.client, token, "vb").await);
    }
    // Ten waves of 300 claims; verify runs while each is on its way.
    let mut claimed = 0;
    let sem = Arc::new(tokio::sync::Semaphore::new(16));
    let mut work: Vec<(String, serde_json::Value)> = tokens.into_iter().zip(bodies).collect();
    for wave in 0..10 {
        let tasks: Vec<_> = work
            .drain(..300)
            .map(|(token, body)| {
                let (client, sem) = (app.client_clone(), sem.clone());
                tokio::spawn(async move {
                    let _p = sem.acquire().await.unwrap();
                    client.post("/ticket/get", Some(&token), &body).await.unwrap().status
                })
            })
            .collect();
        let out = tokio::task::block_in_place(|| app.cli(&["verify"], None));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("consistent"),
            "verify beside wave {wave}:\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for t in tasks {
            claimed += usize::from(t.await.unwrap() == 200);
        }
    }
    assert_eq!(claimed, 3000);
    app.assert_verified();
}
