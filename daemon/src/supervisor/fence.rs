//! The daemon's fence, as its starts see it: past the time its own fence
//! falls (its lease unrenewed for as long as `fence_after` allows), or
//! with a claim lost since a start was checked, no try is started. Read on
//! the runtime, on the spawner threads (which run while the runtime does
//! not: a daemon stopped, or its runtime stuck) and in a try's child before
//! its exec, where only atomics of the shared memory and the boot clock may
//! be read. The heartbeat sets it at each renewal (heartbeat.rs), after it
//! has told the tries of claims lost; the fencing watchdog (watchdog.rs)
//! kills what runs past it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The time on `CLOCK_BOOTTIME`: since the machine booted, its suspended
/// time included.
pub(crate) fn boot_clock() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into a local.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) };
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// When the daemon's own fence falls (nanoseconds on [`boot_clock`]; 0:
/// never): from then on it starts no try until a renewal moves it.
static FENCE: AtomicU64 = AtomicU64::new(0);

/// How many times claims were lost (a try told its row is no longer this
/// daemon's, or every try at the fence): a start whose child sees it
/// changed since its spawner thread read its try's stop is not made
/// ([`claims_lost_since`]).
static LOSSES: AtomicU64 = AtomicU64::new(0);

/// Sets when the daemon's fence falls ([`past_the_fence`]): `None`, never.
/// Released: a start that sees the new fence sees the claims lost before
/// it was moved.
pub(crate) fn set_fence(at: Option<Duration>) {
    FENCE.store(at.map_or(0, |at| nanos(at).max(1)), Ordering::Release);
}

/// Whether the daemon is past its fence: its lease unrenewed for as long
/// as its own fence allows. Read by the starts (on spawner threads too,
/// which run while the runtime does not, and in a try's child before its
/// exec: an atomic load and the boot clock, nothing more).
pub(crate) fn past_the_fence() -> bool {
    let at = FENCE.load(Ordering::Acquire);
    at != 0 && nanos(boot_clock()) >= at
}

/// Notes that claims were lost, after their tries' stops were set.
pub(crate) fn claims_lost() {
    LOSSES.fetch_add(1, Ordering::Release);
}

/// How many times claims were lost so far (see [`claims_lost_since`]).
pub(crate) fn claims_lost_count() -> u64 {
    LOSSES.load(Ordering::Acquire)
}

/// Whether claims were lost since `count` was read: then a try's start
/// checked before may be one whose row is no longer the daemon's.
pub(crate) fn claims_lost_since(count: u64) -> bool {
    LOSSES.load(Ordering::Acquire) != count
}

pub(super) fn nanos(at: Duration) -> u64 {
    u64::try_from(at.as_nanos()).unwrap_or(u64::MAX)
}
