//! Headless Chromium (Debian's `chromium`) renders the HTML report and the
//! live admin page without console errors, and shows the right numbers.

use std::{path::Path, process::Command};

use crate::{
    common::{base_config, open_activity, TestApp},
    rush::rush,
};

/// Runs headless Chromium with `args` on the profile `profile`: its stdout
/// (a `--dump-dom`) and stderr.
pub(crate) fn chromium(args: &[&str], profile: &Path) -> (String, String) {
    let binary = crate::common::cdp::chromium_binary();
    // A page that never settles would hold `--dump-dom` until the test
    // harness's own timeout, five minutes on: two are plenty, and then it
    // says so.
    let out = Command::new("timeout")
        .args(["-k", "10", "120"])
        .arg(binary)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            // A container's /dev/shm is 64 MB, which a renderer outgrows.
            "--disable-dev-shm-usage",
        ])
        .args([
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .args(["--enable-logging=stderr", "--v=0"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "Chromium ended {} (124: it ran out its two minutes): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_no_console_errors(stderr: &str) {
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("CONSOLE") || l.contains("Uncaught"))
        .filter(|l| l.contains("rror") || l.contains("Uncaught"))
        .collect();
    assert!(errors.is_empty(), "console errors: {errors:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_and_the_live_page_render_in_chromium() {
    let admin_token = crate::common::ADMIN_TOKEN;
    let config = crate::common::with_admin(base_config())
        .replace("claim_rate_per_user = 1000000.0", "claim_rate_per_user = 0.001")
        .replace("claim_burst_per_user = 1000000", "claim_burst_per_user = 3")
        + &open_activity("web", 30, 1);
    let mut app = TestApp::start(&config);
    let admin_addr = app.admin_addr();
    let tokens = app.users("w", 40).await;
    let (acked, _) = rush(&app, "web", &tokens, 1, 20).await;
    assert_eq!(acked.iter().map(Vec::len).sum::<usize>(), 30);
    // One account past its rate: turned away before the claim decision,
    // which the page did not count ("refused" stayed put in a bot attack).
    let limited = {
        let body = app.claim_body(&tokens[0], "web").await;
        let mut limited = 0;
        for _ in 0..6 {
            let res = app.client.post("/ticket/get", Some(&tokens[0]), &body).await.unwrap();
            limited += usize::from(res.status == 429);
        }
        limited
    };
    assert!(limited >= 3, "{limited}");
    let profile = tempfile::tempdir().unwrap();

    // The live page: the numbers arrive through its own polling.
    let url = format!("http://{admin_addr}/admin#token={admin_token}");
    let (dom, stderr) =
        tokio::task::block_in_place(|| chromium(&["--virtual-time-budget=3000", "--dump-dom", &url], profile.path()));
    assert_no_console_errors(&stderr);
    assert!(dom.contains(r#"<b id="claimed">30</b>"#), "{dom}");
    assert!(dom.contains(r#"<b id="stock">0</b>"#), "{dom}");
    // As /admin/stats counts them (the rush's retries may have met the
    // rate too).
    let counted = app.admin_stats().await["claimsRateLimited"].as_u64().unwrap();
    assert!(counted >= limited as u64, "{counted} < {limited}");
    assert!(dom.contains(&format!(r#"<b id="limited">{counted}</b>"#)), "{dom}");
    assert!(dom.contains("<td>web</td>"), "{dom}");
    let shot = app.dir.path().join("admin.png");
    tokio::task::block_in_place(|| {
        chromium(
            &[
                "--window-size=1000,700",
                "--virtual-time-budget=2000",
                &format!("--screenshot={}", shot.display()),
                &url,
            ],
            profile.path(),
        )
    });
    assert!(std::fs::metadata(&shot).unwrap().len() > 1000);
    // Without the token the page asks for it instead of showing data (and
    // sends no request).
    let (dom, _) = tokio::task::block_in_place(|| {
        chromium(
            &[
                "--virtual-time-budget=2000",
                "--dump-dom",
                &format!("http://{admin_addr}/admin"),
            ],
            profile.path(),
        )
    });
    assert!(dom.contains(r#"<form id="login">"#), "{dom}");
    assert!(dom.contains(r#"<b id="claimed">–</b>"#), "{dom}");
    let refused = "ticketd_security_rejections_total{reason=\"admin_unauthorized\"}";
    assert_eq!(crate::common::metric(&app, refused).await, 0.0);
    // No other site may frame it (the fans' page said so; this one did not).
    let page = crate::common::exchange(&admin_addr, b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(page.header("x-frame-options"), Some("DENY"));
    assert!(
        page.header("content-security-policy")
            .is_some_and(|csp| csp.contains("frame-ancestors 'none'")),
        "{:?}",
        page.header("content-security-policy")
    );

    // The report, from a file, with no network.
    assert_eq!(app.stop(), 0);
    let out = app.cli(&["report", "--activity", "web", "--out", "report.html"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let file = app.dir.path().join("report.html");
    let (dom, stderr) = tokio::task::block_in_place(|| {
        chromium(&["--dump-dom", &format!("file://{}", file.display())], profile.path())
    });
    assert_no_console_errors(&stderr);
    assert!(dom.contains(r#"<td id="claimed">30</td>"#), "{dom}");
    assert!(dom.contains("sold out after"), "the sell-out moment is marked");
    let shot = app.dir.path().join("report.png");
    tokio::task::block_in_place(|| {
        chromium(
            &[
                "--window-size=900,1800",
                &format!("--screenshot={}", shot.display()),
                &format!("file://{}", file.display()),
            ],
            profile.path(),
        )
    });
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
}

/// The live page was opened with its admin token in the address, which
/// went into the browser's history, synced history and bookmarks; the
/// token is now typed into the page and kept for the tab (a reload still
/// shows the numbers), and an address with it (as before) is cleaned at
/// once. And its "refused" counted again the shed (503 OVERLOADED) it
/// shows beside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_page_keeps_its_token_out_of_the_address_and_counts_a_refusal_once() {
    let config =
        crate::common::with_admin(base_config()) + "[journal]\nqueue_capacity = 1\n" + &open_activity("sh", 150, 1);
    let app = TestApp::start(&config);
    let tokens = app.users("s", 1500).await;
    rush(&app, "sh", &tokens, 2, 500).await;
    let admin = format!("http://{}", app.admin_addr());
    let outcomes = app.admin_stats().await["claimOutcomes"].as_object().unwrap().clone();
    let count = |k: &str| outcomes.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    assert!(count("overloaded") > 0, "the journal queue never filled: {outcomes:?}");
    let refused: u64 = outcomes
        .iter()
        .filter(|(k, _)| !["success", "replayed", "overloaded"].contains(&k.as_str()))
        .map(|(_, v)| v.as_u64().unwrap())
        .sum();

    let sold = "document.querySelector('#claimed').textContent === '150'";
    let mut b = crate::common::cdp::Browser::launch().await;
    b.goto(&format!("{admin}/admin")).await;
    b.wait_for("!document.querySelector('#login').hidden", "the token's field")
        .await;
    b.eval(&format!(
        "document.querySelector('#token').value = {}; document.querySelector('#login').requestSubmit()",
        serde_json::json!(crate::common::ADMIN_TOKEN)
    ))
    .await;
    b.wait_for(sold, "the numbers").await;
    assert_eq!(b.eval("location.href").await, format!("{admin}/admin"));
    assert_eq!(
        b.eval("document.querySelector('#shed').textContent").await,
        count("overloaded").to_string()
    );
    assert_eq!(
        b.eval("document.querySelector('#refused').textContent").await,
        refused.to_string()
    );
    b.goto(&format!("{admin}/admin")).await;
    b.wait_for(sold, "the numbers after a reload, with the token kept for the tab")
        .await;
    // An address with the token, as earlier versions were opened, works
    // and is cleaned at once.
    let mut b = crate::common::cdp::Browser::launch().await;
    b.goto(&format!("{admin}/admin#token={}", crate::common::ADMIN_TOKEN))
        .await;
    b.wait_for(sold, "the numbers").await;
    assert_eq!(b.eval("location.href").await, format!("{admin}/admin"));
}
