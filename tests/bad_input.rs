//! Every kind of bad input gets one clear error line naming what is wrong, the documented
//! exit status (2 for usage, 1 at run time), and never a panic.

mod common;

use std::time::Duration;

fn kiln_err(args: &[&str]) -> (Option<i32>, String) {
    let out = common::run_kiln(args, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "panic on {args:?}: {stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "no guest output expected for {args:?}"
    );
    (out.status.code(), stderr)
}

fn probe() -> String {
    common::probe().to_str().unwrap().to_string()
}

#[test]
fn missing_kernel_file() {
    common::require_kvm();
    let (code, err) = kiln_err(&["run", "--kernel", "/nonexistent/vmlinux"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("/nonexistent/vmlinux") && err.contains("No such file"),
        "{err}"
    );
}

#[test]
fn no_kernel_at_all() {
    let (code, err) = kiln_err(&["run"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--kernel is required"), "{err}");
}

#[test]
fn random_file_as_kernel() {
    common::require_kvm();
    let path = std::env::temp_dir().join(format!("kiln-random-kernel-{}", std::process::id()));
    let bytes = common::pseudo_random_bytes(65536, 0x1234_5678_9abc_def0u64);
    std::fs::write(&path, bytes).unwrap();
    let (code, err) = kiln_err(&["run", "--kernel", path.to_str().unwrap()]);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(code, Some(1));
    assert!(
        err.contains("neither an ELF vmlinux nor a bzImage"),
        "{err}"
    );
}

#[test]
fn truncated_elf_kernel() {
    common::require_kvm();
    let data = std::fs::read(common::probe()).unwrap();
    let path = std::env::temp_dir().join(format!("kiln-truncated-kernel-{}", std::process::id()));
    std::fs::write(&path, &data[..200]).unwrap();
    let (code, err) = kiln_err(&["run", "--kernel", path.to_str().unwrap()]);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(code, Some(1));
    assert!(err.contains("cannot load kernel"), "{err}");
}

#[test]
fn zero_cpus() {
    let (code, err) = kiln_err(&["run", "--kernel", &probe(), "--cpus", "0"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--cpus 0"), "{err}");
}

#[test]
fn far_too_many_cpus() {
    let (code, err) = kiln_err(&["run", "--kernel", &probe(), "--cpus", "100000"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--cpus 100000"), "{err}");
}

#[test]
fn zero_memory() {
    let (code, err) = kiln_err(&["run", "--kernel", &probe(), "--memory", "0"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--memory 0"), "{err}");
}

#[test]
fn memory_that_is_not_a_size() {
    let (code, err) = kiln_err(&["run", "--kernel", &probe(), "--memory", "lots"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("'lots'") && err.contains("--memory"), "{err}");
}

#[test]
fn config_file_with_unknown_key() {
    let path = std::env::temp_dir().join(format!("kiln-bad-config-{}.toml", std::process::id()));
    std::fs::write(&path, format!("kernel = {:?}\ncpu = 2\n", probe())).unwrap();
    let (code, err) = kiln_err(&["run", "--config", path.to_str().unwrap()]);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(code, Some(2));
    assert!(err.contains("unknown field `cpu`"), "{err}");
}

#[test]
fn json_config_with_wrong_type() {
    let path = std::env::temp_dir().join(format!("kiln-bad-config-{}.json", std::process::id()));
    std::fs::write(&path, r#"{"kernel": "/k", "cpus": "many"}"#).unwrap();
    let (code, err) = kiln_err(&["run", "--config", path.to_str().unwrap()]);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(code, Some(2));
    assert!(
        err.contains(path.to_str().unwrap()) && err.contains("cpus")
            || err.contains("invalid type"),
        "{err}"
    );
}

#[test]
fn missing_config_file() {
    let (code, err) = kiln_err(&["run", "--config", "/nonexistent/vm.toml"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("/nonexistent/vm.toml"), "{err}");
}

#[test]
fn serial_spec_that_is_not_one() {
    let (code, err) = kiln_err(&["run", "--kernel", &probe(), "--serial", "tcp:1234"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--serial"), "{err}");
}

#[test]
fn pvh_entry_for_a_kernel_without_the_note() {
    common::require_kvm();
    // A bzImage-less ELF without a PVH note: strip the note by asking for PVH on a file we
    // make from the probe with its note type changed.
    let mut data = std::fs::read(common::probe()).unwrap();
    let pos = data
        .windows(16)
        .position(|w| w[0..12] == [4, 0, 0, 0, 4, 0, 0, 0, 18, 0, 0, 0] && &w[12..16] == b"Xen\0");
    let pos = pos.expect("the probe has a PVH note");
    data[pos + 8] = 17; // another Xen note type
    let path = std::env::temp_dir().join(format!("kiln-no-pvh-{}", std::process::id()));
    std::fs::write(&path, data).unwrap();
    let (code, err) = kiln_err(&["run", "--kernel", path.to_str().unwrap(), "--entry", "pvh"]);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(code, Some(1));
    assert!(err.contains("no PVH entry point"), "{err}");
}

#[test]
fn missing_kvm_device_is_one_clear_line() {
    let out = std::process::Command::new(common::kiln())
        .args(["run", "--kernel", &probe()])
        .env("KILN_KVM_DEVICE", "/nonexistent/kvm")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("cannot open /nonexistent/kvm") && stderr.contains("kiln needs KVM"),
        "{stderr}"
    );
}
