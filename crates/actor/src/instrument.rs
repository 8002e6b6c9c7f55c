//! Load-time instrumentation that makes an actor's whole state reachable for snapshots.
//!
//! Wasmtime lets the host read and write only *exported* globals, but a compiled guest keeps
//! state in internal ones (`__stack_pointer`, a heap base). As Wizer does, the module is
//! rewritten at load so that every global it defines is exported: an already exported global
//! keeps its name, every other one gets the reserved name `__tern_global_<index>`.
//!
//! With [`Writes::DirtyPages`] ([`instrument_with`]), the rewrite also makes the guest record
//! which 64 KiB pages of its memory it writes, for incremental snapshots ([`crate::dirty`]),
//! when the module has exactly one memory and it is 32-bit with 64 KiB pages (imported or
//! defined; not shared). It then appends, after every existing index so that none changes:
//! one type `[i32 i32] -> []` to the type section, one memory (the dirty-page map) to the
//! memory section, and one function of that type (which marks a range of pages) to the
//! function and code sections; it exports the map ([`Instrumented::dirty`]); and it rewrites
//! every function body so that each write to memory 0 marks its pages first. Any other
//! module is left untracked (`dirty: None`) and rewritten exactly as without tracking.
//! Tracking first checks that the module is valid (with every proposal allowed): its
//! additions would otherwise give meaning to an index the original has out of range.
//!
//! Nothing else changes: every other section (imports, tables, globals, start, elements,
//! data count, data, custom sections) is copied byte for byte, and so is every instruction
//! of a function body; a section the rewrite needs and the module lacks is added in its
//! place in the section order.
//!
//! The same pass records whether the guest can change a table after instantiation
//! (`table.set`, `table.grow`, `table.fill`, `table.copy`, `table.init`, `elem.drop`): such
//! tables are state a snapshot cannot capture, so snapshots of that module are refused.

use std::collections::BTreeSet;
use std::ops::Range;

use sha2::{Digest, Sha256};
use wasmparser::{
    BinaryReader, CodeSectionReader, CompositeInnerType, DataKind, ExternalKind, MemoryType,
    Operator, Parser, Payload, TypeRef, ValType, Validator, WasmFeatures,
};

use crate::ActorError;
use crate::dirty::Plan;
pub use crate::dirty::{DIRTY_EXPORT, DirtyMap};

/// The prefix of the export names given to internal globals.
pub const GLOBAL_EXPORT_PREFIX: &str = "__tern_global_";

/// Whether the rewrite makes the guest record the memory pages it writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writes {
    /// Function bodies and memories are left as they are.
    Untracked,
    /// Every write to memory 0 marks its pages in an exported map ([`crate::dirty`]), when
    /// the module's memory can be tracked.
    DirtyPages,
}

/// A module rewritten for snapshots, and what the rewrite learned about it.
#[derive(Clone, Debug)]
pub struct Instrumented {
    /// The rewritten binary, to compile.
    pub wasm: Vec<u8>,
    /// SHA-256 of the original binary, lowercase hex: the module's identity in snapshots.
    pub digest: String,
    /// Every global the module defines (imported ones are the host's), in index order.
    pub globals: Vec<GlobalSlot>,
    /// Why the module's tables can change at run time, when they can.
    pub mutable_tables: Option<String>,
    /// The Wasm pages that instantiation may leave non-zero (those active data segments
    /// write), or `None` when that cannot be known (a start function, a computed offset).
    pub initialized_pages: Option<BTreeSet<u64>>,
    /// Where the guest records the pages of memory 0 it writes, when it does
    /// ([`Writes::DirtyPages`] and a trackable memory); `None` otherwise.
    pub dirty: Option<DirtyMap>,
}

/// One global the module defines, and the export that reaches it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GlobalSlot {
    pub export: String,
    pub ty: ValType,
    pub mutable: bool,
}

fn invalid(e: impl std::fmt::Display) -> ActorError {
    ActorError::Module(format!("{e}"))
}

