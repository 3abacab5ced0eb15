//! Command-line interface: argument definitions (clap) and dispatch. Typed errors from the
//! library become one line on stderr and a non-zero exit status in `main`.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::serve::{self, ServeOptions};

#[derive(Debug, Parser)]
#[command(name = "extblk", version, about = "vhost-user-blk backend daemon", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// An extblk image: an ext4 filesystem holding the disk as /disk (`extblk create`).
    Extblk,
    /// The image is the disk, byte for byte (a regular file or a block device).
    Raw,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Cache {
    /// O_DIRECT: data bypasses the host page cache; every write goes to the image at once.
    None,
    /// Through the host page cache (QEMU's `cache.direct=off`).
    Host,
    /// extblk's own write-back cache with delayed allocation (`--cache-size`,
    /// `--dirty-ratio`, `--dirty-expire`); data below it with O_DIRECT.
    Writeback,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve IMAGE to one vhost-user frontend at a time on a unix socket.
    Serve(ServeArgs),
    /// Create an extblk image: an ext4 filesystem holding an empty virtual disk as /disk.
    Create(CreateArgs),
    /// Show an image's virtual size, allocation, extent tree and journal state.
    Info(InspectArgs),
    /// List the disk's data, unwritten and hole runs with their image offsets (like qemu-img map).
    Map(InspectArgs),
    /// Check an image's consistency (exit 0 clean, 1 problems found, 2 could not check).
    Check(CheckArgs),
    /// Copy a virtual disk into a new extblk image or raw file, keeping it sparse (holes,
    /// unwritten extents and 4 KiB blocks of zeroes are not written), like qemu-img convert.
    #[command(long_about = CONVERT_ABOUT)]
    Convert(ConvertArgs),
    /// Grow (or, with --shrink, shrink) the disk of an image no process holds, like qemu-img
    /// resize; the filesystem grows with it.
    #[command(long_about = RESIZE_ABOUT)]
    Resize(ResizeArgs),
    /// Compare the disks of two images, whatever their formats, like qemu-img compare (exit 0
    /// identical, 1 different, 2 error). A shorter disk reads as zeroes past its end.
    Compare(CompareArgs),
    /// Measure any vhost-user-blk socket (extblk, qemu-storage-daemon, ...) through libblkio.
    Bench(BenchArgs),
    /// Ask a running daemon (its `serve --control` socket): info, stats, flush, quiesce, resume.
    #[command(long_about = CTL_ABOUT)]
    Ctl(CtlArgs),
}

const RESIZE_ABOUT: &str = "Grow (or, with --shrink, shrink) the virtual disk of an extblk image \
that no process holds, like qemu-img resize. SIZE is absolute (20G), or relative with a sign \
(+10G, -1G).

Growing adds block groups to the filesystem (bitmaps, inode tables, descriptors, the \
sparse_super2 backups moved to the new last group), in one journal transaction: a crash leaves \
the old image or the new one, e2fsck-clean either way. The new part of the disk reads as zeroes. \
The image file grows by what the new disk and its worst-case metadata need; it stays sparse.

Shrinking needs --shrink and is refused when the cut range holds data (discard it in the guest \
first): only /disk's size changes, the filesystem keeps its size (its free blocks cost no host \
space).

A daemon serving the image grows it online instead: `extblk ctl SOCKET resize SIZE`.

Exit status 0 on success, 1 on any error (nothing changed then).";

const CTL_ABOUT: &str = "Ask a running daemon through its control socket (`serve --control \
PATH`).

info: what it serves: image, format, capacity, queues, cache mode, quiesced or running.

stats: the device's and the engine's counters, and per queue the requests completed, in flight, \
and their latency (p50, p99, max, from a log2 histogram). With --watch, one line of rates per \
interval, like iostat.

flush: make every completed write durable now (a journal commit), as a guest flush does.

quiesce: stop taking requests, wait for those in flight (at most 30 s) and flush. Until resume, \
the image file is consistent and can be copied (`cp --sparse=always`); the guest's requests \
wait, they do not fail.

