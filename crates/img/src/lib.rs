//! `kiln img`: the image tool, taking qemu-img's command lines.
//!
//! Subcommands: create, info, check, convert, snapshot, commit, rebase, resize, compare,
//! map, measure. Options, `-o` keys, exit codes and JSON field names follow qemu-img so that
//! scripts written for it work unchanged.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_disk::{BlockDevice, DiskError, ImageFormat, OpenOptions, Qcow2Image, RawImage};

mod args;
mod cmd_chain;
mod cmd_check;
mod cmd_convert;
mod cmd_create;
mod cmd_info;
mod output;
mod pagebuf;

use args::{split_opts, Secrets};

/// Errors of `kiln img`; printed as one line.
#[derive(Debug, thiserror::Error)]
pub enum ImgError {
    /// Bad command line.
    #[error("{0}")]
    Usage(String),
    /// A message with no underlying cause.
    #[error("{0}")]
    Msg(String),
    /// A disk operation failed on a file.
    #[error("{path}")]
    Disk {
        /// The image.
        path: String,
        /// The cause.
        #[source]
        source: DiskError,
    },
    /// Writing output failed.
    #[error("output")]
    Io(#[from] std::io::Error),
}

impl ImgError {
    pub(crate) fn disk(path: &str) -> impl FnOnce(DiskError) -> ImgError + '_ {
        move |source| ImgError::Disk {
            path: path.to_owned(),
            source,
        }
    }
}

/// Formats an error and its causes on one line.
fn one_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !m.is_empty() && !s.ends_with(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// Runs `kiln img` with the arguments that follow `img` and returns the process exit status.
pub fn main(args: &[OsString]) -> i32 {
    let args: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let Some(cmd) = args.first() else {
        eprintln!("kiln img: Not enough arguments\nTry 'kiln img --help' for more information");
        return 1;
    };
    let rest = &args[1..];
    let r = match cmd.as_str() {
        "create" => cmd_create::create(rest),
        "info" => cmd_info::info(rest),
        "map" => cmd_info::map(rest),
        "measure" => cmd_info::measure(rest),
        "check" => cmd_check::check(rest),
        "snapshot" => cmd_check::snapshot(rest),
        "convert" => cmd_convert::convert(rest),
        "compare" => cmd_convert::compare(rest),
        "commit" => cmd_chain::commit(rest),
        "rebase" => cmd_chain::rebase(rest),
        "resize" => cmd_chain::resize(rest),
        "-h" | "--help" | "help" => {
            print!("{}", HELP);
            Ok(0)
        }
        "-V" | "--version" => {
            println!(
                "kiln img version {} (qemu-img compatible)",
                env!("CARGO_PKG_VERSION")
            );
            Ok(0)
        }
        other => Err(ImgError::Usage(format!("Command not found: {other}"))),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln img: {}", one_line(&e));
            // qemu-img's compare uses 2 for errors; everything else 1.
            if cmd == "compare" {
                2
            } else {
                1
            }
        }
    }
}

const HELP: &str = "usage: kiln img [standard options] command [command options]
qemu-img compatible disk image utility

