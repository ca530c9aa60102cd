//! Real Redis and MongoDB-wire servers for the cluster tests, each on a free
//! loopback port with its own temp dir. Missing binaries fail the test with
//! the command that installs them; nothing is skipped.

use std::{
    collections::HashSet,
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tempfile::TempDir;

use super::relay::Relay;

pub const INSTALL: &str =
    "run ./scripts/test once: it installs redis-server, redis-tools and faketime (apt) and SecantusDB (pip, into .venv)";

/// A free loopback port (bound and released; the server binds it next),
/// picked below the kernel's ephemeral range. A port from `bind(0)` comes
/// from that range, where every outgoing connection on the machine — and
/// the parallel tests make thousands — takes its local port too: CI once
/// saw SecantusDB refuse its picked port that way. Below the range only
/// another test's pick can collide, and the starts below retry on a new
/// port when one does. (Ports start at 10000; on a machine whose range
/// begins below 20000 they may fall inside it, and the retries cover that.)
pub fn free_port() -> u16 {
    free_port_below(ephemeral_low().max(20_000))
}

/// A free loopback port in `10000..high`.
fn free_port_below(high: u16) -> u16 {
    let low = 10_000u16;
    loop {
        let port = low + (random() % u64::from(high - low)) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The first port of the kernel's ephemeral range.
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768)
}

/// A random number (std's per-process random hash keys over a counter, so
/// parallel test processes pick different sequences).
fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.finish()
}

