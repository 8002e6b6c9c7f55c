//! [`Region`]: one reservation of address space, committed in place, with guard pages.

use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::{MemoryError, host_page_size};

/// A committed byte range of a region, as host addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostRange {
    /// First byte's address.
    pub addr: usize,
    /// Length in bytes; a multiple of the host page size.
    pub bytes: usize,
}

impl HostRange {
    /// One past the last byte.
    pub fn end(&self) -> usize {
        self.addr + self.bytes
    }

    /// Whether `[addr, addr + bytes)` lies inside this range.
    pub fn contains(&self, addr: usize, bytes: usize) -> bool {
        addr >= self.addr && addr.checked_add(bytes).is_some_and(|end| end <= self.end())
    }
}

impl fmt::Display for HostRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:#x}..{:#x} ({} bytes)",
            self.addr,
            self.end(),
            self.bytes
        )
    }
}

/// Something that must see a region's committed pages: a compute device that reads and
/// writes guest memory in place.
///
/// `map_range` is called once per newly committed range, before the guest can touch it;
/// ranges of one region never overlap. `unmap_range` is called for every mapped range before
/// the region is unmapped, in reverse order of mapping.
///
/// # Safety
///
/// The region unmaps its pages right after the last `unmap_range` returns, so an
/// implementation must guarantee:
/// - once `unmap_range(range)` returns, no device work reads or writes any byte of `range`
///   again (work already queued on it has finished or been cancelled);
/// - it reads or writes a mapped range only on behalf of a caller that holds the region's
///   memory borrowed for that access (a host call with the guest suspended), never
///   concurrently with the guest;
/// - `map_range` and `unmap_range` touch no memory outside `range` and do not change the
///   range's protection or contents.
pub unsafe trait HostMapper: Send + Sync {
    /// A short name for messages ("cpu", "cuda:0").
    fn mapper_name(&self) -> String;
    /// Makes `range` visible to the device. An error refuses the commit.
    fn map_range(&self, range: HostRange) -> Result<(), String>;
    /// Forgets `range`; after this returns the device never touches it again.
    fn unmap_range(&self, range: HostRange);
}

/// A page-aligned reservation of `capacity + guard` bytes whose first `committed` bytes are
/// readable and writable; everything after is `PROT_NONE`.
///
/// Invariants: `base` is host-page aligned and never moves; `committed <= mapped_to <=
/// capacity`; both are multiples of the host page size; every byte below `mapped_to` has been
/// accepted by every mapper (the ranges in `mapped`) and is faulted in; the bytes from
/// `committed` to `mapped_to` (left by [`Region::reset`]) are zero and `PROT_NONE`.
pub struct Region {
    base: NonNull<u8>,
    capacity: usize,
    reserved: usize,
    committed: usize,
    mapped_to: usize,
    mappers: Vec<Arc<dyn HostMapper>>,
    mapped: Vec<HostRange>,
}

// SAFETY: the region owns its mapping exclusively; the raw base pointer is just an address
// and every access through it goes through `&self`/`&mut self`.
unsafe impl Send for Region {}
// SAFETY: shared references only read the (immutable) base and sizes.
unsafe impl Sync for Region {}

