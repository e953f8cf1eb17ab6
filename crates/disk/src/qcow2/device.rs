//! [`BlockDevice`] for [`Qcow2Image`]: the lock discipline of the data path.
//!
//! Reads and in-place writes take the shared lock and do their file I/O under it, so
//! requests from several queues overlap. Whatever needs metadata work (loading an L2 table,
//! allocating, copy-on-write) retakes the lock exclusively for that part only.

use std::sync::Arc;

use super::io::Unit;
use super::state::State;
use super::{Qcow2Error, Qcow2Image};
use crate::{check_range, BlockDevice, DiskError, Extent, ExtentKind, ImageFormat};

/// Sector size of encrypted images: the cipher works on whole 512-byte sectors.
const CRYPT_SECTOR: u64 = 512;

impl Qcow2Image {
    /// Whether the image looks like it was made with preallocation=metadata: more clusters
    /// in use than the file has storage for. Decided once, like qemu (which only then asks
    /// the file system where data clusters have holes).
    fn metadata_preallocated(&self) -> Result<bool, Qcow2Error> {
        if let Some(&v) = self.metadata_prealloc.get() {
            return Ok(v);
        }
        let v = self.lock().detect_metadata_preallocation()?;
        Ok(*self.metadata_prealloc.get_or_init(|| v))
    }

    /// Reads guest data (range already checked), sharing the lock with other requests.
    fn read_guest(&self, offset: u64, buf: &mut [u8]) -> Result<(), Qcow2Error> {
        let mut done = 0usize;
        while done < buf.len() {
            done += self
                .shared()
                .read_cached(offset + done as u64, &mut buf[done..])?;
            if done < buf.len() {
                // An L2 table to load: do it, and read on as far as the cache goes, under
                // the exclusive lock (which guarantees progress).
                let mut st = self.lock();
                let pos = offset + done as u64;
                let gc = pos >> st.cbits;
                st.load_l2_for(gc)?;
                let n = st.read_cached(pos, &mut buf[done..])?;
                if n == 0 {
                    return Err(Qcow2Error::table("L2 table", "vanished from cache"));
                }
                done += n;
            }
        }
        Ok(())
    }

    /// Reads `[offset, offset + len)` rounded out to `align` (an encrypted image's sector),
    /// through a bounce buffer when the range is not aligned already.
    fn aligned_read(&self, offset: u64, buf: &mut [u8], align: u64) -> Result<(), Qcow2Error> {
        let end = offset + buf.len() as u64;
        let a0 = offset / align * align;
        let a1 = end.div_ceil(align) * align;
        if a0 == offset && a1 == end {
            return self.read_guest(offset, buf);
        }
        let mut tmp = vec![0u8; usize::try_from(a1 - a0).map_err(|_| Qcow2Error::NoSpace)?];
        self.read_guest(a0, &mut tmp)?;
        let s = usize::try_from(offset - a0).unwrap_or(0);
        buf.copy_from_slice(&tmp[s..s + buf.len()]);
        Ok(())
    }
}

/// Read-modify-write of a range that is not sector aligned, all under the exclusive lock so
/// that no other write lands between the read and the write.
fn aligned_write(st: &mut State, offset: u64, buf: &[u8], align: u64) -> Result<(), Qcow2Error> {
    let end = offset + buf.len() as u64;
    let a0 = offset / align * align;
    let a1 = end.div_ceil(align) * align;
    if a0 == offset && a1 == end {
        return st.write(offset, buf);
    }
    let mut tmp = vec![0u8; usize::try_from(a1 - a0).map_err(|_| Qcow2Error::NoSpace)?];
    st.read(a0, &mut tmp)?;
    let s = usize::try_from(offset - a0).unwrap_or(0);
    tmp[s..s + buf.len()].copy_from_slice(buf);
    st.write(a0, &tmp)
}

