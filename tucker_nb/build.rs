//! Embeds the venv's libtorch folder as the binaries' RUNPATH, so `cargo run`, `cargo test` and
//! `target/*/tucker-nb` find libtorch without LD_LIBRARY_PATH (which still wins when set, as on
//! machines where the binary is copied next to another torch install).

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        let lib = std::path::Path::new(&libtorch).join("lib");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}