resume: take requests again.

resize SIZE (or +SIZE): grow the disk while the guest runs. The daemon quiesces, grows the image \
in one journal transaction, advertises the new capacity and resumes; a frontend that gave it a \
backend channel (QEMU does) is told at once (CONFIG_CHANGE_MSG) and the guest sees the new size \
(/sys/block/vda/size); any other frontend sees it when it next reads the config space or \
reconnects. A served disk only grows: shrink it offline (`extblk resize --shrink`).

Exit status 0 on success, 1 if the daemon refused or failed the request or cannot be reached.";

#[derive(Debug, clap::Args)]
pub struct CtlArgs {
    /// Output format (the daemon's JSON result as it sent it, or text).
    #[arg(long, value_enum, default_value_t = Output::Human, global = true)]
    pub output: Output,

    /// The daemon's control socket (`serve --control PATH`).
    pub socket: PathBuf,

    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// What the daemon serves and how.
    Info,
    /// Counters, and per queue the requests completed and their latency.
    Stats {
        /// Print one line of rates per interval until interrupted (a small `top`).
        #[arg(long)]
        watch: bool,
        /// Seconds between --watch lines.
        #[arg(long, default_value_t = 1.0, value_parser = parse_interval)]
        interval: f64,
        /// Stop --watch after N lines.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
    /// Make every completed write durable now.
    Flush,
    /// Stop taking requests, drain, flush: the image is consistent until `resume`.
    Quiesce,
    /// Take requests again after `quiesce`.
    Resume,
    /// Grow the disk while the guest runs: SIZE, or +SIZE more.
    Resize {
        #[arg(value_parser = parse_new_size)]
        size: crate::resize::NewSize,
    },
}

const CONVERT_ABOUT: &str = "Copy a virtual disk into a new extblk image or raw file, keeping it \
sparse, like qemu-img convert.

The source is a raw file or block device, an extblk image, or a qcow2 image (read through \
qemu-img, which must be installed: it is first copied to a sparse temporary file beside DST). \
Without -f the format is detected: qcow2 by its magic, an extblk image by its ext4 superblock and \
/disk, anything else is raw. Holes, unwritten extents and 4 KiB blocks of zeroes are not \
written: the destination allocates only the data. An extblk destination is created as `extblk \
create` creates it and written through the image engine, journal and all, then closed cleanly. \
A raw destination is a sparse regular file.

DST must not exist: unlike qemu-img, convert does not overwrite unless --force, and even then an \
image that a daemon (or any tool) holds is refused, since it is locked.";

/// A disk format convert and compare read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SourceFormatArg {
    Raw,
    Extblk,
    /// Read through qemu-img (copied to a sparse temporary raw file first).
    Qcow2,
}

