//! Stand-alone `kiln-img` (same as `kiln img`), used by the interop tests and benchmarks.

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    std::process::exit(kiln_img::main(&args));
}
