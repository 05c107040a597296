//! Who holds a claim: the daemon instance id (in `claimed_by`) and the claim
//! token (in `claim_token`) that fences every write about a try.

use crate::procinfo::Identity;

/// `host:pid:start ticks:boot id:random`, unique across daemons and
/// restarts. It names the daemon's process exactly, so that the reaper can
/// tell when the daemon holding a row whose task never started is gone
/// (see [`InstanceId::holder_identity`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceId(String);

impl InstanceId {
    /// A new id for this process, on `host`.
    pub fn new(host: &str) -> InstanceId {
        let pid = std::process::id();
        let ticks = crate::procinfo::start_ticks(i64::from(pid)).unwrap_or(0);
        let boot = crate::procinfo::boot_id();
        InstanceId(format!("{host}:{pid}:{ticks}:{boot}:{:016x}", random_u64()))
    }

    /// The token of this instance's claim number `round` (or `cli`).
    pub fn claim_token(&self, round: impl std::fmt::Display) -> ClaimToken {
        ClaimToken(format!("{}:{round}", self.0))
    }

    /// The process identity of the daemon instance named in `claimed_by`, if
    /// it carries one (instances before 0.1 wrote `host:pid:random`).
    pub(crate) fn holder_identity(claimed_by: &str) -> Option<Identity> {
        let mut fields = claimed_by.rsplitn(5, ':');
        let _random = fields.next()?;
        let boot = fields.next()?;
        let ticks: i64 = fields.next()?.parse().ok()?;
        let pid: i64 = fields.next()?.parse().ok()?;
        fields.next()?;
        (!boot.is_empty() && ticks > 0).then(|| Identity {
            pid,
            boot_id: Some(boot.to_string()),
            start_ticks: Some(ticks),
            started_at: None,
        })
    }
}

impl std::fmt::Display for InstanceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::ops::Deref for InstanceId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// The token one claim writes into the rows it takes: `instance:round`.
/// Only its holder writes about those rows' tries: every fenced write of
/// the store takes a `ClaimToken`, made by [`InstanceId::claim_token`] or
/// read back from a row, never a bare string.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClaimToken(String);

impl ClaimToken {
    /// The token a row holds, read back by the store (the reaper and the
    /// heartbeat fence their writes on the claim they saw).
    pub(crate) fn from_row(text: String) -> ClaimToken {
        ClaimToken(text)
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ClaimToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::ops::Deref for ClaimToken {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// 64 random bits from the kernel (the clock and pid should it fail).
pub fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `len` bytes into the buffer.
    let filled = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if filled != bytes.len() as isize {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return nanos ^ u64::from(std::process::id()).rotate_left(32);
    }
    u64::from_ne_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_id_names_its_daemon_process() {
        let instance = InstanceId::new("web:1");
        let identity = InstanceId::holder_identity(&instance).expect("an identity");
        assert_eq!(identity.pid, i64::from(std::process::id()));
        assert_eq!(identity.boot_id, Some(crate::procinfo::boot_id()));
        assert_eq!(
            crate::procinfo::probe(&identity),
            crate::procinfo::Probe::Alive
        );
        // Instances of older daemons carry no identity.
        assert!(InstanceId::holder_identity("web-1:1234:00000000deadbeef").is_none());
        assert!(InstanceId::holder_identity("").is_none());
        assert_eq!(&*instance.claim_token(7), format!("{instance}:7"));
    }
}
