use std::sync::{Arc, Mutex};

use super::*;
use crate::pci::config::{command, reg, BarSpec, PciConfig, PciHeader};

const W32: (u64, u64) = (0xc000_0000, 0x2000_0000);
const W64: (u64, u64) = (0x1_0000_0000, 0x10_0000_0000);

/// A device with the BARs it is given; records accesses and moves.
struct Dummy {
    config: PciConfig,
    moves: Vec<(usize, Option<u64>)>,
    last_write: Option<(usize, u64, Vec<u8>)>,
}

fn dummy(bars: &[(usize, BarSpec)]) -> Arc<Mutex<Dummy>> {
    let mut config = PciConfig::new(&PciHeader {
        vendor_id: 0x1234,
        device_id: 0x5678,
        revision: 0,
        class: 0xff_0000,
        subsystem_vendor_id: 0,
        subsystem_id: 0,
    });
    for (i, b) in bars {
        config.add_bar(*i, *b).unwrap();
    }
    Arc::new(Mutex::new(Dummy {
        config,
        moves: vec![],
        last_write: None,
    }))
}

impl PciDevice for Dummy {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(u8::try_from(bar).unwrap() * 0x10 + u8::try_from(offset & 0xf).unwrap());
    }
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        self.last_write = Some((bar, offset, data.to_vec()));
    }
    fn bar_moved(&mut self, bar: usize, addr: Option<u64>) {
        self.moves.push((bar, addr));
    }
}

const M64: BarSpec = BarSpec {
    size: 0x8000,
    kind: BarKind::Mem64 {
        prefetchable: false,
    },
};
const M32: BarSpec = BarSpec {
    size: 0x1000,
    kind: BarKind::Mem32,
};

struct Setup {
    mmio: Arc<Bus>,
    root: Arc<Mutex<PciRoot>>,
    io: PciConfigIo,
    ecam: PciEcam,
}

fn setup() -> Setup {
    let mmio = Arc::new(Bus::new());
    let root = Arc::new(Mutex::new(
        PciRoot::new(
            &mmio,
            PciWindows {
                mmio32: W32,
                mmio64: Some(W64),
            },
        )
        .unwrap(),
    ));
    Setup {
        io: PciConfigIo::new(root.clone()),
        ecam: PciEcam::new(root.clone()),
        mmio,
        root,
    }
}

fn cf8(s: &mut Setup, dev: u8, reg: u8) {
    let addr = 0x8000_0000u32 | u32::from(dev) << 11 | u32::from(reg);
    s.io.write(0xcf8, 0, &addr.to_le_bytes());
}

fn ecam_read32(s: &mut Setup, dev: u64, reg: u64) -> u32 {
    let mut b = [0u8; 4];
    s.ecam.read(0, dev << 15 | reg, &mut b);
    u32::from_le_bytes(b)
}

fn ecam_write32(s: &mut Setup, dev: u64, reg: u64, v: u32) {
    s.ecam.write(0, dev << 15 | reg, &v.to_le_bytes());
}

#[test]
fn host_bridge_answers_through_both_mechanisms() {
    let mut s = setup();
    cf8(&mut s, 0, 0);
    let mut b = [0u8; 4];
    s.io.read(0xcf8, 4, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x0008_1b36);
    let mut w = [0u8; 2];
    s.io.read(0xcf8, 6, &mut w);
    assert_eq!(u16::from_le_bytes(w), 0x0008, "word at 0xCFE");
    let mut one = [0u8; 1];
    cf8(&mut s, 0, 0x08);
    s.io.read(0xcf8, 7, &mut one);
    assert_eq!(one[0], 0x06, "class byte at 0xCFF");
    s.io.read(0xcf8, 0, &mut b);
    assert_eq!(
        u32::from_le_bytes(b),
        0x8000_0008,
        "address register reads back"
    );
    assert_eq!(ecam_read32(&mut s, 0, 0), 0x0008_1b36);
    assert_eq!(ecam_read32(&mut s, 0, 8) >> 8, 0x06_0000);
}

