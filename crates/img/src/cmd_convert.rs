//! `convert` and `compare`.

use std::sync::Arc;

use kiln_disk::{BlockDevice, ImageFormat, Qcow2Image};

use crate::args::{parse, parse_size, split_opts, Arg};
use crate::cmd_create::{create_image, target_options};
use crate::output::Progress;
use crate::pagebuf::PageBuf;
use crate::{
    chain_of, chain_status, open_image, parse_format, secrets_of, ImageSpec, ImgError, OpenFlags,
};

/// Bytes handled per step.
const CHUNK: u64 = 2 << 20;

/// A conversion source: an image, or one of its internal snapshots.
enum Source {
    Dev(Arc<dyn BlockDevice>),
    Snapshot(Arc<Qcow2Image>, String, u64),
}

impl Source {
    fn size(&self) -> u64 {
        match self {
            Source::Dev(d) => d.size(),
            Source::Snapshot(_, _, s) => *s,
        }
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), kiln_disk::DiskError> {
        match self {
            Source::Dev(d) => d.read_at(off, buf),
            Source::Snapshot(q, name, _) => q.read_snapshot(name, off, buf),
        }
    }

    /// (reads as zero, length) for the run at `off`.
    fn status(&self, off: u64, len: u64) -> Result<(bool, u64), kiln_disk::DiskError> {
        match self {
            Source::Dev(d) => {
                let chain = chain_of(d);
                let st = chain_status(&chain, off, len)?;
                Ok((st.zero, st.len.max(1)))
            }
            Source::Snapshot(..) => Ok((false, len)),
        }
    }
}

fn is_zero(b: &[u8]) -> bool {
    let mut words = b.chunks_exact(8);
    let body = words
        .by_ref()
        .all(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) == 0);
    body && words.remainder().iter().all(|&x| x == 0)
}

fn parse_snapshot_param(s: &str) -> String {
    for (k, v) in split_opts(s) {
        if (k == "snapshot.name" || k == "snapshot.id") && !v.is_empty() {
            return v;
        }
        if v.is_empty() {
            return k;
        }
    }
    s.to_owned()
}

/// One piece of the guest view: `data` is `None` for a run that reads as zeroes, else a
/// buffer whose first `len` bytes are valid.
struct Chunk {
    at: u64,
    len: u64,
    data: Option<PageBuf>,
}

/// Walks the sources in order and sends their contents in chunks of at most `chunk` bytes.
fn read_chunks(
    sources: &[Source],
    chunk: u64,
    compress: bool,
    name: &str,
    tx: &std::sync::mpsc::SyncSender<Result<Chunk, ImgError>>,
    pool: &std::sync::mpsc::Receiver<PageBuf>,
) {
    let mut base = 0u64;
    for src in sources {
        let size = src.size();
        let mut pos = 0u64;
        while pos < size {
            let lim = (chunk - (pos % chunk)).min(size - pos);
            let item = (|| {
                let (mut zero, len) = src.status(pos, lim).map_err(ImgError::disk(name))?;
                let mut len = len.min(lim);
                if compress && !(zero && len == lim) {
                    // Compression works on whole clusters: take the whole chunk as data.
                    zero = false;
                    len = lim;
                }
                let data = if zero {
                    None
                } else {
                    let n = usize::try_from(len).unwrap_or(0);
                    let mut d = pool.try_recv().unwrap_or_default();
                    if d.len() < n {
                        d = PageBuf::new(usize::try_from(chunk).unwrap_or(n).max(n));
                    }
                    src.read(pos, &mut d[..n]).map_err(ImgError::disk(name))?;
                    Some(d)
                };
                Ok(Chunk {
                    at: base + pos,
                    len,
                    data,
                })
            })();
            let stop = item.is_err();
            let len = item.as_ref().map_or(0, |c| c.len);
            if tx.send(item).is_err() || stop {
                return;
            }
            pos += len;
        }
        base += size;
    }
}

/// Writes `buf` at `off` in the target, skipping zero runs of `sparse` bytes (or writing
/// them as zeroes when `explicit_zero`).
fn write_sparse(
    target: &dyn BlockDevice,
    off: u64,
    buf: &[u8],
    sparse: usize,
    explicit_zero: bool,
) -> Result<(), kiln_disk::DiskError> {
    if sparse == 0 {
        return target.write_at(off, buf);
    }
    let mut i = 0;
    while i < buf.len() {
        let blk = (sparse - (usize::try_from(off).unwrap_or(0) + i) % sparse).min(buf.len() - i);
        let zero = is_zero(&buf[i..i + blk]);
        let mut j = i + blk;
        while j < buf.len() {
            let n = sparse.min(buf.len() - j);
            if is_zero(&buf[j..j + n]) != zero {
                break;
            }
            j += n;
        }
        if !zero {
            target.write_at(off + i as u64, &buf[i..j])?;
        } else if explicit_zero {
            target.write_zeroes(off + i as u64, (j - i) as u64, true)?;
        }
        i = j;
    }
    Ok(())
}

