//! `extblk serve`: the daemon's life — socket, connections one after another, signals, drain.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::relay::{self, PrivateSocket};
use crate::device::request::ID_BYTES;
use crate::device::{BlockDevice, DeviceOptions};
use crate::engine::cache::store::Binding;
use crate::engine::cache::{self, CacheEngine, CacheError, CacheOptions, Recovered};
use crate::engine::image::{ImageEngine, RestartLogAt};
use crate::engine::raw::RawEngine;
use crate::engine::{BlockEngine, EngineError};
use crate::ext4::FormatError;
use crate::image::ImageError;
use crate::io::backing::{Backing, OpenError};
use crate::sandbox::{self, FileAccess, FilesOutcome, Mode, SandboxError};

/// How long shutdown waits for in-flight requests before giving up on them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The process umask while the socket is bound: the socket is created mode 0600, so only the
/// daemon's own user can connect to it and reach the disk.
const SOCKET_UMASK: libc::mode_t = 0o177;

/// What `serve` needs, already validated by the CLI.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Serve the file as a raw disk instead of an extblk image.
    pub raw: bool,
    /// Data I/O with O_DIRECT (`--cache none` and `writeback`) instead of through the page
    /// cache (`host`).
    pub direct: bool,
    /// `--cache writeback`: extblk's own cache in front of the engine.
    pub writeback: Option<WritebackCache>,
    pub commit_interval: Duration,
    /// Reads and overwrites as designed, or one of the seed experiment's slower variants (only
    /// honoured, with a warning, in `testing` builds; otherwise always `Fast`).
    pub hot_path: crate::engine::image::HotPath,
    /// Blocks an allocating write claims at least (extblk images).
    pub alloc_unit: u64,
    /// Where an extblk image's restart log lives (`--restart-log`).
    pub restart_log: RestartLogAt,
    pub socket: PathBuf,
    /// The control socket (`--control`), if any.
    pub control: Option<PathBuf>,
    pub image: PathBuf,
    pub read_only: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    pub logical_block_size: u32,
    pub serial: Option<String>,
    /// Confinement (`--sandbox`).
    pub sandbox: Mode,
}

/// The write-back cache's sizes (`--cache-size`, `--dirty-ratio`, `--dirty-expire`).
#[derive(Clone, Debug)]
pub struct WritebackCache {
    pub size: u64,
    pub dirty_ratio: u8,
    pub dirty_expire: Duration,
}

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("socket directory {0} does not exist")]
    SocketDir(PathBuf),
    #[error("socket {0} is in use by a running server")]
    SocketInUse(PathBuf),
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("cannot listen on {0}: {1}")]
    Bind(PathBuf, io::Error),
    #[error(transparent)]
    Open(#[from] OpenError),
    // The inner errors are part of the message, not a `source`: the CLI prints the chain, and
    // would print them twice.
    #[error("{0}: not an extblk image ({reason}); to serve a raw disk use --format raw", reason = not_an_image(.1))]
    NotAnImage(PathBuf, FormatError),
    #[error("{0}: {1}")]
    Image(PathBuf, ImageError),
    /// A `testing` build's I/O layer (EXTBLK_RECORD, EXTBLK_FAULT) could not be set up.
    #[cfg(feature = "testing")]
    #[error("{0}: {1}")]
    TestLayer(PathBuf, String),
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// vhost-user-backend's error holds a thread's panic payload (`Send`, not `Sync`), which
    /// an error crossing to the CLI cannot carry: its message is kept.
    #[error("vhost-user: {0}")]
    VhostUser(String),
    #[error("vhost-user: cannot watch the engine's completions: {0}")]
    Listener(io::Error),
    #[error("vhost-user: the relay's private socket: {0}")]
    Relay(io::Error),
    #[error("signal handling: {0}")]
    Signals(io::Error),
    #[error("control socket: {0}")]
    Control(io::Error),
    // Not a `source`, as above.
    #[error("sandbox: {0}")]
    Sandbox(SandboxError),
}

impl From<SandboxError> for ServeError {
    fn from(e: SandboxError) -> Self {
        ServeError::Sandbox(e)
    }
}

