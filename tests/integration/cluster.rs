//! Cluster mode: several real ticketd nodes sharing one real Redis and one
//! real MongoDB-wire server (SecantusDB), on loopback.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::future::join_all;
use mongodb::bson::{doc, Document};
use ticketd::{
    bench::ApiClient,
    clock::{now_ms, rfc3339_ms},
};

use crate::common::{
    assert_error, assert_replayed, assert_sold_out_is_final, base_config, claim_body, claim_keyed, claim_settled,
    metric, outcome_key, services::Services, until, AnswerLog, TestApp,
};

/// A node's config: the shared services, its own id, cheap leases.
pub fn node_config(s: &Services, db: &str, node: &str, extra: &str) -> String {
    base_config()
        .replace("[server]\n", &format!("[server]\nnode_id = \"{node}\"\n"))
        .replace(
            "[storage]\npath = \"data\"\n",
            &format!(
                "[storage]\npath = \"data\"\nmode = \"cluster\"\nredis_url = \"{}\"\nmongodb_uri = \"{}\"\ndatabase = \"{db}\"\n",
                s.redis_url(),
                s.mongo_uri()
            ),
        )
        + extra
}

/// An activity open now (absolute times, as cluster mode requires).
pub fn cluster_activity(id: &str, codes: u32, limit: u32) -> String {
    let (start, end) = (rfc3339_ms(now_ms() - 60_000), rfc3339_ms(now_ms() + 3_600_000));
    crate::common::activity(id, codes, limit, &start, &end)
}

/// Services plus `n` nodes; the activity is imported once, by node 0's CLI.
pub struct Cluster {
    pub services: Services,
    pub db: String,
    pub nodes: Vec<TestApp>,
}

impl Drop for Cluster {
    /// A failed cluster test shows what each node logged last.
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (i, node) in self.nodes.iter().enumerate() {
                let logs = node.logs.lock().map(|l| l.clone()).unwrap_or_default();
                let tail = &logs[logs.len().saturating_sub(40)..];
                eprintln!("--- node{i}, last {} log lines ---\n{}", tail.len(), tail.join("\n"));
            }
        }
    }
}

impl Cluster {
    pub fn start(n: usize, activity: &str, extra: &str) -> Cluster {
        Cluster::start_configured(n, activity, extra, |c| c)
    }

    /// Like [`Cluster::start`], with the nodes sharing a Redis Cluster of
    /// three masters instead of one Redis.
    pub fn start_on_redis_cluster(n: usize, activity: &str, extra: &str) -> Cluster {
        Cluster::start_on(Services::start_with_redis_cluster(), n, activity, extra, |c| c)
    }

    /// Like [`Cluster::start`], passing each node's config through `tweak`.
    pub fn start_configured(n: usize, activity: &str, extra: &str, tweak: impl Fn(String) -> String) -> Cluster {
        Cluster::start_on(Services::start(), n, activity, extra, tweak)
    }

    /// Like [`Cluster::start_configured`], on `services` already started.
    pub fn start_on(
        services: Services,
        n: usize,
        activity: &str,
        extra: &str,
        tweak: impl Fn(String) -> String,
    ) -> Cluster {
        let db = "ticketd_test".to_owned();
        let mut nodes = Vec::new();
        for i in 0..n {
            let config = tweak(node_config(&services, &db, &format!("node{i}"), extra) + activity);
            let mut node = TestApp::prepare(&config, &[]);
            if i == 0 {
                let out = node.cli(&["import"], None);
                assert!(out.status.success(), "import: {}", String::from_utf8_lossy(&out.stderr));
            }
            node.boot();
            nodes.push(node);
        }
        Cluster { services, db, nodes }
    }

    pub fn clients(&self) -> Vec<Arc<ApiClient>> {
        self.nodes.iter().map(|n| n.client_clone()).collect()
    }

    /// Imports `n` users through the first running node and logs them in
    /// through every running node in turn (sessions are valid on every node).
    pub async fn users(&self, prefix: &str, n: usize) -> Vec<String> {
        let live: Vec<&TestApp> = self.nodes.iter().filter(|n| n.running()).collect();
        live[0].import_users(prefix, n);
        let urls: Vec<String> = live.iter().map(|n| n.url()).collect();
        crate::common::log_in(&urls, &live[0].logs, prefix, n).await
    }

    pub async fn mongo(&self) -> mongodb::Database {
        self.services.mongo(&self.db).await
    }

    /// Every claim MongoDB holds for `act`: code -> user id.
    pub async fn mongo_claims(&self, act: &str) -> HashMap<String, i64> {
        use futures::TryStreamExt;
        let db = self.mongo().await;
        let docs: Vec<Document> = db
            .collection::<Document>("claims")
            .find(doc! {"activity_id": act})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let mut out = HashMap::new();
        for d in docs {
            let code = d.get_str("code").unwrap().to_owned();
            assert_eq!(d.get_str("_id").unwrap(), code);
            assert!(out.insert(code, d.get_i64("user_id").unwrap()).is_none());
        }
        out
    }

    /// Claims Redis has committed for `act`.
    pub async fn redis_claimed(&self, act: &str) -> usize {
        let mut r = self.services.redis().await;
        redis::cmd("HLEN")
            .arg(format!("tk:{{{act}}}:claimed"))
            .query_async(&mut r)
            .await
            .unwrap()
    }

    /// Waits until MongoDB holds every claim Redis committed (the backlogs
    /// drained), then returns them.
    pub async fn drained(&self, act: &str) -> HashMap<String, i64> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let committed = self.redis_claimed(act).await;
            let stored = self.mongo_claims(act).await;
            if stored.len() == committed {
                return stored;
            }
            assert!(
                Instant::now() < deadline,
                "MongoDB has {} of the {committed} committed claims after 90 s",
                stored.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The rush: user `i` sends `per_user` concurrent claims, the `k`th to node
/// `(i + k) % nodes` — so each user hits several nodes at once. Returns
/// the codes acknowledged per user and every answer by status and code
/// (`transport` when a node was not there to answer).
pub async fn rush(
    clients: &[Arc<ApiClient>],
    act: &str,
    tokens: &[String],
    per_user: usize,
    parallel: usize,
) -> (Vec<Vec<String>>, HashMap<String, usize>) {
    let log = AnswerLog::default();
    let result = rush_logged(clients, act, tokens, per_user, parallel, log.clone()).await;
    // (A rush that did not sell out has no sell-out to check: the tests
    // that expect one say so of the outcomes.)
    let _sold_out = assert_sold_out_is_final(&log.lock().unwrap());
    result
}

/// [`rush`] with every answer (STOCK_IN_FLIGHT retries included) logged in
/// `log`, and no check of it. The outcomes count every answer, retried
/// ones included.
async fn rush_logged(
    clients: &[Arc<ApiClient>],
    act: &str,
    tokens: &[String],
    per_user: usize,
    parallel: usize,
    log: AnswerLog,
) -> (Vec<Vec<String>>, HashMap<String, usize>) {
    let sem = Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut tasks = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let clients: Vec<Arc<ApiClient>> = (0..per_user)
            .map(|k| clients[(i + k) % clients.len()].clone())
            .collect();
        let (sem, token, act, log) = (sem.clone(), token.clone(), act.to_owned(), log.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.unwrap();
            let mut body = None;
            for c in &clients {
                if let Ok(detail) = c.get(&format!("/act/detail?actId={act}"), Some(&token)).await {
                    if let Some(t) = detail.data()["claimToken"].as_str() {
                        body = Some(serde_json::json!({"actId": act, "claimToken": t}));
                        break;
                    }
                }
            }
            // A user no node gave a claim token sends nothing: said, not
            // skipped (a test counting refusals would count none).
            let body = body.unwrap_or_else(|| panic!("no node gave user {i} a claim token for {act}"));
            let claims = clients.iter().map(|c| claim_settled(c, &token, &body, &log));
            join_all(claims).await
        }));
    }
    let mut acked = vec![Vec::new(); tokens.len()];
    let mut outcomes: HashMap<String, usize> = HashMap::new();
    for (i, t) in tasks.into_iter().enumerate() {
        for (a, earlier) in t.await.unwrap() {
            for k in earlier {
                *outcomes.entry(k).or_default() += 1;
            }
            let key = outcome_key(&a);
            match a {
                Ok(a) if a.status == 200 => acked[i].push(a.data()["code"].as_str().unwrap().to_owned()),
                Err(e) => eprintln!("transport error: {e:#}"),
                Ok(_) => {}
            }
            *outcomes.entry(key).or_default() += 1;
        }
    }
    (acked, outcomes)
}

/// No code twice, no user over `limit`, every acknowledged claim in MongoDB
/// under its user, nothing beyond `codes`.
fn assert_invariants(
    acked: &[Vec<String>],
    user_ids: &[i64],
    stored: &HashMap<String, i64>,
    limit: usize,
    codes: usize,
) {
    let all: Vec<&String> = acked.iter().flatten().collect();
    let distinct: HashSet<&String> = all.iter().copied().collect();
    assert_eq!(all.len(), distinct.len(), "a code was acknowledged twice");
    assert!(
        acked.iter().all(|c| c.len() <= limit),
        "a user was acknowledged more than the limit"
    );
    assert!(
        stored.len() <= codes,
        "{} claims stored for {codes} codes",
        stored.len()
    );
    for (i, mine) in acked.iter().enumerate() {
        for code in mine {
            assert_eq!(
                stored.get(code),
                Some(&user_ids[i]),
                "acknowledged code {code} is not in MongoDB under its user"
            );
        }
    }
    let mut per_user: HashMap<i64, usize> = HashMap::new();
    for u in stored.values() {
        *per_user.entry(*u).or_default() += 1;
    }
    assert!(
        per_user.values().all(|&n| n <= limit),
        "MongoDB holds a user over the limit"
    );
}

/// Logs `n` users in through node 0 (sessions are valid on every node).
async fn users(cluster: &Cluster, prefix: &str, n: usize) -> (Vec<String>, Vec<i64>) {
    let tokens = cluster.users(prefix, n).await;
    use futures::TryStreamExt;
    let all: Vec<Document> = cluster
        .mongo()
        .await
        .collection::<Document>("users")
        .find(doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let by_name: HashMap<&str, i64> = all
        .iter()
        .map(|u| (u.get_str("username").unwrap(), u.get_i64("_id").unwrap()))
        .collect();
    let ids = (0..n)
        .map(|i| by_name[crate::common::username(prefix, i).as_str()])
        .collect();
    (tokens, ids)
}

async fn scard(cluster: &Cluster, key: &str) -> usize {
    cluster.services.query(redis::cmd("SCARD").arg(key)).await
}

async fn llen(cluster: &Cluster, key: &str) -> usize {
    cluster.services.query(redis::cmd("LLEN").arg(key)).await
}

/// Asserts that the lease set `lease` is empty and all `codes` of its
/// ticket type are on the master list `stock` again.
async fn assert_lease_returned(cluster: &Cluster, lease: &str, stock: &str, codes: usize) {
    assert_eq!(scard(cluster, lease).await, 0, "codes stayed in {lease}");
    assert_eq!(llen(cluster, stock).await, codes, "not every code is back on {stock}");
}

fn merge(
    into: &mut (Vec<Vec<String>>, HashMap<String, usize>),
    offset: usize,
    wave: (Vec<Vec<String>>, HashMap<String, usize>),
) {
    for (i, codes) in wave.0.into_iter().enumerate() {
        into.0[offset + i].extend(codes);
    }
    for (k, v) in wave.1 {
        *into.1.entry(k).or_default() += v;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_ten_thousand_users_two_nodes_each_sell_exactly_the_stock() {
    let cluster = Cluster::start(3, &cluster_activity("big", 2000, 1), "");
    three_node_rush(&cluster, 10_000, 2000).await;
}

/// Issue 12, item 6: the same rush with the nodes on a real Redis Cluster
/// of three masters (a smaller one: the point is the routing, which the
/// first claim already exercises). Before, the first command for a key on
/// another master got `MOVED` and the nodes could not even register.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_sell_exactly_the_stock_on_a_redis_cluster() {
    let cluster = Cluster::start_on_redis_cluster(3, &cluster_activity("big", 600, 1), "");
    // Keys live on more than one master: the activity's under its hash
    // tag, the global ones (claim id blocks, user ids, node ids) elsewhere.
    three_node_rush(&cluster, 3000, 600).await;
    let mut holding = 0;
    for url in &cluster.services.redis_cluster_urls() {
        let mut r = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let keys: usize = redis::cmd("DBSIZE").query_async(&mut r).await.unwrap();
        holding += usize::from(keys > 0);
    }
    assert!(
        holding >= 2,
        "every key landed on one master; the cluster was not exercised"
    );
}

/// `n` users, two claims each through two of the three nodes, for `codes`
/// codes, one per user: exactly the stock is sold, every node sells some.
async fn three_node_rush(cluster: &Cluster, n: usize, codes: usize) {
    let (tokens, ids) = users(cluster, "c", n).await;

    let (acked, outcomes) = rush(&cluster.clients(), "big", &tokens, 2, 300).await;

    let successes: usize = acked.iter().map(Vec::len).sum();
    assert_eq!(successes, codes, "outcomes: {outcomes:?}");
    assert!(
        outcomes.contains_key("410 SOLD_OUT"),
        "the sell-out was never said: {outcomes:?}"
    );
    for k in outcomes.keys().filter(|k| *k != "success") {
        assert!(
            k == "410 SOLD_OUT" || k == "409 LIMIT_REACHED" || k == "503 STOCK_IN_FLIGHT",
            "unexpected outcome {k}: {outcomes:?}"
        );
    }
    let stored = cluster.drained("big").await;
    assert_eq!(stored.len(), codes);
    assert_invariants(&acked, &ids, &stored, 1, codes);
    // Every node reports the cluster-wide numbers.
    for node in &cluster.nodes {
        let d = node.detail("big").await;
        assert_eq!(
            (d["claimed"].as_u64(), d["remaining"].as_u64()),
            (Some(codes as u64), Some(0)),
            "{d}"
        );
    }
    // And every node sold a share: the stock was leased, not owned by one.
    let nodes: HashSet<String> = {
        let db = cluster.mongo().await;
        use futures::TryStreamExt;
        let docs: Vec<Document> = db
            .collection::<Document>("claims")
            .find(doc! {})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        docs.iter().map(|d| d.get_str("node").unwrap().to_owned()).collect()
    };
    assert_eq!(nodes.len(), 3, "{nodes:?}");
}

/// A node killed mid-rush: nothing acknowledged is lost, the codes it had
/// leased are reclaimed and sold by the others — and SOLD_OUT is final:
/// while the dead node's lease still holds codes, a claim that finds no code
/// hears the retryable STOCK_IN_FLIGHT, never a 410 that a later claim
/// would contradict (it did: ~600 SOLD_OUTs per run, then successes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_rush_loses_nothing_and_its_leased_codes_are_sold_by_the_others() {
    let cluster = Cluster::start(3, &cluster_activity("k9", 1000, 1), "[cluster]\nlease_ttl = \"2s\"\n");
    node_killed_mid_rush(cluster).await;
}

/// The kill -9 test with the nodes on a Redis Cluster of three masters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_rush_on_a_redis_cluster_loses_nothing() {
    let cluster =
        Cluster::start_on_redis_cluster(3, &cluster_activity("k9", 1000, 1), "[cluster]\nlease_ttl = \"2s\"\n");
    node_killed_mid_rush(cluster).await;
}

async fn node_killed_mid_rush(mut cluster: Cluster) {
    let (tokens, ids) = users(&cluster, "k", 2000).await;
    let mut all = (vec![Vec::new(); tokens.len()], HashMap::new());
    let log = AnswerLog::default();

    // Wave 1 over all three nodes; node2 is killed once it has sold some.
    let wave = tokio::spawn(rush_owned(
        cluster.clients(),
        "k9",
        tokens[..800].to_vec(),
        2,
        40,
        log.clone(),
    ));
    let success = "ticketd_claims_total{outcome=\"success\"}";
    until("node2 to sell", || async {
        metric(&cluster.nodes[2], success).await >= 30.0
    })
    .await;
    cluster.nodes[2].kill9();
    let lease_of_node2 = "tk:{k9}:lease:k9-t:node2";
    let held_by_dead = scard(&cluster, lease_of_node2).await;
    assert!(held_by_dead > 0, "node2 held no leased codes when it died");

    // Wave 2 at once on the two live nodes, while node2's lease still holds
    // codes: they sell what they can reach, and then are told to wait, not
    // that it is over, until a live node reclaims node2's codes (after the
    // lease TTL) and sells them too.
    let live = cluster.clients()[..2].to_vec();
    let second = rush_logged(&live, "k9", &tokens[800..], 2, 40, log.clone()).await;
    merge(&mut all, 0, wave.await.unwrap());
    merge(&mut all, 800, second);
    assert!(all.1.get("transport").copied().unwrap_or(0) > 0, "{:?}", all.1);
    let log = log.lock().unwrap().clone();
    let sold_out = assert_sold_out_is_final(&log);
    assert!(sold_out > 0, "the sale never said it sold out: {:?}", all.1);
    // The scenario happened: claims found no code while node2's lease still
    // held some, and were told to wait; and the end was said.
    assert!(
        log.iter().any(|a| a.outcome == "503 STOCK_IN_FLIGHT"),
        "no claim met the dead node's lease: {:?}",
        all.1
    );
    assert!(log.iter().any(|a| a.outcome == "410 SOLD_OUT"), "{:?}", all.1);
    let in_flight = log.iter().filter(|a| a.outcome == "503 STOCK_IN_FLIGHT").count();
    eprintln!(
        "answers: {}, STOCK_IN_FLIGHT: {in_flight}, final: {:?}",
        log.len(),
        all.1
    );

    assert!(
        metric(&cluster.nodes[0], "ticketd_leases_reaped_total").await
            + metric(&cluster.nodes[1], "ticketd_leases_reaped_total").await
            >= 1.0,
        "node2's lease was never reclaimed"
    );
    assert_eq!(scard(&cluster, lease_of_node2).await, 0);
    let stored = cluster.drained("k9").await;
    assert_eq!(stored.len(), 1000, "outcomes: {:?}", all.1);
    assert_invariants(&all.0, &ids, &stored, 1, 1000);
    cluster.nodes[0].assert_verified();
    for k in all.1.keys() {
        assert!(
            [
                "success",
                "transport",
                "410 SOLD_OUT",
                "409 LIMIT_REACHED",
                "503 STOCK_IN_FLIGHT"
            ]
            .contains(&k.as_str()),
            "unexpected outcome {k}: {:?}",
            all.1
        );
    }

    // The killed node comes back and agrees.
    cluster.nodes[2].boot();
    let d = cluster.nodes[2].detail("k9").await;
    assert_eq!(
        (d["claimed"].as_u64(), d["remaining"].as_u64()),
        (Some(1000), Some(0)),
        "{d}"
    );
}

/// [`rush_logged`] with owned arguments, for spawning.
async fn rush_owned(
    clients: Vec<Arc<ApiClient>>,
    act: &'static str,
    tokens: Vec<String>,
    per_user: usize,
    parallel: usize,
    log: AnswerLog,
) -> (Vec<Vec<String>>, HashMap<String, usize>) {
    rush_logged(&clients, act, &tokens, per_user, parallel, log).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_mid_rush_fails_fast_then_recovers_without_double_allocation() {
    redis_outage_mid_rush("rr", libc::SIGTERM).await;
}

/// Issue 12, item 5: the same with `kill -9` of Redis (no clean AOF flush):
/// with `appendfsync always`, nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_9_mid_rush_loses_no_acknowledged_claim() {
    redis_outage_mid_rush("rk", libc::SIGKILL).await;
}

/// A rush during which Redis is stopped with `signal`, refused while down,
/// restarted: every acknowledged claim is in MongoDB, none twice.
async fn redis_outage_mid_rush(act: &'static str, signal: i32) {
    let mut cluster = Cluster::start(2, &cluster_activity(act, 600, 1), "");
    let (tokens, ids) = users(&cluster, act, 1500).await;
    let mut all = (vec![Vec::new(); tokens.len()], HashMap::new());

    let log = AnswerLog::default();
    let wave = tokio::spawn(rush_owned(
        cluster.clients(),
        act,
        tokens[..600].to_vec(),
        2,
        20,
        log.clone(),
    ));
    until("some claims", || async { cluster.redis_claimed(act).await >= 100 }).await;
    cluster.services.signal_redis(signal);
    // Once a node knows Redis is down, its claims are refused at once with a
    // clear code. (Before it knows — until a command of its own fails — a
    // node whose pool is empty may still say STOCK_IN_FLIGHT: nothing told
    // it otherwise yet.)
    for node in &cluster.nodes {
        until("the node to notice Redis is gone", || async {
            metric(node, "ticketd_redis_up").await == 0.0
        })
        .await;
    }
    let down = rush(&cluster.clients(), act, &tokens[600..650], 1, 10).await;
    assert_eq!(down.0.iter().map(Vec::len).sum::<usize>(), 0, "{:?}", down.1);
    assert_eq!(
        down.1.values().sum::<usize>(),
        50,
        "every claim answered once: {:?}",
        down.1
    );
    // (A claim whose command was on the wire when Redis went is in doubt.)
    assert!(
        down.1
            .keys()
            .all(|k| k == "503 STORE_UNAVAILABLE" || k == "503 OUTCOME_UNKNOWN"),
        "while Redis is down: {:?}",
        down.1
    );
    merge(&mut all, 600, down);
    cluster.services.restart_redis();
    merge(&mut all, 0, wave.await.unwrap());
    until("the nodes to see Redis again", || async {
        metric(&cluster.nodes[0], "ticketd_redis_up").await == 1.0
            && metric(&cluster.nodes[1], "ticketd_redis_up").await == 1.0
    })
    .await;

    let wave = rush(&cluster.clients(), act, &tokens[650..], 2, 20).await;
    merge(&mut all, 650, wave);
    let stored = cluster.drained(act).await;
    assert_eq!(stored.len(), 600, "outcomes: {:?}", all.1);
    assert_invariants(&all.0, &ids, &stored, 1, 600);
    cluster.nodes[0].assert_verified();
}

