//! `info`, `map` and `measure`.

use std::path::Path;
use std::sync::Arc;

use kiln_disk::crypto::LuksHeader;
use kiln_disk::qcow2::{Prealloc, Qcow2Info, Snapshot};
use kiln_disk::{BlockDevice, ImageFormat};

use crate::args::{parse, parse_size, Arg};
use crate::cmd_check::snapshot_table;
use crate::cmd_create::target_options;
use crate::output::{human_size, human_tree, Json};
use crate::{
    chain_of, chain_paths, chain_status, open_image, secrets_of, ImageSpec, ImgError, OpenFlags,
    Opened,
};

fn output_kind(v: Option<&str>) -> Result<bool, ImgError> {
    match v.unwrap_or("human") {
        "human" => Ok(false),
        "json" => Ok(true),
        other => Err(ImgError::Usage(format!(
            "--output must be used with human or json as argument (got '{other}')"
        ))),
    }
}

fn snapshot_json(s: &Snapshot) -> Json {
    let mut v = Vec::new();
    if let Some(i) = s.icount {
        v.push(("icount", Json::u(i)));
    }
    v.extend([
        ("vm-clock-nsec", Json::u(s.vm_clock_nsec % 1_000_000_000)),
        ("name", Json::s(&s.name)),
        ("date-sec", Json::u(u64::from(s.date_sec))),
        ("date-nsec", Json::u(u64::from(s.date_nsec))),
        ("vm-clock-sec", Json::u(s.vm_clock_nsec / 1_000_000_000)),
        ("id", Json::s(&s.id)),
        ("vm-state-size", Json::u(s.vm_state_size)),
    ]);
    Json::obj(v)
}

/// qemu's QCryptoBlockInfoLUKS, keys in the order qemu prints them.
fn luks_json(h: &LuksHeader) -> Json {
    let (mode, iv) = h
        .cipher_mode
        .split_once('-')
        .unwrap_or((h.cipher_mode.as_str(), ""));
    let (ivgen, ivhash) = iv.split_once(':').unwrap_or((iv, ""));
    // XTS splits the key in two halves.
    let bits = h.key_bytes * 8 / if mode == "xts" { 2 } else { 1 };
    let mut v = Vec::new();
    if !ivgen.is_empty() {
        v.push(("ivgen-alg", Json::s(ivgen)));
    }
    v.push(("hash-alg", Json::s(&h.hash_spec)));
    v.push(("cipher-alg", Json::s(&format!("{}-{bits}", h.cipher_name))));
    v.push(("uuid", Json::s(&h.uuid)));
    if !ivhash.is_empty() {
        v.push(("ivgen-hash-alg", Json::s(ivhash)));
    }
    v.push(("format", Json::s("luks")));
    v.push(("cipher-mode", Json::s(mode)));
    let slots = h
        .slot_info()
        .iter()
        .map(|s| {
            if s.active {
                Json::obj(vec![
                    ("active", Json::Bool(true)),
                    ("iters", Json::u(u64::from(s.iterations))),
                    ("key-offset", Json::u(s.key_offset)),
                    ("stripes", Json::u(u64::from(s.stripes))),
                ])
            } else {
                Json::obj(vec![
                    ("active", Json::Bool(false)),
                    ("key-offset", Json::u(s.key_offset)),
                ])
            }
        })
        .collect();
    v.push(("slots", Json::Arr(slots)));
    v.push(("payload-offset", Json::u(u64::from(h.payload_offset) * 512)));
    v.push(("master-key-iters", Json::u(u64::from(h.mk_digest_iter))));
    Json::obj(v)
}

fn qcow2_specific(q: &Qcow2Info, luks: Option<&LuksHeader>) -> Vec<(&'static str, Json)> {
    let mut v = vec![(
        "compat",
        Json::s(if q.version == 2 { "0.10" } else { "1.1" }),
    )];
    v.push(("compression-type", Json::s(q.compression.name())));
    if q.version >= 3 {
        v.push(("lazy-refcounts", Json::Bool(q.lazy_refcounts)));
    }
    v.push(("refcount-bits", Json::u(u64::from(q.refcount_bits))));
    if let Some(h) = luks {
        v.push(("encrypt", luks_json(h)));
    } else if q.crypt_method == 2 {
        v.push(("encrypt", Json::obj(vec![("format", Json::s("luks"))])));
    } else if q.crypt_method == 1 {
        v.push(("encrypt", Json::obj(vec![("format", Json::s("aes"))])));
    }
    if q.version >= 3 {
        v.push(("corrupt", Json::Bool(q.corrupt)));
        v.push(("extended-l2", Json::Bool(q.extended_l2)));
    }
    v
}

struct ImageInfo {
    json: Json,
    human: String,
}

