//! The step scheduler (continuous batching): concurrent forward passes on one model,
//! gathered into batched steps.
//!
//! Many actors share one model. Each asks for its forward pass from its own thread with
//! [`StepBatcher::run`]; the requests wait in one queue, and whichever caller finds no step
//! running becomes the step's leader: it takes the waiting jobs in arrival order, as many as
//! the [`Budget`] allows, runs them as one batched step (one pass over the weights for all of
//! them) and hands each its result; then the next leader takes the next step. No thread is
//! the scheduler's own, and a request that arrives while a step runs joins the next one.
//! Each waiting caller sleeps on a place of its own, where the leader hands it its finished
//! job (or the lead of the next step), so that the callers of a step wake side by side rather
//! than one after another through one lock. A batcher made
//! [`waking_early`](StepBatcher::waking_early) wakes its waiting callers shortly before the
//! running step is due to end, from how long the last one took, and they poll for their
//! handoff from then on: a thread woken from sleep takes a while to run again (hundreds of
//! microseconds on some hosts), which callers that must come back for the next step would
//! otherwise add to every step. Meant for steps that leave the host's cores idle (a GPU's);
//! where other threads keep the cores busy, a poll would wait out their time slices, so a
//! yield that comes back late stops all polling for a while and the callers sleep until
//! handed their job.
//!
//! A job puts one chunk of its tokens into a step ([`StepJob::next_tokens`]): a decode its
//! one token, a long prefill its next chunk, whose size depends on its own positions only,
//! never on what else runs. A job with chunks left goes back to the end of the queue, so the
//! others' decode steps slip in between a long prefill's chunks. Batching never changes a
//! result: the model's step computes every position's outputs with the same arithmetic
//! whatever else is in the batch (see the backends' step functions).

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The longest a step's leader waits for the last step's jobs to come back (see
/// [`StepBatcher::run`]).
const MAX_GATHER: Duration = Duration::from_millis(3);

/// How long before a step's expected end a batcher that wakes early wakes its waiting
/// callers (at most a third of the last step's time), and how long past that they poll
/// before they sleep again.
const WAKE_EARLY: Duration = Duration::from_micros(400);
const POLL_FOR: Duration = Duration::from_millis(2);
/// A polling thread's yield that takes longer than SLOW_YIELD to come back means that other
/// threads hold the host's cores (a poller then waits out their time slices where a thread
/// woken from sleep would be run at once): polling stops for CROWDED_FOR, and the callers
/// sleep until handed their job, as without waking early.
const SLOW_YIELD: Duration = Duration::from_micros(200);
const CROWDED_FOR: Duration = Duration::from_millis(200);

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
    /// Signalled when enough jobs wait, for a leader gathering its step.
    arrived: Condvar,
    budget: Budget,
    /// When waiting callers start polling (see [`Wake`]), if this batcher wakes them early.
    wake: Option<Wake>,
    /// The queue's length as of its last change, for a leader polling without the lock.
    queued: AtomicUsize,
}

/// When the waiting callers of a batcher that wakes early should be awake: nanoseconds from
/// `base` (0: not now).
struct Wake {
    base: Instant,
    at: AtomicU64,
    /// Until when nobody polls (see SLOW_YIELD), as `at` counts time.
    crowded_until: AtomicU64,
}

impl Wake {
    fn new() -> Wake {
        Wake {
            base: Instant::now(),
            at: AtomicU64::new(0),
            crowded_until: AtomicU64::new(0),
        }
    }

    fn nanos(&self, at: Instant) -> u64 {
        (at - self.base).as_nanos().max(1) as u64
    }

    fn set(&self, at: Instant) {
        self.at.store(self.nanos(at), Ordering::Relaxed);
    }

    fn get(&self) -> Option<Instant> {
        match self.at.load(Ordering::Relaxed) {
            0 => None,
            nanos => Some(self.base + Duration::from_nanos(nanos)),
        }
    }

    /// Whether a caller may poll at `now`: no poll has found the cores crowded lately.
    fn may_poll(&self, now: Instant) -> bool {
        self.nanos(now) >= self.crowded_until.load(Ordering::Relaxed)
    }

    /// Yields the core once between two looks of a poll; false (and nobody polls for
    /// CROWDED_FOR) where the yield came back too late to go on polling.
    fn yield_once(&self) -> bool {
        let before = Instant::now();
        std::thread::yield_now();
        self.came_back(before, Instant::now())
    }

