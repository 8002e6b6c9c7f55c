//! [`GuestDeadline`]: a guest call's time limit counts the guest's own running time. Wasmtime
//! interrupts a guest when the engine's epoch passes the store's deadline; time the guest
//! spends waiting inside a host call (a forward pass, a model loading, later a batched step
//! queued behind other actors') moves that deadline out by as much.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// One actor's deadline, in epoch ticks of its runtime.
pub(crate) struct GuestDeadline {
    /// The runtime's tick count, advanced with the engine's epoch.
    ticks: Arc<AtomicU64>,
    /// The tick at which the running guest call is interrupted.
    deadline: u64,
    /// The tick at which the guest last got control back (its call began, or a host call
    /// returned).
    resumed: u64,
}

impl GuestDeadline {
    pub(crate) fn new(ticks: Arc<AtomicU64>) -> GuestDeadline {
        GuestDeadline {
            ticks,
            deadline: 0,
            resumed: 0,
        }
    }

    /// The tick now.
    pub(crate) fn now(&self) -> u64 {
        self.ticks.load(Ordering::Relaxed)
    }

    /// Ticks left before the deadline (0 once it has passed).
    pub(crate) fn left(&self) -> u64 {
        self.deadline.saturating_sub(self.now())
    }

    /// Starts a guest call that may run `budget` ticks.
    pub(crate) fn start(&mut self, budget: u64) {
        self.resumed = self.now();
        self.deadline = self.resumed + budget;
    }

    /// Ticks the guest has run since it last got control back: how long it has gone
    /// without calling the host.
    pub(crate) fn running_alone(&self) -> u64 {
        self.now().saturating_sub(self.resumed)
    }

    /// Moves the deadline out by the ticks since `started` (when a host call began). Returns
    /// the ticks left from now when it moved, for `Store::set_epoch_deadline`.
    pub(crate) fn extend_since(&mut self, started: u64) -> Option<u64> {
        let now = self.now();
        self.resumed = now;
        let spent = now.saturating_sub(started);
        if spent == 0 {
            return None;
        }
        self.deadline += spent;
        Some(self.deadline.saturating_sub(now).max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_time_moves_the_deadline_out() {
        let ticks = Arc::new(AtomicU64::new(100));
        let mut d = GuestDeadline::new(ticks.clone());
        d.start(10);
        assert_eq!(d.extend_since(100), None);
        ticks.store(104, Ordering::Relaxed); // 4 ticks of guest time
        let started = d.now();
        ticks.store(150, Ordering::Relaxed); // 46 ticks in the host
        assert_eq!(d.extend_since(started), Some(6));
    }
}