fn describe(o: &Opened, display: &str) -> Result<ImageInfo, ImgError> {
    let dev = &o.dev;
    let actual = dev.allocated_size().map_err(ImgError::disk(display))?;
    let size = dev.size();
    let mut j: Vec<(&str, Json)> = Vec::new();
    let mut h = format!(
        "image: {display}\nfile format: {}\nvirtual size: {} ({size} bytes)\ndisk size: {}\n",
        o.format.name(),
        human_size(size),
        human_size(actual)
    );
    let q = o.qcow2.as_ref().map(|q| q.info());
    let luks = match &o.qcow2 {
        Some(img) => img.luks_header().map_err(ImgError::disk(display))?,
        None => None,
    };
    if q.as_ref().is_some_and(|q| q.crypt_method != 0) {
        h.push_str("encrypted: yes\n");
    }
    if let Some(q) = &q {
        if let Some(f) = &q.backing_format {
            j.push(("backing-filename-format", Json::s(f)));
        }
        if !q.snapshots.is_empty() {
            j.push((
                "snapshots",
                Json::Arr(q.snapshots.iter().map(snapshot_json).collect()),
            ));
        }
    }
    j.push(("virtual-size", Json::u(size)));
    j.push(("filename", Json::s(display)));
    if let Some(q) = &q {
        j.push(("cluster-size", Json::u(q.cluster_size)));
        h.push_str(&format!("cluster_size: {}\n", q.cluster_size));
    }
    j.push(("format", Json::s(o.format.name())));
    j.push(("actual-size", Json::u(actual)));
    if let Some(q) = &q {
        j.push((
            "format-specific",
            Json::obj(vec![
                ("type", Json::s("qcow2")),
                ("data", Json::obj(qcow2_specific(q, luks.as_ref()))),
            ]),
        ));
        // (qemu's key order is its hash table's: "encrypted" falls between these two.)
        let full_backing = q.backing_file.as_ref().map(|b| {
            kiln_disk::qcow2::resolve_backing(Path::new(display), b)
                .to_string_lossy()
                .into_owned()
        });
        if let Some(full) = &full_backing {
            j.push(("full-backing-filename", Json::s(full)));
        }
        if q.crypt_method != 0 {
            j.push(("encrypted", Json::Bool(true)));
        }
        if let (Some(b), Some(full)) = (&q.backing_file, full_backing) {
            j.push(("backing-filename", Json::s(b)));
            if &full == b {
                h.push_str(&format!("backing file: {b}\n"));
            } else {
                h.push_str(&format!("backing file: {b} (actual path: {full})\n"));
            }
            if let Some(f) = &q.backing_format {
                h.push_str(&format!("backing file format: {f}\n"));
            }
        }
        if q.dirty {
            h.push_str("dirty flag: yes\n");
        }
        if !q.snapshots.is_empty() {
            h.push_str(&snapshot_table(&q.snapshots));
        }
        h.push_str("Format specific information:\n");
        let data: Vec<(String, Json)> = qcow2_specific(q, luks.as_ref())
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        human_tree(&mut h, 1, &data);
    }
    j.push((
        "dirty-flag",
        Json::Bool(q.as_ref().is_some_and(|q| q.dirty)),
    ));
    Ok(ImageInfo {
        json: Json::obj(j),
        human: h,
    })
}

