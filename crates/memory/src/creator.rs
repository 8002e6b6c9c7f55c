//! Wasmtime's hook for host-owned linear memory: every Wasm memory becomes a [`Region`].

use std::cell::Cell;
use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex};

use wasmtime::{LinearMemory, MemoryCreator, MemoryType};

use crate::{HostMapper, Region};

/// Regions kept for reuse at most, and the bytes their devices may keep registered.
const KEPT_REGIONS: usize = 4;
const KEPT_BYTES: usize = 1 << 30;
/// How far past what a new memory is expected to use a kept region may reach for the memory
/// to take it: a quarter more, plus this.
const KEPT_SLACK: usize = 16 << 20;

thread_local! {
    /// The size the next memory made on this thread will grow to, when known.
    static EXPECTED: Cell<usize> = const { Cell::new(0) };
}

/// Runs `make`, which makes a linear memory on this thread (instantiates a module, say),
/// with the creator told that the memory will soon grow to `bytes` (a restore's snapshot
/// size): a kept region of about that size serves it, already mapped.
pub fn expecting<R>(bytes: usize, make: impl FnOnce() -> R) -> R {
    struct Restore(usize);
    impl Drop for Restore {
        fn drop(&mut self) {
            EXPECTED.set(self.0);
        }
    }
    let _restore = Restore(EXPECTED.replace(bytes));
    make()
}

/// Creates each linear memory of an engine as a [`Region`] whose committed pages every
/// mapper sees, and whose size can never exceed `max_bytes`.
///
/// A dropped memory's region is kept for the next memory of its shape (up to four regions
/// keeping 1 GiB mapped in all), reset: zeroed, shrunk to nothing,
/// its pages still faulted in and registered with every device. A restore that grows a fresh
/// memory to its snapshot's size then skips the page faults and the devices' registration,
/// which for a GPU is most of the cost of a large memory. A memory takes a kept region only
/// if the region reaches at most a quarter (plus 16 MiB) past the size the memory starts
/// with or is expected to grow to ([`expecting`]), so that small memories never hold large
/// regions pinned.
pub struct RegionCreator {
    mappers: Vec<Arc<dyn HostMapper>>,
    max_bytes: usize,
    live: Arc<Mutex<Vec<usize>>>,
    kept: Arc<Mutex<Vec<Kept>>>,
}

/// A reset region and the shape it was made for.
struct Kept {
    shape: Shape,
    region: Region,
}

/// What a memory asks of its region: the reservation, its guard and its growth limit.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Shape {
    reserve: usize,
    guard: usize,
    capacity: usize,
}

impl RegionCreator {
    /// A creator whose memories are shown to `mappers` and capped at `max_bytes`.
    pub fn new(mappers: Vec<Arc<dyn HostMapper>>, max_bytes: usize) -> RegionCreator {
        RegionCreator {
            mappers,
            max_bytes,
            live: Arc::default(),
            kept: Arc::default(),
        }
    }

    /// The cap on any one memory, in bytes.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Whether `ptr` is the base of a live region made by this creator.
    pub fn is_region_base(&self, ptr: *const u8) -> bool {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&(ptr as usize))
    }

    /// Regions kept for reuse now, and the bytes they keep mapped.
    pub fn kept(&self) -> (usize, usize) {
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        (kept.len(), mapped(&kept))
    }

    /// A kept region of `shape` for a memory that will use about `bytes`: of those mapping
    /// no more than that and the slack, the one mapping the most; or a new one.
    fn region(&self, shape: Shape, bytes: usize) -> Result<Region, String> {
        let reach = bytes.saturating_add(bytes / 4).saturating_add(KEPT_SLACK);
        let kept = {
            let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
            let best = (kept.iter().enumerate())
                .filter(|(_, k)| k.shape == shape && k.region.mapped_to() <= reach)
                .max_by_key(|(_, k)| k.region.mapped_to())
                .map(|(i, _)| i);
            best.map(|i| kept.swap_remove(i).region)
        };
        match kept {
            Some(region) => Ok(region),
            None => Region::reserve(shape.reserve, shape.guard, self.mappers.clone())
                .map(|region| region.with_capacity_limit(shape.capacity))
                .map_err(|e| e.to_string()),
        }
    }
}

