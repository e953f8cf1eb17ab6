//! `check` and `snapshot`.

use kiln_disk::qcow2::{CheckReport, RepairMode, Snapshot};
use kiln_disk::ImageFormat;

use crate::args::{parse, Arg};
use crate::output::{human_size, Json};
use crate::{open_image, secrets_of, ImageSpec, ImgError, OpenFlags};

/// Formats a local time like qemu's snapshot list ("%Y-%m-%d %H:%M:%S").
fn local_time(secs: u32) -> String {
    let t = libc::time_t::from(secs);
    // SAFETY: zeroed `tm` is a valid value of a plain C struct.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the duration of the call.
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        return secs.to_string();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// The "Snapshot list:" table as qemu-img prints it.
pub(crate) fn snapshot_table(snaps: &[Snapshot]) -> String {
    let mut s = String::from("Snapshot list:\n");
    s.push_str(&format!(
        "{:<10}{:<17}{:>8}{:>20}{:>13}{:>11}\n",
        "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT"
    ));
    for sn in snaps {
        let ns = sn.vm_clock_nsec;
        let secs = ns / 1_000_000_000;
        let clock = format!(
            "{:02}:{:02}:{:02}.{:03}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            (ns / 1_000_000) % 1000
        );
        let icount = sn.icount.map(|i| i.to_string()).unwrap_or_default();
        s.push_str(&format!(
            "{:<9} {:<16} {:>8}{:>20}{:>13}{:>11}\n",
            sn.id,
            sn.name,
            human_size(sn.vm_state_size),
            local_time(sn.date_sec),
            clock,
            icount
        ));
    }
    s
}

fn pct(n: u64, d: u64) -> f64 {
    if d == 0 {
        return 0.0;
    }
    #[allow(clippy::cast_precision_loss)]
    let r = n as f64 * 100.0 / d as f64;
    r
}

fn print_human(r: &CheckReport) {
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        println!("No errors were found on the image.");
    }
    if r.corruptions > 0 {
        println!(
            "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.",
            r.corruptions
        );
    }
    if r.leaks > 0 {
        println!(
            "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.",
            r.leaks
        );
    }
    if r.check_errors > 0 {
        println!(
            "\n{} internal errors have occurred during the check.",
            r.check_errors
        );
    }
    if r.total_clusters != 0 {
        println!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            r.allocated_clusters,
            r.total_clusters,
            pct(r.allocated_clusters, r.total_clusters),
            pct(r.fragmented_clusters, r.allocated_clusters),
            pct(r.compressed_clusters, r.allocated_clusters)
        );
    }
    println!("Image end offset: {}", r.image_end_offset);
}

fn report_json(r: &CheckReport, filename: &str) -> Json {
    let mut v = vec![
        ("image-end-offset", Json::u(r.image_end_offset)),
        ("total-clusters", Json::u(r.total_clusters)),
        ("check-errors", Json::u(r.check_errors)),
    ];
    if r.leaks > 0 {
        v.push(("leaks", Json::u(r.leaks)));
    }
    if r.corruptions > 0 {
        v.push(("corruptions", Json::u(r.corruptions)));
    }
    if r.leaks_fixed > 0 {
        v.push(("leaks-fixed", Json::u(r.leaks_fixed)));
    }
    if r.corruptions_fixed > 0 {
        v.push(("corruptions-fixed", Json::u(r.corruptions_fixed)));
    }
    v.push(("allocated-clusters", Json::u(r.allocated_clusters)));
    v.push(("filename", Json::s(filename)));
    v.push(("format", Json::s("qcow2")));
    if r.fragmented_clusters > 0 {
        v.push(("fragmented-clusters", Json::u(r.fragmented_clusters)));
    }
    if r.compressed_clusters > 0 {
        v.push(("compressed-clusters", Json::u(r.compressed_clusters)));
    }
    Json::obj(v)
}