/// Redis frozen (SIGSTOP) for two seconds mid-rush: the nodes' calls time
/// out, and Redis runs them when thawed — a lease whose answer the node
/// never got puts codes in its lease set that its pool does not know.
/// Without resynchronising they would sit there renewed forever, and the
/// last buyers would hear STOCK_IN_FLIGHT without end; with it, every code
/// is sold and `verify` finds the stock consistent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_frozen_mid_rush_strands_no_code() {
    frozen_mid_rush(Cluster::start(2, &cluster_activity("fz", 600, 1), "")).await;
}

/// The same on a Redis Cluster, whose client re-sends a call that timed
/// out (redis-rs retries an I/O timeout at once). A lease sent twice runs
/// twice when Redis is thawed; were the node then told the second run's
/// codes only, the first run's would sit in its lease for good. The whole
/// call is bounded by the same timeout as one attempt (the client's
/// default, kept in `connection.rs`), so the node hears the failure and
/// resynchronises its lease, whatever ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_frozen_mid_rush_strands_no_code() {
    frozen_mid_rush(Cluster::start_on_redis_cluster(2, &cluster_activity("fz", 600, 1), "")).await;
}

async fn frozen_mid_rush(cluster: Cluster) {
    let (tokens, ids) = users(&cluster, "fz", 1500).await;
    let mut all = (vec![Vec::new(); tokens.len()], HashMap::new());
    let log = AnswerLog::default();
    let wave = tokio::spawn(rush_owned(
        cluster.clients(),
        "fz",
        tokens[..700].to_vec(),
        2,
        20,
        log.clone(),
    ));
    until("some claims", || async { cluster.redis_claimed("fz").await >= 100 }).await;
    let lease_errors = "ticketd_worker_errors_total{worker=\"lease-loop\"}";
    let errors_before = metric(&cluster.nodes[0], lease_errors).await + metric(&cluster.nodes[1], lease_errors).await;
    cluster.services.freeze_redis();
    // The fault lasts two seconds: longer than every Redis call's timeout.
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.services.thaw_redis();
    // It hit: the nodes' lease calls failed meanwhile.
    let errors_after = metric(&cluster.nodes[0], lease_errors).await + metric(&cluster.nodes[1], lease_errors).await;
    assert!(
        errors_after > errors_before,
        "no lease call failed while Redis was frozen"
    );
    merge(&mut all, 0, wave.await.unwrap());
    let wave = rush_logged(&cluster.clients(), "fz", &tokens[700..], 2, 20, log.clone()).await;
    merge(&mut all, 700, wave);
    let sold_out = assert_sold_out_is_final(&log.lock().unwrap());
    assert!(sold_out > 0, "the sale never said it sold out: {:?}", all.1);
    let stored = cluster.drained("fz").await;
    assert_eq!(stored.len(), 600, "outcomes: {:?}", all.1);
    assert_invariants(&all.0, &ids, &stored, 1, 600);
    cluster.nodes[0].assert_verified();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_down_for_ten_seconds_claims_continue_from_the_backlog_and_drain_later() {
    let mut cluster = Cluster::start(2, &cluster_activity("md", 600, 1), "");
    let (tokens, ids) = users(&cluster, "md", 1200).await;
    let mut all = (vec![Vec::new(); tokens.len()], HashMap::new());

    merge(&mut all, 0, rush(&cluster.clients(), "md", &tokens[..200], 2, 20).await);
    cluster.services.stop_mongo();
    let stopped = Instant::now();
    let during = rush(&cluster.clients(), "md", &tokens[200..500], 2, 20).await;
    let sold_during: usize = during.0.iter().map(Vec::len).sum();
    merge(&mut all, 200, during);
    assert!(
        sold_during > 0,
        "no claim succeeded while MongoDB was down: {:?}",
        all.1
    );
    let backlog = metric(&cluster.nodes[0], "ticketd_mongo_backlog").await
        + metric(&cluster.nodes[1], "ticketd_mongo_backlog").await;
    assert!(
        backlog > 0.0,
        "claims acknowledged while MongoDB is down must wait in the backlog"
    );
    // The outage lasts ten seconds, as the scenario says.
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(stopped.elapsed())).await;
    cluster.services.restart_mongo();

    merge(
        &mut all,
        500,
        rush(&cluster.clients(), "md", &tokens[500..], 2, 20).await,
    );
    let stored = cluster.drained("md").await;
    assert_eq!(stored.len(), 600, "outcomes: {:?}", all.1);
    assert_invariants(&all.0, &ids, &stored, 1, 600);
    cluster.nodes[0].assert_verified();
    until("the backlogs to empty", || async {
        metric(&cluster.nodes[0], "ticketd_mongo_backlog").await == 0.0
            && metric(&cluster.nodes[1], "ticketd_mongo_backlog").await == 0.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_returns_the_nodes_leased_codes_at_once_and_exits_zero() {
    let mut cluster = Cluster::start(2, &cluster_activity("st", 300, 1), "");
    let (tokens, _) = users(&cluster, "st", 40).await;
    rush(&cluster.clients(), "st", &tokens, 1, 10).await;
    let lease = "tk:{st}:lease:st-t:node1";
    assert!(scard(&cluster, lease).await > 0, "node1 leased nothing");
    assert_eq!(cluster.nodes[1].stop(), 0);
    assert_eq!(scard(&cluster, lease).await, 0, "node1 kept its lease after SIGTERM");
    let returned = cluster.nodes[1].wait_for_log("Leased codes returned to the master lists.", 1);
    assert!(returned["codes"].as_u64().unwrap() > 0, "{returned}");
    // Every code is accounted for: on the master list, leased to node0, or
    // claimed. Read in one transaction: node0 goes on leasing ahead, and
    // three reads apart counted the codes a lease moved between them twice
    // (327 of 300, once, on a loaded box).
    let mut r = cluster.services.redis().await;
    let (listed, node0, claimed): (usize, usize, usize) = redis::pipe()
        .atomic()
        .cmd("LLEN")
        .arg("tk:{st}:stock:st-t")
        .cmd("SCARD")
        .arg("tk:{st}:lease:st-t:node0")
        .cmd("HLEN")
        .arg("tk:{st}:claimed")
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(listed + node0 + claimed, 300);
    // The remaining node sells them without waiting for any lease to expire.
    let (more, _) = users(&cluster, "st2", 300).await;
    let (acked, outcomes) = rush(&cluster.clients()[..1], "st", &more, 1, 20).await;
    let sold = acked.iter().map(Vec::len).sum::<usize>() + 40;
    assert_eq!(sold, 300, "{outcomes:?}");
    cluster.drained("st").await;
    cluster.nodes[0].assert_verified();
}

/// A reload that drops one ticket type of an activity still on sale: the
/// codes of it the node had leased go back to the master list when the node
/// stops. Before, the node's list of the activity's ticket types lost it,
/// and no stop, heartbeat or reaper ever returned them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_type_dropped_by_a_reload_gives_its_leased_codes_back_at_the_stop() {
    let act = cluster_activity("dt", 50, 1) + "[[activity.ticket]]\nid = \"dt-b\"\nname = \"Balcony\"\ngenerate = 50\n";
    let mut cluster = Cluster::start(1, &act, "");
    let lease = "tk:{dt}:lease:dt-b:node0";
    until("node0 to lease codes of both ticket types", || async {
        scard(&cluster, lease).await > 0 && scard(&cluster, "tk:{dt}:lease:dt-t:node0").await > 0
    })
    .await;
    let config = std::fs::read_to_string(cluster.nodes[0].config_path()).unwrap();
    let dropped = config.replace(
        "[[activity.ticket]]\nid = \"dt-b\"\nname = \"Balcony\"\ngenerate = 50\n",
        "",
    );
    assert_ne!(config, dropped);
    let outcome = cluster.nodes[0].reload(&dropped);
    assert_eq!(outcome["message"], "Config reloaded.", "{outcome}");
    // A file left with no `[[activity]]` at all: a node started so serves
    // MongoDB's activities; this one served none, and said it reloaded.
    let none = &dropped[..dropped.find("[[activity]]").unwrap()];
    let outcome = cluster.nodes[0].reload(none);
    assert!(
        outcome["reason"]
            .as_str()
            .is_some_and(|r| r.contains("the config names no activity")),
        "{outcome}"
    );
    std::fs::write(cluster.nodes[0].config_path(), &dropped).unwrap();
    assert_eq!(cluster.nodes[0].listed().await, ["dt"]);
    assert_eq!(cluster.nodes[0].stop(), 0);
    assert_lease_returned(&cluster, lease, "tk:{dt}:stock:dt-b", 50).await;
}

/// `ticketd bench` with several `--url`s, round-robin per request.
fn bench_urls(urls: &[String], args: &[&str]) -> serde_json::Value {
    let mut command = std::process::Command::new(crate::common::BIN);
    command.args(["bench", "--json"]);
    for u in urls {
        command.args(["--url", u]);
    }
    let out = command.args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bench_round_robins_over_the_nodes_and_checks_the_invariants() {
    let cluster = Cluster::start(3, &cluster_activity("bn", 400, 2), "");
    let urls: Vec<String> = cluster.nodes.iter().map(TestApp::url).collect();
    let report = tokio::task::block_in_place(|| {
        bench_urls(
            &urls,
            &[
                "--activity",
                "bn",
                "--users",
                "300",
                "--claims-per-user",
                "3",
                "--concurrency",
                "32",
                "--create-users",
            ],
        )
    });
    assert_eq!(report["violations"], serde_json::json!([]), "{report}");
    assert_eq!(report["acknowledged"], 400, "{report}");
    assert_eq!(
        (report["claimed_after"].as_u64(), report["remaining_after"].as_u64()),
        (Some(400), Some(0))
    );
    let stored = cluster.drained("bn").await;
    assert_eq!(stored.len(), 400);
    // Round-robin: every node answered claims.
    for node in &cluster.nodes {
        assert!(metric(node, "ticketd_claims_total{outcome=\"success\"}").await > 0.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_and_report_read_mongodb_and_match_the_rush() {
    let mut cluster = Cluster::start(2, &cluster_activity("ex", 60, 1), "");
    let (tokens, ids) = users(&cluster, "ex", 100).await;
    let (acked, outcomes) = rush(&cluster.clients(), "ex", &tokens, 2, 20).await;
    assert_eq!(acked.iter().map(Vec::len).sum::<usize>(), 60, "{outcomes:?}");
    cluster.drained("ex").await;
    // A clean stop flushes each node's rush statistics.
    for node in &mut cluster.nodes {
        assert_eq!(node.stop(), 0);
    }

    let node = &cluster.nodes[0];
    // Importing again adds nothing, and no claimed code goes back on the list.
    for _ in 0..2 {
        let out = node.cli(&["import"], None);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("ticket ex-t: 0 codes added, 60 in total"),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let listed = llen(&cluster, "tk:{ex}:stock:ex-t").await;
    assert_eq!(listed, 0, "a claimed code went back on the master list");

    // An activity never imported: only the import stores one here (the
    // node serving it from its file does not), and the error says so.
    let out = node.cli(&["export", "--activity", "never", "--format", "csv"], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("in a cluster only the import stores an activity"),
        "{stderr}"
    );
    let out = node.cli(&["export", "--activity", "ex", "--format", "csv"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows = crate::common::parse_csv(&out.stdout);
    assert_eq!(rows.len(), 60);
    let by_code: HashMap<&str, &HashMap<String, String>> = rows.iter().map(|r| (r["code"].as_str(), r)).collect();
    for (i, codes) in acked.iter().enumerate() {
        for code in codes {
            let row = by_code[code.as_str()];
            assert_eq!(row["user_id"], ids[i].to_string());
            assert_eq!(row["username"], crate::common::username("ex", i));
            assert_eq!(row["activity_id"], "ex");
        }
    }
    let nodes: HashSet<&str> = rows.iter().map(|r| r["node"].as_str()).collect();
    assert_eq!(nodes, HashSet::from(["node0", "node1"]));
    let claim_ids: HashSet<&str> = rows.iter().map(|r| r["claim_id"].as_str()).collect();
    assert_eq!(claim_ids.len(), 60, "claim ids are unique across nodes");

    let out = node.cli(
        &[
            "export",
            "--activity",
            "ex",
            "--format",
            "parquet",
            "--out",
            "ex.parquet",
        ],
        None,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let file = std::fs::File::open(node.dir.path().join("ex.parquet")).unwrap();
    let reader = parquet::file::serialized_reader::SerializedFileReader::new(file).unwrap();
    let parquet_rows: Vec<parquet::record::Row> = reader.into_iter().map(Result::unwrap).collect();
    assert_eq!(parquet_rows.len(), 60);
    for (row, csv) in parquet_rows.iter().zip(&rows) {
        use parquet::record::RowAccessor;
        assert_eq!(row.get_string(3).unwrap(), &csv["code"]);
        assert_eq!(row.get_string(7).unwrap(), &csv["node"]);
    }

    let out = node.cli(&["report", "--activity", "ex", "--out", "ex.html"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let html = std::fs::read_to_string(node.dir.path().join("ex.html")).unwrap();
    let cell = |id: &str| crate::common::report_cell(&html, id);
    assert_eq!(cell("codes"), "60");
    assert_eq!(cell("claimed"), "60");
    assert_eq!(cell("users"), "60");
    let requests: usize = outcomes.values().sum();
    assert_eq!(
        cell("requests"),
        requests.to_string(),
        "both nodes' statistics are counted"
    );
    let per_node: Vec<usize> = ["node0", "node1"]
        .iter()
        .map(|n| rows.iter().filter(|r| r["node"] == *n).count())
        .collect();
    for (n, count) in ["node0", "node1"].iter().zip(&per_node) {
        assert!(
            html.contains(&format!("{n}: {count}")),
            "the node chart shows {n}: {count}"
        );
    }

    // Sources past a node's cap between two flushes are stored as one
    // `other` row: not an account (it topped the accounts as `#`). And
    // `--top` cuts each ranking.
    let db = cluster.mongo().await;
    db.collection::<mongodb::bson::Document>("stats_sources")
        .insert_one(mongodb::bson::doc! {
            "_id": "ex|other|", "activity_id": "ex", "kind": "other", "source": "", "requests": 1_000_000_i64,
        })
        .await
        .unwrap();
    let out = node.cli(&["report", "--activity", "ex", "--out", "top.html", "--top", "3"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let html = std::fs::read_to_string(node.dir.path().join("top.html")).unwrap();
    let table = &html[html.find("<table id=\"top-users\">").unwrap()..];
    let table = &table[..table.find("</table>").unwrap()];
    assert_eq!(table.matches("<tr><td>").count(), 3, "{table}");
    for row in table.split("<tr><td>").skip(1) {
        assert!(row.starts_with("ex-"), "an account of the rush: {table}");
    }
}

/// A reloaded `server.shutdown_grace` bounds the MongoDB writer's drain at
/// the stop. The writer kept the value the node started with: lowered by
/// a reload (to fit systemd's `TimeoutStopSec`), a stop with MongoDB down
/// still waited out the old grace, here an hour, and systemd would have
/// killed the node before it gave up its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_shutdown_grace_bounds_the_backlogs_drain_at_the_stop() {
    let mut cluster = Cluster::start_configured(1, &cluster_activity("sg", 5, 1), "", |c| {
        let longer = c.replace("shutdown_grace = \"5s\"", "shutdown_grace = \"1h\"");
        assert_ne!(c, longer);
        longer
    });
    let (tokens, _) = users(&cluster, "sg", 1).await;
    cluster.services.stop_mongo();
    let node = &mut cluster.nodes[0];
    let res = node.claim(&tokens[0], "sg").await;
    assert_eq!(res.status, 200, "{}", res.body);
    assert_eq!(metric(node, "ticketd_mongo_backlog").await, 1.0);
    let config = std::fs::read_to_string(node.config_path()).unwrap();
    let shorter = config.replace("shutdown_grace = \"1h\"", "shutdown_grace = \"1s\"");
    assert_ne!(config, shorter);
    assert_eq!(node.reload(&shorter)["message"], "Config reloaded.");
    node.signal(libc::SIGTERM);
    assert!(
        node.exited_within(Duration::from_secs(60)).is_some(),
        "a minute after the stop the node still drains to a MongoDB that is down: the reloaded grace was not taken"
    );
    assert!(
        node.logs_text().contains("The MongoDB backlog is not empty"),
        "{}",
        node.logs_text()
    );
}

/// A reload resolves `security.blocked_users` to accounts, in MongoDB. With
/// MongoDB down, every reload of a node that blocked anyone was refused
/// (the lookup's error), a pause during the outage included, while Redis
/// took claims. A reload that keeps the list now keeps the accounts found
/// before; one that changes it still needs the store, and says so (from a
/// review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_in_a_mongodb_outage_keeps_the_blocked_accounts_it_found() {
    let mut cluster = Cluster::start(1, &cluster_activity("bo", 5, 1), "");
    let (tokens, _) = users(&cluster, "bo", 2).await;
    let node = &cluster.nodes[0];
    let unblocked = std::fs::read_to_string(node.config_path()).unwrap();
    let config = unblocked.replace("[security]\n", "[security]\nblocked_users = [\"bo-1\"]\n");
    assert_ne!(config, unblocked);
    // Blocked by this reload: its session too, ended for good in MongoDB.
    assert_eq!(node.reload(&config)["message"], "Config reloaded.");
    assert_error(&node.claim(&tokens[1], "bo").await, 403, "BLOCKED");
    assert_eq!(
        node.wait_for_log("Sessions of blocked accounts ended.", 1)["accounts"],
        1
    );
    cluster.services.stop_mongo();
    let node = &cluster.nodes[0];
    let paused = config.replace("per_user_limit = 1\n", "per_user_limit = 1\npaused = true\n");
    assert_ne!(config, paused);
    let applied = node.reload(&paused);
    assert_eq!(applied["message"], "Config reloaded.", "{applied}");
    assert_error(&node.claim(&tokens[0], "bo").await, 409, "PAUSED");
    assert_error(&node.claim(&tokens[1], "bo").await, 403, "BLOCKED");
    let more = paused.replace("blocked_users = [\"bo-1\"]", "blocked_users = [\"bo-1\", \"bo-0\"]");
    assert_ne!(more, paused);
    let refused = node.reload(&more);
    assert!(
        refused
            .to_string()
            .contains("cannot look the accounts of security.blocked_users up"),
        "{refused}"
    );
}

/// `n` claim records of activity `act` for `node`'s backlog, as the
/// commit script writes them (codes `{act}-synthetic-{i}`, one user each).
fn synthetic_records(act: &str, node: &str, range: std::ops::Range<usize>) -> Vec<String> {
    let ms = now_ms();
    range
        .map(|i| {
            format!(
                r#"{{"id":"{}","user":"{}","ms":"{ms}","ticket":"{act}-t","code":"{act}-synthetic-{i}","node":"{node}","nonce":"s","key":"","n":"1"}}"#,
                1_000_000 + i,
                1_000_000 + i
            )
        })
        .collect()
}

/// The MongoDB writer's drain at the stop ends `shutdown_grace` after the
/// stop. Its deadline was set only at the top of its loop: a pass under
/// way when the stop came ran on without one, draining a long backlog
/// (after a MongoDB outage, up to `cluster.max_backlog`) whole, far past
/// the grace and systemd's TimeoutStopSec. What the grace leaves stays in
/// Redis (from a review). The stop comes during a pass of five batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_under_way_at_the_stop_ends_with_the_grace() {
    const RECORDS: usize = 50_000;
    // Five batches: one pass of the writer takes them all.
    let mut cluster = Cluster::start_configured(
        1,
        &cluster_activity("gd", 5, 1),
        "[cluster]\nmongo_batch = 10000\n",
        |c| {
            let shorter = c.replace("shutdown_grace = \"5s\"", "shutdown_grace = \"1s\"");
            assert_ne!(c, shorter);
            shorter
        },
    );
    let outbox = "tk:{gd}:outbox:node0";
    for start in (0..RECORDS).step_by(10_000) {
        let records = synthetic_records("gd", "node0", start..start + 10_000);
        let () = cluster
            .services
            .query(redis::cmd("RPUSH").arg(outbox).arg(records))
            .await;
    }
    until("the writer to be draining", || async {
        llen(&cluster, outbox).await < RECORDS
    })
    .await;
    let node = &mut cluster.nodes[0];
    node.signal(libc::SIGTERM);
    assert!(node.exited_within(Duration::from_secs(120)).is_some());
    let left = llen(&cluster, outbox).await;
    assert!(
        left > 0,
        "the node wrote all {RECORDS} records to MongoDB after a stop with a one-second grace"
    );
    assert!(
        cluster.nodes[0]
            .logs_text()
            .contains("The MongoDB backlog is not empty"),
        "{}",
        cluster.nodes[0].logs_text()
    );
}

/// One activity's backlog that cannot be written (here a record that
/// cannot be read; a Redis master of its keys away is another) ended the
/// writer's whole pass, so every activity after it in the pass had its
/// claims wait in Redis, and its backlog fill to `BACKLOG_FULL`. Now only
/// that activity's turn ends. Two rounds, the bad record in each activity
/// in turn: whichever the pass takes first (from a review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_that_cannot_be_written_holds_up_no_other_activity() {
    let acts = cluster_activity("ia", 5, 2) + &cluster_activity("ib", 5, 2);
    let cluster = Cluster::start(1, &acts, "");
    let (tokens, _) = users(&cluster, "ix", 2).await;
    let node = &cluster.nodes[0];
    for (round, (bad, good)) in [("ia", "ib"), ("ib", "ia")].into_iter().enumerate() {
        let outbox = format!("tk:{{{bad}}}:outbox:node0");
        let () = cluster
            .services
            .query(redis::cmd("RPUSH").arg(&outbox).arg("not a claim record"))
            .await;
        let res = node.claim(&tokens[round], good).await;
        assert_eq!(res.status, 200, "{}", res.body);
        until(&format!("the claim in {good} to reach MongoDB"), || async {
            cluster.mongo_claims(good).await.len() == 1
        })
        .await;
        let _: usize = cluster
            .services
            .query(redis::cmd("LREM").arg(&outbox).arg(0).arg("not a claim record"))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backlog_refuses_claims_rather_than_lose_them_and_recovers() {
    let mut cluster = Cluster::start(1, &cluster_activity("bf", 100, 1), "[cluster]\nmax_backlog = 5\n");
    let (tokens, ids) = users(&cluster, "bf", 30).await;
    cluster.services.stop_mongo();
    let (acked, outcomes) = rush(&cluster.clients(), "bf", &tokens[..20], 1, 1).await;
    assert_eq!(acked.iter().map(Vec::len).sum::<usize>(), 5, "{outcomes:?}");
    assert_eq!(outcomes.get("503 BACKLOG_FULL"), Some(&15), "{outcomes:?}");
    assert_eq!(metric(&cluster.nodes[0], "ticketd_mongo_backlog").await, 5.0);
    // Every claim is refused: a load balancer and an alert hear so (it
    // said 200 and `ticketd_healthy 1` through the whole outage).
    let health = cluster.nodes[0].client.get("/healthz", None).await.unwrap();
    assert_error(&health, 503, "UNHEALTHY");
    let why = health.body["error"]["message"].as_str().unwrap_or_default();
    assert!(why.contains("backlog"), "{}", health.body);
    assert_eq!(metric(&cluster.nodes[0], "ticketd_healthy").await, 0.0);
    cluster.services.restart_mongo();
    until("the backlog to drain", || async {
        metric(&cluster.nodes[0], "ticketd_mongo_backlog").await == 0.0
    })
    .await;
    until("the node to say it is healthy again", || async {
        cluster.nodes[0].client.get("/healthz", None).await.unwrap().status == 200
    })
    .await;
    assert_eq!(metric(&cluster.nodes[0], "ticketd_healthy").await, 1.0);
    // Ten more, five at a time: each five fit the backlog however slowly
    // MongoDB drains it (ten in a row met a full backlog once, on a loaded
    // box, before the writer had caught up).
    let mut all = acked;
    for five in tokens[20..].chunks(5) {
        let (later, outcomes) = rush(&cluster.clients(), "bf", five, 1, 1).await;
        assert_eq!(later.iter().map(Vec::len).sum::<usize>(), 5, "{outcomes:?}");
        all.extend(later);
        until("the backlog to drain", || async {
            metric(&cluster.nodes[0], "ticketd_mongo_backlog").await == 0.0
        })
        .await;
    }
    let stored = cluster.drained("bf").await;
    assert_eq!(stored.len(), 15);
    assert_invariants(&all, &ids, &stored, 1, 100);
    cluster.nodes[0].assert_verified();
}

/// The 503 of a full backlog follows the backlog, not the events that fill
/// and drain it: a `FULL` answer counted after the writer's last write (a
/// race), or a backlog emptied another way, left the node saying 503 — out
/// of its load balancer — with room in its backlog and nothing left to
/// write that would have said so. Here the backlog is emptied by hand while
/// MongoDB is still down, so nothing reaches MongoDB that could end it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backlogs_503_ends_when_the_backlog_has_room() {
    let mut cluster = Cluster::start(1, &cluster_activity("bh", 100, 1), "[cluster]\nmax_backlog = 3\n");
    let (tokens, _) = users(&cluster, "bh", 5).await;
    cluster.services.stop_mongo();
    let (_, outcomes) = rush(&cluster.clients(), "bh", &tokens, 1, 1).await;
    assert_eq!(outcomes.get("503 BACKLOG_FULL"), Some(&2), "{outcomes:?}");
    let node = &cluster.nodes[0];
    assert_error(&node.client.get("/healthz", None).await.unwrap(), 503, "UNHEALTHY");
    let _: usize = cluster
        .services
        .query(redis::cmd("DEL").arg("tk:{bh}:outbox:node0"))
        .await;
    until("the node to say it is healthy again", || async {
        node.client.get("/healthz", None).await.unwrap().status == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_without_activities_follow_what_import_stored_in_mongodb() {
    let mut cluster = Cluster::start(2, "", "");
    let importer = tempfile::tempdir().unwrap();
    let import = |activity: &str| {
        let config = node_config(&cluster.services, &cluster.db, "importer", "") + activity;
        std::fs::write(importer.path().join("config.toml"), config).unwrap();
        let out = crate::common::run_cli(importer.path(), &["import"], None);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    let activity = cluster_activity("fo", 20, 1);
    import(&activity);
    for node in &cluster.nodes {
        until("the node to list the imported activity", || async {
            node.listed().await.iter().any(|id| id == "fo")
        })
        .await;
    }
    let (tokens, _) = users(&cluster, "fo", 2).await;
    let mut codes = Vec::new();
    for (node, token) in cluster.nodes.iter().zip(&tokens) {
        let res = node.claim(token, "fo").await;
        assert_eq!(res.status, 200, "{}", res.body);
        codes.push(res.data()["code"].clone());
    }

    // Activities named in a follower's file would be replaced by the
    // store's at the next refresh: a reload refuses them.
    let config = std::fs::read_to_string(cluster.nodes[0].config_path()).unwrap();
    let outcome = cluster.nodes[0].reload(&(config.clone() + &cluster_activity("ff", 5, 1)));
    assert!(
        outcome["reason"]
            .as_str()
            .is_some_and(|r| r.contains("activities in the file take a restart")),
        "{outcome}"
    );
    std::fs::write(cluster.nodes[0].config_path(), config).unwrap();

    // An import that would move the ticket type to another activity is
    // refused before it writes anything: the nodes still sell `fo-t` as `fo`'s.
    let moved = activity.replace("id = \"fo\"\n", "id = \"fo-moved\"\n");
    assert_ne!(moved, activity);
    std::fs::write(
        importer.path().join("config.toml"),
        node_config(&cluster.services, &cluster.db, "importer", "") + &moved,
    )
    .unwrap();
    let out = crate::common::run_cli(importer.path(), &["import"], None);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ticket type `fo-t` moved from activity `fo` to `fo-moved`"),
        "{err}"
    );
    let tickets = cluster.mongo().await.collection::<Document>("tickets");
    let stored = tickets.find_one(doc! {"_id": "fo-t"}).await.unwrap().unwrap();
    assert_eq!(stored.get_str("activity_id").unwrap(), "fo");
    let activities = cluster.mongo().await.collection::<Document>("activities");
    assert_eq!(activities.count_documents(doc! {"_id": "fo-moved"}).await.unwrap(), 0);

    // Nor one that lists a code MongoDB holds under another ticket type
    // (a ticket type given a new id keeps none of its codes): it was
    // imported with the code skipped and a warning, and its ticket type
    // had no stock.
    let stored_codes = cluster.mongo().await.collection::<Document>("codes");
    let held = stored_codes
        .find_one(doc! {"ticket_id": "fo-t"})
        .await
        .unwrap()
        .unwrap();
    let held = held.get_str("_id").unwrap();
    let taken = format!("{activity}\n[[activity.ticket]]\nid = \"fo-x\"\nname = \"X\"\ncodes = [\"{held}\"]\n");
    std::fs::write(
        importer.path().join("config.toml"),
        node_config(&cluster.services, &cluster.db, "importer", "") + &taken,
    )
    .unwrap();
    let out = crate::common::run_cli(importer.path(), &["import"], None);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "code `{held}` of ticket `fo-x` already belongs to ticket `fo-t`"
        )),
        "{err}"
    );
    assert_eq!(tickets.count_documents(doc! {"_id": "fo-x"}).await.unwrap(), 0);

    // A changed definition, imported again, reaches every node without a reload.
    import(&activity.replace("name = \"Activity fo\"", "name = \"春季音乐节\""));
    for node in &cluster.nodes {
        until("the node to show the new name", || async {
            node.detail("fo").await["name"] == "春季音乐节"
        })
        .await;
        assert_eq!(node.detail("fo").await["claimed"], 2);
    }

    // A definition edited by hand in MongoDB into one `ticketd import` would
    // refuse (a queue without queue_opens) is refused by the nodes too: they
    // say why and keep serving the activity as it was.
    let activities = cluster.mongo().await.collection::<Document>("activities");
    let stored = activities.find_one(doc! {"_id": "fo"}).await.unwrap().unwrap();
    let mut definition: serde_json::Value = serde_json::from_str(stored.get_str("definition").unwrap()).unwrap();
    definition["admission"] = "queue".into();
    definition["name"] = "edited".into();
    activities
        .update_one(
            doc! {"_id": "fo"},
            doc! {"$set": {"definition": definition.to_string()}},
        )
        .await
        .unwrap();
    for node in &cluster.nodes {
        let refused = node.wait_for_log(
            "Could not refresh the activities from MongoDB; serving the previous ones (said again only for another reason).",
            1,
        );
        assert!(
            refused["reason"].as_str().unwrap().contains("needs queue_opens"),
            "{refused}"
        );
        let detail = node.detail("fo").await;
        assert_eq!(
            (&detail["name"], &detail["admission"]),
            (&serde_json::json!("春季音乐节"), &serde_json::json!("race"))
        );
    }

    // An import never takes an activity away: one that does not name `fo`
    // says the nodes still sell it, and `ticketd retire` takes it off sale
    // (before, nothing could: the nodes sold it for good).
    activities
        .update_one(
            doc! {"_id": "fo"},
            doc! {"$set": {"definition": stored.get_str("definition").unwrap()}},
        )
        .await
        .unwrap();
    let config = node_config(&cluster.services, &cluster.db, "importer", "") + &cluster_activity("fx", 1, 1);
    std::fs::write(importer.path().join("config.toml"), config).unwrap();
    let out = crate::common::run_cli(importer.path(), &["import"], None);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("served by nodes whose config names no activity: fo (`ticketd retire"),
        "{said}"
    );
    let out = crate::common::run_cli(importer.path(), &["retire", "--activity", "fo"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for node in &cluster.nodes {
        until("the node to stop listing the retired activity", || async {
            node.listed().await == ["fx"]
        })
        .await;
    }
    crate::common::assert_error(
        &cluster.nodes[1].claim(&tokens[1], "fo").await,
        404,
        "ACTIVITY_NOT_FOUND",
    );
    assert_eq!(cluster.drained("fo").await.len(), 2, "its claims stay");
    let mut ids = Vec::new();
    // And their fans still see them, through either node (the nodes read
    // their own activities' claims from Redis: these vanished from
    // `/ticket/list`, and `/ticket/detail` answered 404).
    for node in &cluster.nodes {
        for (token, code) in tokens.iter().zip(&codes) {
            let list = node.client.get("/ticket/list", Some(token)).await.unwrap();
            assert_eq!(list.status, 200, "{}", list.body);
            let claims = list.data()["claims"].as_array().unwrap().clone();
            assert_eq!(claims.len(), 1, "{}", list.body);
            assert_eq!((&claims[0]["actId"], &claims[0]["code"]), (&"fo".into(), code));
            let id = &claims[0]["claimId"];
            ids.push(id.clone());
            let detail = node
                .client
                .get(&format!("/ticket/detail?ticketId={id}"), Some(token))
                .await
                .unwrap();
            assert_eq!(detail.status, 200, "{}", detail.body);
            assert_eq!(&detail.data()["code"], code, "{}", detail.body);
        }
    }
    let out = crate::common::run_cli(importer.path(), &["retire", "--activity", "fo"], None);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no imported definition of `fo`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // With MongoDB gone, those claims cannot be read: the list says it is
    // partial (not a fan's whole list without them), and their detail is
    // unavailable for now (not "you hold no claim").
    cluster.services.stop_mongo();
    let node = &cluster.nodes[0];
    let list = node.client.get("/ticket/list", Some(&tokens[0])).await.unwrap();
    assert_eq!(list.status, 200, "{}", list.body);
    assert_eq!(
        (&list.data()["partial"], &list.data()["total"]),
        (&true.into(), &0.into()),
        "{}",
        list.body
    );
    let detail = node
        .client
        .get(&format!("/ticket/detail?ticketId={}", ids[0]), Some(&tokens[0]))
        .await
        .unwrap();
    crate::common::assert_error(&detail, 503, "STORE_UNAVAILABLE");
    cluster.services.restart_mongo();
    let list = node.client.get("/ticket/list", Some(&tokens[0])).await.unwrap();
    assert_eq!(
        (&list.data()["partial"], &list.data()["total"]),
        (&false.into(), &1.into()),
        "{}",
        list.body
    );

    // Imported again, a retired activity is back on sale, and the import
    // says so (it did so in silence).
    let config = node_config(&cluster.services, &cluster.db, "importer", "") + &activity;
    std::fs::write(importer.path().join("config.toml"), config).unwrap();
    let out = crate::common::run_cli(importer.path(), &["import"], None);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("activity `fo` had been retired: this import puts it back on sale."),
        "{said}"
    );
}

/// `/ticket/list` is newest first by time. It sorted by claim id, and a
/// cluster's nodes take ids in blocks, so a fan's later claim through the
/// node with the lower block was listed after an earlier one through the
/// other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fans_claims_through_two_nodes_are_listed_newest_first() {
    let cluster = Cluster::start(2, &cluster_activity("nf", 10, 2), "");
    // node0 takes its block of ids first, node1 the next.
    let early = cluster.nodes[0].register("nf-early").await;
    for node in &cluster.nodes {
        let res = settled_claim(node, &early, "nf").await;
        assert_eq!(res.status, 200, "{}", res.body);
    }
    let fan = cluster.nodes[0].register("nf-fan").await;
    let first = settled_claim(&cluster.nodes[1], &fan, "nf").await;
    assert_eq!(first.status, 200, "{}", first.body);
    let at = first.data()["claimedAt"].as_str().unwrap().to_owned();
    until("the clock to pass the first claim", || async {
        rfc3339_ms(now_ms()) > at
    })
    .await;
    let second = settled_claim(&cluster.nodes[0], &fan, "nf").await;
    assert_eq!(second.status, 200, "{}", second.body);
    let id = |res: &ticketd::bench::ApiResponse| res.data()["claimId"].as_u64().unwrap();
    assert!(id(&second) < id(&first), "the later claim has the smaller id");
    for node in &cluster.nodes {
        let list = node.client.get("/ticket/list", Some(&fan)).await.unwrap();
        let listed: Vec<&serde_json::Value> = list.data()["claims"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| &c["code"])
            .collect();
        assert_eq!(listed, [&second.data()["code"], &first.data()["code"]], "{}", list.body);
    }
}

/// A claim asked again while it hears `STOCK_IN_FLIGHT`: with ten codes
/// leased between two nodes, the one asked may hold none a moment while
/// the other holds the rest (it gives idle codes back within seconds).
async fn settled_claim(node: &TestApp, token: &str, act: &str) -> ticketd::bench::ApiResponse {
    let body = node.claim_body(token, act).await;
    claim_settled(&node.client, token, &body, &AnswerLog::default())
        .await
        .0
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_through_one_node_is_honoured_by_the_others() {
    let cluster = Cluster::start(2, &cluster_activity("lo", 10, 1), "");
    let token = cluster.nodes[0].register("logout-user").await;
    let me = cluster.nodes[1].client.get("/ticket/list", Some(&token)).await.unwrap();
    assert_eq!(me.status, 200, "a session from node0 works on node1: {}", me.body);
    let out = cluster.nodes[0]
        .client
        .post("/user/logout", Some(&token), &serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(out.status, 200, "{}", out.body);
    until("node1 to refuse the revoked session", || async {
        cluster.nodes[1]
            .client
            .get("/ticket/list", Some(&token))
            .await
            .unwrap()
            .status
            == 401
    })
    .await;
    let res = cluster.nodes[1].claim(&token, "lo").await;
    crate::common::assert_error(&res, 401, "UNAUTHORIZED");
}

/// A reload refused halfway through tracking its new activities (here the
/// second's registry of nodes in Redis is of the wrong type) had already
/// started leasing the first: its ticket type joined the node's leases,
/// whose loop leased codes of an activity the node did not sell (its
/// claims heard 404) and renewed them while it ran, so other nodes were
/// short of them at the sell-out. The refused reload now leaves nothing
/// behind; once Redis is mended, the same reload sells both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_refused_halfway_leases_nothing_of_it() {
    let cluster = Cluster::start(1, &cluster_activity("ha", 5, 1), "");
    let node = &cluster.nodes[0];
    let config = std::fs::read_to_string(node.config_path()).unwrap();
    // `hx` is tracked before `hy` (by start time).
    let at = |offset_ms: i64| rfc3339_ms(now_ms() + offset_ms);
    let more = config.clone()
        + &crate::common::activity("hx", 5, 1, &at(-120_000), &at(3_600_000))
        + &crate::common::activity("hy", 5, 1, &at(-60_000), &at(3_600_000));
    std::fs::write(node.config_path(), &more).unwrap();
    let out = node.cli(&["import"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let broken = "tk:{hy}:nodes";
    let () = cluster
        .services
        .query(redis::cmd("SET").arg(broken).arg("not a set"))
        .await;
    let outcome = node.reload(&more);
    assert!(
        outcome["reason"].as_str().is_some_and(|r| r.contains("WRONGTYPE")),
        "{outcome}"
    );
    let metrics = node.raw_get("/metrics").await;
    assert!(
        !metrics.contains("activity=\"hx\""),
        "the refused reload's activity is leased: {}",
        metrics
            .lines()
            .filter(|l| l.contains("hx"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    crate::common::assert_error(
        &node.claim(&node.register("hx-fan").await, "hx").await,
        404,
        "ACTIVITY_NOT_FOUND",
    );
    let () = cluster.services.query(redis::cmd("DEL").arg(broken)).await;
    assert_eq!(node.reload(&more)["message"], "Config reloaded.");
    let fan = node.register("both").await;
    for act in ["hx", "hy"] {
        let res = node.claim(&fan, act).await;
        assert_eq!(res.status, 200, "{act}: {}", res.body);
    }
}

/// An account's logouts through two nodes are bounded in MongoDB as in
/// SQLite: eight one by one and a mark past them, which both nodes honour
/// (a node may never read the logouts folded into it), while a session
/// opened after them works on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accounts_logouts_through_two_nodes_are_bounded_and_honoured_by_both() {
    let cluster = Cluster::start_configured(2, &cluster_activity("lb", 10, 1), "", |c| {
        crate::common::behind_proxy(c, "")
    });
    cluster.nodes[0].register("leaver").await;
    let mut gone = Vec::new();
    for i in 0..20 {
        // Five logins from each address: within its budget of ten.
        let from = format!("203.0.113.{}", i / 5 + 1);
        gone.push(crate::common::log_in_and_out(&cluster.nodes[i % 2].client, "leaver", &from).await);
    }
    let kept = cluster.nodes[1].login("leaver").await;
    for node in &cluster.nodes {
        until("the node to refuse every session logged out", || async {
            for token in &gone {
                if node.client.get("/ticket/list", Some(token)).await.unwrap().status != 401 {
                    return false;
                }
            }
            true
        })
        .await;
        let res = node.client.get("/ticket/list", Some(&kept)).await.unwrap();
        assert_eq!(res.status, 200, "the session opened after the logouts: {}", res.body);
    }
    let revoked = cluster.mongo().await.collection::<Document>("revoked_sessions");
    let stored = revoked.count_documents(doc! {}).await.unwrap();
    assert!(stored <= 9, "MongoDB keeps {stored} revocations of one account");
    let mark = revoked
        .find_one(doc! {"before": true})
        .await
        .unwrap()
        .expect("the account's mark");
    assert!(mark.get_i64("expires_at_ms").is_ok(), "{mark}");
}

/// Issue 12, item 4: a retry with the same Idempotency-Key after the
/// activity sold out got SOLD_OUT instead of its code whenever it reached a
/// node that had not made the claim (or the same node after a restart):
/// the sold-out path read only the node's own ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_retry_gets_its_code_on_any_node_even_after_the_sell_out_and_a_restart() {
    let mut cluster = Cluster::start(2, &cluster_activity("idem", 1, 1), "");
    let token = cluster.nodes[0].register("idem-fan").await;
    let body = cluster.nodes[0].claim_body(&token, "idem").await;
    // A quote and a backslash: the node writes the claim record's JSON
    // that the commit script stores and later decodes.
    let key = [("Idempotency-Key", r#"retry-"me"-\-0001"#)];
    let first = cluster.nodes[0]
        .client
        .call(http::Method::POST, "/ticket/get", Some(&token), Some(&body), &key)
        .await
        .unwrap();
    assert_eq!(first.status, 200, "{}", first.body);
    let code = first.data()["code"].clone();
    // Sold out now; the answer to the retry was "lost" and it goes elsewhere.
    let other = cluster.nodes[1].register("idem-other").await;
    assert_eq!(
        cluster.nodes[1].claim(&other, "idem").await.error_code(),
        Some("SOLD_OUT")
    );
    let again = cluster.nodes[1]
        .client
        .call(http::Method::POST, "/ticket/get", Some(&token), Some(&body), &key)
        .await
        .unwrap();
    assert_eq!((again.status, &again.data()["code"]), (200, &code), "{}", again.body);
    assert_eq!(again.data()["replayed"], true);
    // And on the node that made it, after a restart that emptied its ledger.
    assert_eq!(cluster.nodes[0].stop(), 0);
    cluster.nodes[0].boot();
    let again = cluster.nodes[0]
        .client
        .call(http::Method::POST, "/ticket/get", Some(&token), Some(&body), &key)
        .await
        .unwrap();
    assert_eq!((again.status, &again.data()["code"]), (200, &code), "{}", again.body);
    // Another key of the same user is not a replay: sold out.
    let fresh = cluster.nodes[1]
        .client
        .call(
            http::Method::POST,
            "/ticket/get",
            Some(&token),
            Some(&body),
            &[("Idempotency-Key", "new-key")],
        )
        .await
        .unwrap();
    assert_eq!(fresh.error_code(), Some("SOLD_OUT"), "{}", fresh.body);
}

/// A claim that found the node's pool empty marked its ticket type hungry,
/// and the node leased codes for it, before the claim's token or the
/// user's limit was looked at. A node that had given its idle codes back
/// thus leased them again for a claim refused anyway (no claim token, a
/// user at the limit), gave them back two seconds later, and so on, each
/// lease a copy of the codes in the pool's arena, which never shrinks: one
/// account grew an idle node's memory for as long as it liked. Now only a
/// claim that could take a code makes a lease (from a review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_claim_that_could_take_a_code_makes_a_lease() {
    let cluster = Cluster::start(
        1,
        &cluster_activity("lz", 2, 1),
        "[cluster]\nlease_min_batch = 1\nlease_max_batch = 1\n",
    );
    let node = &cluster.nodes[0];
    let tokens = cluster.users("lz", 3).await;
    let (at_limit, buyer) = (&tokens[0], &tokens[2]);
    assert_eq!(node.claim(at_limit, "lz").await.status, 200);
    // The node sold nothing for two seconds with the master list empty:
    // it gives its last code back, and leases none for two seconds more.
    node.wait_for_log("Gave idle leased codes back to the master list.", 1);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let leased = || async { crate::common::metric(node, "ticketd_codes_leased_total").await };
    let before = leased().await;
    let body = node.claim_body(at_limit, "lz").await;
    for _ in 0..5 {
        let res = node.client.post("/ticket/get", Some(at_limit), &body).await.unwrap();
        assert_error(&res, 409, "LIMIT_REACHED");
        let res = node
            .client
            .post("/ticket/get", Some(&tokens[1]), &serde_json::json!({"actId": "lz"}))
            .await
            .unwrap();
        assert_error(&res, 403, "CLAIM_TOKEN_REQUIRED");
    }
    assert_eq!(leased().await, before, "claims refused anyway made the node lease");
    // A claim that can take a code still gets one leased.
    let res = node.claim(buyer, "lz").await;
    assert_eq!(res.status, 200, "{}", res.body);
    assert_eq!(leased().await, before + 1.0);
}

/// After the sell-out a keyed claim that the ledger does not know is looked
/// up in Redis (its claim may have been made through another node). That
/// look-up is a script on the Redis every node commits through, and it ran
/// for every such claim, outside the user's budget of store reads: one
/// account sending keyed claims after the sell-out had Redis run a script
/// per request. Now the budget holds (burst 20, 5 a second), and past it
/// the claim hears SOLD_OUT as an unkeyed one does (from a review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_claims_after_the_sell_out_look_in_redis_only_within_the_budget() {
    const CLAIMS: usize = 300;
    let cluster = Cluster::start(1, &cluster_activity("kb", 2, 1), "");
    let node = &cluster.nodes[0];
    let tokens = cluster.users("kb", 3).await;
    for t in &tokens[..2] {
        assert_eq!(node.claim(t, "kb").await.status, 200);
    }
    let body = serde_json::json!({"actId": "kb"});
    // The node learns the cluster sold out at its next look.
    until("the node to know the sell-out", || async {
        node.claim(&tokens[2], "kb").await.error_code() == Some("SOLD_OUT")
    })
    .await;
    // The look-up reads the user's list of held codes: one HGET each.
    let before = command_calls(&cluster, "hget").await;
    for i in 1..=CLAIMS {
        let res = claim_keyed(&node.client, &tokens[2], &body, &format!("kb-{i}")).await;
        assert_error(&res, 410, "SOLD_OUT");
    }
    let looked_up = command_calls(&cluster, "hget").await - before;
    assert!(
        looked_up < CLAIMS as u64 / 2,
        "{looked_up} HGETs in Redis for {CLAIMS} keyed claims after the sell-out"
    );
}

/// A retry with the same Idempotency-Key gets its claim "whatever changed
/// since", and did, on the node that made it. Through another node (or the
/// same after a restart) the ledger has no such claim, and a refusal at the
/// gate came first: once the organiser paused the sale, the fan whose first
/// answer was lost heard 409 PAUSED for a code they hold. The store is now
/// asked before such a refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_retry_gets_its_code_on_another_node_after_a_pause() {
    let cluster = Cluster::start(2, &cluster_activity("ip", 5, 2), "");
    let token = cluster.nodes[0].register("ip-fan").await;
    let body = cluster.nodes[0].claim_body(&token, "ip").await;
    let first = claim_keyed(&cluster.nodes[0].client, &token, &body, "lost-answer-1").await;
    assert_eq!(first.status, 200, "{}", first.body);
    for node in &cluster.nodes {
        let config = std::fs::read_to_string(node.config_path()).unwrap();
        let paused = config.replace("per_user_limit = 2\n", "per_user_limit = 2\npaused = true\n");
        assert_ne!(config, paused);
        assert_eq!(node.reload(&paused)["message"], "Config reloaded.");
    }
    let again = claim_keyed(&cluster.nodes[1].client, &token, &body, "lost-answer-1").await;
    assert_replayed(&again, &first);
    // A new claim is refused as before.
    let fresh = claim_keyed(&cluster.nodes[1].client, &token, &body, "another-key").await;
    assert_error(&fresh, 409, "PAUSED");
}

/// `/act/detail` shows a logged-in fan "joined" and their codes. It read
/// only the answering node's ledger, the claims that node made since it
/// started: behind Nginx the next request goes to another node, and the
/// fan's page showed no code for a claim they hold. In a cluster it now
/// reads the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activitys_detail_shows_claims_made_through_another_node() {
    let cluster = Cluster::start(2, &cluster_activity("ad", 5, 2), "");
    let token = cluster.nodes[0].register("ad-fan").await;
    let res = cluster.nodes[0].claim(&token, "ad").await;
    assert_eq!(res.status, 200, "{}", res.body);
    let code = res.data()["code"].clone();
    let detail = cluster.nodes[1]
        .client
        .get("/act/detail?actId=ad", Some(&token))
        .await
        .unwrap();
    assert_eq!(detail.status, 200, "{}", detail.body);
    let d = detail.data();
    assert_eq!(d["joined"], true, "{d}");
    let codes: Vec<&serde_json::Value> = d["claims"].as_array().unwrap().iter().map(|c| &c["code"]).collect();
    assert_eq!(codes, vec![&code], "{d}");
}

/// In a cluster, `/ticket/list`, `/ticket/detail` and `/ticket/qr` read
/// the user's claims with a Redis script per activity, on the Redis that
/// runs every node's commits one at a time, and nothing bounded them: one
/// logged-in client looping `/ticket/list` loaded every node's claims. A
/// user now has twenty such reads, then five a second, per node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_reads_of_the_shared_store_are_rate_limited() {
    let cluster = Cluster::start(1, &cluster_activity("rl", 5, 1), "");
    let node = &cluster.nodes[0];
    let token = node.register("rl-fan").await;
    let res = node.claim(&token, "rl").await;
    assert_eq!(res.status, 200, "{}", res.body);
    // A hundred at once: all served only if they took 16 s (at five a
    // second past the twenty), far more than the milliseconds they take.
    let started = Instant::now();
    let answers: Vec<_> = join_all((0..100).map(|_| node.client.get("/ticket/list", Some(&token))))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    // Of twenty, the claim's `/act/detail` (for its claim token) took one;
    // the bucket refills five a second while they are served.
    let refilled = (5.0 * started.elapsed().as_secs_f64()).ceil() as usize;
    let ok = answers.iter().filter(|a| a.status == 200).count();
    assert!((19..=19 + refilled).contains(&ok), "{ok} of 100 served");
    let refused = answers.iter().find(|a| a.status != 200).unwrap();
    assert_error(refused, 429, "RATE_LIMITED");
    // Another user's reads are their own.
    let other = node.register("rl-other").await;
    assert_eq!(node.client.get("/ticket/list", Some(&other)).await.unwrap().status, 200);
}

/// A reaper that takes a dead node's backlog is registered as live by the
/// same script. A node sweeping an activity it does not sell registered
/// itself by a later call: killed between the two (seen once, on a loaded
/// box), it left the claims in its outbox with no registration naming it,
/// so no node ever reaped them and they never reached MongoDB. Through the
/// script itself, on Redis: the window is too short to hit through a node.
#[tokio::test]
async fn a_reaper_that_takes_a_backlog_is_registered_in_the_same_step() {
    let services = Services::start_redis_only();
    let mut r = services.redis().await;
    let keys = ticketd::store::cluster::scripts::Keys::new("rg");
    let () = redis::cmd("ZADD")
        .arg(keys.nodes())
        .arg(1)
        .arg("dead")
        .query_async(&mut r)
        .await
        .unwrap();
    let () = redis::cmd("RPUSH")
        .arg(keys.outbox("dead"))
        .arg("claim 1")
        .arg("claim 2")
        .query_async(&mut r)
        .await
        .unwrap();
    let reap = |reaper: &'static str| {
        let mut invocation = ticketd::store::cluster::scripts::REAP.prepare_invoke();
        invocation
            .key(keys.nodes())
            .key(keys.outbox(reaper))
            .arg(reaper)
            .arg(keys.prefix())
            .arg(60_000);
        invocation
    };
    let (nodes, _, moved): (usize, usize, usize) = reap("sweeper").invoke_async(&mut r).await.unwrap();
    assert_eq!((nodes, moved), (1, 2));
    assert_eq!(services.lrange(&keys.outbox("sweeper")).await.len(), 2);
    let conn = r.clone();
    let registered = |node: &'static str| {
        let (mut r, nodes) = (conn.clone(), keys.nodes());
        async move {
            let until: Option<i64> = redis::cmd("ZSCORE")
                .arg(nodes)
                .arg(node)
                .query_async(&mut r)
                .await
                .unwrap();
            until
        }
    };
    let (secs, _): (i64, i64) = redis::cmd("TIME").query_async(&mut r).await.unwrap();
    let until = registered("sweeper")
        .await
        .expect("the reaper holding the backlog is not registered in the activity");
    assert!(
        until > secs * 1000 + 30_000,
        "registered as live for the lease TTL: {until}"
    );
    // A reap that moves nothing registers nobody.
    let (nodes, _, moved): (usize, usize, usize) = reap("idle").invoke_async(&mut r).await.unwrap();
    assert_eq!((nodes, moved), (0, 0));
    assert_eq!(registered("idle").await, None);
}

/// The commit script writes a batch's backlog records and sold counts once,
/// after its loop. Redis keeps what a failed script wrote before it failed,
/// so a command failing halfway through a batch must not leave the claims
/// recorded before it out of the backlog (never written to MongoDB) and out
/// of the sold counts. Here the second claim's code holds a damaged record.
#[tokio::test]
async fn a_commit_failing_halfway_still_backlogs_and_counts_what_it_recorded() {
    let services = Services::start_redis_only();
    let mut r = services.redis().await;
    let keys = ticketd::store::cluster::scripts::Keys::new("half");
    let lease = keys.lease("t", "n1");
    let () = redis::cmd("SADD")
        .arg(&lease)
        .arg("c1")
        .arg("c2")
        .query_async(&mut r)
        .await
        .unwrap();
    let () = redis::cmd("HSET")
        .arg(keys.claimed())
        .arg("c2")
        .arg("damaged, not JSON")
        .query_async(&mut r)
        .await
        .unwrap();
    let head = |code: &str, user: u64, nonce: &str| {
        format!(
            r#"{{"id":"{user}","user":"{user}","ms":"5","ticket":"t","code":"{code}","node":"n1","nonce":"{nonce}","key":"","n":""#
        )
    };
    let mut invocation = ticketd::store::cluster::scripts::COMMIT.prepare_invoke();
    invocation
        .key(keys.claimed())
        .key(keys.users())
        .key(keys.held())
        .key(keys.idem())
        .key(keys.outbox("n1"))
        .key(keys.sold())
        .key(keys.limits())
        .key(keys.nodes())
        .key(keys.served())
        .key(keys.room_log())
        .key(&lease)
        .key(&lease)
        .arg("n1")
        .arg(5)
        .arg(1000);
    for (nonce, code, user) in [("x1", "c1", 1u64), ("x2", "c2", 2)] {
        invocation
            .arg(nonce)
            .arg("t")
            .arg(code)
            .arg(user)
            .arg("")
            .arg(head(code, user, nonce))
            .arg(format!("\"{code}\""))
            .arg(0);
    }
    let failed = invocation.invoke_async::<Vec<String>>(&mut r).await;
    assert!(failed.is_err(), "the damaged record fails the script: {failed:?}");
    let backlog = services.lrange(&keys.outbox("n1")).await;
    assert_eq!(
        backlog,
        vec![format!("{}1\"}}", head("c1", 1, "x1"))],
        "c1 was recorded, so it is backlogged"
    );
    let sold: Option<u64> = redis::cmd("HGET")
        .arg(keys.sold())
        .arg("t")
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(sold, Some(1));
    // And the limit it held c1's claim to, for `ticketd verify`.
    let served: Option<u64> = redis::cmd("GET").arg(keys.served()).query_async(&mut r).await.unwrap();
    assert_eq!(served, Some(5));
    let held: String = redis::cmd("HGET")
        .arg(keys.held())
        .arg(1)
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(held, r#"["c1"]"#);
}

/// Issue 12, item 7, in a cluster: `ticketd verify` names each broken
/// invariant of the shared stock — a code in two places, a code lost, a
/// code nobody pushed, a wrong per-user counter and held list, a wrong sold
/// counter, a claim in Redis that never reached MongoDB — and exits
/// non-zero. (The chaos tests above end by running it, and it must find
/// nothing.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_every_broken_invariant_of_the_shared_stock() {
    let mut cluster = Cluster::start(1, &cluster_activity("vv", 6, 1), "");
    let (tokens, ids) = users(&cluster, "vv", 2).await;
    let (acked, _) = rush(&cluster.clients(), "vv", &tokens, 1, 2).await;
    assert_eq!(acked.iter().map(Vec::len).sum::<usize>(), 2);
    cluster.drained("vv").await;
    let report = cluster.nodes[0].assert_verified();
    assert!(
        report.contains("activity `vv`: 6 codes, 2 claimed (2 in MongoDB, 0 in backlogs)"),
        "{report}"
    );

    // Stop the node (it gives its leased codes back), then tamper with
    // Redis behind its back.
    assert_eq!(cluster.nodes[0].stop(), 0);
    let mut r = cluster.services.redis().await;
    let claimed = &acked[0][0];
    let q = |args: &[&str]| {
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c
    };
    let user = ids[0].to_string();
    let _: () = q(&["LPUSH", "tk:{vv}:stock:vv-t", claimed])
        .query_async(&mut r)
        .await
        .unwrap();
    let _: () = q(&["LPUSH", "tk:{vv}:stock:vv-t", "FORGED"])
        .query_async(&mut r)
        .await
        .unwrap();
    let _: () = q(&["HINCRBY", "tk:{vv}:users", &user, "1"])
        .query_async(&mut r)
        .await
        .unwrap();
    let _: () = q(&["HINCRBY", "tk:{vv}:sold", "vv-t", "5"])
        .query_async(&mut r)
        .await
        .unwrap();
    let forged = r#"{"id":"999","user":"4242","ticket":"vv-t","code":"GHOST","ms":"0","node":"x","nonce":"x","n":"1"}"#;
    let _: () = q(&["HSET", "tk:{vv}:claimed", "GHOST", forged])
        .query_async(&mut r)
        .await
        .unwrap();
    // An unclaimed code taken off the master list and put nowhere: lost.
    let known: Vec<String> = q(&["SMEMBERS", "tk:{vv}:known:vv-t"])
        .query_async(&mut r)
        .await
        .unwrap();
    let lost = known
        .iter()
        .find(|c| !acked.iter().flatten().any(|a| a == *c))
        .expect("an unclaimed code")
        .clone();
    let _: () = q(&["LREM", "tk:{vv}:stock:vv-t", "0", &lost])
        .query_async(&mut r)
        .await
        .unwrap();
    let _: () = q(&["SREM", "tk:{vv}:lease:vv-t:node0", &lost])
        .query_async(&mut r)
        .await
        .unwrap();

    let out = cluster.nodes[0].cli(&["verify"], None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    for problem in [
        format!("code `{claimed}` of `vv-t` is in the master list and claimed by user {user}"),
        "code `FORGED` of `vv-t` was never pushed".to_owned(),
        format!("code `{lost}` of `vv-t` is lost"),
        format!("user {user}'s claim counter says 2, but the user holds 1 codes"),
        "ticket `vv-t`'s sold counter says 7, but 3 of its codes are claimed".to_owned(),
        "claim of code `GHOST` (user 4242) is in Redis but neither in MongoDB nor in any backlog".to_owned(),
    ] {
        assert!(
            stdout.contains(&problem),
            "verify did not report {problem:?}:\n{stdout}"
        );
    }
}

/// The last code, leased by a node nobody buys at, reaches a buyer at the
/// other node: the holder gives it back when idle and does not lease it
/// again without buyers of its own. (Before, it leased it back at once,
/// ahead of the other node, and the buyer heard STOCK_IN_FLIGHT for ever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_node_gives_the_last_code_to_a_buyer_at_another_node() {
    let cluster = Cluster::start(2, &cluster_activity("ping", 1, 1), "[cluster]\nlease_ttl = \"2s\"\n");
    let lease_of = |n: usize| format!("tk:{{ping}}:lease:ping-t:node{n}");
    // One node leased the only code at start; find it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let holder = loop {
        if scard(&cluster, &lease_of(0)).await == 1 {
            break 0;
        }
        if scard(&cluster, &lease_of(1)).await == 1 {
            break 1;
        }
        assert!(Instant::now() < deadline, "no node leased the code");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let buyer_node = 1 - holder;
    let token = cluster.nodes[buyer_node].users("ping", 1).await.remove(0);
    let body = crate::common::claim_body(&cluster.nodes[buyer_node].client, &token, "ping").await;
    let log = AnswerLog::default();
    let (answer, earlier) = claim_settled(&cluster.nodes[buyer_node].client, &token, &body, &log).await;
    let answer = answer.unwrap();
    assert_eq!(answer.status, 200, "{} after {earlier:?}", answer.body);
}

/// `min_account_age` across nodes: the age a token carries is the one
/// MongoDB keeps, whichever node made the account or reads the token, and
/// `user import` brings a member's registration time into MongoDB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accounts_age_holds_on_every_node_and_imports_keep_theirs() {
    let act = crate::common::Act::new("aged")
        .window(&rfc3339_ms(now_ms() - 60_000), &rfc3339_ms(now_ms() + 3_600_000))
        .with("min_account_age = \"30d\"")
        .ticket("aged-t", "T", crate::common::Codes::Generate(5))
        .toml();
    let cluster = Cluster::start(2, &act, "");
    let young = cluster.nodes[0].register("young").await;
    let res = cluster.nodes[1].claim(&young, "aged").await;
    crate::common::assert_error(&res, 403, "ACCOUNT_TOO_NEW");

    let node = &cluster.nodes[0];
    // Past a page of `user list` (a thousand), read from MongoDB a page at a time.
    let fans: String = (0..1_200).map(|i| format!("fan{i:04},password-{i:04},\n")).collect();
    node.import_user_csv(&format!("elder,password-elder,Elder,2020-01-01T00:00:00Z\n{fans}"));
    // One record that does not read as an account (written by hand, or by
    // another version) is passed over, and the listing goes on past it:
    // the short first page it made ended the listing there.
    let users = cluster.mongo().await.collection::<Document>("users");
    let broken = users
        .update_one(doc! {"username": "fan0010"}, doc! {"$unset": {"password_hash": ""}})
        .await
        .unwrap();
    assert_eq!(broken.modified_count, 1);
    let listed = crate::common::parse_csv(&node.cli(&["user", "list"], None).stdout);
    let ids: Vec<u64> = listed.iter().map(|u| u["id"].parse().unwrap()).collect();
    assert_eq!(ids.len(), 1 + 1_200, "young, elder and the fans but one: {}", ids.len());
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in id order, none twice");
    assert!(
        listed.iter().any(|u| u["username"] == "fan1199"),
        "the last fan is listed"
    );
    assert!(
        listed
            .iter()
            .any(|u| u["username"] == "elder" && u["created_at"] == "2020-01-01T00:00:00.000Z"),
        "{listed:?}"
    );
    let elder = cluster.nodes[1].login("elder").await;
    let res = cluster.nodes[1].claim(&elder, "aged").await;
    assert_eq!(res.status, 200, "{}", res.body);
}

/// With Redis down, a node whose pool is empty cannot know whether codes
/// will come back, nor lease any: it says the store is unavailable, as a
/// claim that finds a code hears from its commit. It said STOCK_IN_FLIGHT
/// ("retry shortly, codes may come back"), which the Redis-outage rushes'
/// "refused with a clear code" caught only when a node happened to run dry
/// as Redis went (one CI run in many).
///
/// One code and two nodes: whichever node holds it (or neither, if it was
/// given back idle), the other's pool is empty. With Redis gone, both must
/// say STORE_UNAVAILABLE, whichever is which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_a_node_without_codes_says_the_store_is_unavailable() {
    // (The stop below waits out its grace for a Redis that is gone.)
    let mut cluster = Cluster::start_configured(2, &cluster_activity("dry", 1, 1), "", |c| {
        c.replace("shutdown_grace = \"5s\"", "shutdown_grace = \"1s\"")
    });
    let (tokens, _) = users(&cluster, "dry", 2).await;
    let mut bodies = Vec::new();
    for (node, token) in cluster.nodes.iter().zip(&tokens) {
        bodies.push(claim_body(&node.client, token, "dry").await);
    }
    cluster.services.stop_redis();
    for node in &cluster.nodes {
        until("the node to notice Redis is gone", || async {
            metric(node, "ticketd_redis_up").await == 0.0
        })
        .await;
    }
    for (i, node) in cluster.nodes.iter().enumerate() {
        let res = node
            .client
            .post("/ticket/get", Some(&tokens[i]), &bodies[i])
            .await
            .unwrap();
        assert_error(&res, 503, "STORE_UNAVAILABLE");
    }
    // A fan's list is not asked of a Redis known to be away, and no line
    // is logged per request (one each flooded the log in an outage).
    let node = &mut cluster.nodes[0];
    for _ in 0..5 {
        let res = node.client.get("/ticket/list", Some(&tokens[0])).await.unwrap();
        assert_error(&res, 503, "STORE_UNAVAILABLE");
    }
    assert_eq!(
        node.count_logs("Could not read a user's claims."),
        0,
        "{}",
        node.logs_text()
    );
    // Stopped meanwhile, it says it could not read its backlog, not that the
    // backlog is "not empty" with 0 claims.
    assert_eq!(node.stop(), 0);
    let said = node.logs_text();
    assert!(
        said.contains("The MongoDB backlog could not be read (Redis is not answering)")
            && !said.contains("The MongoDB backlog is not empty"),
        "{said}"
    );
}

/// Look-alike usernames in cluster mode: registered through different
/// nodes, `victirn` is taken by `victim` (MongoDB's unique, sparse index on
/// the skeleton); an account stored without a skeleton after the nodes
/// keyed the old ones (an older node's, during a rolling upgrade) is keyed
/// when a tool or node starts, and its look-alike is then skipped by
/// `ticketd user import`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn look_alike_usernames_are_taken_across_nodes() {
    let cluster = Cluster::start(2, &cluster_activity("la", 2, 1), "");
    let register = |name: &str| serde_json::json!({ "username": name, "password": "password-common" });
    let res = cluster.nodes[0]
        .client
        .post("/user/register", None, &register("victim"))
        .await
        .unwrap();
    assert_eq!(res.status, 200, "{}", res.body);
    let res = cluster.nodes[1]
        .client
        .post("/user/register", None, &register("victirn"))
        .await
        .unwrap();
    assert_error(&res, 409, "USERNAME_TAKEN");

    let db = cluster.mongo().await;
    db.collection::<Document>("users")
        .insert_one(doc! {
            "_id": 100_000_i64, "username": "oldtimer", "nickname": "Old",
            "password_hash": "x", "created_at_ms": 0_i64,
        })
        .await
        .unwrap();
    let node = &cluster.nodes[0];
    let file = node.dir.path().join("alike.csv");
    std::fs::write(&file, "oldtirner,password-common,O\nfresh,password-common,F\n").unwrap();
    let out = node.cli(&["user", "import", file.to_str().unwrap()], None);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("1 user created, 1 skipped"),
        "{said}"
    );
    let old = db
        .collection::<Document>("users")
        .find_one(doc! {"_id": 100_000_i64})
        .await
        .unwrap()
        .unwrap();
    assert_eq!(old.get_str("skeleton"), Ok("oldtirner"), "keyed: {old}");
}

/// Two `ticketd import` runs at once (two operators, or one run on two
/// hosts) each counted a ticket type's codes and generated the rest: twice
/// the configured stock went on sale (the cluster walkthrough saw it 5 times
/// in 5). The import lock makes the second wait and add nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_imports_at_once_generate_the_stock_once() {
    let cluster = Cluster::start(1, &cluster_activity("one", 1, 1), "");
    let node = &cluster.nodes[0];
    let config =
        std::fs::read_to_string(node.dir.path().join("config.toml")).unwrap() + &cluster_activity("twin", 500, 1);
    let path = node.dir.path().join("twin.toml");
    std::fs::write(&path, config).unwrap();
    let runs: Vec<_> = (0..3)
        .map(|_| {
            std::process::Command::new(crate::common::BIN)
                .arg("--config")
                .arg(&path)
                .arg("import")
                .current_dir(node.dir.path())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for run in runs {
        let out = run.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let db = cluster.mongo().await;
    let codes = db
        .collection::<Document>("codes")
        .count_documents(doc! {"ticket_id": "twin-t"})
        .await
        .unwrap();
    assert_eq!(codes, 500, "generated once");
    let listed = llen(&cluster, "tk:{twin}:stock:twin-t").await;
    assert_eq!(listed, 500, "on the master list once");
}

/// A Redis outage with no claims to write left `ticketd_mongo_up` at 0
/// after Redis came back, MongoDB healthy, until a claim was written: the
/// MongoDB writer counted its failed backlog reads from Redis as MongoDB's
/// failure (and the alert on it paged for nothing). Only MongoDB's own
/// failures say it is down now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_does_not_say_mongodb_is_down() {
    let mut cluster = Cluster::start(1, &cluster_activity("mu", 2, 1), "");
    let writer_errors = "ticketd_worker_errors_total{worker=\"mongo-writer\"}";
    let wait = |what: &'static str| (what, Instant::now() + Duration::from_secs(30));
    assert_eq!(metric(&cluster.nodes[0], "ticketd_mongo_up").await, 1.0);
    cluster.services.stop_redis();
    let (what, deadline) = wait("the writer to meet the outage");
    while metric(&cluster.nodes[0], writer_errors).await == 0.0 {
        assert!(Instant::now() < deadline, "waited for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metric(&cluster.nodes[0], "ticketd_mongo_up").await, 1.0, "during");
    cluster.services.restart_redis();
    let (what, deadline) = wait("the node to see Redis back");
    while metric(&cluster.nodes[0], "ticketd_redis_up").await == 0.0 {
        assert!(Instant::now() < deadline, "waited for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metric(&cluster.nodes[0], "ticketd_mongo_up").await, 1.0, "after");
}

/// A node whose config names activities nobody imported yet (its own
/// `ticketd import` not run, a common slip when adding an activity): Redis
/// knows no code of them, and the node answered their claims with the
/// final `410 SOLD_OUT` — the fans' page stops there — and closed their
/// waiting room as sold out for good. Nothing was sold: the codes are still
/// to come. Now the node warns once per ticket type, a claim hears the
/// retryable `503 NOT_IMPORTED`, the room stays open, and once the import
/// runs the same node sells them, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activities_nobody_imported_are_not_sold_out_and_sell_once_imported() {
    use ticketd::clock::rfc3339_ms;
    let old = cluster_activity("old", 1, 1);
    let mut cluster = Cluster::start(1, &old, "");
    let fresh = cluster_activity("fresh", 2, 1);
    let room = crate::common::Act::new("later")
        .window(&rfc3339_ms(now_ms() - 60_000), &rfc3339_ms(now_ms() + 3_600_000))
        .with("admission = \"queue\"")
        .with(&format!("queue_opens = \"{}\"", rfc3339_ms(now_ms() - 120_000)))
        .with("admit_rate = 100.0")
        .ticket("later-t", "Ticket", crate::common::Codes::Generate(1))
        .toml();
    let config = node_config(&cluster.services, &cluster.db, "node1", "") + &old + &fresh + &room;
    let mut node = TestApp::prepare(&config, &[]);
    node.boot();
    cluster.nodes.push(node);
    let (tokens, _) = users(&cluster, "ni", 2).await;
    let node = &cluster.nodes[1];
    const WARNING: &str = "No code of this ticket type is in Redis: nobody has imported it yet.";
    node.wait_for_log(WARNING, 2);
    let warned: HashSet<String> = node
        .logs
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == WARNING)
        .map(|v| v["ticket"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(warned, HashSet::from(["fresh-t".to_owned(), "later-t".to_owned()]));
    let body = claim_body(&node.client, &tokens[0], "fresh").await;
    let res = node.client.post("/ticket/get", Some(&tokens[0]), &body).await.unwrap();
    assert_error(&res, 503, "NOT_IMPORTED");
    assert_eq!(
        metric(node, "ticketd_claims_total{outcome=\"not_imported\"}").await,
        1.0
    );

    let res = node
        .client
        .post(
            "/queue/join",
            Some(&tokens[1]),
            &serde_json::json!({ "actId": "later" }),
        )
        .await
        .unwrap();
    assert_eq!(res.status, 200, "{}", res.body);
    // Let the room's admitter step twice with the counts read (each step
    // of a shared room reads them first): before, it closed the room here.
    let steps = metric(node, "ticketd_worker_iterations_total{worker=\"admitter\"}").await;
    until("two admitter steps", || async {
        metric(node, "ticketd_worker_iterations_total{worker=\"admitter\"}").await >= steps + 2.0
    })
    .await;
    let status = node
        .client
        .get("/queue/status?actId=later", Some(&tokens[1]))
        .await
        .unwrap();
    assert_eq!(status.data()["state"], "waiting", "{}", status.body);

    let out = node.cli(&["import"], None);
    assert!(out.status.success(), "import: {}", String::from_utf8_lossy(&out.stderr));
    until("the imported codes to sell on the running node", || async {
        let body = claim_body(&node.client, &tokens[0], "fresh").await;
        let res = node.client.post("/ticket/get", Some(&tokens[0]), &body).await.unwrap();
        // Until the node has leased the new codes, retryable answers only.
        if res.status != 200 {
            assert_eq!(res.status, 503, "{}", res.body);
            assert!(
                matches!(res.error_code(), Some("NOT_IMPORTED" | "STOCK_IN_FLIGHT")),
                "{}",
                res.body
            );
        }
        res.status == 200
    })
    .await;
    until("the room to admit its waiting fan", || async {
        let status = node
            .client
            .get("/queue/status?actId=later", Some(&tokens[1]))
            .await
            .unwrap();
        status.data()["state"] == "admitted"
    })
    .await;
    let body = claim_body(&node.client, &tokens[1], "later").await;
    let res = node.client.post("/ticket/get", Some(&tokens[1]), &body).await.unwrap();
    assert_eq!(res.status, 200, "{}", res.body);
}

/// Claims still in a node's backlog for MongoDB (MongoDB down while they
/// were made, then the node killed before it could write them) were
/// missing from `export` and `report` without a word: both read MongoDB
/// alone. Both now say how many are missing (on stderr, and in the
/// report's first paragraph); once the node is back and has written its
/// backlog, the export is whole and says nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_and_report_say_how_many_claims_are_still_in_a_backlog() {
    // A short lease: the restart waits out the killed run's hold on its
    // node id (10 s by default).
    let mut cluster = Cluster::start(1, &cluster_activity("tr", 20, 1), "[cluster]\nlease_ttl = \"2s\"\n");
    let (tokens, _) = users(&cluster, "tr", 5).await;
    cluster.services.stop_mongo();
    for token in &tokens {
        let res = cluster.nodes[0].claim(token, "tr").await;
        assert_eq!(res.status, 200, "{}", res.body);
    }
    cluster.nodes[0].kill9();
    cluster.services.restart_mongo();

    let export = |node: &TestApp| {
        let out = node.cli(&["export", "--activity", "tr", "--format", "csv"], None);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let rows = crate::common::parse_csv(&out.stdout).len();
        (rows, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (rows, stderr) = export(&cluster.nodes[0]);
    assert_eq!(rows, 0, "MongoDB has none of them yet");
    assert!(
        stderr.contains("warning: 5 claims are committed but not yet where this export reads them"),
        "{stderr}"
    );
    let node = &cluster.nodes[0];
    let out = node.cli(&["report", "--activity", "tr", "--out", "tr.html"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("warning: 5 claims are"));
    let html = std::fs::read_to_string(node.dir.path().join("tr.html")).unwrap();
    assert!(
        html.contains("id=\"in-transit\"") && html.contains("5 claims were committed but not yet"),
        "{html}"
    );

    // Back, the node writes its backlog: the export is whole and quiet.
    cluster.nodes[0].boot();
    cluster.drained("tr").await;
    let (rows, stderr) = export(&cluster.nodes[0]);
    assert_eq!(rows, 5);
    assert!(!stderr.contains("warning"), "{stderr}");
    let node = &cluster.nodes[0];
    let out = node.cli(&["report", "--activity", "tr", "--out", "tr.html"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let html = std::fs::read_to_string(node.dir.path().join("tr.html")).unwrap();
    assert!(!html.contains("in-transit"), "a whole report has no warning");
}

/// MongoDB is the record: with Redis down, the export (tool and admin) and
/// the report still read it, and say that the claims still on their way
/// there could not be counted. Both tools refused to start ("cannot use
/// Redis"), and the admin export answered 503, though Redis only answers
/// how many claims a backlog still holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_and_report_read_mongodb_while_redis_is_down() {
    let token = crate::common::ADMIN_TOKEN;
    let admin_config = format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{token}\"\n");
    // And a waiting room, whose record is in Redis.
    let room = crate::common::Act::new("rq")
        .window(&rfc3339_ms(now_ms() - 60_000), &rfc3339_ms(now_ms() + 3_600_000))
        .with("admission = \"queue\"")
        .with(&format!("queue_opens = \"{}\"", rfc3339_ms(now_ms() - 120_000)))
        .ticket("rq-t", "Ticket", crate::common::Codes::Generate(1))
        .toml();
    let mut cluster = Cluster::start(1, &(cluster_activity("rd", 20, 1) + &room), &admin_config);
    let (tokens, _) = users(&cluster, "rd", 4).await;
    let mut codes = HashSet::new();
    for token in &tokens {
        let res = cluster.nodes[0].claim(token, "rd").await;
        assert_eq!(res.status, 200, "{}", res.body);
        codes.insert(res.data()["code"].as_str().unwrap().to_owned());
    }
    cluster.drained("rd").await;
    cluster.services.stop_redis();
    let node = &cluster.nodes[0];
    const UNKNOWN: &str = "warning: Redis could not be asked how many claims are still on their way to MongoDB";

    let out = node.cli(&["export", "--activity", "rd", "--format", "jsonl"], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(crate::common::jsonl_codes(&String::from_utf8_lossy(&out.stdout)), codes);
    assert!(stderr.contains(UNKNOWN) && stderr.contains("this export"), "{stderr}");

    let out = node.cli(&["report", "--activity", "rd", "--out", "rd.html"], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains(UNKNOWN) && stderr.contains("the report"), "{stderr}");
    let html = std::fs::read_to_string(node.dir.path().join("rd.html")).unwrap();
    assert!(
        html.contains("id=\"in-transit\"") && html.contains("could not be asked"),
        "{html}"
    );
    assert!(!html.contains("Waiting room"), "a race has none to miss: {html}");
    let out = node.cli(&["report", "--activity", "rq", "--out", "rq.html"], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: the waiting room's record is in Redis"),
        "{stderr}"
    );
    let html = std::fs::read_to_string(node.dir.path().join("rq.html")).unwrap();
    assert!(html.contains("id=\"queue-unread\""), "{html}");

    let request = format!(
        "POST /admin/export?actId=rd&format=jsonl HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let answer = crate::common::exchange(&node.admin_addr(), request.as_bytes()).await;
    assert_eq!(answer.status, 200, "{} {}", answer.head, answer.body);
    assert_eq!(answer.header("x-claims-in-transit"), Some("unknown"), "{}", answer.head);
    let body = crate::common::unchunked(&answer.head, &answer.body);
    assert_eq!(crate::common::jsonl_codes(&body), codes);

    // Back, the count is known again: none in transit, no warning.
    cluster.services.restart_redis();
    let out = cluster.nodes[0].cli(&["export", "--activity", "rd", "--format", "jsonl"], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !stderr.contains("warning"), "{stderr}");
    // The node's connection comes back by itself, at its next command.
    let admin = cluster.nodes[0].admin_addr();
    until("the admin export to count the claims in transit again", || async {
        let answer = crate::common::exchange(&admin, request.as_bytes()).await;
        answer.header("x-claims-in-transit") == Some("0")
    })
    .await;
}

/// A claim acknowledged in an activity reaches MongoDB even once no node
/// sells that activity any more. Only an activity's sellers reaped and
/// drained its backlogs: the backlogs of nodes that died during a MongoDB
/// outage stayed in Redis for good once the nodes left alive, or restarted,
/// sold the next event only, and the event's exports warned of the
/// missing claims forever. Now every node sweeps the activities MongoDB
/// knows and it does not sell; and one holding such a backlog stays
/// registered in the activity, so if it dies too, another node takes the
/// backlog over in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlogs_of_an_activity_no_node_sells_any_more_still_reach_mongodb() {
    const SWEEPING: &str = "Sweeping the backlogs of the activities MongoDB knows and this node does not sell.";
    let extra = "[cluster]\nlease_ttl = \"2s\"\n";
    let mut cluster = Cluster::start(2, &cluster_activity("lo", 20, 1), extra);
    // node2 sells the next event only.
    let lp = cluster_activity("lp", 5, 1);
    let next: Vec<String> = ["node0", "node2"]
        .iter()
        .map(|node| node_config(&cluster.services, &cluster.db, node, extra) + &lp)
        .collect();
    let mut node2 = TestApp::prepare(&next[1], &[]);
    let out = node2.cli(&["import"], None);
    assert!(out.status.success(), "import: {}", String::from_utf8_lossy(&out.stderr));
    node2.boot();
    until("node2 to list what it sweeps", || async {
        node2.count_logs(SWEEPING) > 0
    })
    .await;
    cluster.nodes.push(node2);

    let (tokens, _) = users(&cluster, "lo", 6).await;
    cluster.services.stop_mongo();
    for (i, token) in tokens.iter().enumerate() {
        let res = cluster.nodes[i % 2].claim(token, "lo").await;
        assert_eq!(res.status, 200, "{}", res.body);
    }
    // Both sellers die at once, before either could reap the other: node2
    // takes over their backlogs, and cannot write them while MongoDB is down.
    cluster.nodes[1].kill9();
    cluster.nodes[0].kill9();
    let outbox = |node: &str| format!("tk:{{lo}}:outbox:{node}");
    until("node2 to take over both backlogs", || async {
        llen(&cluster, &outbox("node2")).await == 6
    })
    .await;
    // Then node2 dies too, and node0 comes back selling the next event.
    cluster.nodes[2].kill9();
    cluster.services.restart_mongo();
    std::fs::write(cluster.nodes[0].config_path(), &next[0]).unwrap();
    cluster.nodes[0].boot();

    assert_eq!(cluster.drained("lo").await.len(), 6);
    let out = cluster.nodes[0].cli(&["export", "--activity", "lo", "--format", "csv"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(crate::common::parse_csv(&out.stdout).len(), 6);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("warning"));
    until("every backlog to empty", || async {
        let mut left = 0;
        for node in ["node0", "node1", "node2"] {
            left += llen(&cluster, &outbox(node)).await;
        }
        left == 0
    })
    .await;
}

/// A live node that reaps a dead node's backlog while MongoDB is down holds
/// those claims in its own backlog, but its `ticketd_mongo_backlog` gauge
/// stayed at what the node had committed itself (here 0): the writer
/// counted the backlog only after a pass that reached MongoDB. The export
/// warning tells organisers to wait for that gauge to reach 0, so it must
/// count every claim waiting; now each pass counts first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reaped_backlog_shows_in_the_reapers_gauge_while_mongodb_is_down() {
    let mut cluster = Cluster::start(2, &cluster_activity("rb", 20, 1), "[cluster]\nlease_ttl = \"2s\"\n");
    let (tokens, _) = users(&cluster, "rb", 5).await;
    cluster.services.stop_mongo();
    for token in &tokens {
        let res = cluster.nodes[1].claim(token, "rb").await;
        assert_eq!(res.status, 200, "{}", res.body);
    }
    let gauge = "ticketd_mongo_backlog";
    until("node1's backlog to show the five claims", || async {
        metric(&cluster.nodes[1], gauge).await == 5.0
    })
    .await;
    assert_eq!(metric(&cluster.nodes[0], gauge).await, 0.0);
    cluster.nodes[1].kill9();
    until("node0 to reap node1's backlog", || async {
        let len = llen(&cluster, "tk:{rb}:outbox:node1").await;
        len == 0
    })
    .await;
    until("node0's gauge to count the reaped claims", || async {
        metric(&cluster.nodes[0], gauge).await == 5.0
    })
    .await;

    cluster.services.restart_mongo();
    assert_eq!(cluster.drained("rb").await.len(), 5);
    until("node0's gauge to reach 0", || async {
        metric(&cluster.nodes[0], gauge).await == 0.0
    })
    .await;
}

/// Nodes whose configs disagree on `per_user_limit` (one node reloaded
/// with a lower limit, the other not yet: a rolling reload, or a node
/// forgotten) each enforced their own in the commit script, so a user
/// held up to the highest through the node that had it. The commit now
/// holds to the lowest limit of the live nodes; the node that sees a
/// difference says so; a raise applies once every node has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_that_disagree_on_the_limit_hold_to_the_lowest() {
    let act = cluster_activity("lm", 20, 2);
    let cluster = Cluster::start(2, &act, "");
    let (tokens, _) = users(&cluster, "lm", 2).await;
    // Both nodes have leased (so both are live in Redis) before the reload.
    for (node, token) in cluster.nodes.iter().zip(&tokens) {
        let res = node.claim(token, "lm").await;
        assert_eq!(res.status, 200, "{}", res.body);
    }
    let config = cluster.nodes[1].reload_replacing("per_user_limit = 2", "per_user_limit = 1");
    let warned = cluster.nodes[1].wait_for_log(
        "per_user_limit differs across the live nodes: claims hold to the lowest until every node has the same.",
        1,
    );
    assert_eq!(
        (
            warned["here"].as_u64(),
            warned["lowest"].as_u64(),
            warned["highest"].as_u64()
        ),
        (Some(1), Some(1), Some(2)),
        "{warned}"
    );

    // Through node0, whose config still says 2: held to 1.
    let res = cluster.nodes[0].claim(&tokens[0], "lm").await;
    assert_error(&res, 409, "LIMIT_REACHED");

    // Raised back on node1: every node says 2 again, and so does the commit.
    let outcome = cluster.nodes[1].reload(&config);
    assert_eq!(outcome["message"], "Config reloaded.", "{outcome}");
    let res = cluster.nodes[0].claim(&tokens[0], "lm").await;
    assert_eq!(res.status, 200, "{}", res.body);
    cluster.nodes[0].assert_verified();
}

/// Nodes with the activity in their own files are paused one reload at a
/// time; one left out sells on while the others refuse, and nothing said
/// so. Now each node records its pause in Redis beside its limit, and a
/// node that sees the live nodes differ says so, once per change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_on_some_nodes_only_is_said() {
    const DIFFERS: &str =
        "paused differs across the live nodes: those not paused sell on while the others refuse. Nodes serving MongoDB's activities agree within cluster.refresh_interval; nodes with the activity in their own files each need a reload with the same setting.";
    let act = cluster_activity("pz", 20, 5);
    let cluster = Cluster::start(2, &act, "");
    let (tokens, _) = users(&cluster, "pz", 1).await;
    // Both nodes have leased (so both are live in Redis) before the reload.
    for node in &cluster.nodes {
        let res = node.claim(&tokens[0], "pz").await;
        assert_eq!(res.status, 200, "{}", res.body);
    }
    let pause = ("[[activity]]\n", "[[activity]]\npaused = true\n");
    cluster.nodes[1].reload_replacing(pause.0, pause.1);
    assert_error(&cluster.nodes[1].claim(&tokens[0], "pz").await, 409, "PAUSED");
    assert_eq!(cluster.nodes[0].claim(&tokens[0], "pz").await.status, 200);
    // Said by the node reloaded, and by the other at its next heartbeat.
    let here = cluster.nodes[1].wait_for_log(DIFFERS, 1);
    assert_eq!(here["paused_here"], true, "{here}");
    let there = cluster.nodes[0].wait_for_log(DIFFERS, 1);
    assert_eq!(there["paused_here"], false, "{there}");

    // Both paused: nothing more to say, and nobody sells.
    cluster.nodes[0].reload_replacing(pause.0, pause.1);
    assert_error(&cluster.nodes[0].claim(&tokens[0], "pz").await, 409, "PAUSED");
    assert_eq!(
        (
            cluster.nodes[0].count_logs(DIFFERS),
            cluster.nodes[1].count_logs(DIFFERS)
        ),
        (1, 1)
    );
}

/// On a Redis Cluster, the client re-sends a call whose connection dropped
/// before its answer came back, and the call may have run. A lease that
/// ran twice moved two batches into the node's lease set and the node
/// pooled only the second: the first was renewed with every heartbeat,
/// sold by nobody, and claims heard `STOCK_IN_FLIGHT` to the end. A lease
/// now carries a call id, and a re-sent one answers the same codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_whose_answer_was_lost_is_not_leased_twice() {
    let (services, relay) = Services::start_with_relayed_redis_cluster();
    // The first call naming the lease set is the node's first lease.
    relay.cut_answer_to(b":lease:lx-t:");
    let cluster = Cluster::start_on(services, 1, &cluster_activity("lx", 20, 1), "", |c| c);
    let (tokens, _) = users(&cluster, "lx", 20).await;
    for token in &tokens {
        let res = cluster.nodes[0].claim(token, "lx").await;
        assert_eq!(res.status, 200, "{}", res.body);
    }
    assert_eq!(relay.cuts(), 1, "no lease's answer was lost");
    assert_error(&cluster.nodes[0].claim(&tokens[0], "lx").await, 409, "LIMIT_REACHED");
    cluster.nodes[0].assert_verified();
}

/// `ticketd verify` held a cluster's users to the per-user limit MongoDB
/// kept from the last import, so after a reload raised the limit every
/// user who claimed up to the new one was reported "over the limit". Each
/// commit now records in Redis the highest limit it held claims to, and
/// verify holds users to that (or MongoDB's, if higher).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_under_a_limit_a_reload_raised_verify() {
    let cluster = Cluster::start(1, &cluster_activity("rr", 10, 1), "");
    let (tokens, _) = users(&cluster, "rr", 1).await;
    let node = &cluster.nodes[0];
    let res = node.claim(&tokens[0], "rr").await;
    assert_eq!(res.status, 200, "{}", res.body);
    assert_error(&node.claim(&tokens[0], "rr").await, 409, "LIMIT_REACHED");

    let config = std::fs::read_to_string(node.config_path()).unwrap();
    let raised = config.replace("per_user_limit = 1", "per_user_limit = 2");
    assert_ne!(config, raised);
    let outcome = node.reload(&raised);
    assert_eq!(outcome["message"], "Config reloaded.", "{outcome}");
    let res = node.claim(&tokens[0], "rr").await;
    assert_eq!(res.status, 200, "{}", res.body);
    node.assert_verified();
}

/// `/admin/export` on a cluster node reads MongoDB, and streams it: the
/// reading runs on a blocking thread, which must reach the cluster's own
/// runtime from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_export_streams_from_mongodb() {
    let token = crate::common::ADMIN_TOKEN;
    let admin_config = format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{token}\"\n");
    let cluster = Cluster::start(1, &cluster_activity("ae", 600, 1), &admin_config);
    let (tokens, _) = users(&cluster, "ae", 600).await;
    let node = &cluster.nodes[0];
    let mut codes = std::collections::HashSet::new();
    // A burst may outrun the node's leases: STOCK_IN_FLIGHT says retry.
    let claim = |token: String| async move {
        let mut res = node.claim(&token, "ae").await;
        for _ in 0..200 {
            if res.error_code() != Some("STOCK_IN_FLIGHT") {
                break;
            }
            res = node.claim(&token, "ae").await;
        }
        res
    };
    for chunk in tokens.chunks(100) {
        for res in join_all(chunk.iter().cloned().map(claim)).await {
            assert_eq!(res.status, 200, "{}", res.body);
            codes.insert(res.data()["code"].as_str().unwrap().to_owned());
        }
    }
    until("MongoDB to hold every claim", || async {
        cluster.mongo_claims("ae").await.len() == 600
    })
    .await;
    let request = format!(
        "POST /admin/export?actId=ae&format=jsonl HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let answer = crate::common::exchange(&node.admin_addr(), request.as_bytes()).await;
    assert_eq!(answer.status, 200, "{} {}", answer.head, answer.body);
    let body = crate::common::unchunked(&answer.head, &answer.body);
    // More than one chunk of 64 KiB: the reading went on past the first.
    assert!(body.len() > 64 * 1024, "{} bytes", body.len());
    assert_eq!(crate::common::jsonl_codes(&body), codes);
}

/// A ticket type moved to another activity is refused by `ticketd import`
/// and, on one node, by a start or a reload. A cluster node checked a
/// reload only against its running config and a start not at all, so a
/// node started with the ticket type under another activity sold it there,
/// against that activity's master list, which holds none of its codes
/// (`NOT_IMPORTED` for good). It now checks against MongoDB's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_a_ticket_type_moved_to_another_activity() {
    let services = Services::start();
    let act = |id: &str| {
        let (start, end) = (rfc3339_ms(now_ms() - 60_000), rfc3339_ms(now_ms() + 3_600_000));
        crate::common::Act::new(id)
            .window(&start, &end)
            .ticket("mv-t", "T", crate::common::Codes::Generate(3))
            .toml()
    };
    let mut node = TestApp::prepare(&(node_config(&services, "mv", "node0", "") + &act("mv-a")), &[]);
    let out = node.cli(&["import"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(
        node.config_path(),
        node_config(&services, "mv", "node0", "") + &act("mv-b"),
    )
    .unwrap();
    let err = crate::common::serve_refused(
        node.dir.path(),
        Duration::from_secs(30),
        "the node served a ticket type moved to another activity",
    );
    assert!(
        err.contains("ticket type `mv-t` moved from activity `mv-a` to `mv-b`"),
        "{err}"
    );
    // As imported, it serves.
    std::fs::write(
        node.config_path(),
        node_config(&services, "mv", "node0", "") + &act("mv-a"),
    )
    .unwrap();
    node.boot();
    let token = node.register("mv-fan").await;
    assert_eq!(node.claim(&token, "mv-a").await.status, 200);
    // The refused start let go of the node id: no wait for it to lapse.
    assert_eq!(
        node.count_logs(
            "This node id is held: by this node's previous run until its hold expires, or by another node \
             running with the same node_id. Waiting for it to expire."
        ),
        0
    );
}

/// `/admin/stats` on a cluster node shows its store — Redis and MongoDB up
/// or not, the claims waiting for MongoDB, the codes leased to the node —
/// which only `/metrics` had: what an operator looks at first in an outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_stats_show_the_cluster_store() {
    let token = crate::common::ADMIN_TOKEN;
    let admin_config = format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{token}\"\n");
    let mut cluster = Cluster::start(1, &cluster_activity("as", 10, 1), &admin_config);
    let (tokens, _) = users(&cluster, "as", 1).await;
    let node = &cluster.nodes[0];
    let addr = node.admin_addr();
    let admin = ApiClient::new(vec![format!("http://{addr}")], 2).unwrap();
    let store = || async {
        let stats = admin.get("/admin/stats", Some(token)).await.unwrap();
        assert_eq!(stats.status, 200, "{}", stats.body);
        stats.data()["cluster"].clone()
    };
    until("the node to lease codes", || async {
        let c = store().await;
        assert_eq!(
            (c["redisUp"].as_bool(), c["mongoUp"].as_bool()),
            (Some(true), Some(true)),
            "{c}"
        );
        assert_eq!(c["mongoBacklog"], 0, "{c}");
        c["leased"][0]["codes"].as_u64().unwrap_or(0) > 0 && c["leased"][0]["actId"] == "as"
    })
    .await;

    cluster.services.stop_mongo();
    let node = &cluster.nodes[0];
    let res = node.claim(&tokens[0], "as").await;
    assert_eq!(res.status, 200, "{}", res.body);
    until("the stats to show MongoDB down and the claim waiting", || async {
        let c = store().await;
        c["mongoUp"] == false && c["mongoBacklog"] == 1 && c["redisUp"] == true
    })
    .await;
}

/// `CONFIG SET` of `settings`, at once.
async fn config_set(redis: &mut ticketd::store::cluster::RedisConn, settings: &[(&str, &str)]) {
    let mut cmd = redis::cmd("CONFIG");
    cmd.arg("SET");
    for (setting, value) in settings {
        cmd.arg(*setting).arg(*value);
    }
    let () = cmd.query_async(redis).await.unwrap();
}

/// A node's promise that a code goes to one user rests on Redis keeping
/// what it acknowledged: a Redis that loses its last second of writes in a
/// crash can hand a claimed code out again. A node now refuses to serve on
/// a Redis that does not say `appendonly yes` and `appendfsync always`,
/// saying what to set; `cluster.allow_volatile_redis = true` (a demo, a
/// benchmark) serves all the same, with a warning. So is one that skips its
/// fsyncs while rewriting the AOF, or evicts keys when its memory fills
/// (the claimed codes, the users' counts, the backlog are keys): served on
/// before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_a_redis_that_could_lose_acknowledged_claims() {
    let services = Services::start();
    let mut redis = services.redis().await;
    let act = cluster_activity("vol", 3, 1);
    let node_config = |extra: &str| node_config(&services, "vol", "node0", extra) + &act;
    // `maxmemory` with `noeviction`: a full Redis refuses commits, loses none.
    config_set(&mut redis, &[("maxmemory", "64mb"), ("maxmemory-policy", "noeviction")]).await;
    let mut node = TestApp::prepare(&node_config(""), &[]);
    assert!(node.cli(&["import"], None).status.success());
    node.boot();
    let token = node.register("vol-evict").await;
    assert_eq!(node.claim(&token, "vol").await.status, 200);
    assert_eq!(node.stop(), 0);
    // Each in turn, on top of the ones before: what Redis says, and what
    // the refusal must name.
    for (settings, says) in [
        (
            &[("maxmemory-policy", "allkeys-lru")][..],
            &[
                "maxmemory 67108864 and maxmemory-policy allkeys-lru",
                "maxmemory-policy noeviction",
            ][..],
        ),
        (
            &[("maxmemory-policy", "noeviction"), ("no-appendfsync-on-rewrite", "yes")],
            &["no-appendfsync-on-rewrite yes", "no-appendfsync-on-rewrite no"],
        ),
        (
            &[("no-appendfsync-on-rewrite", "no"), ("appendfsync", "everysec")],
            &["appendfsync everysec", "appendonly yes", "appendfsync always"],
        ),
        (
            &[("appendonly", "no")],
            &["appendonly no", "appendonly yes", "appendfsync always"],
        ),
    ] {
        config_set(&mut redis, settings).await;
        let node = TestApp::prepare(&node_config(""), &[]);
        let err = crate::common::serve_refused(
            node.dir.path(),
            Duration::from_secs(30),
            &format!("the node served on a Redis with {}", says[0]),
        );
        assert!(
            says.iter().all(|s| err.contains(s)) && err.contains("allow_volatile_redis"),
            "{err}"
        );
        // `ticketd import` refuses it too (it pushed every code, and the
        // nodes then would not start).
        let out = node.cli(&["import"], None);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && says.iter().all(|s| err.contains(s)), "{err}");
    }
    let mut node = TestApp::prepare(&node_config("[cluster]\nallow_volatile_redis = true\n"), &[]);
    assert!(node.cli(&["import"], None).status.success());
    node.boot();
    let warned = node.wait_for_log(
        "Redis may lose claims it acknowledged (cluster.allow_volatile_redis = true): never run a sale like this.",
        1,
    );
    assert_eq!(warned["appendonly"], "no", "{warned}");
    let token = node.register("vol").await;
    assert_eq!(node.claim(&token, "vol").await.status, 200);
}

/// A second node started under a running node's id waits out the hold
/// (it may be the same node's previous run) and is then refused, naming
/// the id; the wait is said once (it was said twenty times, as "the
/// previous holder", of a node alive and well).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_under_a_running_nodes_id_is_refused() {
    let extra = "[cluster]\nlease_ttl = \"2s\"\n";
    let cluster = Cluster::start(1, &cluster_activity("dup", 3, 1), extra);
    let twin = TestApp::prepare(
        &(node_config(&cluster.services, &cluster.db, "node0", extra) + &cluster_activity("dup", 3, 1)),
        &[],
    );
    let err = crate::common::serve_refused(
        twin.dir.path(),
        Duration::from_secs(30),
        "a second node0 served beside the first",
    );
    assert!(err.contains("another node called `node0` is running"), "{err}");
    assert_eq!(err.matches("This node id is held").count(), 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // A SIGTERM during the wait stops the node there, exit 0 (the wait went
    // on to its end, then a start or a refusal: exit 1). Its wait here is
    // 11 s, far past the signal.
    let patient = TestApp::prepare(
        &(node_config(
            &cluster.services,
            &cluster.db,
            "node0",
            "[cluster]\nlease_ttl = \"10s\"\n",
        ) + &cluster_activity("dup", 3, 1)),
        &[],
    );
    let said = tokio::task::block_in_place(|| {
        use std::io::BufRead;
        let mut child = crate::common::spawn_ticketd(patient.dir.path(), &["serve"]);
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let mut said = String::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            said += &line;
            said.push('\n');
            if line.contains("This node id is held") {
                break;
            }
        }
        // SAFETY: a signal to our own child.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
        for line in lines {
            said += &line.unwrap();
            said.push('\n');
        }
        let status = child.wait().unwrap();
        assert!(status.success(), "{status}: {said}");
        said
    });
    assert!(
        said.contains("Stopped before serving.") && said.contains("stopped while waiting for this node id"),
        "{said}"
    );
    // The first node serves on.
    let (tokens, _) = users(&cluster, "dup", 1).await;
    assert_eq!(cluster.nodes[0].claim(&tokens[0], "dup").await.status, 200);
}

/// A Redis that stops keeping every write while a node serves (restarted
/// under another config — without its AOF it comes back empty — or
/// changed by `CONFIG SET`) was asked only at the node's start: claims went
/// on, acknowledged and losable, with `/healthz` green. The node now asks
/// again every 2 s, refuses claims while Redis is unfit, and takes them
/// again once it is fit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_stops_keeping_every_write_stops_the_claims_until_it_does() {
    let cluster = Cluster::start_configured(1, &cluster_activity("dw", 10, 1), "", crate::common::with_admin);
    let node = &cluster.nodes[0];
    let (tokens, _) = users(&cluster, "dw", 2).await;
    assert_eq!(node.claim(&tokens[0], "dw").await.status, 200);
    let mut redis = cluster.services.redis().await;
    config_set(&mut redis, &[("appendfsync", "everysec")]).await;
    until("the node to say it is unhealthy", || async {
        node.client.get("/healthz", None).await.unwrap().status == 503
    })
    .await;
    assert_eq!(metric(node, "ticketd_redis_durable").await, 0.0);
    let refused = node.claim(&tokens[1], "dw").await;
    assert_eq!(
        (refused.status, refused.error_code()),
        (503, Some("STORE_UNAVAILABLE")),
        "{}",
        refused.body
    );
    node.wait_for_log(
        "Redis no longer keeps every write it acknowledges (restarted with another config, or reconfigured); \
         claims are refused until it does.",
        1,
    );
    // The operator's page says so: it said "Redis up" in the normal
    // colour while the node sold nothing.
    let profile = tempfile::tempdir().unwrap();
    let url = format!(
        "http://{}/admin#token={}",
        node.admin_addr(),
        crate::common::ADMIN_TOKEN
    );
    let (dom, _) = tokio::task::block_in_place(|| {
        crate::browser::chromium(&["--virtual-time-budget=3000", "--dump-dom", &url], profile.path())
    });
    assert!(dom.contains("Redis up but NOT DURABLE (claims refused)"), "{dom}");
    config_set(&mut redis, &[("appendfsync", "always")]).await;
    until("the node to say it is healthy again", || async {
        node.client.get("/healthz", None).await.unwrap().status == 200
    })
    .await;
    // As a good client does, asking again while the node's codes come back
    // (STOCK_IN_FLIGHT) until its claim is taken.
    until("the claim to be taken", || async {
        let res = node.claim(&tokens[1], "dw").await;
        assert!(
            res.status == 200 || res.error_code() == Some("STOCK_IN_FLIGHT"),
            "{}",
            res.body
        );
        res.status == 200
    })
    .await;
}

/// The rush statistics a node records each second (outcomes, sources,
/// latency: what the report draws) were dropped when MongoDB refused them,
/// so a report after an outage had a hole exactly where the trouble was.
/// The node now keeps what it could not store (bounded) and stores it once
/// MongoDB is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rush_statistics_made_while_mongodb_is_down_reach_it_later() {
    let mut cluster = Cluster::start(1, &cluster_activity("st", 20, 1), "");
    let (tokens, _) = users(&cluster, "st", 6).await;
    assert_eq!(cluster.nodes[0].claim(&tokens[0], "st").await.status, 200);
    until("the first claim's statistics in MongoDB", || async {
        successes(&cluster, "st").await == 1
    })
    .await;

    cluster.services.stop_mongo();
    for token in &tokens[1..] {
        assert_eq!(cluster.nodes[0].claim(token, "st").await.status, 200);
    }
    let failed = "ticketd_worker_errors_total{worker=\"stats-flush\"}";
    let before = metric(&cluster.nodes[0], failed).await;
    until("a statistics flush to fail", || async {
        metric(&cluster.nodes[0], failed).await > before
    })
    .await;
    cluster.services.restart_mongo();
    until("the outage's statistics in MongoDB", || async {
        successes(&cluster, "st").await == 6
    })
    .await;
}

/// Successful claims of `act` in the rush statistics MongoDB holds.
async fn successes(cluster: &Cluster, act: &str) -> i64 {
    use futures::TryStreamExt;
    let ticks: Vec<Document> = cluster
        .mongo()
        .await
        .collection::<Document>("stats_outcome_ticks")
        .find(doc! {"activity_id": act, "outcome": "success"})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    ticks.iter().map(|t| t.get_i64("count").unwrap()).sum()
}

/// Two nodes leasing `rp` (limit 2): node0 sells ticket types `rp-a` and
/// `rp-b`, node1 only `rp-a`; returns once node0 holds a lease of `rp-b`.
async fn one_node_sells_more_ticket_types() -> Cluster {
    let act = crate::common::Act::new("rp")
        .window(&rfc3339_ms(now_ms() - 60_000), &rfc3339_ms(now_ms() + 3_600_000))
        .limit(2)
        .ticket("rp-a", "A", crate::common::Codes::Generate(10))
        .ticket("rp-b", "B", crate::common::Codes::Generate(10))
        .toml();
    let only_a = |config: String| {
        if !config.contains("node_id = \"node1\"") {
            return config;
        }
        let cut = config
            .find("  [[activity.ticket]]\n  id = \"rp-b\"")
            .expect("rp-b's table");
        config[..cut].to_owned()
    };
    let cluster = Cluster::start_configured(2, &act, "[cluster]\nlease_ttl = \"2s\"\n", only_a);
    until("node0 to lease rp-b", || async {
        scard(&cluster, "tk:{rp}:lease:rp-b:node0").await > 0
    })
    .await;
    cluster
}

/// A node killed with a lease of a ticket type its reaper does not sell:
/// the reaper returned only its own ticket types' leases and dropped the
/// dead node from the live set, so nobody would ever return the rest —
/// those codes were lost to the sale. The reaper now also returns the
/// leases of every ticket type the activity's codes were pushed or leased for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_lease_of_a_ticket_type_its_reaper_does_not_sell_is_returned() {
    let mut cluster = one_node_sells_more_ticket_types().await;
    let lease_b = "tk:{rp}:lease:rp-b:node0";
    let held = scard(&cluster, lease_b).await;
    cluster.nodes[0].kill9();
    until("node1 to reap node0", || async {
        metric(&cluster.nodes[1], "ticketd_leases_reaped_total").await >= 1.0
    })
    .await;
    assert!(held > 0, "node0 leased none of rp-b");
    assert_lease_returned(&cluster, lease_b, "tk:{rp}:stock:rp-b", 10).await;
    cluster.nodes[1].assert_verified();
}

/// A node frozen past its lease was reaped by a node that sells only one of
/// its two ticket types: the reaper returned that one's lease and not the
/// other's. When the frozen node woke, it heard "reclaimed" and dropped its
/// local codes of both — while Redis still held the other ticket type's
/// codes in its lease, which it then renewed forever and never sold. A node
/// told it was reclaimed now also gives back whatever Redis still lists
/// under it, so every code of that ticket type is sold. (The reaper now
/// returns such a lease itself too, when `tk:{A}:tickets` names the ticket
/// type: the test removes that set to see this fix alone.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reaped_by_one_that_does_not_sell_all_its_tickets_strands_no_code() {
    let cluster = one_node_sells_more_ticket_types().await;
    cluster.nodes[0].signal(libc::SIGSTOP);
    // As data written before `tk:{A}:tickets` existed: the reaper then
    // knows only its own ticket type (its leases name it again), so what
    // is tested is the woken node giving the rest back itself.
    let mut r = cluster.services.redis().await;
    let _: () = redis::cmd("DEL")
        .arg("tk:{rp}:tickets")
        .query_async(&mut r)
        .await
        .unwrap();
    until("node1 to reap node0", || async {
        metric(&cluster.nodes[1], "ticketd_leases_reaped_total").await >= 1.0
    })
    .await;
    cluster.nodes[0].signal(libc::SIGCONT);

    // Every code of rp-b is still for sale, through node0 (which leases
    // again once awake; the codes stranded before never came back).
    let (tokens, _) = users(&cluster, "rp", 10).await;
    let node = &cluster.nodes[0];
    for token in &tokens {
        let mut body = node.claim_body(token, "rp").await;
        body["ticketId"] = "rp-b".into();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let res = node.client.post("/ticket/get", Some(token), &body).await.unwrap();
            if res.status == 200 {
                break;
            }
            assert!(
                res.status == 503 && Instant::now() < deadline,
                "rp-b's codes did not all come back: {}",
                res.body
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    node.assert_verified();
}

/// Scripts Redis has run so far (`EVALSHA` and `EVAL`).
async fn scripts_run(cluster: &Cluster) -> u64 {
    command_calls(cluster, "evalsha").await + command_calls(cluster, "eval").await
}

/// Every `/act/detail` ran a script on Redis — anonymous requests too, on
/// the Redis every node's claims commit through — so a crowd (or a bot)
/// refreshing an activity's page at the start was that many scripts. Now
/// the requests asking at once share a look at the counts that began after
/// they asked: 300 at once cost a handful, and a claim just made is still
/// counted by the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crowd_asking_for_an_activity_shares_its_looks_at_redis() {
    let cluster = Cluster::start(1, &cluster_activity("cd", 50, 1), "");
    let node = &cluster.nodes[0];
    let (tokens, _) = users(&cluster, "cd", 1).await;
    let client = node.client_clone();
    let before = scripts_run(&cluster).await;
    let answers = join_all((0..300).map(|_| {
        let client = client.clone();
        async move { client.get("/act/detail?actId=cd", None).await.unwrap() }
    }))
    .await;
    let ran = scripts_run(&cluster).await - before;
    assert!(answers.iter().all(|a| a.status == 200));
    // Unshared, each request ran one (300 or more). Shared, a handful, plus
    // the node's own scripts meanwhile (leases, heartbeats, refreshes),
    // which on a loaded box (the suite beside it) ran to 66 once: so the
    // bound is half of the unshared count, not a handful.
    assert!(ran < 150, "300 requests ran {ran} scripts");
    assert_eq!(node.claim(&tokens[0], "cd").await.status, 200);
    assert_eq!(node.detail("cd").await["claimed"], 1, "the next look counts the claim");
}

/// The ports of the Redis Cluster master that serves `key`'s slot and of
/// its replica, from the cluster's own view (`CLUSTER KEYSLOT`, `CLUSTER
/// NODES` asked of the first server).
pub(crate) async fn master_and_replica(services: &Services, key: &str) -> (u16, u16) {
    let client = redis::Client::open(services.redis_url()).unwrap();
    let mut r = client.get_multiplexed_async_connection().await.unwrap();
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(&mut r)
        .await
        .unwrap();
    let nodes: String = redis::cmd("CLUSTER").arg("NODES").query_async(&mut r).await.unwrap();
    let rows: Vec<Vec<&str>> = nodes.lines().map(|l| l.split_whitespace().collect()).collect();
    let port = |row: &[&str]| -> u16 {
        row[1]
            .split(['@', ','])
            .next()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let serves = |row: &[&str]| {
        row[8..].iter().any(|range| {
            let (lo, hi) = range.split_once('-').unwrap_or((range, range));
            matches!((lo.parse::<u16>(), hi.parse::<u16>()), (Ok(lo), Ok(hi)) if (lo..=hi).contains(&slot))
        })
    };
    let master = rows
        .iter()
        .find(|r| r[2].contains("master") && r.len() > 8 && serves(r))
        .unwrap_or_else(|| panic!("no master serves slot {slot}:\n{nodes}"));
    let replica = rows
        .iter()
        .find(|r| r[2].contains("slave") && r[3] == master[0])
        .unwrap_or_else(|| panic!("the master of slot {slot} has no replica:\n{nodes}"));
    (port(master), port(replica))
}

/// A command to one server of the Redis Cluster (not routed by key).
pub(crate) async fn on_server<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> redis::RedisResult<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let mut r = client.get_multiplexed_async_connection().await?;
    cmd.query_async(&mut r).await
}

/// `replica` falls behind `master`: frozen (`SIGSTOP`) and cut off (what
/// the master had sent before sits in the replica's socket and is still
/// read when it thaws; what comes after the cut never reaches it). Returns
/// the frozen process.
pub(crate) async fn freeze_and_cut_off(services: &Services, master: u16, replica: u16) -> u32 {
    let frozen = services.redis_cluster_pid(replica);
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(frozen as i32, libc::SIGSTOP) };
    let cut: usize = on_server(master, redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("replica"))
        .await
        .unwrap();
    assert_eq!(cut, 1);
    frozen
}

