//! The step scheduler (continuous batching): concurrent forward passes on one model,
//! gathered into batched steps.
//!
//! Many actors share one model. Each asks for its forward pass from its own thread with
//! [`StepBatcher::run`]; the requests wait in one queue, and whichever caller finds no step
//! running becomes the step's leader: it takes the waiting jobs in arrival order, as many as
//! the [`Budget`] allows, runs them as one batched step (one pass over the weights for all of
//! them) and hands each its result; then the next leader takes the next step. No thread is
//! the scheduler's own, and a request that arrives while a step runs joins the next one.
//!
//! A job puts one chunk of its tokens into a step ([`StepJob::next_tokens`]): a decode its
//! one token, a long prefill its next chunk, whose size depends on its own positions only,
//! never on what else runs. A job with chunks left goes back to the end of the queue, so the
//! others' decode steps slip in between a long prefill's chunks. Batching never changes a
//! result: the model's step computes every position's outputs with the same arithmetic
//! whatever else is in the batch (see the backends' step functions).

use std::collections::{HashMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The longest a step's leader waits for the last step's jobs to come back (see
/// [`StepBatcher::run`]).
const MAX_GATHER: Duration = Duration::from_millis(3);

/// What one step may take.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Tokens (positions) across all its jobs.
    pub tokens: usize,
    /// Jobs.
    pub jobs: usize,
}

/// One caller's request as the scheduler sees it.
pub trait StepJob: Send {
    /// Tokens this job puts into its next step (its next chunk); 0 once it is finished.
    fn next_tokens(&self) -> usize;
    /// Ends the job with an error (the step it was in failed).
    fn fail(&mut self, why: String);
}

/// Gathers concurrent jobs into batched steps; see the module docs.
pub struct StepBatcher<J> {
    state: Mutex<State<J>>,
    changed: Condvar,
    /// Signalled on each arrival, for a leader gathering its step.
    arrived: Condvar,
    budget: Budget,
}

struct State<J> {
    /// Jobs waiting for a step, in arrival order (a job with chunks left rejoins at the end).
    queue: VecDeque<(u64, J)>,
    /// Finished jobs, for their callers to collect.
    done: HashMap<u64, J>,
    /// Whether a leader is running a step.
    running: bool,
    next_id: u64,
    /// Steps run, and jobs in them (for [`StepBatcher::stats`]).
    steps: u64,
    stepped_jobs: u64,
    /// Jobs the next step's leader waits for: those of the last step and those that came
    /// while it ran (at most the budget's); and how long the last step ran.
    expect: usize,
    last_step: Duration,
}

/// Counters of a [`StepBatcher`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepStats {
    /// Steps run.
    pub steps: u64,
    /// Jobs' chunks run, over all steps.
    pub chunks: u64,
    /// Jobs waiting now, the ones in a running step included.
    pub waiting: u64,
}

