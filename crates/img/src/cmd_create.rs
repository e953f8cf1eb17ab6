//! `create`, and the `-o` option handling shared with convert and measure.

use std::path::Path;

use kiln_disk::qcow2::{CompressionType, CreateOptions, EncryptOptions, Prealloc};
use kiln_disk::raw::RawPrealloc;
use kiln_disk::{ImageFormat, Qcow2Image, RawImage};

use crate::args::{parse, parse_size, split_opts, Arg, Secrets};
use crate::{open_image, parse_format, secrets_of, ImageSpec, ImgError, OpenFlags};

/// Target settings gathered from `-o`, `-b`, `-F` and the size argument.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub format: ImageFormat,
    pub qcow2: CreateOptions,
    pub raw_prealloc: RawPrealloc,
    pub size: Option<u64>,
    /// Print form of the options, in qemu's "Formatting" order.
    pub encrypt_secret: Option<String>,
}

fn on_off(key: &str, v: &str) -> Result<bool, ImgError> {
    match v {
        "on" | "true" | "yes" | "" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(ImgError::Usage(format!(
            "Parameter '{key}' expects 'on' or 'off'"
        ))),
    }
}

/// Applies `-o` option strings for `format`.
pub(crate) fn target_options(
    format: ImageFormat,
    opts: &[&str],
    secrets: &Secrets,
) -> Result<Target, ImgError> {
    let mut t = Target {
        format,
        qcow2: CreateOptions::default(),
        raw_prealloc: RawPrealloc::Off,
        size: None,
        encrypt_secret: None,
    };
    let mut encrypt_format: Option<String> = None;
    let mut iter_time = 2000u64;
    for o in opts {
        for (k, v) in split_opts(o) {
            if k == "help" || k == "?" {
                return Err(ImgError::Usage(format!(
                    "supported options for {}: size, backing_file, backing_fmt, cluster_size, compat, refcount_bits, extended_l2, lazy_refcounts, preallocation, compression_type, encrypt.format, encrypt.key-secret, encrypt.iter-time",
                    format.name()
                )));
            }
            let q = &mut t.qcow2;
            match (format, k.as_str()) {
                (_, "size") => t.size = Some(parse_size(&v)?),
                (ImageFormat::Raw, "preallocation") => {
                    t.raw_prealloc = match v.as_str() {
                        "off" => RawPrealloc::Off,
                        "falloc" => RawPrealloc::Falloc,
                        "full" => RawPrealloc::Full,
                        _ => return Err(ImgError::Usage(format!("Invalid parameter '{v}'"))),
                    }
                }
                (ImageFormat::Qcow2, "cluster_size") => q.cluster_size = parse_size(&v)?,
                (ImageFormat::Qcow2, "compat") => {
                    q.version = match v.as_str() {
                        "0.10" | "v2" => 2,
                        "1.1" | "v3" => 3,
                        _ => return Err(ImgError::Usage(format!("Invalid parameter '{v}'"))),
                    }
                }
                (ImageFormat::Qcow2, "refcount_bits") => {
                    q.refcount_bits = v
                        .parse()
                        .map_err(|_| ImgError::Usage(format!("Invalid refcount_bits '{v}'")))?
                }
                (ImageFormat::Qcow2, "extended_l2") => q.extended_l2 = on_off(&k, &v)?,
                (ImageFormat::Qcow2, "lazy_refcounts") => q.lazy_refcounts = on_off(&k, &v)?,
                (ImageFormat::Qcow2, "preallocation") => {
                    q.preallocation = Prealloc::parse(&v)
                        .ok_or_else(|| ImgError::Usage(format!("Invalid parameter '{v}'")))?
                }
                (ImageFormat::Qcow2, "compression_type") => {
                    q.compression = match v.as_str() {
                        "zlib" => CompressionType::Deflate,
                        "zstd" => CompressionType::Zstd,
                        _ => return Err(ImgError::Usage(format!("Invalid parameter '{v}'"))),
                    }
                }
                (ImageFormat::Qcow2, "backing_file") => q.backing_file = Some(v),
                (ImageFormat::Qcow2, "backing_fmt") => q.backing_format = Some(v),
                (ImageFormat::Qcow2, "encrypt.format") => encrypt_format = Some(v),
                (ImageFormat::Qcow2, "encryption") if on_off(&k, &v)? => {
                    encrypt_format = Some("aes".into())
                }
                (ImageFormat::Qcow2, "encryption") => {}
                (ImageFormat::Qcow2, "encrypt.key-secret") => t.encrypt_secret = Some(v),
                (ImageFormat::Qcow2, "encrypt.iter-time") => {
                    iter_time = v
                        .parse()
                        .map_err(|_| ImgError::Usage(format!("Invalid iter-time '{v}'")))?
                }
                (ImageFormat::Qcow2, "encrypt.cipher-alg") if v == "aes-256" => {}
                (ImageFormat::Qcow2, "encrypt.cipher-mode") if v == "xts" => {}
                (ImageFormat::Qcow2, "encrypt.ivgen-alg") if v == "plain64" => {}
                (ImageFormat::Qcow2, "encrypt.hash-alg") if v == "sha256" => {}
                _ => {
                    return Err(ImgError::Usage(format!(
                        "Invalid parameter '{k}'{}",
                        if k.starts_with("encrypt.") {
                            " (only aes-256, xts, plain64, sha256 are supported)"
                        } else {
                            ""
                        }
                    )))
                }
            }
        }
    }
    match encrypt_format.as_deref() {
        None => {}
        Some("luks") => {
            let id = t
                .encrypt_secret
                .clone()
                .ok_or_else(|| ImgError::Usage("Parameter 'encrypt.key-secret' is required for cipher".into()))?;
            t.qcow2.encrypt = Some(EncryptOptions {
                passphrase: secrets.get(&id)?,
                iter_time_ms: iter_time,
            });
        }
        Some("aes") => {
            return Err(ImgError::Msg(
                "creating legacy AES-encrypted images is not supported (use encrypt.format=luks); they can be read".into(),
            ))
        }
        Some(other) => return Err(ImgError::Usage(format!("Invalid encrypt.format '{other}'"))),
    }
    Ok(t)
}

