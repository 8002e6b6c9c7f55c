//! Dirty-page tracking: the code the load-time rewrite ([`crate::instrument`]) adds so that the
//! guest itself records which 64 KiB pages of its linear memory it may have written, and the
//! host's reading of that record.
//!
//! The record is a second linear memory, the *map*, of exactly [`MAP_PAGES`] Wasm pages,
//! exported as [`DIRTY_EXPORT`] (or the name [`DirtyMap::export`] gives when the guest already
//! uses that one). Byte `p` of the map is 1 when guest code may have written a byte of page
//! `p` of memory 0 since the host last zeroed the map; the host reads it with
//! [`marked_pages`] and clears it by zeroing it.
//!
//! How the guest marks:
//! - Before every store to memory 0 (plain, SIMD, lane and atomic stores, atomic
//!   read-modify-writes and compare-exchanges) it stores 1 at the page of the access's first
//!   byte and at the page of its last byte, computed in 64 bits from the address, the static
//!   offset and the access size.
//! - Before `memory.fill`, `memory.copy` into memory 0, `memory.init` and `memory.discard` it
//!   calls one added helper function that marks every page of `[d, d + n)` when `n > 0`.
//!
//! Atomic instructions and `memory.discard` do not validate on this project's engine (built
//! without the threads proposal; memory control is not implemented); they are marked all the
//! same, so that enabling them cannot open a gap.
//!
//! Guarantees:
//! - No guest write to memory 0 goes unmarked. Marking happens before the write, so a write
//!   that then traps may leave its pages marked: over-marking, never under-marking.
//! - Marking never traps: every page index it computes is below 2^17, the map's size in bytes
//!   (a 32-bit address plus an offset clamped to 2^32 stays below 2^33). An index of 2^16 or
//!   more comes only from an access that traps, so the map's bytes past the memory's size are
//!   meaningless and [`marked_pages`] ignores them.
//! - Nothing else changes: the operands are saved to fresh locals, appended to the function's
//!   declarations, and pushed back unchanged; the instruction itself is copied byte for byte.
//!
//! Not covered, by design: writes the host makes into guest memory (ABI calls that fill guest
//! buffers, device work on the region), which the host must mark itself; active data
//! segments, which instantiation writes ([`crate::instrument::Instrumented::initialized_pages`]);
//! pages that `memory.grow` adds, which are zero; and writes by another instance to a memory
//! this module imports or exports.

use wasm_encoder::{BlockType, Encode, Function, InstructionSink, MemArg, MemoryType, ValType};
use wasmparser::{FunctionBody, Operator};

use crate::ActorError;

/// The export name of the dirty-page map, unless the guest already uses it.
pub const DIRTY_EXPORT: &str = "__tern_dirty";

/// The map's size in Wasm pages: one byte for each page index a 32-bit access can compute.
pub const MAP_PAGES: u64 = 2;

/// Where a tracked module's dirty-page map is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyMap {
    /// The name the map memory is exported under: [`DIRTY_EXPORT`], with `_` appended until
    /// it differs from every export of the guest's.
    pub export: String,
}

/// The pages the map `map` marks, in increasing order, among the first `memory_pages` (the
/// tracked memory's current size): bytes past it are left by accesses that trapped.
pub fn marked_pages(map: &[u8], memory_pages: u64) -> Vec<u64> {
    let memory_pages = usize::try_from(memory_pages).unwrap_or(usize::MAX);
    let map = &map[..map.len().min(memory_pages)];
    (0u64..)
        .zip(map)
        .filter(|&(_, b)| *b != 0)
        .map(|(p, _)| p)
        .collect()
}

fn invalid(e: impl std::fmt::Display) -> ActorError {
    ActorError::Module(format!("{e}"))
}

/// What the rewrite adds to a module whose memory it tracks, by index.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    /// The map's memory index: the tracked memory is 0, the map the one after.
    pub map: u32,
    /// The function index of the helper that marks a range, after every existing function.
    pub helper: u32,
    /// The type index of the helper's type `[i32 i32] -> []`, after every existing type.
    pub helper_type: u32,
    /// The number of parameters of each defined function, in order: where its locals start.
    pub params: Vec<u32>,
}

