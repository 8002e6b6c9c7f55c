//! The one place where guest-supplied offsets and lengths become host memory.
//!
//! Every host function turns its pointer arguments into [`GuestRange`]s here, against the
//! memory's size at the moment of the call, before any host or device code reads or writes.
//! A range is in bounds, its size product did not overflow, and its start is aligned for
//! its element type; typed views are only made from ranges checked here.

use std::fmt;

use tern_compute::ComputeError;
use tern_model::Candidate;

/// A negative ABI result, with the message `tern.last_error` returns.
#[derive(Debug, thiserror::Error)]
pub enum AbiError {
    #[error("{what}: bytes {offset}..{end} are outside guest memory of {memory} bytes")]
    OutOfBounds {
        what: &'static str,
        offset: u64,
        end: u64,
        memory: usize,
    },
    #[error("{what}: offset {offset} is not a multiple of {align}")]
    Misaligned {
        what: &'static str,
        offset: u32,
        align: usize,
    },
    #[error("{what}: size overflows ({detail})")]
    Overflow { what: &'static str, detail: String },
    #[error("{what} overlaps {other}; an output must not alias an input")]
    Overlap {
        what: &'static str,
        other: &'static str,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("device error: {0}")]
    Device(String),
    #[error("output limit of {limit} bytes per message reached")]
    OutputLimit { limit: usize },
    #[error("{0}")]
    NotFound(String),
    #[error(
        "{what} is exhausted: {needed} more bytes asked for, {in_use} in use, the limit is {limit}"
    )]
    Budget {
        what: &'static str,
        needed: u64,
        in_use: u64,
        limit: u64,
    },
    #[error("{what} of {bytes} bytes is over the host's limit of {limit} bytes")]
    TooLarge {
        what: &'static str,
        bytes: u64,
        limit: u64,
    },
    #[error("{what} ran past the host's limit of {limit_ms} ms")]
    TimeLimit { what: &'static str, limit_ms: u128 },
    /// Host work that went past one of its bounds (a chat template's fuel, say).
    #[error("{0}")]
    WorkLimit(String),
    #[error("the message was cancelled: whoever sent it no longer waits for the reply")]
    Cancelled,
}

impl From<ComputeError> for AbiError {
    fn from(e: ComputeError) -> AbiError {
        AbiError::Device(e.to_string())
    }
}

impl From<tern_model::ModelError> for AbiError {
    /// A failing device stays a device error; anything else the model refuses is a bad
    /// argument.
    fn from(e: tern_model::ModelError) -> AbiError {
        use tern_model::ModelError;
        use tern_text::TextError;
        match e {
            ModelError::Template(TextError::TemplateLimit { .. }) => {
                AbiError::WorkLimit(e.to_string())
            }
            e if e.is_device() => AbiError::Device(e.to_string()),
            e => AbiError::Invalid(e.to_string()),
        }
    }
}

impl From<crate::registry::OpenError> for AbiError {
    fn from(e: crate::registry::OpenError) -> AbiError {
        use crate::registry::OpenError;
        match e {
            OpenError::Unknown { .. } | OpenError::Locate { .. } => {
                AbiError::NotFound(e.to_string())
            }
            OpenError::Load { .. } if e.is_device() => AbiError::Device(e.to_string()),
            OpenError::Load { .. } => AbiError::Invalid(e.to_string()),
        }
    }
}

impl AbiError {
    /// The code a host function returns for this error; always negative. The codes are
    /// part of the ABI ([`crate::abi`] lists them).
    pub fn code(&self) -> i32 {
        match self {
            AbiError::OutOfBounds { .. } => -1,
            AbiError::Misaligned { .. } => -2,
            AbiError::Overflow { .. } => -3,
            AbiError::Overlap { .. } => -4,
            AbiError::Invalid(_) => -5,
            AbiError::Device(_) => -6,
            AbiError::OutputLimit { .. } => -7,
            AbiError::NotFound(_) => -8,
            AbiError::Budget { .. } => -9,
            AbiError::TooLarge { .. } => -10,
            AbiError::TimeLimit { .. } | AbiError::WorkLimit(_) => -11,
            AbiError::Cancelled => -12,
        }
    }
}

/// A checked byte range of guest memory: `offset + bytes <= memory size` and `offset` is a
/// multiple of the element alignment it was checked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestRange {
    offset: usize,
    bytes: usize,
}

impl GuestRange {
    /// First byte's offset into guest memory.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Length in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether the two ranges share a byte.
    pub fn overlaps(&self, other: &GuestRange) -> bool {
        self.bytes > 0
            && other.bytes > 0
            && self.offset < other.offset + other.bytes
            && other.offset < self.offset + self.bytes
    }
}

impl fmt::Display for GuestRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.offset, self.offset + self.bytes)
    }
}

