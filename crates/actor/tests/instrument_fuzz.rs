//! The load-time instrumentation reads untrusted modules: whatever the bytes, it returns a
//! module or an error, never panics, and what it returns is a valid module that still
//! exports what the original did.

use proptest::prelude::*;
use tern_actor::instrument::instrument;

/// A small valid module with internal globals, a table, data and exports to mutate.
fn seed() -> Vec<u8> {
    wat::parse_str(
        r#"(module
          (import "tern" "emit" (func $emit (param i32 i32) (result i32)))
          (memory (export "memory") 1 4)
          (table 2 funcref)
          (global $sp (mut i32) (i32.const 4096))
          (global $k i64 (i64.const 3))
          (global $v (mut v128) (v128.const i32x4 1 2 3 4))
          (elem (i32.const 0) $f $f)
          (data (i32.const 64) "tern")
          (func $f (export "tern_alloc") (param i32) (result i32) (global.get $sp))
          (func (export "tern_on_message") (param i32 i32) (result i32)
            (drop (call $emit (local.get 0) (local.get 1)))
            (call_indirect (param i32) (result i32) (i32.const 1) (i32.const 0))))"#,
    )
    .unwrap()
}

fn exports(wasm: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        if let Ok(wasmparser::Payload::ExportSection(s)) = payload {
            out.extend(
                s.into_iter()
                    .filter_map(Result::ok)
                    .map(|e| e.name.to_string()),
            );
        }
    }
    out
}

fn check(bytes: &[u8]) {
    if let Ok(out) = instrument(bytes)
        && wasmparser::validate(bytes).is_ok()
    {
        wasmparser::validate(&out.wasm).expect("a valid module stays valid");
        let before = exports(bytes);
        let after = exports(&out.wasm);
        assert!(
            before.iter().all(|e| after.contains(e)),
            "an export was lost"
        );
    }
}

#[test]
fn the_seed_module_is_instrumented() {
    let out = instrument(&seed()).unwrap();
    wasmparser::validate(&out.wasm).unwrap();
    assert_eq!(out.globals.len(), 3);
    assert!(out.mutable_tables.is_none());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 5000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        check(&bytes);
        let mut with_header = b"\0asm\x01\0\0\0".to_vec();
        with_header.extend(&bytes);
        check(&with_header);
    }

    #[test]
    fn mutated_modules_never_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut wasm = seed();
        for (at, byte) in &edits {
            let i = at.index(wasm.len());
            wasm[i] = *byte;
        }
        check(&wasm);
        let keep = cut.index(wasm.len());
        check(&wasm[..keep]);
    }
}
