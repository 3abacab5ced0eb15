//! Confinement of `extblk serve` (`--sandbox enforce|log|none`): a guest is untrusted (design
//! §6), and if a malformed request ever gets past the device's checks, the process it takes over
//! should reach nothing but its own disk.
//!
//! Applied in two steps, because Landlock and seccomp bind threads differently:
//!
//! 1. [`restrict_files`], on the main thread **before any other thread exists** (before the
//!    image engine starts its worker and committer): `PR_SET_NO_NEW_PRIVS`, then a Landlock
//!    ruleset that leaves only the image, the restart log's directory and the sockets'
//!    directories reachable. `landlock_restrict_self` binds the calling thread and the threads
//!    it creates afterwards, never the threads that already run (kernels before Landlock ABI 8
//!    have no way to reach them), so applied later it would leave the engine's threads — the
//!    ones that write the restart log — unconfined. What the daemon opens before this point
//!    (the image and its O_DIRECT twin, a `testing` build's recording file) it opens without
//!    the ruleset; descriptors already open keep working.
//! 2. [`confine`], once the image is open, the engine's threads and io_uring rings exist and
//!    the sockets listen, before the signal, control and vhost-user threads start: every
//!    capability dropped (the bounding set where permitted, then effective, permitted and
//!    inheritable), and a seccomp filter installed on **every** thread at once
//!    (`SECCOMP_FILTER_FLAG_TSYNC`, which also gives them `no_new_privs`), allowing only the
//!    system calls in [`allowed_syscalls`]. seccomp must come last: the setup needs calls
//!    (`bind`, `io_uring_setup`, `capset`, `landlock_*`, `seccomp`) the running daemon never
//!    makes again.
//!
//! A call outside the list fails with EPERM instead of killing the process: every system call
//! the daemon makes has an error path that reports it (a request answered IOERR, a log line, a
//! refused control request), so a call missed by the list degrades one operation visibly; a
//! killed daemon would take the guest's disk away mid-write and lose the acknowledged writes
//! still in the running transaction that only the restart log would recover. `--sandbox log`
//! makes the filter log such calls (kernel audit records `type=1326`, see docs/operations.md)
//! and let them through, which is how the list was derived (`tests/daemon.rs`,
//! `the_sandbox_log_mode_sees_no_call_outside_the_list`).
//!
//! seccomp cannot see what io_uring does (its operations are not system calls): the rings are
//! restricted to vectored reads and writes where they are created (`io::uring`), sandboxed or
//! not.

use std::io;
use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};
use thiserror::Error;

/// `serve --sandbox`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    /// Landlock, no capabilities, and a seccomp filter that denies (EPERM) any other call.
    #[default]
    Enforce,
    /// As `Enforce`, but the seccomp filter logs a call outside the list and allows it.
    Log,
    /// No confinement at all (the io_uring restrictions stay: they are not part of it).
    None,
}

// The inner errors are part of the message, not a `source` (hence the hand-written `From`s):
// the CLI prints the chain, and would print them twice.
#[derive(Debug, Error)]
pub enum SandboxError {
    #[error("prctl(PR_SET_NO_NEW_PRIVS): {0}")]
    NoNewPrivs(io::Error),
    #[error("cannot drop capabilities: {0}")]
    Capabilities(io::Error),
    #[error("cannot create the restart log's directory {0}: {1}")]
    RestartLogDir(PathBuf, io::Error),
    #[error("landlock: {0}")]
    Landlock(landlock::RulesetError),
    #[error("landlock: {0}")]
    LandlockPath(landlock::PathFdError),
    #[error("seccomp: cannot build the filter: {0}")]
    SeccompBuild(seccompiler::BackendError),
    #[error("seccomp: cannot install the filter: {0}")]
    SeccompApply(seccompiler::Error),
}

impl From<landlock::RulesetError> for SandboxError {
    fn from(e: landlock::RulesetError) -> Self {
        SandboxError::Landlock(e)
    }
}

impl From<landlock::PathFdError> for SandboxError {
    fn from(e: landlock::PathFdError) -> Self {
        SandboxError::LandlockPath(e)
    }
}