impl From<SourceFormatArg> for crate::disk_source::SourceFormat {
    fn from(f: SourceFormatArg) -> Self {
        use crate::disk_source::SourceFormat as S;
        match f {
            SourceFormatArg::Raw => S::Raw,
            SourceFormatArg::Extblk => S::Extblk,
            SourceFormatArg::Qcow2 => S::Qcow2,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    /// Format of SRC (default: detected).
    #[arg(short = 'f', long = "format", value_enum, value_name = "FMT")]
    pub source_format: Option<SourceFormatArg>,

    /// Format of DST: an extblk image (a file, or a block device with --force), or raw (a
    /// sparse regular file; a block device is refused).
    #[arg(short = 'O', long = "output-format", value_enum, value_name = "FMT", default_value_t = Format::Extblk)]
    pub dest_format: Format,

    /// Journal size of a new extblk image (as `create --journal-size`).
    #[arg(long, value_parser = parse_size_arg)]
    pub journal_size: Option<u64>,

    /// Overwrite an existing DST (an extblk image or raw file; never one another process holds).
    #[arg(long)]
    pub force: bool,

    /// Report format: the summary as text or JSON (the progress bar is drawn on stderr, and
    /// only when it is a terminal).
    #[arg(long, value_enum, default_value_t = Output::Human)]
    pub output: Output,

    /// Source image.
    pub src: PathBuf,

    /// Destination, created.
    pub dst: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct ResizeArgs {
    /// Allow a smaller size (refused anyway if the cut range holds data).
    #[arg(long)]
    pub shrink: bool,

    /// Where a killed daemon left its restart log (applied before the resize, as `serve`
    /// would); `none` to leave it. Default: as `serve`.
    #[arg(long, value_name = "PATH|none")]
    pub restart_log: Option<PathBuf>,

    /// Report format.
    #[arg(long, value_enum, default_value_t = Output::Human)]
    pub output: Output,

    /// The image.
    pub image: PathBuf,

    /// New size: 20G, or +10G / -1G relative to the current one.
    #[arg(value_parser = parse_new_size, allow_hyphen_values = true)]
    pub size: crate::resize::NewSize,
}

/// `[+|-]SIZE`.
fn parse_new_size(s: &str) -> Result<crate::resize::NewSize, String> {
    crate::resize::NewSize::parse(s)
}

#[derive(Debug, clap::Args)]
pub struct CompareArgs {
    /// Format of the first image (default: detected).
    #[arg(short = 'f', long = "format", value_enum, value_name = "FMT")]
    pub format_a: Option<SourceFormatArg>,

    /// Format of the second image (default: detected).
    #[arg(short = 'F', long = "second-format", value_enum, value_name = "FMT")]
    pub format_b: Option<SourceFormatArg>,

    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Human)]
    pub output: Output,

    pub a: PathBuf,
    pub b: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// vhost-user-blk socket to measure.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,

    /// Access pattern.
    #[arg(long, value_enum, default_value_t = crate::bench::Pattern::Randwrite)]
    pub pattern: crate::bench::Pattern,

    /// Request size.
    #[arg(long, default_value = "4K", value_parser = parse_size_arg)]
    pub bs: u64,

    /// Requests in flight per queue.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub iodepth: u16,

    /// Queues (one thread each).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub queues: u16,

    /// Seconds to run.
    #[arg(long, default_value_t = 10.0, value_parser = parse_interval)]
    pub runtime: f64,

    /// Use only the first SIZE bytes of the disk.
    #[arg(long, value_parser = parse_size_arg)]
    pub size: Option<u64>,

    /// Stop each queue once it has covered its share of the disk (write, read and
    /// randwrite-alloc; --runtime still bounds the run): a fill, or a read of everything.
    #[arg(long)]
    pub once: bool,

    /// Load an extra queue with allocating writes and discards beyond --size while measuring
    /// (the seed experiment's background metadata work; not counted).
    #[arg(long)]
    pub background: bool,

    /// Stop after N requests in all (--runtime still bounds the run).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub ios: Option<u64>,

    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Human)]
    pub output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Human,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Human)]
    pub output: Output,

    /// The image (opened read-only; a journal with committed transactions is read as replayed).
    pub image: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Human)]
    pub output: Output,

    /// First replay the journal into place, rebuild wrong block bitmaps, apply the restart
    /// log a killed daemon left (as `serve` would at its start; then it is removed) and close
    /// the image cleanly (exact free counts).
    #[arg(long)]
    pub repair: bool,

    /// The image's restart log, as `serve --restart-log` (the same default path). `check`
    /// reports the changes in it the journal lacks, without applying them; `check --repair`
    /// applies them. `none`: not looked at (a repair then leaves the log where it is, stale
    /// from then on: the next `serve` ignores it).
    #[arg(long, value_name = "PATH|none")]
    pub restart_log: Option<PathBuf>,

    /// The image.
    pub image: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Virtual disk size (bytes, or with a K/M/G/T suffix); at most 16T minus 4K.
    #[arg(long, value_parser = parse_size_arg)]
    pub size: u64,

    /// Journal size (default: 1/64 of the disk, between 4M and 384M; at most 384M).
    #[arg(long, value_parser = parse_size_arg)]
    pub journal_size: Option<u64>,

    /// Overwrite an existing file or format a block device.
    #[arg(long)]
    pub force: bool,

    /// Benchmark aid (the seed's experiment): map the first SIZE of the disk block by block,
    /// no two neighbouring blocks physically adjacent — a worst-case fragmented image, reading
    /// as zeroes. Image files only.
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg, hide = true)]
    pub scatter: Option<u64>,

    /// New image file (created sparse), or a block device with --force.
    pub image: PathBuf,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    crate::units::parse_size(s).map(|b| b.0)
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Path of the vhost-user unix socket to create (mode 0600). Its directory must exist.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,

    /// Format of IMAGE. Never guessed: a raw disk is only served with `--format raw`, so a
    /// guest's own ext4 filesystem on a raw disk is never mistaken for an image.
    #[arg(long, value_enum, default_value_t = Format::Extblk)]
    pub format: Format,

    /// Caching of data I/O: `none` opens the backing with O_DIRECT for aligned data I/O
    /// (unaligned requests still go through the page cache); `host` uses the host page cache
    /// (QEMU's cache.direct=off); `writeback` keeps guest writes in extblk's own cache and
    /// writes them back later in large sorted runs, allocating each run at writeback (delayed
    /// allocation). Guests are told the disk has a volatile write cache in every mode and send
    /// FLUSH. With `writeback`, unflushed writes survive a killed daemon when the image has a
    /// restart log (the pages live in a file beside it, under /run, written back by the next
    /// `serve`); with `--restart-log none` or `--format raw` they are lost with the process.
    #[arg(long, value_enum, default_value_t = Cache::None)]
    pub cache: Cache,

    /// Memory of `--cache writeback` (4 KiB pages).
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_cache_size)]
    pub cache_size: u64,

    /// Percentage of the write-back cache that may be dirty before writers wait for writeback
    /// (as Linux's vm.dirty_ratio); background writeback starts at half of it.
    #[arg(long, value_name = "PERCENT", default_value_t = 50, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub dirty_ratio: u8,

    /// Milliseconds after which a dirty page of the write-back cache is written back even
    /// without pressure or a FLUSH.
    #[arg(long, value_name = "MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub dirty_expire: u64,

    /// Seconds between journal commits when no FLUSH forces one (extblk images).
    #[arg(long, default_value_t = 5.0, value_parser = parse_interval)]
    pub commit_interval: f64,

    /// Offer a read-only disk (VIRTIO_BLK_F_RO); every write is refused with IOERR.
    #[arg(long)]
    pub readonly: bool,

    /// Allocation unit of extblk images (a power of two from 4K to 1M): a write into
    /// unallocated space allocates the whole aligned unit around it and fills the rest with
    /// zeroes in the same host write, so later writes there are plain overwrites (as qcow2's
    /// clusters). Larger units make random first writes faster and a sparse disk use more space;
    /// 4K allocates exactly what is written.
    #[arg(long, value_name = "SIZE", default_value = "64K", value_parser = parse_alloc_unit)]
    pub alloc_unit: u64,

    /// Where an extblk image keeps the changes acknowledged but not yet committed, so that a
    /// daemon killed and restarted on a running host loses no completed write, write-zeroes or
    /// discard (applied at the next start or by `check --repair`, then emptied). Default: /run/extblk/<UUID>-<dev>-<inode>.log as
    /// root, else $XDG_RUNTIME_DIR/extblk/<UUID>-<dev>-<inode>.log (a tmpfs: gone after a reboot, when the
    /// journal alone decides, as for any write-back cache). `none` switches it off.
    #[arg(long, value_name = "PATH|none")]
    pub restart_log: Option<PathBuf>,

    /// Also listen on a control socket at PATH (mode 0600) for `extblk ctl PATH ...`: info,
    /// stats, flush, quiesce, resume. Its directory must exist.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Number of virtqueues, each served by its own thread.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub queues: u16,

    /// Largest virtqueue size a frontend may choose (a power of two).
    #[arg(long, default_value_t = 256, value_parser = parse_queue_size)]
    pub queue_size: u16,

    /// Logical block size the guest sees; requests must be aligned to it.
    #[arg(long, default_value_t = 512, value_parser = parse_block_size)]
    pub logical_block_size: u32,

    /// Serial number returned to GET_ID (at most 20 bytes; default: the image's file name).
    #[arg(long, value_name = "ID", value_parser = parse_serial)]
    pub serial: Option<String>,

    /// Confinement of the running daemon.
    ///
    /// `enforce` (the default): once the image is open and the sockets listen, the daemon keeps
    /// no capability, cannot gain privileges (no_new_privs), reaches through the filesystem
    /// only its image, its restart log's directory and its sockets' directories (Landlock,
    /// where the kernel has it; a warning otherwise), and may make only the system calls it
    /// needs (seccomp, on every thread): any other fails with EPERM, which the daemon reports
    /// as the error of the operation that needed it rather than dying with the guest's disk.
    ///
    /// `log`: the same, except that a system call outside the list is allowed and logged by the
    /// kernel (an audit record `type=1326 ... pid=PID ... syscall=NR` in `dmesg`): run a
    /// workload under it to find a call the list lacks.
    ///
    /// `none`: no confinement at all. The io_uring rings are restricted to reads and writes
    /// whatever this says. See docs/operations.md, "Confinement".
    #[arg(long, value_enum, default_value_t = SandboxArg::Enforce, value_name = "MODE")]
    pub sandbox: SandboxArg,

    /// Benchmark only (the seed's experiment): serve reads and overwrites the `fast` way, or
    /// complete them through the completion worker, or look every mapping up under the lock.
    /// Only in builds with the `testing` feature: a shipped daemon always serves the fast way.
    #[cfg(feature = "testing")]
    #[arg(long, value_enum, default_value_t = HotPathArg::Fast, hide = true)]
    pub hot_path: HotPathArg,

    /// Regular file or block device holding the disk.
    pub image: PathBuf,
}

