//! Lower-case hex of fixed-size byte strings: waiting-room seeds, session
//! token ids, digests. Imports nothing of the node.

use std::fmt::Write;

/// `bytes` as lower-case hex.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Exactly `N` bytes from `2 * N` hex digits (either case); `None` otherwise.
pub fn from_hex<const N: usize>(hex: &str) -> Option<[u8; N]> {
    // Hex digits only: `from_str_radix` would also take a sign (`+a`).
    if hex.len() != N * 2 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_goes_both_ways_and_refuses_anything_else() {
        let bytes = [0x00, 0x7f, 0xab, 0xff];
        assert_eq!(to_hex(&bytes), "007fabff");
        assert_eq!(from_hex::<4>("007fabff"), Some(bytes));
        assert_eq!(from_hex::<4>("007FABFF"), Some(bytes));
        for bad in ["007fab", "007fabff00", "+07fabff", "007fabfg"] {
            assert_eq!(from_hex::<4>(bad), None, "{bad}");
        }
    }
}
