//! The one error type of the qcow2 driver.

use std::io;

use crate::crypto::CryptoError;

/// Everything that can go wrong opening, reading, writing or checking a qcow2 image.
///
/// Messages name the structure at fault so that an error on a hostile image says what is
/// wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// An I/O error on the image file.
    #[error("I/O error while {what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file does not start with the qcow2 magic.
    #[error("not a qcow2 image (bad magic)")]
    BadMagic,
    /// The file ends before a structure it describes.
    #[error("image is truncated: {what} at offset {offset} is past the end of the file")]
    Truncated {
        /// The structure.
        what: &'static str,
        /// Where it should be.
        offset: u64,
    },
    /// A version other than 2 or 3.
    #[error("unsupported qcow2 version {0}")]
    UnsupportedVersion(u32),
    /// cluster_bits outside 9..=21.
    #[error("cluster_bits {0} out of range (cluster size must be 512 B to 2 MiB)")]
    ClusterBits(u32),
    /// refcount_order above 6.
    #[error("refcount_order {0} out of range (refcount width must be 1 to 64 bits)")]
    RefcountOrder(u32),
    /// A malformed header field.
    #[error("invalid header: {0}")]
    Header(String),
    /// Incompatible feature bits this implementation does not know.
    #[error("unsupported incompatible features: {0}")]
    UnknownFeatures(String),
    /// The corrupt bit is set.
    #[error("image is marked corrupt; run 'kiln img check -r all' to repair it")]
    MarkedCorrupt,
    /// A table lies outside the file, is misaligned or has an absurd size.
    #[error("{what} {problem}")]
    BadTable {
        /// Which table.
        what: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// A size field is larger than the implementation accepts.
    #[error("{what} is too large: {value} (limit {limit})")]
    TooLarge {
        /// Which field.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The limit.
        limit: u64,
    },
    /// A table entry points somewhere it must not.
    #[error("invalid {what} entry {entry:#x} at index {index}: {problem}")]
    BadEntry {
        /// Which table.
        what: &'static str,
        /// The raw entry.
        entry: u64,
        /// Its index.
        index: u64,
        /// What is wrong.
        problem: &'static str,
    },
    /// A header extension is malformed.
    #[error("invalid header extension {magic:#010x}: {problem}")]
    Extension {
        /// Extension type.
        magic: u32,
        /// What is wrong.
        problem: &'static str,
    },
    /// The image is encrypted and no key was given.
    #[error("image is encrypted; a key is required (use --object secret and encrypt.key-secret)")]
    KeyRequired,
    /// Encryption setup or use failed.
    #[error("encryption error")]
    Crypto(#[from] CryptoError),
    /// A compressed cluster could not be decompressed.
    #[error("compressed cluster at host offset {offset:#x} is corrupt: {problem}")]
    Decompress {
        /// Host offset of the compressed data.
        offset: u64,
        /// What the decompressor said.
        problem: String,
    },
    /// Compression failed.
    #[error("compression failed: {0}")]
    Compress(String),
    /// No snapshot has this id or name.
    #[error("snapshot '{0}' not found")]
    SnapshotNotFound(String),
    /// A snapshot with this name exists.
    #[error("a snapshot named '{0}' already exists")]
    SnapshotExists(String),
    /// A valid image using a feature not implemented here.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A creation or amend option is invalid.
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// The image needs more clusters than the format can address.
    #[error("image would exceed the qcow2 addressing limits")]
    NoSpace,
    /// The refcount of a cluster would overflow the refcount width.
    #[error("refcount overflow for cluster at {offset:#x} (refcount width {bits} bits)")]
    RefcountOverflow {
        /// Host offset of the cluster.
        offset: u64,
        /// Refcount width.
        bits: u32,
    },
    /// Writing to an image opened read-only (or read-only by nature).
    #[error("image is read-only: {0}")]
    ReadOnly(&'static str),
    /// Opening the backing file failed.
    #[error("backing file {path}")]
    Backing {
        /// The name as recorded in the image.
        path: String,
        /// The cause.
        #[source]
        source: Box<crate::DiskError>,
    },
}

impl Qcow2Error {
    pub(crate) fn io(what: &'static str) -> impl FnOnce(io::Error) -> Qcow2Error {
        move |source| Qcow2Error::Io { what, source }
    }

    pub(crate) fn table(what: &'static str, problem: impl Into<String>) -> Qcow2Error {
        Qcow2Error::BadTable {
            what,
            problem: problem.into(),
        }
    }
}
