//! Background work as named workers, started and stopped by one [`Runner`].
//!
//! Every loop that runs beside the request path — the journal writer and the
//! store applier (threads), the stats flush, the lease loop, the cluster
//! committer and MongoDB writer, the signal handler, … — is registered here
//! under a stable name. The runner gives each a [`Ctl`] to report progress
//! (an iteration, an error) and its own stop signal, shows every worker's
//! state in `/metrics` (`ticketd_worker_up{worker}` and friends), and at
//! shutdown stops them one by one in a declared order, waiting for each
//! before the next: a worker's stop is only asked for once everything that
//! feeds it has stopped, so nothing is left in a queue (the model is
//! garage's `util/background`).
//!
//! Two kinds of worker: async tasks on a tokio runtime ([`Runner::task`]),
//! and OS threads for blocking loops that must not sit on a runtime
//! ([`Runner::thread`]: fsync, SQLite, file appends). A worker stops when it
//! returns; a panic is caught where it happens, reported as `failed` and
//! logged at once (not only when the runner stops it at shutdown: until
//! then a dead worker showed as running), and [`Runner::failed`] names it
//! so the node stops telling systemd's watchdog all is well.
//!
//! This module imports nothing of the node.

use std::{
    fmt,
    future::Future,
    sync::{
        atomic::{AtomicU64, AtomicU8, Ordering},
        Arc,
    },
    time::Instant,
};

use futures_util::FutureExt;
use parking_lot::Mutex;
use tokio::{runtime::Handle, sync::watch};

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum WorkerState {
    /// Doing its work.
    Running = 0,
    /// Asked to stop; finishing what it holds.
    Stopping = 1,
    /// Returned normally.
    Stopped = 2,
    /// Panicked.
    Failed = 3,
}

impl WorkerState {
    fn from_u8(v: u8) -> WorkerState {
        match v {
            0 => WorkerState::Running,
            1 => WorkerState::Stopping,
            2 => WorkerState::Stopped,
            _ => WorkerState::Failed,
        }
    }

    /// The label in `/metrics` and `/admin/stats`.
    pub fn label(self) -> &'static str {
        match self {
            WorkerState::Running => "running",
            WorkerState::Stopping => "stopping",
            WorkerState::Stopped => "stopped",
            WorkerState::Failed => "failed",
        }
    }
}

/// Records how a worker ended: stopped, or failed at the moment it
/// panicked (the runner's join only sees it at shutdown).
fn ended(status: &Status, panicked: bool) {
    if panicked {
        status.state.store(WorkerState::Failed as u8, Ordering::Release);
        *status.last_error.lock() = Some(("panicked".into(), Instant::now()));
        status.errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!(worker = status.name, "Worker failed (panicked).");
    } else {
        status.state.store(WorkerState::Stopped as u8, Ordering::Release);
    }
}

/// The live status of one worker, shared by the worker and the runner.
struct Status {
    name: &'static str,
    state: AtomicU8,
    iterations: AtomicU64,
    errors: AtomicU64,
    /// The last error, as a sentence, and when it happened.
    last_error: Mutex<Option<(String, Instant)>>,
}

/// A worker's handle on its own status.
#[derive(Clone)]
pub struct Ctl(Arc<Status>);

impl Ctl {
    /// Counts one round of work.
    pub fn tick(&self) {
        self.0.iterations.fetch_add(1, Ordering::Relaxed);
    }

    /// Records an error the worker survived (it retries or carries on).
    pub fn error(&self, error: &dyn fmt::Display) {
        self.0.errors.fetch_add(1, Ordering::Relaxed);
        *self.0.last_error.lock() = Some((error.to_string(), Instant::now()));
    }

    /// The worker's name.
    pub fn name(&self) -> &'static str {
        self.0.name
    }
}

/// A worker's stop signal.
#[derive(Clone)]
pub struct Stop(watch::Receiver<bool>);

impl Stop {
    /// Resolves once the runner asks this worker to stop (at once if it has).
    pub async fn requested(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    /// Whether the runner has asked this worker to stop.
    pub fn is_requested(&self) -> bool {
        *self.0.borrow()
    }

    /// Waits for `interval`'s next tick: true then, false once the stop is
    /// asked for. The stop comes first: a round slower than the period
    /// leaves the next tick due when it ends, and `select!` picks among
    /// ready branches at random (a refresher whose MongoDB calls each
    /// waited two seconds for a server that was down went round another
    /// five times after SIGTERM).
    pub async fn tick(&mut self, interval: &mut tokio::time::Interval) -> bool {
        tokio::select! {
            biased;
            _ = self.requested() => false,
            _ = interval.tick() => true,
        }
    }
}

/// What `/metrics` and `/admin/stats` show of one worker.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerReport {
    /// The worker's name.
    pub name: &'static str,
    /// Its state.
    #[serde(serialize_with = "state_label")]
    pub state: WorkerState,
    /// Rounds of work done.
    pub iterations: u64,
    /// Errors it survived.
    pub errors: u64,
    /// The last of them, if any.
    pub last_error: Option<String>,
    /// Seconds since the last error.
    pub last_error_age_secs: Option<u64>,
}