/// Why a file is not an image, in the words a user who passed the wrong file needs.
fn not_an_image(e: &FormatError) -> String {
    match e {
        FormatError::NoDiskFile => "no /disk file in its root directory".into(),
        other => other.to_string(),
    }
}

/// The serial a guest sees by default: the image's file name, cut to 20 bytes.
fn serial_bytes(serial: Option<&str>, image: &Path) -> [u8; ID_BYTES] {
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let s = serial.unwrap_or(&name).as_bytes();
    let mut id = [0u8; ID_BYTES];
    let n = s.len().min(ID_BYTES);
    id[..n].copy_from_slice(&s[..n]);
    id
}

/// The restart log's default place: `/run/extblk` for root, `$XDG_RUNTIME_DIR/extblk`
/// otherwise — tmpfs on systemd hosts, so a log outlives the daemon but not the host. Without
/// either the daemon serves without one, and says so.
pub fn default_restart_log() -> RestartLogAt {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return RestartLogAt::InDir {
            dir: PathBuf::from("/run/extblk"),
            backing: None,
        };
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => RestartLogAt::InDir {
            dir: PathBuf::from(d).join("extblk"),
            backing: None,
        },
        _ => {
            log::warn!(
                "no XDG_RUNTIME_DIR, hence no default restart log (a killed daemon loses the \
                 writes acknowledged since the last commit, and check does not see them); pass \
                 --restart-log PATH"
            );
            RestartLogAt::Off
        }
    }
}

/// Checks the socket path and binds it with mode 0600.
fn bind_socket(path: &Path) -> Result<UnixListener, ServeError> {
    let dir = sandbox::socket_dir(path);
    if !dir.is_dir() {
        return Err(ServeError::SocketDir(dir));
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ServeError::NotASocket(path.to_path_buf()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ServeError::SocketInUse(path.to_path_buf()));
        }
        // A stale socket from a daemon that died: nobody listens, take it over.
        std::fs::remove_file(path).map_err(|e| ServeError::Bind(path.to_path_buf(), e))?;
    }
    // Bound and listening under a temporary name first, then linked to its real name: bind(2)
    // creates the file before listen(2) makes it accept, and a client that sees the path in
    // between (a frontend polling for it, on a loaded host) would be refused. link(2) also fails
    // if another daemon took the path meanwhile, where a rename would silently replace it.
    let tmp = dir.join(format!(".extblk-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = match bind_private(&tmp) {
        Ok(l) => l,
        // The temporary name does not fit in sun_path where the real one does: bind directly.
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
            return bind_private(path).map_err(|e| ServeError::Bind(path.to_path_buf(), e));
        }
        Err(e) => return Err(ServeError::Bind(path.to_path_buf(), e)),
    };
    let placed = match std::fs::hard_link(&tmp, path) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            Err(ServeError::SocketInUse(path.to_path_buf()))
        }
        // A filesystem without hard links: a rename is as atomic, only not exclusive.
        Err(_) => std::fs::rename(&tmp, path).map_err(|e| ServeError::Bind(path.to_path_buf(), e)),
        Ok(()) => Ok(()),
    };
    let _ = std::fs::remove_file(&tmp);
    placed.map(|()| listener)
}

/// Binds and listens on `path` with the socket file mode 0600.
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    // SAFETY: umask only changes this process's file-creation mask; the only other thread that
    // may exist now (the image engine's worker) creates no files, so nothing else is affected.
    let old = unsafe { libc::umask(SOCKET_UMASK) };
    let res = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    res
}

/// Blocks the shutdown and status signals in this thread and every thread it spawns later, so
/// that only the signal thread receives them.
fn block_signals() -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it before use, and
    // pthread_sigmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1] {
            libc::sigaddset(&mut set, s);
        }
        let r = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        Ok(set)
    }
}

fn wait_signal(set: &libc::sigset_t) -> i32 {
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is an initialised sigset_t and `sig` a valid out-pointer.
    let r = unsafe { libc::sigwait(set, &mut sig) };
    if r == 0 {
        sig
    } else {
        0
    }
}

