//! Test-only switches that break the engine on purpose, so the crash tests can prove they catch
//! each class of bug. This module exists only with the `testing` feature (`scripts/test.sh`
//! enables it); the engine checks its switches through the crate's `broken!` macro, which is a
//! constant `false` without the feature, so the checks compile away and a shipped binary cannot
//! be broken by anything. With the feature they cost one relaxed load where checked.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Broken {
    None = 0,
    /// The journal writes the commit record without the barrier that makes data and log durable
    /// first.
    CommitBeforeData = 1,
    /// Blocks freed by the running transaction are reusable at once.
    ReuseBeforeCommit = 2,
    /// Allocating writes are converted to written before their data is written.
    ConvertBeforeWrite = 3,
    /// An allocating write that finds the log nearly full waits on its queue thread for the
    /// commit, while fence guards of its batch's unsubmitted reads and overwrites hold the
    /// committer up (the stall of issue 12).
    ThrottleHoldsFence = 4,
    /// The write-back cache answers a FLUSH with a flush below alone: the dirty pages it
    /// covers are neither waited for nor written back first.
    FlushBeforeWriteback = 5,
    /// The rest of an allocation unit is converted without writing zeroes whatever the backing
    /// holds there, as if every free block were a hole.
    ZeroWithoutHole = 6,
    /// A FUA overwrite completes once its data is durable (`RWF_DSYNC`), without waiting for
    /// the commit of a mapping change it may rely on (the bug the concurrent exploration found).
    FuaBeforeCommit = 7,
}

static MODE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

#[doc(hidden)]
pub fn set_broken(b: Broken) {
    MODE.store(b as u8, std::sync::atomic::Ordering::Relaxed);
}

/// Is switch `b` on? Called only through the crate's `broken!` macro.
pub(crate) fn broken(b: Broken) -> bool {
    MODE.load(std::sync::atomic::Ordering::Relaxed) == b as u8
}

/// `EXTBLK_HOLD_FROM=<byte offset>` (read once): a WRITE at or past that offset is carried out
/// but its completion is never published to the used ring, so a test can kill the daemon
/// with requests in flight and check that the restarted daemon resubmits exactly those from
/// the inflight region.
pub(crate) fn holds_write(offset: u64) -> bool {
    static HOLD_FROM: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    HOLD_FROM
        .get_or_init(|| {
            std::env::var("EXTBLK_HOLD_FROM")
                .ok()
                .and_then(|v| v.parse().ok())
        })
        .is_some_and(|from| offset >= from)
}

/// `EXTBLK_NO_INFLIGHT=1` (read once): the device does not offer the INFLIGHT_SHMFD protocol
/// feature, so a frontend that reconnects after a kill restarts the rings from their used
/// index, as without inflight tracking. tests/guest.sh's control run proves with it that its
/// `killed` test fails where the tracking is missing.
pub(crate) fn no_inflight() -> bool {
    static NO_INFLIGHT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *NO_INFLIGHT.get_or_init(|| {
        let on = std::env::var_os("EXTBLK_NO_INFLIGHT").is_some_and(|v| v == "1");
        if on {
            log::warn!("EXTBLK_NO_INFLIGHT=1: inflight tracking is not offered (a test build)");
        }
        on
    })
}

/// `EXTBLK_COMMIT_DELAY_MS=<ms>` (read once): the committer waits this long after writing a
/// transaction, outside the mapping lock, before finishing it; writes meanwhile fill the next
/// transaction, so a test with a small journal is sure to meet the log throttle (the race it
/// asserts) however fast or loaded the machine is.
pub(crate) fn commit_delay() -> Option<std::time::Duration> {
    static DELAY: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        std::env::var("EXTBLK_COMMIT_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(std::time::Duration::from_millis)
    })
}

/// `EXTBLK_LOG_HARD_LIMIT=<log blocks>` (read once): a running transaction is throttled at this
/// size (and committed at half of it) rather than at half (a quarter) of the log. The metadata a
/// test's writes dirty is bounded by the size of the disk's extent tree, which on a slow or
/// loaded machine never reaches half even of a 4 MiB log; with this the throttle engages anyway.
pub(crate) fn log_hard_limit() -> Option<u32> {
    static LIMIT: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var("EXTBLK_LOG_HARD_LIMIT")
            .ok()
            .and_then(|v| v.parse().ok())
    })
}

/// Where a test may have the process killed (`failpoint!`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failpoint {
    /// The restart log's application: the log rewritten for the n-th chunk, before its commit.
    ReapplyRewritten,
    /// The restart log's application: the n-th chunk committed, before the next one starts.
    ReapplyCommitted,
    /// The restart log's application: every chunk committed, the file not yet started anew
    /// (n is 0).
    ReapplyDone,
}

/// `EXTBLK_REAPPLY_EXIT_AFTER=<n>` (read once) kills the process with SIGKILL — a crash of
/// the daemon, its page cache kept — right after the n-th chunk of the restart log's
/// application is committed; `EXTBLK_REAPPLY_EXIT_AFTER=rewrite:<n>` right after the log is
/// rewritten for the n-th chunk, before that chunk's commit; `done` once every chunk is
/// committed, before the file starts over for the new session. Chunks count from 1 in each
/// process.
pub(crate) fn failpoint(at: Failpoint, n: u32) {
    static SPEC: std::sync::OnceLock<Option<(Failpoint, u32)>> = std::sync::OnceLock::new();
    let spec = SPEC.get_or_init(|| {
        let v = std::env::var("EXTBLK_REAPPLY_EXIT_AFTER").ok()?;
        if v == "done" {
            return Some((Failpoint::ReapplyDone, 0));
        }
        match v.strip_prefix("rewrite:") {
            Some(k) => Some((Failpoint::ReapplyRewritten, k.parse().ok()?)),
            None => Some((Failpoint::ReapplyCommitted, v.parse().ok()?)),
        }
    });
    if *spec == Some((at, n)) {
        log::warn!("EXTBLK_REAPPLY_EXIT_AFTER: killed at {at:?} {n}");
        // SAFETY: kill(2) and _exit(2) on this process; nothing runs after either.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
            libc::_exit(137);
        }
    }
}
