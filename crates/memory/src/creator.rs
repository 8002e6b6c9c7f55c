//! Wasmtime's hook for host-owned linear memory: every Wasm memory becomes a [`Region`].

use std::sync::{Arc, Mutex};

use wasmtime::{LinearMemory, MemoryCreator, MemoryType};

use crate::{HostMapper, Region};

/// Creates each linear memory of an engine as a [`Region`] whose committed pages every
/// mapper sees, and whose size can never exceed `max_bytes`.
pub struct RegionCreator {
    mappers: Vec<Arc<dyn HostMapper>>,
    max_bytes: usize,
    live: Arc<Mutex<Vec<usize>>>,
}

impl RegionCreator {
    /// A creator whose memories are shown to `mappers` and capped at `max_bytes`.
    pub fn new(mappers: Vec<Arc<dyn HostMapper>>, max_bytes: usize) -> RegionCreator {
        RegionCreator {
            mappers,
            max_bytes,
            live: Arc::default(),
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
}

/// A region in Wasmtime's clothes; it unlists itself from its creator when dropped.
struct RegionMemory {
    region: Region,
    live: Arc<Mutex<Vec<usize>>>,
}

impl Drop for RegionMemory {
    fn drop(&mut self) {
        let base = self.region.base() as usize;
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|&b| b != base);
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
        let reserve = reserved_size_in_bytes.unwrap_or(capacity);
        let mut region = Region::reserve(reserve, guard_size_in_bytes, self.mappers.clone())
            .map_err(|e| e.to_string())?;
        region.grow_to(minimum).map_err(|e| e.to_string())?;
        let region = region.with_capacity_limit(capacity);
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(region.base() as usize);
        Ok(Box::new(RegionMemory {
            region,
            live: self.live.clone(),
        }))
    }
}