impl Plan {
    /// The map's memory type, encoded: exactly [`MAP_PAGES`] pages, 32-bit, not shared.
    pub fn map_type(&self) -> Vec<u8> {
        let mut out = Vec::new();
        MemoryType {
            minimum: MAP_PAGES,
            maximum: Some(MAP_PAGES),
            memory64: false,
            shared: false,
            page_size_log2: None,
        }
        .encode(&mut out);
        out
    }

    /// The helper's type `(func (param i32 i32))`, encoded as one type-section entry.
    pub fn helper_type_entry(&self) -> Vec<u8> {
        const FUNC_FORM: u8 = 0x60;
        let mut out = vec![FUNC_FORM];
        [ValType::I32, ValType::I32].as_slice().encode(&mut out);
        <[ValType]>::encode(&[], &mut out);
        out
    }

    fn map_arg(&self) -> MemArg {
        MemArg {
            offset: 0,
            align: 0,
            memory_index: self.map,
        }
    }

    /// The helper's body: `(func (param $d i32) (param $n i32))` that marks every page of
    /// `[d, d + n)` when `n > 0`.
    pub fn helper_body(&self) -> Vec<u8> {
        let (d, n, page, last) = (0, 1, 2, 3);
        let mut f = Function::new([(2, ValType::I32)]);
        f.instructions()
            .local_get(n)
            .i32_eqz()
            .br_if(0)
            // page = d >> 16
            .local_get(d)
            .i32_const(16)
            .i32_shr_u()
            .local_set(page)
            // last = (u64(d) + u64(n) - 1) >> 16, below 2^17
            .local_get(d)
            .i64_extend_i32_u()
            .local_get(n)
            .i64_extend_i32_u()
            .i64_add()
            .i64_const(1)
            .i64_sub()
            .i64_const(16)
            .i64_shr_u()
            .i32_wrap_i64()
            .local_set(last)
            .loop_(BlockType::Empty)
            .local_get(page)
            .i32_const(1)
            .i32_store8(self.map_arg())
            .local_get(page)
            .i32_const(1)
            .i32_add()
            .local_tee(page)
            .local_get(last)
            .i32_le_u()
            .br_if(0)
            .end()
            .end();
        f.into_raw_body()
    }

    /// Rewrites the body of defined function `index` (`body`, read from `binary`) so that it
    /// marks every page it writes; returns the new body, without its size prefix.
    pub fn mark_writes(
        &self,
        binary: &[u8],
        index: usize,
        body: &FunctionBody<'_>,
    ) -> Result<Vec<u8>, ActorError> {
        let params = self
            .params
            .get(index)
            .ok_or_else(|| invalid("the code section has more bodies than the function section"))?;
        let mut locals = body.get_locals_reader().map_err(invalid)?;
        let groups = locals.get_count();
        let groups_start = {
            let mut reader = body.get_binary_reader();
            reader.read_var_u32().map_err(invalid)?;
            reader.original_position()
        };
        let mut declared = u64::from(*params);
        for _ in 0..groups {
            declared += u64::from(locals.read().map_err(invalid)?.0);
        }
        let first = u32::try_from(declared).map_err(|_| invalid("too many locals"))?;
        let mut scratch = Scratch {
            first,
            types: Vec::new(),
        };
        let mut ops = body.get_operators_reader().map_err(invalid)?;
        let code_start = ops.original_position();
        let mut code = Vec::new();
        let mut copied = code_start;
        while !ops.eof() {
            let at = ops.original_position();
            let Some(write) = write_of(&ops.read().map_err(invalid)?) else {
                continue;
            };
            code.extend_from_slice(&binary[copied..at]);
            copied = at;
            self.mark(&mut code, &mut scratch, &write)?;
        }
        code.extend_from_slice(&binary[copied..body.range().end]);

        let mut out = Vec::new();
        (u64::from(groups) + scratch.types.len() as u64).encode(&mut out);
        out.extend_from_slice(&binary[groups_start..code_start]);
        for ty in &scratch.types {
            1u32.encode(&mut out);
            ty.encode(&mut out);
        }
        out.extend(code);
        Ok(out)
    }

