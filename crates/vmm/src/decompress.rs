//! Host-side decompression of a bzImage's payload.
//!
//! A bzImage carries the kernel (`vmlinux`, an ELF file) compressed, plus a small
//! decompressor that runs in the guest before the kernel proper. kiln can instead unpack the
//! payload on the host, load the ELF directly and enter it through the Linux 64-bit entry:
//! the guest skips its decompressor, which saves real boot time on every host.
//!
//! The payload's last four bytes give its uncompressed size (appended by Linux's build);
//! that bounds the output, so a hostile image cannot make kiln allocate more than it says,
//! and it says at most [`MAX_VMLINUX`].

use std::io::Read;

/// Largest uncompressed kernel kiln will unpack.
pub const MAX_VMLINUX: usize = 1 << 30;

/// Compression formats Linux uses for bzImage payloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// gzip.
    Gzip,
    /// LZ4, legacy frame format.
    Lz4,
    /// zstd.
    Zstd,
    /// xz.
    Xz,
    /// bzip2 (not unpacked by kiln).
    Bzip2,
    /// lzma.
    Lzma,
    /// lzo (not unpacked by kiln).
    Lzo,
}

impl Format {
    /// Recognises a payload by its magic number.
    pub fn detect(data: &[u8]) -> Option<Format> {
        let starts = |m: &[u8]| data.starts_with(m);
        if starts(&[0x1f, 0x8b]) {
            Some(Format::Gzip)
        } else if starts(&[0x02, 0x21, 0x4c, 0x18]) {
            Some(Format::Lz4)
        } else if starts(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Some(Format::Zstd)
        } else if starts(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            Some(Format::Xz)
        } else if starts(b"BZh") {
            Some(Format::Bzip2)
        } else if starts(&[0x5d, 0, 0]) {
            Some(Format::Lzma)
        } else if starts(&[0x89, b'L', b'Z', b'O']) {
            Some(Format::Lzo)
        } else {
            None
        }
    }
}

/// Decompression errors.
#[derive(Debug, thiserror::Error)]
pub enum DecompressError {
    /// kiln does not unpack this format (the guest's decompressor still can).
    #[error("{0:?} payloads are not unpacked on the host")]
    Unsupported(Format),
    /// The magic number matches no known format.
    #[error("unknown payload compression")]
    Unknown,
    /// The payload is shorter than its trailer.
    #[error("payload too short")]
    TooShort,
    /// The declared size is absurd.
    #[error("payload declares {0} uncompressed bytes (limit {MAX_VMLINUX})")]
    TooLarge(usize),
    /// The stream is corrupt.
    #[error("corrupt {format:?} stream: {message}")]
    Corrupt {
        /// Format.
        format: Format,
        /// What the decoder said.
        message: String,
    },
    /// The stream ended before the declared size.
    #[error("{format:?} stream gave {got} bytes, trailer says {want}")]
    Short {
        /// Format.
        format: Format,
        /// Bytes produced.
        got: usize,
        /// Bytes declared.
        want: usize,
    },
}

/// Unpacks a bzImage payload (with its 4-byte size trailer) into the vmlinux ELF.
pub fn decompress(payload: &[u8]) -> Result<Vec<u8>, DecompressError> {
    let format = Format::detect(payload).ok_or(DecompressError::Unknown)?;
    if matches!(format, Format::Bzip2 | Format::Lzo) {
        return Err(DecompressError::Unsupported(format));
    }
    if payload.len() < 8 {
        return Err(DecompressError::TooShort);
    }
    let (stream, trailer) = payload.split_at(payload.len() - 4);
    let want = usize::try_from(u32::from_le_bytes(trailer.try_into().unwrap_or_default()))
        .unwrap_or(usize::MAX);
    if want == 0 || want > MAX_VMLINUX {
        return Err(DecompressError::TooLarge(want));
    }
    let corrupt = |message: String| DecompressError::Corrupt { format, message };
    let out = match format {
        Format::Gzip => read_bounded(flate2::read::GzDecoder::new(stream), want)
            .map_err(|e| corrupt(e.to_string()))?,
        Format::Zstd => {
            let dec = zstd::stream::read::Decoder::with_buffer(stream)
                .map_err(|e| corrupt(e.to_string()))?;
            read_bounded(dec, want).map_err(|e| corrupt(e.to_string()))?
        }
        Format::Xz => {
            let mut out = BoundedWriter {
                buf: Vec::with_capacity(want),
                limit: want,
            };
            lzma_rs::xz_decompress(&mut &stream[..], &mut out)
                .map_err(|e| corrupt(e.to_string()))?;
            out.buf
        }
        Format::Lzma => {
            let mut out = BoundedWriter {
                buf: Vec::with_capacity(want),
                limit: want,
            };
            lzma_rs::lzma_decompress(&mut &stream[..], &mut out)
                .map_err(|e| corrupt(e.to_string()))?;
            out.buf
        }
        Format::Lz4 => lz4_legacy(stream, want).map_err(corrupt)?,
        f @ (Format::Bzip2 | Format::Lzo) => return Err(DecompressError::Unsupported(f)),
    };
    if out.len() < want {
        return Err(DecompressError::Short {
            format,
            got: out.len(),
            want,
        });
    }
    Ok(out)
}

