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
//! slightly less CPU per claim (docs/performance-log.md, "Lanes and home
//! delivery").
//!
//! The admin listener and the node's background workers stay on the shared
//! runtime (the admin API uses `block_in_place`, which a single-threaded
//! runtime does not allow).
//!
//! With no stealing, a lane whose thread blocked would stall its
//! connections while every other part of the node looked healthy, so the
//! systemd watchdog asks each lane through a [`Probe`] too, not only the
//! claim committer.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use tokio::sync::{mpsc, oneshot};

use crate::vocab::{answer_each, Home};

/// A connection to serve: the future that serves it, first polled on its
/// lane (where it registers the socket with that lane's reactor).
pub type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The lane threads, and the next one to get a connection.
pub struct Lanes {
    lanes: Vec<mpsc::UnboundedSender<Job>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    next: AtomicUsize,
}

/// How long a stopping lane waits for its blocking tasks (a logout's store
/// write) before its thread ends anyway.
const BLOCKING_GRACE: Duration = Duration::from_secs(2);

/// Blocking threads shared out among the lanes (the shared runtime's
/// default ceiling), at least 16 a lane: 512 in all up to 32 lanes.
const BLOCKING_THREADS: usize = 512;

impl Lanes {
    /// Starts `count` lanes (at least one), named `ticketd-lane-<n>`. They
    /// run until [`Lanes::stop`].
    pub fn start(count: usize) -> io::Result<Lanes> {
        let count = count.max(1);
        let mut lanes = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        for n in 0..count {
            // Sockets and timers only: no signal or child-process driver,
            // whose bookkeeping (reaping orphans) would run at every park.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .max_blocking_threads((BLOCKING_THREADS / count).max(16))
                .build()?;
            // Unbounded, yet bounded by `server.max_connections` (twice
            // over, with the event streams' own budget): a connection is
            // counted before it is queued here.
            let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
            let thread = std::thread::Builder::new()
                .name(format!("ticketd-lane-{n}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        // Claims made here are answered here (see `Home`).
                        let mut answers = Home::settle_here();
                        tokio::spawn(async move {
                            while let Some(batch) = answers.recv().await {
                                answer_each(batch);
                            }
                        });
                        while let Some(job) = rx.recv().await {
                            tokio::spawn(job);
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

    /// A handle that asks every lane whether it is still turning (for the
    /// watchdog). It does not keep the lanes alive: [`Lanes::stop`] still
    /// ends them.
    pub fn probe(&self) -> Probe {
        Probe(self.lanes.iter().map(|l| l.downgrade()).collect())
    }

    /// Gives `job` to the next lane; hands it back if that lane has gone
    /// (its thread panicked), for the caller to run itself.
    pub fn send(&self, job: Job) -> Result<(), Job> {
        let n = self.next.fetch_add(1, Ordering::Relaxed) % self.lanes.len();
        self.lanes[n].send(job).map_err(|e| e.0)
    }
}

/// Asks each lane for a round trip; see [`Lanes::probe`].
pub struct Probe(Vec<mpsc::WeakUnboundedSender<Job>>);

impl Probe {
    /// Whether every lane ran a task of its own within `within`: false when
    /// one is stuck (its thread blocked or starved) or gone (panicked or
    /// stopped).
    pub async fn all_turning(&self, within: Duration) -> bool {
        let mut replies = Vec::with_capacity(self.0.len());
        for lane in &self.0 {
            let (tx, rx) = oneshot::channel();
            let job: Job = Box::pin(async move {
                let _ = tx.send(());
            });
            match lane.upgrade().map(|lane| lane.send(job)) {
                Some(Ok(())) => replies.push(rx),
                _ => return false,
            }
        }
        let all = async {
            for reply in replies {
                if reply.await.is_err() {
                    return false;
                }
            }
            true
        };
        tokio::time::timeout(within, all).await.unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc as std_mpsc;

    use super::*;
    use crate::vocab::{answer_all, Claim, CommitOutcome, PendingClaim};

    /// A claim made on a lane is answered on that lane, by its settler, not
    /// by the thread that answers it: while the lane's thread is busy, the
    /// answer waits for it.
    #[test]
    fn a_claim_made_on_a_lane_is_answered_there() {
        let lanes = Lanes::start(1).unwrap();
        let (made, pending) = std_mpsc::channel();
        let (go, wait) = std_mpsc::channel::<()>();
        let (report, outcome) = std_mpsc::channel();
        let job: Job = Box::pin(async move {
            let claim = Claim {
                id: 0,
                activity_id: "a".into(),
                ticket_id: "t".into(),
                code: "C".into(),
                user_id: 1,
                claimed_at_ms: 0,
                idempotency_key: None,
            };
            let (p, mut reply) = PendingClaim::new(claim, 1);
            made.send(p).unwrap();
            // Keep the lane's thread busy until the answer was sent.
            wait.recv().unwrap();
            let answered_meanwhile = reply.try_recv().is_ok();
            let (_, got) = reply.await.unwrap();
            report.send((answered_meanwhile, got)).unwrap();
        });
        assert!(lanes.send(job).is_ok());
        answer_all([(pending.recv().unwrap(), CommitOutcome::Committed(7))]);
        go.send(()).unwrap();
        assert_eq!(
            outcome.recv().unwrap(),
            (false, CommitOutcome::Committed(7)),
            "answered by the lane once it was free, not by the caller"
        );
        lanes.stop();
    }

    /// The watchdog's probe: true while every lane turns, false while one
    /// is blocked, true again once it is free, false once the lanes stopped.
    #[test]
    fn the_probe_tells_a_stuck_lane() {
        let lanes = Lanes::start(2).unwrap();
        let probe = lanes.probe();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Generous where the answer must come, short where it cannot.
        let (answers, cannot) = (Duration::from_secs(10), Duration::from_millis(200));
        assert!(rt.block_on(probe.all_turning(answers)), "two idle lanes answer");

        // Block the next lane's thread until told to go.
        let (go, wait) = std_mpsc::channel::<()>();
        let (blocked, is_blocked) = std_mpsc::channel::<()>();
        assert!(lanes
            .send(Box::pin(async move {
                blocked.send(()).unwrap();
                wait.recv().unwrap();
            }))
            .is_ok());
        is_blocked.recv().unwrap();
        assert!(
            !rt.block_on(probe.all_turning(cannot)),
            "a blocked lane does not answer"
        );

        go.send(()).unwrap();
        assert!(rt.block_on(probe.all_turning(answers)), "the freed lane answers again");

        lanes.stop();
        assert!(!rt.block_on(probe.all_turning(cannot)), "stopped lanes are not turning");
    }
}