/// The bytes the `kept` regions keep mapped.
fn mapped(kept: &[Kept]) -> usize {
    kept.iter().map(|k| k.region.mapped_to()).sum()
}

/// A region in Wasmtime's clothes; when dropped it unlists itself from its creator and is
/// reset and kept for reuse, or unmapped when the creator keeps enough.
struct RegionMemory {
    region: ManuallyDrop<Region>,
    shape: Shape,
    live: Arc<Mutex<Vec<usize>>>,
    kept: Arc<Mutex<Vec<Kept>>>,
}

impl Drop for RegionMemory {
    fn drop(&mut self) {
        let base = self.region.base() as usize;
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|&b| b != base);
        // SAFETY: `drop` runs once and `self.region` is not used after this.
        let mut region = unsafe { ManuallyDrop::take(&mut self.region) };
        let bytes = region.mapped_to();
        let room = |kept: &[Kept]| kept.len() < KEPT_REGIONS && mapped(kept) + bytes <= KEPT_BYTES;
        if !room(&self.kept.lock().unwrap_or_else(|e| e.into_inner())) || region.reset().is_err() {
            return;
        }
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        if room(&kept) {
            kept.push(Kept {
                shape: self.shape,
                region,
            });
        }
    }
}

// SAFETY: the region is page aligned, zero-filled when committed, never moves, and is
// followed by `guard` bytes of PROT_NONE pages as Wasmtime asked in `new_memory`;
// `byte_capacity` is the reservation's usable size and growth never exceeds it.
unsafe impl LinearMemory for RegionMemory {
    fn byte_size(&self) -> usize {
        self.region.committed()
    }

    fn byte_capacity(&self) -> usize {
        self.region.capacity()
    }

    fn grow_to(&mut self, new_size: usize) -> wasmtime::Result<()> {
        self.region.grow_to(new_size).map_err(wasmtime::Error::new)
    }

    fn as_ptr(&self) -> *mut u8 {
        self.region.base()
    }
}

// SAFETY: every memory returned is a fresh, exclusively owned region that satisfies the
// `LinearMemory` contract above; the reservation covers `reserved_size_in_bytes` (when given)
// plus `guard_size_in_bytes`, so code compiled without bounds checks faults on guard pages.
unsafe impl MemoryCreator for RegionCreator {
    fn new_memory(
        &self,
        _ty: MemoryType,
        minimum: usize,
        maximum: Option<usize>,
        reserved_size_in_bytes: Option<usize>,
        guard_size_in_bytes: usize,
    ) -> Result<Box<dyn LinearMemory>, String> {
        let limit = maximum.unwrap_or(usize::MAX).min(self.max_bytes);
        if minimum > limit {
            return Err(format!(
                "the module asks for {minimum} bytes of memory; the cap is {limit} bytes"
            ));
        }
        // Growth must never move the base, so the capacity is fixed now: the whole
        // reservation Wasmtime expects (its code relies on it) but never past the cap.
        let capacity = reserved_size_in_bytes.map_or(limit, |r| r.min(limit));
        let shape = Shape {
            reserve: reserved_size_in_bytes.unwrap_or(capacity),
            guard: guard_size_in_bytes,
            capacity,
        };
        let mut region = self.region(shape, minimum.max(EXPECTED.get()))?;
        region.grow_to(minimum).map_err(|e| e.to_string())?;
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(region.base() as usize);
        Ok(Box::new(RegionMemory {
            region: ManuallyDrop::new(region),
            shape,
            live: self.live.clone(),
            kept: self.kept.clone(),
        }))
    }
}