/// Waits until the listener has a connection or `stop` fires. Returns true for a connection.
fn wait_connection(listener: &UnixListener, stop: &EventFd) -> io::Result<bool> {
    let [connection, stopping] =
        crate::io::sys::poll_readable([listener.as_raw_fd(), stop.as_raw_fd()])?;
    Ok(connection && !stopping)
}

/// State the signal thread shares with the accept loop.
struct Control {
    stopping: AtomicBool,
    stop_event: EventFd,
    connection: Mutex<Option<ShutdownHandle>>,
}

pub fn serve(opts: &ServeOptions) -> Result<(), ServeError> {
    // Before any thread exists (the image engine starts its worker): every thread inherits the
    // mask, and only the signal thread takes these signals.
    let sigset = block_signals().map_err(ServeError::Signals)?;
    let backing = Backing::open(&opts.image, opts.read_only)?;
    let direct = if opts.direct {
        backing.open_direct(opts.read_only)
    } else {
        None
    };
    // Frontends talk to the relay (device::relay), which answers what vhost-user-backend
    // cannot (inflight tracking) and passes the rest to the daemon over this private socket.
    // Made before the sandbox, which then grants its directory only.
    let private = PrivateSocket::new().map_err(ServeError::Relay)?;
    if opts.raw {
        restrict_files(opts, &private)?;
        let engine = RawEngine::new(backing, opts.read_only, opts.logical_block_size, direct)?;
        if let Some(wb) = opts.writeback.as_ref().filter(|_| !opts.read_only) {
            // No image UUID and session to bind a file to: the pages live in memory only.
            let engine = CacheEngine::new(engine, cache_options(opts, wb, None))?;
            return run(engine, opts, "raw", sigset, private);
        }
        return run(engine, opts, "raw", sigset, private);
    }
    let io: Arc<dyn crate::io::BlockIo> = Arc::new(crate::io::FileIo::with_direct(backing, direct));
    #[cfg(feature = "testing")]
    let io = test_layers(io, opts)?;
    // Before the engine starts its threads: Landlock binds only the threads created after it
    // (see sandbox). The image and the testing layers' files are open by now.
    restrict_files(opts, &private)?;
    let eopts = crate::engine::image::EngineOptions {
        read_only: opts.read_only,
        commit_interval: opts.commit_interval,
        // The slow variants are a testing build's benchmark aid only.
        hot_path: if cfg!(feature = "testing") {
            opts.hot_path
        } else {
            crate::engine::image::HotPath::Fast
        },
        alloc_unit: opts.alloc_unit,
        restart_log: opts.restart_log.for_image(&opts.image),
        thread_start: (opts.sandbox != Mode::None)
            .then_some(sandbox::drop_thread_capabilities as fn()),
    };
    let engine = ImageEngine::open(io, eopts).map_err(|e| match e {
        ImageError::Format(f @ (FormatError::BadMagic(_) | FormatError::NoDiskFile)) => {
            ServeError::NotAnImage(opts.image.clone(), f)
        }
        other => ServeError::Image(opts.image.clone(), other),
    })?;
    // The write-back cache file of this image: beside its restart log, named as it is.
    let (uuid, session) = engine.session();
    let cache_file = opts
        .restart_log
        .for_image(&opts.image)
        .path(&uuid)
        .map(|(p, _)| p.with_extension("wbcache"));
    let binding = |session| Binding {
        uuid,
        session,
        boot_id: crate::restart_log::format::boot_id(),
        capacity: engine.info().capacity.0,
    };
    if let Some(path) = &cache_file {
        if opts.read_only {
            if path.exists() {
                log::warn!(
                    "{}: a killed daemon's write-back cache may hold writes not yet in the                      image; serve it read-write once to write them back",
                    path.display()
                );
            }
        } else {
            // Whatever this run's cache mode: a killed writeback session's pages come first.
            // The open above began a new session, so the file names the one before it.
            match cache::recover(&engine, path, binding(session.wrapping_sub(1)))? {
                Recovered::Nothing => {}
                Recovered::Applied { pages } => log::info!(
                    "write-back cache {}: {pages} page(s) a killed daemon left written back and flushed",
                    path.display()
                ),
                Recovered::Ignored(why) => log::warn!(
                    "write-back cache {}: {why}; not applied (kept as .wbcache.stale)",
                    path.display()
                ),
            }
        }
    }
    if let Some(wb) = opts.writeback.as_ref().filter(|_| !opts.read_only) {
        let file = cache_file.map(|p| (p, binding(session)));
        let engine = CacheEngine::new(engine, cache_options(opts, wb, file))?;
        return run(engine, opts, "extblk image", sigset, private);
    }
    run(engine, opts, "extblk image", sigset, private)
}

