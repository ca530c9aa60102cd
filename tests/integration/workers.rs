//! Background workers: every one shows its state in `/metrics` while the
//! node runs, and SIGTERM stops them one by one in the declared order
//! (`ticketd::app::STOP_ORDER`), each logging "Worker stopped.".

use serde_json::Value;
use ticketd::app::STOP_ORDER;

use crate::{
    cluster::{cluster_activity, Cluster},
    common::{base_config, open_activity, TestApp},
};

/// The `worker` field of every "Worker stopped." line, in log order.
fn stopped_in_order(app: &TestApp) -> Vec<String> {
    app.logs_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "Worker stopped.")
        .map(|v| v["worker"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The value of a `/metrics` series line, if present.
fn series(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

/// Checks `/metrics` says each of `workers` is up, and after SIGTERM that
/// they all stopped, in the declared order.
async fn workers_run_then_stop_in_order(mut app: TestApp, workers: &[&str]) {
    let metrics = app.raw_get("/metrics").await;
    for w in workers {
        let up = format!("ticketd_worker_up{{worker=\"{w}\",state=\"running\"}}");
        assert_eq!(series(&metrics, &up), Some(1.0), "{w} is not up:\n{metrics}");
        let iterations = format!("ticketd_worker_iterations_total{{worker=\"{w}\"}}");
        assert!(
            series(&metrics, &iterations).is_some(),
            "{w} reports no iterations:\n{metrics}"
        );
    }
    assert_eq!(app.stop(), 0, "{}", app.logs_text());
    let stopped = stopped_in_order(&app);
    let expected: Vec<&str> = STOP_ORDER
        .iter()
        .copied()
        .filter(|w| stopped.iter().any(|s| s == w))
        .collect();
    assert_eq!(
        stopped, expected,
        "workers stopped out of the declared order (or twice)"
    );
    for w in workers {
        assert!(stopped.iter().any(|s| s == w), "{w} logged no stop: {stopped:?}");
    }
    // What the declared order is for, written out here so that a wrong
    // reorder of it fails: what feeds the store stops before what drains
    // it, and the signal handler last.
    let at = |w: &str| stopped.iter().position(|s| s == w);
    for (first, then) in [
        ("admitter", "journal-writer"),
        ("stats-flush", "journal-writer"),
        ("stats-flush", "committer"),
        ("journal-writer", "store-applier"),
        ("committer", "lease-loop"),
        // A reap after the final release registered the node live again.
        ("reaper", "lease-loop"),
        ("committer", "mongo-writer"),
        ("store-applier", "access-log"),
        ("mongo-writer", "access-log"),
    ] {
        if let (Some(a), Some(b)) = (at(first), at(then)) {
            assert!(a < b, "{first} stopped after {then}: {stopped:?}");
        }
    }
    assert_eq!(stopped.last().map(String::as_str), Some("signals"), "{stopped:?}");
    assert!(app.logs_text().contains("Shutdown complete."));
}

#[tokio::test]
async fn embedded_workers_show_in_metrics_and_stop_in_the_declared_order() {
    let config = base_config().replace("[log]\n", "[log]\naccess_log = \"access.log\"\n") + &open_activity("w", 10, 1);
    let app = TestApp::start(&config);
    let token = app.register("worker-fan").await;
    let claimed = app.claim(&token, "w").await;
    assert_eq!(claimed.status, 200, "{:?}", claimed.body);
    let metrics = app.raw_get("/metrics").await;
    let writes = series(&metrics, "ticketd_worker_iterations_total{worker=\"journal-writer\"}").unwrap();
    assert!(writes >= 1.0, "the journal writer counted no batch:\n{metrics}");
    workers_run_then_stop_in_order(
        app,
        &[
            "signals",
            "journal-writer",
            "store-applier",
            "access-log",
            "reloader",
            "guard-sweep",
            "stats-flush",
        ],
    )
    .await;
}

#[tokio::test]
async fn cluster_workers_show_in_metrics_and_stop_in_the_declared_order() {
    let mut cluster = Cluster::start(1, &cluster_activity("cw", 20, 1), "");
    let app = cluster.nodes.remove(0);
    workers_run_then_stop_in_order(
        app,
        &[
            "signals",
            "committer",
            "mongo-writer",
            "reaper",
            "redis-durability",
            "lease-loop",
            "refresher",
            "reloader",
            "guard-sweep",
            "stats-flush",
        ],
    )
    .await;
}
