//! kiln's virtio devices. Each implements [`kiln_devices::virtio::VirtioDevice`] and knows
//! nothing about its transport (virtio-pci or virtio-mmio) or about KVM.
//!
//! One device, one folder: `{mod,device,worker,persist}.rs` as the device grows.

pub mod block;
pub mod common;
pub mod console;
pub mod net;
pub mod rng;

#[cfg(test)]
pub(crate) mod testing;
