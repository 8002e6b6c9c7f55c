//! Page-aligned host regions that back WebAssembly linear memory and are shared, without
//! copies, with compute devices.
//!
//! A [`Region`] reserves its whole capacity plus a guard area as `PROT_NONE` virtual memory,
//! commits pages in place as the memory grows, never moves, and unmaps on drop. Every
//! [`HostMapper`] attached to a region (a GPU that must see guest pages, say) is told about
//! each newly committed range before the guest can use it, and is told to forget every range
//! before the region is unmapped.
//!
//! [`RegionCreator`] installs regions as Wasmtime's linear memories
//! (`Config::with_host_memory`), so `Memory::data_ptr()` is the region's base.

#[cfg(feature = "wasmtime")]
mod creator;
mod region;

#[cfg(feature = "wasmtime")]
pub use creator::{RegionCreator, expecting};
pub use region::{HostMapper, HostRange, Region};

/// Errors from reserving, committing or mapping a region.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot reserve {bytes} bytes of address space: {source}")]
    Reserve {
        bytes: usize,
        source: std::io::Error,
    },
    #[error("cannot commit bytes {start}..{end} of the region: {source}")]
    Commit {
        start: usize,
        end: usize,
        source: std::io::Error,
    },
    #[error("cannot grow to {requested} bytes: the region's capacity is {capacity} bytes")]
    CapacityExceeded { requested: usize, capacity: usize },
    #[error("size {bytes} overflows the address space")]
    Overflow { bytes: usize },
    #[error("device `{device}` refused committed range {range}: {reason}")]
    Map {
        device: String,
        range: HostRange,
        reason: String,
    },
}

/// The host's page size in bytes.
pub fn host_page_size() -> usize {
    // SAFETY: sysconf has no preconditions; _SC_PAGESIZE is always defined on unix.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}
