//! The bare hyper hello-world of `examples/hello.rs`, made durable: each
//! answer waits until a 64-byte record of its request is on disk, written
//! by one thread in group commits (write, then one `fdatasync` for every
//! record that arrived meanwhile), into a file whose blocks were laid
//! ahead as zeros and made durable, as ticketd's journal does
//! (`journal.preallocate`). It does nothing else: no parsing, no checks,
//! no ledger.
//!
//! `scripts/bench-side-by-side` runs it beside the hello-world: the ratio
//! between the two is what this design of durability costs on the box,
//! and its throughput the ceiling for ticketd's claims, which are made
//! durable the same way (one writer thread, one group commit on disk at a
//! time) and do much more besides. Other designs (a commit from each
//! serving thread, two commits in flight) are not measured by it.
//!
//! With `--no-sync` the writer takes the same groups and answers them
//! without writing or syncing: what the hand-off to the writer thread and
//! back costs alone.
//!
//! `cargo run --release --example hello_durable -- 127.0.0.1:8081 hello.records [--no-sync]`

use std::{
    convert::Infallible,
    fs::{File, OpenOptions},
    net::SocketAddr,
    os::unix::fs::FileExt,
    path::PathBuf,
};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use http_body_util::Full;
use hyper::{server::conn::http1, service::service_fn, Response};
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;

/// One request's record: what the writer puts on disk before its answer.
const RECORD: usize = 64;
/// Zeros laid ahead of the records, as ticketd's default `journal.preallocate`.
const PREALLOCATE: u64 = 1 << 20;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:8081".into())
        .parse()
        .expect("an address like 127.0.0.1:8081");
    let path = PathBuf::from(args.next().unwrap_or_else(|| "hello.records".into()));
    let sync = args.next().as_deref() != Some("--no-sync");
    let file = OpenOptions::new().create(true).truncate(true).write(true).open(&path)?;
    let (tx, rx) = crossbeam_channel::unbounded::<oneshot::Sender<()>>();
    std::thread::Builder::new().name("writer".into()).spawn(move || {
        if let Err(error) = writer(file, rx, sync) {
            // Every request would wait for an answer that never comes.
            eprintln!("hello_durable: writing {} failed: {error}", path.display());
            std::process::exit(1);
        }
    })?;

    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("hello_durable listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let tx = tx.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |_req| durable(tx.clone()));
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

/// Answers once the writer says this request's record is durable.
async fn durable(tx: Sender<oneshot::Sender<()>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (done, durable) = oneshot::channel();
    tx.send(done).expect("the writer runs as long as the server");
    durable.await.expect("the writer answers every record");
    Ok(Response::new(Full::new(Bytes::from_static(b"Hello, World!"))))
}

/// Group commit: takes every record waiting, writes them in one call, makes
/// them durable with one `fdatasync`, then answers each.
fn writer(file: File, rx: Receiver<oneshot::Sender<()>>, sync: bool) -> std::io::Result<()> {
    let mut laid = lay_zeros(&file, 0)?;
    let mut len = 0u64;
    let mut buf = Vec::new();
    let mut group = Vec::new();
    while let Ok(first) = rx.recv() {
        group.push(first);
        group.extend(rx.try_iter());
        if !sync {
            for done in group.drain(..) {
                let _ = done.send(());
            }
            continue;
        }
        buf.clear();
        for (i, _) in group.iter().enumerate() {
            let mut record = [b' '; RECORD];
            record[..8].copy_from_slice(&(len / RECORD as u64 + i as u64).to_le_bytes());
            record[RECORD - 1] = b'\n';
            buf.extend_from_slice(&record);
        }
        file.write_all_at(&buf, len)?;
        file.sync_data()?;
        len += buf.len() as u64;
        for done in group.drain(..) {
            let _ = done.send(());
        }
        if laid < len + PREALLOCATE / 4 {
            // Zeros written and made durable ahead (not a sparse
            // `set_len`), so a group's fdatasync flushes its data and not
            // the file's new size or its block map.
            laid = lay_zeros(&file, laid.max(len))?;
        }
    }
    Ok(())
}

/// Writes [`PREALLOCATE`] zeros at `from` and makes them durable; returns
/// where they end.
fn lay_zeros(file: &File, from: u64) -> std::io::Result<u64> {
    file.write_all_at(&vec![0; PREALLOCATE as usize], from)?;
    file.sync_data()?;
    Ok(from + PREALLOCATE)
}
