//! Boots the probe guest under kiln and checks what it sees from inside: boot info, ACPI,
//! every vCPU, memory, CPU speed, RTC, and a clean ACPI power-off.

mod common;

use common::{big_vm_lock, ProbeRun};
use std::time::Duration;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// The map kiln promises: low RAM, the reserved legacy area, RAM from 1 MiB to the 32-bit
/// hole at 3 GiB, the PCI ECAM area (reserved), and the rest above 4 GiB.
fn expected_e820(mem: u64) -> Vec<(u64, u64, u32)> {
    let mut m = vec![(0, 0x9fc00, 1), (0x9fc00, 0x60400, 2)];
    let low = mem.min(3 * GIB);
    m.push((MIB, low - MIB, 1));
    m.push((0xe000_0000, MIB, 2));
    if mem > 3 * GIB {
        m.push((4 * GIB, mem - 3 * GIB, 1));
    }
    m
}

fn smp_run(cpus: u32) {
    let n = cpus.to_string();
    let r = ProbeRun::boot(
        &["--cpus", &n, "--cmdline", "probe.checks=boot,acpi,smp"],
        Duration::from_secs(120),
    );
    r.assert_clean();
    assert_eq!(r.field("acpi", "cpus"), n, "MADT CPU count");
    assert_eq!(r.field("smp", "cpus"), n, "vCPUs that started");
    let ids = if cpus == 1 {
        "0".to_string()
    } else {
        format!("0-{}", cpus - 1)
    };
    assert_eq!(r.field("smp", "apic_ids"), ids);
}

#[test]
fn one_vcpu_runs_every_check() {
    let r = ProbeRun::boot(&["--memory", "256M"], Duration::from_secs(120));
    r.assert_clean();
    for check in ["boot", "acpi", "smp", "mem", "cpu", "rtc"] {
        r.ok(check);
    }
    assert_eq!(r.e820(), expected_e820(256 * MIB));
    assert_eq!(r.field("boot", "ram"), (256 * MIB - 0x60400).to_string());
    assert_eq!(r.field("acpi", "poweroff"), "pm1a:0x604");
    assert_eq!(r.field("mem", "mode"), "full");
    let verified: u64 = r.field("mem", "bytes").parse().unwrap();
    assert!(
        verified > 200 * MIB,
        "the probe verified only {verified} bytes of 256 MiB"
    );
    assert_eq!(r.field("rtc", "cmos_mem"), (256 * MIB).to_string());
}

#[test]
fn two_vcpus_start() {
    smp_run(2);
}

#[test]
fn eight_vcpus_start() {
    smp_run(8);
}

#[test]
fn sixty_four_vcpus_start() {
    smp_run(64);
}

#[test]
fn two_hundred_eighty_eight_vcpus_start_with_x2apic_ids() {
    smp_run(288);
}

#[test]
fn eight_gib_guest_sees_ram_above_4g() {
    let _big = big_vm_lock();
    let r = ProbeRun::boot(
        &[
            "--memory",
            "8G",
            "--cpus",
            "2",
            "--cmdline",
            "probe.mem=sample",
        ],
        Duration::from_secs(180),
    );
    r.assert_clean();
    assert_eq!(r.e820(), expected_e820(8 * GIB));
    assert_eq!(r.field("mem", "mode"), "sample");
}

#[test]
fn four_tib_guest_boots_lazily() {
    let _big = big_vm_lock();
    let r = ProbeRun::boot(
        &[
            "--memory",
            "4T",
            "--cmdline",
            "probe.checks=boot,acpi,mem probe.mem=sample",
        ],
        Duration::from_secs(300),
    );
    r.assert_clean();
    assert_eq!(r.e820(), expected_e820(4 << 40));
    let ram: u64 = r.field("boot", "ram").parse().unwrap();
    assert_eq!(ram, (4 << 40) - 0x60400);
}

#[test]
fn linux64_entry_boots_the_same_probe() {
    let r = ProbeRun::boot(
        &[
            "--entry",
            "linux64",
            "--cpus",
            "2",
            "--cmdline",
            "probe.checks=boot,acpi,smp",
        ],
        Duration::from_secs(60),
    );
    r.assert_clean();
    assert!(
        r.lines.iter().any(|l| l == "info entry=linux64"),
        "{:?}",
        r.lines
    );
    assert_eq!(r.e820(), expected_e820(256 * MIB));
}

#[test]
fn pvh_is_the_default_entry_for_an_elf_with_the_note() {
    let r = ProbeRun::boot(&["--cmdline", "probe.checks=boot"], Duration::from_secs(60));
    r.assert_clean();
    assert!(
        r.lines.iter().any(|l| l == "info entry=pvh"),
        "{:?}",
        r.lines
    );
}

#[test]
fn command_line_reaches_the_guest() {
    let r = ProbeRun::boot(
        &["--cmdline", "probe.checks=boot hello=world  spaced"],
        Duration::from_secs(60),
    );
    r.assert_clean();
    assert_eq!(r.cmdline(), "probe.checks=boot hello=world  spaced");
}

#[test]
fn rtc_shows_host_utc_time() {
    let r = ProbeRun::boot(&["--cmdline", "probe.checks=rtc"], Duration::from_secs(60));
    r.assert_clean();
    let t = r.field("rtc", "time");
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("{t}Z"), "+%s"])
        .output()
        .unwrap();
    let guest: i64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("date parses the probe's time");
    let host = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (host - guest).abs() < 120,
        "guest RTC {t} is {}s off the host",
        host - guest
    );
}