/// `master` dies (`kill -9`) and its `replica`, frozen as process `frozen`,
/// thaws and takes over (`CLUSTER FAILOVER TAKEOVER`), until it is the
/// master and the cluster is whole.
pub(crate) async fn kill_master_and_take_over(services: &Services, master: u16, replica: u16, frozen: u32) {
    let gone = services.redis_cluster_pid(master);
    // SAFETY: signalling our own child processes.
    unsafe {
        libc::kill(gone as i32, libc::SIGKILL);
        libc::kill(frozen as i32, libc::SIGCONT);
    }
    let () = on_server(replica, redis::cmd("CLUSTER").arg("FAILOVER").arg("TAKEOVER"))
        .await
        .unwrap();
    until("the replica to take over", || async {
        let role: redis::RedisResult<Vec<redis::Value>> = on_server(replica, &redis::cmd("ROLE")).await;
        let info: redis::RedisResult<String> = on_server(replica, redis::cmd("CLUSTER").arg("INFO")).await;
        matches!(role.as_deref(), Ok([redis::Value::BulkString(r), ..]) if r == b"master")
            && info.is_ok_and(|i| i.contains("cluster_state:ok"))
    })
    .await;
}

/// The old `master` comes back and follows `replica`, now the master,
/// and holds everything the new master had once it was listed as its
/// replica. Listed "online" is not enough: after a diskless full sync,
/// Redis 7 streams the writes made since only once the replica's first
/// acknowledgement arrives, so a `WAIT` just after it timed out (seen on
/// a loaded box).
pub(crate) async fn rejoin_as_replica(services: &mut Services, master: u16, replica: u16) {
    services.restart_redis_cluster_server(master);
    until("the old master to follow the new one", || async {
        let info: redis::RedisResult<String> = on_server(replica, redis::cmd("INFO").arg("replication")).await;
        info.is_ok_and(|i| i.contains(&format!("port={master},state=online")))
    })
    .await;
    let info = |port: u16, field: &'static str| async move {
        let info: String = on_server(port, redis::cmd("INFO").arg("replication")).await.ok()?;
        let line = info.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
        line.trim().parse::<i64>().ok()
    };
    let written = info(replica, "master_repl_offset")
        .await
        .expect("the new master's offset");
    until("the old master to hold what the new one had", || async {
        info(master, "slave_repl_offset")
            .await
            .is_some_and(|held| held >= written)
    })
    .await;
    // And every server's topology has it as a replica, not failed: a node
    // that starts now counts replicas from `CLUSTER NODES` of whichever
    // server it asks, and one still flagging the old master failed gave
    // none ("has 0 replica(s)"). Redis took 5 s to sync a replica, which
    // left the gossip time enough; it syncs at once now.
    let me = format!("127.0.0.1:{master}@");
    let ports = services.redis_cluster_ports();
    until("every server to see the old master as a replica", || async {
        for &port in &ports {
            let nodes: redis::RedisResult<String> = on_server(port, redis::cmd("CLUSTER").arg("NODES")).await;
            let Ok(nodes) = nodes else { return false };
            let ok = nodes.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.get(1).is_some_and(|a| a.starts_with(&me))
                    && f.get(2).is_some_and(|flags| {
                        flags.split(',').any(|x| x == "slave") && !flags.split(',').any(|x| x == "fail" || x == "fail?")
                    })
            });
            if !ok {
                return false;
            }
        }
        true
    })
    .await;
}

