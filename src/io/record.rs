//! A recording layer: passes I/O through and logs every write, barrier and punch, so tests can
//! rebuild the backing as it could stand after a crash at any point (dm-log-writes style).

use std::io;
use std::sync::{Arc, Mutex};

use super::BlockIo;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IoEvent {
    Write { offset: u64, data: Vec<u8> },
    Flush,
    Punch { offset: u64, len: u64 },
}

pub struct RecordingIo {
    inner: Arc<dyn BlockIo>,
    log: Mutex<Vec<IoEvent>>,
}

impl RecordingIo {
    pub fn new(inner: Arc<dyn BlockIo>) -> RecordingIo {
        RecordingIo {
            inner,
            log: Mutex::new(Vec::new()),
        }
    }

    /// Events so far.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn events(&self) -> Vec<IoEvent> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<IoEvent>> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Applies events to an in-memory image (a crash state is `base` + a subset of the events).
pub fn apply(image: &mut Vec<u8>, events: &[IoEvent]) {
    for e in events {
        match e {
            IoEvent::Write { offset, data } => {
                let o = *offset as usize;
                if image.len() < o + data.len() {
                    image.resize(o + data.len(), 0);
                }
                image[o..o + data.len()].copy_from_slice(data);
            }
            IoEvent::Punch { offset, len } => {
                let o = (*offset as usize).min(image.len());
                let end = ((offset + len) as usize).min(image.len());
                image[o..end].fill(0);
            }
            IoEvent::Flush => {}
        }
    }
}

impl BlockIo for RecordingIo {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)?;
        self.lock().push(IoEvent::Write {
            offset,
            data: buf.to_vec(),
        });
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()?;
        self.lock().push(IoEvent::Flush);
        Ok(())
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.punch(offset, len)?;
        self.lock().push(IoEvent::Punch { offset, len });
        Ok(())
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn writev_at(&self, iovs: &[libc::iovec], offset: u64, dsync: bool) -> io::Result<()> {
        // Forwarded as a data write (layers below tell data from metadata), logged gathered.
        self.inner.writev_at(iovs, offset, dsync)?;
        let mut data = Vec::with_capacity(iovs.iter().map(|v| v.iov_len).sum());
        for v in iovs {
            // SAFETY: callers pass iovecs describing live buffers (see engine::GuestBuffers).
            data.extend_from_slice(unsafe {
                std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
            });
        }
        let mut log = self.lock();
        log.push(IoEvent::Write { offset, data });
        if dsync {
            log.push(IoEvent::Flush);
        }
        Ok(())
    }

    fn readv_at(&self, iovs: &[libc::iovec], offset: u64) -> io::Result<()> {
        self.inner.readv_at(iovs, offset)
    }
}