/// Rewrites `wasm` (binary or text) so that every defined global is exported; writes are
/// not tracked.
pub fn instrument(wasm: &[u8]) -> Result<Instrumented, ActorError> {
    instrument_with(wasm, Writes::Untracked)
}

/// Rewrites `wasm` (binary or text) so that every defined global is exported and, with
/// [`Writes::DirtyPages`], so that the guest marks the memory pages it writes.
pub fn instrument_with(wasm: &[u8], writes: Writes) -> Result<Instrumented, ActorError> {
    let binary = wat::parse_bytes(wasm).map_err(invalid)?;
    let binary: &[u8] = &binary;
    if writes == Writes::DirtyPages {
        // Tracking appends a memory, a type, a function and locals, which would give
        // meaning to an index that is out of range in the original: check it is valid
        // first. Every proposal is allowed here; the engine applies its own set later.
        Validator::new_with_features(WasmFeatures::all())
            .validate_all(binary)
            .map_err(invalid)?;
    }
    let survey = Survey::read(binary)?;
    let plan = match writes {
        Writes::DirtyPages => survey.plan()?,
        Writes::Untracked => None,
    };
    let Survey {
        imported_globals,
        mut globals,
        mut exports,
        mutable_tables,
        initialized_pages,
        ..
    } = survey;
    for (index, slot) in globals.iter_mut().enumerate() {
        let index = imported_globals + index as u32;
        if let Some((name, _, _)) = exports.iter().find(|(_, k, i)| *k == 3 && *i == index) {
            slot.export = name.clone();
            continue;
        }
        slot.export = free_name(format!("{GLOBAL_EXPORT_PREFIX}{index}"), &exports);
        exports.push((slot.export.clone(), 3, index));
    }
    let dirty = plan.as_ref().map(|plan| {
        let export = free_name(DIRTY_EXPORT.to_string(), &exports);
        exports.push((export.clone(), 2, plan.map));
        DirtyMap { export }
    });
    Ok(Instrumented {
        wasm: rewrite(binary, &exports, plan.as_ref())?,
        digest: hex(&Sha256::digest(binary)),
        globals,
        mutable_tables,
        initialized_pages,
        dirty,
    })
}

/// `name`, with `_` appended until no export has it.
fn free_name(mut name: String, exports: &[(String, u8, u32)]) -> String {
    while exports.iter().any(|(taken, _, _)| *taken == name) {
        name.push('_');
    }
    name
}

const PAGE: u64 = 65536;

/// What one read of the module learns: its globals, exports, tables and data, and the
/// indices the dirty-page rewrite appends after.
struct Survey {
    imported_globals: u32,
    imported_funcs: u32,
    globals: Vec<GlobalSlot>,
    /// (name, kind byte, index) of every export, in order.
    exports: Vec<(String, u8, u32)>,
    mutable_tables: Option<String>,
    initialized_pages: Option<BTreeSet<u64>>,
    /// The parameter count of every type, `None` for a type that is not a function's.
    type_params: Vec<Option<u32>>,
    /// The type index of every defined function, in order.
    func_types: Vec<u32>,
    /// Every memory, imported ones first.
    memories: Vec<MemoryType>,
}

