//! The restart log: the metadata changes a daemon has acknowledged but not yet committed,
//! kept in a file that outlives the process but not the host (under `/run`, a tmpfs). A
//! `write` that returned is in the page cache, which a killed process cannot take back, so
//! nothing here syncs; a host crash empties `/run`, and the journal's contract (unflushed
//! writes may be lost) holds as before. The next read-write open applies what the journal
//! does not hold (`image::reapply`).
//!
//! This module is the file: opened and locked (a second daemon on an image with the same
//! UUID — a copy — must not share it), read, appended to, emptied, rewritten, removed. Its
//! bytes are `format`. Nothing here knows of the engine; `engine/image/restart.rs` decides
//! when each happens.
//!
//! Invariants: one writer (the lock); every append is one `write`, so a kill tears at most the
//! last one, whose requests were not completed; a rewrite goes through a new file renamed over
//! the old one (locked before it is visible), so a kill leaves the old file or the new, never
//! half of either.

pub mod format;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use format::{Header, Record};

/// Owner-only: the log names where the guest's data lies.
const FILE_MODE: u32 = 0o600;
const DIR_MODE: u32 = 0o700;

#[derive(Debug, Error)]
pub enum RestartLogError {
    #[error("restart log {0}: {1}")]
    Io(PathBuf, io::Error),
    #[error(
        "restart log {0} is in use by another process (a copy of this image, same UUID, \
         being served?); give each its own with --restart-log PATH"
    )]
    Busy(PathBuf),
}

/// The open, locked log file.
pub struct LogFile {
    path: PathBuf,
    file: File,
    header: Header,
    seed: u32,
    len: u64,
    /// The records in the file now, oldest first: a rewrite keeps some of them.
    written: Vec<Record>,
}

/// `<dir>/<uuid>-<dev>-<inode>.log`, the default name: one log per image file (copies of an
/// image share its UUID), found again from the image and its file.
pub fn default_path(dir: &Path, uuid: &[u8; 16], backing: Option<(u64, u64)>) -> PathBuf {
    let hex: String = uuid.iter().map(|b| format!("{b:02x}")).collect();
    match backing {
        Some((dev, ino)) => dir.join(format!("{hex}-{dev:x}-{ino:x}.log")),
        None => dir.join(format!("{hex}.log")),
    }
}

fn open_locked(path: &Path, truncate: bool) -> Result<File, RestartLogError> {
    let err = |e| RestartLogError::Io(path.to_path_buf(), e);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(truncate)
        .mode(FILE_MODE)
        .open(path)
        .map_err(err)?;
    if !crate::io::sys::try_lock(&file, true).map_err(err)? {
        return Err(RestartLogError::Busy(path.to_path_buf()));
    }
    Ok(file)
}

