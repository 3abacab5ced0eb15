//! The restart log: the metadata changes a daemon has acknowledged but not yet committed,
//! kept in a file that outlives the process but not the host (under `/run`, a tmpfs). A
//! `write` that returned is in the page cache, which a killed process cannot take back, so
//! nothing here syncs; a host crash empties `/run`, and the journal's contract (unflushed
//! writes may be lost) holds as before. The next read-write open applies what the journal
//! does not hold (`image::reapply`).
//!
//! This module is the file: opened and locked (a second daemon on an image with the same
//! UUID — a copy — must not share it), read, appended to, emptied, rewritten, removed; and
//! the rules that bind it to its image and session (`pending`: what of it applies now). Its
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

/// What an image says of itself that decides whether a log left by its last session applies.
#[derive(Clone, Copy, Debug)]
pub struct ImageSession {
    /// `s_uuid`.
    pub uuid: [u8; 16],
    /// `s_mnt_count` as it stands: the session that wrote the log, if nothing opened the
    /// image read-write since.
    pub session: u16,
    /// The first transaction the (replayed) journal lacks (`RecoveryInfo::first_missing_tid`).
    pub first_missing_tid: u32,
}

/// What a log left by an earlier session holds for the image now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pending {
    /// Nothing to apply: an empty file, no records, or only records the journal holds.
    Nothing,
    /// Not to be applied, and why (another image's, another boot's, a session since, an image
    /// older than the log, bytes that are no log).
    Ignored(String),
    /// The changes the journal lacks, in the order they were made (a suffix of the file's
    /// records: tids never decrease along the file).
    Changes {
        header: Header,
        changes: Vec<format::Change>,
        /// Bytes of a torn last write, ignored.
        torn_bytes: usize,
    },
}

