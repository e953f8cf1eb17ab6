//! The `kiln` command line.

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "img") {
        std::process::exit(kiln_img::main(&args[2..]));
    }
}
