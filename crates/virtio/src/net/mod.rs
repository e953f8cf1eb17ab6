//! virtio-net (not written yet).
