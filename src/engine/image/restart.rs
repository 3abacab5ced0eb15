//! The restart log, engine side (the file and its bytes are `restart_log`): which changes go
//! into it, when it is written, emptied and applied.
//!
//! - **Recorded**: every conversion (the extents it converted), zeroing and punch, under the
//!   mapping lock as it is made, with the running transaction's tid, into
//!   `Locked::restart_pending`.
//! - **Written** before any request of the batch that made them completes: the worker, and the
//!   committer when it completes restarted work, take the pending records and append them in
//!   one `write`. A request whose change is not in the log (an append failed) completes only
//!   after the next commit, as a FUA request would: nothing acknowledged is left exposed.
//! - **Emptied** after each commit: the records of the committed transactions are dropped;
//!   those made after its freeze stay.
//! - **Applied** at open, after the journal replay, as one transaction committed before the
//!   engine serves (`open`).
//!
//! Lock order: the log's mutex, then the mapping lock. Whoever writes takes the log's mutex
//! first and the pending records under the mapping lock after, and holds the mutex through
//! the write, so records reach the file in the order they were made, and a thread that finds
//! nothing pending knows its records are written (the thread that took them wrote them before
//! letting go). Nobody holding the mapping lock waits for the log's mutex; a holder of the
//! log's mutex waits for the mapping lock (bounded, as for everyone) and for one `write` to a
//! tmpfs, never for a commit.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::MutexGuard;

use super::{lock, Done, Shared, BS};
use crate::engine::EngineError;
use crate::image::{Image, ImageError};
use crate::restart_log::format::{self, Change, Header, Record};
use crate::restart_log::{default_path, LogFile, RestartLogError};

/// Where the restart log lives (`serve --restart-log`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum RestartLogAt {
    /// No log: a killed daemon loses the changes not yet committed (design §5's weaker case).
    #[default]
    Off,
    /// `<dir>/<image UUID>[-<dev>-<inode>].log`, the directory created owner-only if missing.
    /// `backing` is the image file's device and inode: copies of one image share a UUID (and
    /// often a mount count), and must not share a log.
    InDir {
        dir: PathBuf,
        backing: Option<(u64, u64)>,
    },
    /// This file.
    File(PathBuf),
}

/// The log's writer, behind its mutex in `Shared::restart`.
pub(super) struct Writer {
    file: LogFile,
    /// An append failed: records up to this tid may be missing from the file, so completions
    /// go through a commit until one has made that transaction durable.
    lost_through: Option<u32>,
}

/// Opens the log, applies what the killed session left in it, and starts it for this one.
/// Runs before the engine's threads exist, on an image opened with
/// [`Image::open_keeping_session`]; begins the image's session once the log is handled.
pub(super) fn open(image: &mut Image, at: &RestartLogAt) -> Result<Option<Writer>, ImageError> {
    let (path, make_dir) = match at {
        RestartLogAt::Off => {
            image.begin_session()?;
            return Ok(None);
        }
        RestartLogAt::InDir { dir, backing } => {
            (default_path(dir, &image.superblock().uuid, *backing), true)
        }
        RestartLogAt::File(p) => (p.clone(), false),
    };
    let (mut file, old) = LogFile::open(&path, make_dir)?;
    apply(image, &path, &old)?;
    let io_err = |e| ImageError::RestartLog(RestartLogError::Io(path.clone(), e));
    let header = Header {
        uuid: image.superblock().uuid,
        // The session about to begin.
        session: image.superblock().mnt_count.wrapping_add(1),
        base_tid: image.running_tid().unwrap_or(0),
        boot_id: format::boot_id(),
    };
    file.start(header).map_err(io_err)?;
    // From here the log names this session; an empty log of a session that never began (a
    // kill right now) is ignored without loss.
    image.begin_session()?;
    log::info!("restart log: {}", path.display());
    Ok(Some(Writer {
        file,
        lost_through: None,
    }))
}

/// Applies a previous session's log, if it is this image's and the last session's.
fn apply(image: &mut Image, path: &Path, old: &[u8]) -> Result<(), ImageError> {
    if old.is_empty() {
        return Ok(());
    }
    let p = path.display();
    let d = match format::decode(old) {
        Ok(d) => d,
        Err(e) => {
            log::warn!("restart log {p}: {e}; ignored");
            return Ok(());
        }
    };
    let sb = image.superblock();
    if d.header.uuid != sb.uuid {
        log::warn!("restart log {p} belongs to another image (another filesystem UUID); ignored");
        return Ok(());
    }
    if d.records.is_empty() {
        return Ok(());
    }
    if d.header.boot_id != format::boot_id() {
        // A reboot since: what the log describes may never have reached the disk (design §5:
        // unflushed writes may be lost, never read back stale).
        log::warn!(
            "restart log {p} was written before the host last booted; {} record(s) ignored",
            d.records.len()
        );
        return Ok(());
    }
    if d.header.session != sb.mnt_count {
        log::warn!(
            "restart log {p} was written in session {} of this image, the last was {}: the \
             image has been opened read-write since; {} record(s) ignored",
            d.header.session,
            sb.mnt_count,
            d.records.len()
        );
        return Ok(());
    }
    let first = image.recovery().first_missing_tid;
    // The log's session began with tid `base`, everything before it durable; a clean journal
    // names as first missing the tid before the first one a session uses (Journal::new), so
    // `base` may be one past `first`. Further past, the image is older than the log.
    if !format::tid_at_or_after(first.wrapping_add(1), d.header.base_tid) {
        log::warn!(
            "restart log {p} starts after transaction {}, but the image's journal holds only \
             those before {first} (an older copy of the image?); ignored",
            d.header.base_tid
        );
        return Ok(());
    }
    if d.ignored_bytes > 0 {
        log::info!(
            "restart log {p}: {} byte(s) of a torn last write ignored",
            d.ignored_bytes
        );
    }
    let changes: Vec<Change> = d
        .records
        .iter()
        .filter(|r| format::tid_at_or_after(r.tid, first))
        .map(|r| r.change)
        .collect();
    if changes.is_empty() {
        return Ok(());
    }
    let r = image.reapply(&changes)?;
    image.commit()?;
    for &(s, l) in &r.freed {
        if let Err(e) = image.io().punch(s * BS, l * BS) {
            log::warn!("cannot deallocate blocks {s}+{l} in the backing: {e}");
        }
    }
    log::info!(
        "restart log {p}: {} change(s) the journal did not hold applied and committed \
         ({} block(s) converted, {} mapped, {} zeroed, {} punched; {} left as they were, \
         {} record(s) outside the disk)",
        changes.len(),
        r.converted,
        r.mapped,
        r.zeroed,
        r.punched,
        r.left,
        r.out_of_range
    );
    Ok(())
}