fn state_label<S: serde::Serializer>(state: &WorkerState, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(state.label())
}

enum Join {
    Task(tokio::task::JoinHandle<()>),
    Thread(std::thread::JoinHandle<()>),
}

struct Registered {
    status: Arc<Status>,
    stop: Option<Box<dyn FnOnce() + Send>>,
    join: Option<Join>,
}

/// Starts workers, reports on them, stops them in order.
#[derive(Default)]
pub struct Runner {
    workers: Mutex<Vec<Registered>>,
}

impl Runner {
    /// An empty runner.
    pub fn new() -> Runner {
        Runner::default()
    }

    fn register(&self, name: &'static str) -> Arc<Status> {
        let status = Arc::new(Status {
            name,
            state: AtomicU8::new(WorkerState::Running as u8),
            iterations: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            last_error: Mutex::new(None),
        });
        tracing::debug!(worker = name, "Worker started.");
        status
    }

    /// Starts `work` as the task worker `name` on `runtime`. It gets its
    /// [`Ctl`] and a [`Stop`] that turns true when the runner stops it; it
    /// should then finish what it holds and return.
    pub fn task<F, Fut>(&self, name: &'static str, runtime: &Handle, work: F)
    where
        F: FnOnce(Ctl, Stop) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let status = self.register(name);
        let (stop_tx, stop_rx) = watch::channel(false);
        let fut = work(Ctl(status.clone()), Stop(stop_rx));
        let done = status.clone();
        let handle = runtime.spawn(async move {
            let panicked = std::panic::AssertUnwindSafe(fut).catch_unwind().await.is_err();
            ended(&done, panicked);
        });
        self.workers.lock().push(Registered {
            status,
            stop: Some(Box::new(move || {
                let _ = stop_tx.send(true);
            })),
            join: Some(Join::Task(handle)),
        });
    }

    /// Starts `work` as the thread worker `name`. `stop` asks it to finish
    /// (for example by sending it a close message); it is called once, when
    /// the runner stops this worker.
    pub fn thread(
        &self,
        name: &'static str,
        work: impl FnOnce(Ctl) + Send + 'static,
        stop: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<()> {
        let status = self.register(name);
        let ctl = Ctl(status.clone());
        let done = status.clone();
        let handle = std::thread::Builder::new().name(name.into()).spawn(move || {
            let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(ctl))).is_err();
            ended(&done, panicked);
        })?;
        self.workers.lock().push(Registered {
            status,
            stop: Some(Box::new(stop)),
            join: Some(Join::Thread(handle)),
        });
        Ok(())
    }

    /// Every worker's state, in the order they were started.
    pub fn report(&self) -> Vec<WorkerReport> {
        self.workers
            .lock()
            .iter()
            .map(|w| {
                let s = &w.status;
                let last = s.last_error.lock().clone();
                WorkerReport {
                    name: s.name,
                    state: WorkerState::from_u8(s.state.load(Ordering::Acquire)),
                    iterations: s.iterations.load(Ordering::Relaxed),
                    errors: s.errors.load(Ordering::Relaxed),
                    last_error_age_secs: last.as_ref().map(|(_, at)| at.elapsed().as_secs()),
                    last_error: last.map(|(e, _)| e),
                }
            })
            .collect()
    }

    /// The first worker that panicked, if any: the node runs on without it,
    /// so it is no longer well (see `app::supervise`).
    pub fn failed(&self) -> Option<&'static str> {
        self.workers
            .lock()
            .iter()
            .find(|w| w.status.state.load(Ordering::Acquire) == WorkerState::Failed as u8)
            .map(|w| w.status.name)
    }

    /// Stops every worker: those named in `order` first, one at a time in
    /// that order (each is asked to stop and waited for before the next),
    /// then any others in reverse start order. Logs a line per worker.
    pub async fn stop(&self, order: &[&str]) {
        loop {
            let next = {
                let workers = self.workers.lock();
                order
                    .iter()
                    .find_map(|name| workers.iter().position(|w| w.status.name == *name && w.join.is_some()))
                    .or_else(|| workers.iter().rposition(|w| w.join.is_some()))
            };
            let Some(i) = next else { break };
            let (status, stop, join) = {
                let mut workers = self.workers.lock();
                let w = &mut workers[i];
                (w.status.clone(), w.stop.take(), w.join.take())
            };
            if !order.contains(&status.name) {
                tracing::warn!(
                    worker = status.name,
                    "Worker has no place in the stop order; stopping it last."
                );
            }
            // A failed worker stays failed.
            let _ = status.state.compare_exchange(
                WorkerState::Running as u8,
                WorkerState::Stopping as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
            if let Some(stop) = stop {
                stop();
            }
            // A panic was caught and recorded where it happened.
            match join {
                Some(Join::Task(handle)) => {
                    let _ = handle.await;
                }
                Some(Join::Thread(handle)) => {
                    let _ = tokio::task::spawn_blocking(move || handle.join()).await;
                }
                None => {}
            }
            if WorkerState::from_u8(status.state.load(Ordering::Acquire)) == WorkerState::Failed {
                tracing::error!(worker = status.name, "Worker had failed (panicked).");
            } else {
                status.state.store(WorkerState::Stopped as u8, Ordering::Release);
                tracing::info!(worker = status.name, "Worker stopped.");
            }
        }
    }
}