    /// Emits code that takes `write`'s operands off the stack, marks the pages it writes and
    /// puts the operands back, for the write instruction that follows.
    fn mark(
        &self,
        code: &mut Vec<u8>,
        scratch: &mut Scratch,
        write: &Write,
    ) -> Result<(), ActorError> {
        let operands = write.operands();
        let mut locals = Vec::with_capacity(operands.len());
        for (i, ty) in operands.iter().enumerate() {
            let nth = operands[..i].iter().filter(|t| *t == ty).count();
            locals.push(scratch.local(*ty, nth)?);
        }
        let mut sink = InstructionSink::new(code);
        for &local in locals.iter().rev() {
            sink.local_set(local);
        }
        let addr = locals[0];
        match *write {
            Write::Access { offset, bytes, .. } => {
                self.mark_byte(&mut sink, addr, offset);
                if bytes > 1 {
                    self.mark_byte(&mut sink, addr, offset.saturating_add(bytes - 1));
                }
            }
            Write::Range { .. } => {
                let n = locals[locals.len() - 1];
                sink.local_get(addr).local_get(n).call(self.helper);
            }
        }
        for &local in &locals {
            sink.local_get(local);
        }
        Ok(())
    }

    /// Marks the page of byte `addr + plus`, with `plus` clamped to 2^32 so that the page
    /// index stays below 2^17: a larger `plus` faults the access anyway.
    fn mark_byte(&self, sink: &mut InstructionSink<'_>, addr: u32, plus: u64) {
        let plus = plus.min(1 << 32);
        sink.local_get(addr);
        if plus == 0 {
            sink.i32_const(16).i32_shr_u();
        } else {
            sink.i64_extend_i32_u()
                .i64_const(plus as i64)
                .i64_add()
                .i64_const(16)
                .i64_shr_u()
                .i32_wrap_i64();
        }
        sink.i32_const(1).i32_store8(self.map_arg());
    }
}

/// The locals a rewritten function adds after its own, one per operand slot in use.
struct Scratch {
    /// The index of the first added local.
    first: u32,
    types: Vec<ValType>,
}

impl Scratch {
    /// The index of the `nth` added local of type `ty` (counting from 0), added on first
    /// use; the ones before it of that type must exist already.
    fn local(&mut self, ty: ValType, nth: usize) -> Result<u32, ActorError> {
        let same_type = self.types.iter().enumerate().filter(|(_, t)| **t == ty);
        let i = match same_type.map(|(i, _)| i).nth(nth) {
            Some(i) => i,
            None => {
                self.types.push(ty);
                self.types.len() - 1
            }
        };
        u32::try_from(i)
            .ok()
            .and_then(|i| self.first.checked_add(i))
            .ok_or_else(|| invalid("too many locals"))
    }
}

/// A write to memory 0, and the operands on the stack when it runs (address first).
#[derive(Debug, PartialEq, Eq)]
enum Write {
    /// `bytes` bytes at address + `offset`.
    Access {
        offset: u64,
        bytes: u64,
        operands: &'static [ValType],
    },
    /// A bulk write of `[d, d + n)`: `d` is the first operand, `n` the last.
    Range { operands: &'static [ValType] },
}

impl Write {
    fn operands(&self) -> &'static [ValType] {
        match self {
            Write::Access { operands, .. } | Write::Range { operands } => operands,
        }
    }
}

const I32_I32: &[ValType] = &[ValType::I32, ValType::I32];
const I32_I64: &[ValType] = &[ValType::I32, ValType::I64];
const I32_F32: &[ValType] = &[ValType::I32, ValType::F32];
const I32_F64: &[ValType] = &[ValType::I32, ValType::F64];
const I32_V128: &[ValType] = &[ValType::I32, ValType::V128];
const I32_I32_I32: &[ValType] = &[ValType::I32, ValType::I32, ValType::I32];
const I32_I64_I64: &[ValType] = &[ValType::I32, ValType::I64, ValType::I64];