/// `check [--object] [--image-opts] [-q] [-f fmt] [--output=ofmt] [-r leaks|all] filename`
pub(crate) fn check(args: &[String]) -> Result<i32, ImgError> {
    let p = parse(
        args,
        &[
            ('f', Arg::Yes),
            ('r', Arg::Optional),
            ('q', Arg::No),
            ('T', Arg::Yes),
            ('U', Arg::No),
        ],
        &[
            ("object", Arg::Yes),
            ("image-opts", Arg::No),
            ("output", Arg::Yes),
            ("force-share", Arg::No),
        ],
    )?;
    let json = match p.get("output").unwrap_or("human") {
        "human" => false,
        "json" => true,
        o => {
            return Err(ImgError::Usage(format!(
                "--output must be used with human or json as argument (got '{o}')"
            )))
        }
    };
    let mode = match (p.has("r"), p.get("r")) {
        (false, _) => RepairMode::None,
        (true, Some("leaks")) => RepairMode::Leaks,
        (true, Some("all")) => RepairMode::All,
        (true, other) => {
            return Err(ImgError::Usage(format!(
                "Invalid option for -r: '{}' (expecting leaks or all)",
                other.unwrap_or("")
            )))
        }
    };
    let quiet = p.has("q");
    let secrets = secrets_of(&p)?;
    let Some(name) = p.free.first() else {
        return Err(ImgError::Usage("Expecting one image file name".into()));
    };
    let spec = ImageSpec::parse(name, p.get("f"), p.has("image-opts"))?;
    let flags = OpenFlags {
        write: mode != RepairMode::None,
        no_backing: true,
        no_repair: true,
        ..OpenFlags::default()
    };
    let o = open_image(&spec, &secrets, flags)?;
    if o.format != ImageFormat::Qcow2 {
        eprintln!("kiln img: This image format does not support checks");
        return Ok(63);
    }
    let Some(q) = o.qcow2.clone() else {
        return Ok(63);
    };
    let r = q.check(mode).map_err(ImgError::disk(&spec.path))?;
    for m in &r.messages {
        if !quiet {
            eprintln!("{m}");
        }
    }
    if mode != RepairMode::None && (r.leaks_fixed > 0 || r.corruptions_fixed > 0) && !json && !quiet
    {
        println!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...",
            r.leaks_fixed, r.corruptions_fixed
        );
    }
    if json {
        println!("{}", report_json(&r, &spec.path).pretty());
    } else if !quiet {
        print_human(&r);
    }
    Ok(if r.check_errors > 0 {
        1
    } else if r.corruptions > 0 {
        2
    } else if r.leaks > 0 {
        3
    } else {
        0
    })
}

/// `snapshot [--object] [--image-opts] [-q] [-l | -a name | -c name | -d name] filename`
pub(crate) fn snapshot(args: &[String]) -> Result<i32, ImgError> {
    let p = parse(
        args,
        &[
            ('l', Arg::No),
            ('a', Arg::Yes),
            ('c', Arg::Yes),
            ('d', Arg::Yes),
            ('q', Arg::No),
            ('f', Arg::Yes),
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
    let spec = ImageSpec::parse(name, p.get("f"), p.has("image-opts"))?;
    let actions = ["l", "a", "c", "d"].iter().filter(|a| p.has(a)).count();
    if actions > 1 {
        return Err(ImgError::Usage("Cannot mix '-l', '-a', '-c', '-d'".into()));
    }
    let write = !p.has("l") && actions == 1;
    let o = open_image(
        &spec,
        &secrets,
        OpenFlags {
            write,
            no_backing: true,
            no_repair: !write,
            ..OpenFlags::default()
        },
    )?;
    let Some(q) = o.qcow2 else {
        return Err(ImgError::Msg(format!(
            "Could not {} snapshot: image format '{}' does not support snapshots",
            if p.has("l") { "list" } else { "change" },
            o.format.name()
        )));
    };
    if let Some(n) = p.get("c") {
        q.snapshot_create(n).map_err(|e| ImgError::Disk {
            path: format!("Could not create snapshot '{n}'"),
            source: e,
        })?;
    } else if let Some(n) = p.get("a") {
        q.snapshot_apply(n).map_err(|e| ImgError::Disk {
            path: format!("Could not apply snapshot '{n}'"),
            source: e,
        })?;
    } else if let Some(n) = p.get("d") {
        q.snapshot_delete(n).map_err(|e| ImgError::Disk {
            path: format!("Could not delete snapshot '{n}'"),
            source: e,
        })?;
    } else {
        let snaps = q.snapshots();
        if !snaps.is_empty() {
            print!("{}", snapshot_table(&snaps));
        }
    }
    q.close().map_err(ImgError::disk(&spec.path))?;
    Ok(0)
}
