//! Real Redis and MongoDB-wire servers for the cluster tests, each on a free
//! loopback port with its own temp dir. Missing binaries fail the test with
//! the command that installs them; nothing is skipped.

use std::{
    collections::HashSet,
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tempfile::TempDir;

const INSTALL: &str = "run ./scripts/test once: it installs redis-server (apt) and SecantusDB (pip, into .venv)";

/// A free loopback port (bound and released; the server binds it next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `child` itself listens on `port` — not merely until something
/// answers there: the port was free when picked, but another process could
/// have taken it since, and the test must not talk to someone else's server.
fn wait_for_port(port: u16, what: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(listens(child.id(), port) && TcpStream::connect(("127.0.0.1", port)).is_ok()) {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited at start ({status}); was port {port} taken meanwhile?");
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on port {port} within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
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

/// One Redis and one SecantusDB, stopped on drop.
pub struct Services {
    dir: TempDir,
    pub redis_port: u16,
    pub mongo_port: u16,
    redis: Option<Child>,
    mongo: Option<Child>,
}

impl Services {
    /// Starts both and waits until they accept connections.
    pub fn start() -> Services {
        let mut s = Services {
            dir: tempfile::tempdir().unwrap(),
            redis_port: free_port(),
            mongo_port: free_port(),
            redis: None,
            mongo: None,
        };
        s.start_redis();
        s.start_mongo();
        s
    }

    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.redis_port)
    }

    pub fn mongo_uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/", self.mongo_port)
    }

    /// Redis as production runs it for ticketd: the append-only file,
    /// fsynced before each reply, so an acknowledged commit survives a restart.
    pub fn start_redis(&mut self) {
        let dir = self.dir.path().join("redis");
        std::fs::create_dir_all(&dir).unwrap();
        let mut child = Command::new("redis-server")
            .args(["--port", &self.redis_port.to_string(), "--bind", "127.0.0.1"])
            .args(["--dir", dir.to_str().unwrap()])
            .args(["--appendonly", "yes", "--appendfsync", "always", "--save", ""])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run redis-server ({e}); {INSTALL}"));
        wait_for_port(self.redis_port, "redis-server", &mut child);
        self.redis = Some(child);
    }

    /// SIGTERM to Redis (it writes and closes its AOF), and wait.
    pub fn stop_redis(&mut self) {
        stop(self.redis.take(), libc::SIGTERM);
    }

    /// `signal` to Redis (SIGKILL: no flush, no goodbye), and wait.
    pub fn signal_redis(&mut self, signal: i32) {
        stop(self.redis.take(), signal);
    }

    pub fn start_mongo(&mut self) {
        let dir = self.dir.path().join("mongo");
        std::fs::create_dir_all(&dir).unwrap();
        let mut child = Command::new(secantusd())
            .args(["--port", &self.mongo_port.to_string(), "--host", "127.0.0.1"])
            .args(["--storage-path", dir.to_str().unwrap(), "--log-level", "WARNING"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run secantusd-py ({e}); {INSTALL}"));
        wait_for_port(self.mongo_port, "secantusd-py", &mut child);
        self.mongo = Some(child);
    }

    pub fn stop_mongo(&mut self) {
        stop(self.mongo.take(), libc::SIGTERM);
    }

    /// A MongoDB client on the test database `db`.
    pub async fn mongo(&self, db: &str) -> mongodb::Database {
        mongodb::Client::with_uri_str(self.mongo_uri())
            .await
            .unwrap()
            .database(db)
    }

    /// A Redis connection.
    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis_url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

fn stop(child: Option<Child>, sig: i32) {
    if let Some(mut c) = child {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(c.id() as i32, sig) };
        let _ = c.wait();
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        for c in [self.redis.take(), self.mongo.take()].into_iter().flatten() {
            stop(Some(c), libc::SIGKILL);
        }
    }
}
