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
    common::{base_config, claim_body, open_activity, parse_csv, username, TestApp},
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
    let mut tasks = Vec::new();
    let sem = Arc::new(tokio::sync::Semaphore::new(128));
    // Claim tokens first, as clients fetch them when the sale opens.
    let mut bodies = Vec::new();
    for token in tokens.iter().take(2000) {
        bodies.push(claim_body(&app.client, token, "crash").await);
    }
    for (i, (token, body)) in tokens.iter().zip(bodies).enumerate() {
        let client = app.client_clone();
        let (acked, count, killed, sem, token) =
            (acked.clone(), count.clone(), killed.clone(), sem.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await.unwrap();
            if let Ok(res) = client.post("/ticket/get", Some(&token), &body).await {
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
    killed.notified().await;
    app.kill9();
    for t in tasks {
        t.await.unwrap();
    }
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

    app.stop();
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_journal_tail_is_truncated_on_restart() {
    let config = base_config() + &open_activity("torn", 10, 1);
    let mut app = TestApp::start(&config);
    let token = app.register("tina").await;
    let res = app.claim(&token, "torn").await;
    assert_eq!(res.status, 200);
    app.kill9();
    // Append half a record to the live segment, as a crash mid-write would.
    let journal = app.dir.path().join("data/journal");
    let segment = std::fs::read_dir(&journal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .unwrap();
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes.extend_from_slice(&[40, 0, 0, 0, 1, 2, 3, 4, 5]);
    std::fs::write(&segment, bytes).unwrap();
    app.boot();
    assert!(app.logs_text().contains("torn record"), "{}", app.logs_text());
    assert_eq!(
        app.held(&token, "torn").await,
        vec![res.data()["code"].as_str().unwrap().to_owned()]
    );
    assert_eq!(app.detail("torn").await["remaining"], 9);
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
    let journal = app.dir.path().join("data/journal");
    let segment = std::fs::read_dir(&journal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "journal"))
        .max()
        .expect("a journal segment");
    let mut bytes = std::fs::read(&segment).unwrap();
    // The second record: after the 8-byte magic and the first record.
    let first_len = 8 + u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
    let second = 8 + first_len;
    bytes[second + 20] ^= 0x40;
    std::fs::write(&segment, &bytes).unwrap();

    // The node refuses, names the segment and the offset, and truncates nothing.
    let mut child = std::process::Command::new(crate::common::BIN)
        .args(["--config", "config.toml", "serve"])
        .current_dir(app.dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::time::{Duration, Instant};
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the node started on a corrupt journal");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
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
}