impl Survey {
    fn read(binary: &[u8]) -> Result<Survey, ActorError> {
        let mut survey = Survey {
            imported_globals: 0,
            imported_funcs: 0,
            globals: Vec::new(),
            exports: Vec::new(),
            mutable_tables: None,
            initialized_pages: Some(BTreeSet::new()),
            type_params: Vec::new(),
            func_types: Vec::new(),
            memories: Vec::new(),
        };
        let mut function = 0u32;
        for payload in Parser::new(0).parse_all(binary) {
            match payload.map_err(invalid)? {
                Payload::Version { encoding, .. } if encoding != wasmparser::Encoding::Module => {
                    return Err(invalid("components are not supported; give a core module"));
                }
                Payload::TypeSection(section) => {
                    for group in section {
                        for ty in group.map_err(invalid)?.types() {
                            survey.type_params.push(match &ty.composite_type.inner {
                                CompositeInnerType::Func(f) => Some(f.params().len() as u32),
                                _ => None,
                            });
                        }
                    }
                }
                Payload::ImportSection(imports) => {
                    for import in imports.into_imports() {
                        match import.map_err(invalid)?.ty {
                            TypeRef::Global(_) => survey.imported_globals += 1,
                            TypeRef::Func(_) | TypeRef::FuncExact(_) => survey.imported_funcs += 1,
                            TypeRef::Memory(ty) => survey.memories.push(ty),
                            TypeRef::Table(_) | TypeRef::Tag(_) => {}
                        }
                    }
                }
                Payload::FunctionSection(section) => {
                    for ty in section {
                        survey.func_types.push(ty.map_err(invalid)?);
                    }
                }
                Payload::MemorySection(section) => {
                    for ty in section {
                        survey.memories.push(ty.map_err(invalid)?);
                    }
                }
                Payload::GlobalSection(section) => {
                    for global in section {
                        let ty = global.map_err(invalid)?.ty;
                        survey.globals.push(GlobalSlot {
                            export: String::new(),
                            ty: ty.content_type,
                            mutable: ty.mutable,
                        });
                    }
                }
                Payload::ExportSection(section) => survey.read_exports(section)?,
                Payload::StartSection { .. } => survey.initialized_pages = None,
                Payload::DataSection(section) => survey.read_data(section)?,
                Payload::CodeSectionEntry(body) => {
                    if survey.mutable_tables.is_none() {
                        survey.mutable_tables = table_writer(&body)
                            .map_err(invalid)?
                            .map(|op| format!("function {function} uses `{op}`"));
                    }
                    function += 1;
                }
                _ => {}
            }
        }
        Ok(survey)
    }

    fn read_exports(
        &mut self,
        section: wasmparser::ExportSectionReader<'_>,
    ) -> Result<(), ActorError> {
        for export in section {
            let export = export.map_err(invalid)?;
            let kind = match export.kind {
                ExternalKind::Func => 0,
                ExternalKind::Table => 1,
                ExternalKind::Memory => 2,
                ExternalKind::Global => 3,
                ExternalKind::Tag => 4,
                ExternalKind::FuncExact => {
                    return Err(invalid("exact function exports are not supported"));
                }
            };
            self.exports
                .push((export.name.to_string(), kind, export.index));
        }
        Ok(())
    }