/// Redis Cluster with replicas: a failover promotes a replica that has
/// only what reached it. Before, a node answered a claim once the master
/// had it, so with the replica behind (frozen here), a `kill -9` of the
/// master and a failover lost claims the fans had been told were theirs,
/// and their codes were for sale again. A node now waits for
/// `cluster.replica_acks` replicas (Redis `WAIT`) before answering, answers
/// 503 when they do not confirm in time, and writes to MongoDB only what a
/// replica holds; it refuses a replicated Redis while `replica_acks` is 0,
/// and one with fewer replicas than it asks for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_to_a_replica_loses_no_acknowledged_claim() {
    let services = Services::start_with_replicated_redis_cluster();
    let act = cluster_activity("rp", 30, 1);
    for (extra, says) in [
        ("", "Set cluster.replica_acks = 1"),
        ("[cluster]\nreplica_acks = 2\n", "cluster.replica_acks = 2, but Redis"),
    ] {
        let node = TestApp::prepare(&(node_config(&services, "ticketd_test", "node0", extra) + &act), &[]);
        let err = crate::common::serve_refused(
            node.dir.path(),
            Duration::from_secs(30),
            &format!("the node served on a Redis with a replica per master ({extra:?})"),
        );
        assert!(err.contains(says) && err.contains("1 replica"), "{err}");
    }

    let mut cluster = Cluster::start_on(services, 1, &act, "[cluster]\nreplica_acks = 1\n", |c| c);
    let node = &cluster.nodes[0];
    let (tokens, ids) = users(&cluster, "rp", 30).await;
    let (master, replica) = master_and_replica(&cluster.services, "tk:{rp}:claimed").await;

    // With the replica following: every claim is acknowledged.
    let mut acked = vec![Vec::new(); tokens.len()];
    for (i, token) in tokens.iter().enumerate().take(10) {
        let res = node.claim(token, "rp").await;
        assert_eq!(res.status, 200, "{}", res.body);
        acked[i].push(res.data()["code"].as_str().unwrap().to_owned());
    }

    // The replica falls behind: nothing more may be acknowledged.
    let stopped = freeze_and_cut_off(&cluster.services, master, replica).await;
    // (A claim that waited out a refill queued behind a `WAIT` hears
    // STOCK_IN_FLIGHT: also not acknowledged, and nothing was committed.)
    let behind = join_all(tokens[10..20].iter().map(|t| node.claim(t, "rp"))).await;
    for res in &behind {
        assert_eq!(
            res.status, 503,
            "a claim was acknowledged that no replica had: {}",
            res.body
        );
        assert!(
            matches!(res.error_code(), Some("OUTCOME_UNKNOWN" | "STOCK_IN_FLIGHT")),
            "{}",
            res.body
        );
    }
    assert!(behind.iter().any(|r| r.error_code() == Some("OUTCOME_UNKNOWN")));

    // The master dies; the replica, thawed, takes over.
    kill_master_and_take_over(&cluster.services, master, replica, stopped).await;

    // Every acknowledged claim survived, under its user. (The node's first
    // calls may still go to the dead master: it retries them.)
    let deadline = Instant::now() + Duration::from_secs(60);
    for (i, token) in tokens.iter().enumerate().take(10) {
        let held = loop {
            match node.client.get("/ticket/list?pageSize=100", Some(token)).await {
                Ok(res) if res.status == 200 => break node.held(token, "rp").await,
                _ => {
                    assert!(Instant::now() < deadline, "the node never read from the new master");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        assert_eq!(held, acked[i], "user {i} lost an acknowledged claim in the failover");
    }

    // The new master has no replica: a claim is not acknowledged. (Codes
    // the node leased from the old master after the cut are not the new
    // one's: their claims hear STOCK_IN_FLIGHT until the node has the
    // right ones.)
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let alone = node.claim(&tokens[20], "rp").await;
        assert_ne!(alone.status, 200, "acknowledged with no replica: {}", alone.body);
        if alone.error_code() == Some("OUTCOME_UNKNOWN") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never reached the new master: {}",
            alone.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The old master comes back, as the new one's replica; once it has
    // caught up the node sells on: the rest go to fresh buyers, and nobody
    // gets a code twice.
    rejoin_as_replica(&mut cluster.services, master, replica).await;
    let node = &cluster.nodes[0];
    let deadline = Instant::now() + Duration::from_secs(60);
    for (i, token) in tokens.iter().enumerate().skip(20) {
        loop {
            let res = node.claim(token, "rp").await;
            if res.status == 200 {
                acked[i].push(res.data()["code"].as_str().unwrap().to_owned());
                break;
            }
            // A claim answered 503 whose commit did land: the buyer holds it.
            if res.status == 409 {
                acked[i] = node.held(token, "rp").await;
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the node never sold through the new master: {}",
                res.body
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(acked.iter().flatten().count(), 20);
    let stored = cluster.drained("rp").await;
    assert_invariants(&acked, &ids, &stored, 1, 30);
    assert_eq!(stored.len(), 20, "MongoDB holds a claim no replica had: {stored:?}");
}

/// A claim answered OUTCOME_UNKNOWN while the replica was behind is on the
/// master only, and a failover may still lose it. Its keyed retry, refused
/// for a change since (here the sale paused), looked the claim up on the
/// master and answered 200 with its code: the fan was told of a claim a
/// failover could lose, its code then sold again to someone else. The
/// look-up now waits for the replicas as the commit does, and the retry
/// gets its code once a replica holds the claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_retry_is_not_answered_from_a_claim_no_replica_holds() {
    let services = Services::start_with_replicated_redis_cluster();
    let act = cluster_activity("rk", 5, 1);
    let cluster = Cluster::start_on(services, 1, &act, "[cluster]\nreplica_acks = 1\n", |c| c);
    let node = &cluster.nodes[0];
    let tokens = cluster.users("rk", 2).await;
    let (master, replica) = master_and_replica(&cluster.services, "tk:{rk}:claimed").await;
    // The node has codes in stock, confirmed by the replica.
    assert_eq!(node.claim(&tokens[1], "rk").await.status, 200);
    let token = &tokens[0];
    let body = node.claim_body(token, "rk").await;

    let stopped = freeze_and_cut_off(&cluster.services, master, replica).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // (STOCK_IN_FLIGHT or STORE_UNAVAILABLE: a refill that waited in
        // vain for the replica; nothing was committed.)
        let first = claim_keyed(&node.client, token, &body, "k-1").await;
        if first.error_code() == Some("OUTCOME_UNKNOWN") {
            break;
        }
        assert!(
            matches!(first.error_code(), Some("STOCK_IN_FLIGHT" | "STORE_UNAVAILABLE")),
            "{}",
            first.body
        );
        assert!(Instant::now() < deadline, "no claim reached the master: {}", first.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let on_master: usize = on_server(master, redis::cmd("HLEN").arg("tk:{rk}:claimed"))
        .await
        .unwrap();
    assert_eq!(on_master, 2, "the master has the claim");

    let config = std::fs::read_to_string(node.config_path()).unwrap();
    let paused = config.replace("per_user_limit = 1\n", "per_user_limit = 1\npaused = true\n");
    assert_ne!(config, paused);
    assert_eq!(node.reload(&paused)["message"], "Config reloaded.");
    let again = claim_keyed(&node.client, token, &body, "k-1").await;
    assert_error(&again, 409, "PAUSED");

    // The replica thaws, reconnects and takes what it missed: the claim
    // stands, and the retry gets its code.
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(stopped as i32, libc::SIGCONT) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let replayed = loop {
        let res = claim_keyed(&node.client, token, &body, "k-1").await;
        if res.status == 200 {
            break res;
        }
        assert_error(&res, 409, "PAUSED");
        assert!(Instant::now() < deadline, "the retry never got its code");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(replayed.data()["replayed"], true, "{}", replayed.body);
    assert_eq!(
        node.held(token, "rk").await,
        [replayed.data()["code"].as_str().unwrap()]
    );
}

/// The look-up a keyed claim makes once a sale sold out (its key's claim
/// may have been made through another node) waits for no replica when it
/// finds nothing: with the replica behind, a sold-out sale still says
/// SOLD_OUT. (Waiting for the replicas on every look-up answered these
/// 503, and the fans' page retried each six times.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_claim_of_a_sold_out_sale_hears_sold_out_with_the_replica_behind() {
    let services = Services::start_with_replicated_redis_cluster();
    let act = cluster_activity("so", 1, 1);
    let cluster = Cluster::start_on(services, 1, &act, "[cluster]\nreplica_acks = 1\n", |c| c);
    let node = &cluster.nodes[0];
    let tokens = cluster.users("so", 2).await;
    assert_eq!(node.claim(&tokens[0], "so").await.status, 200);
    let (master, replica) = master_and_replica(&cluster.services, "tk:{so}:claimed").await;
    let body = node.claim_body(&tokens[1], "so").await;
    let frozen = freeze_and_cut_off(&cluster.services, master, replica).await;
    let res = claim_keyed(&node.client, &tokens[1], &body, "k-so").await;
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(frozen as i32, libc::SIGCONT) };
    assert_error(&res, 410, "SOLD_OUT");
}

/// A node idle on the last codes gives them back to the master list, for
/// buyers at other nodes. With the replica behind, a failover could undo
/// that give-back: the codes were back in the node's lease, which it
/// renews, and not in its pool, so never sold, and every buyer heard
/// STOCK_IN_FLIGHT for as long as the node ran. A give-back now waits for
/// the replicas as a commit does; unconfirmed, the node resynchronises its
/// lease until one is, and the codes are sold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_give_back_a_failover_undid_leaves_no_code_unsellable() {
    let services = Services::start_with_replicated_redis_cluster();
    let act = cluster_activity("gb", 3, 1);
    let mut cluster = Cluster::start_on(services, 1, &act, "[cluster]\nreplica_acks = 1\n", |c| c);
    let tokens = cluster.users("gb", 3).await;
    let (master, replica) = master_and_replica(&cluster.services, "tk:{gb}:claimed").await;
    let listed = || async {
        on_server::<usize>(master, redis::cmd("LLEN").arg("tk:{gb}:stock:gb-t"))
            .await
            .unwrap()
    };
    let held = || async {
        on_server::<usize>(master, redis::cmd("SCARD").arg("tk:{gb}:lease:gb-t:node0"))
            .await
            .unwrap()
    };
    // One code sold; the node leases the other two just after (a sale is a
    // reason to lease ahead), and gives them back two seconds after the
    // sale, idle with the master list empty: the replica falls behind
    // before that.
    assert_eq!(cluster.nodes[0].claim(&tokens[0], "gb").await.status, 200);
    until("the node to lease the last two codes", || async {
        held().await == 2 && listed().await == 0
    })
    .await;
    let frozen = freeze_and_cut_off(&cluster.services, master, replica).await;
    until("the idle node's give-back, on the master only", || async {
        listed().await == 2
    })
    .await;
    kill_master_and_take_over(&cluster.services, master, replica, frozen).await;
    rejoin_as_replica(&mut cluster.services, master, replica).await;

    let node = &cluster.nodes[0];
    for token in &tokens[1..] {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let res = node.claim(token, "gb").await;
            if res.status == 200 {
                break;
            }
            assert_eq!(res.status, 503, "{}", res.body);
            assert!(Instant::now() < deadline, "the code was never sold again: {}", res.body);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let stored = cluster.drained("gb").await;
    assert_eq!(stored.len(), 3, "{stored:?}");
}

/// Node ids: a node frozen (SIGSTOP) past `lease_ttl` has lost its hold on
/// its id, and a successor started under the same id takes it. Before, the
/// old instance, thawed, took the id back with its next heartbeat (an
/// unconditional SET), and the two ran on under one id, sharing its lease
/// sets and backlog. Now the thawed instance finds the id held by another
/// and exits (status 1); the successor keeps it and sells on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_node_whose_id_was_taken_over_exits_when_it_thaws() {
    let act = cluster_activity("tw", 20, 1);
    let extra = "[cluster]\nlease_ttl = \"2s\"\n";
    let mut cluster = Cluster::start(1, &act, extra);
    let holder = || async {
        let held: Option<String> = cluster.services.query(redis::cmd("GET").arg("tk:node:node0")).await;
        held
    };
    let first = holder().await.expect("the running node holds its id");
    cluster.nodes[0].signal(libc::SIGSTOP);
    until("the frozen node's hold on its id to lapse", || async {
        holder().await.is_none()
    })
    .await;

    let mut successor = TestApp::prepare(
        &(node_config(&cluster.services, &cluster.db, "node0", extra) + &act),
        &[],
    );
    successor.boot();
    let second = holder().await.expect("the successor holds the id");
    assert_ne!(first, second);

    cluster.nodes[0].signal(libc::SIGCONT);
    let exit = cluster.nodes[0].exited_within(Duration::from_secs(10));
    assert_eq!(exit, Some(1), "the thawed instance ran on under the successor's id");
    cluster.nodes[0].wait_for_log(
        "Another instance now runs under this node id (started while this one was stopped); this one exits.",
        1,
    );
    assert_eq!(
        holder().await.as_deref(),
        Some(second.as_str()),
        "the successor lost its id"
    );
    let token = successor.register("twin-fan").await;
    assert_eq!(successor.claim(&token, "tw").await.status, 200);
}

/// A node frozen past its lease is reaped: its codes go back on the master
/// list. Woken, it learnt of it only from a "was I still registered?" flag
/// that its next heartbeat read and cleared in one step. When that
/// heartbeat then failed (here: the activity's counts unreadable for a
/// moment), or its answer was lost, or a lease registered the node again
/// first, the node never heard of the reap: it went on believing the codes
/// in its pool were its own, leased nothing more (its pool looked full) and
/// sent each claim of them to a commit that answered LOST. Nodes now
/// compare a lease epoch that reaps and releases raise, which no lost or
/// failed answer hides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reaped_node_learns_of_it_even_when_its_first_heartbeat_fails() {
    let cluster = Cluster::start(2, &cluster_activity("ep", 200, 1), "[cluster]\nlease_ttl = \"2s\"\n");
    let series = "ticketd_leased_codes{activity=\"ep\",ticket=\"ep-t\"}";
    let node0 = &cluster.nodes[0];
    until("node0 to lease", || async { metric(node0, series).await > 0.0 }).await;
    node0.signal(libc::SIGSTOP);
    until("node1 to reap node0", || async {
        metric(&cluster.nodes[1], "ticketd_leases_reaped_total").await >= 1.0
    })
    .await;
    // Nothing is sold yet: a string where the sold counts' hash belongs
    // makes the heartbeat fail after it has registered the node again.
    let services = &cluster.services;
    let () = services.query(redis::cmd("SET").arg("tk:{ep}:sold").arg("x")).await;
    node0.signal(libc::SIGCONT);
    until("node0 to register again", || async {
        let score: Option<f64> = services
            .query(redis::cmd("ZSCORE").arg("tk:{ep}:nodes").arg("node0"))
            .await;
        score.is_some()
    })
    .await;
    let () = services.query(redis::cmd("DEL").arg("tk:{ep}:sold")).await;
    until("node0 to hold only codes Redis leases it", || async {
        metric(node0, series).await as usize <= scard(&cluster, "tk:{ep}:lease:ep-t:node0").await
    })
    .await;
    node0.wait_for_log(
        "This node's lease was taken from it or given up since it last looked; dropped its local codes.",
        1,
    );
}

/// Calls of `command` Redis has run so far, scripts' included (`INFO
/// commandstats`).
async fn command_calls(cluster: &Cluster, command: &str) -> u64 {
    let info: String = cluster.services.query(redis::cmd("INFO").arg("commandstats")).await;
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// A dead node's backlog — up to `cluster.max_backlog`, a million records,
/// after a long MongoDB outage — was moved onto the reaper's one `LMOVE`
/// per record, inside one script: Redis served nobody else meanwhile. It
/// now moves a thousand records per command (or renames the list when the
/// reaper's own is empty), in order, after the reaper's own records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_backlog_moves_in_bulk() {
    let cluster = Cluster::start(1, &cluster_activity("bl", 10, 1), "[cluster]\nlease_ttl = \"2s\"\n");
    let services = &cluster.services;
    // The reaper's backlog holds a record (one its writer cannot parse, so
    // it stays); a dead node's holds 20,000.
    let () = services
        .query(redis::cmd("RPUSH").arg("tk:{bl}:outbox:node0").arg("own"))
        .await;
    for chunk in 0..20 {
        let records: Vec<String> = (chunk * 1000..(chunk + 1) * 1000)
            .map(|i| format!("ghost-{i}"))
            .collect();
        let () = services
            .query(redis::cmd("RPUSH").arg("tk:{bl}:outbox:ghost").arg(records))
            .await;
    }
    let lmoves = command_calls(&cluster, "lmove").await;
    let pushes = command_calls(&cluster, "rpush").await;
    let () = services
        .query(redis::cmd("ZADD").arg("tk:{bl}:nodes").arg(1).arg("ghost"))
        .await;
    until("node0 to reap the dead node", || async {
        llen(&cluster, "tk:{bl}:outbox:ghost").await == 0
    })
    .await;
    let moved = cluster.services.lrange("tk:{bl}:outbox:node0").await;
    let want: Vec<String> = std::iter::once("own".to_owned())
        .chain((0..20_000).map(|i| format!("ghost-{i}")))
        .collect();
    assert!(
        moved == want,
        "the backlog moved out of order or incomplete: {} records",
        moved.len()
    );
    assert_eq!(
        command_calls(&cluster, "lmove").await - lmoves,
        0,
        "records moved one by one"
    );
    let bulk = command_calls(&cluster, "rpush").await - pushes;
    assert!(bulk <= 20 + 5, "{bulk} RPUSHes for 20 chunks of records");
}

/// Lease expiries and the live set ran on each node's own clock: a node's
/// heartbeat wrote "alive until my now + lease_ttl", and the others
/// compared that with their own now. A node whose clock ran twenty seconds
/// behind (libfaketime here; more than `lease_ttl`) looked dead to the rest
/// while it sold: the
/// commit script then left out its lower per-user limit (and the reaper
/// took its leases every few seconds). The scripts now read Redis's clock
/// (`TIME`), so the node is live, and its limit of one holds for a fan
/// claiming through the node that allows two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_clock_runs_behind_counts_as_live() {
    let act = cluster_activity("sk", 20, 2);
    let extra = "[cluster]\nlease_ttl = \"5s\"\n";
    let cluster = Cluster::start(1, &act, extra);
    let one = act.replace("per_user_limit = 2", "per_user_limit = 1");
    assert_ne!(one, act);
    let mut behind = TestApp::prepare(
        &(node_config(&cluster.services, &cluster.db, "node1", extra) + &one),
        &[],
    );
    behind.env = crate::common::faketime_env("-20s");
    behind.boot();
    let node0 = &cluster.nodes[0];
    node0.wait_for_log(
        "per_user_limit differs across the live nodes: claims hold to the lowest until every node has the same.",
        1,
    );
    let token = node0.register("skew-fan").await;
    assert_eq!(node0.claim(&token, "sk").await.status, 200);
    assert_error(&node0.claim(&token, "sk").await, 409, "LIMIT_REACHED");
    assert_eq!(
        metric(node0, "ticketd_leases_reaped_total").await,
        0.0,
        "node0 reaped the live node1"
    );
}

/// Node clocks and sale times: a cluster node follows Redis's clock (it
/// measures it with each heartbeat), so one whose own clock runs ahead does
/// not open a sale early. Before, a node 30 s ahead sold 30 s before the
/// start to whoever reached it, and a scalper had only to find that node;
/// its session and claim tokens, rooms and claim stamps ran ahead too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_clock_runs_ahead_opens_no_sale_early() {
    let start = now_ms() + 10_000;
    let act = crate::common::activity("ck", 20, 1, &rfc3339_ms(start), &rfc3339_ms(start + 3_600_000));
    let cluster = Cluster::start(1, &act, "");
    let mut ahead = TestApp::prepare(&(node_config(&cluster.services, &cluster.db, "node1", "") + &act), &[]);
    ahead.env = crate::common::faketime_env("+30s");
    ahead.boot();
    let token = ahead.register("early-fan").await;
    let detail = ahead.detail("ck").await;
    let res = ahead.claim(&token, "ck").await;
    // Only meaningful while the sale has not started by the test's clock: a
    // guard against a void pass (the claim came after the start), not a
    // timing of the node; 10 s covers a node's start many times over.
    assert!(now_ms() < start, "the test took too long to reach the claim");
    assert_eq!(detail["status"], "upcoming", "{detail}");
    assert_error(&res, 409, "NOT_STARTED");
    assert_eq!(res.body["error"]["startTime"], rfc3339_ms(start));
    assert_eq!(cluster.nodes[0].detail("ck").await["remaining"], 20);
    let warned = ahead.wait_for_log(
        "This machine's clock is off Redis's by offset_ms; the node follows Redis's clock for sale times, lottery draws, tokens and claim times. Fix this machine's time sync.",
        1,
    );
    let offset = warned["offset_ms"].as_i64().unwrap();
    assert!((-31_000..=-29_000).contains(&offset), "{warned}");

    // At the start by Redis's clock, the node sells.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let res = ahead.claim(&token, "ck").await;
        if res.status == 200 {
            break;
        }
        // At the start itself the claim's detail may come a moment before
        // it (no claim token) and the claim a moment after.
        assert!(
            matches!(res.error_code(), Some("NOT_STARTED" | "CLAIM_TOKEN_REQUIRED")),
            "{}",
            res.body
        );
        assert!(Instant::now() < deadline, "the node never opened the sale");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // (To within a measurement of Redis's clock: half a round trip, and
    // the 2 ms the offset may lag.)
    assert!(now_ms() >= start - 100, "the node sold before the start");
}