Command syntax:
  check [--object objectdef] [--image-opts] [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] filename
  commit [--object objectdef] [--image-opts] [-q] [-f fmt] [-b base] [-d] [-p] filename
  compare [--object objectdef] [--image-opts] [-f fmt] [-F fmt] [-p] [-q] [-s] filename1 filename2
  convert [--object objectdef] [--image-opts] [--target-image-opts] [-c] [-p] [-q] [-n] [-f fmt] [-O output_fmt] [-B backing_file [-F backing_fmt]] [-o options] [-l snapshot_param] [-S sparse_size] filename [filename2 [...]] output_filename
  create [--object objectdef] [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]
  info [--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] [--backing-chain] filename
  map [--object objectdef] [--image-opts] [-f fmt] [--start-offset=offset] [--max-length=len] [--output=ofmt] filename
  measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | [--object objectdef] [--image-opts] [-f fmt] [-l snapshot_param] filename]
  snapshot [--object objectdef] [--image-opts] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename
  rebase [--object objectdef] [--image-opts] [-q] [-f fmt] [-p] [-u] -b backing_file [-F backing_fmt] filename
  resize [--object objectdef] [--image-opts] [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size

Supported formats: raw qcow2
";

/// Where an image is and how to open it: a file name with `-f`, or an `--image-opts` string.
#[derive(Debug, Clone)]
pub(crate) struct ImageSpec {
    pub path: String,
    pub format: Option<ImageFormat>,
    pub key_secret: Option<String>,
}

impl ImageSpec {
    /// From a positional argument, honouring `--image-opts`.
    pub fn parse(arg: &str, format: Option<&str>, image_opts: bool) -> Result<ImageSpec, ImgError> {
        if !image_opts {
            return Ok(ImageSpec {
                path: arg.to_owned(),
                format: parse_format(format)?,
                key_secret: None,
            });
        }
        let mut spec = ImageSpec {
            path: String::new(),
            format: None,
            key_secret: None,
        };
        for (k, v) in split_opts(arg) {
            match k.as_str() {
                "driver" => spec.format = parse_format(Some(&v))?,
                "file.filename" | "file" | "filename" => spec.path = v,
                "encrypt.key-secret" => spec.key_secret = Some(v),
                "file.driver" | "file.locking" | "cache.direct" | "cache.no-flush" => {}
                other => {
                    return Err(ImgError::Usage(format!(
                        "unsupported image option '{other}'"
                    )))
                }
            }
        }
        if spec.path.is_empty() {
            return Err(ImgError::Usage("--image-opts needs file.filename=".into()));
        }
        Ok(spec)
    }
}

pub(crate) fn parse_format(f: Option<&str>) -> Result<Option<ImageFormat>, ImgError> {
    match f {
        None => Ok(None),
        Some(name) => ImageFormat::from_name(name)
            .map(Some)
            .ok_or_else(|| ImgError::Msg(format!("Unknown file format '{name}'"))),
    }
}

/// An opened image: the trait object plus the qcow2 handle when it is one.
pub(crate) struct Opened {
    pub dev: Arc<dyn BlockDevice>,
    pub qcow2: Option<Arc<Qcow2Image>>,
    pub format: ImageFormat,
}

/// Flags for [`open_image`].
#[derive(Default, Clone, Copy)]
pub(crate) struct OpenFlags {
    pub write: bool,
    pub no_backing: bool,
    pub no_repair: bool,
    /// cache=unsafe: no syncs.
    pub no_sync: bool,
    /// Only the header is needed (qemu's BDRV_O_NO_IO, for `info`): an encrypted image
    /// opens without its key.
    pub header_only: bool,
}

/// Opens an image (probing the format unless given), with its backing chain read-only.
pub(crate) fn open_image(
    spec: &ImageSpec,
    secrets: &Secrets,
    flags: OpenFlags,
) -> Result<Opened, ImgError> {
    let path = Path::new(&spec.path);
    let format = match spec.format {
        Some(f) => f,
        None => kiln_disk::probe(path).map_err(ImgError::disk(&spec.path))?,
    };
    let key = match &spec.key_secret {
        Some(id) => Some(secrets.get(id)?),
        None => None,
    };
    let opts = OpenOptions {
        read_only: !flags.write,
        format: Some(format),
        key,
        no_backing: flags.no_backing,
        no_repair: flags.no_repair,
        allow_corrupt: !flags.write,
        no_sync: flags.no_sync,
    };
    match format {
        ImageFormat::Raw => {
            let mut raw = RawImage::open(path, !flags.write).map_err(ImgError::disk(&spec.path))?;
            raw.set_no_sync(flags.no_sync);
            Ok(Opened {
                dev: Arc::new(raw),
                qcow2: None,
                format,
            })
        }
        ImageFormat::Qcow2 => {
            let q = Arc::new(Qcow2Image::open(path, &opts).map_err(|e| ImgError::Disk {
                path: format!("Could not open '{}'", spec.path),
                source: e,
            })?);
            if q.is_encrypted() && opts.key.is_none() && !flags.header_only {
                // Like qemu-img: without the key, only `info` opens an encrypted image.
                return Err(ImgError::Msg(format!(
                    "Could not open '{}': Parameter 'encrypt.key-secret' is required for cipher",
                    spec.path
                )));
            }
            Ok(Opened {
                dev: q.clone(),
                qcow2: Some(q),
                format,
            })
        }
    }
}

/// Reads the common `--object` options.
pub(crate) fn secrets_of(p: &args::Parsed) -> Result<Secrets, ImgError> {
    Secrets::from_objects(&p.all("object"))
}

/// The chain of layers below (and including) `dev`, top first.
pub(crate) fn chain_of(dev: &Arc<dyn BlockDevice>) -> Vec<Arc<dyn BlockDevice>> {
    let mut out = vec![dev.clone()];
    while let Some(b) = out.last().and_then(|d| d.backing()) {
        out.push(b);
    }
    out
}

/// The file names of each layer of an image's chain, top first.
pub(crate) fn chain_paths(top: &str) -> Vec<PathBuf> {
    let mut out = vec![PathBuf::from(top)];
    let mut cur = PathBuf::from(top);
    for _ in 0..kiln_disk::MAX_CHAIN_DEPTH {
        let Ok(fmt) = kiln_disk::probe(&cur) else {
            break;
        };
        if fmt != ImageFormat::Qcow2 {
            break;
        }
        let opts = OpenOptions {
            read_only: true,
            no_backing: true,
            no_repair: true,
            allow_corrupt: true,
            ..OpenOptions::default()
        };
        let Ok(img) = Qcow2Image::open(&cur, &opts) else {
            break;
        };
        let Some(b) = img.info().backing_file else {
            break;
        };
        cur = kiln_disk::qcow2::resolve_backing(&cur, &b);
        out.push(cur.clone());
    }
    out
}

/// What a range of the guest view is, looking through the whole chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChainStatus {
    pub len: u64,
    /// Reads as zero (hole, zero cluster, nothing allocated, or past a backing file's end).
    pub zero: bool,
    /// Layer that provides the data (0 = top); for unallocated ranges, the last one asked.
    pub depth: usize,
    /// Some layer allocates the range.
    pub present: bool,
    /// Host offset within the providing layer, when it says.
    pub offset: Option<u64>,
    /// The providing layer stores data (not a zero marker).
    pub data: bool,
}

