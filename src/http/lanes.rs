//! Lanes: the threads public connections live on.
//!
//! Each lane is one OS thread running a single-threaded tokio runtime. The
//! accept loop hands every new connection to the next lane, round-robin, and
//! the connection stays there for its whole life: its socket is registered
//! with that lane's reactor, its requests are parsed and answered there, and
//! the claim it waits for is woken there: the journal writer sends each
//! lane its answers of a group commit in one message ([`Home`]), and the
//! lane's settler task answers them, so a group commit costs one cross-thread
//! wake-up per lane instead of one per claim.
//!
//! Why not the multi-threaded runtime the rest of the node runs on: under a
//! rush its work-stealing costs more than it balances. Every wave of
//! readable sockets wakes a second worker to steal, which mostly finds
//! nothing and parks again (a futex wake and wait), and a task moves between
//! cores with its cache lines. Many keep-alive connections spread evenly
//! over the lanes, so giving up stealing costs little balance; the price is
//! that nothing on a lane may block its thread (password hashing runs on
//! the blocking pool), and a lane the OS preempts waits with its
//! connections. Lanes with home delivery, measured against the shared
//! runtime alternated on the same 2-core box (`scripts/bench-side-by-side`'s
//! all-success rush, wrk -c64): 56–58k claims/s against 47–52k, with
//! slightly less CPU per claim (README, Performance).
//!
//! The admin listener and the node's background workers stay on the shared
//! runtime (the admin API uses `block_in_place`, which a single-threaded
//! runtime does not allow).

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use tokio::sync::mpsc;

use crate::vocab::Home;

/// A connection to serve: called on its lane's runtime, it returns the
/// future that serves it.
pub type Job = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// The lane threads, and the next one to get a connection.
pub struct Lanes {
    lanes: Vec<mpsc::UnboundedSender<Job>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    next: AtomicUsize,
}

/// How long a stopping lane waits for its blocking tasks (a logout's store
/// write) before its thread ends anyway.
const BLOCKING_GRACE: Duration = Duration::from_secs(2);

/// The process's ceiling on blocking threads, shared by the lanes as the
/// shared runtime's default (512) was by its workers.
const BLOCKING_THREADS: usize = 512;

impl Lanes {
    /// Starts `count` lanes (at least one), named `ticketd-lane-<n>`. They
    /// run until [`Lanes::stop`].
    pub fn start(count: usize) -> io::Result<Lanes> {
        let count = count.max(1);
        let mut lanes = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        for n in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .max_blocking_threads((BLOCKING_THREADS / count).max(16))
                .build()?;
            // Unbounded, yet bounded by `server.max_connections`: a
            // connection is counted before it is queued here.
            let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
            let thread = std::thread::Builder::new()
                .name(format!("ticketd-lane-{n}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        // Claims made here are answered here (see `Home`).
                        let mut answers = Home::settle_here();
                        tokio::spawn(async move {
                            while let Some(batch) = answers.recv().await {
                                batch.into_iter().for_each(|(pending, outcome)| pending.answer(outcome));
                            }
                        });
                        while let Some(job) = rx.recv().await {
                            tokio::spawn(job());
                        }
                    });
                    runtime.shutdown_timeout(BLOCKING_GRACE);
                })?;
            lanes.push(tx);
            threads.push(thread);
        }
        Ok(Lanes {
            lanes,
            threads,
            next: AtomicUsize::new(0),
        })
    }

    /// Ends every lane and waits for its thread. What still runs on a lane
    /// is dropped: the node calls this last, after the drain and after its
    /// workers stopped (the journal's last answers reach their lanes).
    /// Blocks: call it off the async workers.
    pub fn stop(self) {
        drop(self.lanes);
        for thread in self.threads {
            if thread.join().is_err() {
                tracing::error!("A connection lane panicked.");
            }
        }
    }

    /// How many lanes there are.
    pub fn len(&self) -> usize {
        self.lanes.len()
    }

    /// Whether there are none (never: `start` makes at least one).
    pub fn is_empty(&self) -> bool {
        self.lanes.is_empty()
    }

    /// Gives `job` to the next lane; hands it back if that lane has gone
    /// (its thread panicked), for the caller to run itself.
    pub fn send(&self, job: Job) -> Result<(), Job> {
        let n = self.next.fetch_add(1, Ordering::Relaxed) % self.lanes.len();
        self.lanes[n].send(job).map_err(|e| e.0)
    }
}