fn cache_options(
    opts: &ServeOptions,
    wb: &WritebackCache,
    file: Option<(PathBuf, Binding)>,
) -> CacheOptions {
    CacheOptions {
        size: wb.size,
        dirty_ratio: wb.dirty_ratio,
        dirty_expire: wb.dirty_expire,
        file,
        thread_start: (opts.sandbox != Mode::None)
            .then_some(sandbox::drop_thread_capabilities as fn()),
    }
}

/// The sandbox's first step (`no_new_privs` and Landlock), for what `opts` serves.
fn restrict_files(opts: &ServeOptions, private: &PrivateSocket) -> Result<(), ServeError> {
    match opts.sandbox {
        Mode::None => {
            log::warn!("--sandbox none: the daemon runs unconfined");
            return Ok(());
        }
        Mode::Log => log::warn!(
            "--sandbox log: system calls outside the allow list are logged by the kernel \
             (audit type=1326) and allowed, not denied"
        ),
        Mode::Enforce => {}
    }
    let mut socket_dirs = vec![sandbox::socket_dir(&opts.socket)];
    if let Some(c) = &opts.control {
        socket_dirs.push(sandbox::socket_dir(c));
    }
    // The error bind_socket would give later, rather than Landlock's about a path it cannot
    // open for its rule.
    if let Some(missing) = socket_dirs.iter().find(|d| !d.is_dir()) {
        return Err(ServeError::SocketDir(missing.clone()));
    }
    let notify_dir = std::env::var_os("NOTIFY_SOCKET")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .map(|p| sandbox::socket_dir(&p));
    let access = FileAccess {
        image: opts.image.clone(),
        read_only: opts.read_only,
        // A raw disk has no restart log, and a read-only image writes none. A `--restart-log
        // FILE` whose directory is missing is not created (the engine reports it as before).
        restart_log_dir: if opts.raw || opts.read_only {
            None
        } else {
            opts.restart_log
                .dir()
                .filter(|(d, may_create)| *may_create || d.is_dir())
                .map(|(d, _)| d)
        },
        socket_dirs,
        relay_dir: Some(private.dir().to_path_buf()),
        notify_dir,
    };
    match sandbox::restrict_files(&access)? {
        FilesOutcome::Full => log::info!("sandbox: landlock confines file access"),
        FilesOutcome::Partial => {
            log::info!("sandbox: landlock confines file access (with the rights this kernel knows)")
        }
        FilesOutcome::Unsupported => log::warn!(
            "sandbox: landlock ABI not supported by this kernel: file access is not confined \
             (seccomp and the dropped capabilities still are)"
        ),
    }
    Ok(())
}

/// The `testing` feature's layers under the engine, from the environment: `EXTBLK_RECORD=FILE`
/// logs every write (at submission and completion, the io_uring's included), barrier and punch
/// of the backing (see io::record); `EXTBLK_FAULT=SPEC`
/// injects I/O errors (see io::fault); a `--hot-path` other than `fast` is warned about. Not
/// compiled into a normal build, so no environment can make a production daemon do these.
#[cfg(feature = "testing")]
fn test_layers(
    mut io: Arc<dyn crate::io::BlockIo>,
    opts: &ServeOptions,
) -> Result<Arc<dyn crate::io::BlockIo>, ServeError> {
    if let Ok(path) = std::env::var("EXTBLK_RECORD") {
        log::warn!("EXTBLK_RECORD set: recording the backing's I/O to {path}");
        let rec = crate::io::record::RecordingIo::to_file(io, Path::new(&path))
            .map_err(|e| ServeError::TestLayer(opts.image.clone(), e.to_string()))?
            // The queues keep their io_uring, observed: the daemon's real I/O path is recorded.
            .with_ring();
        io = Arc::new(rec);
    }
    if opts.hot_path != crate::engine::image::HotPath::Fast {
        log::warn!(
            "benchmark-only hot path {:?}: reads and overwrites are served the slow way",
            opts.hot_path
        );
    }
    if let Ok(spec) = std::env::var("EXTBLK_FAULT") {
        let spec = crate::io::fault::FaultSpec::parse(&spec)
            .map_err(|e| ServeError::TestLayer(opts.image.clone(), e))?;
        log::warn!("EXTBLK_FAULT set: injecting {spec:?}");
        io = Arc::new(crate::io::fault::FaultIo::new(io, spec));
    }
    Ok(io)
}

