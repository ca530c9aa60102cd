//! A TCP relay that can lose one answer: it passes a request on to the
//! server and then cuts the connection before the server's answer gets
//! back. That is a call that ran but whose answer was lost (a connection
//! reset, a proxy, a failover), which no signal to the server can make.
//!
//! It can also hold a request on its way: from the first request that
//! contains a given text, nothing more reaches the server, on any of the
//! relay's connections, until the test lets it go. That is a slow network
//! between one node and Redis, while every other node reaches Redis as
//! usual.

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Condvar, Mutex,
    },
    thread,
};

/// Relays `127.0.0.1:port` to a server on `127.0.0.1`, for the life of the test.
pub struct Relay {
    pub port: u16,
    armed: Arc<Mutex<Option<Vec<u8>>>>,
    cuts: Arc<AtomicUsize>,
    hold: Arc<Hold>,
}

impl Drop for Relay {
    /// A test that fails while holding lets its relay's threads go.
    fn drop(&mut self) {
        self.release();
    }
}

/// The bytes of a read kept to look for a text across two reads (longer
/// than any text a test looks for).
const CARRY: usize = 64;

/// Whether `needle` is in this read (`chunk`) or straddles it and the end
/// of the previous one (`carry`).
fn sent(carry: &[u8], chunk: &[u8], needle: &[u8]) -> bool {
    [carry, chunk].concat().windows(needle.len()).any(|w| w == needle)
}

/// What [`Relay::hold_from`] armed, and whether it is holding.
#[derive(Default)]
struct Hold {
    state: Mutex<HoldState>,
    released: Condvar,
}

#[derive(Default)]
struct HoldState {
    needle: Option<Vec<u8>>,
    holding: bool,
}

impl Hold {
    /// Called with each read from a client before it goes on (`carry`: the
    /// end of the connection's previous read, so a text split across two
    /// reads is found): waits while the relay holds.
    fn pass(&self, carry: &[u8], chunk: &[u8]) {
        let mut state = self.state.lock().unwrap();
        let found = state.needle.as_deref().is_some_and(|needle| sent(carry, chunk, needle));
        if found {
            state.needle = None;
            state.holding = true;
        }
        while state.holding {
            state = self.released.wait(state).unwrap();
        }
    }
}

impl Relay {
    /// Listens on a free port and relays each connection to `upstream`.
    pub fn start(upstream: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
        let cuts = Arc::new(AtomicUsize::new(0));
        let hold = Arc::new(Hold::default());
        let (a, c, h) = (armed.clone(), cuts.clone(), hold.clone());
        thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                relay(client, server, a.clone(), c.clone(), h.clone());
            }
        });
        Relay {
            port,
            armed,
            cuts,
            hold,
        }
    }

    /// From the next request whose bytes contain `needle` (that one
    /// included), requests are held, on every connection, until
    /// [`Relay::release`]. Answers to requests already sent still come back.
    pub fn hold_from(&self, needle: &[u8]) {
        self.hold.state.lock().unwrap().needle = Some(needle.to_vec());
    }

    /// Whether a request matched [`Relay::hold_from`]'s text and is held.
    pub fn holding(&self) -> bool {
        self.hold.state.lock().unwrap().holding
    }

    /// Lets the held requests go on, in the order they were sent, and
    /// holds nothing more.
    pub fn release(&self) {
        let mut state = self.hold.state.lock().unwrap();
        state.holding = false;
        state.needle = None;
        self.hold.released.notify_all();
    }

    /// The next request whose bytes contain `needle` is passed on, and its
    /// connection is then cut before any more of the server's answers
    /// reach the client. A Redis script's `NOSCRIPT` answer (it did not
    /// run: the client loads it and calls again) goes through, and the
    /// next such request is cut instead.
    pub fn cut_answer_to(&self, needle: &[u8]) {
        *self.armed.lock().unwrap() = Some(needle.to_vec());
    }

    /// Connections cut so far.
    pub fn cuts(&self) -> usize {
        self.cuts.load(Ordering::SeqCst)
    }
}

fn relay(
    client: TcpStream,
    server: TcpStream,
    armed: Arc<Mutex<Option<Vec<u8>>>>,
    cuts: Arc<AtomicUsize>,
    hold: Arc<Hold>,
) {
    let cut = Arc::new(AtomicBool::new(false));
    let hit: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
    let (mut from_client, mut to_server) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let (up_cut, up_hit, up_armed) = (cut.clone(), hit.clone(), armed.clone());
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut carry = Vec::new();
        while let Ok(n) = from_client.read(&mut buf) {
            if n == 0 {
                break;
            }
            let chunk = &buf[..n];
            {
                let mut armed = up_armed.lock().unwrap();
                let matched = armed.as_deref().is_some_and(|needle| sent(&carry, chunk, needle));
                // Marked before the request goes on: its answer comes after.
                if matched {
                    *up_hit.lock().unwrap() = armed.take();
                    up_cut.store(true, Ordering::SeqCst);
                }
            }
            hold.pass(&carry, chunk);
            carry = chunk[chunk.len().saturating_sub(CARRY)..].to_vec();
            if to_server.write_all(chunk).is_err() {
                break;
            }
        }
        let _ = to_server.shutdown(Shutdown::Write);
    });
    let (mut from_server, mut to_client) = (server, client);
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = from_server.read(&mut buf) {
            if n == 0 {
                break;
            }
            if cut.load(Ordering::SeqCst) && buf[..n].starts_with(b"-NOSCRIPT") {
                *armed.lock().unwrap() = hit.lock().unwrap().take();
                cut.store(false, Ordering::SeqCst);
            } else if cut.load(Ordering::SeqCst) {
                cuts.fetch_add(1, Ordering::SeqCst);
                let _ = to_client.shutdown(Shutdown::Both);
                let _ = from_server.shutdown(Shutdown::Both);
                return;
            }
            if to_client.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to_client.shutdown(Shutdown::Write);
    });
}