/// The write to memory 0 that `op` makes, if any. This table must list every instruction
/// that can change linear memory.
fn write_of(op: &Operator<'_>) -> Option<Write> {
    use Operator as O;
    let (memarg, bytes, operands) = match *op {
        O::MemoryFill { mem: 0 } | O::MemoryInit { mem: 0, .. } => {
            return Some(Write::Range {
                operands: I32_I32_I32,
            });
        }
        O::MemoryCopy { dst_mem: 0, .. } => {
            return Some(Write::Range {
                operands: I32_I32_I32,
            });
        }
        O::MemoryDiscard { mem: 0 } => return Some(Write::Range { operands: I32_I32 }),

        O::I32Store { memarg }
        | O::I32AtomicStore { memarg }
        | O::I32AtomicRmwAdd { memarg }
        | O::I32AtomicRmwSub { memarg }
        | O::I32AtomicRmwAnd { memarg }
        | O::I32AtomicRmwOr { memarg }
        | O::I32AtomicRmwXor { memarg }
        | O::I32AtomicRmwXchg { memarg } => (memarg, 4, I32_I32),
        O::I32Store8 { memarg }
        | O::I32AtomicStore8 { memarg }
        | O::I32AtomicRmw8AddU { memarg }
        | O::I32AtomicRmw8SubU { memarg }
        | O::I32AtomicRmw8AndU { memarg }
        | O::I32AtomicRmw8OrU { memarg }
        | O::I32AtomicRmw8XorU { memarg }
        | O::I32AtomicRmw8XchgU { memarg } => (memarg, 1, I32_I32),
        O::I32Store16 { memarg }
        | O::I32AtomicStore16 { memarg }
        | O::I32AtomicRmw16AddU { memarg }
        | O::I32AtomicRmw16SubU { memarg }
        | O::I32AtomicRmw16AndU { memarg }
        | O::I32AtomicRmw16OrU { memarg }
        | O::I32AtomicRmw16XorU { memarg }
        | O::I32AtomicRmw16XchgU { memarg } => (memarg, 2, I32_I32),
        O::I32AtomicRmwCmpxchg { memarg } => (memarg, 4, I32_I32_I32),
        O::I32AtomicRmw8CmpxchgU { memarg } => (memarg, 1, I32_I32_I32),
        O::I32AtomicRmw16CmpxchgU { memarg } => (memarg, 2, I32_I32_I32),

        O::I64Store { memarg }
        | O::I64AtomicStore { memarg }
        | O::I64AtomicRmwAdd { memarg }
        | O::I64AtomicRmwSub { memarg }
        | O::I64AtomicRmwAnd { memarg }
        | O::I64AtomicRmwOr { memarg }
        | O::I64AtomicRmwXor { memarg }
        | O::I64AtomicRmwXchg { memarg } => (memarg, 8, I32_I64),
        O::I64Store8 { memarg }
        | O::I64AtomicStore8 { memarg }
        | O::I64AtomicRmw8AddU { memarg }
        | O::I64AtomicRmw8SubU { memarg }
        | O::I64AtomicRmw8AndU { memarg }
        | O::I64AtomicRmw8OrU { memarg }
        | O::I64AtomicRmw8XorU { memarg }
        | O::I64AtomicRmw8XchgU { memarg } => (memarg, 1, I32_I64),
        O::I64Store16 { memarg }
        | O::I64AtomicStore16 { memarg }
        | O::I64AtomicRmw16AddU { memarg }
        | O::I64AtomicRmw16SubU { memarg }
        | O::I64AtomicRmw16AndU { memarg }
        | O::I64AtomicRmw16OrU { memarg }
        | O::I64AtomicRmw16XorU { memarg }
        | O::I64AtomicRmw16XchgU { memarg } => (memarg, 2, I32_I64),
        O::I64Store32 { memarg }
        | O::I64AtomicStore32 { memarg }
        | O::I64AtomicRmw32AddU { memarg }
        | O::I64AtomicRmw32SubU { memarg }
        | O::I64AtomicRmw32AndU { memarg }
        | O::I64AtomicRmw32OrU { memarg }
        | O::I64AtomicRmw32XorU { memarg }
        | O::I64AtomicRmw32XchgU { memarg } => (memarg, 4, I32_I64),
        O::I64AtomicRmwCmpxchg { memarg } => (memarg, 8, I32_I64_I64),
        O::I64AtomicRmw8CmpxchgU { memarg } => (memarg, 1, I32_I64_I64),
        O::I64AtomicRmw16CmpxchgU { memarg } => (memarg, 2, I32_I64_I64),
        O::I64AtomicRmw32CmpxchgU { memarg } => (memarg, 4, I32_I64_I64),

        O::F32Store { memarg } => (memarg, 4, I32_F32),
        O::F64Store { memarg } => (memarg, 8, I32_F64),
        O::V128Store { memarg } => (memarg, 16, I32_V128),
        O::V128Store8Lane { memarg, .. } => (memarg, 1, I32_V128),
        O::V128Store16Lane { memarg, .. } => (memarg, 2, I32_V128),
        O::V128Store32Lane { memarg, .. } => (memarg, 4, I32_V128),
        O::V128Store64Lane { memarg, .. } => (memarg, 8, I32_V128),
        _ => return None,
    };
    (memarg.memory == 0).then_some(Write::Access {
        offset: memarg.offset,
        bytes,
        operands,
    })
}

