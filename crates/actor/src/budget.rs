//! KV-cache memory budgets. A session's cache is counted at `session_open` at its full
//! capacity (every position of every layer), not as it fills: on the CPU a cache is committed
//! lazily, so counting what is filled would let a guest open many large sessions cheaply and
//! fill host memory later. Each actor has its own budget ([`crate::Limits::kv_bytes`]); the
//! runtime keeps the total of all its actors ([`KvLedger`]), with an optional cap
//! ([`crate::Limits::runtime_kv_bytes`]), for a server's admission control.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::guest_memory::AbiError;

/// The KV-cache bytes reserved by every session of one runtime.
#[derive(Debug)]
pub struct KvLedger {
    reserved: AtomicU64,
    cap: u64,
}

impl KvLedger {
    pub(crate) fn new(cap: u64) -> KvLedger {
        KvLedger {
            reserved: AtomicU64::new(0),
            cap,
        }
    }

    /// Bytes reserved now, by every open session of every actor.
    pub fn reserved(&self) -> u64 {
        self.reserved.load(Ordering::Acquire)
    }

    /// The most bytes all sessions together may reserve.
    pub fn cap(&self) -> u64 {
        self.cap
    }
}

/// One session's share of the ledger, given back when dropped.
#[derive(Debug)]
pub(crate) struct KvReservation {
    ledger: Arc<KvLedger>,
    bytes: u64,
}

impl KvReservation {
    /// Reserves `bytes` for a session of an actor that holds `actor_bytes` already, within the
    /// actor's `actor_cap` and the ledger's cap.
    pub(crate) fn take(
        ledger: &Arc<KvLedger>,
        bytes: u64,
        actor_bytes: u64,
        actor_cap: u64,
    ) -> Result<KvReservation, AbiError> {
        if actor_bytes.saturating_add(bytes) > actor_cap {
            return Err(AbiError::Budget {
                what: "this actor's KV-cache budget",
                needed: bytes,
                in_use: actor_bytes,
                limit: actor_cap,
            });
        }
        ledger
            .reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                now.checked_add(bytes).filter(|&total| total <= ledger.cap)
            })
            .map_err(|now| AbiError::Budget {
                what: "the host's KV-cache memory",
                needed: bytes,
                in_use: now,
                limit: ledger.cap,
            })?;
        Ok(KvReservation {
            ledger: ledger.clone(),
            bytes,
        })
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for KvReservation {
    fn drop(&mut self) {
        self.ledger.reserved.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_respect_both_caps_and_are_given_back() {
        let ledger = Arc::new(KvLedger::new(100));
        let a = KvReservation::take(&ledger, 60, 0, 80).unwrap();
        assert_eq!(ledger.reserved(), 60);
        let over_actor = KvReservation::take(&ledger, 30, 60, 80).unwrap_err();
        assert!(over_actor.to_string().contains("actor"), "{over_actor}");
        let over_host = KvReservation::take(&ledger, 50, 0, 80).unwrap_err();
        assert!(over_host.to_string().contains("host"), "{over_host}");
        assert_eq!(ledger.reserved(), 60);
        drop(a);
        assert_eq!(ledger.reserved(), 0);
        assert_eq!(KvReservation::take(&ledger, 80, 0, 80).unwrap().bytes(), 80);
    }
}