use crate::engine::image::{HotPath, RestartLogAt};

/// `serve --sandbox`, mapped onto [`crate::sandbox::Mode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SandboxArg {
    /// Landlock, no capabilities, seccomp denying every other call with EPERM.
    Enforce,
    /// As enforce, but seccomp logs other calls and lets them through.
    Log,
    /// Unconfined.
    #[value(name = "none")]
    Off,
}

impl From<SandboxArg> for crate::sandbox::Mode {
    fn from(a: SandboxArg) -> crate::sandbox::Mode {
        match a {
            SandboxArg::Enforce => crate::sandbox::Mode::Enforce,
            SandboxArg::Log => crate::sandbox::Mode::Log,
            SandboxArg::Off => crate::sandbox::Mode::None,
        }
    }
}

/// `--hot-path` as clap parses it, mapped onto the engine's [`HotPath`] (the engine knows
/// nothing of the command line).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum HotPathArg {
    /// Mapping from the queue's seq-validated cache; completion on the queue thread.
    Fast,
    /// As `Fast`, but every completion goes through the completion worker.
    WorkerCompletion,
    /// As `Fast`, but every lookup takes the mapping lock instead of using the cache.
    LockedLookup,
}

impl From<HotPathArg> for HotPath {
    fn from(a: HotPathArg) -> HotPath {
        match a {
            HotPathArg::Fast => HotPath::Fast,
            HotPathArg::WorkerCompletion => HotPath::WorkerCompletion,
            HotPathArg::LockedLookup => HotPath::LockedLookup,
        }
    }
}

