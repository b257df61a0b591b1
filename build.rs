//! Compiles bpf/ktproxy.bpf.c with clang and generates its libbpf-rs skeleton.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use libbpf_cargo::SkeletonBuilder;

const SRC: &str = "bpf/ktproxy.bpf.c";

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let mut clang_args: Vec<OsString> = vec!["-Wall".into(), "-Werror".into()];
    // <linux/bpf.h> includes <asm/types.h>, which Debian and Ubuntu keep in the
    // multiarch directory that clang does not search for -target bpf.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = Path::new("/usr/include").join(format!("{arch}-linux-gnu"));
    if multiarch.is_dir() {
        clang_args.push("-I".into());
        clang_args.push(multiarch.into_os_string());
    }
    if let Err(e) = SkeletonBuilder::new()
        .source(SRC)
        .clang_args(clang_args)
        .build_and_generate(out_dir.join("ktproxy.skel.rs"))
    {
        // Debug output shows the whole chain, including clang's diagnostics.
        panic!("building {SRC}: {e:?}\n(needs clang and the Linux UAPI headers: scripts/deps.sh installs them)");
    }
    println!("cargo:rerun-if-changed={SRC}");
}
