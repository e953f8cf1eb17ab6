//! `kiln img`: the image tool, taking qemu-img's command lines.

use std::ffi::OsString;

/// Runs `kiln img` with the arguments that follow `img` and returns the process exit status.
pub fn main(args: &[OsString]) -> i32 {
    let _ = args;
    eprintln!("kiln img: not implemented yet");
    1
}
