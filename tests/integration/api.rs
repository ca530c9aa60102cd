//! The HTTP API: each endpoint, each error code, the error shape on bad input.

use serde_json::{json, Value};

use crate::common::{
    assert_error, assert_replayed, base_config, claim_keyed, exchange, open_activity, Act, Codes, TestApp,
};

fn windows() -> String {
    base_config()
        + &open_activity("open", 2, 1)
        + &Act::new("later")
            .name("Later")
            .window("+1h", "+2h")
            .ticket("later-t", "T", Codes::List(&["L1"]))
            .toml()
        + &Act::new("over")
            .name("Over")
            .window("2020-01-01T00:00:00Z", "2020-01-02T00:00:00+08:00")
            .ticket("over-t", "T", Codes::List(&["O1"]))
            .toml()
        + &Act::new("two")
            .name("Two types")
            .window("-1s", "+1h")
            .limit(3)
            .ticket("two-a", "A", Codes::List(&["A1"]))
            .ticket("two-b", "B", Codes::List(&["B1", "B2"]))
            .toml()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_answers_each_outcome_with_its_own_code() {
    let app = TestApp::start(&windows());
    let alice = app.register("alice").await;
    let bob = app.register("bobby").await;
    let carol = app.register("carol").await;

    let res = app
        .client
        .post("/ticket/get", None, &json!({ "actId": "open" }))
        .await
        .unwrap();
    assert_error(&res, 401, "UNAUTHORIZED");
    assert_error(&app.claim(&alice, "nope").await, 404, "ACTIVITY_NOT_FOUND");
    let res = app.claim(&alice, "later").await;
    assert_error(&res, 409, "NOT_STARTED");
    assert!(res.body["error"]["startTime"].as_str().is_some());
    let res = app.claim(&alice, "over").await;
    assert_error(&res, 409, "ENDED");
    assert_eq!(res.body["error"]["endTime"], "2020-01-01T16:00:00.000Z");
    let mut body = app.claim_body(&alice, "two").await;
    body["ticketId"] = "open-t".into();
    let res = app.client.post("/ticket/get", Some(&alice), &body).await.unwrap();
    assert_error(&res, 404, "TICKET_NOT_FOUND");

    let first = app.claim(&alice, "open").await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.body["ok"], true);
    let code = first.data()["code"].as_str().unwrap().to_owned();
    assert_eq!(first.data()["actId"], "open");
    assert_eq!(first.data()["ticketId"], "open-t");
    let res = app.claim(&alice, "open").await;
    assert_error(&res, 409, "LIMIT_REACHED");
    assert_eq!(res.body["error"]["codes"], json!([code]));
    assert_eq!(app.claim(&bob, "open").await.status, 200);
    assert_error(&app.claim(&carol, "open").await, 410, "SOLD_OUT");
    // A holder who retries after the sell-out still hears about their own codes.
    assert_error(&app.claim(&alice, "open").await, 409, "LIMIT_REACHED");

    // Choosing a ticket type, and falling through to the next type with stock.
    let mut body = app.claim_body(&carol, "two").await;
    body["ticketId"] = "two-b".into();
    let res = app.client.post("/ticket/get", Some(&carol), &body).await.unwrap();
    assert_eq!(res.data()["ticketId"], "two-b");
    assert_eq!(app.claim(&carol, "two").await.data()["code"], "A1");
    // two-a is sold out, two-b is not: the answer says it is the type.
    let mut body = app.claim_body(&bob, "two").await;
    body["ticketId"] = "two-a".into();
    let res = app.client.post("/ticket/get", Some(&bob), &body).await.unwrap();
    assert_error(&res, 410, "SOLD_OUT");
    let message = res.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("ticket type"), "{message}");
    assert_eq!(app.claim(&carol, "two").await.data()["ticketId"], "two-b");
    let res = app.claim(&bob, "two").await;
    assert_error(&res, 410, "SOLD_OUT");
    let message = res.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("every code this activity has on sale"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_returns_the_same_code_and_never_a_second() {
    let idem = Act::new("idem")
        .limit(2)
        .ticket("idem-t", "T", Codes::Generate(10))
        .ticket("idem-u", "U", Codes::Generate(5))
        .toml();
    let app = TestApp::start(&(base_config() + &idem));
    let token = app.register("retry").await;
    let body = app.claim_body(&token, "idem").await;
    // A claim with `body` and `key` as the Idempotency-Key.
    let post_as = |body: Value, key: &'static str| {
        let client = app.client_clone();
        let token = token.clone();
        async move {
            client
                .call(
                    http::Method::POST,
                    "/ticket/get",
                    Some(&token),
                    Some(&body),
                    &[("Idempotency-Key", key)],
                )
                .await
                .unwrap()
        }
    };
    let post = |key: &'static str| post_as(body.clone(), key);
    let a = post("key-1").await;
    let again = post("key-1").await;
    assert_eq!(a.status, 200);
    assert_eq!(again.status, 200);
    assert_eq!(a.data()["code"], again.data()["code"]);
    assert_eq!(a.data()["claimId"], again.data()["claimId"]);
    assert_eq!(again.data()["replayed"], true);
    let b = post("key-2").await;
    assert_ne!(b.data()["code"], a.data()["code"]);
    assert_eq!(app.detail("idem").await["remaining"], 13);
    // At the limit, both keys still answer their own claim.
    assert_eq!(post("key-1").await.data()["code"], a.data()["code"]);
    // The key names that claim, of type idem-t: asked for with idem-t it
    // replays; asked for another type, it is no answer to that request.
    let with_ticket = |ticket: &str| {
        let mut b = body.clone();
        b["ticketId"] = ticket.into();
        b
    };
    for (ticket, status) in [("idem-t", 200), ("idem-u", 422)] {
        let res = post_as(with_ticket(ticket), "key-1").await;
        assert_eq!(res.status, status, "{ticket}: {}", res.body);
        if status == 422 {
            assert_error(&res, 422, "IDEMPOTENCY_KEY_REUSED");
        } else {
            assert_eq!(res.data()["code"], a.data()["code"]);
        }
    }
    assert_error(&post("has space").await, 400, "INVALID_IDEMPOTENCY_KEY");

    // A retry is answered with its claim whatever changed since, here the
    // sale paused and the claim token left out: the first answer may have
    // been lost, and a client told PAUSED would never see the ticket it
    // holds. (Before, the pause was checked first.) A new key is refused.
    let paused = base_config() + &idem.replace("per_user_limit = 2", "per_user_limit = 2\npaused = true");
    assert_ne!(paused, base_config() + &idem);
    assert_eq!(app.reload(&paused)["message"], "Config reloaded.");
    let replay = post("key-1").await;
    assert_eq!(
        (replay.status, &replay.data()["code"]),
        (200, &a.data()["code"]),
        "{}",
        replay.body
    );
    let res = post_as(json!({ "actId": "idem" }), "key-2").await;
    assert_eq!(
        (res.status, &res.data()["code"]),
        (200, &b.data()["code"]),
        "{}",
        res.body
    );
    assert_error(&post("key-3").await, 409, "PAUSED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_details_and_other_users_claims() {
    let app = TestApp::start(&windows());
    let alice = app.register("alice").await;
    let bob = app.register("bobby").await;

    assert_eq!(
        app.listed().await,
        ["open", "later", "two"],
        "ended activities are not listed"
    );
    let list = app.client.get("/act/list", None).await.unwrap();
    let later = &list.data()["activities"][1];
    assert_eq!(later["status"], "upcoming");
    assert_eq!(later["remaining"], 1);
    assert_eq!(list.data()["activities"][0]["status"], "open");

    let claim = app.claim(&alice, "open").await;
    let claim_id = claim.data()["claimId"].as_u64().unwrap();

    let detail = app.client.get("/act/detail?actId=open", Some(&alice)).await.unwrap();
    assert_eq!(detail.data()["joined"], true);
    assert_eq!(detail.data()["claims"][0]["code"], claim.data()["code"]);
    let anon = app.client.get("/act/detail?actId=open", None).await.unwrap();
    assert!(anon.data().get("claims").is_none());
    assert_eq!(
        app.client
            .get("/act/detail?actId=open", Some(&bob))
            .await
            .unwrap()
            .data()["joined"],
        false
    );
    assert_error(
        &app.client.get("/act/detail?actId=zzz", None).await.unwrap(),
        404,
        "ACTIVITY_NOT_FOUND",
    );
    assert_error(
        &app.client.get("/act/detail", None).await.unwrap(),
        400,
        "MISSING_PARAMETER",
    );

    let mine = app.client.get("/ticket/list", Some(&alice)).await.unwrap();
    assert_eq!(mine.data()["total"], 1);
    assert_eq!(mine.data()["claims"][0]["claimId"], claim_id);
    // With the names the fan knows them by.
    assert_eq!(mine.data()["claims"][0]["actName"], "Activity open");
    assert_eq!(mine.data()["claims"][0]["ticketName"], "Ticket open");
    assert_eq!(
        app.client.get("/ticket/list", Some(&bob)).await.unwrap().data()["total"],
        0
    );
    assert_error(
        &app.client.get("/ticket/list?page=0", Some(&alice)).await.unwrap(),
        400,
        "INVALID_PARAMETER",
    );
    assert_error(
        &app.client.get("/ticket/list", None).await.unwrap(),
        401,
        "UNAUTHORIZED",
    );

    let path = format!("/ticket/detail?ticketId={claim_id}");
    let own = app.client.get(&path, Some(&alice)).await.unwrap();
    assert_eq!(own.data()["code"], claim.data()["code"]);
    assert_eq!(
        (&own.data()["actName"], &own.data()["ticketName"]),
        (&json!("Activity open"), &json!("Ticket open"))
    );
    // Somebody else's claim is indistinguishable from a missing one.
    assert_error(
        &app.client.get(&path, Some(&bob)).await.unwrap(),
        404,
        "CLAIM_NOT_FOUND",
    );
    assert_error(
        &app.client
            .get("/ticket/detail?ticketId=999999", Some(&alice))
            .await
            .unwrap(),
        404,
        "CLAIM_NOT_FOUND",
    );
    // Not an id at all: the caller's mistake, said as such.
    assert_error(
        &app.client
            .get("/ticket/detail?ticketId=abc", Some(&alice))
            .await
            .unwrap(),
        400,
        "INVALID_PARAMETER",
    );
    // Neither: the name to use is said.
    let res = app.client.get("/ticket/detail?claimId=", Some(&alice)).await.unwrap();
    assert_error(&res, 400, "MISSING_PARAMETER");
    assert!(
        res.body["error"]["message"].as_str().unwrap().contains("`claimId`"),
        "{}",
        res.body
    );
    // `claimId`, the name every claim is shown with, works as well.
    let by_claim_id = format!("/ticket/detail?claimId={claim_id}");
    let own = app.client.get(&by_claim_id, Some(&alice)).await.unwrap();
    assert_eq!(own.data()["code"], claim.data()["code"]);
    assert_error(
        &app.client.get(&by_claim_id, Some(&bob)).await.unwrap(),
        404,
        "CLAIM_NOT_FOUND",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_register_login_logout() {
    let app = TestApp::start(&(base_config() + &open_activity("u", 1, 1)));
    let token = app.register("dora").await;
    // The store holds the session key and the password hashes: its
    // directory and files are the owner's alone, whatever the umask (they
    // were 0755 and 0644 under the usual 022).
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |name: &str| {
            std::fs::metadata(app.dir.path().join(name))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("data"), 0o700);
        for file in ["data/ticketd.db", "data/ticketd.db-wal", "data/ticketd.db-shm"] {
            assert_eq!(mode(file), 0o600, "{file}");
        }
        // And everything else the node writes: the journal holds the
        // codes claimed, in a directory systemd may have made 0750.
        assert_eq!(mode("data/journal"), 0o700);
        let segments: Vec<_> = std::fs::read_dir(app.dir.path().join("data/journal"))
            .unwrap()
            .collect();
        assert!(!segments.is_empty());
        for segment in segments {
            let path = segment.unwrap().path();
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600,
                "{path:?}"
            );
        }
    }
    let res = app
        .client
        .post(
            "/user/register",
            None,
            &json!({ "username": "dora", "password": "another-pass" }),
        )
        .await
        .unwrap();
    assert_error(&res, 409, "USERNAME_TAKEN");
    let res = app
        .client
        .post(
            "/user/register",
            None,
            &json!({ "username": "x", "password": "password-x" }),
        )
        .await
        .unwrap();
    assert_error(&res, 400, "INVALID_FIELD");
    let res = app
        .client
        .post(
            "/user/register",
            None,
            &json!({ "username": "shorty", "password": "short" }),
        )
        .await
        .unwrap();
    assert_error(&res, 400, "INVALID_FIELD");

    let wrong = app
        .client
        .post(
            "/user/login",
            None,
            &json!({ "username": "dora", "password": "nope-nope" }),
        )
        .await
        .unwrap();
    let unknown = app
        .client
        .post(
            "/user/login",
            None,
            &json!({ "username": "nobody", "password": "nope-nope" }),
        )
        .await
        .unwrap();
    assert_error(&wrong, 401, "BAD_CREDENTIALS");
    assert_eq!(wrong.body, unknown.body, "no user enumeration");
    let again = app.login("dora").await;
    assert_ne!(again, token);

    let seed_header = app
        .client
        .call(http::Method::GET, "/ticket/list", None, None, &[("token", &again)])
        .await
        .unwrap();
    assert_eq!(seed_header.status, 200, "the seed's `token` header works");
    let out = app.client.post("/user/logout", Some(&again), &json!({})).await.unwrap();
    assert_eq!(out.status, 200);
    assert_error(
        &app.client.get("/ticket/list", Some(&again)).await.unwrap(),
        401,
        "UNAUTHORIZED",
    );
    assert_eq!(
        app.client.get("/ticket/list", Some(&token)).await.unwrap().status,
        200,
        "other sessions live on"
    );

    let forged = format!("{}x", &token[..token.len() - 1]);
    assert_error(
        &app.client.get("/ticket/list", Some(&forged)).await.unwrap(),
        401,
        "UNAUTHORIZED",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_can_be_closed() {
    let config = base_config().replace("[auth]", "[auth]\nopen_registration = false") + &open_activity("c", 1, 1);
    let app = TestApp::start(&config);
    let res = app
        .client
        .post(
            "/user/register",
            None,
            &json!({ "username": "eve", "password": "password-eve" }),
        )
        .await
        .unwrap();
    assert_error(&res, 403, "REGISTRATION_CLOSED");
    let out = app.cli(&["user", "add", "--username", "eve"], Some("password-eve\n"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    app.login("eve").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_error_shape_never_a_panic() {
    let config = base_config().replace("[server]", "[server]\nmax_body = \"1KiB\"") + &open_activity("b", 5, 1);
    let app = TestApp::start(&config);
    let token = app.register("mallory").await;
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"{\"actId\":".to_vec(), 400, "MALFORMED_JSON"),
        (b"not json".to_vec(), 400, "MALFORMED_JSON"),
        (b"".to_vec(), 400, "MALFORMED_JSON"),
        (vec![0xff, 0xfe, b'{', b'}'], 400, "MALFORMED_JSON"),
        (b"{\"actId\":[1]}".to_vec(), 400, "INVALID_FIELD"),
        (b"{\"actId\":true}".to_vec(), 400, "INVALID_FIELD"),
        (b"{}".to_vec(), 400, "INVALID_FIELD"),
        (b"[]".to_vec(), 400, "INVALID_FIELD"),
        // serde would read an array as the object's fields in order: not
        // a claim of activity "b" by position.
        (b"[\"b\"]".to_vec(), 400, "INVALID_FIELD"),
        (b"null".to_vec(), 400, "INVALID_FIELD"),
        (
            format!("{{\"actId\":\"{}\"}}", "x".repeat(65)).into_bytes(),
            400,
            "INVALID_FIELD",
        ),
        (
            format!("{{\"actId\":\"b\",\"pad\":\"{}\"}}", "x".repeat(2000)).into_bytes(),
            413,
            "BODY_TOO_LARGE",
        ),
    ];
    for (body, status, code) in cases {
        let res = send_raw(&app, &token, body.clone()).await;
        assert_eq!(
            (res.0, res.1["error"]["code"].as_str()),
            (status, Some(code)),
            "body {:?}: {}",
            String::from_utf8_lossy(&body),
            res.1
        );
        assert_eq!(res.1["ok"], false);
    }
    // A key the body does not take is named, not skipped: a misspelled
    // `ticketid` was a claim of whichever ticket type had stock.
    let res = send_raw(&app, &token, br#"{"actId":"b","ticketid":"b-t"}"#.to_vec()).await;
    assert_eq!(
        (res.0, res.1["error"]["code"].as_str()),
        (400, Some("INVALID_FIELD")),
        "{}",
        res.1
    );
    let said = res.1["error"]["message"].as_str().unwrap();
    assert!(
        said.contains("unknown field `ticketid`") && said.contains("`ticketId`"),
        "{said}"
    );
    assert_eq!(app.detail("b").await["claimed"], 0, "nothing was claimed");
    let res = app
        .client
        .post(
            "/user/register",
            None,
            &json!({ "username": "trent", "password": "password-trent", "nick": "T" }),
        )
        .await
        .unwrap();
    assert_error(&res, 400, "INVALID_FIELD");
    let res = app.client.get("/no/such/route", None).await.unwrap();
    assert_error(&res, 404, "ROUTE_NOT_FOUND");
    let res = app.client.get("/ticket/get", Some(&token)).await.unwrap();
    assert_error(&res, 405, "METHOD_NOT_ALLOWED");
    // The event stream has no head-only form, and says so (it was a 404
    // beside an Allow header that offered HEAD).
    let head = app
        .client
        .call(http::Method::POST, "/queue/events?actId=x", Some(&token), None, &[])
        .await
        .unwrap();
    assert_error(&head, 405, "METHOD_NOT_ALLOWED");
    let raw = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(&app.addr).await.unwrap();
        s.write_all(b"HEAD /queue/events?actId=x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    assert!(raw.starts_with("HTTP/1.1 405"), "{raw}");
    assert!(raw.to_ascii_lowercase().contains("allow: get\r\n"), "{raw}");
    let res = app
        .client
        .call(http::Method::GET, "/act/detail?actId=%FF%FE", None, None, &[])
        .await
        .unwrap();
    assert_error(&res, 404, "ACTIVITY_NOT_FOUND");
    // Still healthy afterwards, and the claim still works.
    assert_eq!(app.client.get("/healthz", None).await.unwrap().status, 200);
    assert_eq!(app.claim(&token, "b").await.status, 200);
}

/// A claim's body in several chunks (each a frame of its own to the
/// server), with an id written with a JSON escape, is read whole: the
/// claim reads a body that came in one frame as that frame and borrows its
/// strings from it, and must still join frames and unescape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_body_in_chunks_and_with_escapes_is_read_whole() {
    let app = TestApp::start(&(base_config() + &open_activity("chunk", 2, 1)));
    let token = app.register("chen").await;
    let mut body = app.claim_body(&token, "chunk").await;
    // "ch\u0075nk": the id "chunk" with an escaped letter.
    body["actId"] = "@".into();
    let text = body.to_string().replace("\"@\"", "\"ch\\u0075nk\"");
    assert!(text.contains(r"ch\u0075nk"), "{text}");
    let (first, rest) = text.split_at(text.len() / 2);
    let mut request = format!(
        "POST /ticket/get HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    for piece in [first, rest] {
        request += &format!("{:x}\r\n{piece}\r\n", piece.len());
    }
    request += "0\r\n\r\n";
    let answer = exchange(&app.addr, request.as_bytes()).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let claimed = answer.json();
    assert_eq!(claimed["data"]["actId"], "chunk", "{claimed}");
    assert_eq!(app.held(&token, "chunk").await.len(), 1);
}

/// POSTs raw bytes to /ticket/get over a plain TCP connection.
async fn send_raw(app: &TestApp, token: &str, body: Vec<u8>) -> (u16, Value) {
    let mut request = format!(
        "POST /ticket/get HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    let answer = exchange(&app.addr, &request).await;
    (answer.status, answer.json())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics() {
    let app = TestApp::start(&(base_config() + &open_activity("m", 3, 1)));
    let token = app.register("mia").await;
    app.claim(&token, "m").await;
    app.claim(&token, "m").await;
    let health = app.client.get("/healthz", None).await.unwrap();
    assert_eq!(health.data()["status"], "ok");
    let text = app.raw_get("/metrics").await;
    for needle in [
        "ticketd_claims_total{outcome=\"success\"} 1",
        "ticketd_claims_total{outcome=\"limit_reached\"} 1",
        "ticketd_http_requests_total{route=\"/ticket/get\",status=\"200\"} 1",
        "ticketd_http_requests_total{route=\"/ticket/get\",status=\"409\"} 1",
        "ticketd_stock_remaining{activity=\"m\",ticket=\"m-t\"} 2",
        "ticketd_journal_fsync_seconds_count 1",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
}

/// `/act/list` keeps its rendering with the catalog snapshot while nothing
/// it shows changes (issue 15) — and is never stale: a claim, an activity
/// opening and the server's clock all show at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_is_never_stale() {
    let config = base_config()
        + &open_activity("now", 3, 1)
        + &Act::new("soon")
            .window("+1500ms", "+1h")
            .ticket("soon-t", "T", Codes::List(&["S1"]))
            .toml();
    let app = TestApp::start(&config);
    let list = |app: &TestApp| {
        let client = app.client_clone();
        async move { client.get("/act/list", None).await.unwrap().data().clone() }
    };
    let first = list(&app).await;
    let second = list(&app).await;
    assert_eq!(first["activities"], second["activities"]);
    assert_eq!(first["activities"][1]["status"], "upcoming");
    let at = |v: &Value| ticketd::clock::parse_rfc3339_ms(v["serverTime"].as_str().unwrap()).unwrap();
    assert!(at(&second) >= at(&first), "{first} then {second}");
    assert!(
        (at(&second) - ticketd::clock::now_ms()).abs() < 5_000,
        "serverTime is the clock's"
    );

    let alice = app.register("alice").await;
    assert_eq!(app.claim(&alice, "now").await.status, 200);
    let after = list(&app).await;
    assert_eq!(
        (&after["activities"][0]["remaining"], &after["activities"][0]["claimed"]),
        (&json!(2), &json!(1)),
        "{after}"
    );

    // The second activity opens on its own clock; the list says so.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let now = list(&app).await;
        if now["activities"][1]["status"] == "open" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "`soon` never showed as open: {now}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A node on [`slow_journal_disk`], started; and the file that holds its
/// journal's `fdatasync` while it exists.
pub(crate) fn on_a_slow_journal_disk(config: &str) -> (TestApp, std::path::PathBuf) {
    let mut app = TestApp::prepare(config, &[]);
    let lib = slow_journal_disk(app.dir.path());
    let hold = app.dir.path().join("hold-fsync");
    app.env.push(("LD_PRELOAD".into(), lib.display().to_string()));
    app.env
        .push(("TEST_HOLD_JOURNAL_FSYNC".into(), hold.display().to_string()));
    app.boot();
    (app, hold)
}

/// Waits until one claim is being committed (held on the slow disk).
pub(crate) async fn one_claim_waits_on_the_disk(app: &TestApp) {
    crate::common::until("a claim to wait on the disk", || async {
        crate::common::metric(app, "ticketd_claims_in_flight").await == 1.0
    })
    .await;
}

/// An `fdatasync` of the journal's that waits while `hold` exists: a disk
/// slow to make one group commit durable, so that a claim stays in its
/// commit for as long as the test needs. Built with the system's C
/// compiler and preloaded into the node.
fn slow_journal_disk(dir: &std::path::Path) -> std::path::PathBuf {
    let source = dir.join("slow_fsync.c");
    std::fs::write(
        &source,
        r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    const char *hold = getenv("TEST_HOLD_JOURNAL_FSYNC");
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (hold && n > 0) {
        path[n] = 0;
        while (strstr(path, "/journal/") && access(hold, F_OK) == 0) usleep(1000);
    }
    return real(fd);
}
"#,
    )
    .unwrap();
    let lib = dir.join("slow_fsync.so");
    let out = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&source)
        .arg("-ldl")
        .output()
        .unwrap_or_else(|e| panic!("cannot run cc ({e}): install a C compiler (Debian: apt install gcc)"));
    assert!(out.status.success(), "cc: {}", String::from_utf8_lossy(&out.stderr));
    lib
}

/// A retry with the key of a claim still being committed heard what the
/// sale said now rather than IN_PROGRESS: the ledger's look before the
/// other checks saw only claims made, not ones in progress. Here the sale
/// is paused while the first claim waits on a slow disk, and its retry
/// heard 409 PAUSED, though the first then got its code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_a_claim_still_being_committed_hears_in_progress() {
    let other = open_activity("other", 1, 1);
    let config = base_config() + &open_activity("ip", 5, 2) + &other;
    let (app, hold) = on_a_slow_journal_disk(&config);
    let token = app.register("slow").await;
    let body = app.claim_body(&token, "ip").await;
    let post = || {
        let (client, token, body) = (app.client_clone(), token.clone(), body.clone());
        async move { claim_keyed(&client, &token, &body, "slow-1").await }
    };
    std::fs::write(&hold, b"").unwrap();
    let first = tokio::spawn(post());
    one_claim_waits_on_the_disk(&app).await;
    let paused = config.replace("per_user_limit = 2", "per_user_limit = 2\npaused = true");
    assert_ne!(config, paused);
    assert_eq!(app.reload(&paused)["message"], "Config reloaded.");
    assert_error(&post().await, 409, "IN_PROGRESS");
    // And once a reload took the activity out altogether.
    assert_eq!(app.reload(&(base_config() + &other))["message"], "Config reloaded.");
    assert_error(&post().await, 409, "IN_PROGRESS");
    assert!(!first.is_finished(), "the first claim ended while the disk was held");
    std::fs::remove_file(&hold).unwrap();
    let first = first.await.unwrap();
    assert_eq!(first.status, 200, "{}", first.body);
    assert_replayed(&post().await, &first);
}

/// While the last code's claim is being committed (its group's `fdatasync`
/// held here), the pool is empty but the sale is not over: that commit may
/// still fail and give its code back. A claim meanwhile hears the
/// retryable 503 STOCK_IN_FLIGHT, not 410 SOLD_OUT, which is final; once
/// the commit is made, SOLD_OUT. (The rush in `rush.rs` shows the same
/// under load, but cannot make the window certain.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_while_the_last_code_is_being_committed_hears_stock_in_flight_not_sold_out() {
    let config = base_config() + &open_activity("last", 1, 1);
    let (app, hold) = on_a_slow_journal_disk(&config);
    let (first_fan, second_fan) = (app.register("first").await, app.register("second").await);
    let (first_body, second_body) = (
        app.claim_body(&first_fan, "last").await,
        app.claim_body(&second_fan, "last").await,
    );
    std::fs::write(&hold, b"").unwrap();
    let client = app.client_clone();
    let first = tokio::spawn(async move { client.post("/ticket/get", Some(&first_fan), &first_body).await.unwrap() });
    one_claim_waits_on_the_disk(&app).await;
    let second = || async {
        app.client
            .post("/ticket/get", Some(&second_fan), &second_body)
            .await
            .unwrap()
    };
    assert_error(&second().await, 503, "STOCK_IN_FLIGHT");
    assert!(!first.is_finished(), "the first claim ended while the disk was held");
    std::fs::remove_file(&hold).unwrap();
    let first = first.await.unwrap();
    assert_eq!(first.status, 200, "{}", first.body);
    assert_error(&second().await, 410, "SOLD_OUT");
}

/// A reload took an activity out after a fan's claim in it, whose first
/// answer was lost: the retry with the claim's key heard 404
/// ACTIVITY_NOT_FOUND, though the claim stands (and `/ticket/list` shows
/// it). It now gets its claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_retry_gets_its_claim_after_a_reload_took_the_activity_out() {
    let kept = open_activity("kept", 2, 1);
    let config = base_config() + &kept + &open_activity("gone", 2, 1);
    let app = TestApp::start(&config);
    let token = app.register("fan").await;
    let body = app.claim_body(&token, "gone").await;
    let post = || claim_keyed(&app.client, &token, &body, "gone-1");
    let first = post().await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(app.reload(&(base_config() + &kept))["message"], "Config reloaded.");
    assert_replayed(&post().await, &first);
    // Without the key it is an activity like any unknown one.
    let res = app.client.post("/ticket/get", Some(&token), &body).await.unwrap();
    assert_error(&res, 404, "ACTIVITY_NOT_FOUND");
}

/// A data directory the node did not make (systemd's `StateDirectory`, an
/// operator's `mkdir`) kept the mode it was given, 0755 under the usual
/// umask, with nothing said: the node now says so at start, and what it
/// writes there itself is its own alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_others_may_read_is_said_so() {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let mut app = TestApp::prepare(&(base_config() + &open_activity("m", 1, 1)), &[]);
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(app.dir.path().join("data"))
        .unwrap();
    app.boot();
    let said = app.wait_for_log(
        "Others may read this: it holds the session key, the password hashes and the codes claimed. Make it \
         the service user's alone (chmod 700 for the directory, 600 for the database).",
        1,
    );
    assert_eq!(said["mode"], "755", "{said}");
    let journal = std::fs::metadata(app.dir.path().join("data/journal")).unwrap();
    assert_eq!(journal.permissions().mode() & 0o777, 0o700);
}