#[cfg(test)]
mod tests {
    use wasmtime::{Engine, Instance, Memory, Module, Store, Trap, Val};

    use super::*;
    use crate::instrument::{Writes, instrument_with};

    /// One module instantiated twice in one store: as written, and rewritten with tracking.
    struct Twin {
        store: Store<()>,
        plain: Instance,
        tracked: Instance,
        map: Memory,
    }

    fn twin(wat: &str) -> Twin {
        let engine = Engine::default();
        let info = instrument_with(wat.as_bytes(), Writes::DirtyPages).unwrap();
        wasmparser::validate(&info.wasm).expect("the rewrite is valid");
        let dirty = info.dirty.expect("the memory is tracked");
        let mut store = Store::new(&engine, ());
        let plain = Module::new(&engine, wat).unwrap();
        let plain = Instance::new(&mut store, &plain, &[]).unwrap();
        let tracked = Module::new(&engine, &info.wasm).unwrap();
        let tracked = Instance::new(&mut store, &tracked, &[]).unwrap();
        let map = tracked.get_memory(&mut store, &dirty.export).unwrap();
        assert_eq!(map.size(&store), MAP_PAGES);
        Twin {
            store,
            plain,
            tracked,
            map,
        }
    }

    impl Twin {
        /// Calls `name` on both instances and checks that they agree: both return or both
        /// trap alike, and their memories hold the same bytes. Returns the trap, if any,
        /// and the pages marked since the last call, whose marks it then clears.
        fn call(&mut self, name: &str, args: &[Val]) -> (Option<Trap>, Vec<u64>) {
            let mut outcome = [self.plain, self.tracked].map(|instance| {
                let f = instance.get_func(&mut self.store, name).unwrap();
                let result = f.call(&mut self.store, args, &mut []);
                result
                    .err()
                    .map(|e| *e.downcast_ref::<Trap>().expect("a trap"))
            });
            assert_eq!(outcome[0], outcome[1], "`{name}{args:?}` traps alike");
            let [plain, tracked] = [self.plain, self.tracked]
                .map(|instance| instance.get_memory(&mut self.store, "memory").unwrap());
            assert!(
                plain.data(&self.store) == tracked.data(&self.store),
                "`{name}{args:?}` writes the same bytes"
            );
            let pages = marked_pages(self.map.data(&self.store), tracked.size(&self.store));
            self.map.data_mut(&mut self.store).fill(0);
            (outcome[0].take(), pages)
        }

