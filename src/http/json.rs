//! JSON bodies out: each answer is serialised into a buffer its thread
//! keeps, then copied once into a body of exactly its size.
//!
//! `serde_json::to_vec` grows a fresh `Vec` by doubling (a reallocation or
//! two for a claim's answer), and a `Vec` with room to spare becomes a
//! `Bytes` through a second allocation for its reference count. Here an
//! answer costs one allocation, of its own length.

use std::cell::RefCell;

use bytes::Bytes;
use serde::Serialize;

/// What a thread's buffer starts with (a claim's answer is about 300 bytes).
const START: usize = 1024;
/// The most a thread's buffer keeps between answers: a larger answer's
/// growth (a page of claims, an admin's figures) is given back after it.
const KEEP: usize = 64 * 1024;

thread_local! {
    static BUFFER: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(START));
}

/// `value` as JSON.
pub fn to_bytes<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<Bytes> {
    BUFFER.with(|buffer| match buffer.try_borrow_mut() {
        Ok(mut buf) => {
            buf.clear();
            let written = serde_json::to_writer(&mut *buf, value).map(|()| Bytes::copy_from_slice(&buf));
            if buf.capacity() > KEEP {
                *buf = Vec::with_capacity(START);
            }
            written
        }
        // Only if a `Serialize` implementation itself rendered JSON with
        // this function; none does, but that is no reason to panic.
        Err(_) => serde_json::to_vec(value).map(Bytes::from),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_rendered_in_one_buffer_that_stays_bounded() {
        let at = || BUFFER.with(|b| b.borrow().as_ptr());
        let small = to_bytes(&serde_json::json!({"ok": true})).unwrap();
        assert_eq!(&small[..], br#"{"ok":true}"#);
        let before = at();
        assert_eq!(&to_bytes(&[1, 2, 3]).unwrap()[..], b"[1,2,3]");
        assert_eq!(at(), before, "the thread's buffer is reused, not made anew");
        let big = "x".repeat(200_000);
        assert_eq!(to_bytes(&big).unwrap().len(), big.len() + 2);
        BUFFER.with(|b| assert!(b.borrow().capacity() <= KEEP));
        // Nothing of an earlier answer is left in a later one.
        assert_eq!(&to_bytes(&1).unwrap()[..], b"1");
    }
}
