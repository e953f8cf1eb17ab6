//! Disk image formats for kiln: raw and qcow2 behind one small trait.
//!
//! This crate knows nothing about KVM or virtio; `virtio-blk` and `kiln img` both use it.
