//! A recording layer: passes I/O through and logs every write, barrier and punch, so tests can
//! rebuild the backing as it could stand after a crash at any point (dm-log-writes style).
//!
//! The log is a history of submissions and completions, not of finished operations, because
//! with an io_uring many writes are in flight at once and a barrier covers only what completed
//! before it started:
//!
//! - [`IoEvent::Write`] when a write is handed to the backing, with its bytes as they are then
//!   (one event per 4 KiB block: a device may persist any subset of a longer write);
//! - [`IoEvent::Complete`] when it has completed (reaped from the ring, or returned);
//! - [`IoEvent::FlushStart`] / [`IoEvent::FlushEnd`] around each barrier (`fdatasync`);
//! - [`IoEvent::Punch`] once a range has been deallocated.
//!
//! A write is durable-ordered before a barrier only if its `Complete` precedes the barrier's
//! `FlushStart`; one submitted but not completed by then may or may not be on disk at that
//! barrier, in any order with its peers, until a later barrier that starts after its completion
//! (or its own `Complete { durable: true }`, an `RWF_DSYNC` write). Positioned I/O logs `Write`
//! just before the call and `Complete` just after it; the ring logs them through
//! [`RingObserver`] when it pushes an operation and when it reaps it ([`RecordingIo::with_ring`]).
//! Barriers are serialised here, so they never overlap and a `FlushEnd` closes the last
//! `FlushStart`.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{BlockIo, RingObserver};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IoEvent {
    /// A write handed to the backing: its bytes at submission, at most one 4 KiB block; the
    /// blocks of one longer write share `id`.
    Write { offset: u64, data: Vec<u8>, id: u64 },
    /// The writes logged under `id` completed successfully; `durable`: an `RWF_DSYNC` write,
    /// on stable storage from here on. A failed write gets no `Complete` (it may or may not
    /// have landed, ordered by nothing).
    Complete { id: u64, durable: bool },
    /// A barrier started: it makes durable every write completed before this point.
    FlushStart,
    /// The barrier that started last returned successfully.
    FlushEnd,
    /// A range was deallocated (reads as zeroes on a file; a device may keep the old bytes).
    Punch { offset: u64, len: u64 },
}

/// Bytes before a record's data in a log file: kind, then three little-endian u64 fields.
pub const RECORD_HEADER: usize = 25;

/// The length of one event's record in a log file.
pub fn encoded_len(e: &IoEvent) -> u64 {
    RECORD_HEADER as u64
        + match e {
            IoEvent::Write { data, .. } => data.len() as u64,
            _ => 0,
        }
}

/// Encodes one event for a log file: kind (1 write, 2 flush end, 3 punch, 4 complete, 5 flush
/// start), three u64 fields (write: offset, length, id; complete: id, durable; punch: offset,
/// length), then a write's data.
pub fn encode_event(e: &IoEvent) -> Vec<u8> {
    let (kind, a, b, c, data): (u8, u64, u64, u64, &[u8]) = match e {
        IoEvent::Write { offset, data, id } => (1, *offset, data.len() as u64, *id, data),
        IoEvent::FlushEnd => (2, 0, 0, 0, &[]),
        IoEvent::Punch { offset, len } => (3, *offset, *len, 0, &[]),
        IoEvent::Complete { id, durable } => (4, *id, u64::from(*durable), 0, &[]),
        IoEvent::FlushStart => (5, 0, 0, 0, &[]),
    };
    let mut out = Vec::with_capacity(RECORD_HEADER + data.len());
    out.push(kind);
    for v in [a, b, c] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(data);
    out
}

/// Decodes a log file; a truncated last record (the writer was killed) is dropped.
pub fn decode_events(mut b: &[u8]) -> Vec<IoEvent> {
    let field = |b: &[u8], i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[1 + 8 * i..9 + 8 * i]);
        u64::from_le_bytes(w)
    };
    let mut out = Vec::new();
    while b.len() >= RECORD_HEADER {
        let (kind, x, y, z) = (b[0], field(b, 0), field(b, 1), field(b, 2));
        b = &b[RECORD_HEADER..];
        match kind {
            1 => {
                let Ok(n) = usize::try_from(y) else { break };
                if b.len() < n {
                    break;
                }
                out.push(IoEvent::Write {
                    offset: x,
                    data: b[..n].to_vec(),
                    id: z,
                });
                b = &b[n..];
            }
            2 => out.push(IoEvent::FlushEnd),
            3 => out.push(IoEvent::Punch { offset: x, len: y }),
            4 => out.push(IoEvent::Complete {
                id: x,
                durable: y != 0,
            }),
            5 => out.push(IoEvent::FlushStart),
            _ => break,
        }
    }
    out
}