/// Waits until `child` itself listens on `port` — not merely until something
/// answers there: the port was free when picked, but another process could
/// have taken it since, and the test must not talk to someone else's server.
/// `Err` with the service's own log when it exited instead.
fn wait_for_port(port: u16, what: &str, child: &mut Child, log: &Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(listens(child.id(), port) && TcpStream::connect(("127.0.0.1", port)).is_ok()) {
        if let Ok(Some(status)) = child.try_wait() {
            let said = std::fs::read_to_string(log).unwrap_or_default();
            return Err(format!(
                "{what} exited at start on port {port} ({status}); its log:\n{said}"
            ));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{what} did not listen on port {port} within 30 s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Starts a stopped service again on its own `port` (its clients know
/// it): no other port will do, so a failure fails the test, with its log.
fn restart_on(port: u16, what: &str, log: &Path, spawn: impl FnOnce(u16) -> Child) -> Child {
    let mut child = spawn(port);
    wait_for_port(port, what, &mut child, log).unwrap_or_else(|e| panic!("{e}"));
    child
}

/// Runs `spawn(port)` until the service listens, on a new free port each
/// time it exits at start (another test took the port meanwhile), at most
/// five times; the last failure, with the service's log, fails the test.
fn start_on_free_port(what: &str, log: &Path, pick: fn() -> u16, mut spawn: impl FnMut(u16) -> Child) -> (u16, Child) {
    let mut last = String::new();
    for _ in 0..5 {
        let port = pick();
        let mut child = spawn(port);
        match wait_for_port(port, what, &mut child, log) {
            Ok(()) => return (port, child),
            Err(e) => last = e,
        }
    }
    panic!("{what} did not start on a free port in 5 tries; the last: {last}");
}

/// Whether process `pid` holds a TCP socket listening on `port` (Linux:
/// its socket inodes in `/proc/PID/fd` against the LISTEN rows of
/// `/proc/net/tcp{,6}`).
fn listens(pid: u32, port: u16) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    let inodes: HashSet<String> = fds
        .filter_map(Result::ok)
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|link| {
            let link = link.to_str()?;
            Some(link.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        std::fs::read_to_string(table).is_ok_and(|text| {
            text.lines().skip(1).any(|row| {
                // sl local_address rem_address st ... inode (the 10th field)
                let f: Vec<&str> = row.split_whitespace().collect();
                f.len() > 9
                    && f[3] == "0A"
                    && f[1].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok()) == Some(port)
                    && inodes.contains(f[9])
            })
        })
    })
}

fn secantusd() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/secantusd-py");
    assert!(path.exists(), "{} is missing; {INSTALL}", path.display());
    path
}

/// One server of a Redis Cluster on `port`, in `dir` (AOF fsynced always,
/// as in production).
fn spawn_cluster_server(dir: &Path, port: u16) -> Child {
    let log = dir.join("redis.log");
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--dir", dir.to_str().unwrap(), "--logfile", log.to_str().unwrap()])
        .args(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"])
        .args(["--cluster-node-timeout", "5000"])
        .args(["--appendonly", "yes", "--appendfsync", "always", "--save", ""])
        // A replica's full sync at once: Redis waits 5 s for more replicas
        // to share it by default, and every test with replicas (or a master
        // rejoining as one) waited that out.
        .args(["--repl-diskless-sync-delay", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run redis-server ({e}); {INSTALL}"))
}

/// A free port whose Redis Cluster bus port (`port + 10000`) is free too,
/// both below the ephemeral range.
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port_below(ephemeral_low().max(30_000) - 10_000);
        let bus_free = port
            .checked_add(10_000)
            .is_some_and(|bus| std::net::TcpListener::bind(("127.0.0.1", bus)).is_ok());
        if bus_free {
            return port;
        }
    }
}

/// One Redis (or a Redis Cluster of three masters) and one SecantusDB,
/// stopped on drop.
pub struct Services {
    dir: TempDir,
    /// The single Redis, or the cluster's first master (the nodes' seed).
    pub redis_port: u16,
    pub mongo_port: u16,
    redis: Option<Child>,
    /// The masters of a Redis Cluster, when the services run one.
    cluster: Vec<(u16, Child)>,
    mongo: Option<Child>,
}

impl Services {
    /// Starts a single Redis and SecantusDB and waits until they accept connections.
    pub fn start() -> Services {
        let mut s = Services::empty();
        s.start_redis();
        s.start_mongo();
        s
    }

    /// Starts a single Redis only (for tests of the Redis scripts alone).
    pub fn start_redis_only() -> Services {
        let mut s = Services::empty();
        s.start_redis();
        s
    }

    /// Starts a Redis Cluster of three masters (no replicas) and
    /// SecantusDB; `redis_url` names the first master, the nodes' seed.
    pub fn start_with_redis_cluster() -> Services {
        let mut s = Services::empty();
        s.start_redis_cluster(0);
        s.start_mongo();
        s
    }

    /// Starts a Redis Cluster of three masters with a replica each, and
    /// SecantusDB; `redis_url` names the first master.
    pub fn start_with_replicated_redis_cluster() -> Services {
        let mut s = Services::empty();
        s.start_redis_cluster(1);
        s.start_mongo();
        s
    }

    /// Starts a Redis Cluster of one master holding every slot, reached
    /// only through a [`Relay`]: `redis_url` names the relay, and so does
    /// the address the master announces, so every connection a cluster
    /// client makes to it passes the relay. And SecantusDB.
    pub fn start_with_relayed_redis_cluster() -> (Services, Relay) {
        let mut s = Services::empty();
        let dir = s.cluster_dir(0);
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("redis.log");
        let (port, child) = start_on_free_port("redis-server (cluster)", &log, free_cluster_port, |port| {
            spawn_cluster_server(&dir, port)
        });
        s.cluster.push((port, child));
        let relay = Relay::start(port);
        let cli = |args: &[&str]| {
            let out = Command::new("redis-cli")
                .args(["-p", &port.to_string()])
                .args(args)
                .output()
                .unwrap_or_else(|e| panic!("cannot run redis-cli ({e}); {INSTALL}"));
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        for (key, value) in [
            ("cluster-announce-ip", "127.0.0.1".to_owned()),
            ("cluster-announce-port", relay.port.to_string()),
        ] {
            assert_eq!(cli(&["config", "set", key, &value]).trim(), "OK");
        }
        assert_eq!(cli(&["cluster", "addslotsrange", "0", "16383"]).trim(), "OK");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cli(&["cluster", "info"]).contains("cluster_state:ok") {
            assert!(
                Instant::now() < deadline,
                "the one-master Redis Cluster never became ok"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s.redis_port = relay.port;
        s.start_mongo();
        (s, relay)
    }

    fn empty() -> Services {
        Services {
            dir: tempfile::tempdir().unwrap(),
            redis_port: 0,
            mongo_port: 0,
            redis: None,
            cluster: Vec::new(),
            mongo: None,
        }
    }

    /// Three masters, each with `replicas` replicas: `redis-server
    /// --cluster-enabled yes` (each with its own directory, AOF fsynced
    /// always as in production), joined by `redis-cli --cluster create` and
    /// waited for until every one says `cluster_state:ok`.
    fn start_redis_cluster(&mut self, replicas: usize) {
        let mut addrs = Vec::new();
        for i in 0..3 * (1 + replicas) {
            let dir = self.cluster_dir(i);
            std::fs::create_dir_all(&dir).unwrap();
            let log = dir.join("redis.log");
            let (port, child) = start_on_free_port("redis-server (cluster)", &log, free_cluster_port, |port| {
                spawn_cluster_server(&dir, port)
            });
            addrs.push(format!("127.0.0.1:{port}"));
            self.cluster.push((port, child));
        }
        self.redis_port = self.cluster[0].0;
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli ({e}); {INSTALL}"));
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        // Every replica has finished its first sync (its master lists it
        // `state=online`): until then it confirms no write (`WAIT`).
        loop {
            let online: usize = addrs
                .iter()
                .map(|addr| {
                    let info = Command::new("redis-cli")
                        .args(["-u", &format!("redis://{addr}"), "info", "replication"])
                        .output()
                        .unwrap();
                    String::from_utf8_lossy(&info.stdout).matches("state=online").count()
                })
                .sum();
            if online == 3 * replicas {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the Redis Cluster's replicas never came online"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for addr in &addrs {
            loop {
                let info = Command::new("redis-cli")
                    .args(["-u", &format!("redis://{addr}"), "cluster", "info"])
                    .output()
                    .unwrap();
                // And every server knows every replica (`cluster_state:ok`
                // comes before gossip has spread the replicas' roles).
                let nodes = Command::new("redis-cli")
                    .args(["-u", &format!("redis://{addr}"), "cluster", "nodes"])
                    .output()
                    .unwrap();
                let replicas_known = String::from_utf8_lossy(&nodes.stdout)
                    .lines()
                    .filter(|l| l.split_whitespace().nth(2).is_some_and(|f| f.contains("slave")))
                    .count();
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") && replicas_known == 3 * replicas
                {
                    break;
                }
                assert!(Instant::now() < deadline, "the Redis Cluster at {addr} never became ok");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    fn cluster_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("redis-cluster-{i}"))
    }

    /// Starts the Redis Cluster's server on `port` again (after a `kill
    /// -9`), on its own directory: it rejoins with what its `nodes.conf`
    /// and AOF hold. Waits until it answers.
    pub fn restart_redis_cluster_server(&mut self, port: u16) {
        let i = self
            .cluster
            .iter()
            .position(|(p, _)| *p == port)
            .expect("a server of the cluster");
        let dir = self.cluster_dir(i);
        let mut child = spawn_cluster_server(&dir, port);
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(30);
        // Its own listening socket, not whatever took the port meanwhile.
        while !listens(pid, port) {
            assert!(
                child.try_wait().unwrap().is_none(),
                "redis-server on {port} exited (the port taken meanwhile?)"
            );
            assert!(Instant::now() < deadline, "redis-server on {port} did not come back");
            std::thread::sleep(Duration::from_millis(50));
        }
        stop(Some(std::mem::replace(&mut self.cluster[i].1, child)), libc::SIGKILL);
    }

    /// The process id of the Redis Cluster's server on `port`.
    pub fn redis_cluster_pid(&self, port: u16) -> u32 {
        let (_, child) = self
            .cluster
            .iter()
            .find(|(p, _)| *p == port)
            .expect("a server of the cluster");
        child.id()
    }

    /// The ports of the Redis Cluster's servers (empty for a single Redis).
    pub fn redis_cluster_ports(&self) -> Vec<u16> {
        self.cluster.iter().map(|(port, _)| *port).collect()
    }

    /// The URLs of the Redis Cluster's servers (empty for a single Redis).
    pub fn redis_cluster_urls(&self) -> Vec<String> {
        self.redis_cluster_ports()
            .into_iter()
            .map(|port| format!("redis://127.0.0.1:{port}/"))
            .collect()
    }

    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.redis_port)
    }

    pub fn mongo_uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/", self.mongo_port)
    }

    /// Redis as production runs it for ticketd: the append-only file,
    /// fsynced before each reply, so an acknowledged commit survives a
    /// restart. On a free port; see `restart_redis` for the same one.
    fn start_redis(&mut self) {
        let log = self.redis_log();
        let (port, child) = start_on_free_port("redis-server", &log, free_port, |port| self.spawn_redis(port));
        self.redis_port = port;
        self.redis = Some(child);
    }

    /// Starts the stopped Redis again, on its port and with its data.
    pub fn restart_redis(&mut self) {
        let log = self.redis_log();
        self.redis = Some(restart_on(self.redis_port, "redis-server", &log, |port| {
            self.spawn_redis(port)
        }));
    }

    /// Redis's directory (its AOF), created if need be.
    fn redis_dir(&self) -> PathBuf {
        let dir = self.dir.path().join("redis");
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn redis_log(&self) -> PathBuf {
        self.redis_dir().join("redis.log")
    }

    fn spawn_redis(&self, port: u16) -> Child {
        let dir = self.redis_dir();
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--dir", dir.to_str().unwrap()])
            .args(["--logfile", self.redis_log().to_str().unwrap()])
            .args(["--appendonly", "yes", "--appendfsync", "always", "--save", ""])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run redis-server ({e}); {INSTALL}"))
    }

    /// SIGTERM to Redis (it writes and closes its AOF), and wait for it to
    /// exit (one still running after 10 s fails the test; see `stop`).
    pub fn stop_redis(&mut self) {
        stop(self.redis.take(), libc::SIGTERM);
    }

    /// `signal` to Redis (SIGKILL: no flush, no goodbye), and wait.
    pub fn signal_redis(&mut self, signal: i32) {
        stop(self.redis.take(), signal);
    }

    /// SIGSTOP to Redis (every server of a Redis Cluster): it stops
    /// answering, its connections stay open, and
    /// what the nodes send meanwhile runs when it is thawed — after they
    /// gave up waiting for the answer.
    pub fn freeze_redis(&self) {
        self.signal_running_redis(libc::SIGSTOP);
    }

    /// SIGCONT to a frozen Redis.
    pub fn thaw_redis(&self) {
        self.signal_running_redis(libc::SIGCONT);
    }

    /// `sig` to the single Redis, or to every server of the Redis Cluster.
    fn signal_running_redis(&self, sig: i32) {
        let pids: Vec<u32> = match &self.redis {
            Some(child) => vec![child.id()],
            None => self.cluster.iter().map(|(_, c)| c.id()).collect(),
        };
        assert!(!pids.is_empty(), "no Redis is running");
        for pid in pids {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(pid as i32, sig) };
        }
    }

    /// SecantusDB on a free port; see `restart_mongo` for the same one.
    fn start_mongo(&mut self) {
        let log = self.mongo_log();
        let (port, child) = start_on_free_port("secantusd-py", &log, free_port, |port| self.spawn_mongo(port));
        self.mongo_port = port;
        self.mongo = Some(child);
    }

    /// Starts the stopped SecantusDB again, on its port and with its data.
    pub fn restart_mongo(&mut self) {
        let log = self.mongo_log();
        self.mongo = Some(restart_on(self.mongo_port, "secantusd-py", &log, |port| {
            self.spawn_mongo(port)
        }));
    }

    /// Beside its data directory, not in it.
    fn mongo_log(&self) -> PathBuf {
        self.dir.path().join("secantusd.log")
    }

    fn mongo_dir(&self) -> PathBuf {
        let dir = self.dir.path().join("mongo");
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Its stderr (where it logs) goes to a file kept for a failed start;
    /// appended, so a restart keeps the first run's lines.
    fn spawn_mongo(&self, port: u16) -> Child {
        let dir = self.mongo_dir();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.mongo_log())
            .unwrap();
        Command::new(secantusd())
            .args(["--port", &port.to_string(), "--host", "127.0.0.1"])
            .args(["--storage-path", dir.to_str().unwrap(), "--log-level", "WARNING"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run secantusd-py ({e}); {INSTALL}"))
    }

    /// MongoDB goes down: a SIGTERM, and if SecantusDB has not stopped a
    /// minute later, a SIGKILL.
    ///
    /// SecantusDB's own stop takes up to 2 s for its accept thread and 5 s
    /// to drain connections a node still holds, then closes its storage (a
    /// checkpoint): on a loaded box that passed 10 s once, and 30 s once
    /// more (eight tests at once). And its stop sometimes never ends (17
    /// minutes once, with a node's connections open; past a minute once
    /// more, in a suite run beside two busy loops): a fault of the test's
    /// MongoDB server, not of the node under test, which the tests wanting
    /// an outage failed on. A SIGKILL is an outage too, and loses nothing
    /// committed: its storage journals every commit before answering
    /// (WiredTiger's log, replayed when it starts again).
    pub fn stop_mongo(&mut self) {
        if let Some(mut child) = self.mongo.take() {
            if signal_and_wait(&mut child, libc::SIGTERM, Duration::from_secs(60)) {
                eprintln!("SecantusDB did not stop within 60 s of a SIGTERM: killed (SIGKILL)");
            }
        }
    }

    /// A MongoDB client on the test database `db`.
    pub async fn mongo(&self, db: &str) -> mongodb::Database {
        mongodb::Client::with_uri_str(self.mongo_uri())
            .await
            .unwrap()
            .database(db)
    }

    /// A Redis connection (to the whole cluster when it is one, as a node has).
    pub async fn redis(&self) -> ticketd::store::cluster::RedisConn {
        ticketd::store::cluster::RedisConn::connect(&self.redis_url(), Duration::from_secs(5))
            .await
            .unwrap()
    }

    /// Runs one command on Redis (on a Redis Cluster, where its key lives).
    pub async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        let mut r = self.redis().await;
        cmd.query_async(&mut r).await.unwrap()
    }

    /// A whole Redis list.
    pub async fn lrange(&self, key: &str) -> Vec<String> {
        self.query(redis::cmd("LRANGE").arg(key).arg(0).arg(-1)).await
    }
}

/// Signals a service and waits for it to exit. One still running 10 s
/// after a SIGTERM is killed and the test fails, saying so: the test meant a
/// clean stop (Redis writing its AOF), and a hang must not pass for one.
/// (SecantusDB, whose stop can hang, is stopped by [`Services::stop_mongo`].)
fn stop(child: Option<Child>, sig: i32) {
    if let Some(mut c) = child {
        if signal_and_wait(&mut c, sig, Duration::from_secs(10)) && !std::thread::panicking() {
            panic!(
                "service {} did not exit within 10 s of signal {sig}; it was killed",
                c.id()
            );
        }
    }
}

/// Sends `sig` to `child` and waits up to `within` for it to exit, killing
/// it if it has not; returns whether it had to be killed.
fn signal_and_wait(child: &mut Child, sig: i32, within: Duration) -> bool {
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, sig) };
    let deadline = Instant::now() + within;
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let hung = matches!(child.try_wait(), Ok(None));
    if hung {
        let _ = child.kill();
    }
    let _ = child.wait();
    hung
}

impl Drop for Services {
    fn drop(&mut self) {
        let cluster = self.cluster.drain(..).map(|(_, c)| c);
        for c in [self.redis.take(), self.mongo.take()]
            .into_iter()
            .flatten()
            .chain(cluster)
        {
            stop(Some(c), libc::SIGKILL);
        }
    }
}
