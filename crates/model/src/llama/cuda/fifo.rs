//! [`FifoMutex`]: a mutex taken in arrival order.
//!
//! Every forward pass, session allocation and KV transfer on a CUDA model holds the model
//! (its stream). `std::sync::Mutex` promises no order: a thread that takes it in a loop can
//! take it again and again while others wait, and with many actors on one GPU some would
//! starve. Here each caller draws a ticket and takes the mutex when its number comes up.

use std::ops::{Deref, DerefMut};
use std::sync::{Condvar, Mutex, MutexGuard};

pub(crate) struct FifoMutex<T> {
    inner: Mutex<T>,
    /// The next ticket to draw, and the ticket whose turn it is.
    tickets: Mutex<(u64, u64)>,
    turn: Condvar,
}

/// The held mutex; dropping it hands it to the next ticket.
pub(crate) struct FifoGuard<'a, T> {
    guard: MutexGuard<'a, T>,
    owner: &'a FifoMutex<T>,
}

impl<T> FifoMutex<T> {
    pub(crate) fn new(value: T) -> FifoMutex<T> {
        FifoMutex {
            inner: Mutex::new(value),
            tickets: Mutex::new((0, 0)),
            turn: Condvar::new(),
        }
    }

    /// Waits for every caller that asked earlier, then holds the mutex.
    pub(crate) fn lock(&self) -> FifoGuard<'_, T> {
        let mut tickets = self.tickets.lock().unwrap_or_else(|e| e.into_inner());
        let mine = tickets.0;
        tickets.0 += 1;
        while tickets.1 != mine {
            tickets = self.turn.wait(tickets).unwrap_or_else(|e| e.into_inner());
        }
        drop(tickets);
        // Only the ticket holder gets here, so this never waits for long (at most for the
        // previous holder's guard to finish dropping).
        let guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        FifoGuard { guard, owner: self }
    }
}

impl<T> Deref for FifoGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> DerefMut for FifoGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

impl<T> Drop for FifoGuard<'_, T> {
    fn drop(&mut self) {
        let mut tickets = self.owner.tickets.lock().unwrap_or_else(|e| e.into_inner());
        tickets.1 += 1;
        drop(tickets);
        self.owner.turn.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn waiters_get_the_mutex_in_arrival_order() {
        let m = Arc::new(FifoMutex::new(Vec::new()));
        let first = m.lock();
        let waiters: Vec<_> = (0..6)
            .map(|i| {
                let theirs = m.clone();
                let t = std::thread::spawn(move || theirs.lock().push(i));
                // Each has drawn its ticket before the next asks.
                while m.tickets.lock().unwrap().0 < i + 2 {
                    std::thread::sleep(Duration::from_millis(1));
                }
                t
            })
            .collect();
        drop(first);
        for w in waiters {
            w.join().unwrap();
        }
        assert_eq!(*m.lock(), (0..6).collect::<Vec<_>>());
    }
}