/// qemu-img's "Formatting ..." line.
pub(crate) fn formatting_line(path: &str, t: &Target, size: u64) -> String {
    match t.format {
        ImageFormat::Raw => format!("Formatting '{path}', fmt=raw size={size}"),
        ImageFormat::Qcow2 => {
            let q = &t.qcow2;
            let mut s = format!(
                "Formatting '{path}', fmt=qcow2 cluster_size={}",
                q.cluster_size
            );
            if q.encrypt.is_some() {
                s.push_str(" encrypt.format=luks");
                if let Some(id) = &t.encrypt_secret {
                    s.push_str(&format!(" encrypt.key-secret={id}"));
                }
            }
            if q.preallocation != Prealloc::Off {
                let p = match q.preallocation {
                    Prealloc::Metadata => "metadata",
                    Prealloc::Falloc => "falloc",
                    Prealloc::Full => "full",
                    Prealloc::Off => "off",
                };
                s.push_str(&format!(" preallocation={p}"));
            }
            if q.version == 2 {
                s.push_str(" compat=0.10");
            }
            s.push_str(&format!(
                " extended_l2={} compression_type={} size={size}",
                if q.extended_l2 { "on" } else { "off" },
                q.compression.name()
            ));
            if let Some(b) = &q.backing_file {
                s.push_str(&format!(" backing_file={b}"));
            }
            if let Some(f) = &q.backing_format {
                s.push_str(&format!(" backing_fmt={f}"));
            }
            s.push_str(&format!(
                " lazy_refcounts={} refcount_bits={}",
                if q.lazy_refcounts { "on" } else { "off" },
                q.refcount_bits
            ));
            s
        }
    }
}

