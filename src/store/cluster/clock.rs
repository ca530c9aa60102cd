//! Redis's clock, followed: a cluster node measures how far Redis's clock
//! is from its own at start and with every heartbeat, and `crate::clock`
//! adds that to every "now" of the node (see there for why).
//!
//! Redis's clock is the one the scripts already read (lease expiry, the
//! live nodes). A measurement is good to half its round trip; one whose
//! round trip was slow is not used. In a Redis Cluster every node reads
//! the master of `tk:ids`, so all of them follow the same clock.

use super::{error::ClusterError, scripts, shared::Shared};
use crate::clock;

/// A measurement whose round trip took longer than this is not used.
const MAX_ROUND_TRIP_MS: i64 = 50;
/// A node this far off Redis's clock says so in its log.
const WARN_MS: i64 = 1000;

/// One measurement: how far Redis's clock reads ahead of this machine's,
/// and the round trip it took.
async fn measure(shared: &Shared) -> Result<(i64, i64), ClusterError> {
    let mut redis = shared.redis.clone();
    let before = clock::system_ms();
    let (secs, micros): (i64, i64) = scripts::CLOCK.key(scripts::IDS_KEY).invoke_async(&mut redis).await?;
    let after = clock::system_ms();
    let redis_ms = secs.saturating_mul(1000).saturating_add(micros / 1000);
    Ok((redis_ms - before / 2 - after / 2, after - before))
}

/// Measures Redis's clock up to `tries` times, until a measurement with a
/// quick round trip, and makes the node follow it.
pub(super) async fn follow_redis_clock(shared: &Shared, tries: usize) -> Result<(), ClusterError> {
    for _ in 0..tries {
        let (offset, round_trip) = measure(shared).await?;
        if round_trip > MAX_ROUND_TRIP_MS {
            continue;
        }
        let was = clock::offset_ms();
        let now = clock::follow(offset);
        if now.abs() >= WARN_MS && was.abs() < WARN_MS {
            // `offset_ms`: how far Redis's clock reads ahead of this machine's.
            tracing::warn!(
                offset_ms = now,
                "This machine's clock is off Redis's by offset_ms; the node follows Redis's clock for sale times, lottery draws, tokens and claim times. Fix this machine's time sync."
            );
        } else if was.abs() >= WARN_MS && now.abs() < WARN_MS {
            tracing::info!(offset_ms = now, "This machine's clock is in step with Redis's again.");
        }
        return Ok(());
    }
    tracing::debug!(tries, "Redis's clock was not measured: every round trip was slow.");
    Ok(())
}
