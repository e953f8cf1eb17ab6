//! virtio-console (not written yet).
