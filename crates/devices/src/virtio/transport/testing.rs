//! A virtio device double for transport tests: it records what the transport does to it.

use std::sync::{Arc, Mutex};

use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::virtio::{
    features, Activation, GuestMemory, VirtioDevice, VirtioError, VirtioInterrupt,
};

/// Features and (index, size, descriptor table) of each queue, per activation.
pub type ActivationLog = Vec<(u64, Vec<(u16, u16, u64)>)>;

/// What the device saw.
#[derive(Default)]
pub struct FakeLog {
    /// Features and (index, size, descriptor table) of each activation.
    pub activations: ActivationLog,
    /// Resets.
    pub resets: usize,
    /// The interrupt of the last activation.
    pub interrupt: Option<Arc<dyn VirtioInterrupt>>,
    /// The notification eventfds of the last activation.
    pub notifies: Vec<EventFd>,
    /// Configuration space.
    pub config: Vec<u8>,
    /// State restored.
    pub restored: Option<serde_json::Value>,
    /// Pauses and resumes.
    pub pauses: usize,
}

/// The device double.
pub struct FakeDevice {
    pub log: Arc<Mutex<FakeLog>>,
    pub max_sizes: Vec<u16>,
    pub features: u64,
}

/// A device with two queues (256 and 16 entries) offering VERSION_1 and EVENT_IDX.
pub fn fake() -> (Box<dyn VirtioDevice>, Arc<Mutex<FakeLog>>) {
    let log = Arc::new(Mutex::new(FakeLog {
        config: vec![1, 2, 3, 4, 5, 6, 7, 8],
        ..Default::default()
    }));
    (
        Box::new(FakeDevice {
            log: log.clone(),
            max_sizes: vec![256, 16],
            features: features::VERSION_1 | features::RING_EVENT_IDX | 1,
        }),
        log,
    )
}

/// 1 MiB of guest RAM at 0.
pub fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        4
    }
    fn name(&self) -> &'static str {
        "fake"
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }
    fn features(&self) -> u64 {
        self.features
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let log = self.log.lock().unwrap();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| log.config.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut log = self.log.lock().unwrap();
        for (i, b) in data.iter().enumerate() {
            if let Some(c) = usize::try_from(offset)
                .ok()
                .and_then(|o| log.config.get_mut(o + i))
            {
                *c = *b;
            }
        }
    }
    fn activate(&mut self, a: Activation) -> Result<(), VirtioError> {
        let mut log = self.log.lock().unwrap();
        use virtio_queue::QueueT;
        log.activations.push((
            a.features,
            a.queues
                .iter()
                .map(|q| (q.index, q.queue.size(), q.queue.desc_table()))
                .collect(),
        ));
        log.notifies = a.queues.into_iter().map(|q| q.notify).collect();
        log.interrupt = Some(a.interrupt);
        Ok(())
    }
    fn reset(&mut self) -> Result<(), VirtioError> {
        let mut log = self.log.lock().unwrap();
        log.resets += 1;
        log.interrupt = None;
        log.notifies.clear();
        Ok(())
    }
    fn pause(&mut self) -> Result<(), VirtioError> {
        self.log.lock().unwrap().pauses += 1;
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VirtioError> {
        Ok(())
    }
    fn save_state(&self) -> Result<serde_json::Value, VirtioError> {
        Ok(serde_json::json!({ "fake": self.log.lock().unwrap().config }))
    }
    fn restore_state(&mut self, state: serde_json::Value) -> Result<(), VirtioError> {
        self.log.lock().unwrap().restored = Some(state);
        Ok(())
    }
}
