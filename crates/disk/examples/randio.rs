//! Random 4 KiB reads and writes through the `BlockDevice` trait, for the benchmark in
//! bench/img: `randio IMAGE SECONDS` prints "read_iops write_iops". The image is read once
//! in full first so that qcow2 metadata is cached (and its clusters allocated by writes).

// Test code works on small, known sizes; truncating casts are intended there.
#![allow(clippy::cast_possible_truncation)]

use std::path::Path;
use std::time::{Duration, Instant};

use kiln_disk::{open, OpenOptions};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: randio IMAGE SECONDS");
        std::process::exit(2);
    }
    let secs: f64 = args[2].parse().unwrap_or(5.0);
    let dev = match open(Path::new(&args[1]), &OpenOptions::default()) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("randio: {e}");
            std::process::exit(1);
        }
    };
    let size = dev.size();
    let blocks = size / 4096;
    let mut buf = vec![0u8; 1 << 20];
    // Warm up: touch all metadata (and page cache) once.
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        dev.read_at(off, &mut buf[..n]).expect("read");
        off += n as u64;
    }
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut block = vec![0u8; 4096];
    let run = |f: &mut dyn FnMut()| {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_secs_f64(secs) {
            for _ in 0..256 {
                f();
            }
            n += 256;
        }
        n as f64 / start.elapsed().as_secs_f64()
    };
    let r = run(&mut || {
        let b = next() % blocks;
        dev.read_at(b * 4096, &mut block).expect("read");
    });
    let data = vec![0x5au8; 4096];
    let w = run(&mut || {
        let b = next() % blocks;
        dev.write_at(b * 4096, &data).expect("write");
    });
    dev.flush().expect("flush");
    println!("{r:.0} {w:.0}");
}