impl LogFile {
    /// Opens (creating it, and with `make_dir` its directory, owner-only) and locks the log
    /// at `path`; returns it with what it held, for the caller to decode and apply. The file
    /// takes no record until [`LogFile::start`].
    pub fn open(path: &Path, make_dir: bool) -> Result<(LogFile, Vec<u8>), RestartLogError> {
        let err = |e| RestartLogError::Io(path.to_path_buf(), e);
        if make_dir {
            if let Some(dir) = path.parent() {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(DIR_MODE)
                    .create(dir)
                    .map_err(err)?;
            }
        }
        let mut file = open_locked(path, false)?;
        let mut old = Vec::new();
        file.read_to_end(&mut old).map_err(err)?;
        let header = Header {
            uuid: [0; 16],
            session: 0,
            base_tid: 0,
            boot_id: [0; 16],
        };
        Ok((
            LogFile {
                path: path.to_path_buf(),
                file,
                seed: format::record_seed(&header),
                header,
                len: 0,
                written: Vec::new(),
            },
            old,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Empties the file and writes `header`: what it held before is applied (or ignored) and
    /// committed by now, so losing it to a kill halfway through loses nothing.
    pub fn start(&mut self, header: Header) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.write_all_at(&format::encode_header(&header), 0)?;
        self.header = header;
        self.seed = format::record_seed(&header);
        self.len = format::HEADER_LEN as u64;
        self.written.clear();
        Ok(())
    }

    /// Appends `records` in one `write`.
    pub fn append(&mut self, records: &[Record]) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let bytes = format::encode_records(self.seed, records);
        if let Err(e) = self.file.write_all_at(&bytes, self.len) {
            // Whole records of a torn append would decode after the next one's: cut them.
            let _ = self.file.set_len(self.len);
            return Err(e);
        }
        self.len += bytes.len() as u64;
        self.written.extend_from_slice(records);
        Ok(())
    }

    /// Drops the records of transactions before `first_tid` (committed: the journal holds
    /// them). Empty afterwards: truncated back to its header. Otherwise the records kept go to
    /// a new file under a new header (`base_tid` = `first_tid`), renamed over this one.
    pub fn drop_before(&mut self, first_tid: u32) -> io::Result<()> {
        let keep: Vec<Record> = self
            .written
            .iter()
            .copied()
            .filter(|r| format::tid_at_or_after(r.tid, first_tid))
            .collect();
        if keep.len() == self.written.len() {
            return Ok(());
        }
        if keep.is_empty() {
            // The header stays: its base tid is older than needed, which is still true.
            self.file.set_len(format::HEADER_LEN as u64)?;
            self.len = format::HEADER_LEN as u64;
            self.written.clear();
            return Ok(());
        }
        let header = Header {
            base_tid: first_tid,
            ..self.header
        };
        let seed = format::record_seed(&header);
        let mut bytes = format::encode_header(&header).to_vec();
        bytes.extend(format::encode_records(seed, &keep));
        let mut new_name = self.path.clone().into_os_string();
        new_name.push(".new");
        let new_path = PathBuf::from(new_name);
        // Locked before the rename makes it the log: no other daemon can take it over between.
        let file = open_locked(&new_path, true).map_err(|e| match e {
            RestartLogError::Io(_, e) => e,
            busy => io::Error::new(io::ErrorKind::WouldBlock, busy.to_string()),
        })?;
        file.write_all_at(&bytes, 0)?;
        fs::rename(&new_path, &self.path)?;
        self.file = file;
        self.header = header;
        self.seed = seed;
        self.len = bytes.len() as u64;
        self.written = keep;
        Ok(())
    }

    /// Removes the log: the image was closed cleanly, everything is committed. Removing it
    /// twice is not an error.
    pub fn remove(&mut self) -> io::Result<()> {
        match fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::format::{decode, Change};
    use super::*;

    fn rec(tid: u32, lblk: u32) -> Record {
        Record {
            tid,
            change: Change::Written {
                lblk,
                len: 1,
                pblk: 100 + u64::from(lblk),
            },
        }
    }

    #[test]
    fn append_drop_rewrite_remove() {
        let dir = std::env::temp_dir().join(format!("extblk-rl-{}", std::process::id()));
        let path = default_path(&dir.join("sub"), &[0xab; 16], None);
        let (mut f, old) = LogFile::open(&path, true).unwrap();
        assert!(old.is_empty());
        let h = Header {
            uuid: [0xab; 16],
            session: 3,
            base_tid: 10,
            boot_id: [0; 16],
        };
        f.start(h).unwrap();
        f.append(&[rec(10, 1), rec(10, 2)]).unwrap();
        f.append(&[rec(11, 3)]).unwrap();
        // A second opener is refused while this one holds it.
        assert!(matches!(
            LogFile::open(&path, false),
            Err(RestartLogError::Busy(_))
        ));
        let d = decode(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(d.records, vec![rec(10, 1), rec(10, 2), rec(11, 3)]);
        // Transaction 10 committed: 11's record is kept, under a new header.
        f.drop_before(11).unwrap();
        let d = decode(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(d.header.base_tid, 11);
        assert_eq!(d.records, vec![rec(11, 3)]);
        f.append(&[rec(12, 4)]).unwrap();
        let d = decode(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(d.records, vec![rec(11, 3), rec(12, 4)]);
        // Everything committed: back to the header.
        f.drop_before(13).unwrap();
        let b = fs::read(&path).unwrap();
        assert_eq!(b.len(), format::HEADER_LEN);
        assert!(decode(&b).unwrap().records.is_empty());
        // Still locked after the rename.
        assert!(matches!(
            LogFile::open(&path, false),
            Err(RestartLogError::Busy(_))
        ));
        f.remove().unwrap();
        assert!(!path.exists());
        let _ = fs::remove_dir_all(&dir);
    }
}