fn scatter(path: &std::path::Path, bytes: u64) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::metadata(path)?.file_type().is_block_device() {
        anyhow::bail!("--scatter needs an image file (a device may hold old data)");
    }
    if bytes == 0 || bytes % 4096 != 0 {
        anyhow::bail!("--scatter must be a positive multiple of 4K");
    }
    let io: std::sync::Arc<dyn crate::io::BlockIo> =
        std::sync::Arc::new(crate::io::FileIo::open(path, false)?);
    let mut img = crate::image::Image::open(io, crate::image::OpenOptions { read_only: false })?;
    img.map_scattered(bytes / 4096)?;
    img.close()?;
    Ok(())
}

/// `--restart-log PATH|none` (serve and check): absent, the default path.
fn restart_log_at(arg: Option<PathBuf>) -> RestartLogAt {
    match arg {
        Some(p) if p.as_os_str() == "none" => RestartLogAt::Off,
        Some(p) => RestartLogAt::File(p),
        None => serve::default_restart_log(),
    }
}

fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 3600.0 => Ok(v),
        _ => Err("commit interval must be a number of seconds between 0 and 3600".into()),
    }
}

/// An allocation unit in blocks, from a size.
fn parse_alloc_unit(s: &str) -> Result<u64, String> {
    let b = crate::units::parse_size(s)?.0;
    let max = crate::engine::image::MAX_ALLOC_UNIT * 4096;
    if b < 4096 || b > max || !b.is_power_of_two() {
        return Err(format!(
            "allocation unit must be a power of two from 4K to {}K",
            max / 1024
        ));
    }
    Ok(b / 4096)
}

