//! The write-back cache's memory: page slots and their headers, in anonymous memory or in a
//! file that outlives the process (tmpfs under `/run`), and that file's bytes.
//!
//! A slot's data never changes while the slot holds a version of a block (a write makes a new
//! version in another slot), so a writeback reads it with no lock held and a killed daemon
//! leaves no torn page behind. A slot's header says which block it holds and with which
//! sequence number; a header whose sequence is not 0 marks data newer than the engine below
//! (dirty). Headers are written after the data (a release store), so any header a killed
//! process leaves names data that was wholly copied. Layout and fields: `docs/format.md`,
//! "Write-back cache file".

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;

/// Bytes in a cache page: the image's block, the unit the cache keeps and writes back.
pub const PAGE: usize = 4096;
const MAGIC: [u8; 8] = *b"EXTBLKWB";
const VERSION: u32 = 1;
/// Bytes of one slot's header: the block (u64) and the sequence (u64), little-endian.
const SLOT_HEADER: usize = 16;
/// Bytes of the file header covered by its checksum.
const HEADER_BYTES: usize = 64;

/// What a cache file belongs to: one image (its UUID), one session of it (the mount count of
/// the daemon that wrote it), one boot of the host, one disk size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binding {
    pub uuid: [u8; 16],
    pub session: u16,
    pub boot_id: [u8; 16],
    /// The disk's size in bytes when the file was made.
    pub capacity: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub binding: Binding,
    pub slots: u32,
}

/// Why a cache file's bytes are not a cache file.
#[derive(Debug, Error)]
pub enum FileError {
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] io::Error),
    #[error("not a write-back cache file (bad magic)")]
    BadMagic,
    #[error("cache file version {0} (this extblk reads version {VERSION})")]
    Version(u32),
    #[error("cache file page size {0} (expected {PAGE})")]
    PageSize(u32),
    #[error("cache file header checksum mismatch")]
    Checksum,
    #[error("cache file is {have} bytes, its header needs {need}")]
    Truncated { have: u64, need: u64 },
}