impl From<seccompiler::BackendError> for SandboxError {
    fn from(e: seccompiler::BackendError) -> Self {
        SandboxError::SeccompBuild(e)
    }
}

impl From<seccompiler::Error> for SandboxError {
    fn from(e: seccompiler::Error) -> Self {
        SandboxError::SeccompApply(e)
    }
}

/// What the running daemon may reach on the filesystem (step 1).
#[derive(Clone, Debug, Default)]
pub struct FileAccess {
    /// The image: read, and written unless read-only.
    pub image: PathBuf,
    pub read_only: bool,
    /// The restart log's directory (created if missing: pass only one the log may create): its files
    /// are created, written, truncated, renamed over each other and removed.
    pub restart_log_dir: Option<PathBuf>,
    /// Directories of the listening sockets: each socket is bound under a temporary name,
    /// linked to its own, and removed at exit; a stale one is connected to and removed at start.
    pub socket_dirs: Vec<PathBuf>,
    /// The relay's private directory (`device::relay::PrivateSocket`): connected to for every
    /// frontend, its socket and then itself removed at exit. The directory it sits in gets the
    /// right to remove a directory, nothing else.
    pub relay_dir: Option<PathBuf>,
    /// `$NOTIFY_SOCKET`'s directory, when it is a path (sendmsg to it).
    pub notify_dir: Option<PathBuf>,
}

/// What [`restrict_files`] achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilesOutcome {
    /// Every requested right is enforced.
    Full,
    /// The kernel's Landlock is older than the rights asked for: what it knows is enforced.
    Partial,
    /// No Landlock in this kernel (or switched off): files are not confined.
    Unsupported,
}

/// Step 1: `no_new_privs` and the Landlock ruleset for `access`, on the calling thread and the
/// threads it creates from now on. Call it before any other thread exists.
pub fn restrict_files(access: &FileAccess) -> Result<FilesOutcome, SandboxError> {
    set_no_new_privs()?;
    // Read now: the restart log's header holds it, and it comes from /proc, which the ruleset
    // leaves out.
    crate::restart_log::format::boot_id();
    if let Some(dir) = &access.restart_log_dir {
        crate::restart_log::make_dir(dir)
            .map_err(|e| SandboxError::RestartLogDir(dir.clone(), e))?;
    }
    // The newest rights this crate knows; best effort drops what the kernel does not (an
    // older kernel enforces less, and says so in the outcome).
    let abi = ABI::V10;
    let file = AccessFs::from_file(abi);
    let mut image = AccessFs::ReadFile | AccessFs::IoctlDev;
    if !access.read_only {
        image |= AccessFs::WriteFile;
    }
    let log_dir = AccessFs::ReadFile
        | AccessFs::WriteFile
        | AccessFs::Truncate
        | AccessFs::MakeReg
        | AccessFs::RemoveFile;
    let socket_dir = AccessFs::MakeSock | AccessFs::RemoveFile | AccessFs::ResolveUnix;
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))?
        // Signals only to this process (the signal thread's own; nobody else's).
        .scope(Scope::Signal)?
        .create()?
        .add_rule(PathBeneath::new(PathFd::new(&access.image)?, image & file))?;
    if let Some(dir) = &access.restart_log_dir {
        ruleset = ruleset.add_rule(PathBeneath::new(PathFd::new(dir)?, log_dir))?;
    }
    for dir in &access.socket_dirs {
        ruleset = ruleset.add_rule(PathBeneath::new(PathFd::new(dir)?, socket_dir))?;
    }
    if let Some(dir) = &access.relay_dir {
        ruleset = ruleset.add_rule(PathBeneath::new(
            PathFd::new(dir)?,
            AccessFs::RemoveFile | AccessFs::ResolveUnix,
        ))?;
        if let Some(parent) = dir.parent() {
            ruleset =
                ruleset.add_rule(PathBeneath::new(PathFd::new(parent)?, AccessFs::RemoveDir))?;
        }
    }
    if let Some(dir) = &access.notify_dir {
        ruleset = ruleset.add_rule(PathBeneath::new(PathFd::new(dir)?, AccessFs::ResolveUnix))?;
    }
    let status = ruleset.restrict_self()?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => FilesOutcome::Full,
        RulesetStatus::PartiallyEnforced => FilesOutcome::Partial,
        RulesetStatus::NotEnforced => FilesOutcome::Unsupported,
    })
}