/// Claim ids come in blocks (`INCRBY tk:ids`), and `tk:ids` may sit on
/// another master than an activity's claims. A block taken while that
/// master's replica was behind went into claims at once; a failover then
/// lost the INCRBY, and the next node to ask got the same block, so two
/// acknowledged claims shared an id. With `replica_acks`, a block is used
/// only once a replica holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_hands_out_no_claim_id_twice() {
    let services = Services::start_with_replicated_redis_cluster();
    let (ids_master, ids_replica) = master_and_replica(&services, "tk:ids").await;
    // An activity whose claims live on another master.
    let mut act_id = None;
    for name in ["ia", "ib", "ic", "id", "ie", "if", "ig", "ih"] {
        if master_and_replica(&services, &format!("tk:{{{name}}}:claimed")).await.0 != ids_master {
            act_id = Some(name);
            break;
        }
    }
    let act_id = act_id.expect("an activity on another master than tk:ids");
    let act = cluster_activity(act_id, 20, 1);
    let extra = "[cluster]\nreplica_acks = 1\n";
    let mut cluster = Cluster::start_on(services, 1, &act, extra, |c| c);
    let (tokens, _) = users(&cluster, "cid", 3).await;

    // tk:ids's replica falls behind; node0 has taken no block yet.
    let stopped = cluster.services.redis_cluster_pid(ids_replica);
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(stopped as i32, libc::SIGSTOP) };
    let cut: usize = on_server(ids_master, redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("replica"))
        .await
        .unwrap();
    assert_eq!(cut, 1);
    let first = cluster.nodes[0].claim(&tokens[0], act_id).await;
    assert_eq!(
        first.status, 503,
        "a claim carried an id no replica had: {}",
        first.body
    );

    // tk:ids's master dies, its replica takes over, and the old master
    // comes back as the new one's replica.
    kill_master_and_take_over(&cluster.services, ids_master, ids_replica, stopped).await;
    rejoin_as_replica(&mut cluster.services, ids_master, ids_replica).await;

    // A second node joins; both sell. Every claim id is distinct.
    let second = TestApp::prepare(
        &(node_config(&cluster.services, &cluster.db, "node1", extra) + &act),
        &[],
    );
    cluster.nodes.push(second);
    cluster.nodes[1].boot();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut ids = Vec::new();
    for (token, node) in tokens.iter().zip([0, 1, 0]) {
        loop {
            let res = cluster.nodes[node].claim(token, act_id).await;
            if res.status == 200 || res.status == 409 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "claims never went through again: {}",
                res.body
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let list = cluster.nodes[node]
            .client
            .get("/ticket/list?pageSize=100", Some(token))
            .await
            .unwrap();
        ids.extend(
            list.data()["claims"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["claimId"].as_u64().unwrap()),
        );
    }
    let distinct: HashSet<u64> = ids.iter().copied().collect();
    assert_eq!(distinct.len(), ids.len(), "two claims share an id: {ids:?}");
}