    /// Whether a yield from `before` came back at `now` in time to go on polling; if not,
    /// nobody polls for CROWDED_FOR from `now`.
    fn came_back(&self, before: Instant, now: Instant) -> bool {
        if now - before <= SLOW_YIELD {
            return true;
        }
        self.crowded_until
            .store(self.nanos(now + CROWDED_FOR), Ordering::Relaxed);
        false
    }
}

/// What a waiting caller is handed.
enum Handoff<J> {
    /// Its job, finished.
    Done(J),
    /// The lead of the next step (its job still waits in the queue).
    Lead,
}

/// Handoffs for waiting callers.
type Handoffs<J> = Vec<(Arc<Waiter<J>>, Handoff<J>)>;

/// A waiting caller's place: it sleeps here until a leader hands it something.
struct Waiter<J> {
    slot: Mutex<Slot<J>>,
    ready: Condvar,
    /// Whether the slot holds a handoff (read without its lock by a polling caller).
    filled: AtomicBool,
}

/// What a waiter's lock guards: its handoff, and whether it sleeps on `ready` (so that a
/// handoff to a caller that polls makes no system call).
struct Slot<J> {
    handoff: Option<Handoff<J>>,
    asleep: bool,
}

impl<J> Waiter<J> {
    fn new() -> Waiter<J> {
        Waiter {
            slot: Mutex::new(Slot {
                handoff: None,
                asleep: false,
            }),
            ready: Condvar::new(),
            filled: AtomicBool::new(false),
        }
    }

