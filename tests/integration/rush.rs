//! The rush: many users, few codes, everyone at once.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use futures::future::join_all;

use crate::common::{
    assert_sold_out_is_final, base_config, claim_body, claim_settled, metric, open_activity, parse_csv, username,
    AnswerLog, TestApp,
};

/// Fires `per_user` simultaneous claims for each token (at most `parallel_users`
/// users at once), each asked again while the answer is STOCK_IN_FLIGHT or
/// OVERLOADED; returns, per user index, the codes acknowledged, and every
/// answer's status/code (retried ones included). Checks on the way that no
/// SOLD_OUT was ever followed by a success.
pub async fn rush(
    app: &TestApp,
    act: &str,
    tokens: &[String],
    per_user: usize,
    parallel_users: usize,
) -> (Vec<Vec<String>>, HashMap<String, usize>) {
    let sem = Arc::new(tokio::sync::Semaphore::new(parallel_users));
    let log = AnswerLog::default();
    let mut tasks = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let client = app.client_clone();
        let (sem, token, act, log) = (sem.clone(), token.clone(), act.to_owned(), log.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.unwrap();
            let body = claim_body(&client, &token, &act).await;
            let claims = (0..per_user).map(|_| claim_settled(&client, &token, &body, &log));
            let answers = join_all(claims).await;
            (i, answers)
        }));
    }
    let mut acked = vec![Vec::new(); tokens.len()];
    let mut outcomes: HashMap<String, usize> = HashMap::new();
    for t in tasks {
        let (i, answers) = t.await.unwrap();
        for (a, earlier) in answers {
            for k in earlier {
                *outcomes.entry(k).or_default() += 1;
            }
            let a = a.expect("transport error during the rush");
            if a.status == 200 {
                acked[i].push(a.data()["code"].as_str().unwrap().to_owned());
                *outcomes.entry("success".into()).or_default() += 1;
            } else {
                *outcomes
                    .entry(format!("{} {}", a.status, a.error_code().unwrap_or("?")))
                    .or_default() += 1;
            }
        }
    }
    // (A rush that did not sell out has no sell-out to check: the tests
    // that expect one say so of the outcomes.)
    let _sold_out = assert_sold_out_is_final(&log.lock().unwrap());
    (acked, outcomes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_users_three_claims_each_get_exactly_the_thousand_codes() {
    let config = base_config() + &open_activity("rush", 1000, 1);
    let mut app = TestApp::start(&config);
    let tokens = app.users("r", 5000).await;

    let (acked, outcomes) = rush(&app, "rush", &tokens, 3, 400).await;

    let successes: usize = acked.iter().map(Vec::len).sum();
    assert_eq!(successes, 1000, "outcomes: {outcomes:?}");
    assert!(
        outcomes.contains_key("410 SOLD_OUT"),
        "the sell-out was never said: {outcomes:?}"
    );
    let codes: HashSet<&String> = acked.iter().flatten().collect();
    assert_eq!(codes.len(), 1000, "a code was given twice");
    assert!(acked.iter().all(|c| c.len() <= 1), "a user got two codes");
    // Every other answer is a clean refusal: sold out, at the limit, or
    // (retried) the last codes still being committed.
    for (k, _) in outcomes.iter().filter(|(k, _)| *k != "success") {
        assert!(
            k == "410 SOLD_OUT" || k == "409 LIMIT_REACHED" || k == "503 STOCK_IN_FLIGHT",
            "unexpected outcome {k}: {outcomes:?}"
        );
    }
    let detail = app.detail("rush").await;
    assert_eq!(
        (detail["claimed"].as_u64(), detail["remaining"].as_u64()),
        (Some(1000), Some(0))
    );

    // The same after a restart: every acknowledged code is held by its user.
    app.restart();
    let detail = app.detail("rush").await;
    assert_eq!(
        (detail["claimed"].as_u64(), detail["remaining"].as_u64()),
        (Some(1000), Some(0))
    );
    for (i, codes) in acked.iter().enumerate().filter(|(_, c)| !c.is_empty()) {
        assert_eq!(&app.held(&tokens[i], "rush").await, codes, "user r{i}");
    }
    let again = app.claim(&tokens[0], "rush").await;
    assert!(again.status == 410 || again.status == 409, "{}", again.body);

    // And in the export.
    let out = app.cli(&["export", "--activity", "rush", "--format", "csv"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows = parse_csv(&out.stdout);
    assert_eq!(rows.len(), 1000);
    let exported: HashMap<String, String> = rows
        .iter()
        .map(|r| (r["code"].clone(), r["username"].clone()))
        .collect();
    assert_eq!(exported.len(), 1000, "export has a code twice");
    let users: HashSet<&String> = exported.values().collect();
    assert_eq!(users.len(), 1000, "export has a user twice");
    for (i, codes) in acked.iter().enumerate() {
        for code in codes {
            assert_eq!(exported.get(code), Some(&username("r", i)), "code {code}");
        }
    }
}

/// One node, SOLD_OUT is final: a claim refused by a full journal queue
/// (503 OVERLOADED) puts its code back, so while claims are being committed
/// an empty pool is not sold out, and claims that find it empty hear the
/// retryable STOCK_IN_FLIGHT. (Before, they heard 410 SOLD_OUT. On one node
/// the window in which a code comes back is microseconds wide, so this test
/// shows the behaviour rather than reproducing the old bug every run; the
/// test in `api.rs` that holds the last code's commit on a slow disk, and
/// the cluster tests, where a dead node's lease keeps codes for seconds, do.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_pool_is_not_sold_out_while_claims_that_may_fail_are_being_committed() {
    let config = base_config() + "[journal]\nqueue_capacity = 1\n" + &open_activity("busy", 150, 1);
    let app = TestApp::start(&config);
    let tokens = app.users("b", 1500).await;

    let (acked, outcomes) = rush(&app, "busy", &tokens, 2, 500).await;

    // (`rush` checked that no claim sent after a SOLD_OUT got a code: the
    // promise.) Whether a claim met the pool empty while another's commit
    // could still fail is a race this rush wins most runs, not all (a
    // fresh suite run once saw none in 3,721 answers), so it is printed,
    // not asserted; `CodePool::drained` and `no_code`'s choice are the
    // unit tests' to pin down.
    let in_flight = metric(&app, "ticketd_claims_total{outcome=\"stock_in_flight\"}").await;
    println!("claims that met the pool empty while others committed: {in_flight}");
    let refused = metric(&app, "ticketd_claims_total{outcome=\"overloaded\"}").await;
    assert!(
        refused > 0.0,
        "the journal queue never filled, so no code came back: {outcomes:?}"
    );
    let codes: HashSet<&String> = acked.iter().flatten().collect();
    assert_eq!(
        codes.len(),
        acked.iter().map(Vec::len).sum::<usize>(),
        "a code was given twice"
    );
    assert_eq!(codes.len(), 150, "{outcomes:?}");
    assert!(
        outcomes.contains_key("410 SOLD_OUT"),
        "the sell-out was never said: {outcomes:?}"
    );
    assert_eq!(app.detail("busy").await["remaining"].as_u64(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_firing_fifty_claims_gets_exactly_the_limit() {
    let config = base_config() + &open_activity("lim", 500, 2);
    let app = TestApp::start(&config);
    let token = app.register("greedy").await;
    let client = app.client_clone();
    let body = app.claim_body(&token, "lim").await;
    let answers = join_all((0..50).map(|_| client.post("/ticket/get", Some(&token), &body))).await;
    let ok: Vec<String> = answers
        .iter()
        .map(|a| a.as_ref().unwrap())
        .filter(|a| a.status == 200)
        .map(|a| a.data()["code"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ok.len(), 2, "{answers:?}");
    assert_ne!(ok[0], ok[1]);
    for a in answers.iter().map(|a| a.as_ref().unwrap()).filter(|a| a.status != 200) {
        assert_eq!((a.status, a.error_code()), (409, Some("LIMIT_REACHED")), "{}", a.body);
    }
    let mut held = app.held(&token, "lim").await;
    held.sort();
    let mut ok_sorted = ok.clone();
    ok_sorted.sort();
    assert_eq!(held, ok_sorted);
    assert_eq!(app.detail("lim").await["remaining"], 498);
}
