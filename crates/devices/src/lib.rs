//! kiln devices.
