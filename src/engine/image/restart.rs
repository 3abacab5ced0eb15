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
//! - **Applied** at open, after the journal replay, before the engine serves (`open`): in
//!   chunks, each committed, that each fit one transaction, the file rewritten before each
//!   commit so that a kill anywhere loses nothing (`apply`). `check --repair` applies it the
//!   same way (`apply_and_remove`); plain `check` reports it (`pending_at`).
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
use crate::image::{Image, ImageError, Reapplied};
use crate::restart_log::format::{self, Change, Header, Record};
use crate::restart_log::{self, default_path, ImageSession, LogFile, Pending, RestartLogError};

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

impl RestartLogAt {
    /// `InDir` with `backing` filled in from `image`'s file (its device and inode), as the
    /// default path names them; the rest as they are.
    pub fn for_image(&self, image: &Path) -> RestartLogAt {
        match self {
            RestartLogAt::InDir { dir, .. } => RestartLogAt::InDir {
                dir: dir.clone(),
                backing: std::fs::metadata(image).ok().map(|m| {
                    (
                        std::os::unix::fs::MetadataExt::dev(&m),
                        std::os::unix::fs::MetadataExt::ino(&m),
                    )
                }),
            },
            other => other.clone(),
        }
    }

    /// The log's path for the image with `uuid`, and whether its directory may be created;
    /// `None` when there is no log.
    pub fn path(&self, uuid: &[u8; 16]) -> Option<(PathBuf, bool)> {
        match self {
            RestartLogAt::Off => None,
            RestartLogAt::InDir { dir, backing } => Some((default_path(dir, uuid, *backing), true)),
            RestartLogAt::File(p) => Some((p.clone(), false)),
        }
    }

    /// The directory the log's files live in (the log is rewritten by a rename beside it), and
    /// whether it may be created; `None` when there is no log. Known before the image is
    /// open, unlike the file's name (the image's UUID).
    pub fn dir(&self) -> Option<(PathBuf, bool)> {
        match self {
            RestartLogAt::Off => None,
            RestartLogAt::InDir { dir, .. } => Some((dir.clone(), true)),
            RestartLogAt::File(p) => Some((
                match p.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                    _ => PathBuf::from("."),
                },
                false,
            )),
        }
    }
}

fn session_of(image: &Image) -> ImageSession {
    ImageSession {
        uuid: image.superblock().uuid,
        session: image.superblock().mnt_count,
        first_missing_tid: image.recovery().first_missing_tid,
    }
}

/// What became of the log a previous session left.
#[derive(Debug)]
pub enum Handled {
    /// No file there.
    NoLog,
    /// Nothing in it the journal lacks.
    Nothing,
    /// Not applied, and why (`restart_log::pending`).
    Ignored(String),
    Applied(Applied),
}

/// A previous session's log, applied and committed.
#[derive(Debug)]
pub struct Applied {
    /// Changes the journal lacked, applied in order.
    pub changes: usize,
    /// Chunks applied, each committed before the next (more than one when the changes do not
    /// fit one transaction of the journal).
    pub chunks: u32,
    /// Transactions those commits wrote.
    pub transactions: u32,
    pub done: Reapplied,
    /// Bytes of a torn last write, ignored.
    pub torn_bytes: usize,
}

impl std::fmt::Display for Applied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = &self.done;
        write!(
            f,
            "{} change(s) the journal did not hold applied and committed in {} transaction(s) \
             ({} block(s) converted, {} mapped, {} zeroed, {} punched; {} left as they were, \
             {} record(s) outside the disk",
            self.changes,
            self.transactions,
            r.converted,
            r.mapped,
            r.zeroed,
            r.punched,
            r.left,
            r.out_of_range
        )?;
        if self.torn_bytes > 0 {
            write!(
                f,
                "; {} byte(s) of a torn last write ignored",
                self.torn_bytes
            )?;
        }
        write!(f, ")")
    }
}