/// The log itself, shared by the layer and the rings that report to it.
struct Recorder {
    log: Mutex<Vec<IoEvent>>,
    /// Also append every event to this file as it happens (the daemon's `EXTBLK_RECORD`), so a
    /// log survives a SIGKILL; the memory log then stays empty.
    sink: Option<Mutex<std::fs::File>>,
    next_id: AtomicU64,
    /// The 4 KiB blocks any logged write or punch touched: a crash state may hold any of
    /// their versions, so none of them is reported as reading zeroes.
    touched: Mutex<std::collections::BTreeSet<u64>>,
}

impl Recorder {
    fn lock(&self) -> MutexGuard<'_, Vec<IoEvent>> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn touch(&self, offset: u64, len: u64) {
        let mut t = self.touched.lock().unwrap_or_else(|e| e.into_inner());
        t.extend(offset / 4096..(offset + len).div_ceil(4096));
    }

    fn touched(&self, offset: u64, len: u64) -> bool {
        let t = self.touched.lock().unwrap_or_else(|e| e.into_inner());
        t.range(offset / 4096..(offset + len).div_ceil(4096))
            .next()
            .is_some()
    }

    /// Appends events atomically (a write's blocks stay together).
    fn push_all(&self, events: Vec<IoEvent>) {
        match &self.sink {
            Some(f) => {
                use std::io::Write;
                let mut bytes = Vec::new();
                for e in &events {
                    bytes.extend(encode_event(e));
                }
                let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(err) = f.write_all(&bytes) {
                    log::error!("cannot append to the I/O record: {err}");
                }
            }
            None => self.lock().extend(events),
        }
    }

    fn push(&self, e: IoEvent) {
        self.push_all(vec![e]);
    }

    /// Logs a write about to start, block by block under one new id.
    fn submit(&self, offset: u64, bufs: &[&[u8]]) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.touch(offset, bufs.iter().map(|b| b.len() as u64).sum());
        let mut events = Vec::new();
        let mut at = offset;
        let mut cur: Vec<u8> = Vec::new();
        for b in bufs {
            let mut rest = *b;
            while !rest.is_empty() {
                let room = (4096 - (at + cur.len() as u64) % 4096) as usize;
                let n = room.min(rest.len());
                cur.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                if n == room {
                    let data = std::mem::take(&mut cur);
                    let len = data.len() as u64;
                    events.push(IoEvent::Write {
                        offset: at,
                        data,
                        id,
                    });
                    at += len;
                }
            }
        }
        if !cur.is_empty() {
            events.push(IoEvent::Write {
                offset: at,
                data: cur,
                id,
            });
        }
        self.push_all(events);
        id
    }
}

impl RingObserver for Recorder {
    fn write_submitted(&self, offset: u64, bufs: &[&[u8]]) -> u64 {
        self.submit(offset, bufs)
    }

    fn write_completed(&self, token: u64, ok: bool, durable: bool) {
        if ok {
            self.push(IoEvent::Complete { id: token, durable });
        }
    }
}

pub struct RecordingIo {
    inner: Arc<dyn BlockIo>,
    rec: Arc<Recorder>,
    /// Engines may run an io_uring on the inner backing's descriptor, reporting to `rec`.
    ring: bool,
    /// Held across each barrier and its two records, so barriers never overlap in the log.
    barrier: Mutex<()>,
}

impl RecordingIo {
    pub fn new(inner: Arc<dyn BlockIo>) -> RecordingIo {
        RecordingIo::with_recorder(inner, None)
    }

    /// Records into a file instead of memory.
    pub fn to_file(inner: Arc<dyn BlockIo>, path: &std::path::Path) -> io::Result<RecordingIo> {
        let f = std::fs::File::create(path)?;
        Ok(RecordingIo::with_recorder(inner, Some(Mutex::new(f))))
    }

    fn with_recorder(inner: Arc<dyn BlockIo>, sink: Option<Mutex<std::fs::File>>) -> RecordingIo {
        RecordingIo {
            inner,
            rec: Arc::new(Recorder {
                log: Mutex::new(Vec::new()),
                sink,
                next_id: AtomicU64::new(0),
                touched: Mutex::new(std::collections::BTreeSet::new()),
            }),
            ring: false,
            barrier: Mutex::new(()),
        }
    }

    /// Offers engines the inner backing's own descriptor (`raw_fd`, `direct_io`) for an
    /// io_uring that reports its writes to this log: the real I/O path, recorded. Without it
    /// the layer has no descriptor and engines use positioned I/O through it.
    pub fn with_ring(mut self) -> RecordingIo {
        self.ring = self.inner.raw_fd().is_some();
        self
    }

