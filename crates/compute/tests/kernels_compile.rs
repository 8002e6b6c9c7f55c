//! Every CUDA kernel file of the workspace compiles for sm_90 (the H100) with NVRTC, exactly
//! as the CUDA backends compile them at run time. NVRTC needs no GPU, so this runs on every
//! machine where `libnvrtc` loads (`scripts/nvrtc.sh` fetches it and puts it on
//! `LD_LIBRARY_PATH`); elsewhere it reports itself skipped, unless `TERN_REQUIRE_NVRTC=1`,
//! which makes a missing library a failure.
#![cfg(feature = "cuda")]

use std::path::{Path, PathBuf};
use std::time::Instant;

use tern_compute::cuda::{compile_cubin, cudarc};

/// The architecture the kernels must build for.
const ARCH: u32 = 90;

/// Folders holding kernel sources, relative to this crate.
const KERNEL_DIRS: [&str; 2] = ["kernels", "../model/src/llama/cuda/kernels"];

/// Every file with extension `ext` in `dir`, sorted.
fn files_in(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("kernel folder {}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("reading a kernel folder").path())
        .filter(|path| path.extension().is_some_and(|x| x == ext))
        .collect();
    files.sort();
    files
}

/// The `*.cuh` headers in `dir` as (name, source) pairs, sorted.
fn headers_in(dir: &Path) -> Vec<(String, String)> {
    files_in(dir, "cuh")
        .iter()
        .map(|h| {
            let name = h.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let source = std::fs::read_to_string(h)
                .unwrap_or_else(|e| panic!("reading {}: {e}", h.display()));
            (name.to_owned(), source)
        })
        .collect()
}

/// Every `*.cu` file in `KERNEL_DIRS`, sorted, with the `*.cuh` headers of its folder as
/// (name, source) pairs: what its `#include` lines may name, as at run time.
fn kernel_files() -> Vec<(PathBuf, Vec<(String, String)>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in KERNEL_DIRS {
        let dir = root.join(dir);
        let headers = headers_in(&dir);
        for path in files_in(&dir, "cu") {
            files.push((path, headers.clone()));
        }
    }
    files
}

/// Whether the test may run: libnvrtc loads. Prints why not otherwise, or panics when
/// `TERN_REQUIRE_NVRTC=1`.
fn nvrtc_or_skip(test: &str) -> bool {
    // SAFETY: only tries to dlopen the library under its candidate names; nothing is called.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return true;
    }
    let why = "libnvrtc could not be loaded (run `source scripts/nvrtc.sh` to fetch it)";
    if std::env::var_os("TERN_REQUIRE_NVRTC").is_some_and(|v| v == "1") {
        panic!("{test}: TERN_REQUIRE_NVRTC=1 but {why}");
    }
    // Past the harness's capture, so that the skip shows in every run.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{test}: skipped: {why}");
    false
}

#[test]
fn every_kernel_file_compiles_for_sm_90() {
    if !nvrtc_or_skip("every_kernel_file_compiles_for_sm_90") {
        return;
    }
    let files = kernel_files();
    assert!(
        files.iter().any(|(f, _)| f.ends_with("kernels/matmul.cu")),
        "no kernel sources found under {KERNEL_DIRS:?}"
    );
    let mut failures = Vec::new();
    for (path, headers) in &files {
        let source = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("kernel.cu");
        // compile_cubin names its file for the life of the program, as the kernels it
        // compiles at run time do.
        let name: &'static str = Box::leak(name.to_owned().into_boxed_str());
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, h)| (n.as_str(), h.as_str()))
            .collect();
        // Files whose folder's headers switch on a build flag compile both ways.
        let mut variants = vec![(String::new(), source.clone())];
        for flag in FLAGS {
            if headers.iter().any(|(_, h)| h.contains(flag)) {
                variants.push((format!(" with {flag}"), format!("#define {flag}\n{source}")));
            }
        }
        for (variant, source) in &variants {
            compile_one(path, variant, name, source, &headers, &mut failures);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The probes (`scripts/probes`, built with nvcc on the GPU machine alone) that include the
/// model's kernel headers: their device code, which NVRTC compiles without their host code
/// (`__CUDACC_RTC__`), so that a change to a header the probes call cannot leave them
/// unbuildable unnoticed.
const PROBES: [&str; 4] = [
    "decode-persistent.cu",
    "matvec-q8.cu",
    "matvec-rows.cu",
    "mma-one.cu",
];

#[test]
fn the_probes_device_code_compiles_against_the_kernel_headers() {
    if !nvrtc_or_skip("the_probes_device_code_compiles_against_the_kernel_headers") {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let probes = root.join("../../scripts/probes");
    let mut headers = headers_in(&root.join(KERNEL_DIRS[1]));
    headers.extend(headers_in(&probes));
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(n, h)| (n.as_str(), h.as_str()))
        .collect();
    let mut failures = Vec::new();
    for probe in PROBES {
        let path = probes.join(probe);
        let source = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        compile_one(&path, "", probe, &source, &headers, &mut failures);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The flags the model's kernels are also compiled with at run time (`TERN_KV_F16`: a
/// half-precision KV cache).
const FLAGS: [&str; 1] = ["TERN_KV_F16"];

/// Compiles one program, printing its size or adding why it failed to `failures`.
fn compile_one(
    path: &Path,
    variant: &str,
    name: &'static str,
    source: &str,
    headers: &[(&str, &str)],
    failures: &mut Vec<String>,
) {
    let started = Instant::now();
    match compile_cubin(name, source, headers, ARCH) {
        Ok(cubin) if cubin.starts_with(b"\x7fELF") => println!(
            "{}{variant}: {} bytes of sm_{ARCH} code in {:.1?}",
            path.display(),
            cubin.len(),
            started.elapsed()
        ),
        Ok(cubin) => failures.push(format!(
            "{}{variant}: NVRTC returned {} bytes that are not an ELF CUBIN",
            path.display(),
            cubin.len()
        )),
        Err(e) => failures.push(format!("{}{variant}: {e}", path.display())),
    }
}
