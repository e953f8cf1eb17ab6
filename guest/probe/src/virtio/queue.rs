//! A split virtqueue driven by polling, in probe memory.
//!
//! Addresses are guest-physical and identity mapped, so the rings are plain
//! memory here (and in host tests, where a test plays the device). Interrupts
//! are suppressed (`VRING_AVAIL_F_NO_INTERRUPT`; with EVENT_IDX the used event
//! is left far behind; only the `msix` check asks for them, with
//! [`Virtqueue::want_interrupts`]) and completions are found by polling `used.idx`.
//! Notifications honour `VRING_USED_F_NO_NOTIFY` or, with EVENT_IDX,
//! `avail_event`, so a batch of requests costs at most one notification.

use core::sync::atomic::{fence, Ordering};

use crate::dma::Dma;
use crate::io::{mmio_write16, mmio_write32};
use crate::reason;
use crate::util::Reason;

/// The largest queue the drivers use.
pub const MAX_QSIZE: u16 = 1024;
pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;
/// Descriptors per indirect table.
pub const INDIRECT_MAX: u16 = 8;

/// One buffer of a request.
#[derive(Clone, Copy, Debug)]
pub struct Seg {
    pub addr: u64,
    pub len: u32,
    /// Device-writable (the device fills it).
    pub write: bool,
}

impl Seg {
    pub fn out(addr: u64, len: u32) -> Seg {
        Seg { addr, len, write: false }
    }

    pub fn inp(addr: u64, len: u32) -> Seg {
        Seg { addr, len, write: true }
    }
}

