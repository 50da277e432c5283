//! Builds the BPF programs in `tracer-ebpf` with the nightly toolchain and
//! bpf-linker, and leaves the object in `OUT_DIR/stalltrace`.

use std::path::Path;

fn main() -> anyhow::Result<()> {
    let root_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tracer-ebpf");
    let root_dir = root_dir.to_str().expect("tracer-ebpf path is UTF-8");
    let package = aya_build::Package {
        name: "tracer-ebpf",
        root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default()).map_err(|error| {
        anyhow::anyhow!(
            "building the BPF programs failed: {error:#}. Build through `cargo xtask build`, which installs rust-src and bpf-linker first"
        )
    })
}