impl Writer {
    /// Appends `records`; returns whether every record up to them is in the file.
    fn append(&mut self, records: &[Record]) -> bool {
        if let Err(e) = self.file.append(records) {
            let newest = records.iter().map(|r| r.tid).max().unwrap_or(0);
            if self.lost_through.is_none() {
                log::error!(
                    "restart log {}: cannot append ({e}); requests complete after a commit \
                     until the log is whole again",
                    self.file.path().display()
                );
            }
            self.lost_through = Some(match self.lost_through {
                Some(t) if format::tid_at_or_after(t, newest) => t,
                _ => newest,
            });
        }
        self.lost_through.is_none()
    }
}

impl Shared {
    /// Takes the log's mutex, if there is a log: first in the lock order (module comment).
    pub(super) fn restart_guard(&self) -> Option<MutexGuard<'_, Writer>> {
        self.restart.as_ref().map(|m| lock(m))
    }

    /// Records a change made under the mapping lock (the running transaction's tid).
    pub(super) fn record_change(&self, st: &mut super::Locked, change: Change) {
        if self.restart.is_none() {
            return;
        }
        if let Some(tid) = st.image.running_tid() {
            st.restart_pending.push(Record { tid, change });
            self.log_made.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Writes `records` (taken from `Locked::restart_pending` under `guard`), then completes
    /// `done`: at once when they are in the log (or there is none), else after the next commit
    /// (errors complete at once either way).
    /// `made` is `log_made` as it was when `records` were taken (under the mapping lock).
    pub(super) fn complete_logged(
        &self,
        guard: Option<MutexGuard<'_, Writer>>,
        records: Vec<Record>,
        made: u64,
        done: Vec<(Done, Result<(), EngineError>)>,
    ) {
        let logged = match guard {
            Some(mut w) => {
                let ok = w.append(&records);
                if ok {
                    // Every record made up to the take is in the file (or, lost earlier,
                    // committed since: `lost_through` is clear).
                    self.log_written.fetch_max(made, Ordering::AcqRel);
                }
                ok
            }
            None => true,
        };
        if done.is_empty() {
            return;
        }
        // One batch for the run (Completion::batch): each queue is notified once.
        let batch = done.first().map(|(d, _)| d.batch());
        for (d, r) in done {
            match (logged, r) {
                (false, Ok(())) => self.to_committer(super::commit::Waiter::Done(d)),
                (_, r) => d.finish(r),
            }
        }
        drop(batch);
    }

    /// The same for a thread that does not hold the mapping lock: take the log's mutex, then
    /// the pending records.
    pub(super) fn complete_after_log(&self, done: Vec<(Done, Result<(), EngineError>)>) {
        let guard = self.restart_guard();
        let (records, made) = match guard {
            Some(_) => {
                let mut st = lock(&self.state);
                let made = self.log_made.load(Ordering::Acquire);
                (std::mem::take(&mut st.restart_pending), made)
            }
            None => (Vec::new(), 0),
        };
        self.complete_logged(guard, records, made, done);
    }

    /// After a commit made every transaction before `first_tid` durable: their records go.
    /// The committer calls it without the mapping lock.
    pub(super) fn log_committed(&self, first_tid: u32) {
        let Some(mut w) = self.restart_guard() else {
            return;
        };
        if let Some(t) = w.lost_through {
            if !format::tid_at_or_after(t, first_tid) {
                log::info!("restart log {}: whole again", w.file.path().display());
                w.lost_through = None;
            }
        }
        if let Err(e) = w.file.drop_before(first_tid) {
            // The records stay: applying committed ones again changes nothing.
            log::warn!(
                "restart log {}: cannot drop committed records: {e}",
                w.file.path().display()
            );
        }
    }

    /// At a clean close, everything committed: the log goes.
    pub(super) fn remove_log(&self) {
        let Some(m) = &self.restart else { return };
        let mut w = lock(m);
        // Should it stay, it holds only committed records, which the next open skips.
        if let Err(e) = w.file.remove() {
            log::warn!(
                "restart log {}: cannot remove it: {e}",
                w.file.path().display()
            );
        }
    }
}
