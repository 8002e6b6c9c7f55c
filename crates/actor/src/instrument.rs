//! Load-time instrumentation that makes an actor's whole state reachable for snapshots.
//!
//! Wasmtime lets the host read and write only *exported* globals, but a compiled guest keeps
//! state in internal ones (`__stack_pointer`, a heap base). As Wizer does, the module is
//! rewritten at load so that every global it defines is exported: an already exported global
//! keeps its name, every other one gets the reserved name `__tern_global_<index>`. Nothing else
//! changes; every other section is copied byte for byte.
//!
//! The same pass records whether the guest can change a table after instantiation
//! (`table.set`, `table.grow`, `table.fill`, `table.copy`, `table.init`, `elem.drop`): such
//! tables are state a snapshot cannot capture, so snapshots of that module are refused.

use std::collections::BTreeSet;

use sha2::{Digest, Sha256};
use wasmparser::{DataKind, ExternalKind, Operator, Parser, Payload, TypeRef, ValType};

use crate::ActorError;

/// The prefix of the export names given to internal globals.
pub const GLOBAL_EXPORT_PREFIX: &str = "__tern_global_";

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

/// Rewrites `wasm` (binary or text) so that every defined global is exported.
pub fn instrument(wasm: &[u8]) -> Result<Instrumented, ActorError> {
    let binary = wat::parse_bytes(wasm).map_err(invalid)?;
    let binary: &[u8] = &binary;
    let mut imported_globals = 0u32;
    let mut globals = Vec::new();
    let mut exports: Vec<(String, u8, u32)> = Vec::new();
    let mut mutable_tables = None;
    let mut function = 0u32;
    let mut initialized_pages = Some(BTreeSet::new());
    for payload in Parser::new(0).parse_all(binary) {
        match payload.map_err(invalid)? {
            Payload::Version { encoding, .. } if encoding != wasmparser::Encoding::Module => {
                return Err(invalid("components are not supported; give a core module"));
            }
            Payload::ImportSection(imports) => {
                for import in imports.into_imports() {
                    if matches!(import.map_err(invalid)?.ty, TypeRef::Global(_)) {
                        imported_globals += 1;
                    }
                }
            }
            Payload::GlobalSection(section) => {
                for global in section {
                    let ty = global.map_err(invalid)?.ty;
                    globals.push(GlobalSlot {
                        export: String::new(),
                        ty: ty.content_type,
                        mutable: ty.mutable,
                    });
                }
            }
            Payload::ExportSection(section) => {
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
                    exports.push((export.name.to_string(), kind, export.index));
                }
            }
            Payload::StartSection { .. } => initialized_pages = None,
            Payload::DataSection(section) => {
                for data in section {
                    let data = data.map_err(invalid)?;
                    if let DataKind::Active { offset_expr, .. } = data.kind {
                        let start = const_offset(&offset_expr).map_err(invalid)?;
                        match (start, initialized_pages.as_mut()) {
                            (Some(start), Some(pages)) if !data.data.is_empty() => {
                                let end = start + data.data.len() as u64 - 1;
                                pages.extend(start / PAGE..=end / PAGE);
                            }
                            (None, _) => initialized_pages = None,
                            _ => {}
                        }
                    }
                }
            }
            Payload::CodeSectionEntry(body) => {
                if mutable_tables.is_none() {
                    mutable_tables = table_writer(&body)
                        .map_err(invalid)?
                        .map(|op| format!("function {function} uses `{op}`"));
                }
                function += 1;
            }
            _ => {}
        }
    }
    for (index, slot) in globals.iter_mut().enumerate() {
        let index = imported_globals + index as u32;
        if let Some((name, _, _)) = exports.iter().find(|(_, k, i)| *k == 3 && *i == index) {
            slot.export = name.clone();
            continue;
        }
        let mut name = format!("{GLOBAL_EXPORT_PREFIX}{index}");
        while exports.iter().any(|(taken, _, _)| *taken == name) {
            name.push('_');
        }
        slot.export = name.clone();
        exports.push((name, 3, index));
    }
    Ok(Instrumented {
        wasm: rewrite(binary, &exports)?,
        digest: hex(&Sha256::digest(binary)),
        globals,
        mutable_tables,
        initialized_pages,
    })
}

const PAGE: u64 = 65536;

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

/// Section ids that must come after the export section.
const AFTER_EXPORTS: [u8; 5] = [8, 9, 10, 11, 12];
const EXPORT_SECTION: u8 = 7;

/// Copies every section of `binary` but the export section, which becomes `exports`.
fn rewrite(binary: &[u8], exports: &[(String, u8, u32)]) -> Result<Vec<u8>, ActorError> {
    let mut out = binary
        .get(..8)
        .ok_or_else(|| invalid("the module has no header"))?
        .to_vec();
    let mut section = Vec::new();
    leb(&mut section, exports.len() as u64);
    for (name, kind, index) in exports {
        leb(&mut section, name.len() as u64);
        section.extend_from_slice(name.as_bytes());
        section.push(*kind);
        leb(&mut section, u64::from(*index));
    }
    let mut written = false;
    for payload in Parser::new(0).parse_all(binary) {
        let Some((id, range)) = payload.map_err(invalid)?.as_section() else {
            continue;
        };
        if !written && (id == EXPORT_SECTION || AFTER_EXPORTS.contains(&id)) {
            put_section(&mut out, EXPORT_SECTION, &section);
            written = true;
        }
        if id != EXPORT_SECTION {
            put_section(&mut out, id, &binary[range]);
        }
    }
    if !written {
        put_section(&mut out, EXPORT_SECTION, &section);
    }
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
}
