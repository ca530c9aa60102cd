//! One test per defence: tokens, claim tokens, proof of work, rate limits,
//! login lockout, user enumeration, blocklists, the admin API.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use ticketd::{
    auth::{claim_token::solve_pow, SessionKey},
    bench::{ApiClient, ApiResponse},
};

use crate::common::{assert_error, base_config, exchange, metric, open_activity, Act, Codes, TestApp};

/// An example secret for tests only.
const SECRET: &str = "EXAMPLE-test-secret-0123456789abcdef";

/// Registers `name` (password `password-<name>`) and returns the user id.
async fn registered_id(app: &TestApp, name: &str) -> u64 {
    let creds = json!({ "username": name, "password": format!("password-{name}") });
    let res = app.client.post("/user/register", None, &creds).await.unwrap();
    assert_eq!(res.status, 200, "{}", res.body);
    res.data()["userId"].as_u64().unwrap()
}

fn with_secret(config: String) -> String {
    config.replace("[auth]", &format!("[auth]\nsession_secret = \"{SECRET}\""))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_expired_session_tokens_are_refused() {
    let app = TestApp::start(&with_secret(base_config() + &open_activity("s", 5, 1)));
    let id = registered_id(&app, "sam").await;
    let key = SessionKey::new(SECRET.as_bytes());
    let (expired, _) = key.issue(id, 0, ticketd::clock::now_ms() - 1);
    assert_error(
        &app.client.get("/ticket/list", Some(&expired)).await.unwrap(),
        401,
        "TOKEN_EXPIRED",
    );
    let (valid, _) = key.issue(id, 0, ticketd::clock::now_ms() + 60_000);
    assert_eq!(app.client.get("/ticket/list", Some(&valid)).await.unwrap().status, 200);
    // Signed with another key, or tampered with: invalid.
    let (forged, _) = SessionKey::new(b"not the server's key, not the server's").issue(id, 0, i64::MAX);
    assert_error(
        &app.client.get("/ticket/list", Some(&forged)).await.unwrap(),
        401,
        "UNAUTHORIZED",
    );
    let tampered = format!("{}{}", &valid[..10], &valid[11..]);
    assert_error(
        &app.client.get("/ticket/list", Some(&tampered)).await.unwrap(),
        401,
        "UNAUTHORIZED",
    );
}

/// A rotation: sessions signed with the previous secret are accepted until
/// it is dropped — and so are claim tokens (and waiting-room passes, made
/// the same way), which were checked under the new secret alone: a fan
/// holding one heard 403 CLAIM_TOKEN_INVALID (a pass holder was told to
/// join the queue again), and during a rolling rotation nodes refused each
/// other's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_previous_session_key_is_accepted_during_a_rotation() {
    use ticketd::clock::{now_ms, rfc3339_ms};
    // Absolute times: a claim token is bound to the sale's start, and a
    // relative start would move with the restart.
    let act = crate::common::activity(
        "r",
        5,
        1,
        &rfc3339_ms(now_ms() - 60_000),
        &rfc3339_ms(now_ms() + 3_600_000),
    );
    let mut app = TestApp::start(&with_secret(base_config() + &act));
    let old = app.register("rotor").await;
    let body = app.claim_body(&old, "r").await;
    assert!(body["claimToken"].is_string(), "{body}");
    assert_eq!(app.stop(), 0, "the node stopped cleanly");
    let new_secret = "EXAMPLE-rotated-secret-abcdef0123456789";
    let rotated = base_config().replace(
        "[auth]",
        &format!("[auth]\nsession_secret = \"{new_secret}\"\nprevious_session_secret = \"{SECRET}\""),
    ) + &act;
    std::fs::write(app.config_path(), &rotated).unwrap();
    app.boot();
    assert_eq!(app.client.get("/ticket/list", Some(&old)).await.unwrap().status, 200);
    let res = app.client.post("/ticket/get", Some(&old), &body).await.unwrap();
    assert_eq!(
        res.status, 200,
        "the claim token made before the rotation: {}",
        res.body
    );
    assert_eq!(app.stop(), 0, "the node stopped cleanly");
    let done = rotated.replace(&format!("previous_session_secret = \"{SECRET}\"\n"), "");
    std::fs::write(app.config_path(), &done).unwrap();
    app.boot();
    assert_error(
        &app.client.get("/ticket/list", Some(&old)).await.unwrap(),
        401,
        "UNAUTHORIZED",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_need_the_callers_own_claim_token_for_this_activity() {
    let config = base_config() + &open_activity("a", 5, 1) + &open_activity("b", 5, 1);
    let app = TestApp::start(&config);
    let ann = app.register("annie").await;
    let ben = app.register("benny").await;

    let res = app
        .client
        .post("/ticket/get", Some(&ann), &json!({ "actId": "a" }))
        .await
        .unwrap();
    assert_error(&res, 403, "CLAIM_TOKEN_REQUIRED");
    // Ben's token does not work for Ann; a token for activity b does not work for a.
    let bens = app.claim_body(&ben, "a").await["claimToken"]
        .as_str()
        .unwrap()
        .to_owned();
    let res = app
        .client
        .post("/ticket/get", Some(&ann), &json!({ "actId": "a", "claimToken": bens }))
        .await
        .unwrap();
    assert_error(&res, 403, "CLAIM_TOKEN_INVALID");
    let for_b = app.claim_body(&ann, "b").await["claimToken"]
        .as_str()
        .unwrap()
        .to_owned();
    let res = app
        .client
        .post("/ticket/get", Some(&ann), &json!({ "actId": "a", "claimToken": for_b }))
        .await
        .unwrap();
    assert_error(&res, 403, "CLAIM_TOKEN_INVALID");
    let res = app
        .client
        .post("/ticket/get", Some(&ann), &json!({ "actId": "a", "claimToken": "x.y" }))
        .await
        .unwrap();
    assert_error(&res, 403, "CLAIM_TOKEN_INVALID");
    // The anonymous detail gives no token at all.
    assert!(app
        .client
        .get("/act/detail?actId=a", None)
        .await
        .unwrap()
        .data()
        .get("claimToken")
        .is_none());
    // Her own works.
    assert_eq!(app.claim(&ann, "a").await.status, 200);
    assert_eq!(app.detail("a").await["remaining"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_claim_token_exists_before_the_start_and_none_can_be_pre_fired() {
    let config = base_config()
        + &Act::new("soon")
            .name("Soon")
            .window("+1h", "+2h")
            .ticket("soon-t", "T", Codes::Generate(5))
            .toml();
    let app = TestApp::start(&with_secret(config));
    let token = app.register("early").await;
    let detail = app.client.get("/act/detail?actId=soon", Some(&token)).await.unwrap();
    assert_eq!(detail.data()["status"], "upcoming");
    assert!(detail.data().get("claimToken").is_none(), "{}", detail.body);
    // A forged token is refused however it is made: the window is checked first, then the MAC.
    let res = app
        .client
        .post(
            "/ticket/get",
            Some(&token),
            &json!({ "actId": "soon", "claimToken": "AAAAAAAAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA" }),
        )
        .await
        .unwrap();
    assert_error(&res, 409, "NOT_STARTED");
    assert_eq!(app.detail("soon").await["remaining"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proof_of_work_is_required_when_configured() {
    let config = base_config()
        + &open_activity("pow", 5, 1).replace("per_user_limit = 1", "per_user_limit = 1\npow_difficulty = 10");
    let app = TestApp::start(&config);
    let token = app.register("miner").await;
    let detail = app.client.get("/act/detail?actId=pow", Some(&token)).await.unwrap();
    assert_eq!(detail.data()["powDifficulty"], 10);
    let claim_token = detail.data()["claimToken"].as_str().unwrap().to_owned();
    let res = app
        .client
        .post(
            "/ticket/get",
            Some(&token),
            &json!({ "actId": "pow", "claimToken": claim_token }),
        )
        .await
        .unwrap();
    assert_error(&res, 403, "POW_REQUIRED");
    assert_eq!(res.body["error"]["powDifficulty"], 10);
    let wrong = (0u64..)
        .map(|n| n.to_string())
        .find(|n| !ticketd::auth::claim_token::pow_ok(&claim_token, n, 10))
        .unwrap();
    let res = app
        .client
        .post(
            "/ticket/get",
            Some(&token),
            &json!({ "actId": "pow", "claimToken": claim_token, "powNonce": wrong }),
        )
        .await
        .unwrap();
    assert_error(&res, 403, "POW_REQUIRED");
    let nonce = solve_pow(&claim_token, 10);
    let res = app
        .client
        .post(
            "/ticket/get",
            Some(&token),
            &json!({ "actId": "pow", "claimToken": claim_token, "powNonce": nonce }),
        )
        .await
        .unwrap();
    assert_eq!(res.status, 200, "{}", res.body);
}

fn limited(config: String, settings: &str) -> String {
    // Replace the suite's generous limits with the ones under test.
    let start = config.find("[security]").unwrap();
    let end = config.find("[log]").unwrap();
    format!("{}[security]\n{settings}\n\n{}", &config[..start], &config[end..])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_are_rate_limited_per_user_and_per_address() {
    let config = crate::common::with_admin(limited(
        base_config() + &open_activity("rl", 50, 50),
        "claim_rate_per_user = 0.01\nclaim_burst_per_user = 2\nclaim_rate_per_ip = 0.01\nclaim_burst_per_ip = 5\nregistrations_per_ip_per_hour = 100",
    ));
    let app = TestApp::start(&config);
    let first = app.register("rapid").await;
    let body = app.claim_body(&first, "rl").await;
    for _ in 0..2 {
        assert_eq!(
            app.client
                .post("/ticket/get", Some(&first), &body)
                .await
                .unwrap()
                .status,
            200
        );
    }
    let res = app
        .client
        .call(http::Method::POST, "/ticket/get", Some(&first), Some(&body), &[])
        .await
        .unwrap();
    assert_error(&res, 429, "RATE_LIMITED");
    // Other users still pass, until the address as a whole runs out.
    let second = app.register("steady").await;
    let body2 = app.claim_body(&second, "rl").await;
    for _ in 0..2 {
        assert_eq!(
            app.client
                .post("/ticket/get", Some(&second), &body2)
                .await
                .unwrap()
                .status,
            200
        );
    }
    let third = app.register("thirdy").await;
    let body3 = app.claim_body(&third, "rl").await;
    assert_error(
        &app.client.post("/ticket/get", Some(&third), &body3).await.unwrap(),
        429,
        "RATE_LIMITED",
    );
    let retry = raw_retry_after(&app, &third, &body3).await;
    assert!(retry >= 1, "Retry-After {retry}");
    assert_eq!(app.detail("rl").await["claimed"], 4, "refused claims took nothing");
    // The admin page counts the three claims the limits turned away, and
    // not a waiting room's call the address's limit turned away too, which
    // /metrics counts apart (`ip_rate` counted both).
    let join = app
        .client
        .post("/queue/join", Some(&third), &json!({ "actId": "rl" }))
        .await
        .unwrap();
    assert_error(&join, 429, "RATE_LIMITED");
    let stats = app.admin_stats().await;
    assert_eq!(stats["claimsRateLimited"], 3, "{stats}");
    let rejected = |reason: &str| format!("ticketd_security_rejections_total{{reason=\"{reason}\"}}");
    assert_eq!(crate::common::metric(&app, &rejected("ip_rate")).await, 2.0);
    assert_eq!(crate::common::metric(&app, &rejected("queue_ip_rate")).await, 1.0);
}

async fn raw_retry_after(app: &TestApp, token: &str, body: &Value) -> u64 {
    let body = body.to_string();
    let request = format!(
        "POST /ticket/get HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = exchange(&app.addr, request.as_bytes()).await;
    let retry = answer.header("retry-after").expect("Retry-After header");
    retry.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failed_logins_lock_the_account_out() {
    let config = limited(
        base_config() + &open_activity("l", 1, 1),
        "login_max_failures = 3\nlogin_backoff = \"1h\"\nregistrations_per_ip_per_hour = 100",
    );
    let app = TestApp::start(&config);
    app.register("lucky").await;
    let bad = json!({ "username": "lucky", "password": "wrong-password" });
    for _ in 0..3 {
        assert_error(
            &app.client.post("/user/login", None, &bad).await.unwrap(),
            401,
            "BAD_CREDENTIALS",
        );
    }
    // Locked now, even with the right password.
    let good = json!({ "username": "lucky", "password": "password-lucky" });
    let res = app.client.post("/user/login", None, &good).await.unwrap();
    assert_error(&res, 429, "LOGIN_LOCKED");
    // Other accounts are not locked by it.
    app.register("other").await;
    assert_eq!(
        app.client
            .post(
                "/user/login",
                None,
                &json!({ "username": "other", "password": "password-other" })
            )
            .await
            .unwrap()
            .status,
        200
    );
    let metrics = app.raw_get("/metrics").await;
    assert!(
        metrics.contains("ticketd_security_rejections_total{reason=\"login_locked\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ticketd_security_rejections_total{reason=\"login_failed\"} 3"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_user_and_a_wrong_password_look_the_same() {
    // A real argon2 cost, so the hash dominates the time of a login.
    let config = base_config()
        .replace("argon2_memory_kib = 8", "argon2_memory_kib = 4096")
        .replace("argon2_iterations = 1", "argon2_iterations = 2")
        + &open_activity("e", 1, 1);
    let config = limited(config, "login_max_failures = 1000\nregistrations_per_ip_per_hour = 100");
    let app = TestApp::start(&config);
    app.register("victim").await;
    let hashes = || crate::common::metric(&app, "ticketd_password_hashes_total");
    let mut unknown = Vec::new();
    let mut wrong = Vec::new();
    for i in 0..15 {
        let before = hashes().await;
        let t = Instant::now();
        let a = app
            .client
            .post(
                "/user/login",
                None,
                &json!({ "username": format!("ghost{i}"), "password": "guess-guess" }),
            )
            .await
            .unwrap();
        unknown.push(t.elapsed());
        // The same argon2 work for a name nobody has: one hash, at the
        // configured cost (the dummy hash is made at it).
        assert_eq!(hashes().await - before, 1.0, "an unknown name's login hashed once");
        let before = hashes().await;
        let t = Instant::now();
        let b = app
            .client
            .post(
                "/user/login",
                None,
                &json!({ "username": "victim", "password": "guess-guess" }),
            )
            .await
            .unwrap();
        wrong.push(t.elapsed());
        assert_eq!(hashes().await - before, 1.0, "a wrong password's login hashed once");
        assert_eq!(a.body, b.body, "the same answer for both");
        assert_eq!(a.status, b.status);
    }
    // The times are measured, not asserted (the work is, above): printed
    // for a reader comparing the two.
    unknown.sort();
    wrong.sort();
    eprintln!(
        "median login: unknown name {:?}, wrong password {:?}",
        unknown[7], wrong[7]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocklists_refuse_users_and_address_ranges() {
    let open = limited(
        base_config() + &open_activity("bl", 5, 1),
        "trusted_proxies = [\"127.0.0.1\"]\nregistrations_per_ip_per_hour = 100",
    );
    let app = TestApp::start(&open);
    let token = app.register("mallory").await;
    let claim = app.claim(&token, "bl").await;
    assert_eq!(claim.status, 200, "{}", claim.body);
    let claim_id = &claim.data()["claimId"];
    let body = app.claim_body(&token, "bl").await;

    // Block her mid-sale: her live session can no longer claim, nor can she log in.
    let blocking = open.replace(
        "trusted_proxies",
        "blocked_users = [\"mallory\"]\nblocked_ips = [\"203.0.113.0/24\"]\ntrusted_proxies",
    );
    assert_eq!(app.reload(&blocking)["message"], "Config reloaded.");
    assert_error(
        &app.client.post("/ticket/get", Some(&token), &body).await.unwrap(),
        403,
        "BLOCKED",
    );
    // Nor read the code she holds, nor get a claim token: blocking is how a
    // stolen session is ended, and these went on answering it.
    for path in [
        "/ticket/list".to_owned(),
        format!("/ticket/detail?ticketId={claim_id}"),
        format!("/ticket/qr?ticketId={claim_id}"),
        "/act/detail?actId=bl".to_owned(),
    ] {
        assert_error(&app.client.get(&path, Some(&token)).await.unwrap(), 403, "BLOCKED");
    }
    // She may still log out (the block ended the session already), and
    // the session, over, hears why while the block lasts.
    let out = app.client.post("/user/logout", Some(&token), &json!({})).await.unwrap();
    assert_eq!(out.status, 200, "{}", out.body);
    assert_error(
        &app.client.get("/ticket/list", Some(&token)).await.unwrap(),
        403,
        "BLOCKED",
    );
    let login = json!({ "username": "mallory", "password": "password-mallory" });
    assert_error(
        &app.client.post("/user/login", None, &login).await.unwrap(),
        403,
        "BLOCKED",
    );
    // The same answer with a wrong password: a blocked login is no oracle
    // for whether a guess was right.
    let guess = json!({ "username": "mallory", "password": "a-wrong-guess" });
    assert_error(
        &app.client.post("/user/login", None, &guess).await.unwrap(),
        403,
        "BLOCKED",
    );
    let register = json!({ "username": "mallory", "password": "password-mallory" });
    assert_error(
        &app.client.post("/user/register", None, &register).await.unwrap(),
        403,
        "BLOCKED",
    );
    assert_eq!(app.detail("bl").await["remaining"], 4);

    // A blocked range behind the trusted proxy (the nearest untrusted hop counts).
    assert_error(&list_via(&app.client, "203.0.113.7").await, 403, "BLOCKED");
    assert_error(
        &list_via(&app.client, "198.51.100.7, 203.0.113.7").await,
        403,
        "BLOCKED",
    );
    assert_eq!(list_via(&app.client, "198.51.100.7").await.status, 200);
    assert_eq!(list_via(&app.client, "203.0.113.7, 198.51.100.7").await.status, 200);
}

/// `GET /act/list` as if relayed by a proxy for `xff`.
async fn list_via(client: &ApiClient, xff: &str) -> ApiResponse {
    client
        .call(http::Method::GET, "/act/list", None, None, &[("X-Forwarded-For", xff)])
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_ignored_from_untrusted_peers() {
    let config = limited(
        base_config() + &open_activity("xf", 5, 1),
        "blocked_ips = [\"203.0.113.0/24\"]",
    );
    let app = TestApp::start(&config);
    // No trusted proxies: a client cannot talk its way into (or out of) a range.
    let res = app
        .client
        .call(
            http::Method::GET,
            "/act/list",
            None,
            None,
            &[("X-Forwarded-For", "203.0.113.7")],
        )
        .await
        .unwrap();
    assert_eq!(res.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_needs_the_admin_token_and_its_own_listener() {
    let admin_token = crate::common::ADMIN_TOKEN;
    let config = crate::common::with_admin(base_config()) + &open_activity("adm", 5, 1);
    let app = TestApp::start(&config);
    let admin_addr = app.admin_addr();
    let admin = ApiClient::new(vec![format!("http://{admin_addr}")], 4).unwrap();
    let user = app.register("userx").await;
    assert_eq!(app.claim(&user, "adm").await.status, 200);

    assert_error(
        &admin.get("/admin/stats", Some(&user)).await.unwrap(),
        401,
        "ADMIN_TOKEN_REQUIRED",
    );
    assert_error(
        &admin.get("/admin/stats", None).await.unwrap(),
        401,
        "ADMIN_TOKEN_REQUIRED",
    );
    assert_error(
        &app.client.get("/admin/stats", Some(admin_token)).await.unwrap(),
        404,
        "ROUTE_NOT_FOUND",
    );
    assert_error(
        &admin.get("/act/list", Some(admin_token)).await.unwrap(),
        404,
        "ROUTE_NOT_FOUND",
    );

    let stats = admin.get("/admin/stats", Some(admin_token)).await.unwrap();
    assert_eq!(stats.data()["activities"][0]["claimed"], 1, "{}", stats.body);
    assert!(
        stats.data()["cluster"].is_null(),
        "embedded: no cluster store: {}",
        stats.body
    );
    let reload = admin
        .post("/admin/reload", Some(admin_token), &json!({}))
        .await
        .unwrap();
    assert_eq!(reload.data()["reloaded"], true, "{}", reload.body);
    let said = app.wait_for_log("Config reloaded.", 1);
    assert_eq!(said["by"], "admin API from 127.0.0.1", "{said}");
    assert_eq!(said["changes"], "none", "{said}");
    let export = admin
        .call(
            http::Method::POST,
            "/admin/export?actId=adm&format=jsonl",
            Some(admin_token),
            None,
            &[],
        )
        .await
        .unwrap();
    assert_eq!(export.status, 200);
    // A wrong method names the path asked for (every admin route said
    // "/admin takes ...").
    let wrong = admin.get("/admin/export?actId=adm", Some(admin_token)).await.unwrap();
    assert_error(&wrong, 405, "METHOD_NOT_ALLOWED");
    assert_eq!(wrong.body["error"]["message"], "/admin/export takes POST");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bots_hammering_the_claim_get_no_more_than_their_limit() {
    // Production-like limits (per user), with the suite's generous per-address
    // ones: every bench client here shares 127.0.0.1.
    let config = limited(
        base_config() + &open_activity("botrush", 300, 1),
        "claim_rate_per_user = 2.0\nclaim_burst_per_user = 5\nclaim_rate_per_ip = 1000000.0\nclaim_burst_per_ip = 1000000\nregistrations_per_ip_per_hour = 100000",
    );
    let app = TestApp::start(&config);
    let report = crate::common::bench(
        &app.url(),
        &[
            "--activity",
            "botrush",
            "--users",
            "200",
            "--concurrency",
            "32",
            "--claims-per-user",
            "2",
            "--bots",
            "3",
            "--bot-rate",
            "100",
            "--create-users",
        ],
    );
    let bots = &report["bots"];
    assert_eq!(bots["requests"], 3 * 2 * 100);
    assert!(bots["acknowledged"].as_u64().unwrap() <= 3, "{bots}");
    assert!(bots["outcomes"]["RATE_LIMITED"].as_u64().unwrap() > 500, "{bots}");
    // Every normal user got a code: 200 users, 300 codes, limit 1.
    assert_eq!(report["acknowledged"], 200, "{report}");
    assert!(bots["normal_with_bots"]["p99_ms"].as_f64().is_some());
    assert!(bots["normal_without_bots"]["p99_ms"].as_f64().is_some());
}

/// `min_account_age`: accounts made for a sale are too young to claim or to
/// join its queue, and an older account claims. The activities arrive with
/// a reload once the older account exists, so the cut-off is a moment after
/// it was made and before the young one was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_younger_than_min_account_age_cannot_claim_or_join() {
    use ticketd::clock::{now_ms, rfc3339_ms};
    let config = base_config() + &open_activity("open", 5, 1);
    let app = TestApp::start(&config);
    let veteran = app.register("veteran").await;
    // Accounts made before `cut` take part; the sale opens a second after it.
    let cut = now_ms() + 1;
    let aged = Act::new("aged")
        .window(&rfc3339_ms(cut + 1_000), "+1h")
        .with("min_account_age = \"1s\"")
        .ticket("aged-t", "T", Codes::Generate(5))
        .toml();
    // Queues opening in an hour, already taking places.
    let queue = |id: &str, age: &str| {
        Act::new(id)
            .window("+1h", "+2h")
            .with("admission = \"queue\"")
            .with("queue_opens = \"-1m\"")
            .with(&format!("min_account_age = \"{age}\""))
            .ticket(&format!("{id}-t"), "T", Codes::Generate(5))
            .toml()
    };
    let (queued, welcoming) = (queue("aged-q", "2h"), queue("q-ok", "30m"));
    let outcome = app.reload(&(config.clone() + &aged + &queued + &welcoming));
    assert_eq!(outcome["message"], "Config reloaded.", "{outcome}");
    while now_ms() <= cut {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let newcomer = app.register("newcomer").await;
    assert_eq!(app.detail("aged").await["accountsBefore"], rfc3339_ms(cut));

    // The server says when the sale opens; the veteran claims once it has.
    // (Waiting on the status, not on claims: a claim whose detail came a
    // moment before the opening carries no claim token and is refused so.)
    crate::common::until("the sale to open", || async {
        app.detail("aged").await["status"] == "open"
    })
    .await;
    let res = app.claim(&veteran, "aged").await;
    assert_eq!(res.status, 200, "{}", res.body);
    // The young account gets no claim token to solve or spend, and is told why.
    let detail = app.client.get("/act/detail?actId=aged", Some(&newcomer)).await.unwrap();
    assert_eq!(detail.data()["accountAdmitted"], false, "{}", detail.body);
    assert!(detail.data().get("claimToken").is_none(), "{}", detail.body);
    let res = app.claim(&newcomer, "aged").await;
    assert_error(&res, 403, "ACCOUNT_TOO_NEW");
    assert_eq!(res.body["error"]["accountsBefore"], rfc3339_ms(cut));
    assert_eq!(
        app.detail("aged").await["remaining"],
        4,
        "the young account took nothing"
    );
    assert!(app.held(&newcomer, "aged").await.is_empty());

    // A queue's entry is checked at the door: with two hours asked of
    // accounts made minutes ago, nobody here may join.
    let res = app
        .client
        .post("/queue/join", Some(&veteran), &json!({ "actId": "aged-q" }))
        .await
        .unwrap();
    assert_error(&res, 403, "ACCOUNT_TOO_NEW");
    for series in [
        "ticketd_claims_total{outcome=\"account_too_new\"}",
        "ticketd_security_rejections_total{reason=\"join_account_too_new\"}",
    ] {
        assert_eq!(metric(&app, series).await, 1.0, "{series}");
    }
    // Thirty minutes before a start an hour away is still to come: any
    // account made now may join that queue.
    let res = app
        .client
        .post("/queue/join", Some(&newcomer), &json!({ "actId": "q-ok" }))
        .await
        .unwrap();
    assert_eq!(res.status, 200, "{}", res.body);
    // A member brought over with the registration time of the system they
    // joined years ago takes part, though imported only now.
    app.import_user_csv("member,password-member,Member,2020-01-01T00:00:00Z\n");
    let member = app.login("member").await;
    assert_eq!(app.claim(&member, "aged").await.status, 200);
    // Other activities take any account.
    assert_eq!(app.claim(&newcomer, "open").await.status, 200);
}

/// A session token in the form nodes issued before accounts' ages were
/// carried (a 32-byte payload: user id, expiry, token id), signed with
/// `SECRET`. Built here from the documented format, not by the library.
fn token_without_account_age(user_id: u64, expires_at_ms: i64) -> String {
    use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
    use hmac::Mac;
    let mut payload = Vec::with_capacity(32);
    payload.extend_from_slice(&user_id.to_be_bytes());
    payload.extend_from_slice(&expires_at_ms.to_be_bytes());
    payload.extend_from_slice(&[0x5a; 16]);
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(&payload);
    let tag = mac.finalize().into_bytes();
    format!("{}.{}", URL_SAFE_NO_PAD.encode(&payload), URL_SAFE_NO_PAD.encode(tag))
}

/// Such an older token keeps working, except where `min_account_age` needs
/// the age it does not carry: there its fan is told to log in again
/// (`SESSION_OUTDATED`, not `ACCOUNT_TOO_NEW`), and the counters say which
/// it was — an operator reading `account_too_new` after an upgrade must
/// not mistake stale sessions for a farm of young accounts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_older_than_account_ages_is_asked_to_log_in_again_and_counted_so() {
    let aged = Act::new("aged")
        .window("-1m", "+1h")
        .with("min_account_age = \"1s\"")
        .ticket("aged-t", "T", Codes::Generate(5))
        .toml();
    let queue = Act::new("aged-q")
        .window("+1h", "+2h")
        .with("admission = \"queue\"")
        .with("queue_opens = \"-1m\"")
        .with("min_account_age = \"1s\"")
        .ticket("aged-q-t", "T", Codes::Generate(5))
        .toml();
    let app = TestApp::start(&with_secret(
        base_config() + &open_activity("open", 5, 1) + &aged + &queue,
    ));
    let id = registered_id(&app, "olga").await;
    let old = token_without_account_age(id, ticketd::clock::now_ms() + 3_600_000);

    // Everywhere else the token is as good as ever.
    assert_eq!(app.client.get("/ticket/list", Some(&old)).await.unwrap().status, 200);
    assert_eq!(app.claim(&old, "open").await.status, 200);

    let detail = app.client.get("/act/detail?actId=aged", Some(&old)).await.unwrap();
    assert_eq!(detail.data()["accountAdmitted"], false, "{}", detail.body);
    assert_error(&app.claim(&old, "aged").await, 401, "SESSION_OUTDATED");
    let join = app
        .client
        .post("/queue/join", Some(&old), &json!({ "actId": "aged-q" }))
        .await
        .unwrap();
    assert_error(&join, 401, "SESSION_OUTDATED");
    for (series, count) in [
        ("ticketd_claims_total{outcome=\"session_outdated\"}", 1.0),
        ("ticketd_claims_total{outcome=\"account_too_new\"}", 0.0),
        (
            "ticketd_security_rejections_total{reason=\"join_session_outdated\"}",
            1.0,
        ),
        (
            "ticketd_security_rejections_total{reason=\"join_account_too_new\"}",
            0.0,
        ),
    ] {
        assert_eq!(metric(&app, series).await, count, "{series}");
    }
    assert_eq!(app.detail("aged").await["remaining"], 5, "nothing was taken");
}

/// A login whose client hangs up once its password hash has begun is still
/// counted. Before, the attempt was given back uncounted when hyper dropped
/// the handler, while the hash ran to its end on a blocking thread: hanging
/// up after every try bought unlimited argon2 work, never locked out.
///
/// A slow hash; the test hangs up once `/metrics` shows it running, and
/// waits until it has ended before the next try.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_that_hangs_up_mid_hash_still_counts() {
    use tokio::io::AsyncWriteExt;
    let config = limited(
        base_config() + &open_activity("h", 1, 1),
        "login_max_failures = 2\nlogin_backoff = \"1h\"\nregistrations_per_ip_per_hour = 100",
    )
    .replace(
        "argon2_memory_kib = 8\nargon2_iterations = 1",
        "argon2_memory_kib = 32768\nargon2_iterations = 2",
    );
    let app = TestApp::start(&config);
    app.register("victim").await;
    let wrong = json!({ "username": "victim", "password": "wrong-password" });
    let body = wrong.to_string();
    let request = format!(
        "POST /user/login HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let running = "ticketd_password_hashes_running";
    for _ in 0..2 {
        let mut victim = tokio::net::TcpStream::connect(&app.addr).await.unwrap();
        victim.write_all(request.as_bytes()).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while metric(&app, running).await == 0.0 {
            // A hash that began and ended between two looks would leave the
            // test waiting: say so rather than hang.
            assert!(Instant::now() < deadline, "the hash was never seen running");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        drop(victim); // hang up while the password is hashed
        while metric(&app, running).await > 0.0 {
            assert!(Instant::now() < deadline, "the hash never ended");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // Two failures at this address: login_max_failures = 2 locks it.
    let res = app.client.post("/user/login", None, &wrong).await.unwrap();
    assert_error(&res, 429, "LOGIN_LOCKED");
    assert_eq!(metric(&app, "ticketd_password_hashes_waiting").await, 0.0);
}

/// Failures were forgiven once the longest lockout had passed since the
/// last one — which is exactly when that lockout ended. A guesser who
/// waited it out got a whole new budget instead of one guess per lockout,
/// so the doubling never held. Now a guess right after a lockout ends
/// fails into another lockout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guess_after_the_longest_lockout_locks_again_at_once() {
    let config = limited(
        base_config() + &open_activity("lk", 1, 1),
        "login_max_failures = 2\nlogin_backoff = \"5s\"\nlogin_backoff_max = \"5s\"\nregistrations_per_ip_per_hour = 100",
    );
    let app = TestApp::start(&config);
    app.register("victim").await;
    let wrong = json!({ "username": "victim", "password": "wrong-password" });
    for _ in 0..2 {
        assert_error(
            &app.client.post("/user/login", None, &wrong).await.unwrap(),
            401,
            "BAD_CREDENTIALS",
        );
    }
    assert_error(
        &app.client.post("/user/login", None, &wrong).await.unwrap(),
        429,
        "LOGIN_LOCKED",
    );
    // Guessing on as soon as the lockout ends (a locked attempt is not counted).
    let deadline = Instant::now() + Duration::from_secs(20);
    let after = loop {
        let res = app.client.post("/user/login", None, &wrong).await.unwrap();
        if res.status != 429 {
            break res;
        }
        assert!(Instant::now() < deadline, "never unlocked: {}", res.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_error(&after, 401, "BAD_CREDENTIALS");
    let res = app.client.post("/user/login", None, &wrong).await.unwrap();
    assert_error(&res, 429, "LOGIN_LOCKED");
}

/// Registrations were counted per IPv6 /64 alone: a /48 — what one customer
/// is commonly given, and what 6to4 gives any IPv4 address — holds 65,536
/// /64s, each with the whole budget. A /48 now gets eight /64s' worth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_site_registers_eight_addresses_worth_not_sixty_five_thousand() {
    let config = limited(
        base_config() + &open_activity("v6", 1, 1),
        "trusted_proxies = [\"127.0.0.1\"]\nregistrations_per_ip_per_hour = 2",
    );
    let app = TestApp::start(&config);
    let register = |i: usize, from: String| {
        let client = app.client_clone();
        async move {
            let body = json!({ "username": format!("site{i}"), "password": "password-site" });
            client
                .call(
                    http::Method::POST,
                    "/user/register",
                    None,
                    Some(&body),
                    &[("X-Forwarded-For", &from)],
                )
                .await
                .unwrap()
        }
    };
    let tally = |outcomes: &[String]| {
        let ok = outcomes.iter().filter(|o| *o == "200 ok").count();
        let limited = outcomes.iter().filter(|o| *o == "429 RATE_LIMITED").count();
        (ok, limited)
    };
    // One /64 hammering gets its own budget (2); what it is refused costs
    // its neighbours in the /48 nothing.
    let mut outcomes = Vec::new();
    for i in 0..10 {
        let res = register(100 + i, "2001:db8:7:ff::1".to_owned()).await;
        outcomes.push(format!("{} {}", res.status, res.error_code().unwrap_or("ok")));
    }
    assert_eq!(tally(&outcomes), (2, 8), "{outcomes:?}");
    // One registration from each of 20 other /64s of the /48: 14 more.
    let mut outcomes = Vec::new();
    for i in 0..20 {
        let res = register(i, format!("2001:db8:7:{i:x}::1")).await;
        outcomes.push(format!("{} {}", res.status, res.error_code().unwrap_or("ok")));
    }
    assert_eq!(tally(&outcomes), (14, 6), "{outcomes:?}");
    // Another /48 has its own budget.
    let res = register(99, "2001:db8:8::1".to_owned()).await;
    assert_eq!(res.status, 200, "{}", res.body);
}

/// The address's registration budget was spent before the body was read,
/// so every refused request used it up: a fan whose thirty tries had a
/// short password, a bad name or a blocked one could then not register for
/// an hour (accounts red-team). Now only a request that hashes a password
/// spends it; a taken name still does (it costs a hash, and says the name
/// exists, so the budget also bounds guessing which names do).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_registrations_leave_the_addresss_budget_for_real_ones() {
    let config = limited(
        base_config() + &open_activity("rb", 1, 1),
        "registrations_per_ip_per_hour = 2\nblocked_users = [\"banned\"]",
    );
    let app = TestApp::start(&config);
    let post = |body: Value| {
        let client = app.client_clone();
        async move { client.post("/user/register", None, &body).await.unwrap() }
    };
    for _ in 0..5 {
        let short = post(json!({ "username": "fan", "password": "short" })).await;
        assert_error(&short, 400, "INVALID_FIELD");
        let bad_name = post(json!({ "username": "a b", "password": "password-fan" })).await;
        assert_error(&bad_name, 400, "INVALID_FIELD");
        let unknown = post(json!({ "username": "fan", "password": "password-fan", "age": 9 })).await;
        assert_eq!(unknown.status, 400, "{}", unknown.body);
        let blocked = post(json!({ "username": "banned", "password": "password-fan" })).await;
        assert_error(&blocked, 403, "BLOCKED");
    }
    let res = post(json!({ "username": "fan", "password": "password-fan" })).await;
    assert_eq!(res.status, 200, "{}", res.body);
    let taken = post(json!({ "username": "FAN", "password": "password-fan" })).await;
    assert_error(&taken, 409, "USERNAME_TAKEN");
    let third = post(json!({ "username": "fan2", "password": "password-fan" })).await;
    assert_error(&third, 429, "RATE_LIMITED");
}

/// A registration refused because every hashing turn was taken (503
/// BUSY, which the page retries) spent the address's budget too, though it
/// hashed nothing (from a review): five submits in a login flood could
/// use a day's budget up. The turn is now reserved before the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_refused_as_busy_leaves_the_budget() {
    let config = limited(
        base_config().replace(
            "argon2_memory_kib = 8\nargon2_iterations = 1",
            "argon2_memory_kib = 131072\nargon2_iterations = 8\nmax_concurrent_hashes = 1\nhash_queue = 0",
        ),
        "registrations_per_ip_per_hour = 2",
    );
    assert!(config.contains("hash_queue = 0"), "{config}");
    let app = TestApp::start(&config);
    let body = |name: &str| json!({ "username": name, "password": format!("password-{name}") });
    // The first registration holds the one turn while it hashes.
    let first = tokio::spawn({
        let client = ApiClient::new(vec![app.url()], 1).unwrap();
        let body = body("first");
        async move { client.post("/user/register", None, &body).await.unwrap() }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&app, "ticketd_password_hashes_running").await < 1.0 {
        assert!(Instant::now() < deadline, "the first registration never began hashing");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let busy = app.client.post("/user/register", None, &body("busy")).await.unwrap();
    assert!(
        !first.is_finished(),
        "the first hash ended before the second came: make it costlier"
    );
    assert_error(&busy, 503, "BUSY");
    assert_eq!(first.await.unwrap().status, 200);
    // The budget's second registration is still there.
    let second = app.client.post("/user/register", None, &body("second")).await.unwrap();
    assert_eq!(second.status, 200, "{}", second.body);
    let third = app.client.post("/user/register", None, &body("third")).await.unwrap();
    assert_error(&third, 429, "RATE_LIMITED");
}

/// Successful logins were never counted (only failures have a backoff), so
/// an account's right password bought unlimited password hashes: a few
/// accounts could keep every hashing slot busy, and everyone else's logins
/// and registrations heard 503 BUSY. Ten successes per account per address
/// a minute, then one every six seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_logging_in_again_and_again_is_slowed_down() {
    let app = TestApp::start(&(base_config() + &open_activity("ln", 1, 1)));
    app.register("again").await;
    app.register("other").await;
    let login = |name: &str| json!({ "username": name, "password": format!("password-{name}") });
    for _ in 0..10 {
        let res = app.client.post("/user/login", None, &login("again")).await.unwrap();
        assert_eq!(res.status, 200, "{}", res.body);
    }
    let res = app.client.post("/user/login", None, &login("again")).await.unwrap();
    assert_error(&res, 429, "RATE_LIMITED");
    let body = login("again").to_string();
    let request = format!(
        "POST /user/login HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = exchange(&app.addr, request.as_bytes()).await;
    let retry: u64 = answer.header("retry-after").expect("Retry-After").parse().unwrap();
    assert!((1..=7).contains(&retry), "Retry-After {retry}");
    let res = app.client.post("/user/login", None, &login("other")).await.unwrap();
    assert_eq!(res.status, 200, "another account is not slowed: {}", res.body);
}

/// Each logout was kept, in memory and in the store, until its session
/// would have expired, and nothing limited the sessions an account opens:
/// one account logging in and out in a loop, from address after address
/// (each with its own budget of logins), grew both for as long as the
/// password hashing kept up. An account now keeps eight logouts one by
/// one and a mark past them: every session logged out stays out, before
/// and after a restart; a session opened after them stays in, even one
/// that expires before them (a shorter `session_ttl` since: a mark by
/// expiry refused it); and the store holds at most nine rows of the
/// account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accounts_logouts_are_bounded_and_every_one_stays_out() {
    let config = base_config().replace("[security]\n", "[security]\ntrusted_proxies = [\"127.0.0.1\"]\n")
        + &open_activity("lo", 1, 1);
    let mut app = TestApp::start(&config);
    app.register("leaver").await;
    let mut gone = Vec::new();
    for i in 0..30 {
        // Five logins from each address: within its budget of ten.
        let from = format!("203.0.113.{}", i / 5 + 1);
        gone.push(crate::common::log_in_and_out(&app.client, "leaver", &from).await);
    }
    let kept = app.login("leaver").await;
    for round in ["before the restart", "after it"] {
        for token in &gone {
            let res = app.client.get("/ticket/list", Some(token)).await.unwrap();
            assert_error(&res, 401, "UNAUTHORIZED");
        }
        let res = app.client.get("/ticket/list", Some(&kept)).await.unwrap();
        assert_eq!(
            res.status, 200,
            "{round}: the session opened after the logouts: {}",
            res.body
        );
        if round == "before the restart" {
            app.restart();
        }
    }
    let shorter = config.replace("[auth]\n", "[auth]\nsession_ttl = \"1h\"\n");
    assert_ne!(config, shorter);
    assert_eq!(app.reload(&shorter)["message"], "Config reloaded.");
    let brief = app.login("leaver").await;
    let res = app.client.get("/ticket/list", Some(&brief)).await.unwrap();
    assert_eq!(
        res.status, 200,
        "a session opened after the logouts, with a shorter life: {}",
        res.body
    );
    assert!(gone.iter().chain([&kept]).all(|t| *t != brief));
    assert_eq!(app.stop(), 0);
    let db = app.sqlite();
    let tables: Vec<String> = db
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'revoked%'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let rows: i64 = tables
        .iter()
        .map(|t| {
            db.query_row(&format!("SELECT count(*) FROM {t}"), [], |r| r.get::<_, i64>(0))
                .unwrap()
        })
        .sum();
    assert!(
        rows <= 9,
        "the store keeps {rows} revocations of one account ({tables:?})"
    );
}

/// A login whose account's hash was made at an earlier argon2 cost
/// re-hashes the password at the current one, and that takes as long as a
/// login. A `ticketd user passwd` made meanwhile was overwritten by the
/// re-hash (accounts red-team): the old password logged in again, the new
/// one did not. The re-hash now replaces only the hash it checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_set_while_a_login_rehashes_the_old_one_is_kept() {
    let cheap = base_config();
    let app = TestApp::start(&cheap);
    app.register("resetme").await;
    // The node's cost goes up; the file then holds the cheap one again, so
    // `user passwd` (which reads it) is quick while the node's re-hash is not.
    let costly = cheap.replace(
        "argon2_memory_kib = 8\nargon2_iterations = 1",
        "argon2_memory_kib = 131072\nargon2_iterations = 8",
    );
    assert_ne!(costly, cheap);
    assert_eq!(app.reload(&costly)["message"], "Config reloaded.");
    std::fs::write(app.config_path(), &cheap).unwrap();

    let hashes = metric(&app, "ticketd_password_hashes_total").await;
    let login = tokio::spawn({
        let client = ApiClient::new(vec![app.url()], 1).unwrap();
        async move {
            let old = json!({ "username": "resetme", "password": "password-resetme" });
            client.post("/user/login", None, &old).await.unwrap()
        }
    });
    // The old hash verified and the re-hash begun: two hashes counted.
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&app, "ticketd_password_hashes_total").await < hashes + 2.0 {
        assert!(Instant::now() < deadline, "the login never began its re-hash");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let out = app.cli(&["user", "passwd", "--username", "resetme"], Some("a-new-password\n"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        !login.is_finished(),
        "the re-hash ended before `user passwd` did, so this run tested nothing: make it costlier"
    );
    // The login checked the old password before the change, so it succeeds.
    assert_eq!(login.await.unwrap().status, 200);

    let new = json!({ "username": "resetme", "password": "a-new-password" });
    let res = app.client.post("/user/login", None, &new).await.unwrap();
    assert_eq!(res.status, 200, "{}", res.body);
    let old = json!({ "username": "resetme", "password": "password-resetme" });
    let res = app.client.post("/user/login", None, &old).await.unwrap();
    assert_error(&res, 401, "BAD_CREDENTIALS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_typed_in_another_unicode_form_logs_in() {
    let app = TestApp::start(&base_config());
    let post = |path: &'static str, username: &'static str, password: &'static str| {
        let client = &app.client;
        async move {
            let body = json!({ "username": username, "password": password });
            client.post(path, None, &body).await.unwrap()
        }
    };
    // Registered from a device that composes `é` and types a no-break space.
    let res = post("/user/register", "accent", "caf\u{e9} au\u{a0}lait").await;
    assert_eq!(res.status, 200, "{}", res.body);
    // Logged into from one that sends `e` and a combining accent, and a
    // plain space.
    let res = post("/user/login", "accent", "cafe\u{301} au lait").await;
    assert_eq!(res.status, 200, "the same password in another form: {}", res.body);
    let res = post("/user/login", "accent", "caf\u{e9} au\u{a0}lait").await;
    assert_eq!(res.status, 200, "{}", res.body);
    // Counted in that form too: four letters with four combining accents
    // are four characters, short of the eight a password needs.
    let res = post("/user/register", "short", "e\u{301}e\u{301}e\u{301}e\u{301}").await;
    assert_error(&res, 400, "INVALID_FIELD");
    // Another password is still another password, and a wrong one in
    // another form costs one hash, as for a name nobody has (it cost two:
    // normalised, then as typed, for hashes made before normalisation).
    let hashes = || metric(&app, "ticketd_password_hashes_total");
    let res = post("/user/login", "accent", "cafe au lait").await;
    assert_error(&res, 401, "BAD_CREDENTIALS");
    for username in ["accent", "nobody"] {
        let before = hashes().await;
        let res = post("/user/login", username, "cafe\u{301} au\u{a0}lai").await;
        assert_error(&res, 401, "BAD_CREDENTIALS");
        assert_eq!(hashes().await - before, 1.0, "{username}: one hash");
    }
    // A hash made before normalisation (no `data=` mark), of the password
    // as typed in another form: it logs in as typed, and is made again as
    // hashes are now.
    let typed = "cafe\u{301}-cre\u{300}me";
    let salt = argon2::password_hash::SaltString::encode_b64(b"sixteen byte salt").unwrap();
    let legacy = argon2::PasswordHasher::hash_password(
        &argon2::Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            argon2::Params::new(8, 1, 1, None).unwrap(),
        ),
        typed.as_bytes(),
        &salt,
    )
    .unwrap()
    .to_string();
    let stored = |db: &rusqlite::Connection| -> String {
        db.query_row("SELECT password_hash FROM users WHERE username = 'accent'", [], |r| {
            r.get(0)
        })
        .unwrap()
    };
    let db = app.sqlite();
    db.execute(
        "UPDATE users SET password_hash = ?1 WHERE username = 'accent'",
        [&legacy],
    )
    .unwrap();
    let before = hashes().await;
    let res = post("/user/login", "accent", "cafe\u{301}-cre\u{300}me").await;
    assert_eq!(res.status, 200, "as typed: {}", res.body);
    assert_eq!(hashes().await - before, 3.0, "normalised, as typed, and the new hash");
    let rehashed = stored(&db);
    assert!(rehashed != legacy && rehashed.contains(",data=bmZj$"), "{rehashed}");
    let res = post("/user/login", "accent", "caf\u{e9}-cr\u{e8}me").await;
    assert_eq!(res.status, 200, "now in either form: {}", res.body);
    // `user passwd` sets it in the same form.
    let out = app.cli(
        &["user", "passwd", "--username", "accent"],
        Some("ne\u{301}e-password\n"),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let res = post("/user/login", "accent", "n\u{e9}e-password").await;
    assert_eq!(res.status, 200, "{}", res.body);
}
