//! `probe.fault=KIND`: raise a CPU exception on purpose, to test the fault
//! path (the ring-0 handler prints `PROBE fault ...` and powers off) and how
//! a VMM reports a guest that dies.

use core::arch::asm;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Invalid opcode: a ud2 without the service marker (vector 6).
    Ud,
    /// Page fault: a read of an unmapped canonical address (vector 14).
    Pf,
    /// General protection: `hlt` in ring 3 (vector 13).
    Gp,
    /// Divide error (vector 0).
    De,
}

/// Address that no PML4 entry maps (entry 254).
pub const UNMAPPED: u64 = 0x7f00_0000_0000;

impl Fault {
    pub fn parse(v: &[u8]) -> Option<Fault> {
        match v {
            b"ud" => Some(Fault::Ud),
            b"pf" => Some(Fault::Pf),
            b"gp" => Some(Fault::Gp),
            b"de" => Some(Fault::De),
            _ => None,
        }
    }

    /// Raises the exception. The handler never returns.
    pub fn raise(self) -> ! {
        // SAFETY: each instruction faults in ring 3 and the ring-0 handler
        // reports it and powers off or halts, so nothing runs after it.
        unsafe {
            match self {
                Fault::Ud => asm!("ud2", in("rax") 0u64, options(noreturn)),
                Fault::Pf => asm!("mov rax, [rax]", "ud2", in("rax") UNMAPPED, options(noreturn)),
                Fault::Gp => asm!("hlt", "ud2", in("rax") 0u64, options(noreturn)),
                Fault::De => asm!("xor edx, edx", "div ecx", "ud2", in("eax") 1u32, in("ecx") 0u32, options(noreturn)),
            }
        }
    }
}
