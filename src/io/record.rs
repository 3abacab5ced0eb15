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
    /// Also append every event to this file as it happens (the daemon's `EXTBLK_RECORD`), so a
    /// log survives a SIGKILL.
    sink: Option<Mutex<std::fs::File>>,
    /// Held across each operation and its record, so the log's order is the real order (a
    /// barrier is never logged before a write it covered).
    order: Mutex<()>,
}

/// Encodes one event for a log file: kind (1 write, 2 flush, 3 punch), offset, length, data.
pub fn encode_event(e: &IoEvent) -> Vec<u8> {
    let (kind, offset, len, data): (u8, u64, u64, &[u8]) = match e {
        IoEvent::Write { offset, data } => (1, *offset, data.len() as u64, data),
        IoEvent::Flush => (2, 0, 0, &[]),
        IoEvent::Punch { offset, len } => (3, *offset, *len, &[]),
    };
    let mut b = Vec::with_capacity(17 + data.len());
    b.push(kind);
    b.extend_from_slice(&offset.to_le_bytes());
    b.extend_from_slice(&len.to_le_bytes());
    b.extend_from_slice(data);
    b
}

/// Decodes a log file; a truncated last record (the writer was killed) is dropped.
pub fn decode_events(mut b: &[u8]) -> Vec<IoEvent> {
    let mut out = Vec::new();
    while b.len() >= 17 {
        let kind = b[0];
        let offset = u64::from_le_bytes(b[1..9].try_into().unwrap_or_default());
        let len = u64::from_le_bytes(b[9..17].try_into().unwrap_or_default());
        b = &b[17..];
        match kind {
            1 => {
                let Ok(n) = usize::try_from(len) else { break };
                if b.len() < n {
                    break;
                }
                out.push(IoEvent::Write {
                    offset,
                    data: b[..n].to_vec(),
                });
                b = &b[n..];
            }
            2 => out.push(IoEvent::Flush),
            3 => out.push(IoEvent::Punch { offset, len }),
            _ => break,
        }
    }
    out
}

impl RecordingIo {
    pub fn new(inner: Arc<dyn BlockIo>) -> RecordingIo {
        RecordingIo {
            inner,
            log: Mutex::new(Vec::new()),
            sink: None,
            order: Mutex::new(()),
        }
    }

    /// Records into a file instead of memory.
    pub fn to_file(inner: Arc<dyn BlockIo>, path: &std::path::Path) -> io::Result<RecordingIo> {
        Ok(RecordingIo {
            inner,
            log: Mutex::new(Vec::new()),
            sink: Some(Mutex::new(std::fs::File::create(path)?)),
            order: Mutex::new(()),
        })
    }

    /// A write spanning several 4 KiB blocks is recorded block by block: a device may persist
    /// any subset of them before the next barrier, and crash states must include those.
    fn push_write(&self, offset: u64, data: &[u8]) {
        let mut at = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let n = ((4096 - at % 4096) as usize).min(rest.len());
            self.push(IoEvent::Write {
                offset: at,
                data: rest[..n].to_vec(),
            });
            at += n as u64;
            rest = &rest[n..];
        }
    }

    fn push(&self, e: IoEvent) {
        match &self.sink {
            Some(f) => {
                use std::io::Write;
                let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(err) = f.write_all(&encode_event(&e)) {
                    log::error!("cannot append to the I/O record: {err}");
                }
            }
            None => self.lock().push(e),
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
        let _order = self.order.lock().unwrap_or_else(|e| e.into_inner());
        self.inner.write_at(buf, offset)?;
        self.push_write(offset, buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let _order = self.order.lock().unwrap_or_else(|e| e.into_inner());
        self.inner.flush()?;
        self.push(IoEvent::Flush);
        Ok(())
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        let _order = self.order.lock().unwrap_or_else(|e| e.into_inner());
        self.inner.punch(offset, len)?;
        self.push(IoEvent::Punch { offset, len });
        Ok(())
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn writev_at(&self, iovs: &[libc::iovec], offset: u64, dsync: bool) -> io::Result<()> {
        // Forwarded as a data write (layers below tell data from metadata), logged gathered.
        let _order = self.order.lock().unwrap_or_else(|e| e.into_inner());
        self.inner.writev_at(iovs, offset, dsync)?;
        let mut data = Vec::with_capacity(iovs.iter().map(|v| v.iov_len).sum());
        for v in iovs {
            // SAFETY: callers pass iovecs describing live buffers (see engine::GuestBuffers).
            data.extend_from_slice(unsafe {
                std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
            });
        }
        self.push_write(offset, &data);
        if dsync {
            self.push(IoEvent::Flush);
        }
        Ok(())
    }

    fn readv_at(&self, iovs: &[libc::iovec], offset: u64) -> io::Result<()> {
        self.inner.readv_at(iovs, offset)
    }
}
