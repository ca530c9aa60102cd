//! What a room's log says after the sale, for `ticketd report`: who
//! entered, who was admitted, skipped or let a pass lapse, how long fans
//! waited and how soon an admitted fan claimed.

use std::{collections::HashMap, io, path::Path};

use super::{
    draw::Seed,
    log::{self, Event},
};

/// A waiting room's figures after (or during) a sale.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueReport {
    /// `SHA-256(seed)`.
    pub commitment: String,
    /// The seed, once the order was drawn.
    pub seed: Option<String>,
    /// Places taken before the shuffle (the draw's entrants).
    pub drawn: u64,
    /// Places taken after it (queued in arrival order).
    pub late: u64,
    /// Fans admitted with a pass.
    pub admitted: u64,
    /// Places skipped because their fan had gone.
    pub abandoned: u64,
    /// Admitted fans who never claimed (their pass lapsed).
    pub lapsed: u64,
    /// Waits from joining (or the start, for those who joined before it) to
    /// admission, ms, ascending.
    pub waits_ms: Vec<i64>,
    /// From admission to the fan's first claim, ms, ascending.
    pub to_claim_ms: Vec<i64>,
}

impl QueueReport {
    /// Reads the room log of `activity` in `dir`; `first_claim` is each
    /// user's first claim in the activity (Unix ms), `start_ms` the sale's
    /// start. `Ok(None)` when the activity has no room log.
    pub fn read(
        dir: &Path,
        activity: &str,
        start_ms: i64,
        first_claim: &HashMap<u64, i64>,
    ) -> io::Result<Option<QueueReport>> {
        let Some((events, _)) = log::read(&dir.join(format!("{activity}.log")))? else {
            return Ok(None);
        };
        Ok(Some(QueueReport::of(None, &events, start_ms, first_claim)))
    }

    /// The figures of a room whose log is `events` (a file's start with the
    /// seed; a cluster's shared log has its seed beside it, as `seed`).
    pub fn of(seed: Option<&str>, events: &[Event], start_ms: i64, first_claim: &HashMap<u64, i64>) -> QueueReport {
        let mut report = QueueReport::default();
        if let Some(seed) = seed {
            report.commitment = Seed::from_hex(seed).map(|s| s.commitment()).unwrap_or_default();
            report.seed = Some(seed.to_owned());
        }
        let mut shuffled = false;
        let mut joined_at: HashMap<u64, i64> = HashMap::new();
        for event in events {
            match *event {
                Event::Seed { ref seed } => {
                    report.commitment = Seed::from_hex(seed).map(|s| s.commitment()).unwrap_or_default();
                    report.seed = Some(seed.clone());
                }
                Event::Join { u, t } => {
                    joined_at.insert(u, t);
                    if shuffled {
                        report.late += 1;
                    } else {
                        report.drawn += 1;
                    }
                }
                Event::Shuffle { .. } => shuffled = true,
                Event::Admit { u, t, .. } => {
                    report.admitted += 1;
                    let from = joined_at.get(&u).map_or(start_ms, |&j| j.max(start_ms));
                    report.waits_ms.push((t - from).max(0));
                    match first_claim.get(&u) {
                        Some(&c) if c >= t => report.to_claim_ms.push(c - t),
                        Some(_) => {}
                        None => report.lapsed += 1,
                    }
                }
                Event::Skip { .. } => report.abandoned += 1,
                Event::Close { .. }
                | Event::Pause { .. }
                | Event::Extend { .. }
                | Event::Resume { .. }
                | Event::Unknown => {}
            }
        }
        if !shuffled {
            report.seed = None;
        }
        report.waits_ms.sort_unstable();
        report.to_claim_ms.sort_unstable();
        report
    }
}

/// The `p`-th percentile (0-100) of ascending `values`, by nearest rank.
pub fn percentile(values: &[i64], p: f64) -> Option<i64> {
    if values.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    Some(values[rank.clamp(1, values.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<i64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