/// Step 2: no capability left, and the seccomp filter on every thread of the process.
pub fn confine(mode: Mode) -> Result<(), SandboxError> {
    if mode == Mode::None {
        return Ok(());
    }
    drop_capabilities()?;
    let program = filter(mode)?;
    seccompiler::apply_filter_all_threads(&program)?;
    Ok(())
}

/// [`drop_capabilities`] for a thread that starts before [`confine`] (the image engine's, see
/// `EngineOptions::thread_start`): capabilities belong to each thread, and `confine` empties
/// only its caller's. A failure is logged (the thread has no way to report it) and
/// `tests/daemon.rs` checks every thread's sets.
pub fn drop_thread_capabilities() {
    if let Err(e) = drop_capabilities() {
        log::error!("sandbox: {e} (this thread keeps its capabilities)");
    }
}

fn set_no_new_privs() -> Result<(), SandboxError> {
    // SAFETY: prctl with integer arguments only; PR_SET_NO_NEW_PRIVS touches no memory.
    let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if r != 0 {
        return Err(SandboxError::NoNewPrivs(io::Error::last_os_error()));
    }
    Ok(())
}

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set, capabilities 0 to 63.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Empties the calling thread's capability sets (the bounding set too where the process may
/// change it, i.e. holds CAP_SETPCAP). Threads created afterwards inherit the empty sets.
fn drop_capabilities() -> Result<(), SandboxError> {
    // The bounding set first, while CAP_SETPCAP is still effective. Capabilities are numbered
    // from 0 to the kernel's last one; past it prctl answers EINVAL. Without CAP_SETPCAP (an
    // unprivileged daemon) it answers EPERM: such a process cannot regain what it lacks anyway
    // once no_new_privs is set, so the bounding set is left as it is.
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments only.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if r != 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINVAL) | Some(libc::EPERM) => break,
                _ => return Err(SandboxError::Capabilities(e)),
            }
        }
    }
    let header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads one header and two data words of the version-3 layout, both live
    // for the call; pid 0 is the calling thread. Emptying the inheritable set also clears the
    // ambient set (ambient ⊆ permitted ∩ inheritable).
    let r = unsafe { libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) };
    if r != 0 {
        return Err(SandboxError::Capabilities(io::Error::last_os_error()));
    }
    Ok(())
}

/// One entry of the allow list: a system call, the conditions under which it is allowed (none:
/// always) and why the running daemon makes it. docs/operations.md has the same table.
pub struct Allowed {
    pub nr: i64,
    pub name: &'static str,
    pub rules: Vec<SeccompRule>,
    pub why: &'static str,
}

