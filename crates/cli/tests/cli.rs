//! The `tern` binary end to end: the main job, and clear errors for bad input.

use std::process::Command;

fn tern(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .output()
        .expect("tern runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("panicked"), "tern panicked: {text}");
    (out.status.success(), text)
}

#[test]
fn the_matmul_actor_reports_zero_errors_and_pointer_identity() {
    let (ok, text) = tern(&["run", "matmul", "--device", "cpu"]);
    assert!(ok, "{text}");
    assert!(text.contains("matmul 128x128: 0 errors of 16384"), "{text}");
    assert!(text.contains("device: cpu"), "{text}");
    assert!(text.contains("== host pointer (zero-copy)"), "{text}");
}

#[test]
fn auto_picks_a_device_that_works() {
    let (ok, text) = tern(&["run", "matmul"]);
    assert!(ok, "{text}");
    assert!(text.contains("0 errors of 16384"), "{text}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let cases: &[(&[&str], &str)] = &[
        (&["run", "no-such-guest"], "no bundled guest"),
        (
            &["run", "matmul", "--device", "tpu"],
            "unknown device `tpu`",
        ),
        (&["run", "Cargo.toml"], "invalid module"),
        (&["run", "matmul", "--memory-mib", "0"], "cap"),
        (&["bench", "zero-copy", "--device", "gpu"], "unknown device"),
    ];
    for (args, words) in cases {
        let (ok, text) = tern(args);
        assert!(!ok, "{args:?} succeeded: {text}");
        assert!(text.contains(words), "{args:?}: `{text}` lacks `{words}`");
    }
}

#[test]
fn cuda_without_a_gpu_says_so() {
    let (ok, text) = tern(&["run", "matmul", "--device", "cuda"]);
    if ok {
        assert!(text.contains("device: cuda"), "{text}");
    } else {
        assert!(
            text.contains("no CUDA device") || text.contains("no CUDA support"),
            "{text}"
        );
    }
}