/// Checks `count` elements of `elem_bytes` each, aligned to `align`, starting at guest
/// `offset`, against a memory of `memory` bytes.
pub fn check(
    what: &'static str,
    memory: usize,
    offset: u32,
    count: u64,
    elem_bytes: usize,
    align: usize,
) -> Result<GuestRange, AbiError> {
    let bytes = count
        .checked_mul(elem_bytes as u64)
        .ok_or_else(|| AbiError::Overflow {
            what,
            detail: format!("{count} elements of {elem_bytes} bytes"),
        })?;
    let end = u64::from(offset)
        .checked_add(bytes)
        .ok_or_else(|| AbiError::Overflow {
            what,
            detail: format!("offset {offset} + {bytes} bytes"),
        })?;
    if end > memory as u64 {
        return Err(AbiError::OutOfBounds {
            what,
            offset: offset.into(),
            end,
            memory,
        });
    }
    if align > 1 && !(offset as usize).is_multiple_of(align) {
        return Err(AbiError::Misaligned {
            what,
            offset,
            align,
        });
    }
    Ok(GuestRange {
        offset: offset as usize,
        bytes: bytes as usize,
    })
}

/// `rows * cols` as an element count, refusing overflow of the guest's 32-bit world.
pub fn product(what: &'static str, rows: u32, cols: u32) -> Result<u64, AbiError> {
    let n = u64::from(rows) * u64::from(cols);
    if n > u64::from(u32::MAX) {
        return Err(AbiError::Overflow {
            what,
            detail: format!("{rows} x {cols} elements"),
        });
    }
    Ok(n)
}

/// Two input views and one output view of guest memory, disjoint from the inputs.
pub type InInOut<'a> = (&'a [f32], &'a [f32], &'a mut [f32]);

/// Borrows checked ranges of one guest memory as typed slices.
pub struct GuestMemory<'m> {
    data: &'m mut [u8],
    /// Every range lent writable, `(offset, bytes)`: what an incremental snapshot stores.
    written: Vec<(usize, usize)>,
}

impl<'m> GuestMemory<'m> {
    /// Views `data` as a guest memory. A guest memory is a page-aligned Tern region, but
    /// nothing here relies on that: the typed views check the alignment of each element's
    /// address (the base's plus the offset), so any byte slice is safe to wrap.
    pub fn new(data: &'m mut [u8]) -> GuestMemory<'m> {
        GuestMemory {
            data,
            written: Vec::new(),
        }
    }

    /// Every range lent writable so far, `(offset, bytes)`.
    pub fn written(&self) -> &[(usize, usize)] {
        &self.written
    }

    /// Whether `r` lies inside this memory as a run of 4-byte values at 4-byte aligned
    /// addresses: what the `f32` and [`Candidate`] views need.
    fn holds_words(&self, r: &GuestRange) -> bool {
        r.offset + r.bytes <= self.data.len()
            && (self.data.as_ptr() as usize + r.offset).is_multiple_of(4)
            && r.bytes.is_multiple_of(4)
    }

    /// The memory's size in bytes now.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The bytes of a checked range.
    pub fn bytes(&self, range: GuestRange) -> &[u8] {
        &self.data[range.offset..range.offset + range.bytes]
    }

    /// The bytes of a checked range, writable.
    pub fn bytes_mut(&mut self, range: GuestRange) -> &mut [u8] {
        self.written.push((range.offset, range.bytes));
        &mut self.data[range.offset..range.offset + range.bytes]
    }

    /// A writable `f32` view of a range checked with 4-byte alignment against this memory.
    pub fn f32_mut(&mut self, r: GuestRange) -> Result<&mut [f32], AbiError> {
        if !self.holds_words(&r) {
            return Err(AbiError::Invalid(format!(
                "range {r} was not checked as f32s"
            )));
        }
        self.written.push((r.offset, r.bytes));
        // SAFETY: the range is inside `self.data` at a 4-byte aligned address (checked
        // above), every bit pattern is a valid f32, and the view borrows `self` mutably, so
        // it is the only reference to these bytes while it lives.
        Ok(unsafe {
            std::slice::from_raw_parts_mut(
                self.data.as_mut_ptr().add(r.offset).cast::<f32>(),
                r.bytes / 4,
            )
        })
    }

    /// Two read-only `f32` views and one writable one, for an operation whose output must not
    /// alias its inputs. All three ranges must come from [`check`] with 4-byte alignment
    /// against this memory.
    pub fn f32_in_in_out(
        &mut self,
        a: GuestRange,
        b: GuestRange,
        c: GuestRange,
    ) -> Result<InInOut<'_>, AbiError> {
        if c.overlaps(&a) {
            return Err(AbiError::Overlap {
                what: "c",
                other: "a",
            });
        }
        if c.overlaps(&b) {
            return Err(AbiError::Overlap {
                what: "c",
                other: "b",
            });
        }
        for r in [a, b, c] {
            if !self.holds_words(&r) {
                return Err(AbiError::Invalid(format!(
                    "range {r} was not checked as f32s"
                )));
            }
        }
        self.written.push((c.offset, c.bytes));
        let base = self.data.as_mut_ptr();
        // SAFETY: each range is inside `self.data` at a 4-byte aligned address (checked
        // above), every bit pattern is a valid f32, and the mutable view `c` is disjoint from
        // `a` and `b` (checked above); all three borrow `self` mutably, so nothing else can
        // touch the memory while they live.
        unsafe {
            Ok((
                std::slice::from_raw_parts(base.add(a.offset).cast::<f32>(), a.bytes / 4),
                std::slice::from_raw_parts(base.add(b.offset).cast::<f32>(), b.bytes / 4),
                std::slice::from_raw_parts_mut(base.add(c.offset).cast::<f32>(), c.bytes / 4),
            ))
        }
    }