/// Block status through a chain, starting at `offset`, at most `len` bytes.
pub(crate) fn chain_status(
    chain: &[Arc<dyn BlockDevice>],
    offset: u64,
    len: u64,
) -> Result<ChainStatus, DiskError> {
    let mut len = len;
    // qemu reports the offset that the last layer asked gives, even for unallocated
    // subclusters of an allocated cluster.
    let mut last_offset = None;
    for (depth, dev) in chain.iter().enumerate() {
        if offset >= dev.size() {
            // Past this layer's end: zeroes, reported at the layer above.
            return Ok(ChainStatus {
                len,
                zero: true,
                depth: depth.saturating_sub(1),
                present: false,
                offset: last_offset,
                data: false,
            });
        }
        len = len.min(dev.size() - offset);
        let st = dev.block_status(offset, len)?;
        len = st.len;
        match st.kind {
            kiln_disk::ExtentKind::Data => {
                return Ok(ChainStatus {
                    len,
                    zero: st.zero_in_file,
                    depth,
                    present: true,
                    offset: st.host_offset,
                    data: true,
                })
            }
            kiln_disk::ExtentKind::Zero => {
                let raw = dev.format() == ImageFormat::Raw;
                return Ok(ChainStatus {
                    len,
                    zero: true,
                    depth,
                    present: true,
                    offset: st.host_offset.or(raw.then_some(offset)),
                    data: false,
                });
            }
            kiln_disk::ExtentKind::Unallocated => last_offset = st.host_offset,
        }
    }
    Ok(ChainStatus {
        len,
        zero: true,
        depth: chain.len() - 1,
        present: false,
        offset: last_offset,
        data: false,
    })
}