/// The MongoDB writer counted every duplicate it met as written, its own
/// retries and another claim of the same code alike: a claim that met a
/// stored claim of someone else (as after a Redis that lost acknowledged
/// writes) was acknowledged by the node and then missing from MongoDB
/// without a word. It is now kept in `claim_conflicts`, and the node says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_meets_another_in_mongodb_is_kept_as_a_conflict() {
    let cluster = Cluster::start(1, &cluster_activity("cf", 5, 1), "");
    let codes: Vec<String> = cluster
        .services
        .query(redis::cmd("SMEMBERS").arg("tk:{cf}:known:cf-t"))
        .await;
    assert_eq!(codes.len(), 5);
    // MongoDB already holds a claim of every code, by someone else.
    let db = cluster.mongo().await;
    let stale: Vec<Document> = codes
        .iter()
        .enumerate()
        .map(|(i, code)| {
            doc! {"_id": code, "claim_id": 0i64, "activity_id": "cf", "ticket_id": "cf-t", "code": code,
            "user_id": 999_999i64, "n": i as i64 + 1, "claimed_at_ms": 0i64, "node": "gone"}
        })
        .collect();
    db.collection::<Document>("claims").insert_many(stale).await.unwrap();

    let (tokens, ids) = users(&cluster, "cfu", 1).await;
    let node = &cluster.nodes[0];
    let res = node.claim(&tokens[0], "cf").await;
    assert_eq!(res.status, 200, "{}", res.body);
    let code = res.data()["code"].as_str().unwrap().to_owned();
    until("the backlog to drain", || async {
        llen(&cluster, "tk:{cf}:outbox:node0").await == 0
    })
    .await;
    let kept = db
        .collection::<Document>("claim_conflicts")
        .find_one(doc! {"code": &code})
        .await
        .unwrap()
        .expect("the acknowledged claim kept as a conflict");
    assert_eq!(kept.get_i64("user_id").unwrap(), ids[0]);
    node.wait_for_log(
        "MongoDB holds another claim of this code (or of this user's claim number): both were acknowledged. Kept in claim_conflicts; Redis lost writes it had acknowledged.",
        1,
    );
    // What the organiser reads says so: the export and the report lack
    // that claim, and verify names it (each once only told of the stored
    // claims' owners).
    for args in [
        &["export", "--activity", "cf"][..],
        &["report", "--activity", "cf", "--out", "cf.html"],
    ] {
        let out = node.cli(args, None);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {err}");
        assert!(
            err.contains("warning: 1 claim was answered success but met another stored claim")
                && err.contains("claim_conflicts"),
            "{args:?}: {err}"
        );
    }
    let out = node.cli(&["verify"], None);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("PROBLEM: activity `cf`: 1 acknowledged claim(s) met another stored claim")
            && said.contains("claim_conflicts"),
        "{said}"
    );
}

