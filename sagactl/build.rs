//! Builds the library that runs a chaos process with its wall clock off
//! (`clock-shift/clock_shift.c`, preloaded by `sagactl chaos --clock-skew`), with the C
//! compiler Rust links with, and leaves it in OUT_DIR for `include_bytes!`.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let source = "clock-shift/clock_shift.c";
    println!("cargo:rerun-if-changed={source}");
    println!("cargo:rerun-if-env-changed=CC");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let library = out_dir.join("libclock_shift.so");
    let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&compiler)
        .args([
            "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-o",
        ])
        .arg(&library)
        .arg(source)
        .arg("-ldl")
        .status()
        .unwrap_or_else(|error| panic!("{compiler} (building {source}): {error}"));
    assert!(
        status.success(),
        "{compiler} failed building {source}: {status}"
    );
}