impl BlockDevice for Qcow2Image {
    fn size(&self) -> u64 {
        self.shared().hdr.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        // One shared-lock acquisition for the common case: checks and the cached read.
        let st = self.shared();
        check_range(offset, buf.len() as u64, st.hdr.size)?;
        if st.encrypted {
            if st.cipher.is_none() {
                return Err(Qcow2Error::KeyRequired.into());
            }
            drop(st);
            return Ok(self.aligned_read(offset, buf, CRYPT_SECTOR)?);
        }
        let done = st.read_cached(offset, buf)?;
        drop(st);
        if done < buf.len() {
            self.read_guest(offset + done as u64, &mut buf[done..])?;
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), DiskError> {
        let st = self.shared();
        if st.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_range(offset, buf.len() as u64, st.hdr.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        if st.encrypted {
            match &st.cipher {
                None => return Err(Qcow2Error::KeyRequired.into()),
                // Refuse before any cluster is allocated.
                Some(c) if !c.is_luks() => {
                    return Err(Qcow2Error::Crypto(crate::crypto::CryptoError::LegacyWrite).into())
                }
                Some(_) => {}
            }
            let aligned = offset.is_multiple_of(CRYPT_SECTOR)
                && (buf.len() as u64).is_multiple_of(CRYPT_SECTOR);
            if !aligned {
                drop(st);
                return Ok(aligned_write(&mut self.lock(), offset, buf, CRYPT_SECTOR)?);
            }
        }
        // In place under the shared lock where the clusters allow it, the rest exclusively.
        let done = st.write_in_place(offset, buf)?;
        drop(st);
        if done < buf.len() {
            self.lock().write(offset + done as u64, &buf[done..])?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), DiskError> {
        let file = {
            let mut st = self.lock();
            if st.read_only {
                return Ok(());
            }
            st.write_back_metadata()?;
            if st.no_sync {
                return Ok(());
            }
            st.file.clone()
        };
        // The metadata is written (in its crash-safe order, with the syncs that order
        // needs); the final sync makes it and all data written so far durable, and needs
        // no lock: requests keep running meanwhile.
        crate::fileio::sync_data(&file)
            .map_err(Qcow2Error::io("syncing the image"))
            .map_err(DiskError::from)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError> {
        let mut st = self.lock();
        if st.read_only {
            return Err(DiskError::ReadOnly);
        }
        let size = st.hdr.size;
        check_range(offset, len, size)?;
        let unit = st.unit;
        let end = offset + len;
        let a0 = offset.div_ceil(unit) * unit;
        let a1 = if end == size { end } else { end / unit * unit };
        if a0 >= a1 || st.encrypted {
            let zeros = vec![0u8; usize::try_from(len).map_err(|_| Qcow2Error::NoSpace)?];
            drop(st);
            return self.write_at(offset, &zeros);
        }
        if a0 > offset {
            let z = vec![0u8; usize::try_from(a0 - offset).unwrap_or(0)];
            st.write(offset, &z)?;
        }
        st.zero_units(a0, a1 - a0, unmap, false)?;
        if end > a1 {
            let z = vec![0u8; usize::try_from(end - a1).unwrap_or(0)];
            st.write(a1, &z)?;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        let mut st = self.lock();
        if st.read_only {
            return Err(DiskError::ReadOnly);
        }
        let size = st.hdr.size;
        check_range(offset, len, size)?;
        let cs = st.cs;
        let end = offset + len;
        let a0 = offset.div_ceil(cs) * cs;
        let a1 = if end == size { end } else { end / cs * cs };
        if a0 < a1 {
            st.zero_units(a0, a1 - a0, true, true)?;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent, DiskError> {
        let run = {
            let st = self.shared();
            check_range(offset, len, st.hdr.size)?;
            st.map_run_cached(offset, len.max(1))?
        };
        let run = match run {
            Some(r) => r,
            None => self.lock().map_run(offset, len.max(1))?,
        };
        let encrypted = self.shared().encrypted;
        let (kind, compressed) = match run.unit {
            Unit::Data(_) => (ExtentKind::Data, false),
            Unit::Zero(_) => (ExtentKind::Zero, false),
            Unit::Unalloc(_) => (ExtentKind::Unallocated, false),
            Unit::Compressed(_) => (ExtentKind::Data, true),
        };
        let mut ext = Extent {
            len: run.len,
            kind,
            // Like qemu: no offsets into an encrypted image (they would not read as data).
            host_offset: run.host.filter(|_| !encrypted),
            compressed,
            zero_in_file: false,
        };
        if let (ExtentKind::Data, false, Some(host)) = (kind, compressed, ext.host_offset) {
            if self.metadata_preallocated()? {
                let (len, zero) = self.shared().host_file_status(host, ext.len)?;
                ext.len = len;
                ext.zero_in_file = zero;
            }
        }
        Ok(ext)
    }

    fn is_read_only(&self) -> bool {
        self.shared().read_only
    }

    fn format(&self) -> ImageFormat {
        ImageFormat::Qcow2
    }

    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        self.shared().backing.clone()
    }

    fn allocated_size(&self) -> Result<u64, DiskError> {
        let st = self.shared();
        crate::fileio::allocated_bytes(&st.file).map_err(|source| DiskError::Io {
            op: "stat",
            path: st.path.clone(),
            source,
        })
    }

    fn resize(&self, new_size: u64) -> Result<(), DiskError> {
        Ok(self.lock().resize(new_size)?)
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use std::sync::Arc;

    use super::super::{CreateOptions, Qcow2Image, RepairMode};
    use crate::{BlockDevice, OpenOptions};

    /// Threads read and write across many L2 tables while the cache holds only two, so
    /// nearly every request misses, loads a table under the exclusive lock and evicts (and
    /// writes back) another: data must stay what each thread wrote.
    #[test]
    fn concurrent_io_through_a_thrashing_l2_cache_keeps_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.qcow2");
        // 512-byte clusters: one L2 table maps 32 KiB, so 4 MiB needs 128 tables.
        Qcow2Image::create(
            &p,
            &CreateOptions {
                size: 4 << 20,
                cluster_size: 512,
                ..CreateOptions::default()
            },
        )
        .unwrap();
        let q = Arc::new(Qcow2Image::open(&p, &OpenOptions::default()).unwrap());
        q.lock().l2_cache_cap = 2;
        const THREADS: u64 = 3;
        const SLOT: u64 = 4096;
        let slots = (4 << 20) / SLOT;
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let q = q.clone();
                std::thread::spawn(move || {
                    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                    let mut mine = std::collections::HashMap::new();
                    for i in 0..600u64 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        // Each thread owns the slots congruent to its index.
                        let slot = (x % (slots / THREADS)) * THREADS + t;
                        let off = slot * SLOT;
                        if i % 3 == 0 {
                            let v = (i as u8) ^ (t as u8) | 1;
                            q.write_at(off, &[v; SLOT as usize]).unwrap();
                            mine.insert(slot, v);
                        } else {
                            let mut b = [0u8; SLOT as usize];
                            q.read_at(off, &mut b).unwrap();
                            let want = mine.get(&slot).copied().unwrap_or(0);
                            assert!(b.iter().all(|&c| c == want), "slot {slot}");
                        }
                    }
                    mine
                })
            })
            .collect();
        let written: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        q.flush().unwrap();
        let rep = q.check(RepairMode::None).unwrap();
        assert_eq!((rep.corruptions, rep.leaks), (0, 0), "{:?}", rep.messages);
        for mine in written {
            for (slot, v) in mine {
                let mut b = [0u8; SLOT as usize];
                q.read_at(slot * SLOT, &mut b).unwrap();
                assert!(b.iter().all(|&c| c == v), "slot {slot} after the run");
            }
        }
    }
}
