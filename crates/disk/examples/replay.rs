//! Replays untrusted images through the fuzz target's workload without libFuzzer:
//! `replay FILE...` runs `kiln_disk::testing::exercise_image` on a scratch copy of each file
//! and prints how long it took (for reproducing what the fuzzer or tests/hostile.rs found).

use std::time::Instant;

fn main() {
    let scratch = std::env::temp_dir().join(format!("kiln-replay-{}.qcow2", std::process::id()));
    for f in std::env::args().skip(1) {
        let bytes = match std::fs::read(&f) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("replay: {f}: {e}");
                std::process::exit(1);
            }
        };
        if let Err(e) = std::fs::write(&scratch, &bytes) {
            eprintln!("replay: {}: {e}", scratch.display());
            std::process::exit(1);
        }
        let start = Instant::now();
        kiln_disk::testing::exercise_image(&scratch);
        println!("{f}: {:.3} s", start.elapsed().as_secs_f64());
    }
    let _ = std::fs::remove_file(&scratch);
}
