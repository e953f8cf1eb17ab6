//! Commands that change an image's relation to its chain or its size: `commit`, `rebase`,
//! `resize`.

use std::path::Path;

use kiln_disk::{BlockDevice, ExtentKind, ImageFormat};

use crate::args::{parse, parse_size, Arg};
use crate::output::Progress;
use crate::{
    chain_of, chain_paths, chain_status, open_image, parse_format, secrets_of, ImageSpec, ImgError,
    OpenFlags,
};

const CHUNK: u64 = 1 << 20;

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// `commit [-q] [-f fmt] [-b base] [-d] [-p] filename`
pub(crate) fn commit(args: &[String]) -> Result<i32, ImgError> {
    let p = parse(
        args,
        &[
            ('f', Arg::Yes),
            ('b', Arg::Yes),
            ('d', Arg::No),
            ('p', Arg::No),
            ('q', Arg::No),
            ('t', Arg::Yes),
            ('r', Arg::Yes),
        ],
        &[("object", Arg::Yes), ("image-opts", Arg::No)],
    )?;
    let secrets = secrets_of(&p)?;
    let Some(name) = p.free.first() else {
        return Err(ImgError::Usage("Expecting one image file name".into()));
    };
    let spec = ImageSpec::parse(name, p.get("f"), p.has("image-opts"))?;
    let top = open_image(&spec, &secrets, OpenFlags::default())?;
    let chain = chain_of(&top.dev);
    let paths = chain_paths(&spec.path);
    if chain.len() < 2 || paths.len() < 2 {
        return Err(ImgError::Msg("Image does not have a backing file".into()));
    }
    let depth = match p.get("b") {
        None => 1,
        Some(b) => paths
            .iter()
            .position(|x| same_file(x, Path::new(b)))
            .filter(|&i| i > 0)
            .ok_or_else(|| {
                ImgError::Msg(format!(
                    "Did not find '{b}' in the backing chain of '{}'",
                    spec.path
                ))
            })?,
    };
    let base_path = paths[depth].to_string_lossy().into_owned();
    let base_fmt = chain[depth].format();
    let base = open_image(
        &ImageSpec {
            path: base_path.clone(),
            format: Some(base_fmt),
            key_secret: None,
        },
        &secrets,
        OpenFlags {
            write: true,
            ..OpenFlags::default()
        },
    )?;
    let size = top.dev.size();
    if base.dev.size() < size {
        base.dev.resize(size).map_err(ImgError::disk(&base_path))?;
    }
    let above = &chain[..depth];
    let progress = Progress::new(p.has("p") && !p.has("q"), size);
    let mut buf = vec![0u8; usize::try_from(CHUNK).unwrap_or(1 << 20)];
    let mut pos = 0;
    while pos < size {
        let lim = (CHUNK - pos % CHUNK).min(size - pos);
        let st = chain_status(above, pos, lim).map_err(ImgError::disk(&spec.path))?;
        let len = st.len.max(1).min(lim);
        if st.present {
            if st.zero {
                base.dev
                    .write_zeroes(pos, len, false)
                    .map_err(ImgError::disk(&base_path))?;
            } else {
                let n = usize::try_from(len).unwrap_or(0);
                top.dev
                    .read_at(pos, &mut buf[..n])
                    .map_err(ImgError::disk(&spec.path))?;
                base.dev
                    .write_at(pos, &buf[..n])
                    .map_err(ImgError::disk(&base_path))?;
            }
        }
        pos += len;
        progress.set(pos);
    }
    base.dev.flush().map_err(ImgError::disk(&base_path))?;
    if let Some(q) = &base.qcow2 {
        q.close().map_err(ImgError::disk(&base_path))?;
    }
    drop(base);
    drop(chain);
    drop(top);
    // -b implies -d: the images in between are now stale, so the top keeps its data.
    if !p.has("d") && p.get("b").is_none() {
        let t = open_image(
            &spec,
            &secrets,
            OpenFlags {
                write: true,
                no_backing: true,
                ..OpenFlags::default()
            },
        )?;
        if let Some(q) = &t.qcow2 {
            q.make_empty().map_err(ImgError::disk(&spec.path))?;
            q.close().map_err(ImgError::disk(&spec.path))?;
        }
    }
    progress.finish();
    if !p.has("q") {
        println!("Image committed.");
    }
    Ok(0)
}