        fn pages(&mut self, name: &str, args: &[i32]) -> Vec<u64> {
            let args: Vec<Val> = args.iter().map(|&a| Val::I32(a)).collect();
            let (trap, pages) = self.call(name, &args);
            assert_eq!(trap, None, "`{name}{args:?}` runs");
            pages
        }
    }

    const PAGE: i32 = 65536;
    const NONE: [u64; 0] = [];

    /// Every store instruction: its text, an operand it stores, and its width in bytes.
    const STORES: [(&str, &str, i32); 14] = [
        ("i32.store", "i32.const -1", 4),
        ("i64.store", "i64.const -1", 8),
        ("f32.store", "f32.const -1", 4),
        ("f64.store", "f64.const -1", 8),
        ("i32.store8", "i32.const -1", 1),
        ("i32.store16", "i32.const -1", 2),
        ("i64.store8", "i64.const -1", 1),
        ("i64.store16", "i64.const -1", 2),
        ("i64.store32", "i64.const -1", 4),
        (
            "v128.store",
            "v128.const i8x16 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16",
            16,
        ),
        (
            "v128.store8_lane",
            "v128.const i8x16 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16",
            1,
        ),
        (
            "v128.store16_lane",
            "v128.const i8x16 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16",
            2,
        ),
        (
            "v128.store32_lane",
            "v128.const i8x16 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16",
            4,
        ),
        (
            "v128.store64_lane",
            "v128.const i8x16 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16",
            8,
        ),
    ];