fn run<E: BlockEngine>(
    engine: E,
    opts: &ServeOptions,
    format: &'static str,
    sigset: libc::sigset_t,
    private: PrivateSocket,
) -> Result<(), ServeError> {
    let info = engine.info();
    let device = BlockDevice::new(
        engine,
        DeviceOptions {
            num_queues: opts.num_queues,
            queue_size: opts.queue_size,
            logical_block_size: opts.logical_block_size,
            serial: serial_bytes(opts.serial.as_deref(), &opts.image),
        },
    )?;
    let listener = bind_socket(&opts.socket)?;
    let control_listener = match &opts.control {
        Some(path) => match bind_socket(path) {
            Ok(l) => Some(l),
            Err(e) => {
                let _ = std::fs::remove_file(&opts.socket);
                return Err(e);
            }
        },
        None => None,
    };
    // Everything the daemon sets up exists now (the image and its engine, the rings, the
    // listening sockets), and no thread it starts from here on needs more than the allow list.
    // The signal, control and vhost-user threads start after this and inherit it; seccomp
    // reaches the engine's threads, already running, through TSYNC.
    if let Err(e) = sandbox::confine(opts.sandbox) {
        let _ = std::fs::remove_file(&opts.socket);
        if let Some(path) = &opts.control {
            let _ = std::fs::remove_file(path);
        }
        return Err(e.into());
    }
    if opts.sandbox != Mode::None {
        log::info!(
            "sandbox: no capabilities, seccomp filter on every thread ({})",
            if opts.sandbox == Mode::Log {
                "logging"
            } else {
                "denying with EPERM"
            }
        );
    }
    log::info!(
        "serving {} ({} bytes, {format}, {}) on {}: {} queue(s) of {}, logical block {}",
        opts.image.display(),
        info.capacity.0,
        if info.read_only {
            "read-only"
        } else {
            "read-write"
        },
        opts.socket.display(),
        opts.num_queues,
        opts.queue_size,
        opts.logical_block_size
    );
    // The socket listens: a frontend may connect from now on (Type=notify units start the VM
    // after this).
    let status = format!(
        "READY=1\nMAINPID={}\nSTATUS=serving {} on {}",
        std::process::id(),
        opts.image.display(),
        opts.socket.display()
    );
    if let Err(e) = crate::notify::notify(&status) {
        log::warn!("cannot tell the service manager that the daemon is ready: {e}");
    }

    let control = Arc::new(Control {
        stopping: AtomicBool::new(false),
        stop_event: EventFd::new(EFD_NONBLOCK).map_err(ServeError::Signals)?,
        connection: Mutex::new(None),
    });
    spawn_signal_thread(sigset, control.clone(), device.clone()).map_err(ServeError::Signals)?;
    let control_thread = match control_listener {
        Some(l) => {
            let info = crate::control::server::DaemonInfo {
                image: opts.image.clone(),
                socket: opts.socket.clone(),
                format,
                started: std::time::Instant::now(),
            };
            let stop = control
                .stop_event
                .try_clone()
                .map_err(ServeError::Signals)?;
            Some(
                crate::control::server::spawn(l, device.clone(), info, stop)
                    .map_err(ServeError::Control)?,
            )
        }
        None => None,
    };

    let result = accept_loop(&listener, &device, &control, &private);
    let _ = std::fs::remove_file(&opts.socket);
    // The accept loop ends on the stop event or an error: the control thread ends with the
    // same event, written here too in case an error ended the loop.
    let _ = control.stop_event.write(1);
    if let Some(t) = control_thread {
        let _ = t.join();
    }
    if let Some(path) = &opts.control {
        let _ = std::fs::remove_file(path);
    }

    device.stop_accepting();
    if !device.drain(DRAIN_TIMEOUT) {
        log::error!("{} request(s) still in flight at exit", device.inflight());
    }
    if let Err(e) = device.engine().close() {
        log::error!("final flush failed: {e}");
        return Err(e.into());
    }
    log::info!(
        "exiting: {} {}",
        device.counters().snapshot(),
        device.engine().counters()
    );
    result
}