/// The rules that bind a log to its image and session, for `bytes` (the whole file).
pub fn pending(bytes: &[u8], image: &ImageSession) -> Pending {
    if bytes.is_empty() {
        return Pending::Nothing;
    }
    let d = match format::decode(bytes) {
        Ok(d) => d,
        Err(e) => return Pending::Ignored(e.to_string()),
    };
    if d.header.uuid != image.uuid {
        return Pending::Ignored("it belongs to another image (another filesystem UUID)".into());
    }
    if d.records.is_empty() {
        return Pending::Nothing;
    }
    let n = d.records.len();
    if d.header.boot_id != format::boot_id() {
        // A reboot since: what the log describes may never have reached the disk (design §5:
        // unflushed writes may be lost, never read back stale).
        return Pending::Ignored(format!(
            "it was written before the host last booted; {n} record(s)"
        ));
    }
    if d.header.session != image.session {
        return Pending::Ignored(format!(
            "it was written in session {} of this image, the last was {}: the image has been \
             opened read-write since; {n} record(s)",
            d.header.session, image.session
        ));
    }
    let first = image.first_missing_tid;
    // The log's session began with tid `base`, everything before it durable; a clean journal
    // names as first missing the tid before the first one a session uses (Journal::new), so
    // `base` may be one past `first`. Further past, the image is older than the log.
    if !format::tid_at_or_after(first.wrapping_add(1), d.header.base_tid) {
        return Pending::Ignored(format!(
            "it starts after transaction {}, but the image's journal holds only those before \
             {first} (an older copy of the image?)",
            d.header.base_tid
        ));
    }
    let changes: Vec<format::Change> = d
        .records
        .iter()
        .filter(|r| format::tid_at_or_after(r.tid, first))
        .map(|r| r.change)
        .collect();
    if changes.is_empty() {
        return Pending::Nothing;
    }
    Pending::Changes {
        header: d.header,
        changes,
        torn_bytes: d.ignored_bytes,
    }
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

/// Creates a log directory (and its parents) owner-only, as [`LogFile::open`] does when asked
/// to; one that exists is left as it is. `serve`'s sandbox calls it before Landlock, which can
/// only grant a directory that exists.
pub fn make_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
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
                self::make_dir(dir).map_err(err)?;
            }
        }
        LogFile::take(path, open_locked(path, false)?)
    }

    /// [`LogFile::open`] of a log that exists; `None` when there is none at `path` (nothing
    /// is created: `check --repair` leaves no file where there was none).
    pub fn open_existing(path: &Path) -> Result<Option<(LogFile, Vec<u8>)>, RestartLogError> {
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(RestartLogError::Io(path.to_path_buf(), e)),
        };
        let err = |e| RestartLogError::Io(path.to_path_buf(), e);
        if !crate::io::sys::try_lock(&file, true).map_err(err)? {
            return Err(RestartLogError::Busy(path.to_path_buf()));
        }
        LogFile::take(path, file).map(Some)
    }

    fn take(path: &Path, mut file: File) -> Result<(LogFile, Vec<u8>), RestartLogError> {
        let mut old = Vec::new();
        file.read_to_end(&mut old)
            .map_err(|e| RestartLogError::Io(path.to_path_buf(), e))?;
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
        self.rewrite(header, keep)
    }

    /// Replaces the file by `header` and `records`: written to a new file, locked, then
    /// renamed over this one, so that a kill leaves the old file or the new, whole.
    pub fn rewrite(&mut self, header: Header, records: Vec<Record>) -> io::Result<()> {
        let seed = format::record_seed(&header);
        let mut bytes = format::encode_header(&header).to_vec();
        bytes.extend(format::encode_records(seed, &records));
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
        self.written = records;
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

    fn file(h: &Header, rs: &[Record]) -> Vec<u8> {
        let mut b = format::encode_header(h).to_vec();
        b.extend(format::encode_records(format::record_seed(h), rs));
        b
    }

    fn changes(p: Pending) -> Vec<u32> {
        match p {
            Pending::Changes { changes, .. } => changes
                .iter()
                .map(|c| match *c {
                    Change::Written { lblk, .. } => lblk,
                    _ => unreachable!(),
                })
                .collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_log_rewritten_between_chunks_names_what_is_not_durable() {
        // The killed session (mnt_count 4) left records of transactions 20 and 21; the journal
        // after the replay lacks 20 on. Chunk 1 (records 1, 2) is about to commit as 23: the
        // log is rewritten with base 23, the chunk stamped 23, the rest (3, 4) 24.
        let boot = format::boot_id();
        let h = Header {
            uuid: [5; 16],
            session: 4,
            base_tid: 20,
            boot_id: boot,
        };
        let img = |first_missing_tid| ImageSession {
            uuid: [5; 16],
            session: 4,
            first_missing_tid,
        };
        let old = file(&h, &[rec(20, 1), rec(21, 2), rec(21, 3), rec(21, 4)]);
        assert_eq!(changes(pending(&old, &img(20))), vec![1, 2, 3, 4]);
        let new = file(
            &Header { base_tid: 23, ..h },
            &[rec(23, 1), rec(23, 2), rec(24, 3), rec(24, 4)],
        );
        // Killed before 23 was durable: the replay ends at 23, or a checkpoint in 23's commit
        // left a clean journal whose sequence is 23; either way everything again.
        assert_eq!(changes(pending(&new, &img(23))), vec![1, 2, 3, 4]);
        // Killed once 23 was durable: exactly the rest.
        assert_eq!(changes(pending(&new, &img(24))), vec![3, 4]);
        // The rest committed as 24 too (the last chunk, no rewrite): nothing.
        assert_eq!(pending(&new, &img(25)), Pending::Nothing);
        // A copy of the image from before the first chunk committed is older than the log.
        assert!(matches!(pending(&new, &img(21)), Pending::Ignored(_)));
        // Once a session began, the log is stale.
        let later = ImageSession {
            session: 5,
            ..img(24)
        };
        assert!(matches!(pending(&new, &later), Pending::Ignored(w) if w.contains("session")));
        // Another image's, another boot's, or no log at all.
        let other = ImageSession {
            uuid: [6; 16],
            ..img(24)
        };
        assert!(
            matches!(pending(&new, &other), Pending::Ignored(w) if w.contains("another image"))
        );
        let reboot = file(
            &Header {
                boot_id: [boot[0] ^ 1; 16],
                ..h
            },
            &[rec(20, 1)],
        );
        assert!(matches!(pending(&reboot, &img(20)), Pending::Ignored(w) if w.contains("booted")));
        assert!(matches!(pending(b"garbage", &img(20)), Pending::Ignored(_)));
        assert_eq!(pending(&[], &img(20)), Pending::Nothing);
    }
}