/// Runs `round` every `period` until stopped; a stop asked for during a
/// round ends the loop once that round is done ([`Stop::tick`]).
pub async fn every<F, Fut>(period: std::time::Duration, ctl: Ctl, mut stop: Stop, mut round: F)
where
    F: FnMut(&Ctl) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while stop.tick(&mut interval).await {
        round(&ctl).await;
        ctl.tick();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn workers_report_and_stop_in_the_declared_order() {
        let runner = Runner::new();
        let order = Arc::new(Mutex::new(Vec::new()));
        for name in ["b", "a"] {
            let order = order.clone();
            runner.task(name, &Handle::current(), move |ctl, mut stop| async move {
                ctl.tick();
                stop.requested().await;
                order.lock().push(ctl.name());
            });
        }
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let seen = order.clone();
        runner
            .thread(
                "t",
                move |ctl| {
                    ctl.error(&"a hiccup");
                    let _ = rx.recv();
                    seen.lock().push("t");
                },
                move || drop(tx),
            )
            .unwrap();
        tokio::task::yield_now().await;
        let report = runner.report();
        assert_eq!(report.iter().map(|r| r.name).collect::<Vec<_>>(), ["b", "a", "t"]);
        assert!(report.iter().all(|r| r.state == WorkerState::Running));
        runner.stop(&["t", "a", "b"]).await;
        assert_eq!(*order.lock(), ["t", "a", "b"]);
        let report = runner.report();
        assert!(report.iter().all(|r| r.state == WorkerState::Stopped), "{report:?}");
        let t = report.iter().find(|r| r.name == "t").unwrap();
        assert_eq!((t.errors, t.last_error.as_deref()), (1, Some("a hiccup")));
    }

    /// A stop asked for during a round slower than the period ends the loop
    /// after that round, every time (before, each time a coin toss whether
    /// another round ran first).
    #[tokio::test]
    async fn a_stop_during_a_slow_round_ends_the_loop_after_it() {
        for _ in 0..32 {
            let runner = Runner::new();
            let (rounds, started) = (Arc::new(AtomicUsize::new(0)), Arc::new(tokio::sync::Notify::new()));
            let (r, s) = (rounds.clone(), started.clone());
            runner.task("slow", &Handle::current(), move |ctl, stop| {
                every(std::time::Duration::from_millis(1), ctl, stop, move |_| {
                    let (r, s) = (r.clone(), s.clone());
                    async move {
                        r.fetch_add(1, Ordering::SeqCst);
                        s.notify_one();
                        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    }
                })
            });
            started.notified().await;
            runner.stop(&["slow"]).await;
            assert_eq!(
                rounds.load(Ordering::SeqCst),
                1,
                "a round ran after the stop was asked for"
            );
        }
    }

    /// A worker that panics shows as failed at once, not when the runner
    /// stops it at shutdown (until then it showed as running, so no alert
    /// fired and the watchdog was fed while the node ran without it).
    #[tokio::test]
    async fn a_panicking_worker_is_reported_failed_when_it_panics() {
        let runner = Runner::new();
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        runner.task("boom", &Handle::current(), move |_, _| async move {
            r.fetch_add(1, Ordering::Relaxed);
            panic!("on purpose");
        });
        runner
            .thread("thread-boom", |_| panic!("on purpose too"), || {})
            .unwrap();
        runner.task("calm", &Handle::current(), |_, mut stop| async move {
            stop.requested().await
        });
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while runner
            .report()
            .iter()
            .filter(|r| r.state == WorkerState::Failed)
            .count()
            < 2
        {
            assert!(Instant::now() < deadline, "{:?}", runner.report());
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(runner.failed(), Some("boom"));
        let report = runner.report();
        assert_eq!(report[0].last_error.as_deref(), Some("panicked"));
        assert_eq!(report[2].state, WorkerState::Running);
        runner.stop(&["calm", "thread-boom", "boom"]).await;
        assert_eq!(ran.load(Ordering::Relaxed), 1);
        let states: Vec<_> = runner.report().iter().map(|r| r.state).collect();
        assert_eq!(states, [WorkerState::Failed, WorkerState::Failed, WorkerState::Stopped]);
    }
}