#[test]
fn absent_functions_and_disabled_or_odd_accesses_read_all_ones() {
    let mut s = setup();
    let mut b = [0u8; 4];
    cf8(&mut s, 5, 0);
    s.io.read(0xcf8, 4, &mut b);
    assert_eq!(b, [0xff; 4], "empty slot");
    s.io.write(0xcf8, 0, &0x0000_0000u32.to_le_bytes());
    s.io.read(0xcf8, 4, &mut b);
    assert_eq!(b, [0xff; 4], "enable bit clear");
    s.io.write(0xcf8, 0, &0x8001_0000u32.to_le_bytes());
    s.io.read(0xcf8, 4, &mut b);
    assert_eq!(b, [0xff; 4], "bus 1");
    s.io.write(0xcf8, 0, &0x8000_0100u32.to_le_bytes());
    s.io.read(0xcf8, 4, &mut b);
    assert_eq!(b, [0xff; 4], "function 1");
    // A byte write to 0xCF8 is not an address.
    s.io.write(0xcf8, 0, &[0]);
    s.io.read(0xcf8, 0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x8000_0100);
    // Unaligned and oversized ECAM accesses.
    let mut two = [0u8; 2];
    s.ecam.read(0, 1, &mut two);
    assert_eq!(two, [0xff; 2]);
    let mut eight = [0u8; 8];
    s.ecam.read(0, 0, &mut eight);
    assert_eq!(eight, [0xff; 8]);
    s.ecam.write(0, 3, &[1, 2]);
    assert_eq!(ecam_read32(&mut s, 0, 0), 0x0008_1b36);
}

#[test]
fn bars_are_placed_aligned_in_the_windows_without_overlap() {
    let s = setup();
    let a = dummy(&[(0, M64), (2, M32)]);
    let b = dummy(&[(0, M64)]);
    let big = dummy(&[(
        0,
        BarSpec {
            size: 1 << 30,
            kind: BarKind::Mem64 { prefetchable: true },
        },
    )]);
    let mut root = s.root.lock().unwrap();
    assert_eq!(root.add_device(a.clone()).unwrap(), 1);
    assert_eq!(root.add_device(b.clone()).unwrap(), 2);
    assert_eq!(root.add_device(big.clone()).unwrap(), 3);
    let a0 = root.bar_mapping(1, 0).unwrap();
    let a2 = root.bar_mapping(1, 2).unwrap();
    let b0 = root.bar_mapping(2, 0).unwrap();
    let g0 = root.bar_mapping(3, 0).unwrap();
    for (addr, size) in [(a0, 0x8000), (a2, 0x1000), (b0, 0x8000)] {
        assert_eq!(addr % size, 0);
        assert!(addr >= W32.0 && addr + size <= W32.0 + W32.1);
    }
    assert!(g0 >= W64.0, "a 1 GiB BAR goes above 4 GiB");
    let mut ranges = [(a0, 0x8000), (a2, 0x1000), (b0, 0x8000)];
    ranges.sort();
    assert!(ranges.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0));
    assert_eq!(a.lock().unwrap().moves, vec![(0, Some(a0)), (2, Some(a2))]);
    assert_eq!(a.lock().unwrap().config.bar_address(0), Some(a0));
}

#[test]
fn bar_accesses_need_memory_decoding() {
    let mut s = setup();
    let d = dummy(&[(0, M64)]);
    s.root.lock().unwrap().add_device(d.clone()).unwrap();
    let base = s.root.lock().unwrap().bar_mapping(1, 0).unwrap();
    let mut b = [0u8; 1];
    assert!(s.mmio.read(base + 3, &mut b));
    assert_eq!(b, [0xff], "decoding off");
    ecam_write32(&mut s, 1, reg::COMMAND as u64, u32::from(command::MEMORY));
    s.mmio.read(base + 3, &mut b);
    assert_eq!(b, [0x03]);
    s.mmio.write(base + 8, &[9]);
    assert_eq!(d.lock().unwrap().last_write, Some((0, 8, vec![9])));
}

