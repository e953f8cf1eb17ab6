//! kiln vmm.