    /// A writable `f32` view (optional) and a writable [`Candidate`] view that must not
    /// overlap: a forward pass's logits and its top candidates. Both ranges must come from
    /// [`check`] with 4-byte alignment against this memory.
    pub fn f32_and_candidates_mut(
        &mut self,
        logits: Option<GuestRange>,
        top: GuestRange,
    ) -> Result<(Option<&mut [f32]>, &mut [Candidate]), AbiError> {
        if let Some(l) = logits
            && top.overlaps(&l)
        {
            return Err(AbiError::Overlap {
                what: "top",
                other: "logits",
            });
        }
        for r in logits.iter().chain([&top]) {
            if !self.holds_words(r) {
                return Err(AbiError::Invalid(format!(
                    "range {r} was not checked as 4-byte values"
                )));
            }
        }
        if !top.bytes.is_multiple_of(size_of::<Candidate>()) {
            return Err(AbiError::Invalid(format!(
                "range {top} is not a whole number of candidates"
            )));
        }
        for r in logits.iter().chain([&top]) {
            self.written.push((r.offset, r.bytes));
        }
        let base = self.data.as_mut_ptr();
        // SAFETY: both ranges are inside `self.data` at 4-byte aligned addresses (checked
        // above); every bit pattern is a valid f32 and a valid `Candidate` (a `repr(C)` pair
        // of u32 and f32, 4-byte aligned); the two views are disjoint (checked above) and
        // borrow `self` mutably, so nothing else can touch the memory while they live.
        unsafe {
            let logits = logits.map(|l| {
                std::slice::from_raw_parts_mut(base.add(l.offset).cast::<f32>(), l.bytes / 4)
            });
            let top = std::slice::from_raw_parts_mut(
                base.add(top.offset).cast::<Candidate>(),
                top.bytes / size_of::<Candidate>(),
            );
            Ok((logits, top))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_bounds_overflow_and_alignment() {
        assert_eq!(check("x", 100, 96, 1, 4, 4).unwrap().bytes(), 4);
        assert!(matches!(
            check("x", 100, 97, 1, 4, 4),
            Err(AbiError::OutOfBounds { .. })
        ));
        assert!(matches!(
            check("x", 100, 98, 0, 4, 4),
            Err(AbiError::Misaligned { .. })
        ));
        assert!(matches!(
            check("x", 100, u32::MAX, 1, 1, 1),
            Err(AbiError::OutOfBounds { .. })
        ));
        assert!(matches!(
            check("x", 100, 0, u64::MAX, 4, 4),
            Err(AbiError::Overflow { .. })
        ));
        assert!(matches!(
            product("m*k", 65536, 65536),
            Err(AbiError::Overflow { .. })
        ));
        assert_eq!(check("x", 100, 100, 0, 4, 4).unwrap().bytes(), 0);
    }

    #[test]
    fn a_failing_device_keeps_its_kind_through_the_abi() {
        let device = tern_model::ModelError::Device {
            backend: "cuda",
            what: "launching the decode graph".into(),
            reason: "CUDA_ERROR_LAUNCH_FAILED".into(),
        };
        let in_file = tern_model::ModelError::InFile {
            path: "m.gguf".into(),
            inner: Box::new(device),
        };
        let e = AbiError::from(in_file);
        assert_eq!(e.code(), -6);
        assert!(e.to_string().contains("CUDA_ERROR_LAUNCH_FAILED"), "{e}");
        let bad = AbiError::from(tern_model::ModelError::Invalid(
            "session of 0 tokens".into(),
        ));
        assert_eq!(bad.code(), -5);
        let unknown = crate::registry::OpenError::Unknown {
            name: "x".into(),
            offered: "none".into(),
        };
        assert_eq!(AbiError::from(unknown).code(), -8);
    }

    #[test]
    fn refuses_an_output_that_aliases_an_input() {
        let mut buf = vec![0u8; 64];
        let mut mem = GuestMemory::new(&mut buf);
        let a = check("a", 64, 0, 4, 4, 4).unwrap();
        let c = check("c", 64, 12, 4, 4, 4).unwrap();
        assert!(matches!(
            mem.f32_in_in_out(a, a, c),
            Err(AbiError::Overlap { .. })
        ));
        let c = check("c", 64, 16, 4, 4, 4).unwrap();
        assert!(mem.f32_in_in_out(a, a, c).is_ok());
    }
}
