//! The server's one OS-specific call: actors' threads run below every other thread.

/// Moves the calling thread to the lowest scheduling class (on Linux `SCHED_IDLE`, for this
/// thread alone; on other systems it does nothing). An actor's thread runs its guest's own
/// code; the forward passes it asks for run on the model's threads and the HTTP work on the
/// server's, both at normal priority, and those preempt an idle-class thread as soon as they
/// wake. So a guest that spins (until its time limit) takes little from the other actors'
/// steps, while on an otherwise idle machine it still runs at full speed. (A nice value of
/// +10 was measured too: the spinner still delayed a step's threads by about their
/// scheduling slice; docs/perf.md.)
pub(crate) fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: `gettid` takes nothing; `sched_setscheduler` reads the `sched_param` we pass
    // by reference for the duration of the call only. On Linux a thread id names that
    // thread alone.
    unsafe {
        let tid = libc::gettid();
        let param = libc::sched_param { sched_priority: 0 };
        if libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param) != 0 {
            tracing::debug!("cannot move an actor's thread to the idle class");
        }
    }
}
