//! The rush: many users, few codes, everyone at once.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use futures::future::join_all;

use crate::common::{base_config, claim_body, open_activity, parse_csv, username, TestApp};

/// Fires `per_user` simultaneous claims for each token (at most `parallel_users`
/// users at once); returns, per user index, the codes acknowledged, and every
/// answer's status/code.
pub async fn rush(
    app: &TestApp,
    act: &str,
    tokens: &[String],
    per_user: usize,
    parallel_users: usize,
) -> (Vec<Vec<String>>, HashMap<String, usize>) {
    let sem = Arc::new(tokio::sync::Semaphore::new(parallel_users));
    let mut tasks = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let client = app.client_clone();
        let (sem, token, act) = (sem.clone(), token.clone(), act.to_owned());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.unwrap();
            let body = claim_body(&client, &token, &act).await;
            let claims = (0..per_user).map(|_| client.post("/ticket/get", Some(&token), &body));
            let answers = join_all(claims).await;
            (i, answers)
        }));
    }
    let mut acked = vec![Vec::new(); tokens.len()];
    let mut outcomes: HashMap<String, usize> = HashMap::new();
    for t in tasks {
        let (i, answers) = t.await.unwrap();
        for a in answers {
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
    let codes: HashSet<&String> = acked.iter().flatten().collect();
    assert_eq!(codes.len(), 1000, "a code was given twice");
    assert!(acked.iter().all(|c| c.len() <= 1), "a user got two codes");
    // Every other answer is a clean refusal: sold out or at the limit.
    for (k, _) in outcomes.iter().filter(|(k, _)| *k != "success") {
        assert!(
            k == "410 SOLD_OUT" || k == "409 LIMIT_REACHED",
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
