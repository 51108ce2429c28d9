//! Only for `--features cuda`: give the binary an rpath to the GPU machine's CUDA libraries, since
//! candle links cudarc dynamically (libcuda, libcublas, libcurand, libcudart at start-up).
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!(
            "cargo:rustc-link-arg-bins=-Wl,-rpath,$ORIGIN:/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib"
        );
    }
}