impl Region {
    /// Reserves `capacity + guard` bytes (both rounded up to host pages), all inaccessible.
    pub fn reserve(
        capacity: usize,
        guard: usize,
        mappers: Vec<Arc<dyn HostMapper>>,
    ) -> Result<Region, MemoryError> {
        let page = host_page_size();
        let capacity = round_up(capacity, page)?;
        let guard = round_up(guard, page)?;
        let reserved = capacity
            .checked_add(guard)
            .ok_or(MemoryError::Overflow { bytes: capacity })?;
        let len = reserved.max(page);
        // SAFETY: an anonymous private PROT_NONE mapping at an address of the kernel's
        // choosing aliases nothing; the result is checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(MemoryError::Reserve {
                bytes: len,
                source: std::io::Error::last_os_error(),
            });
        }
        let base = NonNull::new(ptr.cast::<u8>()).expect("mmap never returns null on success");
        Ok(Region {
            base,
            capacity,
            reserved: len,
            committed: 0,
            mapped_to: 0,
            mappers,
            mapped: Vec::new(),
        })
    }

    /// Lowers the capacity (growth limit) to `limit` bytes, keeping the reservation, so
    /// the guard area beyond the capacity stays inaccessible. Never raises it.
    pub fn with_capacity_limit(mut self, limit: usize) -> Region {
        let page = host_page_size();
        let limit = (limit / page) * page;
        self.capacity = self.capacity.min(limit.max(self.committed));
        self
    }

    /// Reserves a region and commits its first `bytes`.
    pub fn with_committed(
        bytes: usize,
        capacity: usize,
        guard: usize,
        mappers: Vec<Arc<dyn HostMapper>>,
    ) -> Result<Region, MemoryError> {
        let mut region = Region::reserve(capacity, guard, mappers)?;
        region.grow_to(bytes)?;
        Ok(region)
    }

    /// The region's first byte. Never changes.
    pub fn base(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Bytes readable and writable now.
    pub fn committed(&self) -> usize {
        self.committed
    }

    /// Bytes the region can grow to without moving.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The committed ranges every mapper has accepted, in commit order.
    pub fn mapped_ranges(&self) -> &[HostRange] {
        &self.mapped
    }

    /// The committed bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the first `committed` bytes are mapped read/write and owned by `self`.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), self.committed) }
    }

    /// The committed bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr(), self.committed) }
    }

    /// Bytes from the base that every mapper has accepted, committed now or before a
    /// [`Region::reset`]; growing within them needs no mapper.
    pub fn mapped_to(&self) -> usize {
        self.mapped_to
    }

    /// Commits the region up to `bytes` (rounded up to host pages) in place, then hands what
    /// no mapper has seen yet to every mapper. On any failure the region is left as it was.
    pub fn grow_to(&mut self, bytes: usize) -> Result<(), MemoryError> {
        let page = host_page_size();
        let target = round_up(bytes, page)?;
        if target > self.capacity {
            return Err(MemoryError::CapacityExceeded {
                requested: bytes,
                capacity: self.capacity,
            });
        }
        if target <= self.committed {
            return Ok(());
        }
        let start = self.committed;
        self.protect(start, target, libc::PROT_READ | libc::PROT_WRITE)?;
        if target <= self.mapped_to {
            self.committed = target;
            return Ok(());
        }
        let range = HostRange {
            addr: self.base.as_ptr() as usize + self.mapped_to,
            bytes: target - self.mapped_to,
        };
        if !self.mappers.is_empty() {
            prefault(range);
        }
        for (i, mapper) in self.mappers.iter().enumerate() {
            if let Err(reason) = mapper.map_range(range) {
                for earlier in self.mappers[..i].iter().rev() {
                    earlier.unmap_range(range);
                }
                let device = mapper.mapper_name();
                // Back as it was: the mapped tail zero and inaccessible, the rest dropped.
                let _ = self.protect(start, self.mapped_to, libc::PROT_NONE);
                self.decommit(self.mapped_to, target);
                return Err(MemoryError::Map {
                    device,
                    range,
                    reason,
                });
            }
        }
        self.mapped.push(range);
        self.committed = target;
        self.mapped_to = target;
        Ok(())
    }

    /// Makes the region as a fresh one is, without giving its pages back: every committed
    /// byte zeroed (on up to 8 threads) and made inaccessible, `committed` 0. Its pages stay
    /// faulted in and accepted by every mapper, so growing it again within
    /// [`Region::mapped_to`] costs neither page faults nor a mapper's registration (a GPU's
    /// pinning of 64 MiB takes about 20 ms). Nothing of what the region held can be read
    /// afterwards.
    pub fn reset(&mut self) -> Result<(), MemoryError> {
        let range = HostRange {
            addr: self.base.as_ptr() as usize,
            bytes: self.committed,
        };
        on_parts(range, |at, bytes| {
            // SAFETY: `at..at + bytes` lies in the committed, writable part of this region,
            // which `&mut self` keeps from every other reader and writer.
            unsafe { std::ptr::write_bytes(at as *mut u8, 0, bytes) }
        });
        self.protect(0, self.committed, libc::PROT_NONE)?;
        self.committed = 0;
        Ok(())
    }

    /// Sets the protection of `start..end`, page-aligned offsets inside the capacity.
    fn protect(&self, start: usize, end: usize, prot: libc::c_int) -> Result<(), MemoryError> {
        if end <= start {
            return Ok(());
        }
        // SAFETY: `start..end` lies inside our reservation (end <= capacity <= reserved) and
        // is page aligned; changing its protection affects only this mapping.
        let rc = unsafe { libc::mprotect(self.base.as_ptr().add(start).cast(), end - start, prot) };
        if rc != 0 {
            return Err(MemoryError::Commit {
                start,
                end,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Returns `start..end` to `PROT_NONE` and drops its contents.
    fn decommit(&self, start: usize, end: usize) {
        // SAFETY: `start..end` is page aligned and inside our reservation; MAP_FIXED replaces
        // only our own pages with fresh inaccessible ones.
        unsafe {
            libc::mmap(
                self.base.as_ptr().add(start).cast(),
                end - start,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            );
        }
    }
}

/// Faults a newly committed range in, writable, on up to 8 threads. A device mapper pins
/// every page of the range it is given; with the pages already there it only pins them,
/// instead of faulting them in one by one itself.
fn prefault(range: HostRange) {
    on_parts(range, populate);
}

/// Runs `work(addr, bytes)` over `range` cut into page-aligned parts of at least 4 MiB, on up
/// to 8 threads side by side.
fn on_parts(range: HostRange, work: impl Fn(usize, usize) + Sync) {
    const PART: usize = 4 << 20;
    if range.bytes == 0 {
        return;
    }
    let page = host_page_size();
    let parts = (range.bytes / PART).clamp(1, 8);
    let per = range.bytes.div_ceil(parts).div_ceil(page) * page;
    if parts == 1 {
        work(range.addr, range.bytes);
        return;
    }
    let work = &work;
    std::thread::scope(|scope| {
        for at in (range.addr..range.end()).step_by(per) {
            let bytes = per.min(range.end() - at);
            scope.spawn(move || work(at, bytes));
        }
    });
}

/// Faults `bytes` of committed, zeroed memory from `addr` in, writable.
fn populate(addr: usize, bytes: usize) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: the range is committed read-write memory of a region (page aligned);
        // populating it only faults its pages in, leaving their contents as they are.
        let rc =
            unsafe { libc::madvise(addr as *mut libc::c_void, bytes, libc::MADV_POPULATE_WRITE) };
        if rc == 0 {
            return;
        }
    }
    // Kernels without MADV_POPULATE_WRITE (before Linux 5.14), and other systems: a write
    // per page.
    for at in (addr..addr + bytes).step_by(host_page_size()) {
        // SAFETY: the byte lies in a committed read-write range that is still zero and that
        // no one else reads or writes yet (the guest sees it only once `grow_to` returns);
        // writing zero leaves it as it is.
        unsafe { std::ptr::write_volatile(at as *mut u8, 0) };
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        for range in self.mapped.drain(..).rev() {
            for mapper in self.mappers.iter().rev() {
                mapper.unmap_range(range);
            }
        }
        // SAFETY: `base..base+reserved` is exactly the mapping made in `reserve`; every
        // mapper has forgotten it, and no slice borrowed from `self` outlives `self`.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.reserved);
        }
    }
}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Region")
            .field("base", &self.base)
            .field("committed", &self.committed)
            .field("capacity", &self.capacity)
            .field("reserved", &self.reserved)
            .finish()
    }
}

