//! Builds the example actors in `guests/` to wasm32 so `tern run <name>` can find them.
//!
//! The guests are a workspace of their own (they target wasm32-unknown-unknown); this runs
//! the same cargo on it with its own target directory, then tells the binary where the
//! `.wasm` files are.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir
        .parent()
        .and_then(|p| p.parent())
        .unwrap()
        .to_path_buf();
    let guests = root.join("guests");
    let target_dir = root.join("target").join("guests");
    for dir in [
        "guests/Cargo.toml",
        "guests/.cargo/config.toml",
        "guests/Cargo.lock",
        "guests/matmul",
        "guests/chat",
        "guests/bench",
        "guest/src",
        "guest/Cargo.toml",
    ] {
        watch(&root.join(dir));
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guests)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-unknown-unknown",
            "--target-dir",
        ])
        .arg(&target_dir);
    // The outer build's settings are for the host; the guests get their own.
    let host_only = [
        "RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CLIPPY_ARGS",
    ];
    for (key, _) in std::env::vars() {
        if key.starts_with("CARGO_") && key != "CARGO_HOME" || host_only.contains(&key.as_str()) {
            cmd.env_remove(key);
        }
    }
    let status = cmd.status().expect("cannot run cargo to build the guests");
    if !status.success() {
        panic!(
            "building the guests failed (cargo's output is above); scripts/setup.sh installs \
             the wasm32-unknown-unknown target they need"
        );
    }
    let out = target_dir.join("wasm32-unknown-unknown").join("release");
    println!("cargo:rustc-env=TERN_GUEST_DIR={}", out.display());
}

/// Asks cargo to rerun this script when `path` changes: a file, or every file under a
/// folder (cargo may not look inside a folder whose own entries did not change).
fn watch(path: &std::path::Path) {
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_name() != "target" {
                watch(&entry.path());
            }
        }
    }
    println!("cargo:rerun-if-changed={}", path.display());
}
