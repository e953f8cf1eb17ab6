//! The qcow2 header and its extensions: parsing (defensively) and serialisation.

use super::Qcow2Error;

/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension: persistent bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension: full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Incompatible feature: refcounts may be stale.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature: the image is corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature: external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature: the compression_type field is non-zero.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// The incompatible features this implementation handles.
pub const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/// Compatible feature: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature: bitmaps are consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;

/// Smallest supported cluster_bits (512 B).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest supported cluster_bits (2 MiB).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Bytes of a version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Bytes of the version 3 header we write (with compression_type and padding).
pub const V3_HEADER_LEN: u32 = 112;
/// Longest backing file name (qemu's limit).
pub const MAX_BACKING_NAME: u32 = 1023;

/// Compression types stored in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (window 4 KiB), called zlib by qemu.
    Deflate,
    /// Zstandard.
    Zstd,
}

impl CompressionType {
    /// The qemu option value.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Deflate => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// A header extension kept verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawExtension {
    /// Extension type.
    pub magic: u32,
    /// Extension data (without padding).
    pub data: Vec<u8>,
}

/// The parsed header with its extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Host offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters in the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible: u64,
    /// Compatible feature bits.
    pub compatible: u64,
    /// Autoclear feature bits.
    pub autoclear: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Header length as stored (72 for v2).
    pub header_length: u32,
    /// Compression type.
    pub compression: CompressionType,
    /// Header bytes past the fields we know (kept on rewrite).
    pub extra_fields: Vec<u8>,
    /// Backing file name.
    pub backing_file: Option<String>,
    /// Backing file format.
    pub backing_format: Option<String>,
    /// Encryption header location and length.
    pub crypto_header: Option<(u64, u64)>,
    /// Bitmaps extension, kept verbatim.
    pub bitmaps: Option<Vec<u8>>,
    /// Unknown extensions, kept verbatim and in order.
    pub unknown: Vec<RawExtension>,
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Whether extended L2 entries are in use.
    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Parses the header from the first cluster of the image (or as much as the file has).
    /// `first` must hold at least the fixed header; extensions past its end are an error.
    pub fn parse(first: &[u8]) -> Result<Header, Qcow2Error> {
        if first.len() < 4 {
            return Err(Qcow2Error::Truncated {
                what: "header",
                offset: 0,
            });
        }
        if first[0..4] != super::MAGIC {
            return Err(Qcow2Error::BadMagic);
        }
        if first.len() < V2_HEADER_LEN as usize {
            return Err(Qcow2Error::Truncated {
                what: "header",
                offset: 0,
            });
        }
        let version = be32(first, 4);
        if version != 2 && version != 3 {
            return Err(Qcow2Error::UnsupportedVersion(version));
        }
        let cluster_bits = be32(first, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Qcow2Error::ClusterBits(cluster_bits));
        }
        let cluster_size = 1usize << cluster_bits;
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(first, 24),
            crypt_method: be32(first, 32),
            l1_size: be32(first, 36),
            l1_table_offset: be64(first, 40),
            refcount_table_offset: be64(first, 48),
            refcount_table_clusters: be32(first, 56),
            nb_snapshots: be32(first, 60),
            snapshots_offset: be64(first, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression: CompressionType::Deflate,
            extra_fields: Vec::new(),
            backing_file: None,
            backing_format: None,
            crypto_header: None,
            bitmaps: None,
            unknown: Vec::new(),
        };
        let backing_offset = be64(first, 8);
        let backing_len = be32(first, 16);
        if version == 3 {
            if first.len() < 104 {
                return Err(Qcow2Error::Truncated {
                    what: "version 3 header",
                    offset: 72,
                });
            }
            h.incompatible = be64(first, 72);
            h.compatible = be64(first, 80);
            h.autoclear = be64(first, 88);
            h.refcount_order = be32(first, 96);
            h.header_length = be32(first, 100);
            if h.header_length < 104 || !h.header_length.is_multiple_of(8) {
                return Err(Qcow2Error::Header(format!(
                    "header_length {} must be a multiple of 8 and at least 104",
                    h.header_length
                )));
            }
            if h.header_length as usize > cluster_size || h.header_length as usize > first.len() {
                return Err(Qcow2Error::Header(format!(
                    "header_length {} is larger than the first cluster",
                    h.header_length
                )));
            }
            if h.header_length > 104 {
                h.compression = match first[104] {
                    0 => CompressionType::Deflate,
                    1 => CompressionType::Zstd,
                    other => {
                        return Err(Qcow2Error::Header(format!(
                            "unknown compression type {other}"
                        )))
                    }
                };
            }
            if h.header_length > V3_HEADER_LEN {
                h.extra_fields = first[V3_HEADER_LEN as usize..h.header_length as usize].to_vec();
            }
        }
        if h.refcount_order > 6 {
            return Err(Qcow2Error::RefcountOrder(h.refcount_order));
        }
        let unknown = h.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(Qcow2Error::UnknownFeatures(incompat_names(
                unknown,
                first,
                h.header_length,
            )));
        }
        if (h.incompatible & INCOMPAT_COMPRESSION != 0)
            != (h.compression != CompressionType::Deflate)
        {
            return Err(Qcow2Error::Header(
                "compression type bit does not match the compression_type field".into(),
            ));
        }
        if h.extended_l2() && cluster_bits < 14 {
            return Err(Qcow2Error::Header(
                "extended L2 entries need a cluster size of at least 16 KiB".into(),
            ));
        }
        if h.crypt_method > 2 {
            return Err(Qcow2Error::Header(format!(
                "unknown encryption method {}",
                h.crypt_method
            )));
        }
        h.parse_extensions(first)?;
        if backing_offset != 0 {
            if backing_len > MAX_BACKING_NAME {
                return Err(Qcow2Error::Header(format!(
                    "backing file name is {backing_len} bytes (limit {MAX_BACKING_NAME})"
                )));
            }
            let start = usize::try_from(backing_offset).unwrap_or(usize::MAX);
            let end = start.saturating_add(backing_len as usize);
            if end > cluster_size || end > first.len() {
                return Err(Qcow2Error::Header(
                    "backing file name lies outside the first cluster".into(),
                ));
            }
            let name = std::str::from_utf8(&first[start..end])
                .map_err(|_| Qcow2Error::Header("backing file name is not UTF-8".into()))?;
            h.backing_file = Some(name.to_owned());
        }
        if h.crypt_method == 2 && h.crypto_header.is_none() {
            return Err(Qcow2Error::Header(
                "LUKS encryption without the encryption header extension".into(),
            ));
        }
        Ok(h)
    }

    fn parse_extensions(&mut self, first: &[u8]) -> Result<(), Qcow2Error> {
        let mut off = self.header_length as usize;
        let limit = first.len().min(1usize << self.cluster_bits);
        let mut seen = Vec::new();
        loop {
            if off + 8 > limit {
                // qemu tolerates a header that ends without an end marker at the cluster end.
                return Ok(());
            }
            let magic = be32(first, off);
            let len = be32(first, off + 4) as usize;
            off += 8;
            if magic == 0 {
                return Ok(());
            }
            if len > limit - off {
                return Err(Qcow2Error::Extension {
                    magic,
                    problem: "extends past the first cluster",
                });
            }
            let data = &first[off..off + len];
            if magic != EXT_FEATURE_TABLE && seen.contains(&magic) {
                return Err(Qcow2Error::Extension {
                    magic,
                    problem: "appears twice",
                });
            }
            seen.push(magic);
            match magic {
                EXT_BACKING_FORMAT => {
                    let s = std::str::from_utf8(data).map_err(|_| Qcow2Error::Extension {
                        magic,
                        problem: "backing format is not UTF-8",
                    })?;
                    self.backing_format = Some(s.trim_end_matches('\0').to_owned());
                }
                EXT_FEATURE_TABLE => {} // regenerated on every header write
                EXT_CRYPTO => {
                    if len != 16 {
                        return Err(Qcow2Error::Extension {
                            magic,
                            problem: "encryption header pointer must be 16 bytes",
                        });
                    }
                    self.crypto_header = Some((be64(data, 0), be64(data, 8)));
                }
                EXT_BITMAPS => self.bitmaps = Some(data.to_vec()),
                EXT_DATA_FILE => return Err(Qcow2Error::Unsupported("external data files".into())),
                _ => self.unknown.push(RawExtension {
                    magic,
                    data: data.to_vec(),
                }),
            }
            off += len.div_ceil(8) * 8;
        }
    }

    /// Serialises the header, extensions and backing file name into one buffer that must be
    /// written at offset 0. Fails if it does not fit in the first cluster.
    pub fn serialize(&self) -> Result<Vec<u8>, Qcow2Error> {
        let mut b = Vec::with_capacity(1024);
        let hlen = if self.version == 2 {
            V2_HEADER_LEN
        } else {
            V3_HEADER_LEN + u32::try_from(self.extra_fields.len()).unwrap_or(0)
        };
        b.extend_from_slice(&super::MAGIC);
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&0u64.to_be_bytes()); // backing offset, patched below
        b.extend_from_slice(&0u32.to_be_bytes()); // backing size, patched below
        b.extend_from_slice(&self.cluster_bits.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&self.crypt_method.to_be_bytes());
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        b.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version == 3 {
            b.extend_from_slice(&self.incompatible.to_be_bytes());
            b.extend_from_slice(&self.compatible.to_be_bytes());
            b.extend_from_slice(&self.autoclear.to_be_bytes());
            b.extend_from_slice(&self.refcount_order.to_be_bytes());
            b.extend_from_slice(&hlen.to_be_bytes());
            b.push(match self.compression {
                CompressionType::Deflate => 0,
                CompressionType::Zstd => 1,
            });
            b.resize(V3_HEADER_LEN as usize, 0);
            b.extend_from_slice(&self.extra_fields);
        }
        let push_ext = |b: &mut Vec<u8>, magic: u32, data: &[u8]| {
            b.extend_from_slice(&magic.to_be_bytes());
            b.extend_from_slice(&u32::try_from(data.len()).unwrap_or(0).to_be_bytes());
            b.extend_from_slice(data);
            b.resize(b.len().div_ceil(8) * 8, 0);
        };
        if let Some(fmt) = &self.backing_format {
            push_ext(&mut b, EXT_BACKING_FORMAT, fmt.as_bytes());
        }
        if let Some((off, len)) = self.crypto_header {
            let mut d = off.to_be_bytes().to_vec();
            d.extend_from_slice(&len.to_be_bytes());
            push_ext(&mut b, EXT_CRYPTO, &d);
        }
        if self.version == 3 {
            push_ext(&mut b, EXT_FEATURE_TABLE, &feature_table());
        }
        if let Some(bm) = &self.bitmaps {
            push_ext(&mut b, EXT_BITMAPS, bm);
        }
        for ext in &self.unknown {
            push_ext(&mut b, ext.magic, &ext.data);
        }
        push_ext(&mut b, 0, &[]);
        if let Some(name) = &self.backing_file {
            let len = u32::try_from(name.len())
                .ok()
                .filter(|&l| l <= MAX_BACKING_NAME)
                .ok_or_else(|| Qcow2Error::InvalidOption("backing file name too long".into()))?;
            let off = b.len() as u64;
            b[8..16].copy_from_slice(&off.to_be_bytes());
            b[16..20].copy_from_slice(&len.to_be_bytes());
            b.extend_from_slice(name.as_bytes());
        }
        if b.len() as u64 > self.cluster_size() {
            return Err(Qcow2Error::InvalidOption(
                "header, extensions and backing file name do not fit in one cluster".into(),
            ));
        }
        Ok(b)
    }
}