/// Encodes the file header (the first page's first `HEADER_BYTES + 4` bytes).
pub fn encode_header(h: &Header) -> [u8; HEADER_BYTES + 4] {
    let mut b = [0u8; HEADER_BYTES + 4];
    b[0..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&(PAGE as u32).to_le_bytes());
    b[16..20].copy_from_slice(&h.slots.to_le_bytes());
    b[20..22].copy_from_slice(&h.binding.session.to_le_bytes());
    b[24..40].copy_from_slice(&h.binding.uuid);
    b[40..56].copy_from_slice(&h.binding.boot_id);
    b[56..64].copy_from_slice(&h.binding.capacity.to_le_bytes());
    let crc = crc32c::crc32c(&b[..HEADER_BYTES]);
    b[HEADER_BYTES..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes and checks the file header at the start of `b`.
pub fn decode_header(b: &[u8]) -> Result<Header, FileError> {
    if b.len() < HEADER_BYTES + 4 {
        return Err(FileError::Truncated {
            have: b.len() as u64,
            need: (HEADER_BYTES + 4) as u64,
        });
    }
    if b[0..8] != MAGIC {
        return Err(FileError::BadMagic);
    }
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
    let crc = u32_at(HEADER_BYTES);
    if crc != crc32c::crc32c(&b[..HEADER_BYTES]) {
        return Err(FileError::Checksum);
    }
    if u32_at(8) != VERSION {
        return Err(FileError::Version(u32_at(8)));
    }
    if u32_at(12) != PAGE as u32 {
        return Err(FileError::PageSize(u32_at(12)));
    }
    Ok(Header {
        slots: u32_at(16),
        binding: Binding {
            session: u16::from_le_bytes([b[20], b[21]]),
            uuid: b[24..40].try_into().expect("16 bytes"),
            boot_id: b[40..56].try_into().expect("16 bytes"),
            capacity: u64::from_le_bytes(b[56..64].try_into().expect("8 bytes")),
        },
    })
}

/// Where the slot headers and the slot data start, and the whole size, for `slots` slots.
fn layout(slots: u32) -> (usize, usize, usize) {
    let headers = PAGE;
    let data = headers + (slots as usize * SLOT_HEADER).div_ceil(PAGE) * PAGE;
    (headers, data, data + slots as usize * PAGE)
}

/// A mapping of the whole region.
struct Map {
    base: *mut u8,
    len: usize,
}

impl Map {
    fn new(len: usize, prot: i32, flags: i32, fd: i32) -> io::Result<Map> {
        // SAFETY: a fresh mapping chosen by the kernel; no existing memory is affected.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Map {
            base: p.cast(),
            len,
        })
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `new` with this length and is unmapped once; nothing
        // refers to it any more (every user holds the `Store` or `Leftover` that owns it).
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// Is the file at `path` on tmpfs (or ramfs): memory that outlives the process but is never
/// written to a disk?
pub fn on_tmpfs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let dir = path.parent().unwrap_or(Path::new("/"));
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain data, written by the call; `c` is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    // ramfs's magic (linux/magic.h), which libc does not name.
    st.f_type == libc::TMPFS_MAGIC || st.f_type == 0x858458f6
}

/// The slots of a running cache.
pub struct Store {
    map: Map,
    slots: u32,
    headers: usize,
    data: usize,
    /// The file behind the memory, removed at a clean close; `None` for anonymous memory.
    path: Option<PathBuf>,
    /// What the file's header says (a file only).
    header: Option<Header>,
}

// SAFETY: the region is plain shared memory. Headers are only accessed through atomics; a
// slot's data is written only by the thread that took the (free) slot, under the cache's
// state lock, before the slot is published, and only read after that (see the module comment).
unsafe impl Send for Store {}
// SAFETY: as above.
unsafe impl Sync for Store {}

impl Store {
    /// Slots in anonymous memory: lost with the process.
    pub fn anonymous(slots: u32) -> io::Result<Store> {
        let (headers, data, len) = layout(slots);
        let map = Map::new(
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
        )?;
        Ok(Store {
            map,
            slots,
            headers,
            data,
            path: None,
            header: None,
        })
    }

    /// Slots in a new file at `path` (replacing any), mode 0600, mapped shared: what the
    /// process wrote there outlives it.
    pub fn create_file(path: &Path, slots: u32, binding: Binding) -> Result<Store, FileError> {
        let io_err = |e| FileError::Io(path.to_path_buf(), e);
        let (headers, data, len) = layout(slots);
        let file: File = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(io_err)?;
        file.set_len(len as u64).map_err(io_err)?;
        let map = Map::new(
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
        )
        .map_err(io_err)?;
        let header = Header { binding, slots };
        let store = Store {
            map,
            slots,
            headers,
            data,
            path: Some(path.to_path_buf()),
            header: Some(header),
        };
        store.write_header(&header);
        Ok(store)
    }

    fn write_header(&self, h: &Header) {
        let b = encode_header(h);
        // SAFETY: the first page is inside the mapping; only `create_file` and `set_capacity`
        // (called quiesced, by the engine's resize) write it, never at once.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), self.map.base, b.len()) };
    }

    /// The disk now has `capacity` bytes (a resize while served): the file says so, so that
    /// recovery after a later kill accepts it.
    pub fn set_capacity(&self, capacity: u64) {
        if let Some(mut h) = self.header {
            h.binding.capacity = capacity;
            self.write_header(&h);
        }
    }

    pub fn slots(&self) -> u32 {
        self.slots
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The data of `slot`, `PAGE` bytes.
    pub fn data(&self, slot: u32) -> *mut u8 {
        assert!(slot < self.slots);
        // SAFETY: slot < slots, so the page lies inside the mapping.
        unsafe { self.map.base.add(self.data + slot as usize * PAGE) }
    }

    /// The data of `slot` as bytes. The caller holds the slot (see the module comment), so
    /// nothing writes it while the slice lives.
    pub fn page(&self, slot: u32) -> &[u8] {
        // SAFETY: `data` is PAGE bytes inside the mapping; published slots are not written.
        unsafe { std::slice::from_raw_parts(self.data(slot), PAGE) }
    }

    fn header(&self, slot: u32, word: usize) -> &AtomicU64 {
        assert!(slot < self.slots);
        // SAFETY: inside the header area (slot < slots); 8-byte aligned (the mapping is
        // page-aligned and headers are 16 bytes); only ever accessed as atomics.
        unsafe {
            &*(self
                .map
                .base
                .add(self.headers + slot as usize * SLOT_HEADER + word * 8)
                as *const AtomicU64)
        }
    }

    /// Marks `slot` as holding `lblock`'s data with sequence `seq` (not 0): the data is
    /// already in place, and the release store orders it before the header.
    pub fn publish(&self, slot: u32, lblock: u64, seq: u64) {
        debug_assert!(seq != 0);
        self.header(slot, 0)
            .store(lblock.to_le(), Ordering::Relaxed);
        self.header(slot, 1).store(seq.to_le(), Ordering::Release);
    }

    /// `slot` is no longer newer than the engine below (written back, superseded, discarded).
    pub fn clear(&self, slot: u32) {
        self.header(slot, 1).store(0, Ordering::Release);
    }

    /// Removes the file (a clean close: nothing in it is dirty).
    pub fn remove_file(&self) {
        if let Some(p) = &self.path {
            if let Err(e) = std::fs::remove_file(p) {
                log::warn!("write-back cache: cannot remove {}: {e}", p.display());
            }
        }
    }
}

/// What `Leftover::from_bytes` finds: header, (block, slot) pairs, data offset.
type Parsed = (Header, Vec<(u64, u32)>, usize);

/// The dirty pages a killed daemon left in its cache file.
pub struct Leftover {
    map: Option<Map>,
    pub header: Header,
    /// (block, slot), the newest version of each block, in block order.
    pub pages: Vec<(u64, u32)>,
    data: usize,
}

// SAFETY: a private read-only mapping, only read.
unsafe impl Send for Leftover {}
// SAFETY: as above.
unsafe impl Sync for Leftover {}

impl Leftover {
    /// Reads the file at `path`: `Ok(None)` when there is none.
    pub fn read(path: &Path) -> Result<Option<Leftover>, FileError> {
        let io_err = |e| FileError::Io(path.to_path_buf(), e);
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(e)),
        };
        let have = file.metadata().map_err(io_err)?.len();
        if have < PAGE as u64 {
            return Err(FileError::Truncated {
                have,
                need: PAGE as u64,
            });
        }
        let map = Map::new(
            have as usize,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            file.as_raw_fd(),
        )
        .map_err(io_err)?;
        // SAFETY: the mapping is `have` ≥ PAGE bytes, readable.
        let bytes = unsafe { std::slice::from_raw_parts(map.base, map.len) };
        Self::from_bytes(bytes).map(|(header, pages, data)| {
            Some(Leftover {
                map: Some(map),
                header,
                pages,
                data,
            })
        })
    }

    /// The header, the newest dirty version of each block (block, slot) and where the slot
    /// data starts, in a cache file's bytes.
    fn from_bytes(bytes: &[u8]) -> Result<Parsed, FileError> {
        let header = decode_header(bytes)?;
        let (headers, data, len) = layout(header.slots);
        if (bytes.len() as u64) < len as u64 {
            return Err(FileError::Truncated {
                have: bytes.len() as u64,
                need: len as u64,
            });
        }
        let blocks = header.binding.capacity / PAGE as u64;
        let mut newest: std::collections::HashMap<u64, (u64, u32)> = Default::default();
        for slot in 0..header.slots {
            let o = headers + slot as usize * SLOT_HEADER;
            let lblock = u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
            let seq = u64::from_le_bytes(bytes[o + 8..o + 16].try_into().expect("8 bytes"));
            // A block outside the disk cannot come from a running cache: skip it.
            if seq == 0 || lblock >= blocks {
                continue;
            }
            let e = newest.entry(lblock).or_insert((seq, slot));
            if seq > e.0 {
                *e = (seq, slot);
            }
        }
        let mut pages: Vec<(u64, u32)> = newest.into_iter().map(|(b, (_, s))| (b, s)).collect();
        pages.sort_unstable();
        Ok((header, pages, data))
    }

    /// The data of `slot`.
    pub fn page(&self, slot: u32) -> &[u8] {
        let map = self.map.as_ref().expect("mapped");
        let o = self.data + slot as usize * PAGE;
        // SAFETY: from_bytes checked the file holds every slot's page.
        unsafe { std::slice::from_raw_parts(map.base.add(o), PAGE) }
    }
}