/// `info [--object] [--image-opts] [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename`
pub(crate) fn info(args: &[String]) -> Result<i32, ImgError> {
    let p = parse(
        args,
        &[('f', Arg::Yes), ('U', Arg::No), ('h', Arg::No)],
        &[
            ("object", Arg::Yes),
            ("image-opts", Arg::No),
            ("output", Arg::Yes),
            ("backing-chain", Arg::No),
            ("force-share", Arg::No),
        ],
    )?;
    let json = output_kind(p.get("output"))?;
    let secrets = secrets_of(&p)?;
    let Some(name) = p.free.first() else {
        return Err(ImgError::Usage("Expecting one image file name".into()));
    };
    let spec = ImageSpec::parse(name, p.get("f"), p.has("image-opts"))?;
    let mut infos = Vec::new();
    if p.has("backing-chain") {
        let paths = chain_paths(&spec.path);
        for (i, path) in paths.iter().enumerate() {
            let s = path.to_string_lossy().into_owned();
            let lspec = if i == 0 {
                spec.clone()
            } else {
                ImageSpec {
                    path: s.clone(),
                    format: None,
                    key_secret: None,
                }
            };
            let flags = OpenFlags {
                no_backing: true,
                no_repair: true,
                header_only: true,
                ..OpenFlags::default()
            };
            let o = open_image(&lspec, &secrets, flags)?;
            infos.push(describe(&o, &s)?);
        }
    } else {
        let flags = OpenFlags {
            no_backing: true,
            no_repair: true,
            header_only: true,
            ..OpenFlags::default()
        };
        let o = open_image(&spec, &secrets, flags)?;
        infos.push(describe(&o, &spec.path)?);
    }
    if json {
        if p.has("backing-chain") {
            println!(
                "{}",
                Json::Arr(infos.into_iter().map(|i| i.json).collect()).pretty()
            );
        } else if let Some(i) = infos.into_iter().next() {
            println!("{}", i.json.pretty());
        }
    } else {
        let parts: Vec<String> = infos.into_iter().map(|i| i.human).collect();
        print!("{}", parts.join("\n"));
    }
    Ok(0)
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct MapEntry {
    start: u64,
    length: u64,
    depth: usize,
    present: bool,
    zero: bool,
    data: bool,
    offset: Option<u64>,
}

/// `map [--object] [--image-opts] [-f fmt] [--start-offset=N] [--max-length=N] [--output=ofmt] filename`
pub(crate) fn map(args: &[String]) -> Result<i32, ImgError> {
    let p = parse(
        args,
        &[('f', Arg::Yes), ('U', Arg::No)],
        &[
            ("object", Arg::Yes),
            ("image-opts", Arg::No),
            ("output", Arg::Yes),
            ("start-offset", Arg::Yes),
            ("max-length", Arg::Yes),
            ("force-share", Arg::No),
        ],
    )?;
    let json = output_kind(p.get("output"))?;
    let secrets = secrets_of(&p)?;
    let Some(name) = p.free.first() else {
        return Err(ImgError::Usage("Expecting one image file name".into()));
    };
    let spec = ImageSpec::parse(name, p.get("f"), p.has("image-opts"))?;
    let o = open_image(
        &spec,
        &secrets,
        OpenFlags {
            no_repair: true,
            ..OpenFlags::default()
        },
    )?;
    let chain = chain_of(&o.dev);
    let names = chain_paths(&spec.path);
    let size = o.dev.size();
    let start = p
        .get("start-offset")
        .map(parse_size)
        .transpose()?
        .unwrap_or(0)
        .min(size);
    let end = match p.get("max-length") {
        Some(l) => start.saturating_add(parse_size(l)?).min(size),
        None => size,
    };
    let mut entries: Vec<MapEntry> = Vec::new();
    let mut pos = start;
    while pos < end {
        let st = chain_status(&chain, pos, (end - pos).min(1 << 30))
            .map_err(ImgError::disk(&spec.path))?;
        let e = MapEntry {
            start: pos,
            length: st.len,
            depth: st.depth,
            present: st.present,
            zero: st.zero,
            data: st.data,
            offset: st.offset,
        };
        match entries.last_mut() {
            Some(last)
                if last.depth == e.depth
                    && last.present == e.present
                    && last.zero == e.zero
                    && last.data == e.data
                    && match (last.offset, e.offset) {
                        (Some(a), Some(b)) => a + last.length == b,
                        (None, None) => true,
                        _ => false,
                    } =>
            {
                last.length += e.length;
            }
            _ => entries.push(e),
        }
        pos += st.len.max(1);
    }
    if json {
        let lines: Vec<String> = entries
            .iter()
            .map(|e| {
                let mut s = format!(
                    "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}",
                    e.start, e.length, e.depth, e.present, e.zero, e.data
                );
                if let Some(off) = e.offset {
                    s.push_str(&format!(", \"offset\": {off}"));
                }
                s.push('}');
                s
            })
            .collect();
        println!("[{}]", lines.join(",\n"));
    } else {
        println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
        let hex = |v: u64| {
            if v == 0 {
                "0".to_owned()
            } else {
                format!("{v:#x}")
            }
        };
        for e in entries.iter().filter(|e| e.data && !e.zero) {
            let Some(off) = e.offset else {
                // qemu-img stops here too (after the header line).
                return Err(ImgError::Msg(
                    "File contains external, encrypted or compressed clusters.".into(),
                ));
            };
            let file = names
                .get(e.depth)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            println!(
                "{:<16}{:<16}{:<16}{file}",
                hex(e.start),
                hex(e.length),
                hex(off)
            );
        }
    }
    Ok(0)
}

/// Data bytes a conversion would have to store: allocated, non-zero extents of the chain,
/// counted per target cluster.
fn data_clusters(dev: &Arc<dyn BlockDevice>, cluster: u64) -> Result<u64, kiln_disk::DiskError> {
    let chain = chain_of(dev);
    let size = dev.size();
    let mut pos = 0;
    let mut last_counted = u64::MAX;
    let mut bytes = 0;
    while pos < size {
        let st = chain_status(&chain, pos, size - pos)?;
        if !st.zero {
            let first = pos / cluster;
            let last = (pos + st.len - 1) / cluster;
            let from = if first == last_counted {
                first + 1
            } else {
                first
            };
            if last >= from {
                bytes += (last - from + 1) * cluster;
            }
            last_counted = last;
        }
        pos += st.len.max(1);
    }
    Ok(bytes)
}

fn refcount_metadata(clusters: u64, cs: u64, refcount_bits: u64) -> u64 {
    let per_table_cluster = cs / 8;
    let per_block = cs * 8 / refcount_bits;
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            return (blocks + table) * cs;
        }
    }
}