/// Whether the target cache mode given with `-t` (qemu-img's default: unsafe) skips syncs.
/// The other modes sync the target when the conversion ends.
fn target_cache_is_unsafe(mode: Option<&str>) -> Result<bool, ImgError> {
    match mode.unwrap_or("unsafe") {
        "unsafe" => Ok(true),
        "writeback" | "none" | "directsync" | "writethrough" => Ok(false),
        other => Err(ImgError::Msg(format!("Invalid cache option: {other}"))),
    }
}

/// `convert [-c] [-p] [-q] [-n] [-f fmt] [-O fmt] [-B backing [-F fmt]] [-o opts] [-l snap] [-S size] src... dst`
pub(crate) fn convert(args: &[String]) -> Result<i32, ImgError> {
    let p = parse(
        args,
        &[
            ('c', Arg::No),
            ('p', Arg::No),
            ('q', Arg::No),
            ('n', Arg::No),
            ('f', Arg::Yes),
            ('O', Arg::Yes),
            ('B', Arg::Yes),
            ('F', Arg::Yes),
            ('o', Arg::Yes),
            ('l', Arg::Yes),
            ('s', Arg::Yes),
            ('S', Arg::Yes),
            ('t', Arg::Yes),
            ('T', Arg::Yes),
            ('r', Arg::Yes),
            ('m', Arg::Yes),
            ('W', Arg::No),
            ('C', Arg::No),
            ('U', Arg::No),
        ],
        &[
            ("object", Arg::Yes),
            ("image-opts", Arg::No),
            ("target-image-opts", Arg::No),
            ("salvage", Arg::No),
            ("target-is-zero", Arg::No),
            ("force-share", Arg::No),
            ("bitmaps", Arg::No),
            ("skip-broken-bitmaps", Arg::No),
        ],
    )?;
    let secrets = secrets_of(&p)?;
    if p.free.len() < 2 {
        return Err(ImgError::Usage(
            "Expecting at least one source and an output file name".into(),
        ));
    }
    let (srcs, dst) = p.free.split_at(p.free.len() - 1);
    let dst = &dst[0];
    let out_fmt = parse_format(Some(p.get("O").unwrap_or("raw")))?.unwrap_or(ImageFormat::Raw);
    let compress = p.has("c");
    if compress && out_fmt != ImageFormat::Qcow2 {
        return Err(ImgError::Msg(
            "Compression not supported for this file format".into(),
        ));
    }
    let sparse = match p.get("S") {
        Some(s) => usize::try_from(parse_size(s)?)
            .map_err(|_| ImgError::Usage("Invalid sparse size".into()))?,
        None => 4096,
    };
    let snapshot = p.get("l").or(p.get("s")).map(parse_snapshot_param);
    let mut sources = Vec::new();
    for s in srcs {
        let spec = ImageSpec::parse(s, p.get("f"), p.has("image-opts"))?;
        let o = open_image(
            &spec,
            &secrets,
            OpenFlags {
                no_repair: true,
                ..OpenFlags::default()
            },
        )?;
        match (&snapshot, o.qcow2) {
            (Some(name), Some(q)) => {
                let snap = q
                    .snapshots()
                    .into_iter()
                    .find(|x| &x.id == name || &x.name == name)
                    .ok_or_else(|| {
                        ImgError::Msg(format!(
                            "Failed to load snapshot: snapshot '{name}' not found"
                        ))
                    })?;
                sources.push(Source::Snapshot(q, name.clone(), snap.disk_size));
            }
            (Some(_), None) => {
                return Err(ImgError::Msg(
                    "Failed to load snapshot: format does not support snapshots".into(),
                ))
            }
            (None, _) => sources.push(Source::Dev(o.dev)),
        }
    }
    let total: u64 = sources.iter().map(Source::size).sum();
    let mut t = target_options(out_fmt, &p.all("o"), &secrets)?;
    if let Some(b) = p.get("B") {
        t.qcow2.backing_file = Some(b.to_owned());
        t.qcow2.backing_format = p.get("F").map(str::to_owned);
    }
    let has_backing = t.qcow2.backing_file.is_some();
    let dst_spec = ImageSpec::parse(dst, Some(out_fmt.name()), p.has("target-image-opts"))?;
    if !p.has("n") {
        if has_backing && t.qcow2.backing_format.is_none() {
            let bpath = kiln_disk::qcow2::resolve_backing(
                std::path::Path::new(&dst_spec.path),
                t.qcow2.backing_file.as_deref().unwrap_or(""),
            );
            let f = kiln_disk::probe(&bpath).map_err(ImgError::disk(&bpath.to_string_lossy()))?;
            t.qcow2.backing_format = Some(f.name().to_owned());
        }
        create_image(&dst_spec.path, &t, total)?;
    }
    let mut dst_spec = dst_spec;
    if dst_spec.key_secret.is_none() {
        dst_spec.key_secret = t.encrypt_secret.clone();
    }
    // qemu-img writes conversion targets with cache=unsafe unless -t says otherwise: no
    // syncs at all (a crash mid-conversion leaves a partial image either way).
    let no_sync = target_cache_is_unsafe(p.get("t"))?;
    let target = open_image(
        &dst_spec,
        &secrets,
        OpenFlags {
            write: true,
            no_sync,
            ..OpenFlags::default()
        },
    )?;
    if target.dev.size() < total {
        return Err(ImgError::Msg(format!(
            "Target image is smaller than the source ({} < {total})",
            target.dev.size()
        )));
    }
    let tdev = target.dev.clone();
    let tbacking = tdev.backing();
    // A fresh target without backing reads zero everywhere: zero runs can be skipped.
    let explicit_zero = p.has("n") || tbacking.is_some();
    let cs = target.qcow2.as_ref().map_or(65536, |q| q.cluster_size());
    let chunk = CHUNK.max(cs);
    let progress = Progress::new(p.has("p") && !p.has("q"), total);
    // Reading and writing overlap: a reader thread walks the sources and hands chunks to
    // this thread, which writes them (qemu-img overlaps them with coroutines).
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Chunk, ImgError>>(4);
    // Buffers go back to the reader so that no chunk pays for a fresh zeroed allocation.
    let (pool_tx, pool_rx) = std::sync::mpsc::channel::<PageBuf>();
    let src_name = p.free[0].clone();
    std::thread::scope(|scope| -> Result<(), ImgError> {
        let sources = &sources;
        scope.spawn(move || read_chunks(sources, chunk, compress, &src_name, &tx, &pool_rx));
        let mut bbuf = Vec::new();
        for item in rx {
            let Chunk { at, len, data } = item?;
            match data {
                None if tbacking.is_none() => {
                    if explicit_zero {
                        tdev.write_zeroes(at, len, true)
                            .map_err(ImgError::disk(dst))?;
                    }
                }
                data => {
                    let n = usize::try_from(len).unwrap_or(0);
                    let buf = data.unwrap_or_else(|| PageBuf::new(n));
                    let data = &buf[..n];
                    if let Some(b) = &tbacking {
                        // Only what differs from the new backing file needs writing.
                        bbuf.resize(n, 0);
                        let avail = usize::try_from(b.size().saturating_sub(at))
                            .unwrap_or(usize::MAX)
                            .min(n);
                        b.read_at(at, &mut bbuf[..avail])
                            .map_err(ImgError::disk(dst))?;
                        bbuf[avail..].fill(0);
                        if bbuf[..n] != *data {
                            tdev.write_at(at, data).map_err(ImgError::disk(dst))?;
                        }
                    } else if compress {
                        let q = target
                            .qcow2
                            .as_ref()
                            .ok_or_else(|| ImgError::Msg("compression needs qcow2".into()))?;
                        write_compressed_run(q, at, data, cs).map_err(ImgError::disk(dst))?;
                    } else {
                        write_sparse(tdev.as_ref(), at, data, sparse, explicit_zero)
                            .map_err(ImgError::disk(dst))?;
                    }
                    let _ = pool_tx.send(buf);
                }
            }
            progress.set(at + len);
        }
        Ok(())
    })?;
    tdev.flush().map_err(ImgError::disk(dst))?;
    if let Some(q) = &target.qcow2 {
        q.close().map_err(ImgError::disk(dst))?;
    }
    progress.finish();
    Ok(0)
}

