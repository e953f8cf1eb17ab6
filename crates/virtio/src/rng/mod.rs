//! virtio-rng (not written yet).