fn parse_cache_size(s: &str) -> Result<u64, String> {
    let b = crate::units::parse_size(s)?.0;
    if !(1 << 20..=1 << 40).contains(&b) || b % 4096 != 0 {
        return Err("cache size must be a multiple of 4K from 1M to 1T".into());
    }
    Ok(b)
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u16 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(2..=32768).contains(&n) || !n.is_power_of_two() {
        return Err("queue size must be a power of two between 2 and 32768".into());
    }
    Ok(n)
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err("logical block size must be 512 or 4096".into()),
    }
}

fn parse_serial(s: &str) -> Result<String, String> {
    if s.len() > 20 {
        return Err("serial must be at most 20 bytes".into());
    }
    Ok(s.to_string())
}

/// Report tools end quietly when their reader goes away (`extblk map img | head`), as the
/// classic Unix tools do, instead of failing on EPIPE. The daemon keeps Rust's SIG_IGN.
fn quiet_on_broken_pipe() {
    // SAFETY: restoring the default disposition of SIGPIPE is async-signal-safe and happens
    // before this short-lived command starts any thread.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Tools that run the engine (convert) or open images (compare) print only its warnings: its
/// informational lines are for a daemon's log. `RUST_LOG` still decides when set.
fn quiet_tool_logs() {
    if std::env::var_os("RUST_LOG").is_none() {
        log::set_max_level(log::LevelFilter::Warn);
    }
}

/// Runs a parsed command line; returns the process exit status.
/// An error and its causes, as one line: `outer: cause: cause`, leaving out a cause whose text
/// the message before it already shows (our error types print their source in their own
/// message; `{:#}` would print it twice).
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    let mut prev = out.clone();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !prev.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
        prev = c;
    }
    out
}

pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Serve(a) => {
            #[cfg(feature = "testing")]
            let hot_path = HotPath::from(a.hot_path);
            #[cfg(not(feature = "testing"))]
            let hot_path = HotPath::Fast;
            serve::serve(&ServeOptions {
                raw: a.format == Format::Raw,
                direct: a.cache != Cache::Host,
                writeback: (a.cache == Cache::Writeback).then(|| crate::serve::WritebackCache {
                    size: a.cache_size,
                    dirty_ratio: a.dirty_ratio,
                    dirty_expire: std::time::Duration::from_millis(a.dirty_expire),
                }),
                commit_interval: std::time::Duration::from_secs_f64(a.commit_interval),
                hot_path,
                alloc_unit: a.alloc_unit,
                restart_log: restart_log_at(a.restart_log),
                socket: a.socket,
                control: a.control,
                image: a.image,
                read_only: a.readonly,
                num_queues: a.queues,
                queue_size: a.queue_size,
                logical_block_size: a.logical_block_size,
                serial: a.serial,
                sandbox: a.sandbox.into(),
            })?;
            Ok(0)
        }
        Command::Create(a) => {
            if let Some(j) = a.journal_size {
                if j % 4096 != 0 {
                    anyhow::bail!("--journal-size must be a multiple of 4K");
                }
            }
            let layout = crate::image::create::create_path(
                &a.image,
                a.size,
                a.journal_size.map(|j| j / 4096),
                a.force,
            )?;
            if let Some(n) = a.scatter {
                scatter(&a.image, n)?;
            }
            println!(
                "created {}: {} byte disk, {} byte filesystem ({} groups, {} MiB journal), data from block {}",
                a.image.display(),
                layout.disk_size,
                layout.blocks_count * 4096,
                layout.groups,
                (layout.journal_blocks * 4096) >> 20,
                layout.data_start
            );
            Ok(0)
        }
        Command::Info(a) => {
            quiet_on_broken_pipe();
            crate::tools::info(&a.image, a.output == Output::Json)
        }
        Command::Map(a) => {
            quiet_on_broken_pipe();
            crate::tools::map(&a.image, a.output == Output::Json)
        }
        Command::Bench(a) => {
            quiet_on_broken_pipe();
            let r = crate::bench::run(&crate::bench::BenchOptions {
                socket: a.socket.display().to_string(),
                pattern: a.pattern,
                bs: a.bs,
                iodepth: usize::from(a.iodepth),
                queues: usize::from(a.queues),
                runtime: std::time::Duration::from_secs_f64(a.runtime),
                size: a.size,
                progress: a.output == Output::Human,
                once: a.once,
                background: a.background,
                ios: a.ios,
            })?;
            if a.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "{:?} bs={} iodepth={} queues={}: {:.0} IOPS, {:.1} MB/s, latency mean {:.0} us, p50 {:.0} us, p99 {:.0} us, p99.9 {:.0} us",
                    r.pattern, r.bs, r.iodepth, r.queues, r.iops, r.mb_per_s, r.lat_mean_us, r.lat_p50_us, r.lat_p99_us, r.lat_p999_us
                );
            }
            Ok(0)
        }
        Command::Convert(a) => {
            quiet_tool_logs();
            if let Some(j) = a.journal_size {
                if j % 4096 != 0 {
                    anyhow::bail!("--journal-size must be a multiple of 4K");
                }
            }
            let opts = crate::convert::ConvertOptions {
                source_format: a.source_format.map(Into::into),
                dest_format: match a.dest_format {
                    Format::Raw => crate::convert::DestFormat::Raw,
                    Format::Extblk => crate::convert::DestFormat::Extblk,
                },
                force: a.force,
                journal_blocks: a.journal_size.map(|j| j / 4096),
            };
            crate::tools::convert(&a.src, &a.dst, &opts, a.output == Output::Json)
        }
        Command::Resize(a) => {
            quiet_tool_logs();
            crate::resize::resize(
                &a.image,
                a.size,
                a.shrink,
                a.output == Output::Json,
                &restart_log_at(a.restart_log),
            )
        }
        Command::Compare(a) => {
            quiet_on_broken_pipe();
            quiet_tool_logs();
            Ok(crate::tools::compare(
                (&a.a, a.format_a.map(Into::into)),
                (&a.b, a.format_b.map(Into::into)),
                a.output == Output::Json,
            ))
        }
        Command::Ctl(a) => {
            quiet_on_broken_pipe();
            crate::tools::ctl(&a)
        }
        Command::Check(a) => {
            quiet_on_broken_pipe();
            crate::tools::check(
                &a.image,
                a.output == Output::Json,
                a.repair,
                &restart_log_at(a.restart_log),
            )
        }
    }
}