/// The feature name table qemu writes: (type, bit, name).
const FEATURES: &[(u8, u8, &str)] = &[
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

fn feature_table() -> Vec<u8> {
    let mut t = Vec::with_capacity(FEATURES.len() * 48);
    for &(ty, bit, name) in FEATURES {
        let mut e = [0u8; 48];
        e[0] = ty;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        t.extend_from_slice(&e);
    }
    t
}

/// Names unknown incompatible bits using the image's own feature table where it has one.
fn incompat_names(bits: u64, first: &[u8], header_length: u32) -> String {
    let mut names = Vec::new();
    let mut off = header_length as usize;
    let mut table: &[u8] = &[];
    while off + 8 <= first.len() {
        let magic = be32(first, off);
        let len = be32(first, off + 4) as usize;
        off += 8;
        if magic == 0 || len > first.len() - off {
            break;
        }
        if magic == EXT_FEATURE_TABLE {
            table = &first[off..off + len];
            break;
        }
        off += len.div_ceil(8) * 8;
    }
    for bit in 0..64u32 {
        if bits & (1u64 << bit) == 0 {
            continue;
        }
        let name = table
            .chunks_exact(48)
            .find(|e| e[0] == 0 && u32::from(e[1]) == bit)
            .map(|e| {
                let end = e[2..].iter().position(|&c| c == 0).map_or(46, |p| p);
                String::from_utf8_lossy(&e[2..2 + end]).into_owned()
            });
        names.push(match name {
            Some(n) => format!("'{n}' (bit {bit})"),
            None => format!("bit {bit}"),
        });
    }
    names.join(", ")
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: 0,
            compatible: COMPAT_LAZY_REFCOUNTS,
            autoclear: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN,
            compression: CompressionType::Deflate,
            extra_fields: Vec::new(),
            backing_file: Some("base.img".into()),
            backing_format: Some("raw".into()),
            crypto_header: None,
            bitmaps: None,
            unknown: vec![RawExtension {
                magic: 0x1234_5678,
                data: vec![1, 2, 3],
            }],
        }
    }

    #[test]
    fn header_round_trips_with_unknown_extension() {
        let h = sample();
        let bytes = h.serialize().unwrap();
        let parsed = Header::parse(&bytes).unwrap();
        assert_eq!(parsed, h);
    }

    #[test]
    fn rejects_out_of_range_cluster_bits() {
        let mut bytes = sample().serialize().unwrap();
        bytes[20..24].copy_from_slice(&22u32.to_be_bytes());
        assert!(matches!(
            Header::parse(&bytes),
            Err(Qcow2Error::ClusterBits(22))
        ));
    }

    #[test]
    fn names_unknown_incompatible_feature() {
        let mut bytes = sample().serialize().unwrap();
        bytes[72..80].copy_from_slice(&(1u64 << 9).to_be_bytes());
        let err = Header::parse(&bytes).unwrap_err().to_string();
        assert!(err.contains("bit 9"), "{err}");
    }

    #[test]
    fn rejects_extension_past_cluster() {
        let mut bytes = sample().serialize().unwrap();
        let off = V3_HEADER_LEN as usize;
        bytes[off + 4..off + 8].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
        assert!(matches!(
            Header::parse(&bytes),
            Err(Qcow2Error::Extension { .. })
        ));
    }
}