impl<J: StepJob> StepBatcher<J> {
    /// A batcher whose steps take at most `budget` (at least one job each).
    pub fn new(budget: Budget) -> StepBatcher<J> {
        StepBatcher {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                done: HashMap::new(),
                running: false,
                next_id: 0,
                steps: 0,
                stepped_jobs: 0,
                expect: 0,
                last_step: Duration::ZERO,
            }),
            changed: Condvar::new(),
            arrived: Condvar::new(),
            budget,
        }
    }

    /// Runs `job` to its end in batched steps and returns it. `step` runs one step over the
    /// jobs given (each advancing by its next chunk); every caller of one batcher must pass
    /// the same step. A step that panics fails the jobs in it, not the process.
    ///
    /// Callers in a decode loop come back a moment after their step ends (to pick their next
    /// token); the first one back would lead a step of one. So a leader that finds fewer
    /// jobs waiting than there were callers at the end of the last step (its jobs, and those
    /// that came while it ran) waits for the others, at most a quarter of the last step's
    /// time and never over `MAX_GATHER` (3 ms). Counting only the last step's jobs would let
    /// callers that once missed a step stay a step of their own, alternating with the rest
    /// for good. (Which jobs share a step never changes their results, only the speed.)
    pub fn run(&self, job: J, step: impl Fn(&mut [J])) -> J {
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        state.queue.push_back((id, job));
        self.arrived.notify_one();
        loop {
            if let Some(job) = state.done.remove(&id) {
                return job;
            }
            if state.running {
                state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            // This caller leads the next step.
            state.running = true;
            let deadline = Instant::now() + (state.last_step / 4).min(MAX_GATHER);
            while state.queue.len() < state.expect {
                let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                    break;
                };
                state = self
                    .arrived
                    .wait_timeout(state, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            let (ids, mut jobs) = self.take(&mut state);
            drop(state);
            let started = Instant::now();
            if catch_unwind(AssertUnwindSafe(|| step(&mut jobs))).is_err() {
                for job in &mut jobs {
                    job.fail("the model's step failed (a panic); see the log".into());
                }
            }
            let took = started.elapsed();
            state = self.lock();
            state.expect = (ids.len() + state.queue.len()).min(self.budget.jobs);
            state.last_step = took;
            state.steps += 1;
            state.stepped_jobs += ids.len() as u64;
            for (id, job) in ids.into_iter().zip(jobs) {
                if job.next_tokens() == 0 {
                    state.done.insert(id, job);
                } else {
                    state.queue.push_back((id, job));
                }
            }
            state.running = false;
            self.changed.notify_all();
        }
    }

    /// Counters: steps run, chunks run, jobs waiting.
    pub fn stats(&self) -> StepStats {
        let state = self.lock();
        StepStats {
            steps: state.steps,
            chunks: state.stepped_jobs,
            waiting: (state.queue.len() + usize::from(state.running)) as u64,
        }
    }

    /// The next step's jobs: the waiting ones in arrival order while they fit the budget
    /// (the first always does). One that does not fit keeps its place for the next step.
    fn take(&self, state: &mut State<J>) -> (Vec<u64>, Vec<J>) {
        let (mut ids, mut jobs, mut tokens) = (Vec::new(), Vec::new(), 0);
        let mut kept = VecDeque::with_capacity(state.queue.len());
        for (id, job) in state.queue.drain(..) {
            let n = job.next_tokens();
            let fits = jobs.is_empty()
                || (jobs.len() < self.budget.jobs && tokens + n <= self.budget.tokens);
            if fits {
                tokens += n;
                ids.push(id);
                jobs.push(job);
            } else {
                kept.push_back((id, job));
            }
        }
        state.queue = kept;
        (ids, jobs)
    }

    fn lock(&self) -> MutexGuard<'_, State<J>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    /// Counts down `left` by up to `chunk` per step; records the steps it was in.
    struct Count {
        left: usize,
        chunk: usize,
        steps: Vec<u64>,
        failed: Option<String>,
    }

    impl StepJob for Count {
        fn next_tokens(&self) -> usize {
            if self.failed.is_some() {
                0
            } else {
                self.left.min(self.chunk)
            }
        }
        fn fail(&mut self, why: String) {
            self.failed = Some(why);
        }
    }

    fn job(left: usize, chunk: usize) -> Count {
        Count {
            left,
            chunk,
            steps: Vec::new(),
            failed: None,
        }
    }

    #[test]
    fn concurrent_jobs_share_steps_and_all_finish() {
        let batcher = Arc::new(StepBatcher::new(Budget {
            tokens: 64,
            jobs: 8,
        }));
        let step_no = Arc::new(Mutex::new(0u64));
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let (batcher, step_no) = (batcher.clone(), step_no.clone());
                std::thread::spawn(move || {
                    let done = batcher.run(job(1 + i % 5, 1), |jobs| {
                        let mut n = step_no.lock().unwrap();
                        *n += 1;
                        std::thread::sleep(Duration::from_millis(2));
                        for j in jobs {
                            j.left -= j.next_tokens();
                            j.steps.push(*n);
                        }
                    });
                    (i, done)
                })
            })
            .collect();
        let mut chunks = 0;
        for t in threads {
            let (i, done) = t.join().unwrap();
            assert_eq!(done.left, 0);
            assert_eq!(done.steps.len(), 1 + i % 5);
            // One chunk per step, in increasing steps.
            assert!(done.steps.windows(2).all(|w| w[0] < w[1]));
            chunks += done.steps.len() as u64;
        }
        let stats = batcher.stats();
        assert_eq!((stats.chunks, stats.waiting), (chunks, 0));
        assert!(stats.steps < chunks, "no step held two jobs: {stats:?}");
    }

    #[test]
    fn a_step_takes_jobs_in_arrival_order_within_its_budget() {
        let batcher = StepBatcher::new(Budget {
            tokens: 10,
            jobs: 3,
        });
        let mut state = batcher.lock();
        for (id, (left, chunk)) in [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)].iter().enumerate() {
            state.queue.push_back((id as u64, job(*left, *chunk)));
        }
        // 8 fits; 4 would make 12; 2 fits (10); the jobs cap is not reached, but 1 would
        // make 11.
        let (ids, _) = batcher.take(&mut state);
        assert_eq!(ids, [0, 2]);
        let rest: Vec<u64> = state.queue.iter().map(|(id, _)| *id).collect();
        assert_eq!(rest, [1, 3, 4]);
        let (ids, _) = batcher.take(&mut state);
        assert_eq!(ids, [1, 3, 4]);
    }

    #[test]
    fn a_job_bigger_than_the_budget_still_runs_alone() {
        let batcher = StepBatcher::new(Budget { tokens: 4, jobs: 1 });
        let done = batcher.run(job(100, 100), |jobs| {
            for j in jobs {
                j.left -= j.next_tokens();
            }
        });
        assert_eq!(done.left, 0);
    }

    #[test]
    fn a_panicking_step_fails_its_jobs_and_the_batcher_goes_on() {
        let batcher = StepBatcher::new(Budget { tokens: 4, jobs: 4 });
        let failed = batcher.run(job(3, 1), |_| panic!("a bug in a step"));
        assert!(failed.failed.unwrap().contains("panic"));
        let ok = batcher.run(job(3, 1), |jobs| {
            for j in jobs {
                j.left -= j.next_tokens();
            }
        });
        assert_eq!((ok.left, ok.failed), (0, None));
    }
}
