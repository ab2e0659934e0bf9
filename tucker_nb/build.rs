//! Embeds the venv's libtorch folder as the binaries' RUNPATH, so `cargo run`, `cargo test` and
//! `target/*/tucker-nb` find libtorch without LD_LIBRARY_PATH (which still wins when set, as on
//! machines where the binary is copied next to another torch install); and records the `image`
//! crate's version from the workspace's Cargo.lock, which the decoded-image cache key includes.

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        let lib = std::path::Path::new(&libtorch).join("lib");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
    let lock = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock");
    println!("cargo:rerun-if-changed={}", lock.display());
    let version = std::fs::read_to_string(&lock)
        .ok()
        .and_then(|text| {
            let at = text.find("\nname = \"image\"\n")?;
            let rest = &text[at..];
            let line = rest.lines().find(|l| l.starts_with("version = "))?;
            Some(
                line.trim_start_matches("version = ")
                    .trim_matches('"')
                    .to_string(),
            )
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=TUCKER_NB_IMAGE_DECODER=image-{version}");
}
