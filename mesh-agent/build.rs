//! Embeds the eBPF object built by `cargo xtask build-ebpf`. Without it (a plain stable
//! `cargo build`), an empty object is embedded and the agent says at start how to build it.
use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("mesh-ebpf.o");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let src = std::env::var_os("SOCKMESH_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/ebpf/bpfel-unknown-none/release/mesh-ebpf"));
    println!("cargo:rerun-if-env-changed=SOCKMESH_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", src.display());
    match std::fs::read(&src) {
        Ok(bytes) => std::fs::write(&out, bytes).unwrap(),
        Err(_) => {
            println!(
                "cargo:warning=eBPF object {} not found: the agent will refuse to start; run `cargo xtask build`",
                src.display()
            );
            std::fs::write(&out, b"").unwrap()
        }
    }
}
