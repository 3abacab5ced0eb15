//! An image held in memory: for fuzzing and for tests that build many crash states.

use std::io;
use std::sync::Mutex;

use super::BlockIo;

pub struct MemIo {
    data: Mutex<Vec<u8>>,
}

impl MemIo {
    pub fn new(data: Vec<u8>) -> MemIo {
        MemIo {
            data: Mutex::new(data),
        }
    }

    pub fn into_inner(self) -> Vec<u8> {
        self.data.into_inner().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn range(len: usize, offset: u64, n: usize) -> io::Result<std::ops::Range<usize>> {
    let start =
        usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::UnexpectedEof))?;
    match start.checked_add(n) {
        Some(end) if end <= len => Ok(start..end),
        _ => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "access past the end of the image",
        )),
    }
}

impl BlockIo for MemIo {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.lock();
        let r = range(d.len(), offset, buf.len())?;
        buf.copy_from_slice(&d[r]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut d = self.lock();
        let r = range(d.len(), offset, buf.len())?;
        d[r].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut d = self.lock();
        let n = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let r = range(d.len(), offset, n)?;
        d[r].fill(0);
        Ok(())
    }

    fn size(&self) -> u64 {
        self.lock().len() as u64
    }

    /// By content: memory has no holes, but zero bytes stay zero until written, which is all
    /// an allocating write needs to know.
    fn reads_zero(&self, offset: u64, len: u64) -> bool {
        let d = self.lock();
        usize::try_from(len)
            .ok()
            .and_then(|n| range(d.len(), offset, n).ok())
            .is_some_and(|r| d[r].iter().all(|&b| b == 0))
    }

    fn grow(&self, len: u64) -> io::Result<()> {
        let n = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut d = self.lock();
        if n > d.len() {
            d.resize(n, 0);
        }
        Ok(())
    }
}
