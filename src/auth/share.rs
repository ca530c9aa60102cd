//! Each client's share of the password hashing.
//!
//! argon2 is rationed: `auth.max_concurrent_hashes` turns and
//! `auth.hash_queue` places waiting for one. Past them every login and
//! registration hears 503 `BUSY`, whoever sends it. Per-account and
//! per-failure limits do not stop a few clients from holding every place:
//! one account logging in with its right password from many /64s of one
//! IPv6 /48, or a few dozen accounts from a dozen IPv4 addresses, kept the
//! queue full, and at a sale's opening nobody else could log in.
//!
//! So each client holds at most `auth.hashes_per_ip` of the turns and
//! places at once (an IPv6 client: per /64, and its /48 [`SITE_SHARE`]
//! times that). Past it the client hears 429 `LOGIN_THROTTLED` with
//! Retry-After, and the places stay free for others: filling the queue takes
//! `(turns + places) / hashes_per_ip` addresses, or an eighth as many /48s.
//! One address's logins still go as fast as the hashing allows: its share
//! is more than the turns that run at once.
//!
//! A share is held from the reservation until the hash ends (it moves with
//! the turn into the hashing task), so a client that hangs up mid-hash does
//! not get its share back early. Counts live in [`BoundedMap`]s: an evicted
//! count comes back as zero, which can only ever be generous.

use std::{net::IpAddr, sync::Arc, time::Instant};

use super::bounded::BoundedMap;
use crate::vocab::{client_key, site_key, SITE_BUDGETS};

/// How many addresses' (/64s') shares one IPv6 /48 holds ([`SITE_BUDGETS`]).
pub const SITE_SHARE: u32 = SITE_BUDGETS;

/// Turns and places held, per address and per IPv6 /48.
pub struct Shares {
    by_address: BoundedMap<IpAddr, u32>,
    by_site: BoundedMap<IpAddr, u32>,
}

/// One login's or registration's part of its client's share; given back
/// when dropped.
pub struct Share {
    shares: Arc<Shares>,
    address: IpAddr,
    site: Option<IpAddr>,
}

impl Shares {
    /// Counts for at most `capacity` clients (and as many /48s).
    pub fn new(capacity: usize) -> Arc<Shares> {
        Arc::new(Shares {
            by_address: BoundedMap::new(capacity),
            by_site: BoundedMap::new(capacity),
        })
    }

    /// One more place for `ip`'s client, or `None` when it (or its /48)
    /// holds `per_address` (`per_address` × [`SITE_SHARE`]) already.
    pub fn take(self: &Arc<Self>, ip: IpAddr, per_address: u32, now: Instant) -> Option<Share> {
        let address = client_key(ip);
        let site = site_key(ip);
        if !take_one(&self.by_address, address, per_address, now) {
            return None;
        }
        if let Some(site) = site {
            if !take_one(&self.by_site, site, per_address.saturating_mul(SITE_SHARE), now) {
                give_back(&self.by_address, &address);
                return None;
            }
        }
        Some(Share {
            shares: self.clone(),
            address,
            site,
        })
    }

    /// Clients (addresses and /48s) holding a place now.
    pub fn len(&self) -> usize {
        self.by_address.len() + self.by_site.len()
    }

    /// Whether no client holds a place.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn take_one(map: &BoundedMap<IpAddr, u32>, key: IpAddr, cap: u32, now: Instant) -> bool {
    map.with(
        key,
        now,
        || 0,
        |held| {
            let room = *held < cap;
            if room {
                *held += 1;
            }
            room
        },
    )
}

/// One place back; the entry goes once nothing is held (so no sweep is needed).
fn give_back(map: &BoundedMap<IpAddr, u32>, key: &IpAddr) {
    map.update_or_remove(key, |held| {
        *held = held.saturating_sub(1);
        *held == 0
    });
}

impl Drop for Share {
    fn drop(&mut self) {
        give_back(&self.shares.by_address, &self.address);
        if let Some(site) = &self.site {
            give_back(&self.shares.by_site, site);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_and_its_site_hold_their_share_and_get_it_back() {
        let shares = Shares::new(1000);
        let now = Instant::now();
        let v4: IpAddr = "203.0.113.7".parse().unwrap();
        let held: Vec<Share> = (0..3).filter_map(|_| shares.take(v4, 3, now)).collect();
        assert_eq!(held.len(), 3);
        assert!(shares.take(v4, 3, now).is_none(), "past the share");
        assert!(
            shares.take("203.0.113.8".parse().unwrap(), 3, now).is_some(),
            "another address"
        );
        drop(held);
        assert!(shares.take(v4, 3, now).is_some(), "given back");

        // Two /64s of one /48 hold their own shares, up to the /48's.
        let site = |n: u16| -> IpAddr { format!("2001:db8:aa:{n:x}::1").parse().unwrap() };
        let mut held = Vec::new();
        for n in 0..(SITE_SHARE as u16 * 2) {
            held.extend(shares.take(site(n), 1, now));
        }
        assert_eq!(held.len(), SITE_SHARE as usize);
        assert!(
            shares.take("2001:db8:bb::1".parse().unwrap(), 1, now).is_some(),
            "another /48"
        );
        drop(held);
        assert!(shares.take(site(99), 1, now).is_some());
        let _kept = shares.take(v4, 3, now);
        assert_eq!(shares.len(), 1, "entries holding nothing are gone");
    }
}
