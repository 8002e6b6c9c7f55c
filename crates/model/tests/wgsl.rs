//! Every WGSL module of the wgpu backend, validated by naga and translated to Metal's shading
//! language, as wgpu does before it hands a kernel to the driver. No GPU is needed: a kernel
//! that Metal (or any backend) would reject fails here.

use naga::back::msl;
use naga::valid::{Capabilities, ValidationFlags, Validator};
use tern_model::llama::wgpu::shaders;

fn validate(name: &str, src: &str) -> (naga::Module, naga::valid::ModuleInfo) {
    let module = naga::front::wgsl::parse_str(src)
        .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(src)));
    let caps = Capabilities::SUBGROUP | Capabilities::SHADER_FLOAT16_IN_FLOAT32;
    let info = Validator::new(ValidationFlags::all(), caps)
        .validate(&module)
        .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(src)));
    (module, info)
}

#[test]
fn every_kernel_validates_and_translates_to_msl() {
    let modules = shaders::all();
    // matvec for two row reductions and each token capacity, get_rows once per weight type,
    // the rest, and the attention's splits over an f16 cache.
    let types = tern_model::quant::DType::ALL.len();
    let matvecs = 2 * shaders::MATVEC_TOKENS.len();
    assert_eq!(
        modules.len(),
        (matvecs + 1) * types + shaders::PLAIN.len() + 1
    );
    for (name, entry, src) in &modules {
        let (module, info) = validate(name, src);
        assert!(
            module.entry_points.iter().any(|e| e.name == *entry),
            "{name}: no entry point `{entry}`"
        );
        let options = msl::Options {
            lang_version: (2, 4),
            ..Default::default()
        };
        let pipeline = msl::PipelineOptions::default();
        let (msl, _) = msl::write_string(&module, &info, &options, &pipeline)
            .unwrap_or_else(|e| panic!("{name}: MSL translation failed: {e}"));
        assert!(msl.contains("kernel void"), "{name}: no kernel in the MSL");
    }
}

#[test]
fn a_kernel_with_a_type_error_is_rejected() {
    let src = "@compute @workgroup_size(64) fn k() { let x: u32 = 1.5; }";
    assert!(naga::front::wgsl::parse_str(src).is_err());
}
