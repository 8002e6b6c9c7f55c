//! KV-cache memory kept between sessions on the CPU.
//!
//! A new cache's pages are not in memory until first written: the kernel faults each in and
//! zeroes it then, and in a virtual machine that costs far more than the copy itself (a
//! 196 MB restore into fresh memory took 130 ms here, into memory already in place 14 ms).
//! So the memory of a dropped cache is kept for the next cache of its size (zeroed when
//! taken), and memory can be made ready ahead of a restore that is known to come (a move's
//! copy ahead: [`crate::Model::keep_session_memory`]). At most [`KEPT_CACHES`] are kept per
//! model, the oldest dropped first; kept memory counts against no session's budget.

use std::sync::Mutex;

/// The most caches' memory a model keeps.
pub const KEPT_CACHES: usize = 2;

/// A cache's buffers: `k` and `v` (f32) or `k16` and `v16` (f16 bits), as
/// [`super::cpu::KvCache`] holds them.
pub(crate) struct Buffers {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub k16: Vec<u16>,
    pub v16: Vec<u16>,
}

impl Buffers {
    /// Zeroed buffers of `wide` f32 values and `half` f16 values each (their pages not yet
    /// in memory).
    pub(crate) fn zeroed(wide: usize, half: usize) -> Buffers {
        Buffers {
            k: vec![0.0; wide],
            v: vec![0.0; wide],
            k16: vec![0; half],
            v16: vec![0; half],
        }
    }

    fn lens(&self) -> (usize, usize) {
        (self.k.len(), self.k16.len())
    }
}

struct Kept {
    buffers: Buffers,
    /// All zero (made ahead, not yet used).
    zero: bool,
}

/// The caches' memory a model keeps.
#[derive(Default)]
pub(crate) struct KeptCaches {
    kept: Mutex<Vec<Kept>>,
}

impl std::fmt::Debug for KeptCaches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeptCaches({})", self.count())
    }
}

impl KeptCaches {
    fn kept(&self) -> std::sync::MutexGuard<'_, Vec<Kept>> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Zeroed buffers of `wide` f32 values and `half` f16 values each, from memory kept if
    /// some has those sizes.
    pub(crate) fn take(&self, wide: usize, half: usize) -> Option<Buffers> {
        let mut kept = self.kept();
        let at = kept.iter().position(|k| k.buffers.lens() == (wide, half))?;
        let Kept { mut buffers, zero } = kept.remove(at);
        drop(kept);
        if !zero {
            buffers.k.fill(0.0);
            buffers.v.fill(0.0);
            buffers.k16.fill(0);
            buffers.v16.fill(0);
        }
        Some(buffers)
    }

    /// Keeps a dropped cache's buffers, dropping the oldest kept past [`KEPT_CACHES`].
    pub(crate) fn give(&self, buffers: Buffers) {
        if buffers.lens() == (0, 0) {
            return;
        }
        self.keep(Kept {
            buffers,
            zero: false,
        });
    }

    fn keep(&self, kept: Kept) {
        let mut all = self.kept();
        all.push(kept);
        if all.len() > KEPT_CACHES {
            all.remove(0);
        }
    }

    /// Makes zeroed buffers of `wide` f32 values and `half` f16 values each, their pages in
    /// memory, unless some of those sizes are kept already.
    pub(crate) fn make(&self, wide: usize, half: usize) {
        if self.kept().iter().any(|k| k.buffers.lens() == (wide, half)) {
            return;
        }
        let mut buffers = Buffers::zeroed(wide, half);
        // Keys on a thread of their own, values here: page faults proceed side by side (a
        // 196 MB cache's took 100 ms on one thread of this project's 2-core machine, 53 ms
        // on two).
        let Buffers { k, v, k16, v16 } = &mut buffers;
        std::thread::scope(|scope| {
            scope.spawn(|| {
                touch(k);
                touch(k16);
            });
            touch(v);
            touch(v16);
        });
        self.keep(Kept {
            buffers,
            zero: true,
        });
    }

    /// How many caches' memory is kept.
    pub(crate) fn count(&self) -> usize {
        self.kept().len()
    }
}

/// Writes a zero into every 4 KiB page of `values` (already zero), so that the kernel
/// brings each page in now rather than at the first real write.
fn touch<T: Default>(values: &mut [T]) {
    let step = (4096 / std::mem::size_of::<T>()).max(1);
    for i in (0..values.len()).step_by(step) {
        // SAFETY: `i` is in bounds; a volatile write keeps the compiler from dropping a
        // store of the value already there.
        unsafe { std::ptr::write_volatile(values.as_mut_ptr().add(i), T::default()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buffers(wide: usize, fill: f32) -> Buffers {
        Buffers {
            k: vec![fill; wide],
            v: vec![fill; wide],
            k16: Vec::new(),
            v16: Vec::new(),
        }
    }

    #[test]
    fn kept_memory_comes_back_zeroed_for_its_size_only() {
        let kept = KeptCaches::default();
        kept.give(buffers(8, 1.5));
        assert!(kept.take(9, 0).is_none());
        let again = kept.take(8, 0).expect("kept");
        assert!(again.k.iter().chain(&again.v).all(|&x| x == 0.0));
        assert!(kept.take(8, 0).is_none(), "taken once");
    }

    #[test]
    fn at_most_two_caches_are_kept_the_oldest_dropped() {
        let kept = KeptCaches::default();
        for wide in [1, 2, 3] {
            kept.give(buffers(wide, 1.0));
        }
        assert_eq!(kept.count(), KEPT_CACHES);
        assert!(kept.take(1, 0).is_none());
        assert!(kept.take(3, 0).is_some());
        // Empty buffers (a cache lent out) are not kept.
        kept.give(buffers(0, 0.0));
        assert_eq!(kept.count(), 1);
    }

    #[test]
    fn memory_made_ahead_is_zero_and_made_once_per_size() {
        let kept = KeptCaches::default();
        kept.make(0, 5000);
        kept.make(0, 5000);
        assert_eq!(kept.count(), 1);
        let made = kept.take(0, 5000).expect("made");
        assert!(made.k16.iter().chain(&made.v16).all(|&x| x == 0));
        assert_eq!((made.k.len(), made.v16.len()), (0, 5000));
    }
}
