//! The step scheduler's first form: turns on a model's forward passes, taken in arrival
//! order.
//!
//! Many actors share one model and, on the CPU, one pool of worker threads. Left to the OS
//! and the pool, concurrent forward passes interleave in no fixed order and some wait far
//! longer than others. A [`StepQueue`] lets steps in first come, first served, a few at a
//! time (twice as many as the pool has threads: one decode step does not keep several
//! threads busy, a few side by side do; measured in docs/perf.md): a caller waits for at most the steps that were asked for
//! before it. A long prefill takes one turn per chunk of positions, so the decode steps of
//! others slip in between its chunks. (The chunking never changes results: every
//! position's arithmetic is the same in any batch.) Gathering the waiting steps into one
//! batched pass is the next form.

use std::sync::{Condvar, Mutex};

/// First-come, first-served turns, `width` at a time (a ticket lock with several places).
pub struct StepQueue {
    /// The next ticket to hand out, and how many turns have ended.
    state: Mutex<(u64, u64)>,
    turn_over: Condvar,
    width: u64,
}

/// A turn: the holder runs its step; dropping it lets the next ticket in.
pub struct Turn<'a> {
    queue: &'a StepQueue,
}

impl StepQueue {
    /// Turns for up to `width` (at least 1) steps at once.
    pub fn new(width: usize) -> StepQueue {
        StepQueue {
            state: Mutex::default(),
            turn_over: Condvar::new(),
            width: width.max(1) as u64,
        }
    }

    /// Waits for this caller's turn: until fewer than `width` of the callers that asked
    /// before it are still running or waiting.
    pub fn turn(&self) -> Turn<'_> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let ticket = state.0;
        state.0 += 1;
        while ticket >= state.1 + self.width {
            state = self
                .turn_over
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
        Turn { queue: self }
    }

    /// Steps waiting for their turn, the one running included.
    pub fn depth(&self) -> u64 {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.0 - state.1
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut state = self.queue.state.lock().unwrap_or_else(|e| e.into_inner());
        state.1 += 1;
        drop(state);
        self.queue.turn_over.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn turns_go_in_arrival_order() {
        let queue = Arc::new(StepQueue::new(1));
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = queue.turn();
        let waiters: Vec<_> = (0..8)
            .map(|i| {
                let (q, order) = (queue.clone(), order.clone());
                let t = std::thread::spawn(move || {
                    let _turn = q.turn();
                    order.lock().unwrap().push(i);
                });
                // Each has taken its ticket before the next asks.
                while queue.depth() < i + 2 {
                    std::thread::sleep(Duration::from_millis(1));
                }
                t
            })
            .collect();
        drop(first);
        for w in waiters {
            w.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), (0..8).collect::<Vec<_>>());
        assert_eq!(queue.depth(), 0);
    }

    #[test]
    fn a_wider_queue_runs_that_many_at_once() {
        let queue = StepQueue::new(2);
        let (a, b) = (queue.turn(), queue.turn());
        assert_eq!(queue.depth(), 2);
        drop((a, b));
        assert_eq!(queue.depth(), 0);
    }
}