    /// Events so far (of the memory log).
    pub fn len(&self) -> usize {
        self.rec.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn events(&self) -> Vec<IoEvent> {
        self.rec.lock().clone()
    }
}

/// Applies the writes and punches of `events` to an in-memory image, in log order (a crash
/// state is `base` + a subset of the events).
pub fn apply(image: &mut Vec<u8>, events: &[IoEvent]) {
    for e in events {
        match e {
            IoEvent::Write { offset, data, .. } => {
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
            IoEvent::Complete { .. } | IoEvent::FlushStart | IoEvent::FlushEnd => {}
        }
    }
}

impl BlockIo for RecordingIo {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let id = self.rec.submit(offset, &[buf]);
        self.inner.write_at(buf, offset)?;
        self.rec.push(IoEvent::Complete { id, durable: false });
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let _serial = self.barrier.lock().unwrap_or_else(|e| e.into_inner());
        self.rec.push(IoEvent::FlushStart);
        self.inner.flush()?;
        self.rec.push(IoEvent::FlushEnd);
        Ok(())
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        self.rec.touch(offset, len);
        self.inner.punch(offset, len)?;
        self.rec.push(IoEvent::Punch { offset, len });
        Ok(())
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    /// Only blocks no logged event touched: those read as zeroes in the base the crash states
    /// start from, and so in every crash state.
    fn reads_zero(&self, offset: u64, len: u64) -> bool {
        !self.rec.touched(offset, len) && self.inner.reads_zero(offset, len)
    }

    fn grow(&self, len: u64) -> io::Result<()> {
        self.inner.grow(len)
    }

    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.raw_fd().filter(|_| self.ring)
    }

    fn direct_io(&self) -> bool {
        self.ring && self.inner.direct_io()
    }

    fn ring_observer(&self) -> Option<Arc<dyn RingObserver>> {
        if self.ring {
            Some(self.rec.clone())
        } else {
            None
        }
    }

    fn writev_at(&self, iovs: &[libc::iovec], offset: u64, dsync: bool) -> io::Result<()> {
        // Forwarded as a data write (layers below tell data from metadata), logged gathered.
        let bufs: Vec<&[u8]> = iovs
            .iter()
            .filter(|v| v.iov_len > 0)
            // SAFETY: callers pass iovecs describing live buffers (see engine::GuestBuffers),
            // which nothing writes during the call.
            .map(|v| unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) })
            .collect();
        let id = self.rec.submit(offset, &bufs);
        self.inner.writev_at(iovs, offset, dsync)?;
        self.rec.push(IoEvent::Complete { id, durable: dsync });
        Ok(())
    }

    fn readv_at(&self, iovs: &[libc::iovec], offset: u64) -> io::Result<()> {
        self.inner.readv_at(iovs, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::mem::MemIo;

    #[test]
    fn writes_are_logged_block_by_block_with_their_completion() {
        let rec = RecordingIo::new(Arc::new(MemIo::new(vec![0; 5 * 4096])));
        let data: Vec<u8> = (0..6000u32).map(|i| i as u8).collect();
        rec.write_at(&data, 4096 + 1000).unwrap();
        rec.flush().unwrap();
        rec.punch(0, 4096).unwrap();
        let ev = rec.events();
        let w = |offset: u64, r: std::ops::Range<usize>| IoEvent::Write {
            offset,
            data: data[r].to_vec(),
            id: 0,
        };
        assert_eq!(
            ev,
            [
                w(5096, 0..3096),
                w(8192, 3096..6000),
                IoEvent::Complete {
                    id: 0,
                    durable: false
                },
                IoEvent::FlushStart,
                IoEvent::FlushEnd,
                IoEvent::Punch {
                    offset: 0,
                    len: 4096
                },
            ]
        );
        let mut bytes = Vec::new();
        for e in &ev {
            let b = encode_event(e);
            assert_eq!(b.len() as u64, encoded_len(e));
            bytes.extend(b);
        }
        assert_eq!(decode_events(&bytes), ev);
        // A record cut short by a kill is dropped, the ones before it kept.
        assert_eq!(decode_events(&bytes[..bytes.len() - 3]), ev[..5]);
    }

    #[test]
    fn a_recording_without_its_ring_offers_no_descriptor() {
        let rec = RecordingIo::new(Arc::new(MemIo::new(vec![0; 4096]))).with_ring();
        // Memory has no descriptor: nothing to run a ring on.
        assert!(rec.raw_fd().is_none() && rec.ring_observer().is_none());
    }
}
