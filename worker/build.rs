//! With the `torch` feature: makes the binary find libtorch and keep libtorch_cuda.
fn main() {
    if std::env::var_os("CARGO_FEATURE_TORCH").is_none() {
        return;
    }
    // torch-sys (`links = "tch"`) exports the libtorch it linked against. An rpath to it lets
    // the binary start with no library path set.
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect(
        "torch-sys, a direct dependency with `links = \"tch\"`, exports DEP_TCH_LIBTORCH_LIB",
    );
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    // Nothing references libtorch_cuda's symbols directly, so `--as-needed` would drop it and
    // `--device cuda:N` would find no CUDA backend registered.
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
}
