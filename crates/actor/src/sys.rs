//! The actor crate's one OS-specific call: a spinning guest's thread drops to the lowest
//! scheduling class.

/// Moves the calling thread to the lowest scheduling class (on Linux `SCHED_IDLE`, for this
/// thread alone; elsewhere it does nothing). Called on an actor's thread once its guest has
/// run [`crate::actor::DEMOTE_AFTER`] without calling the host: such a guest is spinning, and
/// from then on the forward passes of the other actors (on the model's threads) and the
/// server's HTTP work preempt it as soon as they wake, while on an otherwise idle machine it
/// still runs at full speed. A thread cannot climb back without privileges, so this lasts
/// for the thread's life (an actor's residency in `tern serve`). (A nice value of +10 was
/// measured too: the spinner still delayed a step's threads by about their scheduling
/// slice; docs/perf.md.)
pub(crate) fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: `gettid` takes nothing; `sched_setscheduler` reads the `sched_param` we pass
    // by reference for the duration of the call only. On Linux a thread id names that
    // thread alone.
    unsafe {
        let tid = libc::gettid();
        let param = libc::sched_param { sched_priority: 0 };
        // Failing leaves the thread where it was, which is safe.
        let _ = libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param);
    }
}