/// The system calls the running daemon makes, each with why; everything else is denied.
///
/// Derived, not guessed: `tests/daemon.rs` runs every path under `--sandbox log` and fails on
/// any kernel record of a call missing here, and every other test of the daemon runs under the
/// default, denying filter. Calls made only while setting up (`bind`, `listen`,
/// `io_uring_setup`, `io_uring_register`, `landlock_*`, `capset`, `seccomp`) are left out on
/// purpose: the running daemon has no business making them again.
pub fn allowed_syscalls() -> Result<Vec<Allowed>, SandboxError> {
    let plain = |nr: i64, name: &'static str, why: &'static str| Allowed {
        nr,
        name,
        rules: Vec::new(),
        why,
    };
    let only = |nr: i64, name: &'static str, rules: Vec<SeccompRule>, why: &'static str| Allowed {
        nr,
        name,
        rules,
        why,
    };
    // SAFETY: getpid has no preconditions and cannot fail.
    let pid = unsafe { libc::getpid() } as u64;
    let no_exec = || -> Result<Vec<SeccompRule>, SandboxError> {
        Ok(vec![SeccompRule::new(vec![SeccompCondition::new(
            2,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )?])?])
    };
    let mut list = vec![
        // Descriptors.
        plain(libc::SYS_read, "read", "vhost-user and control messages, eventfds, the timer of the commit interval"),
        plain(libc::SYS_write, "write", "the log (stderr), eventfds, control replies"),
        plain(libc::SYS_close, "close", "descriptors of finished connections, received fds"),
        only(
            libc::SYS_fcntl,
            "fcntl",
            arg_is(
                1,
                &[
                    libc::F_GETFD,
                    libc::F_DUPFD_CLOEXEC,
                    libc::F_ADD_SEALS,
                    libc::F_GET_SEALS,
                ]
                .map(|c| c as u64),
            )?,
            "F_DUPFD_CLOEXEC (try_clone), F_GETFD (the vhost crate checks received fds), F_ADD_SEALS/F_GET_SEALS (the inflight region)",
        ),
        only(
            libc::SYS_ioctl,
            "ioctl",
            arg_is(
                1,
                &[fionbio(), BLKDISCARD, BLKZEROOUT, FS_IOC_FIEMAP],
            )?,
            "FIONBIO (set_nonblocking), BLKDISCARD and BLKZEROOUT (discard and write-zeroes on a block device), FS_IOC_FIEMAP (is the rest of an allocation unit a hole of the image file)",
        ),
        plain(libc::SYS_dup, "dup", "the relay keeps a copy of the kick fds it passes on"),
        plain(libc::SYS_statx, "statx", "the size of a received inflight region's file (File::metadata)"),
        // Image and restart log I/O through descriptors opened before.
        plain(libc::SYS_preadv, "preadv", "positioned reads (engine paths without io_uring)"),
        plain(libc::SYS_pwrite64, "pwrite64", "restart log appends and rewrites, metadata blocks"),
        plain(libc::SYS_pwritev2, "pwritev2", "positioned writes, RWF_DSYNC for write-through"),
        plain(libc::SYS_fdatasync, "fdatasync", "FLUSH, commits"),
        plain(libc::SYS_fallocate, "fallocate", "punching discarded ranges, zeroing (regular files)"),
        plain(libc::SYS_ftruncate, "ftruncate", "restart log truncated to its header, the inflight region's size"),
        plain(libc::SYS_flock, "flock", "the restart log's new file, locked before it is renamed into place"),
        plain(libc::SYS_openat, "openat", "the restart log's new file (Landlock limits where)"),
        plain(libc::SYS_io_uring_enter, "io_uring_enter", "submitting and reaping the queue rings (restricted to READV/WRITEV)"),
        plain(libc::SYS_memfd_create, "memfd_create", "the vhost-user inflight region (GET_INFLIGHT_FD)"),
        // Sockets: AF_UNIX only.
        only(
            libc::SYS_socket,
            "socket",
            arg_is(0, &[libc::AF_UNIX as u64])?,
            "AF_UNIX only: the relay's connection to the private socket, sd_notify",
        ),
        plain(libc::SYS_connect, "connect", "the relay's private socket"),
        plain(libc::SYS_accept4, "accept4", "frontends, control clients, the relay's backend side"),
        plain(libc::SYS_recvmsg, "recvmsg", "vhost-user messages with their fds"),
        plain(libc::SYS_sendmsg, "sendmsg", "vhost-user messages with their fds"),
        plain(libc::SYS_recvfrom, "recvfrom", "control requests, vhost-user payloads"),
        plain(libc::SYS_sendto, "sendto", "control replies, sd_notify STOPPING=1"),
        plain(libc::SYS_shutdown, "shutdown", "the relay closes both sides of a finished connection"),
        only(
            libc::SYS_setsockopt,
            "setsockopt",
            arg_is(1, &[libc::SOL_SOCKET as u64])?,
            "SOL_SOCKET only: SO_RCVTIMEO on the relay's sockets, SO_SNDTIMEO on the backend channel",
        ),
        only(
            libc::SYS_getsockopt,
            "getsockopt",
            arg_is(1, &[libc::SOL_SOCKET as u64])?,
            "SOL_SOCKET only: vhost-user-backend checks SET_BACKEND_REQ_FD's socket (SO_DOMAIN, SO_TYPE)",
        ),
        // Waiting.
        plain(libc::SYS_epoll_create1, "epoll_create1", "vring and queue threads of each connection"),
        plain(libc::SYS_epoll_ctl, "epoll_ctl", "their event sets"),
        plain(libc::SYS_eventfd2, "eventfd2", "exit and kick events of each connection"),
        plain(libc::SYS_futex, "futex", "locks, condition variables, channels, thread joins"),
        plain(libc::SYS_rt_sigtimedwait, "rt_sigtimedwait", "the signal thread's sigwait"),
        plain(libc::SYS_restart_syscall, "restart_syscall", "a wait interrupted by a stop (the kernel restarts it)"),
        plain(libc::SYS_clock_nanosleep, "clock_nanosleep", "sleeps of the drain and quiesce polls"),
        // Threads and memory: vring and relay threads are made per connection.
        plain(libc::SYS_clone3, "clone3", "new threads (flags not visible to seccomp: a pointer)"),
        plain(libc::SYS_set_robust_list, "set_robust_list", "thread start (glibc)"),
        plain(libc::SYS_rseq, "rseq", "thread start (glibc)"),
        plain(libc::SYS_gettid, "gettid", "thread start, the log"),
        plain(libc::SYS_getpid, "getpid", "control info, sd_notify"),
        plain(libc::SYS_sched_getaffinity, "sched_getaffinity", "thread start (the Rust runtime's stack guard)"),
        plain(libc::SYS_sigaltstack, "sigaltstack", "each thread's stack-overflow handler stack"),
        plain(libc::SYS_rt_sigprocmask, "rt_sigprocmask", "thread start and exit (glibc)"),
        plain(libc::SYS_rt_sigreturn, "rt_sigreturn", "return from a signal handler"),
        only(
            libc::SYS_rt_sigaction,
            "rt_sigaction",
            // SIGRTMIN and SIGRTMIN+1 as the kernel numbers them (glibc's own SIGCANCEL and
            // SIGSETXID, below the SIGRTMIN it shows programs).
            arg_is(0, &[32, 33])?,
            "glibc's SIGCANCEL and SIGSETXID only: installed at the process's first pthread_create, after the filter when the disk is raw (no engine threads)",
        ),
        only(
            libc::SYS_prctl,
            "prctl",
            arg_is(0, &[libc::PR_SET_NAME as u64])?,
            "PR_SET_NAME only: thread names",
        ),
        plain(libc::SYS_getrandom, "getrandom", "hash map keys of a new thread"),
        only(libc::SYS_mmap, "mmap", no_exec()?, "without PROT_EXEC: thread stacks, allocations, guest memory and the inflight region (MAP_SHARED)"),
        only(libc::SYS_mprotect, "mprotect", no_exec()?, "without PROT_EXEC: thread stack guards, allocator arenas"),
        plain(libc::SYS_munmap, "munmap", "the same, released"),
        plain(libc::SYS_madvise, "madvise", "MADV_DONTNEED of a finished thread's stack (glibc)"),
        plain(libc::SYS_brk, "brk", "the main thread's allocator arena grows (glibc malloc)"),
        plain(libc::SYS_mremap, "mremap", "a large allocation grows (glibc realloc of a mapped chunk)"),
        plain(libc::SYS_sched_yield, "sched_yield", "spinning locks' back-off (the worker's channel, the allocator)"),
        only(
            libc::SYS_tgkill,
            "tgkill",
            arg_is(0, &[pid])?,
            "this process only: abort(3) raising SIGABRT",
        ),
        plain(libc::SYS_exit, "exit", "a thread ends"),
        plain(libc::SYS_exit_group, "exit_group", "the daemon ends (also the panic hook's _exit)"),
    ];
    // Calls x86_64's glibc makes where other architectures have only the *at / p* forms.
    #[cfg(target_arch = "x86_64")]
    list.extend([
        plain(
            libc::SYS_poll,
            "poll",
            "the accept wait and the relay (x86_64's poll(2))",
        ),
        plain(
            libc::SYS_epoll_wait,
            "epoll_wait",
            "vring, queue and control threads (x86_64)",
        ),
        plain(
            libc::SYS_unlink,
            "unlink",
            "sockets and the restart log removed at exit (Landlock limits where)",
        ),
        plain(
            libc::SYS_rmdir,
            "rmdir",
            "the relay's private directory removed at exit",
        ),
        plain(
            libc::SYS_rename,
            "rename",
            "the restart log's rewrite renamed over it",
        ),
    ]);
    #[cfg(not(target_arch = "x86_64"))]
    list.extend([
        plain(libc::SYS_ppoll, "ppoll", "the accept wait and the relay"),
        plain(
            libc::SYS_epoll_pwait,
            "epoll_pwait",
            "vring, queue and control threads",
        ),
        plain(
            libc::SYS_unlinkat,
            "unlinkat",
            "sockets, the restart log, the relay's directory removed at exit",
        ),
        plain(
            libc::SYS_renameat2,
            "renameat2",
            "the restart log's rewrite renamed over it",
        ),
    ]);
    Ok(list)
}

