//! The bare hyper hello-world of `examples/hello.rs`, made durable: each
//! answer waits until a 64-byte record of its request is on disk, written
//! in group commits (every record that arrived meanwhile in one write, then
//! one `fdatasync`), into a file whose blocks were laid ahead as zeros and
//! made durable, as ticketd's journal does (`journal.preallocate`). It does
//! nothing else: no parsing, no checks, no ledger.
//!
//! Connections are served as ticketd serves them: one acceptor hands them
//! in turn to *lanes*, one thread per core each running a single-threaded
//! runtime, and a connection stays on its lane. Who commits is the design
//! measured:
//!
//! - by default, ticketd's: one writer thread takes every record queued by
//!   any lane, commits them, and then sends each lane one message saying
//!   how many of its requests that commit made durable (ticketd's home
//!   delivery: one cross-thread wake-up per lane and group, not per
//!   request). One group commit is on disk at a time.
//! - with `--inline`, no writer thread: each lane keeps its own file and
//!   commits its own groups, once every request that was ready has queued
//!   its record, blocking its thread in `fdatasync` before answering them.
//!   No wake-up crosses threads, there are as many commits in flight as
//!   lanes (each on its own file), and while one lane waits on the disk
//!   another has the CPU. A lane's connections all wait while it is blocked, which is why
//!   ticketd, whose lanes also serve reads and refusals, does not do this.
//!
//! `scripts/bench-side-by-side` runs both beside the hello-world: the ratio
//! between each and the hello-world is what that design of durability costs
//! on the box, and its throughput the ceiling for claims made durable that
//! way.
//!
//! With `--no-sync` the same groups are taken and answered without writing
//! or syncing: what the hand-offs cost alone.
//!
//! `cargo run --release --example hello_durable -- 127.0.0.1:8081 hello.records [--inline] [--no-sync]`

use std::{
    cell::RefCell,
    collections::VecDeque,
    convert::Infallible,
    fs::{File, OpenOptions},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    rc::Rc,
};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use http_body_util::Full;
use hyper::{server::conn::http1, service::service_fn, Response};
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, oneshot, Notify};

/// One request's record: what is put on disk before its answer.
const RECORD: usize = 64;
/// Zeros laid ahead of the records, as ticketd's default `journal.preallocate`.
const PREALLOCATE: u64 = 1 << 20;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:8081".into())
        .parse()
        .expect("an address like 127.0.0.1:8081");
    let path = PathBuf::from(args.next().unwrap_or_else(|| "hello.records".into()));
    let flags: Vec<String> = args.collect();
    let sync = !flags.iter().any(|f| f == "--no-sync");
    let inline = flags.iter().any(|f| f == "--inline");
    let count = std::thread::available_parallelism().map_or(1, |n| n.get());

    let listener = TcpListener::bind(addr)?;
    eprintln!("hello_durable listening on {}", listener.local_addr()?);
    // The writer's queue: each record is the index of the lane waiting on it.
    let (records, queued) = crossbeam_channel::unbounded::<usize>();
    let mut homes = Vec::with_capacity(count);
    let mut lanes = Vec::with_capacity(count);
    for n in 0..count {
        let (conns, incoming) = mpsc::unbounded_channel::<TcpStream>();
        let (home, durable) = mpsc::unbounded_channel::<usize>();
        let commit = if inline {
            Commit::Inline(open(&path.with_extension(format!("lane{n}")))?)
        } else {
            Commit::Writer {
                records: records.clone(),
                durable,
                lane: n,
            }
        };
        std::thread::Builder::new().name(format!("lane-{n}")).spawn(move || {
            let served = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .and_then(|runtime| tokio::task::LocalSet::new().block_on(&runtime, lane(incoming, commit, sync)));
            if let Err(error) = served {
                // Every request would wait for an answer that never comes.
                eprintln!("hello_durable: a lane failed: {error}");
                std::process::exit(1);
            }
        })?;
        homes.push(home);
        lanes.push(conns);
    }
    drop(records);
    if !inline {
        let file = open(&path)?;
        std::thread::Builder::new().name("writer".into()).spawn(move || {
            if let Err(error) = writer(file, queued, homes, sync) {
                eprintln!("hello_durable: writing {} failed: {error}", path.display());
                std::process::exit(1);
            }
        })?;
    }

    for (stream, n) in listener.incoming().zip((0..count).cycle()) {
        let stream = stream?;
        let _ = stream.set_nodelay(true);
        stream.set_nonblocking(true)?;
        if lanes[n].send(stream).is_err() {
            return Err(std::io::Error::other("a lane stopped"));
        }
    }
    Ok(())
}

fn open(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).truncate(true).write(true).open(path)
}

/// How a lane's records become durable.
enum Commit {
    /// Sent to the writer thread, whose answers come home on `durable`.
    Writer {
        records: Sender<usize>,
        durable: mpsc::UnboundedReceiver<usize>,
        lane: usize,
    },
    /// Committed by the lane itself, into its own file.
    Inline(File),
}