/// Parses a cache file's bytes as recovery would (the fuzz target's entry): the header and
/// the blocks it would write back.
pub fn parse(bytes: &[u8]) -> Result<(Header, Vec<u64>), FileError> {
    Leftover::from_bytes(bytes).map(|(h, p, _)| (h, p.into_iter().map(|(b, _)| b).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding() -> Binding {
        Binding {
            uuid: [7; 16],
            session: 3,
            boot_id: [9; 16],
            capacity: 1 << 20,
        }
    }

    #[test]
    fn header_round_trips_and_every_flipped_bit_is_caught() {
        let h = Header {
            binding: binding(),
            slots: 12,
        };
        let b = encode_header(&h);
        assert_eq!(decode_header(&b).unwrap(), h);
        for bit in 0..b.len() * 8 {
            let mut c = b;
            c[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_header(&c).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn a_file_keeps_the_newest_dirty_version_of_each_block() {
        let dir = std::env::temp_dir().join(format!("extblk-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.wbcache");
        {
            let s = Store::create_file(&path, 8, binding()).unwrap();
            for (slot, lblock, seq, byte) in
                [(0, 5, 1, 1u8), (1, 5, 4, 2), (2, 6, 2, 3), (3, 7, 3, 4)]
            {
                // SAFETY: the slot is ours; PAGE bytes.
                unsafe { std::ptr::write_bytes(s.data(slot), byte, PAGE) };
                s.publish(slot, lblock, seq);
            }
            s.clear(3);
            // A block beyond the disk is ignored.
            s.publish(4, 1 << 30, 9);
            // Dropped without removing the file: a killed daemon.
        }
        let l = Leftover::read(&path).unwrap().unwrap();
        assert_eq!(l.header.binding, binding());
        assert_eq!(l.pages, vec![(5, 1), (6, 2)]);
        assert!(l.page(1).iter().all(|&b| b == 2));
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(parse(&bytes).unwrap().1, vec![5, 6]);
        assert!(matches!(
            parse(&bytes[..PAGE + 8]),
            Err(FileError::Truncated { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(Leftover::read(&path).unwrap().is_none());
    }
}
