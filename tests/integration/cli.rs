//! The command line: check-config, import, user, export, start-up failures.

use std::process::Command;

use crate::common::{base_config, open_activity, parse_csv, run_cli, serve_refused, Act, Codes, TestApp, BIN};

fn dir_with(config: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.toml"), config).unwrap();
    dir
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn check_config_lists_every_problem_with_its_line() {
    // Misspelled keys too, each with its line: the parser stopped at the
    // first, and a file with three typos took three runs to see them.
    let config = base_config().replace("[server]\n", "[server]\nmax_bdy = 5\n")
        + &Act::new("a")
            .name("A")
            .window("+2h", "+1h")
            .with("per_user_limt = 2")
            .ticket("t", "T", Codes::List(&["X", "X"]))
            .ticket("none", "None", Codes::List(&[]))
            .toml();
    let dir = dir_with(&config);
    let out = run_cli(dir.path(), &["check-config"], None);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    let end_line = config
        .lines()
        .position(|l| l.starts_with("end_time = \"+1h\""))
        .unwrap()
        + 1;
    let codes_line = config
        .lines()
        .position(|l| l.contains("codes = [\"X\", \"X\"]"))
        .unwrap()
        + 1;
    assert!(
        err.contains(&format!("line {end_line}: activity `a` must end after it starts")),
        "{err}"
    );
    assert!(
        err.contains(&format!("line {codes_line}: ticket `t`: code `X` appears twice")),
        "{err}"
    );
    // A ticket type with no code would never sell out in a cluster (Redis
    // cannot tell it from one nobody imported) and never sell at all.
    let none_line = config.lines().position(|l| l.trim() == "codes = []").unwrap() + 1;
    assert!(
        err.contains(&format!("line {none_line}: ticket `none` has no codes")),
        "{err}"
    );
    for key in ["max_bdy", "per_user_limt"] {
        let line = config.lines().position(|l| l.starts_with(key)).unwrap() + 1;
        assert!(
            err.contains(&format!("line {line}: unknown field `{key}`, expected one of")),
            "{err}"
        );
    }
    assert!(!err.contains("panicked"), "{err}");

    let ok = dir_with(&(base_config() + &open_activity("ok", 3, 1)));
    let out = run_cli(ok.path(), &["check-config"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("is valid"));
}

#[test]
fn the_bundled_config_passes_check_config() {
    let out = Command::new(BIN)
        .args([
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"),
            "check-config",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn startup_failures_exit_nonzero_with_one_sentence() {
    // Missing config.
    let empty = tempfile::tempdir().unwrap();
    let out = run_cli(empty.path(), &["serve"], None);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.starts_with("ticketd: cannot read config file"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert_eq!(err.matches("No such file").count(), 1, "the cause said once: {err}");

    // Broken TOML.
    let broken = dir_with("[server\nlisten = 1");
    let out = run_cli(broken.path(), &["serve"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("line 1"), "{}", text(&out.stderr));

    // Address in use.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let busy = dir_with(&base_config().replace("127.0.0.1:0", &format!("127.0.0.1:{port}")));
    let out = run_cli(busy.path(), &["serve"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{}",
        text(&out.stderr)
    );

    // A data dir that cannot be created (a file is in the way).
    let blocked = dir_with(&base_config().replace("path = \"data\"", "path = \"file/data\""));
    std::fs::write(blocked.path().join("file"), "x").unwrap();
    let out = run_cli(blocked.path(), &["serve"], None);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("cannot create the data directory"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_second_node_on_the_same_data_dir_is_refused() {
    let app = TestApp::start(&(base_config() + &open_activity("x", 1, 1)));
    let out = app.cli(&["serve"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("in use by another running ticketd"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn import_twice_adds_nothing_twice_and_never_returns_a_claimed_code() {
    let config = base_config()
        + &Act::new("imp")
            .name("Import")
            .ticket("imp-a", "A", Codes::List(&["C1", "C2", "C3"]))
            .ticket("imp-g", "G", Codes::Generate(50))
            .ticket("imp-f", "F", Codes::File("codes.txt"))
            .toml();
    let dir = dir_with(&config);
    std::fs::write(dir.path().join("codes.txt"), "F1\nF2\n\nF3\n").unwrap();
    let out = run_cli(dir.path(), &["import"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let first = text(&out.stdout);
    assert!(first.contains("ticket imp-a: 3 codes added, 3 in total"), "{first}");
    assert!(first.contains("ticket imp-g: 50 codes added, 50 in total"), "{first}");
    assert!(first.contains("ticket imp-f: 3 codes added, 3 in total"), "{first}");
    let out = run_cli(dir.path(), &["import"], None);
    let second = text(&out.stdout);
    assert!(second.contains("ticket imp-a: 0 codes added, 3 in total"), "{second}");
    assert!(second.contains("ticket imp-g: 0 codes added, 50 in total"), "{second}");

    // Claim C-codes through a node, then import again: stock stays as it is.
    let mut app = TestApp::start_with(&config, &[("codes.txt", "F1\nF2\nF3\n")]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let t = app.register("ivan").await;
        let mut body = app.claim_body(&t, "imp").await;
        body["ticketId"] = "imp-a".into();
        let res = app.client.post("/ticket/get", Some(&t), &body).await.unwrap();
        assert_eq!(res.status, 200);
    });
    assert_eq!(app.stop(), 0, "the node stopped cleanly");
    let out = app.cli(&["import"], None);
    assert!(
        text(&out.stdout).contains("ticket imp-a: 0 codes added, 3 in total"),
        "{}",
        text(&out.stdout)
    );
    app.boot();
    rt.block_on(async {
        let d = app.detail("imp").await;
        assert_eq!(d["tickets"][0]["remaining"], 2, "the claimed code did not come back");
        assert_eq!(d["claimed"], 1);
    });
}

/// A ticket type's codes and claims are its activity's: `ticketd import`
/// re-parented a ticket type whose activity the config renamed, so its
/// claims counted towards another activity's limit and report. Import, and
/// a node's own import at start, now refuse such a config and change nothing.
#[test]
fn an_import_that_moves_a_ticket_type_to_another_activity_is_refused() {
    let config = base_config()
        + &Act::new("mv")
            .name("Moving")
            .ticket("mv-t", "T", Codes::List(&["M1", "M2"]))
            .toml();
    let mut app = TestApp::prepare(&config, &[]);
    let out = app.cli(&["import"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let moved = config.replace("id = \"mv\"\n", "id = \"mv2\"\n");
    assert_ne!(moved, config);
    std::fs::write(app.config_path(), &moved).unwrap();
    const SAID: &str = "ticket type `mv-t` moved from activity `mv` to `mv2`";
    for command in ["import", "serve"] {
        let out = app.cli(&[command], None);
        assert_eq!(out.status.code(), Some(1), "{command}: {}", text(&out.stdout));
        let err = text(&out.stderr);
        assert!(err.contains(SAID), "{command}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }

    // Nothing moved: the original config still serves its two codes.
    std::fs::write(app.config_path(), &config).unwrap();
    let out = app.cli(&["import"], None);
    assert!(
        text(&out.stdout).contains("ticket mv-t: 0 codes added, 2 in total"),
        "{}",
        text(&out.stdout)
    );
    app.boot();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let d = app.detail("mv").await;
        assert_eq!(d["tickets"][0]["remaining"], 2, "{d}");
        assert_eq!(app.listed().await, ["mv"]);
    });
}

#[test]
fn users_from_the_command_line_and_exports_in_both_formats() {
    let app = TestApp::start(&(base_config() + &open_activity("exp", 10, 1)));
    let out = app.cli(
        &["user", "add", "--username", "zhang", "--nickname", "张三, \"老张\""],
        Some("password-zhang\n"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = app.cli(&["user", "add", "--username", "zhang"], Some("password-zhang\n"));
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("taken"));
    // Nothing piped in is no password, said as such (it was "password must
    // be 8-128 characters").
    let out = app.cli(&["user", "add", "--username", "nopass"], None);
    assert!(
        !out.status.success() && text(&out.stderr).contains("no password on stdin"),
        "{}",
        text(&out.stderr)
    );
    // Writes `rows` to `name` in the app's directory and imports it.
    let import = |name: &str, rows: &[u8]| {
        std::fs::write(app.dir.path().join(name), rows).unwrap();
        app.cli(&["user", "import", name], None)
    };
    // A registration time from another system is refused when it is not a
    // time, or not yet; the file is then imported not at all.
    for (row, says) in [
        ("lisi,password-lisi,李四,yesterday", "not an RFC 3339 time"),
        // A terminal escape in the file is shown, not sent to the terminal.
        (
            "lisi,password-lisi,李四,\u{1b}]0;PWNED\u{7}",
            "created_at `\\u{1b}]0;PWNED\\u{7}`",
        ),
        ("lisi,password-lisi,李四,2999-01-01T00:00:00Z", "in the future"),
        ("lisi,password-lisi,李四,1899-12-30T00:00:00Z", "before 1970"),
    ] {
        let out = import("bad.csv", format!("wangwu,password-wangwu,\n{row}\n").as_bytes());
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(err.contains("bad.csv line 2") && err.contains(says), "{err}");
    }
    // Refused whole, naming the line a row starts on (a quoted password may
    // span lines; the count of rows was given): an account named twice,
    // whose second row was skipped as if it existed, its password dropped;
    // and a row with an unquoted comma, read as another password.
    for (rows, says) in [
        (
            "wangwu,password-wangwu,\n\"sunqi\",\"pass\nword\",\nWANGWU,password-other,\n",
            "bad.csv line 4: `WANGWU` is the account of line 1",
        ),
        (
            "sunqi,\"pass\nword\",\nwangwu,pass,word,x,2021-06-01T00:00:00Z\n",
            "bad.csv line 3: 5 columns",
        ),
        ("sunqi,\"pass\nword\",\nw w,password-w,\n", "bad.csv line 3: "),
        // Saved on Windows (CRLF), where every row after the first was
        // named a line early; and on an old Mac (CR alone).
        (
            "wangwu,password-wangwu,\r\n\"sunqi\",\"pass\r\nword\",\r\nWANGWU,password-other,\r\n",
            "bad.csv line 4: `WANGWU` is the account of line 1",
        ),
        (
            "username,password\r\n\r\nwangwu,password-wangwu\r\nw w,password-w\r\n",
            "bad.csv line 4: ",
        ),
        ("wangwu,password-wangwu,\rw w,password-w,\r", "bad.csv line 2: "),
    ] {
        let out = import("bad.csv", rows.as_bytes());
        let err = text(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{says}: {err}");
    }
    // Saved as Latin-1 (é as one byte), on Windows: named at its line too.
    let out = import(
        "bad.csv",
        b"wangwu,password-wangwu,\r\nsunqi,password-sunqi,Sun\xe9\r\n",
    );
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("bad.csv line 2: not UTF-8"),
        "{err}"
    );
    let out = import(
        "u.csv",
        "username,password,nickname,created_at\nlisi,password-lisi,李四,2021-06-01T08:00:00+08:00\n\
         wangwu,password-wangwu,\n zhaoliu ,\"  spaced password  \", 赵六 \n"
            .as_bytes(),
    );
    assert!(text(&out.stdout).contains("3 users created"), "{}", text(&out.stdout));
    let out = app.cli(&["user", "list"], None);
    let users = parse_csv(&out.stdout);
    let names: Vec<&str> = users.iter().map(|u| u["username"].as_str()).collect();
    assert_eq!(names, ["zhang", "lisi", "wangwu", "zhaoliu"]);
    assert_eq!(users[3]["nickname"], "赵六");
    // A spreadsheet's "CSV UTF-8": a byte-order mark before the header,
    // and empty columns past the fourth (it was refused for both).
    let out = import(
        "bom.csv",
        "\u{feff}username,password,nickname,created_at,,\r\nbomfan,password-bomfan,,,,\r\n".as_bytes(),
    );
    assert!(text(&out.stdout).contains("1 user created"), "{}", text(&out.stderr));
    // A header with spaces is a header still, not an account called
    // `username` with the password ` password`.
    let out = import(
        "h.csv",
        "username, password, nickname\nsunqi,password-sunqi,\n".as_bytes(),
    );
    assert!(text(&out.stdout).contains("1 user created"), "{}", text(&out.stdout));
    // Saved with semicolons, as many locales' spreadsheets do: said so.
    let out = import("semi.csv", "zhouba;password-zhouba;\n".as_bytes());
    assert!(
        !out.status.success() && text(&out.stderr).contains("must be comma-separated"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(users[0]["nickname"], "张三, \"老张\"");
    assert_eq!(users[2]["nickname"], "wangwu");
    assert_eq!(users[1]["created_at"], "2021-06-01T00:00:00.000Z");
    assert!(users[2]["created_at"].starts_with("20"), "{:?}", users[2]);
    assert_ne!(users[2]["created_at"], users[1]["created_at"], "no column: made now");

    // A fan who forgot the password gets a new one from the organiser: the
    // old one no longer logs in, the new one does.
    let out = app.cli(&["user", "add", "--username", "forgot"], Some("password-forgot\n"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = app.cli(&["user", "passwd", "--username", "FORGOT"], Some("a-new-password\n"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let old = serde_json::json!({ "username": "forgot", "password": "password-forgot" });
        let res = app.client.post("/user/login", None, &old).await.unwrap();
        assert_eq!(res.status, 401, "{}", res.body);
        let new = serde_json::json!({ "username": "forgot", "password": "a-new-password" });
        let res = app.client.post("/user/login", None, &new).await.unwrap();
        assert_eq!(res.status, 200, "{}", res.body);
    });
    let out = app.cli(&["user", "passwd", "--username", "nobody"], Some("a-new-password\n"));
    assert!(
        !out.status.success() && text(&out.stderr).contains("no user `nobody`"),
        "{}",
        text(&out.stderr)
    );
    let codes: Vec<String> = rt.block_on(async {
        let mut codes = Vec::new();
        for name in ["zhang", "lisi"] {
            let t = app.login(name).await;
            codes.push(app.claim(&t, "exp").await.data()["code"].as_str().unwrap().to_owned());
        }
        // A password is what the file says, spaces and all (the import
        // trimmed it, and its owner could not log in).
        let body = serde_json::json!({ "username": "zhaoliu", "password": "  spaced password  " });
        let res = app.client.post("/user/login", None, &body).await.unwrap();
        assert_eq!(res.status, 200, "{}", res.body);
        codes
    });
    // Claims reach SQLite a moment after they are acknowledged; stop the node to flush.
    let mut app = app;
    assert_eq!(app.stop(), 0);
    let out = app.cli(
        &["export", "--activity", "exp", "--format", "csv", "--out", "claims.csv"],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows = parse_csv(&std::fs::read(app.dir.path().join("claims.csv")).unwrap());
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["code"], codes[0]);
    assert_eq!(rows[0]["nickname"], "张三, \"老张\"");
    assert_eq!(rows[1]["username"], "lisi");
    assert!(rows[0]["claimed_at"].ends_with('Z'));
    // For Excel: a byte-order mark first; the csv crate reads past it.
    let out = app.cli(&["export", "--activity", "exp", "--bom"], None);
    assert!(
        out.stdout.starts_with("\u{feff}\"claim_id\",".as_bytes()),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(parse_csv(&out.stdout)[0]["nickname"], "张三, \"老张\"");
    // RFC 4180's CRLF ends every record, as README says (it was LF).
    let csv = text(&out.stdout);
    assert_eq!(csv.matches("\r\n").count(), 3, "{csv:?}");
    assert_eq!(csv.matches('\n').count(), 3, "{csv:?}");
    // Asked of another format, the mark is refused, not left out unsaid.
    let out = app.cli(&["export", "--activity", "exp", "--bom", "--format", "jsonl"], None);
    assert!(
        !out.status.success() && text(&out.stderr).contains("--bom is for CSV"),
        "{}",
        text(&out.stderr)
    );
    let out = app.cli(&["export", "--activity", "exp", "--format", "jsonl"], None);
    let lines: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["code"], codes[1]);
    assert_eq!(lines[1]["nickname"], "李四");
    let out = app.cli(&["export", "--activity", "nope"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no activity `nope`"));
    // A directory that is not there is the error, in the place's terms (it
    // named the hidden file written beside the place first).
    let out = app.cli(&["export", "--activity", "exp", "--out", "missing/claims.csv"], None);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot write missing/claims.csv") && !err.contains(".part"),
        "{err}"
    );
}

#[test]
fn bench_rushes_and_verifies_the_invariants() {
    let app = TestApp::start(&(base_config() + &open_activity("bench", 150, 2)));
    let report = crate::common::bench(
        &app.url(),
        &[
            "--activity",
            "bench",
            "--users",
            "120",
            "--concurrency",
            "32",
            "--claims-per-user",
            "3",
            "--create-users",
        ],
    );
    assert_eq!(report["outcomes"]["success"], 150, "{report}");
    assert_eq!(report["acknowledged"], 150);
    assert_eq!(report["claimed_after"], 150);
    assert_eq!(report["remaining_after"], 0);
    assert_eq!(report["rush"]["requests"], 360);

    // A node given without its scheme is named, not "invalid format".
    let bare = app.url().trim_start_matches("http://").to_owned();
    let out = run_cli(
        app.dir.path(),
        &["bench", "--url", &bare, "--activity", "bench", "--users", "1"],
        None,
    );
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("http://HOST:PORT"), "{err}");
    // Accounts that do not exist, without --create-users: the flag is named.
    let out = run_cli(
        app.dir.path(),
        &[
            "bench",
            "--url",
            &app.url(),
            "--activity",
            "bench",
            "--users",
            "1",
            "--user-prefix",
            "nobody-",
        ],
        None,
    );
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("add --create-users"), "{err}");
}

/// `bench` waited for the sale's start by its own clock. Run from a machine
/// whose clock is ahead, it asked for its claim tokens before the sale
/// opened (and got none), every claim was refused CLAIM_TOKEN_REQUIRED,
/// and it reported the invariants kept, having tested nothing. It now
/// waits by the server's clock, and a rush its accounts could not claim in
/// is a failure, not a pass; `--concurrency 0` (no request at all) is
/// refused (from a review).
#[test]
fn bench_waits_for_the_start_by_the_servers_clock() {
    let config = base_config()
        + &Act::new("sk")
            .window("+6s", "+1h")
            .limit(1)
            .ticket("sk-t", "T", Codes::Generate(20))
            .toml();
    let app = TestApp::start(&config);
    let args = [
        "bench",
        "--url",
        &app.url(),
        "--json",
        "--activity",
        "sk",
        "--users",
        "20",
        "--create-users",
    ];
    let out = Command::new(BIN)
        .args(args)
        .envs(crate::common::faketime_env("+60s"))
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["outcomes"]["success"], 20, "{report}");
    assert_eq!(report["violations"], serde_json::json!([]), "{report}");

    let out = Command::new(BIN)
        .args(["bench", "--url", &app.url(), "--activity", "sk", "--concurrency", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("--concurrency"), "{}", text(&out.stderr));
}

/// `bench --create-users` against a node that lets one address make only a
/// few accounts (the shipped default is production's) failed with a bare
/// "cannot log in …: 429 RATE_LIMITED". It names the setting and the way
/// around it.
#[test]
fn bench_names_the_registration_limit_it_meets() {
    let config = base_config().replace(
        "registrations_per_ip_per_hour = 1000000",
        "registrations_per_ip_per_hour = 3",
    );
    assert!(config.contains("registrations_per_ip_per_hour = 3"), "{config}");
    let app = TestApp::start(&(config + &open_activity("reg", 10, 1)));
    let out = run_cli(
        app.dir.path(),
        &[
            "bench",
            "--url",
            &app.url(),
            "--activity",
            "reg",
            "--users",
            "5",
            "--concurrency",
            "1",
            "--create-users",
        ],
        None,
    );
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("security.registrations_per_ip_per_hour") && err.contains("ticketd user import"),
        "{err}"
    );
    // Sizes no run could have are refused up front: a hundred trillion
    // users made the bench panic allocating their tokens.
    for (flag, n) in [
        ("--users", "100000000000000"),
        ("--users", "0"),
        ("--claims-per-user", "1001"),
    ] {
        let args = ["bench", "--url", &app.url(), "--activity", "reg", flag, n];
        let out = run_cli(app.dir.path(), &args, None);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {n}: {err}");
        assert!(err.contains(flag), "{flag} {n}: {err}");
    }
}

/// Reading tools in a directory where nothing was imported or served say
/// so, and leave nothing behind (they once created an empty store).
#[test]
fn export_and_report_with_no_store_say_so_and_create_nothing() {
    let dir = dir_with(&(base_config() + &open_activity("none", 3, 1)));
    for args in [&["export", "--activity", "none"][..], &["report", "--activity", "none"]] {
        let out = run_cli(dir.path(), args, None);
        let err = text(&out.stderr);
        // Where it looked, whole (a relative storage.path is the working
        // directory's; run elsewhere, it said the activity was missing).
        let data = dir.path().canonicalize().unwrap().join("data");
        assert!(
            !out.status.success()
                && err.contains(&format!("no store in {}", data.display()))
                && err.contains("`ticketd import` creates"),
            "{args:?}: {err}"
        );
    }
    assert!(!dir.path().join("data").exists(), "a data directory was created");
}

/// `ticketd verify` pointed at a directory with no store (a typo in
/// `storage.path`, the wrong config) says there is none, and leaves the
/// directory as it was. It once made an empty store there and called it
/// "consistent", a green light after an incident for a store never read;
/// where the directory was missing it spoke of permissions.
#[test]
fn verify_with_no_store_says_so_and_creates_nothing() {
    let dir = dir_with(&(base_config() + &open_activity("none", 3, 1)));
    for existing in [false, true] {
        if existing {
            std::fs::create_dir(dir.path().join("data")).unwrap();
        }
        let out = run_cli(dir.path(), &["verify"], None);
        let (stdout, err) = (text(&out.stdout), text(&out.stderr));
        assert!(
            !out.status.success() && err.contains("no store in") && err.contains("storage.path"),
            "data directory existing: {existing}: {stdout}{err}"
        );
        assert!(!stdout.contains("consistent"), "{stdout}");
    }
    let left: Vec<_> = std::fs::read_dir(dir.path().join("data")).unwrap().collect();
    assert!(left.is_empty(), "verify wrote into the directory: {left:?}");
    // A journal whose database was deleted: checked, and the way on said.
    std::fs::create_dir(dir.path().join("data/journal")).unwrap();
    let out = run_cli(dir.path(), &["verify"], None);
    let err = text(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("holds a journal but no ticketd.db (or an empty one): restore ticketd.db"),
        "{err}"
    );
}

/// A cluster node whose Redis cannot be reached at start exits 1 with one
/// sentence naming the service, its address (password hidden) and the
/// setting. Before, `serve` panicked dropping the store's runtime inside its
/// own ("Cannot drop a runtime…", exit 101) and the reason was lost.
#[test]
fn a_cluster_node_that_cannot_reach_redis_says_so_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    // Port 1: nothing listens there (a free port from the tests' range
    // could be another test's Redis by the time the node dials it).
    let closed = 1;
    let storage = format!(
        "[storage]\nmode = \"cluster\"\nredis_url = \"redis://:EXAMPLE-pw@127.0.0.1:{closed}/\"\n\
         mongodb_uri = \"mongodb://127.0.0.1:1/\"\ndatabase = \"x\"\n"
    );
    let config = base_config()
        .replace("[storage]\npath = \"data\"\n", &storage)
        .replace("[server]", "[server]\nnode_id = \"lonely\"");
    assert!(config.contains("mode = \"cluster\""));
    let path = dir.path().join("cluster.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .arg("serve")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let names = format!("Redis at redis://***@127.0.0.1:{closed}/ (storage.redis_url)");
    assert!(stderr.contains(&names), "{stderr}");
    assert!(!stderr.contains("EXAMPLE-pw"), "the password is hidden: {stderr}");
}

/// `ticketd import` beside a serving node wrote the activity's relative
/// times resolved against the tool's own clock over the ones the node
/// resolved against its start, so `report` read a window the node never
/// served (an hour later, its "sold out after" came out negative). A
/// relative time is the serving node's to write; an import leaves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_beside_a_node_leaves_the_window_the_node_serves() {
    use time::{format_description::well_known::Rfc3339, OffsetDateTime};
    let app = TestApp::start(&(base_config() + &open_activity("rt", 5, 1)));
    let detail = app.detail("rt").await;
    let ms = |key: &str| {
        let t = OffsetDateTime::parse(detail[key].as_str().unwrap(), &Rfc3339).unwrap();
        (t.unix_timestamp_nanos() / 1_000_000) as i64
    };
    let served = (ms("startTime"), ms("endTime"));
    let out = app.cli(&["import"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let db = app.sqlite();
    let stored: (i64, i64) = db
        .query_row("SELECT start_ms, end_ms FROM activities WHERE id = 'rt'", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(stored, served);
}

/// The same for the limit and an absolute window: an organiser who edits
/// the file and runs `ticketd import` (for new codes, say) before the
/// reload had `report` print the edited limit, and `verify` hold users to
/// it, while the node still held them to the one it served (from a review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_beside_a_node_leaves_the_limit_and_times_the_node_serves() {
    let start = ticketd::clock::now_ms() - 60_000;
    use ticketd::clock::rfc3339_ms;
    let (from, to) = (rfc3339_ms(start), rfc3339_ms(start + 3_600_000));
    let config = base_config()
        + &Act::new("lt")
            .window(&from, &to)
            .limit(1)
            .ticket("lt-t", "T", Codes::Generate(5))
            .toml();
    let app = TestApp::start(&config);
    let token = app.register("lt-fan").await;
    assert_eq!(app.claim(&token, "lt").await.status, 200);
    let edited = config
        .replace("per_user_limit = 1\n", "per_user_limit = 5\n")
        .replace(&to, &rfc3339_ms(start + 7_200_000));
    assert_ne!(edited, config);
    std::fs::write(app.config_path(), &edited).unwrap();
    let out = app.cli(&["import"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let db = app.sqlite();
    let stored: (i64, i64) = db
        .query_row(
            "SELECT per_user_limit, end_ms FROM activities WHERE id = 'lt'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(stored, (1, start + 3_600_000));
    // Without --out, the report is named for its activity (another's is
    // not overwritten).
    let out = app.cli(&["report", "--activity", "lt"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let html = std::fs::read_to_string(app.dir.path().join("report-lt.html")).unwrap();
    assert!(html.contains("limit 1 per user"), "{html}");
    // The reload applies them; the node writes what it now serves.
    assert_eq!(app.reload(&edited)["message"], "Config reloaded.");
    let limit: i64 = db
        .query_row("SELECT per_user_limit FROM activities WHERE id = 'lt'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(limit, 5);
}

/// `ticketd export` and `report` beside a serving node read SQLite, which
/// the node fills from its journal a batch at a time — for long when SQLite
/// is busy. Claims acknowledged and not yet applied were missing from the
/// export without a word (a cluster's export warned of its backlog). Now
/// both count what the journal holds beyond SQLite and say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_beside_a_node_says_which_claims_are_still_in_its_journal() {
    let app = TestApp::start(&(base_config() + &open_activity("tj", 10, 1)));
    let tokens = app.users("tj", 5).await;
    // Another writer holds SQLite: the node's applier waits.
    let db = app.sqlite();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    for t in &tokens {
        assert_eq!(app.claim(t, "tj").await.status, 200);
    }
    let out = app.cli(&["export", "--activity", "tj"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(parse_csv(&out.stdout).len(), 0, "SQLite has none of them yet");
    let warned = "warning: 5 claims are committed but not yet where this export reads them";
    assert!(text(&out.stderr).contains(warned), "{}", text(&out.stderr));
    let out = app.cli(&["report", "--activity", "tj", "--out", "tj.html"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let html = std::fs::read_to_string(app.dir.path().join("tj.html")).unwrap();
    assert!(html.contains("5 claims were committed but not yet"), "{html}");

    db.execute_batch("COMMIT").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        // (Counted before the rows are read, a warning may overstate.)
        let out = app.cli(&["export", "--activity", "tj"], None);
        if parse_csv(&out.stdout).len() == 5 && !text(&out.stderr).contains("warning") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the journal never reached SQLite");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Configs that `check-config` (and so a start or a reload) took, and a
/// node then misbehaved on, from a review of the organiser's tools:
/// - a `codes_file` saved "UTF-8 with BOM" kept the mark in its first
///   code, so that code was another than the one printed, and slipped past
///   the duplicate check (`DUP1` was sold twice, once with an invisible
///   prefix); invisible characters in a code went through as well;
/// - a `codes_file` caught while being written, whose last code is cut
///   off: the cut-off code went on sale for good;
/// - an argon2 cost without a ceiling (a reload to 4 TiB aborted the
///   node), and a hash queue past what a semaphore holds (a panic at start);
/// - `max_in_flight_per_activity = 0` (every claim 503);
/// - `cluster.refresh_interval = "0s"` (its worker died at its first tick);
/// - a relative start beside an absolute end before it (`serve` refused it);
/// - a name with a control or direction-changing character.
#[test]
fn check_config_refuses_what_a_node_would_misbehave_on() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bom.txt"), "\u{feff}DUP1\nX2\n").unwrap();
    std::fs::write(dir.path().join("half.txt"), "H1\nH2\nK7Q2M9").unwrap();
    let config = base_config()
        .replace("argon2_memory_kib = 8", "argon2_memory_kib = 4294967295")
        .replace("[auth]", "[auth]\nhash_queue = 4611686018427387904")
        + "\n[limits]\nmax_in_flight_per_activity = 0\n"
        + "\n[cluster]\nrefresh_interval = \"0s\"\n"
        + "\n[[activity]]\nid = \"b\"\nname = \"B\\u202Eevil\"\nstart_time = \"-1m\"\nend_time = \"+1h\"\n\
           [[activity.ticket]]\nid = \"from-file\"\nname = \"F\"\ncodes_file = \"bom.txt\"\n\
           [[activity.ticket]]\nid = \"half\"\nname = \"H\\u0007\"\ncodes_file = \"half.txt\"\n\
           [[activity.ticket]]\nid = \"inline\"\nname = \"I\"\ncodes = [\"DUP1\", \"ZW\u{200b}3\"]\n";
    std::fs::write(dir.path().join("config.toml"), &config).unwrap();
    let out = run_cli(dir.path(), &["check-config"], None);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    for says in [
        "code `DUP1` appears twice",
        "contains whitespace, control or invisible characters",
        "half.txt does not end with a line break",
        "auth.argon2_memory_kib must be 8-1048576",
        "auth.hash_queue must be at most",
        "limits.max_in_flight_per_activity must be at least 1",
        "cluster.refresh_interval must be at least 100ms",
        // Names shown raw: a bell in the report's HTML, a name drawn
        // backwards (an exports walkthrough).
        "activity `b`: its name holds U+202E, a control character or a direction override",
        "ticket `half`: its name holds U+0007",
    ] {
        assert!(err.contains(says), "no `{says}` in:\n{err}");
    }

    // Times of two kinds are compared as a node starting now would.
    let mixed = base_config()
        + &Act::new("m")
            .window("+10s", "2020-01-01T00:00:00Z")
            .ticket("m-t", "T", Codes::Generate(1))
            .toml();
    let dir = dir_with(&mixed);
    let out = run_cli(dir.path(), &["check-config"], None);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("activity `m` must end after it starts"),
        "{}",
        text(&out.stderr)
    );
}

/// `user list` reads the accounts a page at a time (a million of them once
/// took the memory of all); across its pages it lists each exactly once,
/// in id order, the last page's included.
#[test]
fn user_list_pages_through_every_account_once() {
    let app = TestApp::start(&(base_config() + &open_activity("pages", 1, 1)));
    let accounts = 2_345;
    let csv: String = (0..accounts).map(|i| format!("fan{i:05},password-{i:05},\n")).collect();
    app.import_user_csv(&csv);
    let out = app.cli(&["user", "list"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let users = parse_csv(&out.stdout);
    let ids: Vec<u64> = users.iter().map(|u| u["id"].parse().unwrap()).collect();
    assert_eq!(ids.len(), accounts);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in id order, none twice");
    let names: std::collections::BTreeSet<&str> = users.iter().map(|u| u["username"].as_str()).collect();
    assert_eq!(names.len(), accounts);
    assert!(names.contains("fan00000") && names.contains("fan02344"));
    // A reader that stops early (`ticketd user list | head`) ends the list
    // quietly, as `cat` would: it said "Broken pipe" and exited 1. The
    // list is more than a pipe holds, so the write meets the closed end.
    assert!(out.stdout.len() > 100_000);
    let mut list = Command::new(BIN)
        .args(["--config", "config.toml", "user", "list"])
        .current_dir(app.dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut head = [0u8; 16];
    std::io::Read::read_exact(list.stdout.as_mut().unwrap(), &mut head).unwrap();
    drop(list.stdout.take());
    let out = list.wait_with_output().unwrap();
    assert!(out.status.success() && out.stderr.is_empty(), "{out:?}");
}

/// `ticketd retire` is a cluster's: an embedded node serves its file's
/// activities, and the refusal says what to do instead.
#[test]
fn retire_on_an_embedded_store_says_to_edit_the_file() {
    let dir = dir_with(&(base_config() + &open_activity("r", 1, 1)));
    let out = run_cli(dir.path(), &["retire", "--activity", "r"], None);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("take `r` out of the file and reload (SIGHUP)"),
        "{}",
        text(&out.stderr)
    );
}

/// The admin token belongs in the node's environment (the unit's env file),
/// which an operator's shell does not have: with `admin.listen` set and no
/// token in the file, every command refused to run ("admin.listen is set
/// but there is no admin token"), `import` and `export` among them, which
/// do not serve. Only `serve` needs the token now; `check-config` notes it.
#[test]
fn tools_run_without_the_admin_token_that_only_serve_needs() {
    let config =
        base_config().replace("[log]", "[admin]\nlisten = \"127.0.0.1:0\"\n\n[log]") + &open_activity("tk", 2, 1);
    let app = TestApp::prepare(&config, &[]);
    for args in [
        &["import"][..],
        &["export", "--activity", "tk", "--out", "-"],
        &["check-config"],
    ] {
        let out = app.cli(args, None);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    }
    let out = app.cli(&["check-config"], None);
    assert!(
        text(&out.stdout).contains("note: admin.listen is set but there is no admin token"),
        "{}",
        text(&out.stdout)
    );
    let err = serve_refused(
        app.dir.path(),
        std::time::Duration::from_secs(30),
        "a node serving an admin listener without a token",
    );
    assert!(
        err.contains("`serve` needs TICKETD_ADMIN_TOKEN in its environment"),
        "{err}"
    );
}

/// A data directory whose ticketd.db is gone but whose journal is there (a
/// file deleted by hand, a restore that brought the journal only): a node
/// started on it replayed the journal into a new, empty store, generated
/// codes afresh and sold the codes of every claim no longer held again, and
/// gave a new fan the user id (and the tickets) of an old one. The node, and
/// every tool that would create the store, now refuse, and create nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_without_its_database_is_never_served() {
    let mut app = TestApp::start(&(base_config() + &open_activity("gone", 5, 1)));
    let token = app.register("gone-fan").await;
    assert_eq!(app.claim(&token, "gone").await.status, 200);
    assert_eq!(app.stop(), 0);
    let data = app.dir.path().join("data");
    for f in ["ticketd.db", "ticketd.db-wal", "ticketd.db-shm"] {
        let _ = std::fs::remove_file(data.join(f));
    }
    assert!(
        std::fs::read_dir(data.join("journal")).unwrap().next().is_some(),
        "no segment left"
    );
    const SAID: &str = "holds a journal but no ticketd.db (or an empty one): restore ticketd.db from a backup";
    let err = crate::common::serve_refused(
        app.dir.path(),
        std::time::Duration::from_secs(30),
        "a node on a journal alone",
    );
    assert!(err.contains(SAID), "{err}");
    let out = app.cli(&["import"], None);
    assert!(
        !out.status.success() && text(&out.stderr).contains(SAID),
        "{}",
        text(&out.stderr)
    );
    assert!(!data.join("ticketd.db").exists(), "a store was created");
    let out = app.cli(&["verify"], None);
    assert!(text(&out.stderr).contains(SAID), "{}", text(&out.stderr));

    // An empty file in its place (a copy that failed, a `touch`) is no
    // store either: SQLite took it for a new one, and the node served it.
    std::fs::write(data.join("ticketd.db"), b"").unwrap();
    let err = crate::common::serve_refused(
        app.dir.path(),
        std::time::Duration::from_secs(30),
        "a node on a journal and an empty database",
    );
    assert!(err.contains(SAID), "{err}");
    let out = app.cli(&["verify"], None);
    assert!(text(&out.stderr).contains(SAID), "{}", text(&out.stderr));
    assert_eq!(std::fs::metadata(data.join("ticketd.db")).unwrap().len(), 0);
}

/// `--out` never lands on the node's own files. A mistyped (or
/// tab-completed) `export --out data/ticketd.db` replaced the store's
/// database with a CSV and said "rows written": every account, code and
/// claim gone, the node unable to start again; `report --out config.toml`
/// replaced the config (an exports walkthrough). Through a link or `..`
/// too, and a codes file. Anything else in the store's directory may be
/// written: it may be the working directory too (a review). And `--out -`
/// is standard output, as the convention goes (it made a file named `-`).
#[test]
fn exports_and_reports_never_replace_the_nodes_own_files() {
    let config = base_config()
        + &Act::new("own")
            .window("-1m", "+1h")
            .ticket("own-t", "T", Codes::File("codes.txt"))
            .toml();
    let dir = dir_with(&config);
    std::fs::write(dir.path().join("codes.txt"), "OWN1\nOWN2\n").unwrap();
    let out = run_cli(dir.path(), &["import"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let kept = ["data/ticketd.db", "config.toml", "codes.txt"].map(|f| std::fs::read(dir.path().join(f)).unwrap());
    std::os::unix::fs::symlink("data/ticketd.db", dir.path().join("link.csv")).unwrap();
    // A journal on a disk of its own, linked in.
    std::fs::create_dir(dir.path().join("fast")).unwrap();
    std::os::unix::fs::symlink("../fast", dir.path().join("data/journal")).unwrap();
    for args in [
        &["export", "--activity", "own", "--out", "data/ticketd.db"][..],
        &["export", "--activity", "own", "--out", "link.csv"],
        &["export", "--activity", "own", "--out", "data/../data/ticketd.db-wal"],
        &["report", "--activity", "own", "--out", "./data/ticketd.lock"],
        &["report", "--activity", "own", "--out", "./config.toml"],
        &["export", "--activity", "own", "--what", "draw", "--out", "config.toml"],
        &["export", "--activity", "own", "--out", "codes.txt"],
        &[
            "export",
            "--activity",
            "own",
            "--out",
            "data/journal/00000000000000000001.journal",
        ],
        &[
            "export",
            "--activity",
            "own",
            "--out",
            "fast/00000000000000000001.journal",
        ],
    ] {
        let out = run_cli(dir.path(), args, None);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("is the node's own") && err.contains("write it elsewhere"),
            "{args:?}: {err}"
        );
    }
    let now = ["data/ticketd.db", "config.toml", "codes.txt"].map(|f| std::fs::read(dir.path().join(f)).unwrap());
    assert!(now == kept, "a node's file changed");
    // Beside them, an export of its own is fine.
    let out = run_cli(
        dir.path(),
        &["export", "--activity", "own", "--out", "data/claims.csv"],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    for args in [
        &["export", "--activity", "own", "--out", "-"][..],
        &["report", "--activity", "own", "--out", "-"],
    ] {
        let out = run_cli(dir.path(), args, None);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        assert!(!out.stdout.is_empty(), "{args:?} wrote nothing to standard output");
    }
    assert!(!dir.path().join("-").exists(), "`--out -` made a file named `-`");
    assert!(text(&run_cli(dir.path(), &["report", "--activity", "own", "--out", "-"], None).stdout).contains("<html"));
}

/// `bench` judges the accounts by the highest limit the node served
/// during its run: it read the limit once, before the rush, and a reload
/// that raised it mid-run read as thousands of violations (a reload
/// walkthrough). The reload comes once the rush has begun, at a rate that
/// leaves it seconds to go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_takes_a_limit_raised_during_its_rush() {
    use std::io::BufRead;
    let act = |limit: u32| {
        Act::new("br")
            .window("-1m", "+1h")
            .limit(limit)
            .ticket("br-t", "T", Codes::Generate(2000))
            .toml()
    };
    let app = TestApp::start(&(base_config() + &act(1)));
    let mut bench = Command::new(BIN)
        .args([
            "bench",
            "--url",
            &app.url(),
            "--json",
            "--activity",
            "br",
            "--users",
            "200",
        ])
        .args([
            "--concurrency",
            "8",
            "--claims-per-user",
            "2",
            "--rate",
            "100",
            "--create-users",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = std::io::BufReader::new(bench.stderr.take().unwrap()).lines();
    let rushing = said.by_ref().map(Result::unwrap).find(|l| l.contains("bench: rushing"));
    assert!(rushing.is_some(), "bench never rushed: {:?}", bench.wait_with_output());
    let outcome = app.reload(&(base_config() + &act(2)));
    assert_eq!(outcome["message"], "Config reloaded.", "{outcome}");
    let rest: Vec<String> = said.map(Result::unwrap).collect();
    let out = bench.wait_with_output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(out.status.success(), "{report}\n{}", rest.join("\n"));
    assert_eq!(report["violations"], serde_json::json!([]), "{report}");
    // The raise came while it rushed: accounts took a second code.
    assert!(report["acknowledged"].as_u64().unwrap() > 200, "{report}");
}

/// `export` and `report` read the store with a config that has problems,
/// and say so: they need its `[storage]` alone. Mid-sale, with an edit the
/// node refused (here a ticket type without a name), the organiser could
/// not export until the file was fixed (an exports walkthrough). A tool
/// that writes still refuses it.
#[test]
fn export_and_report_read_the_store_with_a_config_that_has_problems() {
    let config = base_config() + &open_activity("bad", 2, 1);
    let dir = dir_with(&config);
    assert!(run_cli(dir.path(), &["import"], None).status.success());
    let broken = config.replace("name = \"Ticket bad\"", "name = \"\"");
    assert_ne!(broken, config);
    std::fs::write(dir.path().join("config.toml"), &broken).unwrap();
    for args in [
        &["export", "--activity", "bad"][..],
        &["report", "--activity", "bad", "--out", "-"],
    ] {
        let out = run_cli(dir.path(), args, None);
        let err = text(&out.stderr);
        assert!(out.status.success(), "{args:?}: {err}");
        assert!(
            err.contains("has 1 problem (`ticketd check-config` lists them)"),
            "{args:?}: {err}"
        );
    }
    let out = run_cli(dir.path(), &["import"], None);
    assert!(
        !out.status.success() && text(&out.stderr).contains("needs a name"),
        "{}",
        text(&out.stderr)
    );
}
