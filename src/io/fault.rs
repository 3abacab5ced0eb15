//! Fault injection below the I/O trait, for tests of the error paths (EIO, ENOSPC, failed
//! barriers). The daemon installs it when `EXTBLK_FAULT` is set, e.g.
//! `EXTBLK_FAULT=eio:data:100` (every guest-data write from the 100th fails with EIO) or
//! `EXTBLK_FAULT=enospc:data:20:3` (data writes 20, 21 and 22 fail with ENOSPC). Kinds: `eio`,
//! `enospc`, `short` (the first half of the buffer is written, then EIO); operations: `data`
//! (vectored guest-data writes), `meta` (metadata and journal writes), `flush`.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::BlockIo;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOp {
    Data,
    Meta,
    Flush,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultSpec {
    pub errno: i32,
    /// Write the first half of the buffer before failing (a short write).
    pub short: bool,
    pub op: FaultOp,
    /// 0-based index of the first failing operation of that kind.
    pub after: u64,
    pub count: u64,
}

impl FaultSpec {
    pub fn parse(s: &str) -> Result<FaultSpec, String> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() < 3 || parts.len() > 4 {
            return Err(format!("bad fault spec {s:?}: want KIND:OP:AFTER[:COUNT]"));
        }
        let (errno, short) = match parts[0] {
            "eio" => (libc::EIO, false),
            "enospc" => (libc::ENOSPC, false),
            "short" => (libc::EIO, true),
            k => return Err(format!("unknown fault kind {k:?}")),
        };
        let op = match parts[1] {
            "data" => FaultOp::Data,
            "meta" => FaultOp::Meta,
            "flush" => FaultOp::Flush,
            o => return Err(format!("unknown fault operation {o:?}")),
        };
        let num = |x: &str| {
            x.parse::<u64>()
                .map_err(|_| format!("bad number {x:?} in fault spec"))
        };
        Ok(FaultSpec {
            errno,
            short,
            op,
            after: num(parts[2])?,
            count: parts
                .get(3)
                .map(|c| num(c))
                .transpose()?
                .unwrap_or(u64::MAX),
        })
    }
}

pub struct FaultIo {
    inner: Arc<dyn BlockIo>,
    spec: FaultSpec,
    seen: AtomicU64,
    pub injected: AtomicU64,
}

impl FaultIo {
    pub fn new(inner: Arc<dyn BlockIo>, spec: FaultSpec) -> FaultIo {
        FaultIo {
            inner,
            spec,
            seen: AtomicU64::new(0),
            injected: AtomicU64::new(0),
        }
    }

    fn maybe_fail(&self, op: FaultOp) -> io::Result<()> {
        if op != self.spec.op {
            return Ok(());
        }
        let n = self.seen.fetch_add(1, Ordering::AcqRel);
        if n >= self.spec.after && n - self.spec.after < self.spec.count {
            self.injected.fetch_add(1, Ordering::Relaxed);
            return Err(io::Error::from_raw_os_error(self.spec.errno));
        }
        Ok(())
    }
}

impl BlockIo for FaultIo {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if let Err(e) = self.maybe_fail(FaultOp::Meta) {
            if self.spec.short {
                self.inner.write_at(&buf[..buf.len() / 2], offset)?;
            }
            return Err(e);
        }
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.maybe_fail(FaultOp::Flush)?;
        self.inner.flush()
    }
    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.punch(offset, len)
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn reads_zero(&self, offset: u64, len: u64) -> bool {
        self.inner.reads_zero(offset, len)
    }

    fn grow(&self, len: u64) -> io::Result<()> {
        self.inner.grow(len)
    }
    fn writev_at(&self, iovs: &[libc::iovec], offset: u64, dsync: bool) -> io::Result<()> {
        if let Err(e) = self.maybe_fail(FaultOp::Data) {
            if self.spec.short {
                let total: usize = iovs.iter().map(|v| v.iov_len).sum();
                let half = super::iov::slice(iovs, 0, total / 2);
                self.inner.writev_at(&half, offset, dsync)?;
            }
            return Err(e);
        }
        self.inner.writev_at(iovs, offset, dsync)
    }
    fn readv_at(&self, iovs: &[libc::iovec], offset: u64) -> io::Result<()> {
        self.inner.readv_at(iovs, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!(
            FaultSpec::parse("eio:data:5").unwrap(),
            FaultSpec {
                errno: libc::EIO,
                short: false,
                op: FaultOp::Data,
                after: 5,
                count: u64::MAX
            }
        );
        assert!(FaultSpec::parse("short:meta:1").unwrap().short);
        assert_eq!(FaultSpec::parse("enospc:meta:0:2").unwrap().count, 2);
        assert!(FaultSpec::parse("eio:data").is_err());
        assert!(FaultSpec::parse("boom:data:1").is_err());
    }
}