    #[test]
    fn each_store_marks_the_pages_of_its_first_and_last_byte() {
        for (op, value, bytes) in STORES {
            let lane = if op.ends_with("_lane") { " 1" } else { "" };
            // `far` reaches page 2 through its static offset alone.
            let far = 3 * PAGE - 1;
            let wat = format!(
                r#"(module (memory (export "memory") 5)
                  (func (export "at") (param i32) local.get 0 {value} {op}{lane})
                  (func (export "far") (param i32) local.get 0 {value} {op} offset={far}{lane}))"#
            );
            let mut t = twin(&wat);
            let both = |first: u64| {
                if bytes == 1 {
                    vec![first]
                } else {
                    vec![first, first + 1]
                }
            };
            assert_eq!(t.pages("at", &[0]), [0], "{op}");
            assert_eq!(
                t.pages("at", &[PAGE - bytes]),
                [0],
                "{op}: last bytes of page 0"
            );
            assert_eq!(t.pages("at", &[PAGE]), [1], "{op}");
            assert_eq!(t.pages("at", &[PAGE - 1]), both(0), "{op}: across 64 KiB");
            assert_eq!(t.pages("at", &[4 * PAGE + 7]), [4], "{op}");
            assert_eq!(t.pages("far", &[0]), both(2), "{op}: offset {far}");
            assert_eq!(t.pages("far", &[PAGE + 1]), [4], "{op}: offset {far}");
        }
    }

    const BULK: &str = r#"(module (memory (export "memory") 5)
        (data $d "0123456789")
        (func (export "fill") (param i32 i32)
          (memory.fill (local.get 0) (i32.const 0xab) (local.get 1)))
        (func (export "copy") (param i32 i32 i32)
          (memory.copy (local.get 0) (local.get 1) (local.get 2)))
        (func (export "init") (param i32 i32 i32)
          (memory.init $d (local.get 0) (local.get 1) (local.get 2))))"#;

    #[test]
    fn bulk_writes_mark_every_page_of_their_destination() {
        let mut t = twin(BULK);
        assert_eq!(t.pages("fill", &[PAGE - 6, 12]), [0, 1]);
        assert_eq!(t.pages("fill", &[PAGE, PAGE]), [1]);
        assert_eq!(t.pages("fill", &[PAGE - 1, PAGE + 2]), [0, 1, 2]);
        assert_eq!(t.pages("fill", &[0, 5 * PAGE]), [0, 1, 2, 3, 4]);
        assert_eq!(t.pages("copy", &[2 * PAGE - 2, 0, 4]), [1, 2]);
        assert_eq!(t.pages("copy", &[0, 2 * PAGE, PAGE]), [0]);
        assert_eq!(t.pages("copy", &[4 * PAGE + 1, 4 * PAGE, 100]), [4]);
        assert_eq!(t.pages("init", &[PAGE - 2, 0, 4]), [0, 1]);
        assert_eq!(t.pages("init", &[3 * PAGE + 5, 1, 9]), [3]);
    }

    #[test]
    fn bulk_writes_of_nothing_mark_nothing() {
        let mut t = twin(BULK);
        assert_eq!(t.pages("fill", &[PAGE, 0]), NONE);
        assert_eq!(
            t.pages("fill", &[5 * PAGE, 0]),
            NONE,
            "n = 0 at the end is in bounds"
        );
        assert_eq!(t.pages("copy", &[3 * PAGE, 0, 0]), NONE);
        assert_eq!(t.pages("init", &[2 * PAGE, 10, 0]), NONE);
    }

    #[test]
    fn out_of_bounds_writes_still_trap() {
        let mut t = twin(
            r#"(module (memory (export "memory") 1)
              (func (export "store") (param i32) (i32.store (local.get 0) (i32.const 7)))
              (func (export "far") (param i32)
                (i64.store offset=4294967295 (local.get 0) (i64.const 7)))
              (func (export "fill") (param i32 i32)
                (memory.fill (local.get 0) (i32.const 1) (local.get 1))))"#,
        );
        let oob = Some(Trap::MemoryOutOfBounds);
        assert_eq!(t.call("store", &[Val::I32(PAGE - 2)]), (oob, vec![0]));
        assert_eq!(t.call("store", &[Val::I32(PAGE)]), (oob, NONE.to_vec()));
        assert_eq!(
            t.call("fill", &[Val::I32(PAGE - 10), Val::I32(11)]),
            (oob, vec![0])
        );
        assert_eq!(
            t.call("fill", &[Val::I32(PAGE + 1), Val::I32(0)]),
            (oob, NONE.to_vec())
        );
        assert!(t.map.data(&t.store).iter().all(|&b| b == 0));
        // The largest address and offset: marking still runs (the map's last byte is set,
        // past the memory's size) and the store traps as it did.
        let (trap, pages) = t.call("far", &[Val::I32(-1)]);
        assert_eq!((trap, pages), (oob, NONE.to_vec()));
        let mut t = twin(
            r#"(module (memory (export "memory") 1)
              (func (export "far") (param i32)
                (i64.store offset=4294967295 (local.get 0) (i64.const 7))))"#,
        );
        let far = t.tracked.get_func(&mut t.store, "far").unwrap();
        assert!(far.call(&mut t.store, &[Val::I32(-1)], &mut []).is_err());
        let map = t.map.data(&t.store);
        assert_eq!(map.len() as u64, MAP_PAGES * 65536);
        assert_eq!(map[map.len() - 1], 1, "marked, and the mark did not trap");
    }

    #[test]
    fn a_cleared_map_marks_again() {
        let mut t = twin(
            r#"(module (memory (export "memory") 4)
              (func (export "store") (param i32) (i32.store8 (local.get 0) (i32.const 1))))"#,
        );
        assert_eq!(t.pages("store", &[5]), [0]);
        assert_eq!(
            t.pages("store", &[2 * PAGE]),
            [2],
            "the host cleared page 0's mark"
        );
        assert_eq!(
            t.pages("store", &[2 * PAGE + 9]),
            [2],
            "a page is marked again"
        );
        assert_eq!(t.pages("store", &[3 * PAGE]), [3]);
    }

    /// How many `i32.store8`s into memory `memory` the code of `wasm` holds.
    fn marks(wasm: &[u8], memory: u32) -> usize {
        let mut n = 0;
        for payload in wasmparser::Parser::new(0).parse_all(wasm) {
            if let wasmparser::Payload::CodeSectionEntry(body) = payload.unwrap() {
                let mut ops = body.get_operators_reader().unwrap();
                while !ops.eof() {
                    if let Operator::I32Store8 { memarg } = ops.read().unwrap() {
                        n += usize::from(memarg.memory == memory);
                    }
                }
            }
        }
        n
    }

    #[test]
    fn atomic_writes_are_marked() {
        // Wasmtime is built here without the threads proposal, so these cannot run; they
        // are marked anyway, and the rewrite validates with the proposal.
        let ops = [
            ("i32", "i32.atomic.store", 2),
            ("i32", "i32.atomic.store8", 1),
            ("i32", "i32.atomic.rmw.add", 2),
            ("i32", "i32.atomic.rmw16.xchg_u", 2),
            ("i64", "i64.atomic.store32", 2),
            ("i64", "i64.atomic.rmw.or", 2),
            ("i64", "i64.atomic.rmw8.sub_u", 1),
            ("i64", "i64.atomic.rmw32.and_u", 2),
        ];
        let mut body = String::new();
        for (ty, op, _) in ops {
            let drop = if op.contains("rmw") { "drop" } else { "" };
            body += &format!("(i32.const 8) ({ty}.const 1) {op} offset=65536 {drop}\n");
        }
        for ty in ["i32", "i64"] {
            body += &format!(
                "(i32.const 8) ({ty}.const 1) ({ty}.const 2) {ty}.atomic.rmw.cmpxchg drop\n"
            );
        }
        let wat = format!("(module (memory 1) (func {body}))");
        let out = instrument_with(wat.as_bytes(), Writes::DirtyPages).unwrap();
        wasmparser::validate(&out.wasm).expect("valid with the threads proposal");
        let expected: usize = ops.iter().map(|(_, _, marks)| marks).sum::<usize>() + 2 * 2;
        assert_eq!(marks(&out.wasm, 1), expected + 1, "and one in the helper");
        assert_eq!(marks(&out.wasm, 0), 0);
    }

    /// The guest's speed with and without marking: a loop that writes 16 MiB with
    /// `i32.store`, each variant run once to touch its pages and then 5 times, alternated;
    /// prints the median and fastest run of each and their ratios.
    /// `cargo test -p tern-actor --lib -- --ignored --nocapture marking_cost`
    #[test]
    #[ignore = "a benchmark: it prints timings"]
    fn marking_cost() {
        const BYTES: i32 = 16 << 20;
        let mut t = twin(
            r#"(module (memory (export "memory") 256 256)
              (func (export "run") (param $n i32) (local $i i32)
                (loop $l
                  (i32.store (local.get $i) (local.get $i))
                  (local.set $i (i32.add (local.get $i) (i32.const 4)))
                  (br_if $l (i32.lt_u (local.get $i) (local.get $n))))))"#,
        );
        let runs = [t.plain, t.tracked].map(|i| i.get_func(&mut t.store, "run").unwrap());
        let mut ms = [Vec::new(), Vec::new()];
        for round in 0..6 {
            for (run, ms) in runs.iter().zip(&mut ms) {
                let start = std::time::Instant::now();
                run.call(&mut t.store, &[Val::I32(BYTES)], &mut []).unwrap();
                if round > 0 {
                    ms.push(start.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        let [plain, marking] = ms.map(|mut v| {
            v.sort_by(f64::total_cmp);
            (v[v.len() / 2], v[0])
        });
        println!(
            "16 MiB of i32.store, median (fastest) of 5: {:.2} ({:.2}) ms plain, \
             {:.2} ({:.2}) ms marking; ratio {:.2} ({:.2})",
            plain.0,
            plain.1,
            marking.0,
            marking.1,
            marking.0 / plain.0,
            marking.1 / plain.1
        );
        assert_eq!(t.pages("run", &[BYTES]), (0..256).collect::<Vec<u64>>());
    }
}