/// The block-device requests the running daemon makes (io::sys has them too; sizes are read
/// before the filter, at open).
const BLKDISCARD: u64 = 0x1277;
const BLKZEROOUT: u64 = 0x127f;
/// `FS_IOC_FIEMAP` (as `io::sys` passes it).
const FS_IOC_FIEMAP: u64 = 0xC020_660B;

/// FIONBIO as a filter value: its type is the ioctl request type of the libc, which differs
/// between targets (an unsigned long on glibc, an int on musl).
#[allow(clippy::unnecessary_cast)]
fn fionbio() -> u64 {
    libc::FIONBIO as u64
}

/// `arg` (a 32-bit argument) equals one of `values`: one rule per value (seccomp rules of a
/// call are alternatives).
fn arg_is(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, SandboxError> {
    values
        .iter()
        .map(|&v| {
            Ok(SeccompRule::new(vec![SeccompCondition::new(
                arg,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                v,
            )?])?)
        })
        .collect()
}

/// The BPF program: the allow list, and for everything else EPERM (`enforce`) or a log record
/// with the call let through (`log`).
fn filter(mode: Mode) -> Result<BpfProgram, SandboxError> {
    let mismatch = match mode {
        Mode::Log => SeccompAction::Log,
        _ => SeccompAction::Errno(libc::EPERM as u32),
    };
    let rules = allowed_syscalls()?
        .into_iter()
        .map(|a| (a.nr, a.rules))
        .collect();
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(SandboxError::SeccompBuild)?;
    let f = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)?;
    Ok(f.try_into()?)
}

