//! Compressed clusters: descriptors, deflate (qemu's "zlib": raw deflate, 4 KiB window) and
//! zstd.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::header::CompressionType;
use super::Qcow2Error;

/// Splits a compressed L2 entry into (host offset, bytes to read).
pub(crate) fn descriptor(entry: u64, cluster_bits: u32) -> (u64, u64) {
    let x = 62 - (cluster_bits - 8);
    let off = entry & ((1u64 << x) - 1);
    let nsect = (entry >> x) & ((1u64 << (cluster_bits - 8)) - 1);
    let csize = (nsect + 1) * 512 - (off & 511);
    (off, csize)
}

/// Builds a compressed L2 entry for `len` bytes at host `off`.
pub(crate) fn make_descriptor(off: u64, len: u64, cluster_bits: u32) -> u64 {
    let x = 62 - (cluster_bits - 8);
    let nsect = ((off & 511) + len).div_ceil(512) - 1;
    super::state::COMPRESSED | (nsect << x) | off
}

/// Compresses one cluster; `None` when the result would not be smaller than a cluster.
pub(crate) fn compress(ty: CompressionType, input: &[u8]) -> Result<Option<Vec<u8>>, Qcow2Error> {
    let limit = input.len() - 1;
    match ty {
        CompressionType::Deflate => {
            // qemu inflates with a 4 KiB window (windowBits -12), so compress with one.
            let mut c = Compress::new_with_window_bits(Compression::default(), false, 12);
            let mut out = vec![0u8; limit];
            match c.compress(input, &mut out, FlushCompress::Finish) {
                Ok(Status::StreamEnd) => {
                    let n = usize::try_from(c.total_out()).unwrap_or(limit);
                    out.truncate(n);
                    Ok(Some(out))
                }
                Ok(_) => Ok(None),
                Err(e) => Err(Qcow2Error::Compress(e.to_string())),
            }
        }
        CompressionType::Zstd => {
            let out =
                zstd::bulk::compress(input, 3).map_err(|e| Qcow2Error::Compress(e.to_string()))?;
            Ok((out.len() < limit).then_some(out))
        }
    }
}

/// Decompresses into `out` (exactly one cluster). Input may carry trailing bytes of the next
/// compressed cluster; decompression stops when `out` is full.
pub(crate) fn decompress(ty: CompressionType, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match ty {
        CompressionType::Deflate => {
            let mut d = Decompress::new_with_window_bits(false, 15);
            match d.decompress(input, out, FlushDecompress::Finish) {
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
            let n = usize::try_from(d.total_out()).unwrap_or(0);
            if n != out.len() {
                return Err(format!("inflated to {n} bytes, expected {}", out.len()));
            }
            Ok(())
        }
        CompressionType::Zstd => {
            use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
            let mut dec = Decoder::new().map_err(|e| e.to_string())?;
            let mut inb = InBuffer::around(input);
            let mut outb = OutBuffer::around(out);
            // Each call makes progress or reports an error; bound the loop anyway.
            for _ in 0..(input.len() + 16) {
                if outb.pos() == outb.capacity() {
                    return Ok(());
                }
                let before = (inb.pos(), outb.pos());
                let hint = dec.run(&mut inb, &mut outb).map_err(|e| e.to_string())?;
                if (inb.pos(), outb.pos()) == before || (hint == 0 && inb.pos() == input.len()) {
                    break;
                }
            }
            if outb.pos() == outb.capacity() {
                Ok(())
            } else {
                Err(format!(
                    "zstd produced {} bytes, expected {}",
                    outb.pos(),
                    outb.capacity()
                ))
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        (0..65536u32)
            .map(|i| ((i * 7) % 251) as u8 & if i % 3 == 0 { 0 } else { 0xff })
            .collect()
    }

    #[test]
    fn deflate_and_zstd_round_trip_with_trailing_garbage() {
        for ty in [CompressionType::Deflate, CompressionType::Zstd] {
            let data = sample();
            let mut comp = compress(ty, &data).unwrap().unwrap();
            comp.extend_from_slice(&[0xaa; 700]);
            let mut out = vec![0u8; data.len()];
            decompress(ty, &comp, &mut out).unwrap();
            assert_eq!(out, data);
        }
    }

    #[test]
    fn incompressible_data_is_refused() {
        let mut x = 0x1234_5678u32;
        let data: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        assert!(compress(CompressionType::Deflate, &data).unwrap().is_none());
    }

    #[test]
    fn descriptor_round_trips() {
        for bits in 9..=21 {
            let e = make_descriptor(0x12_3456_7a00 + 17, 1000, bits);
            let (off, csize) = descriptor(e, bits);
            assert_eq!(off, 0x12_3456_7a00 + 17);
            assert!((1000..1000 + 512).contains(&csize));
        }
    }

    #[test]
    fn garbage_input_is_an_error_not_a_panic() {
        let mut out = vec![0u8; 65536];
        assert!(decompress(CompressionType::Deflate, &[0xff; 100], &mut out).is_err());
        assert!(decompress(CompressionType::Zstd, &[0xff; 100], &mut out).is_err());
    }
}