/// A node that sold nothing for two seconds while the master list is empty
/// gives its codes back, so buyers at other nodes get them. It measured
/// "sold nothing" by codes taken: an account at its limit (reached through
/// another node) claiming here took the last code, heard LIMIT_REACHED
/// from Redis and put it back, over and over, and the node never looked
/// idle while a buyer at the other node heard STOCK_IN_FLIGHT to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_claims_do_not_keep_a_node_from_giving_back_its_last_code() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let cluster = Cluster::start(2, &cluster_activity("gb", 2, 1), "");
    let (tokens, _) = users(&cluster, "gb", 2).await;
    let clients = cluster.clients();
    let (spammer, buyer) = (tokens[0].clone(), tokens[1].clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    // The spammer's one code, through node 1.
    loop {
        let body = claim_body(&clients[1], &spammer, "gb").await;
        let res = clients[1].post("/ticket/get", Some(&spammer), &body).await.unwrap();
        if res.status == 200 {
            break;
        }
        assert_eq!(res.error_code(), Some("STOCK_IN_FLIGHT"), "{}", res.body);
        assert!(Instant::now() < deadline, "the spammer's code never came");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Then at node 0, without a pause: node 0 leases the last code for it,
    // and each claim takes it, is refused by Redis, and puts it back.
    let stop = Arc::new(AtomicBool::new(false));
    let body = claim_body(&clients[0], &spammer, "gb").await;
    let spam: Vec<_> = (0..4)
        .map(|_| {
            let (client, token, body, stop) = (clients[0].clone(), spammer.clone(), body.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let res = client.post("/ticket/get", Some(&token), &body).await.unwrap();
                    assert_ne!(res.status, 200, "a second code for a limit of one: {}", res.body);
                }
            })
        })
        .collect();
    until("the last code to be leased to node 0", || async {
        scard(&cluster, "tk:{gb}:lease:gb-t:node0").await == 1
    })
    .await;
    // A buyer at node 1 gets it once node 0 has sold nothing for a while.
    let body = claim_body(&clients[1], &buyer, "gb").await;
    let res = loop {
        let res = clients[1].post("/ticket/get", Some(&buyer), &body).await.unwrap();
        if res.status != 503 || Instant::now() >= deadline {
            break res;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    stop.store(true, Ordering::Relaxed);
    for s in spam {
        s.await.unwrap();
    }
    assert_eq!(res.status, 200, "the buyer at node 1: {}", res.body);
}