/// Creates the image described by `t` at `path`.
pub(crate) fn create_image(path: &str, t: &Target, size: u64) -> Result<(), ImgError> {
    match t.format {
        ImageFormat::Raw => {
            RawImage::create(Path::new(path), size, t.raw_prealloc).map_err(ImgError::disk(path))
        }
        ImageFormat::Qcow2 => {
            let mut o = t.qcow2.clone();
            o.size = size;
            Qcow2Image::create(Path::new(path), &o).map_err(|e| ImgError::Disk {
                path: path.to_owned(),
                source: e,
            })
        }
    }
}

/// `create [-q] [-f fmt] [-b backing [-F fmt]] [-u] [-o options] filename [size]`
pub(crate) fn create(args: &[String]) -> Result<i32, ImgError> {
    let p = parse(
        args,
        &[
            ('f', Arg::Yes),
            ('b', Arg::Yes),
            ('F', Arg::Yes),
            ('o', Arg::Yes),
            ('q', Arg::No),
            ('u', Arg::No),
            ('e', Arg::No),
            ('6', Arg::No),
        ],
        &[("object", Arg::Yes), ("help", Arg::No)],
    )?;
    let secrets = secrets_of(&p)?;
    let format = parse_format(Some(p.get("f").unwrap_or("raw")))?.unwrap_or(ImageFormat::Raw);
    let Some(path) = p.free.first() else {
        return Err(ImgError::Usage("Expecting image file name".into()));
    };
    let mut t = target_options(format, &p.all("o"), &secrets)?;
    if let Some(b) = p.get("b") {
        t.qcow2.backing_file = Some(b.to_owned());
    }
    if let Some(f) = p.get("F") {
        t.qcow2.backing_format = Some(f.to_owned());
    }
    if t.qcow2.backing_file.is_some() && format != ImageFormat::Qcow2 {
        return Err(ImgError::Msg(format!(
            "Backing file not supported for file format '{}'",
            format.name()
        )));
    }
    let mut size = match p.free.get(1) {
        Some(s) => Some(parse_size(s)?),
        None => t.size,
    };
    if let Some(b) = t.qcow2.backing_file.clone() {
        let resolved = kiln_disk::qcow2::resolve_backing(Path::new(path), &b);
        let rs = resolved.to_string_lossy().into_owned();
        if !p.has("u") || size.is_none() {
            let spec = ImageSpec {
                path: rs.clone(),
                format: parse_format(t.qcow2.backing_format.as_deref())?,
                key_secret: None,
            };
            let header = OpenFlags {
                header_only: true,
                ..OpenFlags::default()
            };
            let opened = open_image(&spec, &secrets, header).map_err(|e| {
                ImgError::Msg(format!(
                    "Could not open backing image '{rs}': {}",
                    crate::one_line(&e)
                ))
            })?;
            if t.qcow2.backing_format.is_none() {
                t.qcow2.backing_format = Some(opened.format.name().to_owned());
            }
            if size.is_none() {
                size = Some(opened.dev.size());
            }
        }
    }
    let Some(size) = size else {
        return Err(ImgError::Usage(
            "Image creation needs a size parameter".into(),
        ));
    };
    if !p.has("q") {
        println!("{}", formatting_line(path, &t, size));
    }
    create_image(path, &t, size)?;
    Ok(0)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn qcow2_options_map_to_create_options() {
        let t = target_options(
            ImageFormat::Qcow2,
            &[
                "cluster_size=4k,compat=0.10",
                "lazy_refcounts=off,refcount_bits=16",
            ],
            &Secrets::default(),
        )
        .unwrap();
        assert_eq!(t.qcow2.cluster_size, 4096);
        assert_eq!(t.qcow2.version, 2);
        assert!(target_options(ImageFormat::Qcow2, &["bogus=1"], &Secrets::default()).is_err());
        assert!(target_options(
            ImageFormat::Qcow2,
            &["encrypt.format=luks"],
            &Secrets::default()
        )
        .is_err());
    }

    #[test]
    fn formatting_line_matches_qemu() {
        let t = target_options(ImageFormat::Qcow2, &[], &Secrets::default()).unwrap();
        assert_eq!(
            formatting_line("t.qcow2", &t, 8 << 20),
            "Formatting 't.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=8388608 lazy_refcounts=off refcount_bits=16"
        );
    }
}