/// `rebase [-q] [-f fmt] [-p] [-u] -b backing [-F fmt] filename`
pub(crate) fn rebase(args: &[String]) -> Result<i32, ImgError> {
    let p = parse(
        args,
        &[
            ('f', Arg::Yes),
            ('F', Arg::Yes),
            ('b', Arg::Yes),
            ('u', Arg::No),
            ('p', Arg::No),
            ('q', Arg::No),
            ('c', Arg::No),
            ('t', Arg::Yes),
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
    let Some(name) = p.free.first() else {
        return Err(ImgError::Usage("Expecting one image file name".into()));
    };
    let Some(new_backing) = p.get("b") else {
        return Err(ImgError::Usage(
            "Must specify backing file (-b) or use '' as argument".into(),
        ));
    };
    let spec = ImageSpec::parse(name, p.get("f"), p.has("image-opts"))?;
    let new_backing = (!new_backing.is_empty()).then_some(new_backing);
    let resolved = new_backing.map(|b| kiln_disk::qcow2::resolve_backing(Path::new(&spec.path), b));
    let mut new_fmt = parse_format(p.get("F"))?;
    if p.has("u") {
        if new_fmt.is_none() {
            if let Some(r) = &resolved {
                new_fmt = kiln_disk::probe(r).ok();
            }
        }
        let img = open_image(
            &spec,
            &secrets,
            OpenFlags {
                write: true,
                no_backing: true,
                ..OpenFlags::default()
            },
        )?;
        let q = img.qcow2.ok_or_else(|| {
            ImgError::Msg(
                "Could not change the backing file: format does not support backing files".into(),
            )
        })?;
        q.set_backing(new_backing, new_fmt.map(ImageFormat::name))
            .map_err(ImgError::disk(&spec.path))?;
        return Ok(0);
    }
    let img = open_image(
        &spec,
        &secrets,
        OpenFlags {
            write: true,
            ..OpenFlags::default()
        },
    )?;
    let q = img.qcow2.clone().ok_or_else(|| {
        ImgError::Msg(
            "Could not change the backing file: format does not support backing files".into(),
        )
    })?;
    let old = img.dev.backing();
    let new = match &resolved {
        Some(r) => {
            let rs = r.to_string_lossy().into_owned();
            let o = open_image(
                &ImageSpec {
                    path: rs.clone(),
                    format: new_fmt,
                    key_secret: None,
                },
                &secrets,
                OpenFlags {
                    no_repair: true,
                    ..OpenFlags::default()
                },
            )
            .map_err(|e| {
                ImgError::Msg(format!(
                    "Could not open new backing file '{rs}': {}",
                    crate::one_line(&e)
                ))
            })?;
            new_fmt = Some(o.format);
            Some(o.dev)
        }
        None => None,
    };
    let size = img.dev.size();
    let progress = Progress::new(p.has("p") && !p.has("q"), size);
    let n = usize::try_from(CHUNK).unwrap_or(1 << 20);
    let (mut a, mut b) = (vec![0u8; n], vec![0u8; n]);
    let read_layer = |dev: &Option<std::sync::Arc<dyn BlockDevice>>,
                      pos: u64,
                      buf: &mut [u8]|
     -> Result<(), kiln_disk::DiskError> {
        match dev {
            None => {
                buf.fill(0);
                Ok(())
            }
            Some(d) => {
                let avail = usize::try_from(d.size().saturating_sub(pos))
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                d.read_at(pos, &mut buf[..avail])?;
                buf[avail..].fill(0);
                Ok(())
            }
        }
    };
    let mut pos = 0;
    while pos < size {
        let lim = (CHUNK - pos % CHUNK).min(size - pos);
        let st = img
            .dev
            .block_status(pos, lim)
            .map_err(ImgError::disk(&spec.path))?;
        let len = st.len.max(1).min(lim);
        if st.kind == ExtentKind::Unallocated {
            let k = usize::try_from(len).unwrap_or(0);
            read_layer(&old, pos, &mut a[..k]).map_err(ImgError::disk(&spec.path))?;
            read_layer(&new, pos, &mut b[..k]).map_err(ImgError::disk(&spec.path))?;
            if a[..k] != b[..k] {
                img.dev
                    .write_at(pos, &a[..k])
                    .map_err(ImgError::disk(&spec.path))?;
            }
        }
        pos += len;
        progress.set(pos);
    }
    img.dev.flush().map_err(ImgError::disk(&spec.path))?;
    q.set_backing(new_backing, new_fmt.map(ImageFormat::name))
        .map_err(ImgError::disk(&spec.path))?;
    q.replace_backing(new);
    progress.finish();
    Ok(0)
}

/// `resize [-f fmt] [--preallocation=mode] [-q] [--shrink] filename [+|-]size`
pub(crate) fn resize(args: &[String]) -> Result<i32, ImgError> {
    // A size like "-1G" would read as an option: take the last word first.
    let Some((size_arg, rest)) = args.split_last() else {
        return Err(ImgError::Usage("Expecting image file name and size".into()));
    };
    let p = parse(
        rest,
        &[('f', Arg::Yes), ('q', Arg::No), ('U', Arg::No)],
        &[
            ("object", Arg::Yes),
            ("image-opts", Arg::No),
            ("shrink", Arg::No),
            ("preallocation", Arg::Yes),
        ],
    )?;
    if let Some(pre) = p.get("preallocation") {
        if pre != "off" {
            return Err(ImgError::Msg(format!(
                "Unsupported preallocation mode '{pre}' for resize"
            )));
        }
    }
    let secrets = secrets_of(&p)?;
    let Some(name) = p.free.first() else {
        return Err(ImgError::Usage("Expecting image file name and size".into()));
    };
    let spec = ImageSpec::parse(name, p.get("f"), p.has("image-opts"))?;
    let img = open_image(
        &spec,
        &secrets,
        OpenFlags {
            write: true,
            ..OpenFlags::default()
        },
    )?;
    let cur = img.dev.size();
    let new = if let Some(d) = size_arg.strip_prefix('+') {
        cur.checked_add(parse_size(d)?)
            .ok_or_else(|| ImgError::Usage("size overflow".into()))?
    } else if let Some(d) = size_arg.strip_prefix('-') {
        cur.checked_sub(parse_size(d)?)
            .ok_or_else(|| ImgError::Msg("New image size must be positive".into()))?
    } else {
        parse_size(size_arg)?
    };
    if new < cur {
        if img.format == ImageFormat::Qcow2 && !p.has("shrink") {
            return Err(ImgError::Msg(
                "Use the --shrink option to perform a shrink operation.".into(),
            ));
        }
        eprintln!("kiln img: warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.");
    }
    img.dev.resize(new).map_err(ImgError::disk(&spec.path))?;
    if let Some(q) = &img.qcow2 {
        q.close().map_err(ImgError::disk(&spec.path))?;
    }
    if !p.has("q") {
        println!("Image resized.");
    }
    Ok(0)
}