/// Opens the log, applies what the killed session left in it, and starts it for this one.
/// Runs before the engine's threads exist, on an image opened with
/// [`Image::open_keeping_session`]; begins the image's session once the log is handled.
pub(super) fn open(image: &mut Image, at: &RestartLogAt) -> Result<Option<Writer>, ImageError> {
    let Some((path, make_dir)) = at.path(&image.superblock().uuid) else {
        image.begin_session()?;
        return Ok(None);
    };
    let (mut file, old) = LogFile::open(&path, make_dir)?;
    match apply(image, &mut file, &old)? {
        Handled::Ignored(why) => log::warn!("restart log {}: {why}; ignored", path.display()),
        Handled::Applied(a) => log::info!("restart log {}: {a}", path.display()),
        Handled::NoLog | Handled::Nothing => {}
    }
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

/// `check --repair`: applies the log the last session left at `at` (the same application as
/// a daemon's start), then removes it — everything in it is committed, and the session the
/// caller begins next would make it stale anyway. A log that is not applied (another
/// image's, a stale one, garbage) is left where it is. Returns where the log was looked for
/// and what became of it. The caller begins the session afterwards.
pub fn apply_and_remove(
    image: &mut Image,
    at: &RestartLogAt,
) -> Result<Option<(PathBuf, Handled)>, ImageError> {
    let Some((path, _)) = at.path(&image.superblock().uuid) else {
        return Ok(None);
    };
    let Some((mut file, old)) = LogFile::open_existing(&path)? else {
        return Ok(Some((path, Handled::NoLog)));
    };
    let handled = apply(image, &mut file, &old)?;
    if matches!(handled, Handled::Applied(_) | Handled::Nothing) {
        file.remove()
            .map_err(|e| ImageError::RestartLog(RestartLogError::Io(path.clone(), e)))?;
    }
    Ok(Some((path, handled)))
}

/// Plain `check`: what the log at `at` holds for `image` (opened read-only), without taking
/// its lock or changing it. `None` when there is no log to look at; a file that cannot be read
/// is reported as ignored.
pub fn pending_at(image: &Image, at: &RestartLogAt) -> Option<(PathBuf, Pending)> {
    let (path, _) = at.path(&image.superblock().uuid)?;
    let p = match std::fs::read(&path) {
        Ok(b) => restart_log::pending(&b, &session_of(image)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => Pending::Ignored(format!("cannot read it: {e}")),
    };
    Some((path, p))
}

/// Applies a previous session's log (`old`, read from the open, locked `file`), if it is this
/// image's and the last session's, in chunks that each fit one transaction.
///
/// Kill safety: before a chunk that is not the last is committed, the file is rewritten (a
/// new file renamed over it) with the same session's header, `base_tid` = T, the tid that
/// commit takes, the chunk's records stamped T and the records after it T + 1. Whatever the
/// kill, the next open's journal lacks either T — and that open applies the chunk and the
/// rest again, from the state before the chunk — or only what follows T, and it applies
/// exactly the rest: the file always names exactly what is not durable. (Rewritten after the
/// commit instead, a kill between the two would leave records stamped with tids the journal
/// holds, and the rest would be lost.) The last chunk needs no rewrite when the file already
/// stamps it with its own tid T or older ones the journal lacks (the killed session's
/// records: every tid in a file is at most the first tid the next open commits, since the
/// replay or the checkpoint sets the journal's sequence past them): they count until T is
/// durable, and then never again. The session number stays as it was, so the next open
/// accepts the file; the caller starts a new session only once everything is committed.
fn apply(image: &mut Image, file: &mut LogFile, old: &[u8]) -> Result<Handled, ImageError> {
    let (header, changes, torn_bytes) = match restart_log::pending(old, &session_of(image)) {
        Pending::Nothing => return Ok(Handled::Nothing),
        Pending::Ignored(why) => return Ok(Handled::Ignored(why)),
        Pending::Changes {
            header,
            changes,
            torn_bytes,
        } => (header, changes, torn_bytes),
    };
    let path = file.path().to_path_buf();
    let p = path.display();
    let io_err = |e| ImageError::RestartLog(RestartLogError::Io(path.clone(), e));
    log::info!(
        "restart log {p}: applying {} change(s) the journal does not hold",
        changes.len()
    );
    let mut done = Reapplied::default();
    let (mut at, mut chunks, mut transactions) = (0usize, 0u32, 0u32);
    // The tid the file stamps the records not applied yet with, once rewritten.
    let mut stamped: Option<u32> = None;
    while at < changes.len() {
        let rest = &changes[at..];
        let n = image.reapply_chunk(rest, &mut done)?;
        chunks += 1;
        let tid = image.running_tid().ok_or(ImageError::ReadOnly)?;
        // A chunk that wrote nothing leaves the tid where it was: the file's T + 1 is then
        // the last chunk's tid + 1, which a kill after its commit would apply once more.
        if n < rest.len() || stamped.is_some_and(|t| t != tid) {
            let next = tid.wrapping_add(1);
            let records = rest
                .iter()
                .enumerate()
                .map(|(i, &change)| Record {
                    tid: if i < n { tid } else { next },
                    change,
                })
                .collect();
            file.rewrite(
                Header {
                    base_tid: tid,
                    ..header
                },
                records,
            )
            .map_err(io_err)?;
            stamped = Some(next);
            failpoint!(ReapplyRewritten, chunks);
        }
        let wrote = image.commit()?;
        for (s, l) in std::mem::take(&mut done.freed) {
            if let Err(e) = image.io().punch(s * BS, l * BS) {
                log::warn!("cannot deallocate blocks {s}+{l} in the backing: {e}");
            }
        }
        if wrote {
            transactions += 1;
            log::info!(
                "restart log {p}: chunk {chunks}: {n} change(s) applied and committed as \
                 transaction {tid}"
            );
        } else {
            log::info!(
                "restart log {p}: chunk {chunks}: {n} change(s) applied, none changed the image"
            );
        }
        failpoint!(ReapplyCommitted, chunks);
        at += n;
    }
    failpoint!(ReapplyDone, 0);
    Ok(Handled::Applied(Applied {
        changes: changes.len(),
        chunks,
        transactions,
        done,
        torn_bytes,
    }))
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