    fn read_data(&mut self, section: wasmparser::DataSectionReader<'_>) -> Result<(), ActorError> {
        for data in section {
            let data = data.map_err(invalid)?;
            if let DataKind::Active { offset_expr, .. } = data.kind {
                let start = const_offset(&offset_expr).map_err(invalid)?;
                match (start, self.initialized_pages.as_mut()) {
                    (Some(start), Some(pages)) if !data.data.is_empty() => {
                        let end = start + data.data.len() as u64 - 1;
                        pages.extend(start / PAGE..=end / PAGE);
                    }
                    (None, _) => self.initialized_pages = None,
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// What the dirty-page rewrite appends, when the module's memory can be tracked: exactly
    /// one memory, 32-bit, not shared, with 64 KiB pages.
    fn plan(&self) -> Result<Option<Plan>, ActorError> {
        let [memory] = self.memories[..] else {
            return Ok(None);
        };
        if memory.memory64 || memory.shared || memory.page_size_log2.is_some_and(|l| l != 16) {
            return Ok(None);
        }
        let mut params = Vec::with_capacity(self.func_types.len());
        for &ty in &self.func_types {
            let found = self.type_params.get(ty as usize).copied().flatten();
            params.push(found.ok_or_else(|| invalid(format!("type {ty} is not a function type")))?);
        }
        let count =
            |n: usize, what| u32::try_from(n).map_err(|_| invalid(format!("too many {what}")));
        let helper = count(self.func_types.len(), "functions")?
            .checked_add(self.imported_funcs)
            .ok_or_else(|| invalid("too many functions"))?;
        Ok(Some(Plan {
            map: 1,
            helper,
            helper_type: count(self.type_params.len(), "types")?,
            params,
        }))
    }
}
/// The offset a constant expression names, when it is a plain constant.
fn const_offset(expr: &wasmparser::ConstExpr<'_>) -> wasmparser::Result<Option<u64>> {
    let mut ops = expr.get_operators_reader();
    let value = match ops.read()? {
        Operator::I32Const { value } => u64::from(value as u32),
        Operator::I64Const { value } => value as u64,
        _ => return Ok(None),
    };
    Ok(matches!(ops.read()?, Operator::End).then_some(value))
}

/// The first instruction in `body` that changes a table, if any.
fn table_writer(body: &wasmparser::FunctionBody<'_>) -> wasmparser::Result<Option<&'static str>> {
    let mut ops = body.get_operators_reader()?;
    while !ops.eof() {
        let name = match ops.read()? {
            Operator::TableSet { .. } => "table.set",
            Operator::TableGrow { .. } => "table.grow",
            Operator::TableFill { .. } => "table.fill",
            Operator::TableCopy { .. } => "table.copy",
            Operator::TableInit { .. } => "table.init",
            Operator::ElemDrop { .. } => "elem.drop",
            _ => continue,
        };
        return Ok(Some(name));
    }
    Ok(None)
}

const CUSTOM_SECTION: u8 = 0;
const TYPE_SECTION: u8 = 1;
const FUNCTION_SECTION: u8 = 3;
const MEMORY_SECTION: u8 = 5;
const EXPORT_SECTION: u8 = 7;
const CODE_SECTION: u8 = 10;

/// Where a section with id `id` goes in a module: sections appear in increasing rank.
fn rank(id: u8) -> u8 {
    // The order of the binary format: type, import, function, table, memory, tag, global,
    // export, start, element, data count, code, data.
    const ORDER: [u8; 13] = [1, 2, 3, 4, 5, 13, 6, 7, 8, 9, 12, 10, 11];
    ORDER
        .iter()
        .position(|&o| o == id)
        .map_or(u8::MAX, |i| i as u8)
}

/// Copies every section of `binary` but the export section, which becomes `exports`, and,
/// with a `plan`, the type, function, memory and code sections, which get its additions.
/// A rewritten section takes the place of the original; one the module lacks goes where the
/// section order puts it.
fn rewrite(
    binary: &[u8],
    exports: &[(String, u8, u32)],
    plan: Option<&Plan>,
) -> Result<Vec<u8>, ActorError> {
    let mut out = binary
        .get(..8)
        .ok_or_else(|| invalid("the module has no header"))?
        .to_vec();
    let mut sections = Vec::new();
    for payload in Parser::new(0).parse_all(binary) {
        sections.extend(payload.map_err(invalid)?.as_section());
    }
    let original = |id: u8| {
        let found = sections.iter().find(|(i, _)| *i == id);
        found.map(|(_, range)| range.clone())
    };
    let mut pending = vec![(EXPORT_SECTION, export_section(exports))];
    if let Some(plan) = plan {
        let mut helper_type = Vec::new();
        leb(&mut helper_type, u64::from(plan.helper_type));
        pending.extend([
            (
                TYPE_SECTION,
                appended(binary, original(TYPE_SECTION), &plan.helper_type_entry())?,
            ),
            (
                FUNCTION_SECTION,
                appended(binary, original(FUNCTION_SECTION), &helper_type)?,
            ),
            (
                MEMORY_SECTION,
                appended(binary, original(MEMORY_SECTION), &plan.map_type())?,
            ),
            (
                CODE_SECTION,
                code_section(binary, original(CODE_SECTION), plan)?,
            ),
        ]);
    }
    pending.sort_by_key(|(id, _)| rank(*id));
    let replaced: Vec<u8> = pending.iter().map(|(id, _)| *id).collect();
    let mut pending = pending.into_iter().peekable();
    for (id, range) in &sections {
        if *id != CUSTOM_SECTION {
            while let Some((new, content)) = pending.next_if(|(new, _)| rank(*new) <= rank(*id)) {
                put_section(&mut out, new, &content);
            }
        }
        if !replaced.contains(id) {
            put_section(&mut out, *id, &binary[range.clone()]);
        }
    }
    for (new, content) in pending {
        put_section(&mut out, new, &content);
    }
    Ok(out)
}

/// The content of an export section listing `exports`.
fn export_section(exports: &[(String, u8, u32)]) -> Vec<u8> {
    let mut section = Vec::new();
    leb(&mut section, exports.len() as u64);
    for (name, kind, index) in exports {
        leb(&mut section, name.len() as u64);
        section.extend_from_slice(name.as_bytes());
        section.push(*kind);
        leb(&mut section, u64::from(*index));
    }
    section
}

/// The content of a vector section: the entries of `binary[range]` (none when there is no
/// such section) followed by `entry`.
fn appended(
    binary: &[u8],
    range: Option<Range<usize>>,
    entry: &[u8],
) -> Result<Vec<u8>, ActorError> {
    let (count, entries) = match range {
        Some(range) => {
            let mut reader = BinaryReader::new(&binary[range.clone()], range.start);
            let count = reader.read_var_u32().map_err(invalid)?;
            (count, &binary[reader.original_position()..range.end])
        }
        None => (0, &[][..]),
    };
    let mut out = Vec::new();
    leb(&mut out, u64::from(count) + 1);
    out.extend_from_slice(entries);
    out.extend_from_slice(entry);
    Ok(out)
}

/// The content of the code section: every body of `binary[range]` rewritten by `plan` to
/// mark the pages it writes, then the plan's helper.
fn code_section(
    binary: &[u8],
    range: Option<Range<usize>>,
    plan: &Plan,
) -> Result<Vec<u8>, ActorError> {
    let mut bodies = Vec::new();
    let mut count = 0u64;
    if let Some(range) = range {
        let reader = BinaryReader::new(&binary[range.clone()], range.start);
        let section = CodeSectionReader::new(reader).map_err(invalid)?;
        for (index, body) in section.into_iter().enumerate() {
            let body = plan.mark_writes(binary, index, &body.map_err(invalid)?)?;
            leb(&mut bodies, body.len() as u64);
            bodies.extend(body);
            count += 1;
        }
    }
    let helper = plan.helper_body();
    leb(&mut bodies, helper.len() as u64);
    bodies.extend(helper);
    let mut out = Vec::new();
    leb(&mut out, count + 1);
    out.extend(bodies);
    Ok(out)
}

fn put_section(out: &mut Vec<u8>, id: u8, content: &[u8]) {
    out.push(id);
    leb(out, content.len() as u64);
    out.extend_from_slice(content);
}

fn leb(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exports_of(wasm: &[u8]) -> Vec<(String, ExternalKind, u32)> {
        let mut out = Vec::new();
        for payload in Parser::new(0).parse_all(wasm) {
            if let Payload::ExportSection(s) = payload.unwrap() {
                for e in s {
                    let e = e.unwrap();
                    out.push((e.name.to_string(), e.kind, e.index));
                }
            }
        }
        out
    }

    #[test]
    fn internal_globals_are_exported_and_exported_ones_keep_their_names() {
        let wat = r#"(module
            (import "env" "g" (global i32))
            (global $sp (mut i32) (i32.const 1024))
            (global $k i64 (i64.const 7))
            (global $pub (mut f32) (f32.const 1.5))
            (memory (export "memory") 1)
            (func (export "f") (result i32) global.get $sp)
            (export "pub" (global $pub))
            (data (i32.const 0) "hi"))"#;
        let out = instrument(wat.as_bytes()).unwrap();
        wasmparser::validate(&out.wasm).expect("the rewrite is a valid module");
        let names: Vec<_> = out.globals.iter().map(|g| g.export.as_str()).collect();
        assert_eq!(names, ["__tern_global_1", "__tern_global_2", "pub"]);
        assert!(out.globals[0].mutable && !out.globals[1].mutable);
        assert_eq!(out.globals[1].ty, ValType::I64);
        let exports = exports_of(&out.wasm);
        assert!(exports.contains(&("__tern_global_1".into(), ExternalKind::Global, 1)));
        assert!(exports.contains(&("f".into(), ExternalKind::Func, 0)));
        assert_eq!(exports.len(), 5);
        assert!(out.mutable_tables.is_none());
        assert_eq!(out.digest.len(), 64);
        assert_eq!(out.initialized_pages, Some(BTreeSet::from([0])));
    }

    #[test]
    fn a_module_without_exports_gets_an_export_section_in_order() {
        let out =
            instrument(b"(module (global (mut i32) (i32.const 0)) (func) (start 0))").unwrap();
        wasmparser::validate(&out.wasm).expect("valid");
        assert_eq!(
            exports_of(&out.wasm),
            [("__tern_global_0".into(), ExternalKind::Global, 0)]
        );
        assert_eq!(
            out.initialized_pages, None,
            "a start function may write anywhere"
        );
        let data = instrument(
            br#"(module (memory 4) (data (i32.const 65530) "0123456789") (data (i32.const 196608) ""))"#,
        )
        .unwrap();
        assert_eq!(data.initialized_pages, Some(BTreeSet::from([0, 1])));
    }

    #[test]
    fn table_writes_are_found() {
        let wat = r#"(module (table 1 funcref) (func)
            (func (table.set 0 (i32.const 0) (ref.null func))))"#;
        let out = instrument(wat.as_bytes()).unwrap();
        assert_eq!(
            out.mutable_tables.as_deref(),
            Some("function 1 uses `table.set`")
        );
    }

    #[test]
    fn garbage_is_a_module_error() {
        assert!(matches!(
            instrument(b"\0asm\x01\0\0\0\x07\xff"),
            Err(ActorError::Module(_))
        ));
        assert!(matches!(
            instrument(b"(component)"),
            Err(ActorError::Module(_))
        ));
    }

    #[test]
    fn modules_without_one_32_bit_memory_are_left_untracked() {
        for wat in [
            "(module (func (export \"f\")))",
            "(module (memory 1) (memory 1) (func (i32.store (i32.const 0) (i32.const 1))))",
            "(module (memory i64 1) (func (i32.store (i64.const 0) (i32.const 1))))",
            "(module (memory 1 1 shared) (func (i32.store (i32.const 0) (i32.const 1))))",
            "(module (memory 1 (pagesize 1)) (func (i32.store (i32.const 0) (i32.const 1))))",
        ] {
            let tracked = instrument_with(wat.as_bytes(), Writes::DirtyPages).unwrap();
            assert_eq!(tracked.dirty, None, "{wat}");
            assert_eq!(
                tracked.wasm,
                instrument(wat.as_bytes()).unwrap().wasm,
                "{wat}"
            );
        }
    }

    #[test]
    fn imports_indices_and_other_sections_are_kept() {
        let wat = r#"(module
            (import "env" "f" (func $f (param i32)))
            (import "env" "memory" (memory 2))
            (import "env" "g" (global i32))
            (table 1 funcref)
            (global $sp (mut i32) (i32.const 64))
            (elem (i32.const 0) $write)
            (data $d "tern")
            (func $write (export "__tern_dirty") (param i32)
              (call $f (local.get 0))
              (memory.init $d (local.get 0) (i32.const 0) (i32.const 4)))
            (func $start (i32.store (global.get $sp) (i32.const 1)))
            (start $start))"#;
        let out = instrument_with(wat.as_bytes(), Writes::DirtyPages).unwrap();
        wasmparser::validate(&out.wasm).expect("valid");
        let plain = instrument(wat.as_bytes()).unwrap();
        assert_eq!(out.globals, plain.globals);
        assert_eq!(out.initialized_pages, None, "a start function");
        assert_eq!(out.mutable_tables, None);
        let export = "__tern_dirty_".to_string();
        assert_eq!(
            out.dirty,
            Some(DirtyMap {
                export: export.clone()
            })
        );
        let found = exports_of(&out.wasm);
        assert!(found.contains(&(export, ExternalKind::Memory, 1)));
        assert!(found.contains(&("__tern_dirty".into(), ExternalKind::Func, 1)));

        let engine = wasmtime::Engine::default();
        let mut store = wasmtime::Store::new(&engine, ());
        let memory = wasmtime::Memory::new(&mut store, wasmtime::MemoryType::new(2, None)).unwrap();
        let f = wasmtime::Func::wrap(&mut store, |_: i32| {});
        let g = wasmtime::Global::new(
            &mut store,
            wasmtime::GlobalType::new(wasmtime::ValType::I32, wasmtime::Mutability::Const),
            wasmtime::Val::I32(0),
        )
        .unwrap();
        let module = wasmtime::Module::new(&engine, &out.wasm).unwrap();
        let imports = [f.into(), memory.into(), g.into()];
        let instance = wasmtime::Instance::new(&mut store, &module, &imports).unwrap();
        let map = instance.get_memory(&mut store, "__tern_dirty_").unwrap();
        assert_eq!(
            crate::dirty::marked_pages(map.data(&store), 2),
            [0],
            "the start function's store"
        );
        map.data_mut(&mut store).fill(0);
        let write = instance.get_func(&mut store, "__tern_dirty").unwrap();
        write
            .call(&mut store, &[wasmtime::Val::I32(65535)], &mut [])
            .unwrap();
        assert_eq!(crate::dirty::marked_pages(map.data(&store), 2), [0, 1]);
        assert_eq!(&memory.data(&store)[65535..][..4], b"tern");
    }

    #[test]
    fn a_module_with_only_a_memory_gets_every_section_it_needs() {
        let out = instrument_with(b"(module (memory 1))", Writes::DirtyPages).unwrap();
        wasmparser::validate(&out.wasm).expect("valid");
        let engine = wasmtime::Engine::default();
        let mut store = wasmtime::Store::new(&engine, ());
        let module = wasmtime::Module::new(&engine, &out.wasm).unwrap();
        let instance = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
        assert!(instance.get_memory(&mut store, DIRTY_EXPORT).is_some());
    }

    /// A module with every kind of section and write the tracking rewrite touches, to mutate.
    const SEED: &str = r#"(module
        (import "env" "f" (func $f (param i32)))
        (memory (export "memory") 1 4)
        (table 2 funcref)
        (global $sp (mut i32) (i32.const 4096))
        (elem (i32.const 0) $a $a)
        (data $d "tern")
        (func $a (export "a") (param i32 i64) (local f32)
          (i64.store offset=8 (local.get 0) (local.get 1))
          (v128.store (local.get 0) (v128.const i64x2 1 2))
          (memory.fill (local.get 0) (i32.const 1) (i32.const 9))
          (memory.init $d (local.get 0) (i32.const 0) (i32.const 4))
          (call $f (i32.load8_u (global.get $sp)))))"#;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 2000,
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// Whatever the bytes, tracking never panics; it keeps a valid module valid and
        /// refuses an invalid one (which its additions could otherwise make valid).
        #[test]
        fn tracking_keeps_valid_modules_valid_and_refuses_invalid_ones(
            edits in proptest::collection::vec(
                (proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>()),
                1..4,
            ),
        ) {
            let mut wasm = wat::parse_str(SEED).unwrap();
            for (at, byte) in &edits {
                let i = at.index(wasm.len());
                wasm[i] = *byte;
            }
            let valid = Validator::new_with_features(WasmFeatures::all()).validate_all(&wasm);
            match (valid, instrument_with(&wasm, Writes::DirtyPages)) {
                (Ok(_), Ok(out)) => {
                    Validator::new_with_features(WasmFeatures::all())
                        .validate_all(&out.wasm)
                        .expect("a valid module stays valid");
                }
                (Ok(_), Err(e)) => panic!("a valid module was refused: {e}"),
                (Err(_), Ok(_)) => panic!("an invalid module was rewritten"),
                (Err(_), Err(_)) => {}
            }
        }
    }
}
