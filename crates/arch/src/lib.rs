//! kiln arch.
