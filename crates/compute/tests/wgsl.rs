//! The compute crate's WGSL kernels, validated by naga and translated to Metal's shading
//! language (no GPU needed).

use naga::back::msl;
use naga::valid::{Capabilities, ValidationFlags, Validator};

#[test]
fn matmul_kernel_validates_and_translates_to_msl() {
    validate_and_translate(include_str!("../kernels/matmul.wgsl"), "matmul_f32");
}

#[test]
fn read_kernel_validates_and_translates_to_msl() {
    validate_and_translate(include_str!("../kernels/read.wgsl"), "read_words");
}

fn validate_and_translate(src: &str, entry: &str) {
    let module =
        naga::front::wgsl::parse_str(src).unwrap_or_else(|e| panic!("{}", e.emit_to_string(src)));
    let info = Validator::new(ValidationFlags::all(), Capabilities::empty())
        .validate(&module)
        .unwrap_or_else(|e| panic!("{}", e.emit_to_string(src)));
    assert!(module.entry_points.iter().any(|e| e.name == entry));
    let options = msl::Options {
        lang_version: (2, 4),
        ..Default::default()
    };
    let (msl, _) = msl::write_string(&module, &info, &options, &Default::default()).unwrap();
    assert!(msl.contains("kernel void"));
}