/// Writes a run compressed, cluster by cluster; partial clusters at the edges are completed
/// from the target (they can only be at the image end when runs are chunk aligned).
fn write_compressed_run(
    q: &Qcow2Image,
    at: u64,
    data: &[u8],
    cs: u64,
) -> Result<(), kiln_disk::DiskError> {
    let mut i = 0usize;
    let size = q.size();
    while i < data.len() {
        let off = at + i as u64;
        let in_cluster = off % cs;
        let n = usize::try_from((cs - in_cluster).min((data.len() - i) as u64)).unwrap_or(0);
        let piece = &data[i..i + n];
        if !is_zero(piece) {
            let cstart = off - in_cluster;
            let clen = cs.min(size - cstart);
            if in_cluster == 0 && n as u64 == clen {
                q.write_compressed(cstart, piece)?;
            } else {
                q.write_at(off, piece)?;
            }
        }
        i += n;
    }
    Ok(())
}

/// `compare [-f fmt] [-F fmt] [-p] [-q] [-s] filename1 filename2`
pub(crate) fn compare(args: &[String]) -> Result<i32, ImgError> {
    let p = parse(
        args,
        &[
            ('f', Arg::Yes),
            ('F', Arg::Yes),
            ('p', Arg::No),
            ('q', Arg::No),
            ('s', Arg::No),
            ('T', Arg::Yes),
            ('U', Arg::No),
        ],
        &[
            ("object", Arg::Yes),
            ("image-opts", Arg::No),
            ("force-share", Arg::No),
        ],
    )?;
    let secrets = secrets_of(&p)?;
    if p.free.len() != 2 {
        return Err(ImgError::Usage("Expecting two image file names".into()));
    }
    let quiet = p.has("q");
    let strict = p.has("s");
    let s1 = ImageSpec::parse(&p.free[0], p.get("f"), p.has("image-opts"))?;
    let s2 = ImageSpec::parse(&p.free[1], p.get("F").or(p.get("f")), p.has("image-opts"))?;
    let flags = OpenFlags {
        no_repair: true,
        ..OpenFlags::default()
    };
    let a = open_image(&s1, &secrets, flags)?;
    let b = open_image(&s2, &secrets, flags)?;
    let (ca, cb) = (chain_of(&a.dev), chain_of(&b.dev));
    let (za, zb) = (a.dev.size(), b.dev.size());
    let say = |m: &str| {
        if !quiet {
            println!("{m}");
        }
    };
    if za != zb && strict {
        say("Strict mode: Image size mismatch!");
        return Ok(1);
    }
    let common = za.min(zb);
    let progress = Progress::new(p.has("p") && !quiet, za.max(zb));
    let mut ba = PageBuf::new(usize::try_from(CHUNK).unwrap_or(1 << 21));
    let mut bb = PageBuf::new(ba.len());
    let mut pos = 0;
    while pos < common {
        let lim = (CHUNK - pos % CHUNK).min(common - pos);
        let sa = chain_status(&ca, pos, lim).map_err(ImgError::disk(&s1.path))?;
        let sb = chain_status(&cb, pos, lim).map_err(ImgError::disk(&s2.path))?;
        let len = sa.len.min(sb.len).max(1);
        if strict && sa.present != sb.present {
            say(&format!("Strict mode: Offset {pos} block status mismatch!"));
            return Ok(1);
        }
        if !(sa.zero && sb.zero) {
            let n = usize::try_from(len).unwrap_or(0);
            a.dev
                .read_at(pos, &mut ba[..n])
                .map_err(ImgError::disk(&s1.path))?;
            b.dev
                .read_at(pos, &mut bb[..n])
                .map_err(ImgError::disk(&s2.path))?;
            if let Some(k) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
                let off = (pos + k as u64) / 512 * 512;
                say(&format!("Content mismatch at offset {off}!"));
                return Ok(1);
            }
        }
        pos += len;
        progress.set(pos);
    }
    if za != zb {
        say("Warning: Image size mismatch!");
        let (big, chain, name) = if za > zb {
            (&a, &ca, &s1.path)
        } else {
            (&b, &cb, &s2.path)
        };
        let end = za.max(zb);
        let mut pos = common;
        while pos < end {
            let lim = (CHUNK - pos % CHUNK).min(end - pos);
            let st = chain_status(chain, pos, lim).map_err(ImgError::disk(name))?;
            let len = st.len.max(1).min(lim);
            if !st.zero {
                let n = usize::try_from(len).unwrap_or(0);
                big.dev
                    .read_at(pos, &mut ba[..n])
                    .map_err(ImgError::disk(name))?;
                if let Some(k) = ba[..n].iter().position(|&x| x != 0) {
                    say(&format!(
                        "Content mismatch at offset {}!",
                        (pos + k as u64) / 512 * 512
                    ));
                    return Ok(1);
                }
            }
            pos += len;
            progress.set(pos);
        }
    }
    progress.finish();
    say("Images are identical.");
    Ok(0)
}
