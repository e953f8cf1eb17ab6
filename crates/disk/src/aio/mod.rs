//! Asynchronous disk I/O for virtio-blk: requests submitted against an image complete later
//! and signal an eventfd that the device's I/O thread polls (io_uring for raw files and
//! block devices, a synchronous adapter for other formats). Not written yet.