/// Ring memory of a queue of `size` entries.
#[derive(Clone, Copy, Debug)]
pub struct Rings {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl Rings {
    /// Allocates the three parts, each on its own page(s).
    pub fn alloc(dma: &mut Dma, size: u16) -> Option<Rings> {
        let n = u64::from(size);
        Some(Rings {
            desc: dma.alloc(16 * n, 4096)?,
            avail: dma.alloc(6 + 2 * n, 4096)?,
            used: dma.alloc(6 + 8 * n, 4096)?,
        })
    }
}

pub struct Virtqueue {
    pub index: u16,
    pub size: u16,
    rings: Rings,
    notify: u64,
    event_idx: bool,
    free_head: u16,
    num_free: u16,
    avail_idx: u16,
    kicked_idx: u16,
    last_used: u16,
    inflight: [u64; MAX_QSIZE as usize / 64],
    /// Per-head indirect tables of [`INDIRECT_MAX`] descriptors.
    indirect: Option<u64>,
    /// The notify register takes 32-bit writes (virtio-mmio), not 16-bit.
    wide: bool,
    /// Notifications written.
    pub kicks: u64,
}

/// `vring_need_event`: whether moving the index from `old` to `new` crossed `event`.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

fn rd16(addr: u64) -> u16 {
    // SAFETY: ring memory: identity-mapped DMA arena owned by this queue.
    unsafe { core::ptr::read_volatile(addr as *const u16) }
}

fn wr16(addr: u64, v: u16) {
    // SAFETY: as for `rd16`.
    unsafe { core::ptr::write_volatile(addr as *mut u16, v) }
}

fn rd32(addr: u64) -> u32 {
    // SAFETY: as for `rd16`.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

fn wr_desc(table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let d = table + u64::from(i) * 16;
    // SAFETY: descriptor `i` of a table we allocated (i < its size).
    unsafe {
        core::ptr::write_volatile(d as *mut u64, addr);
        core::ptr::write_volatile((d + 8) as *mut u32, len);
        core::ptr::write_volatile((d + 12) as *mut u16, flags);
        core::ptr::write_volatile((d + 14) as *mut u16, next);
    }
}

impl Virtqueue {
    /// A queue over `rings` (zeroed), notified at `notify`. With `indirect`,
    /// multi-segment requests take one ring slot each.
    pub fn new(index: u16, size: u16, rings: Rings, notify: u64, event_idx: bool, indirect: Option<u64>) -> Virtqueue {
        let size = size.clamp(1, MAX_QSIZE);
        for i in 0..size {
            wr_desc(rings.desc, i, 0, 0, 0, i.wrapping_add(1));
        }
        wr16(rings.avail, AVAIL_F_NO_INTERRUPT);
        // With EVENT_IDX the flag is ignored; ask for an interrupt only after
        // 32768 completions (there is no vector to deliver it anyway).
        wr16(rings.avail + 4 + 2 * u64::from(size), 0x8000);
        Virtqueue {
            index,
            size,
            rings,
            notify,
            event_idx,
            free_head: 0,
            num_free: size,
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            inflight: [0; MAX_QSIZE as usize / 64],
            indirect,
            wide: false,
            kicks: 0,
        }
    }

    /// Asks the device to interrupt after the next completion (the `msix`
    /// check): clears `VRING_AVAIL_F_NO_INTERRUPT` and, for EVENT_IDX, sets the
    /// used event to the next used index. Every other driver keeps the
    /// suppression set up in [`Self::new`].
    pub fn want_interrupts(&mut self) {
        wr16(self.rings.avail, 0);
        wr16(self.rings.avail + 4 + 2 * u64::from(self.size), self.last_used);
        // The device must see this before the request that follows.
        fence(Ordering::SeqCst);
    }

    /// Notifies with 32-bit writes (virtio-mmio's QueueNotify).
    pub fn with_wide_notify(mut self, wide: bool) -> Self {
        self.wide = wide;
        self
    }

    pub fn rings(&self) -> Rings {
        self.rings
    }

    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Requests posted and not yet completed.
    pub fn in_flight(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.last_used)
    }

    /// Ring slots one request of `nsegs` segments needs.
    pub fn slots_for(&self, nsegs: usize) -> u16 {
        if self.indirect.is_some() && nsegs > 1 {
            1
        } else {
            u16::try_from(nsegs).unwrap_or(u16::MAX)
        }
    }

    /// Posts one request (not yet visible to the device: see [`Self::kick`]).
    /// `None` if the ring has no room.
    pub fn add(&mut self, segs: &[Seg]) -> Option<u16> {
        if segs.is_empty() || segs.len() > usize::from(INDIRECT_MAX) && self.slots_for(segs.len()) == 1 {
            return None;
        }
        let need = self.slots_for(segs.len());
        if need > self.num_free {
            return None;
        }
        let head = self.free_head;
        let flag = |s: &Seg| if s.write { DESC_F_WRITE } else { 0 };
        if need == 1 && segs.len() > 1 {
            let table = self.indirect? + u64::from(head) * u64::from(INDIRECT_MAX) * 16;
            for (i, s) in segs.iter().enumerate() {
                let i = u16::try_from(i).ok()?;
                let last = usize::from(i) + 1 == segs.len();
                wr_desc(table, i, s.addr, s.len, flag(s) | if last { 0 } else { DESC_F_NEXT }, i + 1);
            }
            let next = self.desc_next(head);
            let len = u32::try_from(segs.len() * 16).ok()?;
            wr_desc(self.rings.desc, head, table, len, DESC_F_INDIRECT, next);
            self.free_head = next;
        } else {
            let mut i = head;
            for (k, s) in segs.iter().enumerate() {
                let next = self.desc_next(i);
                let last = k + 1 == segs.len();
                wr_desc(self.rings.desc, i, s.addr, s.len, flag(s) | if last { 0 } else { DESC_F_NEXT }, next);
                if last {
                    self.free_head = next;
                } else {
                    i = next;
                }
            }
        }
        self.num_free -= need;
        self.inflight[usize::from(head / 64)] |= 1 << (head % 64);
        self.push_avail(head);
        Some(head)
    }

    fn desc_field(&self, i: u16, off: u64) -> u64 {
        self.rings.desc + u64::from(i) * 16 + off
    }

    fn desc_next(&self, i: u16) -> u16 {
        rd16(self.desc_field(i, 14))
    }

    fn desc_flags(&self, i: u16) -> u16 {
        rd16(self.desc_field(i, 12))
    }

    fn push_avail(&mut self, head: u16) {
        let slot = self.rings.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        wr16(slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Makes posted requests visible (`avail.idx`).
    pub fn publish(&mut self) {
        fence(Ordering::Release);
        wr16(self.rings.avail + 2, self.avail_idx);
    }

    /// Publishes and notifies the device unless it asked not to be.
    /// Returns whether a notification was written.
    pub fn kick(&mut self) -> bool {
        self.publish();
        // The device may check for more work after we read its flags/event.
        fence(Ordering::SeqCst);
        let notify = if self.event_idx {
            let event = rd16(self.rings.used + 4 + 8 * u64::from(self.size));
            need_event(event, self.avail_idx, self.kicked_idx)
        } else {
            rd16(self.rings.used) & USED_F_NO_NOTIFY == 0
        };
        self.kicked_idx = self.avail_idx;
        if notify {
            self.notify_now();
        }
        notify
    }

    /// Writes the notification register regardless of suppression.
    pub fn notify_now(&mut self) {
        // SAFETY: the notify address lies in the device's notify structure
        // (checked inside its memory BAR when the transport was set up) or is
        // virtio-mmio's QueueNotify register.
        unsafe {
            if self.wide {
                mmio_write32(self.notify, u32::from(self.index));
            } else {
                mmio_write16(self.notify, self.index);
            }
        }
        self.kicks += 1;
    }

    /// The next completion: (head, bytes written by the device). An id that is
    /// not in flight is an error (the device is broken).
    pub fn poll(&mut self) -> Result<Option<(u16, u32)>, Reason> {
        if rd16(self.rings.used + 2) == self.last_used {
            return Ok(None);
        }
        fence(Ordering::Acquire);
        let elem = self.rings.used + 4 + 8 * u64::from(self.last_used % self.size);
        let (id, len) = (rd32(elem), rd32(elem + 4));
        let head = u16::try_from(id).ok().filter(|&h| h < self.size);
        let Some(head) = head.filter(|&h| self.inflight[usize::from(h / 64)] & (1 << (h % 64)) != 0) else {
            return Err(reason!("queue {}: used ring returns id {} that is not in flight", self.index, id));
        };
        self.last_used = self.last_used.wrapping_add(1);
        self.inflight[usize::from(head / 64)] &= !(1 << (head % 64));
        // Return the chain to the free list.
        let mut last = head;
        let mut n = 1;
        while self.desc_flags(last) & DESC_F_NEXT != 0 && n < self.size {
            last = self.desc_next(last);
            n += 1;
        }
        wr_desc(self.rings.desc, last, 0, 0, 0, self.free_head);
        self.free_head = head;
        self.num_free += n;
        Ok(Some((head, len)))
    }

    /// Hostile mode: writes descriptor `i` as given (no bookkeeping).
    pub fn raw_desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        if i < self.size {
            wr_desc(self.rings.desc, i, addr, len, flags, next);
        }
    }

    /// Hostile mode: puts `head` in the next avail slot, valid or not.
    pub fn raw_push(&mut self, head: u16) {
        self.push_avail(head);
    }

    /// Hostile mode: sets `avail.idx` to any value.
    pub fn raw_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.publish();
    }

    /// Hostile mode: used ring element `i` (id, len), without checks.
    pub fn raw_used(&self, i: u16) -> (u32, u32) {
        let elem = self.rings.used + 4 + 8 * u64::from(i % self.size);
        (rd32(elem), rd32(elem + 4))
    }

    /// The device's `used.idx` (to see whether it moved at all).
    pub fn used_idx(&self) -> u16 {
        rd16(self.rings.used + 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Page-aligned zeroed memory for rings and a fake notify register.
    struct Mem(Vec<u64>);

    impl Mem {
        fn new(bytes: usize) -> Mem {
            Mem(vec![0u64; bytes / 8 + 512])
        }

        fn base(&self) -> u64 {
            (self.0.as_ptr() as u64 + 4095) & !4095
        }
    }

    /// A descriptor as the device sees it: address, length, flags.
    type Desc = (u64, u32, u16);

    /// The device side: consume one avail entry and return its descriptors.
    fn device_take(q: &Virtqueue, last_avail: &mut u16) -> Option<(u16, Vec<Desc>)> {
        let r = q.rings();
        if rd16(r.avail + 2) == *last_avail {
            return None;
        }
        let head = rd16(r.avail + 4 + 2 * u64::from(*last_avail % q.size));
        *last_avail = last_avail.wrapping_add(1);
        let mut out = Vec::new();
        let (mut table, mut i) = (r.desc, head);
        loop {
            let d = table + u64::from(i) * 16;
            // SAFETY: test memory.
            let (addr, len, flags, next) = unsafe {
                (
                    core::ptr::read(d as *const u64),
                    core::ptr::read((d + 8) as *const u32),
                    core::ptr::read((d + 12) as *const u16),
                    core::ptr::read((d + 14) as *const u16),
                )
            };
            if flags & DESC_F_INDIRECT != 0 {
                table = addr;
                i = 0;
                continue;
            }
            out.push((addr, len, flags));
            if flags & DESC_F_NEXT == 0 {
                break;
            }
            i = next;
        }
        Some((head, out))
    }

    fn device_complete(q: &Virtqueue, used_idx: &mut u16, id: u16, len: u32) {
        let r = q.rings();
        let e = r.used + 4 + 8 * u64::from(*used_idx % q.size);
        // SAFETY: test memory.
        unsafe {
            core::ptr::write(e as *mut u32, u32::from(id));
            core::ptr::write((e + 4) as *mut u32, len);
        }
        *used_idx = used_idx.wrapping_add(1);
        wr16(r.used + 2, *used_idx);
    }

    fn setup(size: u16, indirect: bool, event_idx: bool) -> (Mem, Virtqueue, u64) {
        let mem = Mem::new(64 * 4096);
        let mut dma = Dma::over(mem.base(), 60 * 4096);
        let rings = Rings::alloc(&mut dma, size).unwrap();
        let notify = dma.alloc(8, 8).unwrap();
        let ind = indirect.then(|| dma.alloc(u64::from(size) * u64::from(INDIRECT_MAX) * 16, 16).unwrap());
        (mem, Virtqueue::new(2, size, rings, notify, event_idx, ind), notify)
    }

    #[test]
    fn chains_complete_and_descriptors_return_to_the_free_list() {
        let (_m, mut q, notify) = setup(8, false, false);
        let segs = [Seg::out(0x1000, 16), Seg::inp(0x2000, 512), Seg::inp(0x3000, 1)];
        let h1 = q.add(&segs).unwrap();
        let h2 = q.add(&segs).unwrap();
        assert_eq!(q.num_free(), 2);
        assert!(q.add(&segs).is_none(), "three descriptors do not fit in two");
        assert!(q.kick());
        assert_eq!(rd16(notify), 2, "the queue index is written to the notify register");
        let (mut la, mut ui) = (0, 0);
        let (head, descs) = device_take(&q, &mut la).unwrap();
        assert_eq!(head, h1);
        assert_eq!(
            descs,
            vec![(0x1000, 16, DESC_F_NEXT), (0x2000, 512, DESC_F_NEXT | DESC_F_WRITE), (0x3000, 1, DESC_F_WRITE)]
        );
        device_complete(&q, &mut ui, h1, 513);
        assert_eq!(q.poll().unwrap(), Some((h1, 513)));
        assert_eq!(q.poll().unwrap(), None);
        assert_eq!(q.num_free(), 5);
        assert_eq!(q.in_flight(), 1);
        let (head, _) = device_take(&q, &mut la).unwrap();
        assert_eq!(head, h2);
        device_complete(&q, &mut ui, h2, 1);
        assert_eq!(q.poll().unwrap(), Some((h2, 1)));
        assert_eq!(q.num_free(), 8);
        for _ in 0..20 {
            let h = q.add(&segs).unwrap();
            q.kick();
            device_take(&q, &mut la).unwrap();
            device_complete(&q, &mut ui, h, 0);
            assert_eq!(q.poll().unwrap(), Some((h, 0)));
        }
    }

    #[test]
    fn indirect_requests_take_one_slot() {
        let (_m, mut q, _) = setup(4, true, false);
        let segs = [Seg::out(0x1000, 16), Seg::inp(0x2000, 4096), Seg::inp(0x3000, 1)];
        let heads: Vec<u16> = (0..4).map(|_| q.add(&segs).unwrap()).collect();
        assert!(q.add(&segs).is_none());
        q.kick();
        let (mut la, mut ui) = (0, 0);
        for &h in &heads {
            let (head, descs) = device_take(&q, &mut la).unwrap();
            assert_eq!(head, h);
            assert_eq!(descs.len(), 3);
            assert_eq!(descs[1], (0x2000, 4096, DESC_F_NEXT | DESC_F_WRITE));
        }
        device_complete(&q, &mut ui, heads[2], 7);
        assert_eq!(q.poll().unwrap(), Some((heads[2], 7)));
        assert_eq!(q.num_free(), 1);
    }

    #[test]
    fn rejects_used_ids_not_in_flight() {
        let (_m, mut q, _) = setup(4, false, false);
        let h = q.add(&[Seg::inp(0x1000, 8)]).unwrap();
        q.kick();
        let mut ui = 0;
        device_complete(&q, &mut ui, h + 1, 8);
        assert!(q.poll().is_err());
        let (_m, mut q, _) = setup(4, false, false);
        device_complete(&q, &mut 0, 9, 0);
        assert!(q.poll().is_err());
    }

    #[test]
    fn notification_suppression() {
        let (_m, mut q, _) = setup(8, false, false);
        q.add(&[Seg::inp(0x1000, 8)]).unwrap();
        wr16(q.rings().used, USED_F_NO_NOTIFY);
        assert!(!q.kick());
        let (_m, mut q, _) = setup(8, false, true);
        let avail_event = q.rings().used + 4 + 8 * 8;
        q.add(&[Seg::inp(0x1000, 8)]).unwrap();
        assert!(q.kick(), "avail_event 0: moving 0 -> 1 crosses it");
        wr16(avail_event, 5);
        q.add(&[Seg::inp(0x1000, 8)]).unwrap();
        assert!(!q.kick(), "1 -> 2 does not cross 5");
        assert_eq!(q.kicks, 1);
    }

    #[test]
    fn want_interrupts_clears_the_flag_and_asks_for_the_next_completion() {
        let (_m, mut q, _) = setup(8, false, true);
        let r = q.rings();
        assert_eq!(rd16(r.avail), AVAIL_F_NO_INTERRUPT);
        let (mut last_avail, mut used) = (0u16, 0u16);
        for _ in 0..3 {
            let head = q.add(&[Seg::inp(0x1000, 64)]).unwrap();
            q.kick();
            device_take(&q, &mut last_avail).unwrap();
            device_complete(&q, &mut used, head, 64);
            q.poll().unwrap().unwrap();
        }
        q.want_interrupts();
        assert_eq!(rd16(r.avail), 0);
        let used_event = rd16(r.avail + 4 + 2 * 8);
        assert_eq!(used_event, 3);
        assert!(need_event(used_event, 4, 3), "the next completion interrupts");
    }

    #[test]
    fn need_event_matches_the_spec_formula() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(1, 1, 0));
        assert!(need_event(3, 5, 2));
        assert!(need_event(0xffff, 0, 0xfffe));
    }
}