    /// Sleeps until handed something. With `wake`: until the time it gives, then polls
    /// (yielding its core between looks) until handed something, POLL_FOR has passed, a
    /// new step has set another time, or a yield found the cores crowded; without one set,
    /// or while they are crowded, looks again every POLL_FOR.
    fn wait(&self, wake: Option<&Wake>) -> Handoff<J> {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(handoff) = slot.handoff.take() {
                self.filled.store(false, Ordering::Relaxed);
                return handoff;
            }
            let now = Instant::now();
            let sleep = match wake.and_then(|w| w.get().map(|at| (at, w))) {
                None if wake.is_none() => None,
                Some((at, _)) if now < at => Some(at - now),
                Some((at, w)) if now < at + POLL_FOR && w.may_poll(now) => {
                    drop(slot);
                    while !self.filled.load(Ordering::Acquire)
                        && Instant::now() < at + POLL_FOR
                        && w.get() == Some(at)
                    {
                        if !w.yield_once() {
                            break;
                        }
                    }
                    slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
                    continue;
                }
                _ => Some(POLL_FOR),
            };
            slot.asleep = true;
            slot = match sleep {
                None => self.ready.wait(slot).unwrap_or_else(|e| e.into_inner()),
                Some(sleep) => {
                    self.ready
                        .wait_timeout(slot, sleep)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
            slot.asleep = false;
        }
    }

    fn give(&self, handoff: Handoff<J>) {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        slot.handoff = Some(handoff);
        self.filled.store(true, Ordering::Release);
        if slot.asleep {
            self.ready.notify_one();
        }
    }
}

/// Hands each waiter its handoff.
fn hand_out<J>(handoffs: Handoffs<J>) {
    for (waiter, handoff) in handoffs {
        waiter.give(handoff);
    }
}

struct State<J> {
    /// Jobs waiting for a step, in arrival order (a job with chunks left rejoins at the end),
    /// each with its caller's place.
    queue: VecDeque<(J, Arc<Waiter<J>>)>,
    /// Whether a caller leads: gathering or running a step, or handed the lead.
    running: bool,
    /// Steps run, and jobs in them (for [`StepBatcher::stats`]).
    steps: u64,
    stepped_jobs: u64,
    /// Jobs the next step's leader waits for: those of the last step and those that came
    /// while it ran (at most the budget's); and how long the last step ran.
    expect: usize,
    last_step: Duration,
    /// When the last step ended; time from a step's end to the next one's start, and the
    /// part of it leaders spent waiting for the expected jobs; gathers ended by the deadline.
    ended: Option<Instant>,
    between: Duration,
    gathering: Duration,
    short: u64,
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
    /// Microseconds from each step's end to the next step's start, summed; and the part of
    /// them that leaders spent waiting for the callers of the step before to come back.
    pub between_us: u64,
    pub gather_us: u64,
    /// Gathers that the deadline ended with fewer jobs than expected.
    pub short_gathers: u64,
}

impl<J: StepJob> StepBatcher<J> {
    /// A batcher whose steps take at most `budget` (at least one job each).
    pub fn new(budget: Budget) -> StepBatcher<J> {
        StepBatcher {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                running: false,
                steps: 0,
                stepped_jobs: 0,
                expect: 0,
                last_step: Duration::ZERO,
                ended: None,
                between: Duration::ZERO,
                gathering: Duration::ZERO,
                short: 0,
            }),
            arrived: Condvar::new(),
            budget,
            wake: None,
            queued: AtomicUsize::new(0),
        }
    }

    /// The same batcher, waking its waiting callers shortly before each step is due to end
    /// (see the module docs).
    pub fn waking_early(mut self) -> StepBatcher<J> {
        self.wake = Some(Wake::new());
        self
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
        let me = Arc::new(Waiter::new());
        let mut state = self.lock();
        state.queue.push_back((job, me.clone()));
        self.queued.store(state.queue.len(), Ordering::Release);
        if state.running {
            if state.queue.len() >= state.expect {
                self.arrived.notify_one();
            }
            drop(state);
            match me.wait(self.wake.as_ref()) {
                Handoff::Done(job) => return job,
                Handoff::Lead => state = self.lock(),
            }
        } else {
            state.running = true;
        }
        // This caller leads steps until its own job is done.
        loop {
            let gather = Instant::now();
            let deadline = gather + (state.last_step / 4).min(MAX_GATHER);
            while state.queue.len() < state.expect {
                let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                    state.short += 1;
                    break;
                };
                if let Some(wake) = &self.wake
                    && wake.may_poll(Instant::now())
                {
                    // Polls, as its callers do: the gather is short, and a leader woken from
                    // sleep would add its own way back to it.
                    let expect = state.expect;
                    drop(state);
                    while self.queued.load(Ordering::Acquire) < expect && Instant::now() < deadline
                    {
                        if !wake.yield_once() {
                            break;
                        }
                    }
                    state = self.lock();
                    continue;
                }
                state = self
                    .arrived
                    .wait_timeout(state, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            let (mut jobs, waiters) = self.take(&mut state);
            let started = Instant::now();
            state.gathering += started - gather;
            if let Some(ended) = state.ended {
                state.between += started - ended;
            }
            if let Some(wake) = &self.wake
                && !state.last_step.is_zero()
            {
                let early = WAKE_EARLY.min(state.last_step / 3);
                wake.set(started + state.last_step - early);
            }
            drop(state);
            if catch_unwind(AssertUnwindSafe(|| step(&mut jobs))).is_err() {
                for job in &mut jobs {
                    job.fail("the model's step failed (a panic); see the log".into());
                }
            }
            let took = started.elapsed();
            state = self.lock();
            state.ended = Some(Instant::now());
            state.expect = (jobs.len() + state.queue.len()).min(self.budget.jobs);
            state.last_step = took;
            state.steps += 1;
            state.stepped_jobs += jobs.len() as u64;
            let (mut mine, mut handoffs): (_, Handoffs<J>) = (None, Vec::with_capacity(jobs.len()));
            for (job, waiter) in jobs.into_iter().zip(waiters) {
                if job.next_tokens() > 0 {
                    state.queue.push_back((job, waiter));
                    self.queued.store(state.queue.len(), Ordering::Release);
                } else if Arc::ptr_eq(&waiter, &me) {
                    mine = Some(job);
                } else {
                    handoffs.push((waiter, Handoff::Done(job)));
                }
            }
            let Some(job) = mine else {
                drop(state);
                hand_out(handoffs);
                state = self.lock();
                continue;
            };
            // Done: the lead goes to the first waiting job's caller, if any.
            match state.queue.front() {
                Some((_, next)) => handoffs.push((next.clone(), Handoff::Lead)),
                None => state.running = false,
            }
            drop(state);
            hand_out(handoffs);
            return job;
        }
    }

    /// Counters: steps run, chunks run, jobs waiting, the time between steps.
    pub fn stats(&self) -> StepStats {
        let state = self.lock();
        StepStats {
            steps: state.steps,
            chunks: state.stepped_jobs,
            waiting: (state.queue.len() + usize::from(state.running)) as u64,
            between_us: state.between.as_micros() as u64,
            gather_us: state.gathering.as_micros() as u64,
            short_gathers: state.short,
        }
    }

    /// The next step's jobs: the waiting ones in arrival order while they fit the budget
    /// (the first always does). One that does not fit keeps its place for the next step.
    fn take(&self, state: &mut State<J>) -> (Vec<J>, Vec<Arc<Waiter<J>>>) {
        let (mut jobs, mut waiters, mut tokens) = (Vec::new(), Vec::new(), 0);
        let mut kept = VecDeque::with_capacity(state.queue.len());
        for (job, waiter) in state.queue.drain(..) {
            let n = job.next_tokens();
            let fits = jobs.is_empty()
                || (jobs.len() < self.budget.jobs && tokens + n <= self.budget.tokens);
            if fits {
                tokens += n;
                jobs.push(job);
                waiters.push(waiter);
            } else {
                kept.push_back((job, waiter));
            }
        }
        state.queue = kept;
        self.queued.store(state.queue.len(), Ordering::Release);
        (jobs, waiters)
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
        let budget = Budget {
            tokens: 64,
            jobs: 8,
        };
        concurrent_jobs(StepBatcher::new(budget));
        concurrent_jobs(StepBatcher::new(budget).waking_early());
    }

    fn concurrent_jobs(batcher: StepBatcher<Count>) {
        let batcher = Arc::new(batcher);
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
        // Each job's first `steps` entry names it here.
        for (id, (left, chunk)) in [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)].iter().enumerate() {
            let mut j = job(*left, *chunk);
            j.steps.push(id as u64);
            state.queue.push_back((j, Arc::new(Waiter::new())));
        }
        let names = |jobs: &[Count]| jobs.iter().map(|j| j.steps[0]).collect::<Vec<_>>();
        // 8 fits; 4 would make 12; 2 fits (10); the jobs cap is not reached, but 1 would
        // make 11.
        let (jobs, _) = batcher.take(&mut state);
        assert_eq!(names(&jobs), [0, 2]);
        let rest: Vec<u64> = state.queue.iter().map(|(j, _)| j.steps[0]).collect();
        assert_eq!(rest, [1, 3, 4]);
        let (jobs, _) = batcher.take(&mut state);
        assert_eq!(names(&jobs), [1, 3, 4]);
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

    /// How long 64 callers in a decode loop leave between steps of 3 ms (`cargo test -p
    /// tern-model --release --lib gap_between -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn gap_between_steps() {
        let budget = Budget {
            tokens: 64,
            jobs: 64,
        };
        gap_between(StepBatcher::new(budget));
        gap_between(StepBatcher::new(budget).waking_early());
    }

    /// The same with a thread that never yields on each of the host's cores (`cargo test -p
    /// tern-model --release --lib gap_between -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn gap_between_steps_with_the_cores_busy() {
        let budget = Budget {
            tokens: 64,
            jobs: 64,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let hogs: Vec<_> = (0..cores)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        gap_between(StepBatcher::new(budget));
        gap_between(StepBatcher::new(budget).waking_early());
        stop.store(true, Ordering::Relaxed);
        for h in hogs {
            h.join().unwrap();
        }
    }

    #[test]
    fn a_slow_yield_stops_polling_for_a_while() {
        let wake = Wake::new();
        let now = Instant::now();
        assert!(wake.may_poll(now));
        assert!(wake.came_back(now, now + SLOW_YIELD));
        assert!(wake.may_poll(now + SLOW_YIELD));
        let late = now + SLOW_YIELD + Duration::from_micros(1);
        assert!(!wake.came_back(now, late));
        assert!(!wake.may_poll(late));
        assert!(!wake.may_poll(late + CROWDED_FOR - Duration::from_millis(1)));
        assert!(wake.may_poll(late + CROWDED_FOR + Duration::from_millis(1)));
    }

    fn gap_between(batcher: StepBatcher<Count>) {
        let early = batcher.wake.is_some();
        let batcher = Arc::new(batcher);
        let rounds = 60;
        let stepping = Arc::new(Mutex::new(Duration::ZERO));
        let started = Instant::now();
        let threads: Vec<_> = (0..64)
            .map(|_| {
                let (batcher, stepping) = (batcher.clone(), stepping.clone());
                std::thread::spawn(move || {
                    for _ in 0..rounds {
                        batcher.run(job(1, 1), |jobs| {
                            let t = Instant::now();
                            std::thread::sleep(Duration::from_millis(3));
                            for j in jobs {
                                j.left -= j.next_tokens();
                            }
                            *stepping.lock().unwrap() += t.elapsed();
                        });
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let wall = started.elapsed();
        let stats = batcher.stats();
        let step = stepping.lock().unwrap().as_secs_f64() * 1e3 / stats.steps as f64;
        let each = wall.as_secs_f64() * 1e3 / stats.steps as f64;
        println!(
            "waking early {early}: {} steps, {:.1} jobs a step, {each:.3} ms a step, {step:.3} ms \
             in it: {:.3} ms between ({:.3} ms by the batcher's count, {:.3} of it gathering; {} \
             gathers short)",
            stats.steps,
            stats.chunks as f64 / stats.steps as f64,
            each - step,
            stats.between_us as f64 / 1e3 / stats.steps as f64,
            stats.gather_us as f64 / 1e3 / stats.steps as f64,
            stats.short_gathers
        );
    }
}