#[test]
fn moved_bar_is_followed_and_invalid_places_unmap_it() {
    let mut s = setup();
    let d = dummy(&[(0, M64)]);
    let other = dummy(&[(0, M32)]);
    s.root.lock().unwrap().add_device(d.clone()).unwrap();
    s.root.lock().unwrap().add_device(other).unwrap();
    let old = s.root.lock().unwrap().bar_mapping(1, 0).unwrap();
    let blocker = s.root.lock().unwrap().bar_mapping(2, 0).unwrap();
    let bar0 = reg::BAR0 as u64;

    // Sizing with decoding off moves nothing.
    ecam_write32(&mut s, 1, bar0, 0xffff_ffff);
    assert_eq!(ecam_read32(&mut s, 1, bar0), 0xffff_8004);
    ecam_write32(&mut s, 1, bar0, u32::try_from(old).unwrap());
    assert_eq!(d.lock().unwrap().moves.len(), 1);

    // A move inside the window, then decoding on: the bus follows.
    let new = 0xd000_0000u64;
    ecam_write32(&mut s, 1, bar0, u32::try_from(new).unwrap());
    ecam_write32(&mut s, 1, reg::COMMAND as u64, u32::from(command::MEMORY));
    assert_eq!(s.root.lock().unwrap().bar_mapping(1, 0), Some(new));
    assert_eq!(d.lock().unwrap().moves.last(), Some(&(0, Some(new))));
    let mut b = [0u8; 1];
    s.mmio.read(new + 1, &mut b);
    assert_eq!(b, [1]);
    assert!(!s.mmio.read(old + 1, &mut b), "old place is free");

    // Onto the other device's BAR: refused, the BAR stops decoding.
    ecam_write32(&mut s, 1, bar0, u32::try_from(blocker).unwrap());
    assert_eq!(s.root.lock().unwrap().bar_mapping(1, 0), None);
    assert_eq!(d.lock().unwrap().moves.last(), Some(&(0, None)));
    s.mmio.read(blocker, &mut b);
    assert_eq!(b, [0xff], "the other device still owns its range"); // M32 of an undecoding device

    // Outside every window: still unmapped. Back to a valid place: mapped again.
    ecam_write32(&mut s, 1, bar0, 0x1000);
    assert_eq!(s.root.lock().unwrap().bar_mapping(1, 0), None);
    ecam_write32(&mut s, 1, bar0, 0xc800_0000);
    assert_eq!(s.root.lock().unwrap().bar_mapping(1, 0), Some(0xc800_0000));
    // The upper half moves it above 4 GiB, into the 64-bit window.
    ecam_write32(&mut s, 1, bar0 + 4, 0x2);
    assert_eq!(
        s.root.lock().unwrap().bar_mapping(1, 0),
        Some(0x2_c800_0000)
    );
}

#[test]
fn full_bus_is_an_error() {
    let s = setup();
    let mut root = s.root.lock().unwrap();
    for _ in 1..32 {
        root.add_device(dummy(&[])).unwrap();
    }
    assert!(matches!(
        root.add_device(dummy(&[])),
        Err(PciError::BusFull)
    ));
}

#[test]
fn garbage_config_writes_break_nothing_but_the_device() {
    let mut s = setup();
    let d = dummy(&[(0, M64)]);
    s.root.lock().unwrap().add_device(d).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let dev = x % 4;
        let reg = (x >> 8) % 4096;
        let len = [1usize, 2, 4, 8][usize::try_from((x >> 24) % 4).unwrap()];
        let bytes = (x >> 32).to_le_bytes();
        s.ecam.write(0, dev << 15 | reg, &bytes[..len]);
        let mut r = [0u8; 4];
        s.ecam.read(0, dev << 15 | (reg & !3), &mut r);
    }
    // The host bridge is untouched.
    assert_eq!(ecam_read32(&mut s, 0, 0), 0x0008_1b36);
    assert_eq!(ecam_read32(&mut s, 1, 0), 0x5678_1234);
}

#[test]
fn root_state_round_trips_the_host_bridge_and_the_address_register() {
    let mut s = setup();
    ecam_write32(&mut s, 0, reg::COMMAND as u64, 0x6);
    cf8(&mut s, 0, 0x3c);
    let state = s.root.lock().unwrap().state();
    let json = serde_json::to_string(&state).unwrap();
    let back: PciRootState = serde_json::from_str(&json).unwrap();
    let mut t = setup();
    t.root.lock().unwrap().restore(&back).unwrap();
    t.io.set_address(s.io.address());
    assert_eq!(ecam_read32(&mut t, 0, reg::COMMAND as u64) & 0xffff, 0x6);
    let mut b = [0u8; 4];
    t.io.read(0xcf8, 0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x8000_003c);
}