fn spawn_signal_thread<E: BlockEngine>(
    set: libc::sigset_t,
    control: Arc<Control>,
    device: BlockDevice<E>,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            match wait_signal(&set) {
                libc::SIGUSR1 => log::info!(
                    "counters: {} {}",
                    device.counters().snapshot(),
                    device.engine().counters()
                ),
                libc::SIGINT | libc::SIGTERM => {
                    log::info!(
                        "shutting down: draining {} in-flight request(s)",
                        device.inflight()
                    );
                    let _ = crate::notify::notify("STOPPING=1");
                    control.stopping.store(true, Ordering::Release);
                    device.stop_accepting();
                    device.drain(DRAIN_TIMEOUT);
                    let _ = control.stop_event.write(1);
                    if let Some(h) = control
                        .connection
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .as_ref()
                    {
                        h.shutdown();
                    }
                    return;
                }
                _ => {}
            }
        })?;
    Ok(())
}

fn accept_loop<E: BlockEngine>(
    listener: &UnixListener,
    device: &BlockDevice<E>,
    control: &Control,
    private: &PrivateSocket,
) -> Result<(), ServeError> {
    let mut vlistener = private.listener().map_err(ServeError::Relay)?;
    while !control.stopping.load(Ordering::Acquire) {
        if !wait_connection(listener, &control.stop_event).map_err(ServeError::Signals)? {
            break;
        }
        let frontend = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                log::warn!("cannot accept a frontend: {e}");
                continue;
            }
        };
        // Blocking: the relay reads whole messages.
        frontend.set_nonblocking(false).map_err(ServeError::Relay)?;
        device.connection_started();
        let backend = private.connect().map_err(ServeError::Relay)?;
        // Each connection gets a fresh vhost-user handler (fresh vrings and vring threads), the
        // way a frontend that reconnects expects; the device and its engine persist.
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::new());
        let mut daemon = VhostUserDaemon::new("extblk".into(), device.clone(), mem)
            .map_err(|e| ServeError::VhostUser(e.to_string()))?;
        let handlers = daemon.get_epoll_handlers();
        for (q, fd) in device.completion_fds() {
            if let Some(handler) = handlers.get(q) {
                handler
                    .register_listener(fd, EventSet::IN, device.completion_event_id())
                    .map_err(ServeError::Listener)?;
            }
        }
        daemon
            .start(&mut vlistener)
            .map_err(|e| ServeError::VhostUser(e.to_string()))?;
        let relay = {
            let device = device.clone();
            std::thread::Builder::new()
                .name("vhost-user-relay".into())
                .spawn(move || relay::run(frontend, backend, &device))
                .map_err(ServeError::Relay)?
        };
        log::info!("frontend connected");
        *control.connection.lock().unwrap_or_else(|e| e.into_inner()) = daemon.shutdown_handle();
        if control.stopping.load(Ordering::Acquire) {
            daemon.request_shutdown();
        }
        match daemon.wait() {
            Ok(()) => log::info!("frontend disconnected"),
            // A frontend that closes its socket (QEMU quitting, a guest reboot) is the normal end.
            Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => log::info!("frontend disconnected"),
            Err(e) => log::warn!("frontend connection ended: {e}"),
        }
        *control.connection.lock().unwrap_or_else(|e| e.into_inner()) = None;
        // The daemon's side is closed now, which ends the relay (and the frontend's socket).
        let _ = relay.join();
        // Dropping the daemon stops and joins its vring threads; requests they started finish.
        drop(daemon);
        if !device.drain(DRAIN_TIMEOUT) {
            log::error!(
                "{} request(s) of the old connection still in flight",
                device.inflight()
            );
        }
    }
    Ok(())
}
