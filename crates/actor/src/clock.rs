//! `VirtualClock`: the one way host code gives an actor the time.
//!
//! Nothing an actor sees may depend on when or where it runs, or a restored actor would not
//! continue as the original would have. So the host reads the wall clock at most once per
//! actor: the first time the actor needs the time (a chat template's `strftime_now`, say), the
//! reading is recorded, and every later reading returns it. The recorded reading is part of
//! the actor's snapshot, so an actor restored on another day, on another machine, sees the
//! same time as before: a conversation keeps the date it started on.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// A source of wall-clock time in milliseconds since the Unix epoch.
pub type WallClock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The system's clock.
pub fn system_clock() -> WallClock {
    Arc::new(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    })
}

/// An actor's clock: the wall clock's first reading, recorded.
#[derive(Clone)]
pub(crate) struct VirtualClock {
    source: WallClock,
    reading: Option<i64>,
}

impl VirtualClock {
    pub(crate) fn new(source: WallClock) -> VirtualClock {
        VirtualClock {
            source,
            reading: None,
        }
    }

    /// The actor's time: the recorded reading, or the wall clock now (then recorded).
    pub(crate) fn now_unix_ms(&mut self) -> i64 {
        *self.reading.get_or_insert_with(|| (self.source)())
    }

    /// The recorded reading, if the actor ever asked for the time.
    pub(crate) fn reading(&self) -> Option<i64> {
        self.reading
    }

    /// Puts back a recorded reading (from a snapshot).
    pub(crate) fn restore(&mut self, reading: Option<i64>) {
        self.reading = reading;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};

    #[test]
    fn reads_the_wall_clock_once_and_keeps_the_reading() {
        let wall = Arc::new(AtomicI64::new(1_000));
        let source = wall.clone();
        let mut clock = VirtualClock::new(Arc::new(move || source.load(Ordering::Relaxed)));
        assert_eq!(clock.reading(), None);
        assert_eq!(clock.now_unix_ms(), 1_000);
        wall.store(2_000, Ordering::Relaxed);
        assert_eq!(clock.now_unix_ms(), 1_000);
        clock.restore(None);
        assert_eq!(clock.now_unix_ms(), 2_000);
        clock.restore(Some(5));
        assert_eq!(clock.now_unix_ms(), 5);
    }
}