/// A `Vec` writer that refuses to grow past `limit`: a stream that decodes to more than its
/// trailer declared is corrupt, and must not make kiln allocate without bound.
struct BoundedWriter {
    buf: Vec<u8>,
    limit: usize,
}

impl std::io::Write for BoundedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = self.limit - self.buf.len();
        if room == 0 && !data.is_empty() {
            return Err(std::io::Error::other(
                "stream is longer than its declared size",
            ));
        }
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Reads at most `limit` bytes.
fn read_bounded(r: impl Read, limit: usize) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(limit);
    r.take(limit as u64).read_to_end(&mut out)?;
    Ok(out)
}

/// LZ4 legacy frames: magic, then (u32 LE compressed size, block) pairs of at most 8 MiB
/// uncompressed each; a repeated magic starts another frame.
fn lz4_legacy(stream: &[u8], want: usize) -> Result<Vec<u8>, String> {
    const MAGIC: u32 = 0x184c_2102;
    const BLOCK_MAX: usize = 8 << 20;
    let mut out = vec![0u8; want];
    let mut produced = 0;
    let mut pos = 4; // skip the first magic
    while produced < want && pos + 4 <= stream.len() {
        let size = u32::from_le_bytes(stream[pos..pos + 4].try_into().map_err(|_| "truncated")?);
        pos += 4;
        if size == MAGIC {
            continue;
        }
        let size = usize::try_from(size).map_err(|_| "block size")?;
        let block = stream
            .get(pos..pos.checked_add(size).ok_or("block size overflows")?)
            .ok_or_else(|| format!("block of {size} bytes at offset {pos} runs past the end"))?;
        pos += size;
        let room = (want - produced).min(BLOCK_MAX);
        let n = lz4_flex::block::decompress_into(block, &mut out[produced..produced + room])
            .map_err(|e| format!("block at offset {}: {e}", pos - size))?;
        produced += n;
    }
    out.truncate(produced);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn with_trailer(mut v: Vec<u8>, len: usize) -> Vec<u8> {
        v.extend_from_slice(&u32::try_from(len).unwrap().to_le_bytes());
        v
    }

    fn sample() -> Vec<u8> {
        (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect()
    }

    #[test]
    fn gzip_round_trip() {
        let data = sample();
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&data).unwrap();
        let p = with_trailer(e.finish().unwrap(), data.len());
        assert_eq!(decompress(&p).unwrap(), data);
    }

    #[test]
    fn zstd_round_trip() {
        let data = sample();
        let p = with_trailer(zstd::encode_all(&data[..], 3).unwrap(), data.len());
        assert_eq!(decompress(&p).unwrap(), data);
    }

    #[test]
    fn xz_round_trip_and_bounded() {
        let data = sample();
        let mut c = Vec::new();
        lzma_rs::xz_compress(&mut &data[..], &mut c).unwrap();
        assert_eq!(
            decompress(&with_trailer(c.clone(), data.len())).unwrap(),
            data
        );
        // A trailer that understates the size: decoding stops at the bound with an error.
        assert!(matches!(
            decompress(&with_trailer(c, 1000)),
            Err(DecompressError::Corrupt { .. })
        ));
    }

    #[test]
    fn lz4_legacy_round_trip_across_blocks() {
        let data: Vec<u8> = (0..(9usize << 20))
            .map(|i| u8::try_from(i / 7 % 256).unwrap())
            .collect();
        let mut s = vec![0x02, 0x21, 0x4c, 0x18];
        for chunk in data.chunks(8 << 20) {
            let c = lz4_flex::block::compress(chunk);
            s.extend_from_slice(&u32::try_from(c.len()).unwrap().to_le_bytes());
            s.extend_from_slice(&c);
        }
        let p = with_trailer(s, data.len());
        assert_eq!(decompress(&p).unwrap(), data);
    }

    #[test]
    fn lies_and_garbage_are_errors_not_panics() {
        let data = sample();
        let z = zstd::encode_all(&data[..], 3).unwrap();
        // Trailer claims more than the stream holds.
        assert!(matches!(
            decompress(&with_trailer(z.clone(), data.len() + 1)),
            Err(DecompressError::Short { .. })
        ));
        // Trailer claims an absurd size.
        assert!(matches!(
            decompress(&with_trailer(z, usize::try_from(u32::MAX).unwrap())),
            Err(DecompressError::TooLarge(_))
        ));
        // LZ4 block size pointing past the end.
        let bad = with_trailer(vec![0x02, 0x21, 0x4c, 0x18, 0xff, 0xff, 0, 0, 1, 2, 3], 100);
        assert!(matches!(
            decompress(&bad),
            Err(DecompressError::Corrupt { .. })
        ));
        assert!(matches!(
            decompress(b"nothing here"),
            Err(DecompressError::Unknown)
        ));
        assert!(matches!(
            decompress(b"BZh9xxxxxxxx"),
            Err(DecompressError::Unsupported(Format::Bzip2))
        ));
    }
}