/// The directory a socket path lives in (`.` for a bare name), as `serve` binds it.
pub fn socket_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/operations.md's table of system calls is the list, no more, no less (for this
    /// architecture: rows marked for the others are not compiled in here).
    #[test]
    fn the_documented_table_is_the_allow_list() {
        let doc = include_str!("../docs/operations.md");
        let table = doc
            .split("<!-- syscalls: begin")
            .nth(1)
            .and_then(|t| t.split("<!-- syscalls: end").next())
            .expect("the syscall table's markers");
        let this_arch = if cfg!(target_arch = "x86_64") {
            "(not on x86_64)"
        } else {
            "(x86_64 only)"
        };
        let mut documented: Vec<&str> = table
            .lines()
            .filter(|l| l.starts_with("| `") && !l.contains(this_arch))
            .filter_map(|l| l.split('`').nth(1))
            .collect();
        let list = allowed_syscalls().unwrap();
        let mut names: Vec<&str> = list.iter().map(|a| a.name).collect();
        documented.sort_unstable();
        names.sort_unstable();
        assert_eq!(documented, names);
        let mut nrs: Vec<i64> = list.iter().map(|a| a.nr).collect();
        nrs.sort_unstable();
        nrs.dedup();
        assert_eq!(nrs.len(), list.len(), "a system call listed twice");
    }

    #[test]
    fn the_filter_compiles_for_both_modes() {
        for mode in [Mode::Enforce, Mode::Log] {
            assert!(!filter(mode).unwrap().is_empty());
        }
    }
}