/// One lane's requests waiting for durability, oldest first.
#[derive(Default)]
struct Waiting {
    answers: RefCell<VecDeque<oneshot::Sender<()>>>,
    queued: Notify,
}

impl Waiting {
    /// Answers the `n` oldest requests.
    fn answer(&self, n: usize) {
        let mut answers = self.answers.borrow_mut();
        let n = n.min(answers.len());
        for done in answers.drain(..n) {
            let _ = done.send(());
        }
    }
}

/// Serves the connections handed to this lane; settles their records the
/// way `commit` says.
async fn lane(mut incoming: mpsc::UnboundedReceiver<TcpStream>, commit: Commit, sync: bool) -> std::io::Result<()> {
    let waiting = Rc::new(Waiting::default());
    let records = match commit {
        Commit::Writer {
            records,
            mut durable,
            lane,
        } => {
            let settler = Rc::clone(&waiting);
            tokio::task::spawn_local(async move {
                while let Some(n) = durable.recv().await {
                    settler.answer(n);
                }
            });
            Some((records, lane))
        }
        Commit::Inline(file) => {
            let committer = Rc::clone(&waiting);
            tokio::task::spawn_local(async move {
                if let Err(error) = commit_inline(&committer, file, sync).await {
                    eprintln!("hello_durable: a lane's commit failed: {error}");
                    std::process::exit(1);
                }
            });
            None
        }
    };
    while let Some(stream) = incoming.recv().await {
        let stream = tokio::net::TcpStream::from_std(stream)?;
        let waiting = Rc::clone(&waiting);
        let records = records.clone();
        tokio::task::spawn_local(async move {
            let svc = service_fn(move |_req| {
                let (done, durable) = oneshot::channel();
                waiting.answers.borrow_mut().push_back(done);
                match &records {
                    Some((records, lane)) => records.send(*lane).expect("the writer runs as long as the lanes"),
                    None => waiting.queued.notify_one(),
                }
                async move {
                    durable.await.expect("every record is answered");
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"Hello, World!"))))
                }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
    Ok(())
}

/// The writer thread's group commit: takes every record waiting, writes
/// them in one call, makes them durable with one `fdatasync`, then tells
/// each lane how many of its requests to answer.
fn writer(
    file: File,
    queued: Receiver<usize>,
    homes: Vec<mpsc::UnboundedSender<usize>>,
    sync: bool,
) -> std::io::Result<()> {
    let mut log = Log::new(file, sync)?;
    let mut per_lane = vec![0usize; homes.len()];
    while let Ok(first) = queued.recv() {
        per_lane[first] += 1;
        for lane in queued.try_iter() {
            per_lane[lane] += 1;
        }
        log.commit(per_lane.iter().sum())?;
        for (home, n) in homes.iter().zip(&mut per_lane) {
            if *n > 0 {
                let _ = home.send(std::mem::take(n));
            }
        }
    }
    Ok(())
}

/// A lane's own group commit: waits for a record, lets every other ready
/// request run first (so they join the group), then writes the group and
/// blocks the thread in `fdatasync` before answering it.
async fn commit_inline(waiting: &Waiting, file: File, sync: bool) -> std::io::Result<()> {
    let mut log = Log::new(file, sync)?;
    loop {
        waiting.queued.notified().await;
        tokio::task::yield_now().await;
        let n = waiting.answers.borrow().len();
        log.commit(n)?;
        waiting.answer(n);
    }
}

/// A file of records with zeros laid ahead.
struct Log {
    file: File,
    sync: bool,
    len: u64,
    laid: u64,
    buf: Vec<u8>,
}

impl Log {
    fn new(file: File, sync: bool) -> std::io::Result<Log> {
        let laid = if sync { lay_zeros(&file, 0)? } else { 0 };
        Ok(Log {
            file,
            sync,
            len: 0,
            laid,
            buf: Vec::new(),
        })
    }

    /// Writes `n` records and makes them durable (unless `--no-sync`).
    fn commit(&mut self, n: usize) -> std::io::Result<()> {
        if !self.sync || n == 0 {
            return Ok(());
        }
        self.buf.clear();
        for i in 0..n as u64 {
            let mut record = [b' '; RECORD];
            record[..8].copy_from_slice(&(self.len / RECORD as u64 + i).to_le_bytes());
            record[RECORD - 1] = b'\n';
            self.buf.extend_from_slice(&record);
        }
        self.file.write_all_at(&self.buf, self.len)?;
        self.file.sync_data()?;
        self.len += self.buf.len() as u64;
        if self.laid < self.len + PREALLOCATE / 4 {
            // Zeros written and made durable ahead (not a sparse
            // `set_len`), so a group's fdatasync flushes its data and not
            // the file's new size or its block map.
            self.laid = lay_zeros(&self.file, self.laid.max(self.len))?;
        }
        Ok(())
    }
}

/// Writes [`PREALLOCATE`] zeros at `from` and makes them durable; returns
/// where they end.
fn lay_zeros(file: &File, from: u64) -> std::io::Result<u64> {
    file.write_all_at(&vec![0; PREALLOCATE as usize], from)?;
    file.sync_data()?;
    Ok(from + PREALLOCATE)
}