fn round_up(bytes: usize, page: usize) -> Result<usize, MemoryError> {
    bytes
        .checked_next_multiple_of(page)
        .ok_or(MemoryError::Overflow { bytes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder {
        events: Mutex<Vec<(bool, HostRange)>>,
        refuse_after: Option<usize>,
    }

    // SAFETY: the recorder only notes ranges; it never touches their memory.
    unsafe impl HostMapper for Recorder {
        fn mapper_name(&self) -> String {
            "recorder".into()
        }
        fn map_range(&self, range: HostRange) -> Result<(), String> {
            let mut events = self.events.lock().unwrap();
            if self.refuse_after.is_some_and(|n| events.len() >= n) {
                return Err("full".into());
            }
            events.push((true, range));
            Ok(())
        }
        fn unmap_range(&self, range: HostRange) {
            self.events.lock().unwrap().push((false, range));
        }
    }

    #[test]
    fn grows_in_place_and_tells_mappers_each_new_range() {
        let rec = Arc::new(Recorder::default());
        let mut region = Region::with_committed(65536, 1 << 20, 65536, vec![rec.clone()]).unwrap();
        let base = region.base();
        region.as_mut_slice()[65535] = 7;
        region.grow_to(3 * 65536).unwrap();
        assert_eq!(region.base(), base);
        assert_eq!(region.as_slice()[65535], 7);
        assert_eq!(region.as_slice()[3 * 65536 - 1], 0);
        let events = rec.events.lock().unwrap().clone();
        assert_eq!(
            events,
            vec![
                (
                    true,
                    HostRange {
                        addr: base as usize,
                        bytes: 65536
                    }
                ),
                (
                    true,
                    HostRange {
                        addr: base as usize + 65536,
                        bytes: 2 * 65536
                    }
                ),
            ]
        );
        drop(region);
        let events = rec.events.lock().unwrap().clone();
        assert_eq!(events.len(), 4);
        assert_eq!(
            events[2],
            (
                false,
                HostRange {
                    addr: base as usize + 65536,
                    bytes: 2 * 65536
                }
            )
        );
        assert_eq!(
            events[3],
            (
                false,
                HostRange {
                    addr: base as usize,
                    bytes: 65536
                }
            )
        );
    }

    #[test]
    fn a_reset_region_is_zero_and_inaccessible_but_stays_mapped() {
        let rec = Arc::new(Recorder::default());
        let mut region = Region::with_committed(3 * 65536, 1 << 20, 0, vec![rec.clone()]).unwrap();
        region.as_mut_slice().fill(0xAB);
        region.reset().unwrap();
        assert_eq!((region.committed(), region.mapped_to()), (0, 3 * 65536));
        region.grow_to(65536).unwrap();
        region.grow_to(5 * 65536).unwrap();
        assert!(
            region.as_slice().iter().all(|&b| b == 0),
            "a reset region kept bytes"
        );
        let events = rec.events.lock().unwrap().clone();
        let mapped: Vec<usize> = events.iter().map(|(_, r)| r.bytes).collect();
        assert_eq!(
            mapped,
            [3 * 65536, 2 * 65536],
            "only the new tail is mapped again"
        );
        assert!(events.iter().all(|(map, _)| *map));
    }

    #[test]
    fn refuses_growth_past_capacity() {
        let mut region = Region::with_committed(65536, 2 * 65536, 0, vec![]).unwrap();
        let err = region.grow_to(3 * 65536).unwrap_err();
        assert!(matches!(err, MemoryError::CapacityExceeded { .. }), "{err}");
        assert_eq!(region.committed(), 65536);
        assert!(region.grow_to(usize::MAX).is_err());
    }

    #[test]
    fn a_refused_commit_leaves_the_region_as_it_was() {
        let rec = Arc::new(Recorder {
            refuse_after: Some(1),
            ..Default::default()
        });
        let mut region = Region::with_committed(4096, 1 << 20, 0, vec![rec]).unwrap();
        let err = region.grow_to(8192).unwrap_err();
        assert!(err.to_string().contains("full"), "{err}");
        assert_eq!(region.committed(), 4096);
        assert_eq!(region.mapped_ranges().len(), 1);
    }
}
