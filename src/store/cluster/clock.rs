//! Redis's clock, followed: a cluster node measures how far Redis's clock
//! is from its own at start and with every heartbeat, and `crate::clock`
//! adds that to every "now" of the node (see there for why).
//!
//! Redis's clock is the one the scripts already read (lease expiry, the
//! live nodes). A measurement is good to half its round trip: at start the
//! node keeps the best of a few, and later ones move the offset only when
//! they contradict it (so nodes whose clocks NTP already keeps within a
//! millisecond still agree as closely). One whose round trip was slow is
//! not used. In a Redis Cluster every node reads the master of `tk:ids`,
//! so all of them follow the same clock.

use std::time::{Duration, Instant};

use super::{error::ClusterError, scripts, shared::Shared};
use crate::clock;

/// A measurement whose round trip took longer than this is not used.
const MAX_ROUND_TRIP: Duration = Duration::from_millis(20);
/// Measurements taken at start; the one with the quickest round trip counts.
const AT_START: usize = 5;
/// A node this far off Redis's clock says so in its log.
const WARN_MS: i64 = 1000;

/// One measurement: how far Redis's clock reads ahead of this machine's,
/// and the round trip it took (timed on the monotonic clock, so a step of
/// the wall clock meanwhile does not shorten it).
async fn measure(shared: &Shared) -> Result<(i64, Duration), ClusterError> {
    let mut redis = shared.redis.clone();
    let started = Instant::now();
    let before = clock::system_ms();
    let (secs, micros): (i64, i64) = scripts::CLOCK.key(scripts::IDS_KEY).invoke_async(&mut redis).await?;
    let round_trip = started.elapsed();
    let redis_ms = secs.saturating_mul(1000).saturating_add(micros / 1000);
    let midpoint = before.saturating_add((round_trip.as_millis() / 2) as i64);
    Ok((redis_ms.saturating_sub(midpoint), round_trip))
}

/// At start: measures Redis's clock a few times and follows the best
/// measurement. Fails only when Redis does not answer.
pub(super) async fn follow_at_start(shared: &Shared) -> Result<(), ClusterError> {
    let mut best: Option<(i64, Duration)> = None;
    for _ in 0..AT_START {
        let (offset, round_trip) = measure(shared).await?;
        if best.is_none_or(|(_, quickest)| quickest > round_trip) {
            best = Some((offset, round_trip));
        }
    }
    match best {
        Some((offset, round_trip)) if round_trip <= MAX_ROUND_TRIP => follow(offset, round_trip),
        _ => tracing::warn!(
            tries = AT_START,
            "Redis's clock could not be measured (every round trip took over 20 ms); this node runs on its own clock until a heartbeat measures it."
        ),
    }
    Ok(())
}

/// With a heartbeat: one measurement, followed if its round trip was
/// quick and it contradicts the offset in force. Best effort: a failure
/// leaves the offset as it is and the heartbeat goes on (renewing the
/// leases matters more).
pub(super) async fn follow_with_heartbeat(shared: &Shared) {
    match measure(shared).await {
        Ok((offset, round_trip)) if round_trip <= MAX_ROUND_TRIP => follow(offset, round_trip),
        Ok(_) => {}
        Err(error) => tracing::debug!(%error, "Could not read Redis's clock."),
    }
}

fn follow(offset: i64, round_trip: Duration) {
    let was = clock::offset_ms();
    let now = clock::follow(offset, (round_trip.as_millis() / 2) as u64);
    if now.abs() >= WARN_MS && was.abs() < WARN_MS {
        // `offset_ms`: how far Redis's clock reads ahead of this machine's.
        tracing::warn!(
            offset_ms = now,
            "This machine's clock is off Redis's by offset_ms; the node follows Redis's clock for sale times, lottery draws, tokens and claim times. Fix this machine's time sync."
        );
    } else if was.abs() >= WARN_MS && now.abs() < WARN_MS {
        tracing::info!(offset_ms = now, "This machine's clock is in step with Redis's again.");
    }
}