/// qemu's fully allocated size of a qcow2 image.
fn qcow2_full_size(size: u64, cs: u64, refcount_bits: u64, extended_l2: bool) -> u64 {
    let aligned = size.div_ceil(cs) * cs;
    let l2e = if extended_l2 { 16 } else { 8 };
    let mut meta = cs;
    let nl2e = (aligned / cs).div_ceil(cs / l2e) * (cs / l2e);
    meta += nl2e * l2e;
    let nl1e = (nl2e * l2e / cs).div_ceil(cs / 8) * (cs / 8);
    meta += nl1e * 8;
    meta += refcount_metadata((meta + aligned) / cs, cs, refcount_bits);
    meta + aligned
}

/// `measure [--output=ofmt] [-O fmt] [-o options] [--size N | [-f fmt] [-l snap] filename]`
pub(crate) fn measure(args: &[String]) -> Result<i32, ImgError> {
    let p = parse(
        args,
        &[
            ('f', Arg::Yes),
            ('O', Arg::Yes),
            ('o', Arg::Yes),
            ('l', Arg::Yes),
            ('U', Arg::No),
        ],
        &[
            ("object", Arg::Yes),
            ("image-opts", Arg::No),
            ("output", Arg::Yes),
            ("size", Arg::Yes),
            ("force-share", Arg::No),
        ],
    )?;
    let json = output_kind(p.get("output"))?;
    let secrets = secrets_of(&p)?;
    let out_fmt =
        crate::parse_format(Some(p.get("O").unwrap_or("raw")))?.unwrap_or(ImageFormat::Raw);
    let t = target_options(out_fmt, &p.all("o"), &secrets)?;
    let (virt, data, has_source) = match (p.get("size"), p.free.first()) {
        (Some(_), Some(_)) => {
            return Err(ImgError::Usage(
                "--size N cannot be used together with a filename".into(),
            ))
        }
        (None, None) => {
            return Err(ImgError::Usage(
                "Either --size N or one filename must be specified".into(),
            ))
        }
        (Some(s), None) => {
            let v = parse_size(s)?;
            (
                v,
                Some(if out_fmt == ImageFormat::Raw { v } else { 0 }),
                false,
            )
        }
        (None, Some(name)) => {
            let spec = ImageSpec::parse(name, p.get("f"), p.has("image-opts"))?;
            let o = open_image(
                &spec,
                &secrets,
                OpenFlags {
                    no_repair: true,
                    ..OpenFlags::default()
                },
            )?;
            let cs = if out_fmt == ImageFormat::Qcow2 {
                t.qcow2.cluster_size
            } else {
                512
            };
            let d = data_clusters(&o.dev, cs).map_err(ImgError::disk(&spec.path))?;
            (o.dev.size(), Some(d), true)
        }
    };
    let (required, full) = match out_fmt {
        ImageFormat::Raw => (data.unwrap_or(virt), virt),
        ImageFormat::Qcow2 => {
            let q = &t.qcow2;
            let mut full = qcow2_full_size(
                virt,
                q.cluster_size,
                u64::from(q.refcount_bits),
                q.extended_l2,
            );
            if q.encrypt.is_some() {
                // LUKS header with 8 slots of 4000 stripes of a 64-byte key, cluster aligned.
                full += (4040u64 * 512).div_ceil(q.cluster_size) * q.cluster_size;
            }
            let aligned = virt.div_ceil(q.cluster_size) * q.cluster_size;
            let data = if q.preallocation != Prealloc::Off {
                aligned
            } else {
                data.unwrap_or(aligned)
            };
            (full - aligned + data, full)
        }
    };
    if json {
        let mut v = vec![
            ("required", Json::u(required)),
            ("fully-allocated", Json::u(full)),
        ];
        if has_source && out_fmt == ImageFormat::Qcow2 {
            v.push(("bitmaps", Json::u(0)));
        }
        println!("{}", Json::obj(v).pretty());
    } else {
        println!("required size: {required}\nfully allocated size: {full}");
        if has_source && out_fmt == ImageFormat::Qcow2 {
            println!("bitmaps size: 0");
        }
    }
    Ok(0)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn full_size_matches_qemu_measure() {
        // `qemu-img measure --size 1G -O qcow2` says 1074135040; 8 MiB gives 8716288.
        assert_eq!(qcow2_full_size(1 << 30, 65536, 16, false), 1_074_135_040);
        assert_eq!(qcow2_full_size(8 << 20, 65536, 16, false), 8_716_288);
    }
}