#[test]
fn config_file_and_flags_make_one_config() {
    let dir = std::env::temp_dir().join(format!("kiln-test-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("vm.toml");
    let probe = common::probe();
    std::fs::write(&cfg, format!("kernel = {:?}\ncpus = 4\nmemory = \"512M\"\ncmdline = \"probe.checks=boot,acpi,smp\"\n", probe)).unwrap();
    // The flag overrides the file's cpus; memory comes from the file.
    let out = common::run_kiln(
        &["run", "--config", cfg.to_str().unwrap(), "--cpus", "3"],
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("PROBE smp ok cpus=3 "), "{stdout}");
    assert!(
        stdout.contains(&format!("size=0x{:x} type=1", 512 * MIB - MIB)),
        "{stdout}"
    );
    assert_eq!(out.status.code(), Some(0));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn serial_can_go_to_a_file() {
    let dir = std::env::temp_dir().join(format!("kiln-test-serial-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("console.log");
    let spec = format!("file:{}", log.display());
    let probe = common::probe().to_str().unwrap().to_string();
    let out = common::run_kiln(
        &[
            "run",
            "--kernel",
            &probe,
            "--serial",
            &spec,
            "--cmdline",
            "probe.checks=boot",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(
        out.stdout.is_empty(),
        "nothing on stdout when the serial port goes to a file"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.starts_with("PROBE hello\n") && text.contains("PROBE summary ok=1 fail=0"),
        "{text}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn acpi_reset_ends_kiln_with_the_reboot_status() {
    let r = ProbeRun::boot(
        &["--cmdline", "probe.checks=boot probe.end=reset"],
        Duration::from_secs(60),
    );
    assert!(
        r.lines.iter().any(|l| l == "reset acpi:0x608"),
        "{:?}",
        r.lines
    );
    assert_eq!(
        r.code,
        Some(3),
        "a guest reboot ends kiln with status 3; stderr: {}",
        r.stderr
    );
    assert!(
        !r.lines.iter().any(|l| l == "poweroff"),
        "the guest must not run on after the reset"
    );
}

#[test]
fn i8042_reset_ends_kiln_with_the_reboot_status() {
    let r = ProbeRun::boot(
        &["--cmdline", "probe.checks=boot probe.end=i8042"],
        Duration::from_secs(60),
    );
    assert!(r.lines.iter().any(|l| l == "reset i8042"), "{:?}", r.lines);
    assert_eq!(r.code, Some(3), "stderr: {}", r.stderr);
}

#[test]
fn triple_fault_is_a_clear_error() {
    let r = ProbeRun::boot(
        &["--cmdline", "probe.checks=boot probe.end=triplefault"],
        Duration::from_secs(60),
    );
    assert!(r.lines.iter().any(|l| l == "triplefault"), "{:?}", r.lines);
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr.contains("triple-faulted (KVM_EXIT_SHUTDOWN)"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

#[test]
fn guest_exception_is_the_guests_problem() {
    let r = ProbeRun::boot(
        &["--cmdline", "probe.checks=boot probe.fault=pf"],
        Duration::from_secs(60),
    );
    assert!(
        r.lines.iter().any(|l| l.starts_with("fault vector=14 ")),
        "{:?}",
        r.lines
    );
    // The probe's fault handler powers off: kiln ends normally.
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[test]
fn initrd_arrives_byte_for_byte_through_both_entries() {
    let path = std::env::temp_dir().join(format!("kiln-test-initrd-{}", std::process::id()));
    let data = common::pseudo_random_bytes(3_000_001, 0x9e37_79b9_7f4a_7c15u64);
    std::fs::write(&path, &data).unwrap();
    let want = format!("size={} fnv1a={:#018x}", data.len(), fnv1a(&data));
    for entry in ["pvh", "linux64"] {
        let r = ProbeRun::boot(
            &[
                "--initrd",
                path.to_str().unwrap(),
                "--entry",
                entry,
                "--cmdline",
                "probe.checks=boot",
            ],
            Duration::from_secs(60),
        );
        r.assert_clean();
        let line = r
            .lines
            .iter()
            .find(|l| l.starts_with("info initrd "))
            .unwrap_or_else(|| panic!("no initrd line: {:?}", r.lines));
        assert!(line.ends_with(&want), "{entry}: {line} (want {want})");
        let addr = u64::from_str_radix(
            line.split_whitespace()
                .nth(2)
                .unwrap()
                .trim_start_matches("addr=0x"),
            16,
        )
        .unwrap();
        assert_eq!(addr % 4096, 0, "the initrd is page aligned");
        assert!(
            addr + data.len() as u64 <= 256 * MIB,
            "the initrd is inside RAM"
        );
    }
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn initrd_larger_than_ram_is_a_clear_error() {
    let path = std::env::temp_dir().join(format!("kiln-test-big-initrd-{}", std::process::id()));
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(100 * MIB).unwrap();
    let r = ProbeRun::boot(
        &["--initrd", path.to_str().unwrap(), "--memory", "64M"],
        Duration::from_secs(60),
    );
    std::fs::remove_file(&path).unwrap();
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr.contains("does not fit in guest RAM"),
        "{}",
        r.stderr
    );
    assert!(
        r.lines.is_empty(),
        "the guest must not start: {:?}",
        r.lines
    );
}
