//! virtio-blk (not written yet).
