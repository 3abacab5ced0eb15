//! The real `extblk serve` binary driven by a real vhost-user client: libblkio's
//! `virtio-blk-vhost-user` driver. No VM, no mocks.

mod common;
use common::{e2fsck_clean, Scratch};

use extblk::rng::Rng;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::mem::MaybeUninit;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

const EIO: i32 = -libc::EIO;

fn make_image(path: &Path, size: u64) {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
}

/// A running daemon, killed on drop if the test did not stop it. Its log goes to a file that is
/// printed if the test fails.
struct Daemon {
    child: Child,
    log: PathBuf,
}

static LOG_SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Spawns `cmd` with its stderr in a fresh log file.
fn spawn_logged(mut cmd: Command) -> Daemon {
    let n = LOG_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log = std::env::temp_dir().join(format!("extblk-daemon-{}-{n}.log", std::process::id()));
    let f = File::create(&log).unwrap();
    let child = cmd.stdout(Stdio::null()).stderr(f).spawn().unwrap();
    Daemon { child, log }
}

impl Daemon {
    fn read_log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_socket(&self, socket: &Path) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "daemon did not create its socket: {}",
                self.read_log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn extblk() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_extblk"));
    c.env("RUST_LOG", "debug");
    c
}

impl Daemon {
    fn start(image: &Path, socket: &Path, extra: &[&str]) -> Daemon {
        let mut args = vec!["--format=raw"];
        args.extend_from_slice(extra);
        Daemon::start_with(image, socket, &args)
    }

    /// Serves an extblk image (the default format).
    fn start_image(image: &Path, socket: &Path, extra: &[&str]) -> Daemon {
        Daemon::start_with(image, socket, extra)
    }

    fn start_with(image: &Path, socket: &Path, extra: &[&str]) -> Daemon {
        Daemon::start_env(image, socket, extra, &[])
    }

    /// Serves an extblk image with `env` added to the daemon's environment.
    fn start_env(image: &Path, socket: &Path, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        let _ = fs::remove_file(socket);
        let mut cmd = extblk();
        cmd.envs(env.iter().copied());
        cmd.arg("serve").arg("--socket").arg(socket).args(extra);
        if !extra.contains(&"--restart-log") {
            // Beside the image, in the test's scratch directory, rather than in /run/extblk
            // (a SIGKILLed test daemon leaves its log behind).
            let mut log = image.as_os_str().to_owned();
            log.push(".restart-log");
            cmd.arg("--restart-log").arg(log);
        }
        cmd.arg(image);
        let d = spawn_logged(cmd);
        d.wait_socket(socket);
        d
    }

    /// SIGTERM, then the exit status and everything the daemon logged.
    fn stop(mut self) -> (std::process::ExitStatus, String) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        (status, self.read_log())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- daemon log ----\n{}", self.read_log());
        }
        let _ = fs::remove_file(&self.log);
    }
}

/// A connected libblkio client with one shared buffer region.
struct Client {
    blkio: Blkio,
    queues: Vec<Blkioq>,
    region: MemoryRegion,
}

const REGION: usize = 4 << 20;

impl Client {
    fn try_connect(socket: &Path, queues: i32, read_only: bool) -> blkio::Result<Client> {
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", socket.to_str().unwrap())?;
        b.set_bool("read-only", read_only)?;
        b.connect()?;
        b.set_i32("num-queues", queues)?;
        let out = b.start()?;
        let region = b.alloc_mem_region(REGION)?;
        b.map_mem_region(&region)?;
        Ok(Client {
            blkio: b,
            queues: out.queues,
            region,
        })
    }

    fn connect(socket: &Path, queues: i32) -> Client {
        Client::try_connect(socket, queues, false).expect("connect")
    }

    fn buf(&mut self, off: usize, len: usize) -> &mut [u8] {
        assert!(off + len <= REGION);
        // SAFETY: the region is a live mapping of REGION bytes owned by this client; the
        // returned slice borrows self mutably, so no request is being built meanwhile.
        unsafe { std::slice::from_raw_parts_mut((self.region.addr + off) as *mut u8, len) }
    }

    fn wait(q: &mut Blkioq) -> i32 {
        let mut c = [MaybeUninit::<Completion>::uninit()];
        let n = q.do_io(&mut c, 1, None, None).unwrap();
        assert_eq!(n, 1);
        // SAFETY: do_io initialised the first n completions.
        unsafe { c[0].assume_init_read() }.ret
    }

    fn write(&mut self, q: usize, offset: u64, data: &[u8]) -> i32 {
        self.buf(0, data.len()).copy_from_slice(data);
        let addr = self.region.addr as *const u8;
        let queue = &mut self.queues[q];
        queue.write(offset, addr, data.len(), 0, ReqFlags::empty());
        Client::wait(queue)
    }

    fn read(&mut self, q: usize, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
        let addr = self.region.addr as *mut u8;
        let queue = &mut self.queues[q];
        queue.read(offset, addr, len, 0, ReqFlags::empty());
        match Client::wait(queue) {
            0 => Ok(self.buf(0, len).to_vec()),
            e => Err(e),
        }
    }

    fn flush(&mut self, q: usize) -> i32 {
        let queue = &mut self.queues[q];
        queue.flush(0, ReqFlags::empty());
        Client::wait(queue)
    }

    fn discard(&mut self, q: usize, offset: u64, len: u64) -> i32 {
        let queue = &mut self.queues[q];
        queue.discard(offset, len, 0, ReqFlags::empty());
        Client::wait(queue)
    }

    fn write_zeroes(&mut self, q: usize, offset: u64, len: u64, unmap: bool) -> i32 {
        let flags = if unmap {
            ReqFlags::empty()
        } else {
            ReqFlags::NO_UNMAP
        };
        let queue = &mut self.queues[q];
        queue.write_zeroes(offset, len, 0, flags);
        Client::wait(queue)
    }

    fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").unwrap()
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng::new(seed | 1);
    (0..len).map(|_| r.next() as u8).collect()
}

#[test]
fn random_io_matches_a_model_and_the_file() {
    let s = Scratch::new("model");
    let (img, sock) = (s.path("disk.raw"), s.path("sock"));
    const SIZE: u64 = 16 << 20;
    make_image(&img, SIZE);
    let d = Daemon::start(&img, &sock, &[]);
    let mut c = Client::connect(&sock, 1);
    assert_eq!(c.capacity(), SIZE);

    let mut model = vec![0u8; SIZE as usize];
    let seed = 0x5eed_1234u64;
    let mut rng = Rng::new(seed);
    for i in 0..600 {
        let sectors = 1 + rng.below(256);
        let off = rng.below(SIZE / 512 - sectors) * 512;
        let len = sectors * 512;
        let range = off as usize..(off + len) as usize;
        match rng.below(10) {
            0..=3 => {
                let data = pattern(rng.next(), len as usize);
                assert_eq!(c.write(0, off, &data), 0, "seed {seed:#x} op {i}: write");
                model[range].copy_from_slice(&data);
            }
            4..=6 => {
                let got = c.read(0, off, len as usize).expect("read");
                assert!(
                    got == model[range],
                    "seed {seed:#x} op {i}: read {off}+{len} differs from the model"
                );
            }
            7 => assert_eq!(c.flush(0), 0),
            8 => {
                // Discarded ranges of a file read back as zeroes (holes).
                assert_eq!(c.discard(0, off, len), 0);
                model[range].fill(0);
            }
            _ => {
                let unmap = rng.below(2) == 0;
                assert_eq!(c.write_zeroes(0, off, len, unmap), 0);
                model[range].fill(0);
            }
        }
    }
    assert_eq!(c.flush(0), 0);
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "daemon failed: {log}");
    let on_disk = fs::read(&img).unwrap();
    assert!(on_disk == model, "image file differs from the model");
    assert!(
        log.contains("writes="),
        "exit counters missing from the log: {log}"
    );
}

#[test]
fn queues_run_in_parallel_and_keep_their_data() {
    let s = Scratch::new("mq");
    let (img, sock) = (s.path("disk.raw"), s.path("sock"));
    const SIZE: u64 = 32 << 20;
    make_image(&img, SIZE);
    let d = Daemon::start(&img, &sock, &["--queues", "4"]);
    let mut c = Client::connect(&sock, 4);
    let region = c.region.addr;
    let chunk = 64 * 1024usize;
    let per_queue = SIZE as usize / 4;
    // Each queue keeps 8 writes in flight at once over its own quarter of the disk.
    let mut queues = std::mem::take(&mut c.queues);
    std::thread::scope(|sc| {
        for (qi, q) in queues.iter_mut().enumerate() {
            sc.spawn(move || {
                let slot = REGION / 4;
                let base = region + qi * slot;
                let data = pattern(qi as u64 + 7, chunk);
                for k in 0..8 {
                    // SAFETY: each queue thread uses its own quarter of the region.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            data.as_ptr(),
                            (base + k * chunk / 2) as *mut u8,
                            chunk / 2,
                        )
                    };
                }
                let mut off = 0;
                while off < per_queue {
                    for k in 0..8 {
                        let o = (qi * per_queue + off + k * chunk / 2) as u64;
                        q.write(
                            o,
                            (base + k * chunk / 2) as *const u8,
                            chunk / 2,
                            k,
                            ReqFlags::empty(),
                        );
                    }
                    let mut comps = [const { MaybeUninit::<Completion>::uninit() }; 8];
                    let mut done = 0;
                    while done < 8 {
                        let n = q.do_io(&mut comps[done..], 8 - done, None, None).unwrap();
                        for comp in &comps[done..done + n] {
                            // SAFETY: do_io initialised these n entries.
                            assert_eq!(unsafe { comp.assume_init_read() }.ret, 0);
                        }
                        done += n;
                    }
                    off += 8 * chunk / 2;
                }
            });
        }
    });
    c.queues = queues;
    for qi in 0..4 {
        let expect = pattern(qi as u64 + 7, chunk)[..chunk / 2].to_vec();
        for probe in [0, per_queue / 2, per_queue - chunk / 2] {
            let got = c
                .read(qi, (qi * per_queue + probe) as u64, chunk / 2)
                .unwrap();
            assert!(got == expect, "queue {qi} data at {probe} is wrong");
        }
    }
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn a_second_client_sees_the_first_clients_data() {
    let s = Scratch::new("reconnect");
    let (img, sock) = (s.path("disk.raw"), s.path("sock"));
    make_image(&img, 4 << 20);
    let d = Daemon::start(&img, &sock, &["--queues", "2"]);
    let data = pattern(99, 8192);
    {
        let mut c = Client::connect(&sock, 2);
        assert_eq!(c.write(1, 4096, &data), 0);
        assert_eq!(c.flush(1), 0);
    }
    for _ in 0..2 {
        let mut c = Client::connect(&sock, 1);
        assert_eq!(c.read(0, 4096, 8192).unwrap(), data);
    }
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(log.matches("frontend connected").count() >= 3, "{log}");
    assert!(
        !log.contains("WARN"),
        "a normal disconnect is not a warning: {log}"
    );
}

#[test]
fn out_of_range_and_misaligned_requests_fail_and_the_daemon_keeps_serving() {
    let s = Scratch::new("range");
    let (img, sock) = (s.path("disk.raw"), s.path("sock"));
    const SIZE: u64 = 1 << 20;
    make_image(&img, SIZE);
    let d = Daemon::start(&img, &sock, &["--logical-block-size", "4096"]);
    let mut c = Client::connect(&sock, 1);
    assert_eq!(
        c.read(0, SIZE - 4096, 8192).err(),
        Some(EIO),
        "read past the end"
    );
    assert_eq!(c.write(0, SIZE, &[1u8; 4096]), EIO, "write at the end");
    assert_eq!(c.discard(0, SIZE - 4096, 8192), EIO, "discard past the end");
    // 512-byte aligned but not 4096-aligned: refused with a 4 KiB logical block size.
    assert_eq!(c.write(0, 512, &[1u8; 4096]), EIO, "misaligned write");
    assert_eq!(c.write(0, 4096, &[2u8; 4096]), 0);
    assert_eq!(c.read(0, 4096, 4096).unwrap(), vec![2u8; 4096]);
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("errors=4"),
        "expected four refused requests: {log}"
    );
}

#[test]
fn read_only_is_advertised_and_enforced() {
    let s = Scratch::new("ro");
    let (img, sock) = (s.path("disk.raw"), s.path("sock"));
    let content = pattern(5, 1 << 20);
    fs::write(&img, &content).unwrap();
    let d = Daemon::start(&img, &sock, &["--readonly"]);
    // A writable client is refused: the device offers VIRTIO_BLK_F_RO.
    let err = Client::try_connect(&sock, 1, false)
        .err()
        .expect("RO not advertised");
    assert_eq!(err.errno(), blkio::Errno::ROFS, "{}", err.message());
    let mut c = Client::try_connect(&sock, 1, true).unwrap();
    let first = c.read(0, 8192, 4096);
    if first.as_deref() != Ok(&content[8192..12288]) {
        drop(c);
        let (_, log) = d.stop();
        panic!("first read: {:?}\n{log}", first.err());
    }
    assert_ne!(c.write(0, 0, &[0u8; 512]), 0);
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert_eq!(
        fs::read(&img).unwrap(),
        content,
        "a read-only image changed"
    );
}

#[test]
fn a_second_daemon_on_the_same_image_is_refused() {
    let s = Scratch::new("lock");
    let img = s.path("disk.raw");
    make_image(&img, 1 << 20);
    let d = Daemon::start(&img, &s.path("sock1"), &[]);
    let out = extblk()
        .args(["serve", "--format", "raw", "--socket"])
        .arg(s.path("sock2"))
        .arg(&img)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already in use"), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.starts_with("extblk:")).count(),
        1,
        "{err}"
    );
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn bad_command_lines_get_one_clear_line() {
    let s = Scratch::new("cli");
    let img = s.path("disk.raw");
    make_image(&img, 1 << 20);
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--socket".into(),
                s.path("nodir/sock").display().to_string(),
                img.display().to_string(),
            ],
            "does not exist",
        ),
        (
            vec![
                "--socket".into(),
                s.path("sock").display().to_string(),
                s.path("missing.raw").display().to_string(),
            ],
            "no such file",
        ),
        (
            vec![
                "--socket".into(),
                s.path("sock").display().to_string(),
                s.dir().display().to_string(),
            ],
            "not a regular file",
        ),
    ];
    for (args, expect) in cases {
        let out = extblk()
            .args(["serve", "--format", "raw"])
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{args:?}: {err}");
    }
    let out = extblk()
        .args([
            "serve",
            "--format",
            "raw",
            "--queue-size",
            "100",
            "--socket",
            "x",
            "y",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("power of two"));
    // Allocation units: powers of two from 4K to 1M only; bench counts must be positive.
    for bad in ["3K", "2M", "48K", "0", "x"] {
        let out = extblk()
            .args(["serve", "--alloc-unit", bad, "--socket", "x", "y"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "--alloc-unit {bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--alloc-unit"), "--alloc-unit {bad}: {err}");
    }
    let out = extblk()
        .args(["bench", "--socket", "x", "--ios", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ios"));
}

#[test]
fn socket_is_private_and_removed_on_sigterm() {
    let s = Scratch::new("sock");
    let (img, sock) = (s.path("disk.raw"), s.path("sock"));
    make_image(&img, 1 << 20);
    let d = Daemon::start(&img, &sock, &[]);
    let mode = fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(!sock.exists(), "socket left behind");
}

/// Issue 17: a `Type=notify` systemd unit (contrib/extblk@.service) is told READY=1 once the
/// socket accepts connections, and STOPPING=1 at SIGTERM.
#[test]
fn the_service_manager_is_told_ready_once_the_socket_listens_and_stopping_at_sigterm() {
    use std::os::unix::net::{UnixDatagram, UnixStream};
    let s = Scratch::new("notify");
    let (img, sock, ns) = (s.path("disk.raw"), s.path("sock"), s.path("notify"));
    make_image(&img, 1 << 20);
    let manager = UnixDatagram::bind(&ns).unwrap();
    manager
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let d = Daemon::start_env(
        &img,
        &sock,
        &["--format=raw"],
        &[("NOTIFY_SOCKET", ns.to_str().unwrap())],
    );
    let mut buf = [0u8; 4096];
    let n = manager.recv(&mut buf).expect("no READY=1 from the daemon");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
    assert!(
        msg.lines()
            .any(|l| l == format!("MAINPID={}", d.child.id())),
        "{msg}"
    );
    // Ready means connectable (a frontend that leaves at once is served and forgotten).
    drop(UnixStream::connect(&sock).expect("READY=1 came before the socket accepts"));
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let n = manager.recv(&mut buf).expect("no STOPPING=1 at SIGTERM");
    assert_eq!(&buf[..n], b"STOPPING=1");
}

#[test]
fn sigterm_with_a_connected_client_flushes_and_exits() {
    let s = Scratch::new("term");
    let (img, sock) = (s.path("disk.raw"), s.path("sock"));
    make_image(&img, 1 << 20);
    let d = Daemon::start(&img, &sock, &[]);
    let mut c = Client::connect(&sock, 1);
    let data = pattern(3, 4096);
    assert_eq!(c.write(0, 0, &data), 0);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let mut got = vec![0u8; 4096];
    OpenOptions::new()
        .read(true)
        .open(&img)
        .unwrap()
        .read_exact_at(&mut got, 0)
        .unwrap();
    assert_eq!(got, data);
    drop(c);
    let _ = std::io::stderr().flush();
}

// ---------------------------------------------------------------------------------------------
// Serving extblk images.

fn create_image(path: &Path, size: &str) {
    let out = extblk()
        .args(["create", "--size", size])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `extblk check` and `e2fsck -fn` (extent-tree optimisation notices aside) both find nothing.
fn image_clean(path: &Path) {
    let out = extblk().arg("check").arg(path).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "extblk check: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    e2fsck_clean(path);
}

/// How long timed workloads run: `EXTBLK_WORKLOAD_SECS`, else `default`.
fn workload_secs(default: u64) -> u64 {
    std::env::var("EXTBLK_WORKLOAD_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn counter(log: &str, name: &str) -> u64 {
    common::exit_counter(log, name)
}

#[test]
fn image_random_io_matches_a_model_and_stays_consistent() {
    let s = Scratch::new("img-model");
    let log = random_io_on_two_queues(&s, &[]);
    assert!(counter(&log, "fast_overwrites") > 0, "{log}");
    assert!(counter(&log, "allocating_writes") > 0, "{log}");
    assert!(
        counter(&log, "completed_elsewhere") > 0,
        "allocating writes complete through the worker: {log}"
    );
}

#[test]
fn writeback_cache_random_io_matches_a_model_and_stays_consistent() {
    // A cache of 256 pages (128 may be dirty) under 1500 requests of up to 64 KiB on two
    // queues: writers wait for room, reads hit and miss, sub-block writes go below, discards
    // and write-zeroes drop cached pages, and every read still matches the model.
    let s = Scratch::new("img-model-wb");
    let log = random_io_on_two_queues(&s, &["--cache", "writeback", "--cache-size", "1M"]);
    for c in [
        "write_blocks",
        "write_passthrough",
        "read_hit_blocks",
        "read_misses",
        "writeback_runs",
        "flushes_below",
    ] {
        assert!(counter(&log, c) > 0, "{c}: {log}");
    }
    // Written back in runs: more blocks than runs.
    assert!(
        counter(&log, "writeback_blocks") > counter(&log, "writeback_runs"),
        "{log}"
    );
    assert_eq!(counter(&log, "dirty_pages"), 0, "{log}");
    // 60 writes of 64 KiB in flight at once (960 pages) into 256 pages: writers wait for the
    // writeback, none fails, and all of it reads back, from the cache and from below.
    let (img, sock) = (s.path("disk.img"), s.path("sock"));
    let d = Daemon::start_image(&img, &sock, &["--cache", "writeback", "--cache-size", "1M"]);
    let mut c = Client::connect(&sock, 1);
    const LEN: usize = 65536;
    let offsets: Vec<u64> = (0..60u64).map(|i| (i * 7 % 60) * 2 * LEN as u64).collect();
    for i in 0..offsets.len() {
        let data = pattern(7000 + i as u64, LEN);
        c.buf(i * LEN, LEN).copy_from_slice(&data);
    }
    let region = c.region.addr;
    let rets = write_many(&mut c.queues[0], region, &offsets, LEN);
    assert!(rets.iter().all(|&r| r == 0), "{rets:?}");
    for (i, &o) in offsets.iter().enumerate() {
        assert!(
            c.read(0, o, LEN).unwrap() == pattern(7000 + i as u64, LEN),
            "write {i}"
        );
    }
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(counter(&log, "writes_throttled") > 0, "{log}");
    image_clean(&img);
}

/// 1500 random requests on two queues of a fresh 32 MiB image served with `args`, checked
/// against a model as they go and after a restart; returns the first daemon's log.
fn random_io_on_two_queues(s: &Scratch, args: &[&str]) -> String {
    let (img, sock) = (s.path("disk.img"), s.path("sock"));
    const SIZE: u64 = 32 << 20;
    create_image(&img, "32M");
    let mut a = vec!["--queues", "2"];
    a.extend_from_slice(args);
    let d = Daemon::start_image(&img, &sock, &a);
    let mut c = Client::connect(&sock, 2);
    assert_eq!(c.capacity(), SIZE);
    let mut model = vec![0u8; SIZE as usize];
    let seed = 0xfeed_5eedu64;
    let mut rng = Rng::new(seed);
    for i in 0..1500 {
        // Mostly small and sub-block, often re-hitting written areas (overwrites).
        let sectors = 1 + if rng.below(4) == 0 {
            rng.below(128)
        } else {
            rng.below(9)
        };
        let hot = rng.below(3) == 0;
        let span = if hot { 2 << 20 } else { SIZE };
        let off = rng.below(span / 512 - sectors) * 512;
        let len = sectors * 512;
        let range = off as usize..(off + len) as usize;
        let q = (i % 2) as usize;
        match rng.below(12) {
            0..=5 => {
                let data = pattern(rng.next(), len as usize);
                assert_eq!(
                    c.write(q, off, &data),
                    0,
                    "seed {seed:#x} op {i}: write {off}+{len}"
                );
                model[range].copy_from_slice(&data);
            }
            6..=8 => {
                let got = c.read(q, off, len as usize).expect("read");
                assert!(
                    got == model[range],
                    "seed {seed:#x} op {i}: read {off}+{len} differs from the model"
                );
            }
            9 => assert_eq!(c.flush(q), 0),
            10 => {
                // Discard gives no content guarantee on virtio; extblk returns zeroes for whole
                // blocks it unmapped and leaves partial blocks as they were.
                assert_eq!(c.discard(q, off, len), 0);
                let (a, b) = (off.div_ceil(4096) * 4096, (off + len) / 4096 * 4096);
                if a < b {
                    model[a as usize..b as usize].fill(0);
                }
            }
            _ => {
                let unmap = rng.below(2) == 0;
                assert_eq!(c.write_zeroes(q, off, len, unmap), 0);
                model[range].fill(0);
            }
        }
    }
    for o in (0..4u64 << 20).step_by(1 << 20) {
        let got = c.read(0, o, 1 << 20).unwrap();
        assert!(
            got == model[o as usize..(o + (1 << 20)) as usize],
            "MiB at {o} differs from the model"
        );
    }
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    image_clean(&img);
    // Reopen: everything reads back.
    let d = Daemon::start_image(&img, &sock, &[]);
    let mut c = Client::connect(&sock, 1);
    for o in (0..SIZE).step_by(1 << 20) {
        let got = c.read(0, o, 1 << 20).unwrap();
        assert!(
            got == model[o as usize..(o + (1 << 20)) as usize],
            "after restart: MiB at {o} differs"
        );
    }
    drop(c);
    let (status, log2) = d.stop();
    assert!(status.success(), "{log2}");
    image_clean(&img);
    log
}

#[test]
fn a_raw_file_is_never_taken_for_an_image() {
    let s = Scratch::new("not-image");
    let img = s.path("disk.raw");
    make_image(&img, 16 << 20);
    let out = extblk()
        .arg("serve")
        .arg("--socket")
        .arg(s.path("sock"))
        .arg(&img)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not an extblk image") && err.contains("--format raw"),
        "{err}"
    );
}

impl Daemon {
    /// SIGKILL: a crash of the daemon (the host's page cache survives, as after a daemon crash).
    fn kill(mut self) -> String {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.read_log()
    }
}

/// Submits writes of `data[i]` at `offsets[i]` on one queue, all in flight together.
fn write_many(q: &mut Blkioq, region: usize, offsets: &[u64], len: usize) -> Vec<i32> {
    for (i, &o) in offsets.iter().enumerate() {
        q.write(
            o,
            (region + i * len) as *const u8,
            len,
            i,
            ReqFlags::empty(),
        );
    }
    let mut rets = vec![i32::MIN; offsets.len()];
    let mut comps: Vec<MaybeUninit<Completion>> =
        (0..offsets.len()).map(|_| MaybeUninit::uninit()).collect();
    let mut done = 0;
    while done < offsets.len() {
        let n = q
            .do_io(&mut comps[..offsets.len() - done], 1, None, None)
            .unwrap();
        for c in &comps[..n] {
            // SAFETY: do_io initialised these n entries.
            let c = unsafe { c.assume_init_read() };
            rets[c.user_data] = c.ret;
        }
        done += n;
    }
    rets
}

#[test]
fn image_concurrent_sub_block_writes_into_fresh_blocks_never_clobber_each_other() {
    let s = Scratch::new("img-subblock");
    let (img, sock) = (s.path("disk.img"), s.path("sock"));
    create_image(&img, "16M");
    let d = Daemon::start_image(&img, &sock, &["--queues", "2"]);
    let mut c = Client::connect(&sock, 2);
    const BLOCKS: usize = 64;
    // Queue 0 writes the first half of each fresh 4 KiB block, queue 1 the second half, at once.
    for (half, fill) in [(0usize, 0x11u8), (1, 0x22u8)] {
        c.buf(half * (1 << 20), BLOCKS * 2048).fill(fill);
    }
    let region = c.region.addr;
    let mut queues = std::mem::take(&mut c.queues);
    std::thread::scope(|sc| {
        for (half, q) in queues.iter_mut().enumerate() {
            sc.spawn(move || {
                let offsets: Vec<u64> = (0..BLOCKS)
                    .map(|b| (b * 4096 + half * 2048) as u64)
                    .collect();
                let rets = write_many(q, region + half * (1 << 20), &offsets, 2048);
                assert!(rets.iter().all(|&r| r == 0), "{rets:?}");
            });
        }
    });
    c.queues = queues;
    let got = c.read(0, 0, BLOCKS * 4096).unwrap();
    for b in 0..BLOCKS {
        let blk = &got[b * 4096..(b + 1) * 4096];
        assert!(
            blk[..2048].iter().all(|&x| x == 0x11) && blk[2048..].iter().all(|&x| x == 0x22),
            "block {b} lost half a write"
        );
    }
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    image_clean(&img);
}

#[test]
fn image_flushed_writes_survive_sigkill_and_nothing_is_stale() {
    let s = Scratch::new("img-kill");
    let (img, sock) = (s.path("disk.img"), s.path("sock"));
    create_image(&img, "64M");
    let d = Daemon::start_image(&img, &sock, &["--commit-interval", "3600"]);
    let mut c = Client::connect(&sock, 1);
    let mut rng = Rng::new(77);
    // Flushed: scattered allocating writes, then a flush.
    let mut flushed = Vec::new();
    for i in 0..300u64 {
        let off = rng.below((64 << 20) / 4096) * 4096;
        let data = pattern(1000 + i, 4096);
        assert_eq!(c.write(0, off, &data), 0);
        flushed.push((off, data));
    }
    assert_eq!(c.flush(0), 0);
    // Not flushed: more writes, some over flushed blocks.
    let mut unflushed = Vec::new();
    for i in 0..200u64 {
        let off = if i % 3 == 0 {
            flushed[i as usize].0
        } else {
            rng.below((64 << 20) / 4096) * 4096
        };
        let data = pattern(5000 + i, 4096);
        assert_eq!(c.write(0, off, &data), 0);
        unflushed.push((off, data));
    }
    drop(c);
    let _ = d.kill();
    // A copy of the crashed image for e2fsprogs: its own replay must leave a consistent image.
    let copy = s.path("copy.img");
    fs::copy(&img, &copy).unwrap();
    let out = Command::new("e2fsck")
        .args(["-fy"])
        .arg(&copy)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code().unwrap() <= 1 && !text.contains("checksum") && !text.contains("corrupt"),
        "{text}"
    );
    image_clean(&copy);
    // e2fsck's replay and ours (a read-only open replays in memory) give the same disk.
    let map = |p: &Path| {
        extblk()
            .args(["map", "--output", "json"])
            .arg(p)
            .output()
            .unwrap()
            .stdout
    };
    assert!(
        map(&copy) == map(&img),
        "e2fsck's replay maps /disk differently from ours"
    );
    // Restart on the crashed image (our replay) and read everything back.
    let d = Daemon::start_image(&img, &sock, &[]);
    let mut c = Client::connect(&sock, 1);
    let mut last: std::collections::HashMap<u64, Vec<Vec<u8>>> = std::collections::HashMap::new();
    for (off, data) in flushed.iter().chain(unflushed.iter()) {
        last.entry(*off).or_default().push(data.clone());
    }
    for (off, versions) in &last {
        let got = c.read(0, *off, 4096).unwrap();
        let flushed_version = flushed.iter().rev().find(|(o, _)| o == off).map(|(_, d)| d);
        let ok =
            versions.contains(&got) || (flushed_version.is_none() && got.iter().all(|&b| b == 0));
        assert!(
            ok,
            "block at {off}: neither a version written to it nor (if never flushed) zeroes"
        );
        if let Some(f) = flushed_version {
            let later = unflushed.iter().any(|(o, _)| o == off);
            assert!(later || &got == f, "flushed block at {off} lost");
        }
    }
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    image_clean(&img);
}

#[test]
fn image_discards_racing_writes_leave_a_consistent_image() {
    let s = Scratch::new("img-race");
    let (img, sock) = (s.path("disk.img"), s.path("sock"));
    create_image(&img, "16M");
    let d = Daemon::start_image(&img, &sock, &["--queues", "2"]);
    let mut c = Client::connect(&sock, 2);
    const SPAN: u64 = 1 << 20;
    // Self-identifying blocks: lblk and round in every 8 bytes.
    let stamp = |lblk: u64, round: u64| -> Vec<u8> {
        (0..512)
            .flat_map(|i: u64| ((lblk << 40) | (round << 16) | i).to_le_bytes())
            .collect()
    };
    let region = c.region.addr;
    let mut queues = std::mem::take(&mut c.queues);
    let (q0, rest) = queues.split_at_mut(1);
    std::thread::scope(|sc| {
        let writer = &mut q0[0];
        let discarder = &mut rest[0];
        sc.spawn(move || {
            for round in 0..40u64 {
                let offsets: Vec<u64> = (0..SPAN / 4096).map(|b| b * 4096).collect();
                for (i, &o) in offsets.iter().enumerate() {
                    let data = stamp(o / 4096, round);
                    // SAFETY: the first half of the region belongs to this thread.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            data.as_ptr(),
                            (region + i * 4096) as *mut u8,
                            4096,
                        )
                    };
                }
                let rets = write_many(writer, region, &offsets, 4096);
                assert!(rets.iter().all(|&r| r == 0), "{rets:?}");
            }
        });
        sc.spawn(move || {
            for k in 0..400u64 {
                let off = (k * 7919 % (SPAN / 4096 - 16)) * 4096;
                discarder.discard(off, 16 * 4096, 0, ReqFlags::empty());
                let mut comp = [MaybeUninit::<Completion>::uninit()];
                discarder.do_io(&mut comp, 1, None, None).unwrap();
                // SAFETY: do_io initialised the completion.
                assert_eq!(unsafe { comp[0].assume_init_read() }.ret, 0);
            }
        });
    });
    c.queues = queues;
    assert_eq!(c.flush(0), 0);
    let got = c.read(0, 0, SPAN as usize).unwrap();
    for b in 0..SPAN / 4096 {
        let blk = &got[(b * 4096) as usize..((b + 1) * 4096) as usize];
        let first = u64::from_le_bytes(blk[..8].try_into().unwrap());
        let ok = blk.iter().all(|&x| x == 0) || blk == stamp(b, (first >> 16) & 0xFFFF).as_slice();
        assert!(
            ok,
            "block {b} holds data that is neither zero nor one of its own writes"
        );
    }
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    image_clean(&img);
}

#[test]
fn image_a_data_write_error_aborts_the_journal_and_is_recorded() {
    let s = Scratch::new("img-eio");
    let (img, sock) = (s.path("disk.img"), s.path("sock"));
    create_image(&img, "16M");
    let mut cmd = extblk();
    cmd.env("EXTBLK_FAULT", "eio:data:20")
        .args(["serve", "--socket"])
        .arg(&sock)
        .arg(&img);
    let d = spawn_logged(cmd);
    d.wait_socket(&sock);
    let mut c = Client::connect(&sock, 1);
    let mut written = Vec::new();
    for i in 0..20u64 {
        let data = pattern(i, 4096);
        assert_eq!(c.write(0, i * 8192, &data), 0);
        written.push((i * 8192, data));
    }
    assert_eq!(c.flush(0), 0);
    assert_eq!(
        c.write(0, 1 << 20, &pattern(99, 4096)),
        EIO,
        "the failing write answers IOERR"
    );
    assert_eq!(
        c.write(0, 2 << 20, &pattern(98, 4096)),
        EIO,
        "every later write too"
    );
    assert!(c.read(0, 0, 4096).unwrap() == written[0].1, "reads go on");
    drop(c);
    let (_, log) = d.stop();
    assert!(log.contains("aborting the journal"), "{log}");
    // The error is in the image: info and check show it; e2fsck replays and clears it.
    let v = image_info(&img);
    assert_eq!(v["state"], "error");
    assert_eq!(
        extblk()
            .arg("check")
            .arg(&img)
            .output()
            .unwrap()
            .status
            .code(),
        Some(1)
    );
    let out = Command::new("e2fsck")
        .args(["-fy"])
        .arg(&img)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("errors") || out.status.code() == Some(1),
        "{text}"
    );
    image_clean(&img);
    // Flushed data survived the abort.
    let d = Daemon::start_image(&img, &sock, &[]);
    let mut c = Client::connect(&sock, 1);
    for (off, data) in &written {
        assert!(
            &c.read(0, *off, 4096).unwrap() == data,
            "flushed block at {off} lost after the abort"
        );
    }
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn image_enospc_fails_one_request_and_the_daemon_keeps_serving() {
    let s = Scratch::new("img-enospc");
    let (img, sock) = (s.path("disk.img"), s.path("sock"));
    create_image(&img, "16M");
    let mut cmd = extblk();
    cmd.env("EXTBLK_FAULT", "enospc:data:5:1")
        .args(["serve", "--socket"])
        .arg(&sock)
        .arg(&img);
    let d = spawn_logged(cmd);
    d.wait_socket(&sock);
    let mut c = Client::connect(&sock, 1);
    let mut rets = Vec::new();
    for i in 0..10u64 {
        rets.push(c.write(0, i * 4096 * 3, &pattern(i, 4096)));
    }
    if rets.iter().filter(|&&r| r != 0).count() != 1 {
        drop(c);
        let (_, log) = d.stop();
        panic!("exactly the injected write must fail: {rets:?}\n{log}");
    }
    for (i, r) in rets.iter().enumerate() {
        let got = c.read(0, i as u64 * 4096 * 3, 4096).unwrap();
        if *r == 0 {
            assert_eq!(got, pattern(i as u64, 4096));
        } else {
            assert!(
                got.iter().all(|&b| b == 0),
                "a failed write leaves no data behind"
            );
        }
    }
    assert_eq!(c.flush(0), 0);
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    image_clean(&img);
}

/// Issue check: a timed random workload on two queues (EXTBLK_WORKLOAD_SECS, default 30) with
/// flushes, discards and both kinds of write-zeroes; then check + e2fsck clean; then another
/// round, SIGKILL, restart, and every write acknowledged before the last completed flush reads
/// back (blocks written after it hold either version).
#[test]
fn image_timed_multi_queue_workload_then_sigkill() {
    let secs = workload_secs(30);
    let s = Scratch::new("img-soak");
    let (img, sock) = (s.path("disk.img"), s.path("sock"));
    const SIZE: u64 = 64 << 20;
    const BLOCKS: u64 = SIZE / 4096;
    create_image(&img, "64M");
    // Per block: (flushed version, versions written since the last flush). Version 0 = zeroes.
    type Versions = (u64, Vec<u64>);
    let state: std::sync::Mutex<Vec<Versions>> =
        std::sync::Mutex::new(vec![(0, Vec::new()); BLOCKS as usize]);
    let block = |b: u64, v: u64| -> Vec<u8> {
        if v == 0 {
            return vec![0u8; 4096];
        }
        (0..512u64)
            .flat_map(|i| (b << 40 ^ v << 12 ^ i).to_le_bytes())
            .collect()
    };
    let run = |deadline: Instant, c: &mut Client, seed: u64| {
        let region = c.region.addr;
        let mut queues = std::mem::take(&mut c.queues);
        std::thread::scope(|sc| {
            for (qi, q) in queues.iter_mut().enumerate() {
                let state = &state;
                sc.spawn(move || {
                    let mut rng = Rng::new(seed ^ ((qi as u64 + 1) * 0x9E37_79B9));
                    let mut version = (seed << 20) | (qi as u64) << 16;
                    let buf = region + qi * (REGION / 2);
                    while Instant::now() < deadline {
                        // Each queue owns every other 64-block stripe, so its own model is exact.
                        let stripe = rng.below(BLOCKS / 64 / 2) * 2 + qi as u64;
                        let b = stripe * 64 + rng.below(60);
                        let n = 1 + rng.below(4);
                        let mut comp = [MaybeUninit::<Completion>::uninit()];
                        let mut wait = |q: &mut Blkioq| {
                            q.do_io(&mut comp, 1, None, None).unwrap();
                            // SAFETY: do_io initialised the completion.
                            assert_eq!(unsafe { comp[0].assume_init_read() }.ret, 0);
                        };
                        match rng.below(10) {
                            0..=5 => {
                                for k in 0..n {
                                    version += 1;
                                    let d = block(b + k, version);
                                    // SAFETY: this queue's half of the region.
                                    unsafe {
                                        std::ptr::copy_nonoverlapping(
                                            d.as_ptr(),
                                            (buf + (k as usize) * 4096) as *mut u8,
                                            4096,
                                        )
                                    };
                                    state.lock().unwrap()[(b + k) as usize].1.push(version);
                                }
                                q.write(
                                    b * 4096,
                                    buf as *const u8,
                                    (n * 4096) as usize,
                                    0,
                                    ReqFlags::empty(),
                                );
                                wait(q);
                            }
                            6 => {
                                // Flush: everything this queue wrote is now flushed.
                                q.flush(0, ReqFlags::empty());
                                let snapshot: Vec<(u64, u64)> = {
                                    let st = state.lock().unwrap();
                                    (0..BLOCKS)
                                        .filter(|x| (x / 64) % 2 == qi as u64)
                                        .filter_map(|x| st[x as usize].1.last().map(|&v| (x, v)))
                                        .collect()
                                };
                                wait(q);
                                let mut st = state.lock().unwrap();
                                for (x, v) in snapshot {
                                    // Only this queue touches its stripes, and it waited for
                                    // the flush: all it wrote before is flushed.
                                    let e = &mut st[x as usize];
                                    e.0 = v;
                                    e.1.clear();
                                }
                            }
                            7 => {
                                q.discard(b * 4096, n * 4096, 0, ReqFlags::empty());
                                wait(q);
                                // Discarded blocks read as zeroes (version 0).
                                let mut st = state.lock().unwrap();
                                for k in 0..n {
                                    st[(b + k) as usize].1.push(0);
                                }
                            }
                            _ => {
                                let flags = if rng.below(2) == 0 {
                                    ReqFlags::empty()
                                } else {
                                    ReqFlags::NO_UNMAP
                                };
                                q.write_zeroes(b * 4096, n * 4096, 0, flags);
                                wait(q);
                                let mut st = state.lock().unwrap();
                                for k in 0..n {
                                    st[(b + k) as usize].1.push(0);
                                }
                            }
                        }
                    }
                });
            }
        });
        c.queues = queues;
    };
    let check_reads = |c: &mut Client, strict_unflushed: bool| {
        let st = state.lock().unwrap();
        for chunk in 0..BLOCKS / 256 {
            let got = c.read(0, chunk * 256 * 4096, 256 * 4096).unwrap();
            for k in 0..256u64 {
                let b = chunk * 256 + k;
                let (flushed, later) = &st[b as usize];
                let blk = &got[(k * 4096) as usize..((k + 1) * 4096) as usize];
                let ok = if strict_unflushed {
                    blk == block(b, *later.last().unwrap_or(flushed)).as_slice()
                } else {
                    blk == block(b, *flushed).as_slice()
                        || later.iter().any(|&v| blk == block(b, v).as_slice())
                };
                if !ok {
                    let first = u64::from_le_bytes(blk[..8].try_into().unwrap());
                    let held = if blk.iter().all(|&x| x == 0) {
                        "zeroes".to_string()
                    } else {
                        format!("version {}", (first ^ (b << 40)) >> 12)
                    };
                    panic!(
                        "block {b}: holds {held}, expected flushed {flushed} or later {later:?}"
                    );
                }
            }
        }
    };
    let d = Daemon::start_image(&img, &sock, &["--queues", "2"]);
    let mut c = Client::connect(&sock, 2);
    run(Instant::now() + Duration::from_secs(secs / 2), &mut c, 1);
    check_reads(&mut c, true);
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    image_clean(&img);
    // Second half, then a crash.
    let d = Daemon::start_image(&img, &sock, &["--queues", "2"]);
    let mut c = Client::connect(&sock, 2);
    run(
        Instant::now() + Duration::from_secs(secs - secs / 2),
        &mut c,
        2,
    );
    drop(c);
    let _ = d.kill();
    let d = Daemon::start_image(&img, &sock, &[]);
    let mut c = Client::connect(&sock, 1);
    check_reads(&mut c, false);
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    image_clean(&img);
}

/// The free block ranges of an ext4 image, as `dumpe2fs` lists them per group.
fn free_block_ranges(img: &Path) -> Vec<(u64, u64)> {
    let out = Command::new("dumpe2fs").arg(img).output().unwrap();
    assert!(out.status.success(), "dumpe2fs failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut ranges = Vec::new();
    for line in text.lines() {
        // Group sections are indented; the superblock's "Free blocks:" is a count.
        let Some(list) = line.strip_prefix("  Free blocks: ") else {
            continue;
        };
        for r in list.split(", ").filter(|r| !r.is_empty()) {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            ranges.push((a.parse().unwrap(), b.parse::<u64>().unwrap() + 1));
        }
    }
    assert!(!ranges.is_empty(), "no free blocks in {text}");
    ranges
}

/// Blocks of a new unit left unwritten read as zeroes whatever the image file holds there
/// (free blocks never punched hold stale bytes — here written straight into the file), and so
/// do the blocks the unit's second write fills: the file does not read as zeroes there, so
/// they are zero-filled even though the second write comes too late for the unit to be filling
/// up (`unit_pace`).
#[test]
fn a_new_unit_reads_as_zero_around_its_writes_over_stale_free_blocks() {
    let s = Scratch::new("img-stale");
    let (img, sock) = (s.path("disk.img"), s.path("sock"));
    create_image(&img, "16M");
    let f = OpenOptions::new().write(true).open(&img).unwrap();
    let mut stale = 0;
    for (a, b) in free_block_ranges(&img) {
        for blk in a..b {
            f.write_all_at(&[0x5A; 4096], blk * 4096).unwrap();
            stale += 1;
        }
    }
    drop(f);
    assert!(stale > 1000, "{stale} free blocks");
    image_clean(&img);
    // Sub-block writes into fresh units scattered over the disk; in every other unit a second
    // one, which fills the rest.
    let units = [0u64, 7, 31, 100, 150, 201];
    let at = |i: usize, k: u64| units[i] * 65536 + ((i as u64 + k * 5) % 16) * 4096 + 1024;
    let mut want: Vec<Vec<u8>> = vec![vec![0u8; 65536]; units.len()];
    let d = Daemon::start_image(&img, &sock, &[]);
    let mut c = Client::connect(&sock, 1);
    for k in 0..2u64 {
        if k == 1 {
            std::thread::sleep(Duration::from_millis(700));
        }
        for i in (0..units.len()).filter(|i| k == 0 || i % 2 == 0) {
            let data = pattern(units[i] * 2 + k, 512);
            assert_eq!(c.write(0, at(i, k), &data), 0);
            let o = (at(i, k) - units[i] * 65536) as usize;
            want[i][o..o + 512].copy_from_slice(&data);
        }
        for (i, u) in units.iter().enumerate() {
            let got = c.read(0, u * 65536, 65536).unwrap();
            assert!(
                got == want[i],
                "unit {u} after {k}: reads as zero around its writes"
            );
        }
    }
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert_eq!(counter(&log, "allocating_writes"), 6 + 3, "{log}");
    assert_eq!(counter(&log, "unit_blocks_left_unwritten"), 6 * 15, "{log}");
    assert_eq!(counter(&log, "zero_filled_blocks"), 3 * 14, "{log}");
    assert_eq!(counter(&log, "unit_blocks_found_zero"), 0, "{log}");
    image_clean(&img);
    // And after a restart, from the image alone.
    let d = Daemon::start_image(&img, &sock, &[]);
    let mut c = Client::connect(&sock, 1);
    for (i, u) in units.iter().enumerate() {
        assert!(
            c.read(0, u * 65536, 65536).unwrap() == want[i],
            "unit {u} after a restart"
        );
    }
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

/// Does the filesystem under `dir` report the holes of a sparse file through FIEMAP, which the
/// engine asks before it converts the rest of a unit without writing it? tmpfs does not.
fn reports_holes(dir: &Path) -> bool {
    let p = dir.join("holes-probe");
    let f = File::create(&p).unwrap();
    f.set_len(1 << 20).unwrap();
    f.write_all_at(&[1; 4096], 0).unwrap();
    let ok = extblk::io::sys::is_hole(&f, 65536, 65536) && !extblk::io::sys::is_hole(&f, 0, 4096);
    drop(f);
    let _ = fs::remove_file(&p);
    ok
}

/// Allocation units over holes of the image file (a fresh, sparse image), written as a sparse
/// pattern does: `unit_pace` starts out assuming units do not fill up, so a unit's first write
/// converts the rest of the unit without writing anything there, except in the probes (every
/// 8th unit), which leave it unwritten and convert it at their second write, which here comes
/// too late for the units to be filling up. The units read as zeroes around their writes, later
/// writes are pure overwrites, and the host file grows by the data, not by zeroes.
#[test]
fn units_over_holes_are_converted_without_writing_zeroes() {
    use std::os::unix::fs::MetadataExt;
    let s = Scratch::new("img-holes");
    if !reports_holes(s.dir()) {
        return common::skip_or_fail(&format!(
            "{} does not report holes through FIEMAP (tmpfs?)",
            s.dir().display()
        ));
    }
    let (img, sock) = (s.path("disk.img"), s.path("sock"));
    create_image(&img, "64M");
    let units = 8u64;
    let d = Daemon::start_image(&img, &sock, &[]);
    let mut c = Client::connect(&sock, 1);
    let mut want = vec![vec![0u8; 65536]; units as usize];
    let write = |c: &mut Client, u: u64, b: u64, want: &mut Vec<Vec<u8>>| {
        let data = pattern(u * 16 + b, 4096);
        assert_eq!(c.write(0, (u * 16 + b) * 4096, &data), 0);
        want[u as usize][(b * 4096) as usize..((b + 1) * 4096) as usize].copy_from_slice(&data);
    };
    let before = fs::metadata(&img).unwrap().blocks() * 512;
    for u in 0..units {
        write(&mut c, u, 0, &mut want);
    }
    std::thread::sleep(Duration::from_millis(700));
    for u in 0..units {
        write(&mut c, u, 5, &mut want);
    }
    for u in 0..units {
        write(&mut c, u, 9, &mut want);
    }
    assert_eq!(c.flush(0), 0);
    let grew = fs::metadata(&img).unwrap().blocks() * 512 - before;
    for u in 0..units {
        let got = c.read(0, u * 65536, 65536).unwrap();
        assert!(
            got == want[u as usize],
            "unit {u} reads its writes and zeroes"
        );
    }
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    // Too few probes for a verdict (`unit_pace`): each first write leaves the other 15 blocks
    // unwritten, each second write converts the 14 still unwritten, holes of the sparse image
    // file, without writing them; the third writes are pure overwrites.
    assert_eq!(counter(&log, "allocating_writes"), 2 * units, "{log}");
    assert_eq!(counter(&log, "unit_blocks_found_zero"), units * 14, "{log}");
    assert_eq!(
        counter(&log, "unit_blocks_left_unwritten"),
        units * 15,
        "{log}"
    );
    assert_eq!(counter(&log, "zero_filled_blocks"), 0, "{log}");
    assert_eq!(counter(&log, "fast_overwrites"), units, "{log}");
    // Zero-filling would have written 15 blocks per unit; 3 were written in each, plus the
    // commits' log blocks and the metadata.
    assert!(
        grew < units * 15 * 4096 * 2 / 3,
        "the host file grew by {grew} bytes for {} blocks of data",
        3 * units
    );
    image_clean(&img);
    let d = Daemon::start_image(&img, &sock, &[]);
    let mut c = Client::connect(&sock, 1);
    for u in 0..units {
        assert!(
            c.read(0, u * 65536, 65536).unwrap() == want[u as usize],
            "unit {u} after a restart"
        );
    }
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn image_counters_show_overwrites_on_the_queue_thread_and_allocations_through_the_worker() {
    let s = Scratch::new("img-paths");
    let (img, sock) = (s.path("disk.img"), s.path("sock"));
    create_image(&img, "16M");
    // Allocate and write 64 blocks with exact allocation, then stop.
    let d = Daemon::start_image(&img, &sock, &["--alloc-unit", "4K"]);
    let mut c = Client::connect(&sock, 1);
    for b in 0..64u64 {
        assert_eq!(c.write(0, b * 4096, &pattern(b, 4096)), 0);
    }
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert_eq!(counter(&log, "allocating_writes"), 64, "{log}");
    assert_eq!(counter(&log, "zero_filled_blocks"), 0, "{log}");
    assert!(
        counter(&log, "completed_elsewhere") >= 64,
        "allocating writes complete on the worker: {log}"
    );
    // With the default 64 KiB unit, the first write into each unit allocates all 16 blocks.
    let d = Daemon::start_image(&img, &sock, &[]);
    let mut c = Client::connect(&sock, 1);
    for b in 64..128u64 {
        assert_eq!(c.write(0, b * 4096, &pattern(b, 4096)), 0);
    }
    for b in 64..128u64 {
        assert_eq!(c.read(0, b * 4096, 4096).unwrap(), pattern(b, 4096));
    }
    // Sub-block writes into a fresh unit: the unit reads as zero around them.
    assert_eq!(c.write(0, 200 * 4096 + 512, &pattern(7, 512)), 0);
    let got = c.read(0, 192 * 4096, 16 * 4096).unwrap();
    let mut want = vec![0u8; 16 * 4096];
    want[8 * 4096 + 512..8 * 4096 + 1024].copy_from_slice(&pattern(7, 512));
    assert!(got == want, "a fresh unit reads as zero around the write");
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    if reports_holes(s.dir()) {
        // Units 4 to 7 and 12, too few for a verdict of `unit_pace`, over holes of the sparse
        // image file: each unit's first write leaves the other 15 blocks unwritten, its second
        // converts the 14 still unwritten without writing them, the other 14 writes are pure
        // overwrites.
        assert_eq!(counter(&log, "allocating_writes"), 4 * 2 + 1, "{log}");
        assert_eq!(counter(&log, "fast_overwrites"), 4 * 14, "{log}");
        assert_eq!(counter(&log, "unit_blocks_found_zero"), 4 * 14, "{log}");
        assert_eq!(counter(&log, "zero_filled_blocks"), 0, "{log}");
        assert_eq!(counter(&log, "unit_blocks_left_unwritten"), 5 * 15, "{log}");
    } else {
        // A filesystem that reports no holes (tmpfs): the first write leaves the other 15
        // blocks unwritten, the second fills the 14 still unwritten and converts them, the
        // other 14 writes are pure overwrites.
        assert_eq!(counter(&log, "allocating_writes"), 4 * 2 + 1, "{log}");
        assert_eq!(counter(&log, "fast_overwrites"), 4 * 14, "{log}");
        assert_eq!(counter(&log, "zero_filled_blocks"), 4 * 14, "{log}");
        assert_eq!(counter(&log, "unit_blocks_left_unwritten"), 5 * 15, "{log}");
    }
    image_clean(&img);
    // Pure overwrites and reads: all on the queue thread, no journal handle, no worker.
    let d = Daemon::start_image(&img, &sock, &[]);
    let mut c = Client::connect(&sock, 1);
    for i in 0..200u64 {
        let b = i % 128;
        assert_eq!(c.write(0, b * 4096 + (i % 8) * 512, &pattern(i, 512)), 0);
        assert!(c.read(0, b * 4096, 4096).is_ok());
    }
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert_eq!(counter(&log, "fast_overwrites"), 200, "{log}");
    assert_eq!(counter(&log, "journal_handles"), 0, "{log}");
    assert_eq!(counter(&log, "allocating_writes"), 0, "{log}");
    assert_eq!(counter(&log, "completed_elsewhere"), 0, "{log}");
    assert!(counter(&log, "completed_on_queue_thread") >= 400, "{log}");
    image_clean(&img);
}

/// Crash states of a workload driven through the real daemon by libblkio: the daemon records
/// every write, barrier and punch of its backing (`EXTBLK_RECORD`); the image is rebuilt at every
/// barrier of the log and at the end; each state must pass `check` and read back every flushed
/// write, with every block holding zeroes or a value written to it, never another block's data.
#[test]
fn image_crash_states_through_the_real_daemon() {
    use extblk::image::{Image, OpenOptions};
    use extblk::io::record::{decode_events, encoded_len, IoEvent};
    let s = Scratch::new("img-record");
    let (img, sock, rec) = (s.path("disk.img"), s.path("sock"), s.path("io.log"));
    create_image(&img, "16M");
    let base = fs::read(&img).unwrap();
    let mut cmd = extblk();
    cmd.env("EXTBLK_RECORD", &rec)
        .args(["serve", "--socket"])
        .arg(&sock)
        .arg(&img);
    let d = spawn_logged(cmd);
    d.wait_socket(&sock);
    let mut c = Client::connect(&sock, 1);
    let stamp = |b: u64, v: u64| -> Vec<u8> {
        (0..512u64)
            .flat_map(|i| ((0xDA7Au64 << 48) | (b << 24) | (v << 8) | (i & 0xFF)).to_le_bytes())
            .collect()
    };
    const BLOCKS: u64 = 256;
    let mut rng = Rng::new(4242);
    // history[b] = versions in order (0 = zeroes); flushes = (log bytes when acked, versions then).
    let mut history: Vec<Vec<u64>> = vec![vec![0]; BLOCKS as usize];
    let mut flushes: Vec<(u64, Vec<usize>)> = Vec::new();
    for v in 1..=400u64 {
        let b = rng.below(BLOCKS);
        match rng.below(8) {
            0 => {
                assert_eq!(c.flush(0), 0);
                let at = fs::metadata(&rec).unwrap().len();
                flushes.push((at, history.iter().map(Vec::len).collect()));
            }
            1 => {
                assert_eq!(c.discard(0, b * 4096, 4096), 0);
                history[b as usize].push(0);
            }
            _ => {
                assert_eq!(c.write(0, b * 4096, &stamp(b, v)), 0);
                history[b as usize].push(v);
            }
        }
    }
    drop(c);
    let _ = d.kill();
    let raw = fs::read(&rec).unwrap();
    let events = decode_events(&raw);
    // Byte position of the end of each event, to place the flush acknowledgements.
    let mut ends = Vec::with_capacity(events.len());
    let mut pos = 0u64;
    for e in &events {
        pos += encoded_len(e);
        ends.push(pos);
    }
    let cuts: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| **e == IoEvent::FlushEnd)
        .map(|(i, _)| i + 1)
        .chain([events.len()])
        .collect();
    assert!(cuts.len() > 10, "too few barriers: {}", cuts.len());
    let mut buf = vec![0u8; 4096];
    for &cut in &cuts {
        let mut state = base.clone();
        for e in &events[..cut] {
            match e {
                // Every write submitted by the cut: the client waits for each request, so
                // at a barrier nothing is in flight but the engine's own log writes.
                IoEvent::Write { offset, data, .. } => {
                    state[*offset as usize..*offset as usize + data.len()].copy_from_slice(data)
                }
                IoEvent::Punch { offset, len } => {
                    state[*offset as usize..(*offset + *len) as usize].fill(0)
                }
                IoEvent::Complete { .. } | IoEvent::FlushStart | IoEvent::FlushEnd => {}
            }
        }
        let io: std::sync::Arc<dyn extblk::io::BlockIo> =
            std::sync::Arc::new(extblk::io::mem::MemIo::new(state));
        let image = Image::open(io, OpenOptions { read_only: true })
            .unwrap_or_else(|e| panic!("cut {cut}: {e}"));
        let report = extblk::check::check(&image, "cut".into());
        assert!(
            report.problems.is_empty(),
            "cut {cut}: {:?}",
            report.problems
        );
        // The last flush acknowledged before this cut fixes each block's oldest allowed version.
        let cut_bytes = if cut == 0 { 0 } else { ends[cut - 1] };
        let floor = flushes
            .iter()
            .rev()
            .find(|(at, _)| *at <= cut_bytes)
            .map(|(_, lens)| lens.clone());
        for b in 0..BLOCKS {
            let got = match image.lookup(b as u32) {
                extblk::mapping::tree::Lookup::Mapped(e) if !e.unwritten => {
                    image.read_block(e.pblk, &mut buf).unwrap();
                    let w = u64::from_le_bytes(buf[..8].try_into().unwrap());
                    if buf.iter().all(|&x| x == 0) {
                        // Zero-filled with its allocation unit, not written since.
                        0
                    } else {
                        assert!(
                            w >> 48 == 0xDA7A && (w >> 24) & 0xFF_FFFF == b,
                            "cut {cut}: block {b} holds stale or foreign data ({w:#x})"
                        );
                        let v = (w >> 8) & 0xFFFF;
                        assert!(
                            buf == stamp(b, v),
                            "cut {cut}: block {b} is not one written value"
                        );
                        v
                    }
                }
                _ => 0,
            };
            let h = &history[b as usize];
            let from = floor.as_ref().map_or(0, |lens| lens[b as usize] - 1);
            if !h[from..].contains(&got) {
                let near: Vec<_> = image
                    .runs()
                    .into_iter()
                    .filter(|r| r.lblk <= b && b < r.lblk + r.len)
                    .collect();
                let kinds: Vec<String> = events[..cut]
                    .iter()
                    .rev()
                    .take(12)
                    .map(|e| match e {
                        IoEvent::Write { offset, data, id } => {
                            format!("W{}+{}#{id}", offset / 4096, data.len())
                        }
                        IoEvent::Complete { id, .. } => format!("C#{id}"),
                        IoEvent::FlushStart => "F<".into(),
                        IoEvent::FlushEnd => "F>".into(),
                        IoEvent::Punch { offset, len } => {
                            format!("P{}+{}", offset / 4096, len / 4096)
                        }
                    })
                    .collect();
                panic!("cut {cut}: block {b} holds version {got}, allowed {:?}; run {near:?}; recovery {:?}; last events (newest first) {kinds:?}; flush acks {:?}; cut bytes {cut_bytes}", &h[from..], image.recovery(), flushes.iter().map(|f| f.0).collect::<Vec<_>>());
            }
        }
    }
}

/// Large requests over a fragmented image need more ring operations in flight than the
/// completion queue holds (here 8 × 128): all complete, with the right data. (Before the ring
/// bounded its operations in flight, completions overflowed into the kernel's backlog, which
/// posts no eventfd wake-up, and the requests never completed.)
#[test]
fn image_large_writes_over_a_fragmented_image_all_complete() {
    let s = Scratch::new("img-scatter");
    let (img, sock) = (s.path("disk.img"), s.path("sock"));
    let out = extblk()
        .args(["create", "--size", "64M", "--scatter", "16M"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let d = Daemon::start_image(&img, &sock, &[]);
    let mut c = Client::connect(&sock, 1);
    const LEN: usize = 512 << 10;
    for i in 0..8 {
        c.buf(i * LEN, LEN)
            .copy_from_slice(&pattern(i as u64 + 7, LEN));
    }
    let region = c.region.addr;
    let offsets: Vec<u64> = (0..8).map(|i| (i * 3 * LEN) as u64).collect();
    for _ in 0..10 {
        let rets = write_many(&mut c.queues[0], region, &offsets, LEN);
        assert!(rets.iter().all(|&r| r == 0), "{rets:?}");
    }
    for (i, &o) in offsets.iter().enumerate() {
        let got = c.read(0, o, LEN).unwrap();
        assert!(
            got == pattern(i as u64 + 7, LEN),
            "write {i} at {o} reads back wrong"
        );
    }
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert_eq!(
        counter(&log, "allocating_writes"),
        0,
        "every block was mapped"
    );
    image_clean(&img);
}

/// What one queue of [`churn`] did.
#[derive(Debug, Default)]
struct ChurnResult {
    completed: u64,
    errors: Vec<i32>,
    /// Longest time without a completion on this queue while requests were in flight.
    longest_gap: Duration,
    /// Stopped early: no completion for `STALL` (the disk stopped).
    stalled: bool,
}

/// A queue that completes nothing for this long has stopped.
const STALL: Duration = Duration::from_secs(20);

/// Random 4 KiB writes over `[0, span)` on every queue of `c` for `secs` seconds, `depths[q]`
/// requests in flight on queue `q`; queues listed in `discarding` also send 64 KiB discards
/// (one request in four). Every queue's completions are watched: a queue that completes
/// nothing for [`STALL`] is reported stalled and the run ends.
fn churn(
    c: &mut Client,
    span: u64,
    secs: u64,
    depths: &[usize],
    discarding: &[usize],
) -> Vec<ChurnResult> {
    let region = c.region.addr;
    let mut queues = std::mem::take(&mut c.queues);
    assert!(depths.len() <= queues.len());
    let deadline = Instant::now() + Duration::from_secs(secs);
    let per_queue = REGION / depths.len();
    let results = std::thread::scope(|sc| {
        let handles: Vec<_> = queues
            .iter_mut()
            .zip(depths)
            .enumerate()
            .map(|(qi, (q, &depth))| {
                let discards = discarding.contains(&qi);
                sc.spawn(move || {
                    assert!(depth * 4096 <= per_queue);
                    let base = region + qi * per_queue;
                    let mut rng = Rng::new(0xC4u64 ^ (qi as u64) << 32);
                    let mut r = ChurnResult::default();
                    let mut in_flight = 0usize;
                    let mut free: Vec<usize> = (0..depth).collect();
                    let mut last = Instant::now();
                    let mut comps: Vec<MaybeUninit<Completion>> =
                        (0..depth).map(|_| MaybeUninit::uninit()).collect();
                    loop {
                        let submitting = Instant::now() < deadline;
                        while submitting && !free.is_empty() {
                            let slot = free.pop().unwrap();
                            if discards && rng.below(4) == 0 {
                                let off = rng.below(span / 65536) * 65536;
                                q.discard(off, 65536, slot, ReqFlags::empty());
                            } else {
                                let off = rng.below(span / 4096) * 4096;
                                let buf = base + slot * 4096;
                                // SAFETY: this slot's 4 KiB of this queue's part of the region;
                                // no request using it is in flight.
                                unsafe {
                                    std::ptr::write_bytes(buf as *mut u8, qi as u8 + 1, 4096)
                                };
                                q.write(off, buf as *const u8, 4096, slot, ReqFlags::empty());
                            }
                            in_flight += 1;
                        }
                        if in_flight == 0 {
                            break;
                        }
                        let mut timeout = Duration::from_secs(1);
                        let n = q
                            .do_io(&mut comps[..in_flight], 1, Some(&mut timeout), None)
                            .unwrap_or(0);
                        if n == 0 {
                            let gap = last.elapsed();
                            r.longest_gap = r.longest_gap.max(gap);
                            if gap >= STALL {
                                r.stalled = true;
                                break;
                            }
                            continue;
                        }
                        r.longest_gap = r.longest_gap.max(last.elapsed());
                        last = Instant::now();
                        for comp in &comps[..n] {
                            // SAFETY: do_io initialised these n completions.
                            let comp = unsafe { comp.assume_init_read() };
                            if comp.ret != 0 {
                                r.errors.push(comp.ret);
                            }
                            free.push(comp.user_data);
                            r.completed += 1;
                        }
                        in_flight -= n;
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    c.queues = queues;
    results
}

/// Fills `[0, size)` with 1 MiB writes on queue 0.
fn fill(c: &mut Client, size: u64) {
    let data = vec![0x5Au8; 1 << 20];
    for off in (0..size).step_by(1 << 20) {
        assert_eq!(c.write(0, off, &data), 0, "fill write at {off}");
    }
}

/// Serves `img` with two queues (`serve_args` added), optionally fills `[0, fill)` first, then
/// [`churn`]s `[0, span)`: random 4 KiB writes at depth 64 on queue 0, writes and 64 KiB
/// discards at depth 8 on queue 1. Every queue must keep completing, every request succeed and
/// each queue do real work. Returns the daemon's log (with its exit counters).
fn two_queue_churn(
    img: &Path,
    sock: &Path,
    serve_args: &[&str],
    env: &[(&str, &str)],
    fill_size: Option<u64>,
    span: u64,
) -> String {
    let mut args = vec!["--queues", "2"];
    args.extend_from_slice(serve_args);
    let d = Daemon::start_env(img, sock, &args, env);
    let mut c = Client::connect(sock, 2);
    if let Some(size) = fill_size {
        fill(&mut c, size);
    }
    let res = churn(&mut c, span, workload_secs(20), &[64, 8], &[1]);
    if res.iter().any(|r| r.stalled) {
        let log = d.kill();
        panic!("a queue stopped completing: {res:?}\n{log}");
    }
    assert_eq!(c.flush(0), 0);
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    for (q, r) in res.iter().enumerate() {
        assert!(
            r.errors.is_empty(),
            "queue {q}: {} requests failed ({:?}...)\n{log}",
            r.errors.len(),
            &r.errors[..r.errors.len().min(5)]
        );
        assert!(r.completed > 100, "queue {q} did too little: {r:?}");
    }
    log
}

/// Issue 12, 1: a guest that fills its disk and then churns random writes and discards must
/// never see a write fail for lack of space: blocks freed by the running and committing
/// transactions are waited for, not given up on after one retry.
#[test]
fn image_a_full_disk_churning_writes_and_discards_never_runs_out_of_space() {
    let s = Scratch::new("img-space");
    let (img, sock) = (s.path("disk.img"), s.path("sock"));
    const SIZE: u64 = 256 << 20;
    create_image(&img, "256M");
    let log = two_queue_churn(&img, &sock, &[], &[], Some(SIZE), SIZE);
    assert_eq!(counter(&log, "enospc"), 0, "{log}");
    // The race the fix is about happened: writes found free space only in pending frees.
    assert!(
        counter(&log, "space_waits") > 0,
        "no write ever waited for freed space: {log}"
    );
    image_clean(&img);
}

/// Issue 12, 2: with a 4 MiB journal the log throttle engages constantly; it must park writes
/// rather than block a queue thread that holds fence guards the committer waits for. Every
/// queue keeps completing.
#[test]
fn image_a_small_journal_throttles_without_stopping_any_queue() {
    let s = Scratch::new("img-throttle");
    let (img, sock) = (s.path("disk.img"), s.path("sock"));
    let out = extblk()
        .args(["create", "--size", "4G", "--journal-size", "4M"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The throttle at 64 log blocks and every commit held up for 300 ms: the next transaction
    // outgrows the limit meanwhile on any machine, loaded or not (with the real limit, half the
    // log, that needs an extent tree larger than a slow machine builds in the test's time).
    let log = two_queue_churn(
        &img,
        &sock,
        &["--alloc-unit", "4K"],
        &[
            ("EXTBLK_COMMIT_DELAY_MS", "300"),
            ("EXTBLK_LOG_HARD_LIMIT", "64"),
        ],
        None,
        4 << 30,
    );
    // The situation that used to deadlock happened: writes met the log throttle.
    assert!(
        counter(&log, "throttled") > 0,
        "the throttle never engaged: {log}"
    );
    image_clean(&img);
}

/// Issue 12, 3: a write of more segments than one host vectored call takes (1,100 > IOV_MAX,
/// within the advertised seg_max) is served, and aborts nothing.
#[test]
fn image_a_write_of_more_segments_than_iov_max_is_served() {
    let s = Scratch::new("img-segs");
    let (img, sock) = (s.path("disk.img"), s.path("sock"));
    create_image(&img, "64M");
    let d = Daemon::start_image(&img, &sock, &["--queue-size", "4096"]);
    const SEGS: usize = 1100;
    const LEN: usize = SEGS * 4096;
    let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", sock.to_str().unwrap()).unwrap();
    b.connect().unwrap();
    b.set_i32("num-queues", 1).unwrap();
    b.set_i32("queue-size", 4096).unwrap();
    let mut out = b.start().unwrap();
    assert!(b.get_i32("max-segments").unwrap() >= SEGS as i32);
    let region = b.alloc_mem_region(2 * LEN).unwrap();
    b.map_mem_region(&region).unwrap();
    let q = &mut out.queues[0];
    // SAFETY: the region is a live mapping of 2 * LEN bytes owned by this test.
    let mem = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, 2 * LEN) };
    // Every other page of the region, so no two segments are adjacent in memory.
    let iovs: Vec<libc::iovec> = (0..SEGS)
        .map(|i| {
            let page = &mut mem[2 * i * 4096..][..4096];
            page.fill(i as u8 ^ 0xA5);
            libc::iovec {
                iov_base: page.as_mut_ptr().cast(),
                iov_len: 4096,
            }
        })
        .collect();
    let one = |q: &mut Blkioq| {
        let mut c = [MaybeUninit::<Completion>::uninit()];
        assert_eq!(q.do_io(&mut c, 1, None, None).unwrap(), 1);
        // SAFETY: do_io initialised it.
        unsafe { c[0].assume_init_read() }.ret
    };
    // Twice: the first allocates (a fresh image), the second is a pure overwrite.
    for round in 0..2 {
        q.writev(4096, iovs.as_ptr(), SEGS as u32, 0, ReqFlags::empty());
        assert_eq!(one(q), 0, "write round {round}");
    }
    // Read back into the pages between, also as 1,100 segments.
    let back: Vec<libc::iovec> = iovs
        .iter()
        .map(|v| libc::iovec {
            // SAFETY: the page after each written one, inside the region.
            iov_base: unsafe { v.iov_base.cast::<u8>().add(4096) }.cast(),
            iov_len: 4096,
        })
        .collect();
    q.readv(4096, back.as_ptr(), SEGS as u32, 0, ReqFlags::empty());
    assert_eq!(one(q), 0);
    for (i, page) in mem.chunks(8192).map(|p| &p[4096..]).enumerate() {
        assert!(
            page.iter().all(|&x| x == i as u8 ^ 0xA5),
            "segment {i} read back wrong"
        );
    }
    // Later writes still work: the journal was not aborted.
    q.write(0, mem.as_ptr(), 4096, 0, ReqFlags::empty());
    assert_eq!(one(q), 0);
    q.flush(0, ReqFlags::empty());
    assert_eq!(one(q), 0);
    drop(out);
    drop(b);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(!log.contains("aborting the journal"), "{log}");
    image_clean(&img);
}

/// The disk as 4 KiB blocks a test wrote (never-written blocks read as zeroes).
#[derive(Default)]
struct BlockModel(std::collections::BTreeMap<u64, Vec<u8>>);

impl BlockModel {
    fn write(&mut self, off: u64, data: &[u8]) {
        let mut at = 0usize;
        while at < data.len() {
            let o = off + at as u64;
            let (blk, inner) = (o / 4096, (o % 4096) as usize);
            let n = (4096 - inner).min(data.len() - at);
            let b = self.0.entry(blk).or_insert_with(|| vec![0u8; 4096]);
            b[inner..inner + n].copy_from_slice(&data[at..at + n]);
            at += n;
        }
    }

    fn zero(&mut self, off: u64, len: u64) {
        self.write(off, &vec![0u8; len as usize]);
    }

    /// Blocks reading otherwise than the model: (block, reads all zeroes).
    fn mismatches(&self, c: &mut Client) -> Vec<(u64, bool)> {
        let mut bad = Vec::new();
        for (&blk, want) in &self.0 {
            let got = c.read(0, blk * 4096, 4096).unwrap();
            if &got != want {
                bad.push((blk, got.iter().all(|&b| b == 0)));
            }
        }
        bad
    }
}

/// Serves `img` with `log_args`, runs `work` (which must never FLUSH) on a model, SIGKILLs
/// the daemon once every request is acknowledged, restarts it with the same arguments and
/// returns the blocks that read back otherwise than acknowledged, and the restart's log.
fn acknowledged_then_killed(
    img: &Path,
    sock: &Path,
    log_args: &[&str],
    prepare: impl FnOnce(&mut Client, &mut BlockModel),
    work: impl FnOnce(&mut Client, &mut BlockModel),
) -> (Vec<(u64, bool)>, String) {
    let mut args = vec!["--commit-interval", "3600"];
    args.extend_from_slice(log_args);
    let d = Daemon::start_image(img, sock, &args);
    let mut c = Client::connect(sock, 1);
    let mut model = BlockModel::default();
    prepare(&mut c, &mut model);
    work(&mut c, &mut model);
    drop(c);
    let _ = d.kill();
    let d = Daemon::start_image(img, sock, &args);
    let mut c = Client::connect(sock, 1);
    let bad = model.mismatches(&mut c);
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    (bad, log)
}

/// Allocating writes of every shape, all acknowledged, none flushed: 4 KiB and 64 KiB writes
/// into holes, sub-block writes into fresh and into written blocks, overwrites.
fn unflushed_writes(c: &mut Client, m: &mut BlockModel) {
    let mut rng = Rng::new(15);
    let blocks = (64 << 20) / 4096;
    let mut offs = Vec::new();
    for i in 0..300u64 {
        let off = rng.below(blocks) * 4096;
        let data = pattern(100 + i, 4096);
        assert_eq!(c.write(0, off, &data), 0);
        m.write(off, &data);
        offs.push(off);
    }
    for i in 0..20u64 {
        let off = rng.below(blocks / 16) * 65536;
        let data = pattern(1000 + i, 65536);
        assert_eq!(c.write(0, off, &data), 0);
        m.write(off, &data);
    }
    for i in 0..40u64 {
        let off = if i % 2 == 0 {
            offs[i as usize] + rng.below(8) * 512
        } else {
            rng.below(blocks * 8) * 512
        };
        let data = pattern(2000 + i, 512);
        assert_eq!(c.write(0, off, &data), 0);
        m.write(off, &data);
    }
    for i in 0..50u64 {
        let off = offs[(i * 5) as usize];
        let data = pattern(3000 + i, 4096);
        assert_eq!(c.write(0, off, &data), 0);
        m.write(off, &data);
    }
}

#[test]
fn image_acknowledged_writes_survive_sigkill_without_any_flush() {
    let s = Scratch::new("img-rlog-w");
    let (img, sock, rlog) = (s.path("disk.img"), s.path("sock"), s.path("restart.log"));
    create_image(&img, "64M");
    let rl = rlog.to_str().unwrap();
    let (bad, log) = acknowledged_then_killed(
        &img,
        &sock,
        &["--restart-log", rl],
        |_, _| {},
        unflushed_writes,
    );
    assert!(bad.is_empty(), "acknowledged blocks lost: {bad:?}\n{log}");
    assert!(log.contains("applied and committed"), "{log}");
    // A clean stop leaves no log behind.
    assert!(!rlog.exists());
    image_clean(&img);
}

#[test]
fn writeback_cache_acknowledged_writes_zeroes_and_discards_survive_sigkill() {
    // Nothing is written back before the kill (a 1-hour expiry, a cache large enough): every
    // acknowledged write lives only in the cache file, and the next serve writes it back.
    let s = Scratch::new("img-wb-kill");
    let (img, sock, rlog) = (s.path("disk.img"), s.path("sock"), s.path("restart.log"));
    create_image(&img, "64M");
    let rl = rlog.to_str().unwrap();
    let args = [
        "--restart-log",
        rl,
        "--cache",
        "writeback",
        "--dirty-expire",
        "3600000",
    ];
    let (bad, log) = acknowledged_then_killed(&img, &sock, &args, |_, _| {}, unflushed_writes);
    assert!(bad.is_empty(), "acknowledged blocks lost: {bad:?}\n{log}");
    assert!(
        log.contains("page(s) a killed daemon left written back"),
        "{log}"
    );
    image_clean(&img);
    // A clean stop leaves no cache file behind.
    assert!(!s.path("restart.wbcache").exists());
    let (bad, log) = acknowledged_then_killed(
        &img,
        &sock,
        &args,
        flushed_data,
        unflushed_zeroes_and_discards,
    );
    assert!(bad.is_empty(), "acknowledged zeroing lost: {bad:?}\n{log}");
    image_clean(&img);
    // And a restart in another cache mode writes the pages back too (on a fresh image: the
    // model knows nothing of the data above).
    std::fs::remove_file(&img).unwrap();
    create_image(&img, "64M");
    let mut none = args.to_vec();
    none[3] = "none";
    let d = Daemon::start_image(&img, &sock, &args);
    let mut c = Client::connect(&sock, 1);
    let mut m = BlockModel::default();
    unflushed_writes(&mut c, &mut m);
    drop(c);
    let _ = d.kill();
    assert!(s.path("restart.wbcache").exists());
    let d = Daemon::start_image(&img, &sock, &none);
    let mut c = Client::connect(&sock, 1);
    let bad = m.mismatches(&mut c);
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(
        bad.is_empty(),
        "after a restart with --cache none: {bad:?}\n{log}"
    );
    assert!(
        log.contains("page(s) a killed daemon left written back"),
        "{log}"
    );
    image_clean(&img);
}

#[test]
fn writeback_cache_without_a_file_loses_unflushed_writes_on_sigkill() {
    // The control: without a restart log there is no cache file, and the kill loses data.
    let s = Scratch::new("img-wb-none");
    let (img, sock) = (s.path("disk.img"), s.path("sock"));
    create_image(&img, "64M");
    let (bad, log) = acknowledged_then_killed(
        &img,
        &sock,
        &[
            "--restart-log",
            "none",
            "--cache",
            "writeback",
            "--dirty-expire",
            "3600000",
        ],
        |_, _| {},
        unflushed_writes,
    );
    assert!(
        bad.iter().any(|&(_, zero)| zero),
        "no acknowledged block was lost without the cache file: {bad:?}\n{log}"
    );
    image_clean(&img);
}

#[test]
fn image_without_a_restart_log_sigkill_loses_acknowledged_writes() {
    // The control: the test above sees the loss it guards against.
    let s = Scratch::new("img-rlog-none");
    let (img, sock) = (s.path("disk.img"), s.path("sock"));
    create_image(&img, "64M");
    let (bad, log) = acknowledged_then_killed(
        &img,
        &sock,
        &["--restart-log", "none"],
        |_, _| {},
        unflushed_writes,
    );
    assert!(
        bad.iter().any(|&(_, zero)| zero),
        "no acknowledged block read back as zeroes without the log: {bad:?}\n{log}"
    );
    image_clean(&img);
}

/// Data over the first 16 MiB, flushed; then WRITE_ZEROES (with and without unmap, partial
/// blocks included) and DISCARDs over it, acknowledged, not flushed.
fn flushed_data(c: &mut Client, m: &mut BlockModel) {
    for i in 0..64u64 {
        let off = i * 256 * 1024;
        let data = pattern(500 + i, 128 * 1024);
        assert_eq!(c.write(0, off, &data), 0);
        m.write(off, &data);
    }
    assert_eq!(c.flush(0), 0);
}

fn unflushed_zeroes_and_discards(c: &mut Client, m: &mut BlockModel) {
    for i in 0..64u64 {
        let base = i * 256 * 1024;
        match i % 4 {
            0 => {
                assert_eq!(c.write_zeroes(0, base + 8192, 32768, false), 0);
                m.zero(base + 8192, 32768);
            }
            1 => {
                // Partial blocks at both ends: written zeroes there, unwritten between.
                assert_eq!(c.write_zeroes(0, base + 1536, 20480, false), 0);
                m.zero(base + 1536, 20480);
            }
            2 => {
                assert_eq!(c.write_zeroes(0, base + 4096, 65536, true), 0);
                m.zero(base + 4096, 65536);
            }
            _ => {
                assert_eq!(c.discard(0, base, 131072), 0);
                m.zero(base, 131072);
            }
        }
    }
}

#[test]
fn image_acknowledged_write_zeroes_and_discards_survive_sigkill_without_any_flush() {
    let s = Scratch::new("img-rlog-z");
    let (img, sock, rlog) = (s.path("disk.img"), s.path("sock"), s.path("restart.log"));
    create_image(&img, "64M");
    let rl = rlog.to_str().unwrap();
    let (bad, log) = acknowledged_then_killed(
        &img,
        &sock,
        &["--restart-log", rl],
        flushed_data,
        unflushed_zeroes_and_discards,
    );
    assert!(bad.is_empty(), "acknowledged zeroing lost: {bad:?}\n{log}");
    assert!(log.contains("applied and committed"), "{log}");
    image_clean(&img);
    // The control: without the log, zeroed blocks show their old data again.
    let (bad, log) = acknowledged_then_killed(
        &img,
        &sock,
        &["--restart-log", "none"],
        flushed_data,
        unflushed_zeroes_and_discards,
    );
    assert!(
        bad.iter().any(|&(_, zero)| !zero),
        "without the log every zeroing survived the kill: {bad:?}\n{log}"
    );
    image_clean(&img);
}

#[test]
fn image_a_restart_log_of_another_image_or_garbage_is_ignored() {
    let s = Scratch::new("img-rlog-bad");
    let (img, other, sock, rlog) = (
        s.path("disk.img"),
        s.path("other.img"),
        s.path("sock"),
        s.path("restart.log"),
    );
    create_image(&img, "64M");
    create_image(&other, "64M");
    let rl = rlog.to_str().unwrap();
    // A log left by a killed daemon on the other image.
    let d = Daemon::start_image(
        &other,
        &sock,
        &["--commit-interval", "3600", "--restart-log", rl],
    );
    let mut c = Client::connect(&sock, 1);
    assert_eq!(c.write(0, 0, &pattern(1, 4096)), 0);
    drop(c);
    let _ = d.kill();
    assert!(fs::metadata(&rlog).unwrap().len() > 0);
    let d = Daemon::start_image(&img, &sock, &["--restart-log", rl]);
    let mut c = Client::connect(&sock, 1);
    assert_eq!(c.read(0, 0, 4096).unwrap(), vec![0u8; 4096]);
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("belongs to another image"), "{log}");
    // Garbage: a warning, and the daemon serves.
    fs::write(
        &rlog,
        b"not a restart log at all, only bytes, and more than a header of them",
    )
    .unwrap();
    let d = Daemon::start_image(&img, &sock, &["--restart-log", rl]);
    let mut c = Client::connect(&sock, 1);
    assert_eq!(c.read(0, 0, 4096).unwrap(), vec![0u8; 4096]);
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("not a restart log"), "{log}");
    image_clean(&img);
}

// ---------------------------------------------------------------------------------------------
// A restart log larger than one transaction of the journal.

/// A 160 GiB disk with the smallest journal `create` allows (4 MiB: transactions of at most
/// ~1,000 log blocks), and a restart log such as a killed daemon could have left on it: a
/// written run of 4 blocks in each of the disk's 1,280 block groups, their data in the image
/// already (as the killed daemon wrote it), then zeroings and punches of some of them. Applied
/// in one transaction, the records dirty ~1,300 bitmaps and descriptor blocks: more than the
/// journal holds. Returns the blocks as they must read afterwards and the number of records.
fn scattered_restart_log(img: &Path, rlog: &Path) -> (BlockModel, usize) {
    use extblk::restart_log::format::{self, Change, Header, Record};
    let out = extblk()
        .args(["create", "--size", "160G", "--journal-size", "4M"])
        .arg(img)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let io = std::sync::Arc::new(extblk::io::FileIo::open(img, true).unwrap());
    let image =
        extblk::image::Image::open(io, extblk::image::OpenOptions { read_only: true }).unwrap();
    let sb = image.superblock();
    let (uuid, session) = (sb.uuid, sb.mnt_count);
    let tid = image.recovery().first_missing_tid;
    let data_start = image.allocator().data_start();
    let disk_blocks = image.disk_blocks();
    drop(image);
    let f = OpenOptions::new().write(true).open(img).unwrap();
    let mut model = BlockModel::default();
    let mut changes: Vec<Change> = Vec::new();
    let mut later: Vec<(usize, Change)> = Vec::new();
    let groups = disk_blocks / 32768;
    for g in 0..groups {
        let lblk = g * 32768 + 64 + (g % 7) * 8;
        let pblk = data_start + lblk;
        let data = pattern(70_000 + g, 4 * 4096);
        f.write_all_at(&data, pblk * 4096).unwrap();
        model.write(lblk * 4096, &data);
        changes.push(Change::Written {
            lblk: lblk as u32,
            len: 4,
            pblk,
        });
        // Some are zeroed or punched a few records later (in the same chunk or the next).
        if g % 5 == 0 {
            later.push((
                changes.len() + 3,
                Change::Zero {
                    lblk: lblk as u32 + 1,
                    len: 1,
                },
            ));
            model.zero((lblk + 1) * 4096, 4096);
        }
        if g % 7 == 3 {
            later.push((
                changes.len() + 40,
                Change::Punch {
                    lblk: lblk as u32 + 2,
                    len: 2,
                },
            ));
            model.zero((lblk + 2) * 4096, 2 * 4096);
        }
        while let Some(&(at, c)) = later.first() {
            if at > changes.len() {
                break;
            }
            changes.push(c);
            later.remove(0);
        }
    }
    changes.extend(later.into_iter().map(|(_, c)| c));
    let header = Header {
        uuid,
        session,
        base_tid: tid,
        boot_id: format::boot_id(),
    };
    let records: Vec<Record> = changes
        .iter()
        .map(|&change| Record { tid, change })
        .collect();
    let mut bytes = format::encode_header(&header).to_vec();
    bytes.extend(format::encode_records(
        format::record_seed(&header),
        &records,
    ));
    fs::write(rlog, bytes).unwrap();
    (model, records.len())
}

/// Every `"<what> <n>"` in `log`, in order (`"applying 12 change(s)"` → 12).
fn numbers_after(log: &str, what: &str) -> Vec<u64> {
    log.match_indices(what)
        .filter_map(|(i, _)| {
            log[i + what.len()..]
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok())
        })
        .collect()
}

#[test]
fn image_a_restart_log_larger_than_a_transaction_is_applied_in_chunks() {
    let s = Scratch::new("img-rlog-chunks");
    let (img, sock, rlog) = (s.path("disk.img"), s.path("sock"), s.path("restart.log"));
    let (model, records) = scattered_restart_log(&img, &rlog);
    let d = Daemon::start_image(&img, &sock, &["--restart-log", rlog.to_str().unwrap()]);
    let mut c = Client::connect(&sock, 1);
    let bad = model.mismatches(&mut c);
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(bad.is_empty(), "blocks read back otherwise: {bad:?}\n{log}");
    assert_eq!(
        numbers_after(&log, "applying "),
        vec![records as u64],
        "{log}"
    );
    let tx = numbers_after(&log, "applied and committed in ");
    assert!(
        tx.len() == 1 && tx[0] > 1,
        "not applied in several transactions: {tx:?}\n{log}"
    );
    assert!(log.contains(" 0 left as they were"), "{log}");
    image_clean(&img);
}

/// `extblk serve` that the `testing` build's failpoint `EXTBLK_REAPPLY_EXIT_AFTER=<at>` kills
/// (SIGKILL, as a crash of the daemon) while it applies the restart log; returns its log.
fn serve_killed_while_applying(img: &Path, sock: &Path, rlog: &Path, at: &str) -> String {
    let _ = fs::remove_file(sock);
    let mut cmd = extblk();
    cmd.env("EXTBLK_REAPPLY_EXIT_AFTER", at)
        .arg("serve")
        .arg("--socket")
        .arg(sock)
        .arg("--restart-log")
        .arg(rlog)
        .arg(img);
    let mut d = spawn_logged(cmd);
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(st) = d.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon was not killed at {at}: {}",
            d.read_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = d.read_log();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "not killed at {at} ({status}):\n{log}"
    );
    assert!(!sock.exists(), "served before the log was applied:\n{log}");
    log
}

/// `extblk check --output json` of `img` with `rlog`: its JSON.
fn check_json(img: &Path, rlog: &Path) -> serde_json::Value {
    let out = extblk()
        .args(["check", "--output", "json", "--restart-log"])
        .arg(rlog)
        .arg(img)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn image_a_kill_while_the_restart_log_is_applied_loses_nothing() {
    let s = Scratch::new("img-rlog-kill");
    let (img, sock, rlog) = (s.path("disk.img"), s.path("sock"), s.path("restart.log"));
    let (model, records) = scattered_restart_log(&img, &rlog);
    // Killed right after the second chunk's commit: the log, rewritten before that commit,
    // names exactly what is left.
    let log = serve_killed_while_applying(&img, &sock, &rlog, "2");
    assert_eq!(
        numbers_after(&log, "applying "),
        vec![records as u64],
        "{log}"
    );
    assert_eq!(numbers_after(&log, ": chunk "), vec![1, 2], "{log}");
    let chunked: u64 = ["chunk 1: ", "chunk 2: "]
        .iter()
        .map(|c| numbers_after(&log, c)[0])
        .sum();
    let left = records as u64 - chunked;
    // A read-only check sees a consistent image and the log's remainder, and changes nothing.
    let j = check_json(&img, &rlog);
    assert_eq!(j["problems"], serde_json::json!([]), "{j}");
    assert_eq!(j["restart_log"]["pending_records"], left, "{j}");
    // Killed after the second chunk's log rewrite, before its commit: that chunk is applied
    // again by the next open, the first is not.
    let log = serve_killed_while_applying(&img, &sock, &rlog, "rewrite:2");
    assert_eq!(numbers_after(&log, "applying "), vec![left], "{log}");
    assert_eq!(numbers_after(&log, ": chunk "), vec![1], "{log}");
    let left = left - numbers_after(&log, "chunk 1: ")[0];
    assert_eq!(
        check_json(&img, &rlog)["restart_log"]["pending_records"],
        left
    );
    // Killed after the first chunk's log rewrite, before anything of this run committed.
    let log = serve_killed_while_applying(&img, &sock, &rlog, "rewrite:1");
    assert_eq!(numbers_after(&log, "applying "), vec![left], "{log}");
    // Killed once every chunk is committed, before the log starts over (the last chunk is
    // committed under the tids of the previous rewrite, not a new one).
    let log = serve_killed_while_applying(&img, &sock, &rlog, "done");
    assert_eq!(numbers_after(&log, "applying "), vec![left], "{log}");
    assert!(numbers_after(&log, ": chunk ").len() > 1, "{log}");
    assert_eq!(check_json(&img, &rlog)["restart_log"]["pending_records"], 0);
    // Nothing left to apply; serving.
    let d = Daemon::start_image(&img, &sock, &["--restart-log", rlog.to_str().unwrap()]);
    let mut c = Client::connect(&sock, 1);
    let bad = model.mismatches(&mut c);
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(numbers_after(&log, "applying ").is_empty(), "{log}");
    assert!(bad.is_empty(), "blocks read back otherwise: {bad:?}\n{log}");
    image_clean(&img);
}

#[test]
fn image_check_repair_applies_a_pending_restart_log() {
    let s = Scratch::new("img-rlog-repair");
    let (img, sock, rlog) = (s.path("disk.img"), s.path("sock"), s.path("restart.log"));
    create_image(&img, "64M");
    let rl = rlog.to_str().unwrap();
    let args = ["--commit-interval", "3600", "--restart-log", rl];
    // A daemon killed with acknowledged writes, zeroings and discards its journal lacks.
    let d = Daemon::start_image(&img, &sock, &args);
    let mut c = Client::connect(&sock, 1);
    let mut model = BlockModel::default();
    flushed_data(&mut c, &mut model);
    unflushed_zeroes_and_discards(&mut c, &mut model);
    unflushed_writes(&mut c, &mut model);
    drop(c);
    let _ = d.kill();
    // Plain check: the image is consistent; it tells of the log, and leaves it as it is.
    let before = fs::read(&rlog).unwrap();
    let out = extblk()
        .args(["check", "--restart-log", rl])
        .arg(&img)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(text.contains("that the journal lacks"), "{text}");
    let j = check_json(&img, &rlog);
    let pending = j["restart_log"]["pending_records"].as_u64().unwrap();
    assert!(pending > 300, "{j}");
    assert!(text.contains(&format!(" {pending} change(s)")), "{text}");
    assert_eq!(fs::read(&rlog).unwrap(), before);
    // The repair applies it as a daemon's start would, and removes it.
    let out = extblk()
        .args(["check", "--repair", "--restart-log", rl])
        .arg(&img)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        text.contains(&format!(
            "{pending} change(s) the journal did not hold applied and committed"
        )),
        "{text}"
    );
    assert!(!rlog.exists(), "{text}");
    // Served without any log, everything acknowledged reads back.
    let d = Daemon::start_image(&img, &sock, &["--restart-log", "none"]);
    let mut c = Client::connect(&sock, 1);
    let bad = model.mismatches(&mut c);
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(bad.is_empty(), "acknowledged blocks lost: {bad:?}\n{text}");
    image_clean(&img);

    // `--restart-log none`: the repair leaves the log, stale from then on.
    let d = Daemon::start_image(&img, &sock, &args);
    let mut c = Client::connect(&sock, 1);
    // (Writes would all be overwrites by now, which the log does not need.)
    unflushed_zeroes_and_discards(&mut c, &mut BlockModel::default());
    drop(c);
    let _ = d.kill();
    assert!(fs::metadata(&rlog).unwrap().len() > 56);
    let out = extblk()
        .args(["check", "--repair", "--restart-log", "none"])
        .arg(&img)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(text.contains("not looked at (--restart-log none"), "{text}");
    assert!(rlog.exists());
    let j = check_json(&img, &rlog);
    assert_eq!(j["restart_log"]["pending_records"], 0, "{j}");
    assert!(
        j["restart_log"]["ignored"]
            .as_str()
            .is_some_and(|w| w.contains("opened read-write since")),
        "{j}"
    );
    let d = Daemon::start_image(&img, &sock, &args);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("opened read-write since"), "{log}");
    image_clean(&img);
}

/// `extblk ctl SOCKET ARGS...`: its exit status and stdout.
/// `extblk info --output json IMAGE`.
fn image_info(img: &Path) -> serde_json::Value {
    let out = extblk()
        .args(["info", "--output", "json"])
        .arg(img)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

fn ctl(socket: &Path, args: &[&str]) -> (i32, String) {
    let out = extblk().arg("ctl").arg(socket).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn ctl_json(socket: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.extend(["--output", "json"]);
    let (code, out) = ctl(socket, &a);
    assert_eq!(code, 0, "ctl {args:?}: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("ctl {args:?}: {e}: {out}"))
}

/// Issue 17: the control socket answers `info` and `stats` (typed counters, per-queue request
/// counts and latency histograms, a `--watch` line per interval), refuses what is not the
/// protocol without harm, and `quiesce` really holds the guest's requests, with the image a
/// consistent, complete copy meanwhile, until `resume` lets them through.
#[test]
fn the_control_socket_reports_stats_and_quiesce_holds_requests_until_resume() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixStream;
    let s = Scratch::new("control");
    let (img, sock, cs) = (s.path("disk.img"), s.path("sock"), s.path("ctl.sock"));
    create_image(&img, "16M");
    let d = Daemon::start_image(
        &img,
        &sock,
        &["--control", cs.to_str().unwrap(), "--queues", "2"],
    );
    d.wait_socket(&cs);
    assert_eq!(
        fs::metadata(&cs).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let mut c = Client::connect(&sock, 2);
    for b in 0..20u64 {
        assert_eq!(c.write((b % 2) as usize, b * 4096, &pattern(b, 4096)), 0);
    }
    assert_eq!(c.flush(0), 0);

    let info = ctl_json(&cs, &["info"]);
    assert_eq!(info["capacity"], 16u64 << 20, "{info}");
    assert_eq!(info["num_queues"], 2, "{info}");
    assert_eq!(info["format"], "extblk image", "{info}");
    assert_eq!(info["paused"], false, "{info}");
    let stats = ctl_json(&cs, &["stats"]);
    assert_eq!(stats["device"]["writes"], 20, "{stats}");
    assert_eq!(stats["device"]["flushes"], 1, "{stats}");
    assert!(stats["engine"].is_object(), "{stats}");
    let queues = stats["queues"].as_array().unwrap();
    assert_eq!(queues.len(), 2, "{stats}");
    for (i, q) in queues.iter().enumerate() {
        let completed = q["completed"].as_u64().unwrap();
        let in_hist: u64 = q["latency_us"]["counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap())
            .sum();
        // Queue 0: 10 writes and the flush; queue 1: 10 writes.
        assert_eq!(completed, if i == 0 { 11 } else { 10 }, "{stats}");
        assert_eq!(
            in_hist, completed,
            "every completion is in the histogram: {stats}"
        );
    }
    let (code, text) = ctl(&cs, &["stats"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("queue 1: 10 completed"), "{text}");
    let (code, watch) = ctl(
        &cs,
        &["stats", "--watch", "--interval", "0.2", "--count", "2"],
    );
    assert_eq!(code, 0, "{watch}");
    assert_eq!(watch.lines().count(), 3, "a header and two lines: {watch}");
    assert!(watch.lines().next().unwrap().contains("r/s"), "{watch}");

    // Not the protocol: an error reply, the connection closed, the daemon unharmed.
    let mut raw = UnixStream::connect(&cs).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    raw.write_all(b"{\"command\":\"format\"}\n{\"command\":\"info\"}\n")
        .unwrap();
    let mut lines = BufReader::new(raw).lines();
    let reply: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(reply["ok"], false, "{reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("bad request"),
        "{reply}"
    );
    assert!(
        lines.next().is_none(),
        "the connection ends after a bad request"
    );
    let mut long = UnixStream::connect(&cs).unwrap();
    long.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    long.write_all(&vec![b'x'; 10_000]).unwrap();
    let mut lines = BufReader::new(long).lines();
    let reply: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert!(
        reply["error"].as_str().unwrap().contains("longer"),
        "{reply}"
    );
    assert_eq!(ctl(&cs, &["flush"]).0, 0);

    // Quiesce: a write the guest sends now is not taken until resume.
    let (code, out) = ctl(&cs, &["quiesce"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(ctl_json(&cs, &["info"])["paused"], true);
    // Meanwhile the image is a consistent copy holding every completed write.
    let copy = s.path("copy.img");
    fs::copy(&img, &copy).unwrap();
    let out = extblk()
        .args(["check", "--restart-log", "none"])
        .arg(&copy)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let raw_copy = s.path("copy.raw");
    let out = extblk()
        .args(["convert", "-O", "raw"])
        .arg(&copy)
        .arg(&raw_copy)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = fs::read(&raw_copy).unwrap();
    for b in 0..20usize {
        assert!(
            bytes[b * 4096..(b + 1) * 4096] == pattern(b as u64, 4096)[..],
            "block {b}"
        );
    }
    c.buf(0, 4096).copy_from_slice(&pattern(99, 4096));
    let addr = c.region.addr as *const u8;
    c.queues[1].write(30 * 4096, addr, 4096, 0, ReqFlags::empty());
    let mut done = [MaybeUninit::<Completion>::uninit()];
    assert_eq!(c.queues[1].do_io(&mut done, 0, None, None).unwrap(), 0);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        c.queues[1].do_io(&mut done, 0, None, None).unwrap(),
        0,
        "a request completed while quiesced"
    );
    let held = ctl_json(&cs, &["stats"]);
    assert_eq!(held["device"]["writes"], 20, "taken while quiesced: {held}");
    assert_eq!(held["inflight"], 0, "{held}");
    let (code, out) = ctl(&cs, &["resume"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(Client::wait(&mut c.queues[1]), 0);
    assert_eq!(c.read(0, 30 * 4096, 4096).unwrap(), pattern(99, 4096));
    assert_eq!(ctl_json(&cs, &["info"])["paused"], false);

    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(!cs.exists(), "control socket left behind");
    let (code, out) = ctl(&cs, &["info"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("cannot connect"), "{out}");
    image_clean(&img);
}

// ---------------------------------------------------------------------------------------------
// Confinement (`serve --sandbox`, issue 17).

/// One request line on the control socket at `cs`, and its reply.
fn control_request(cs: &Path, request: &str) -> serde_json::Value {
    use std::io::{BufRead, BufReader};
    let mut s = std::os::unix::net::UnixStream::connect(cs).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    s.write_all(b"\n").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{request}: {e}: {line}"))
}

/// The kernel log, or `None` where this process may not read it.
fn kernel_log() -> Option<String> {
    let out = Command::new("dmesg").output().ok()?;
    if !out.status.success() || out.stdout.is_empty() {
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The seccomp records (audit `type=1326`) of process `pid` in the kernel log `log`: the
/// system call number and the thread's name of each.
fn seccomp_records(log: &str, pid: u32) -> Vec<(u64, String)> {
    let pid_field = format!(" pid={pid} ");
    log.lines()
        .filter(|l| l.contains("type=1326") && l.contains(&pid_field))
        .map(|l| {
            let field = |name: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .unwrap_or("")
                    .trim_matches('"')
                    .to_string()
            };
            (
                field("syscall=").parse().unwrap_or(u64::MAX),
                field("comm="),
            )
        })
        .collect()
}

/// Every path a running daemon takes, on the daemon `d` serving `sock` with its control socket
/// at `cs` (none for raw): reads, overwrites, allocating writes, flush, discard,
/// write-zeroes with and without unmap, a request spanning more than IOV_MAX segments' worth
/// of data, the control socket's every command (and a bad one; `resize` grows an image online),
/// SIGUSR1, a frontend leaving and another connecting.
fn exercise_every_path(d: &Daemon, sock: &Path, cs: Option<&Path>) {
    for round in 0..2u64 {
        let mut c = Client::connect(sock, 2);
        for b in 0..64u64 {
            let q = (b % 2) as usize;
            // Fresh blocks first (allocating), then the same ones again (overwrites).
            assert_eq!(c.write(q, b * 4096, &pattern(b + round, 4096)), 0);
            assert_eq!(c.write(q, b * 4096, &pattern(b + round + 1, 4096)), 0);
            assert_eq!(
                c.read(q, b * 4096, 4096).unwrap(),
                pattern(b + round + 1, 4096)
            );
        }
        // Unaligned to 4 KiB: the buffered descriptor instead of the O_DIRECT one.
        assert_eq!(c.write(0, 512, &pattern(7, 1024)), 0);
        assert_eq!(c.read(1, 512, 1024).unwrap(), pattern(7, 1024));
        assert_eq!(c.flush(0), 0);
        // Discard and write-zeroes of written data (punched after the commit), not of holes.
        for mib in 8..11u64 {
            assert_eq!(
                c.write((mib % 2) as usize, mib << 20, &pattern(mib, 1 << 20)),
                0
            );
        }
        assert_eq!(c.flush(1), 0);
        assert_eq!(c.discard(1, 8 << 20, 1 << 20), 0);
        assert_eq!(c.write_zeroes(0, 9 << 20, 1 << 20, true), 0);
        assert_eq!(c.write_zeroes(1, 10 << 20, 1 << 20, false), 0);
        assert_eq!(c.read(0, 9 << 20, 4096).unwrap(), vec![0; 4096]);
        // A large write (1 MiB) in one request, and a read of it back.
        let big = pattern(11, 1 << 20);
        assert_eq!(c.write(1, 12 << 20, &big), 0);
        assert_eq!(c.read(0, 12 << 20, 1 << 20).unwrap(), big);
        assert_eq!(c.flush(1), 0);
        if let Some(cs) = cs {
            for args in [
                &["info"][..],
                &["stats"],
                &["flush"],
                &["quiesce"],
                &["resume"],
                &["stats", "--watch", "--interval", "0.1", "--count", "2"],
            ] {
                let (code, out) = ctl(cs, args);
                assert_eq!(code, 0, "ctl {args:?}: {out}");
            }
            let bad = control_request(cs, r#"{"command":"format"}"#);
            assert_eq!(bad["ok"], false, "{bad}");
            // An online grow (an image) or its refusal (raw).
            let image = ctl_json(cs, &["info"])["format"] == "extblk image";
            let (code, out) = ctl(cs, &["resize", "+4M"]);
            if image {
                assert_eq!(code, 0, "ctl resize: {out}");
            } else {
                assert!(
                    code == 1 && out.contains("not supported"),
                    "ctl resize: {out}"
                );
            }
        }
        // SIGUSR1: the counters in the log.
        let before = d.read_log().matches("counters:").count();
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(d.child.id() as i32, libc::SIGUSR1) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while d.read_log().matches("counters:").count() == before {
            assert!(Instant::now() < deadline, "no counters after SIGUSR1");
            std::thread::sleep(Duration::from_millis(10));
        }
        // The frontend leaves; the next round connects again.
        drop(c);
    }
    // Let the commit interval's timer fire once with nothing to do, and the log drop records.
    std::thread::sleep(Duration::from_millis(1500));
}

/// Issue 17: the seccomp allow list is derived, not guessed. Under `--sandbox log` the filter
/// lets a call outside the list through and the kernel logs it; after every path the daemon
/// has (an image and a raw file, the control socket, signals, a reconnect, shutdown) the kernel
/// log must hold no record of the daemon. A record names the call (`syscall=N`: see `ausyscall
/// N` or the kernel's syscall table) and the thread (`comm=`).
#[test]
fn the_sandbox_log_mode_sees_no_call_outside_the_list() {
    if kernel_log().is_none() {
        common::skip_or_fail("the kernel log (dmesg) cannot be read here");
        return;
    }
    let s = Scratch::new("sandbox-log");
    let (img, raw, sock, cs) = (
        s.path("disk.img"),
        s.path("disk.raw"),
        s.path("sock"),
        s.path("ctl.sock"),
    );
    create_image(&img, "64M");
    make_image(&raw, 64 << 20);
    let mut pids = Vec::new();
    for (path, extra) in [
        (
            &img,
            vec![
                "--sandbox",
                "log",
                "--control",
                cs.to_str().unwrap(),
                "--queues",
                "2",
                "--commit-interval",
                "1",
            ],
        ),
        (
            &raw,
            vec![
                "--sandbox",
                "log",
                "--format=raw",
                "--control",
                cs.to_str().unwrap(),
                "--queues",
                "2",
            ],
        ),
    ] {
        let d = Daemon::start_image(path, &sock, &extra);
        d.wait_socket(&cs);
        let pid = d.child.id();
        exercise_every_path(&d, &sock, Some(&cs));
        let (status, log) = d.stop();
        assert!(status.success(), "{log}");
        assert!(log.contains("seccomp filter on every thread"), "{log}");
        // A file Landlock keeps out shows as an error or a warning of the path that needed it.
        let complaints: Vec<&str> = log
            .lines()
            .filter(|l| {
                (l.contains(" ERROR ") || l.contains(" WARN ")) && !l.contains("--sandbox log")
            })
            .collect();
        assert!(complaints.is_empty(), "{log}");
        pids.push(pid);
    }
    // The kernel writes its records as the calls happen; the daemons have exited.
    let klog = kernel_log().unwrap();
    for pid in pids {
        let records = seccomp_records(&klog, pid);
        let mut calls: Vec<String> = records
            .iter()
            .map(|(nr, comm)| format!("syscall={nr} comm={comm}"))
            .collect();
        calls.sort();
        calls.dedup();
        assert!(
            calls.is_empty(),
            "daemon {pid} made calls outside the allow list:\n{}",
            calls.join("\n")
        );
    }
    image_clean(&img);
}

/// The lines of /proc/<pid>/task/*/status, one string per thread.
fn thread_status(pid: u32) -> Vec<String> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| fs::read_to_string(t.unwrap().path().join("status")).ok())
        .collect()
}

fn status_field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {name} in {status}"))
}

/// Issue 17: `serve` is confined by default. Every thread runs under the seccomp filter
/// (`Seccomp: 2`) with no_new_privs and no capability; a file outside the Landlock rules
/// cannot be opened and an AF_INET socket cannot be made (the `testing` build's `test-open` and
/// `test-socket` control requests try, as code that took the daemon over would); with
/// `--sandbox none` both work and nothing is filtered.
#[test]
fn the_sandbox_denies_what_the_daemon_does_not_need() {
    let s = Scratch::new("sandbox");
    let (img, sock, cs) = (s.path("disk.img"), s.path("sock"), s.path("ctl.sock"));
    create_image(&img, "16M");
    let d = Daemon::start_image(&img, &sock, &["--control", cs.to_str().unwrap()]);
    d.wait_socket(&cs);
    // A frontend connected: the vhost-user threads exist too.
    let mut c = Client::connect(&sock, 1);
    assert_eq!(c.write(0, 0, &pattern(1, 4096)), 0);
    let threads = thread_status(d.child.id());
    assert!(threads.len() >= 5, "{threads:?}");
    for t in &threads {
        let name = status_field(t, "Name:");
        assert_eq!(status_field(t, "Seccomp:"), "2", "{name}");
        assert_eq!(status_field(t, "NoNewPrivs:"), "1", "{name}");
        assert_eq!(status_field(t, "CapEff:"), "0000000000000000", "{name}");
        assert_eq!(status_field(t, "CapPrm:"), "0000000000000000", "{name}");
    }
    let log = d.read_log();
    let open = control_request(&cs, r#"{"command":"test-open","path":"/etc/passwd"}"#);
    assert_eq!(open["ok"], false, "{open}");
    if log.contains("landlock ABI not supported") {
        common::skip_or_fail("no Landlock in this kernel: file access is not confined");
    } else {
        assert!(
            open["error"]
                .as_str()
                .unwrap()
                .contains("Permission denied"),
            "{open}"
        );
    }
    // The image itself stays reachable (and the socket directory is the scratch directory).
    let own = control_request(
        &cs,
        &format!(r#"{{"command":"test-open","path":"{}"}}"#, img.display()),
    );
    assert_eq!(own["ok"], true, "{own}");
    let inet = control_request(&cs, r#"{"command":"test-socket"}"#);
    assert_eq!(inet["ok"], false, "{inet}");
    assert!(
        inet["error"]
            .as_str()
            .unwrap()
            .contains("Operation not permitted"),
        "{inet}"
    );
    // Denied calls hurt nothing: the disk is served and the daemon ends cleanly.
    assert_eq!(c.read(0, 0, 4096).unwrap(), pattern(1, 4096));
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(!sock.exists() && !cs.exists(), "sockets left behind: {log}");
    image_clean(&img);

    let d = Daemon::start_image(
        &img,
        &sock,
        &["--control", cs.to_str().unwrap(), "--sandbox", "none"],
    );
    d.wait_socket(&cs);
    for t in thread_status(d.child.id()) {
        assert_eq!(status_field(&t, "Seccomp:"), "0", "{t}");
    }
    let open = control_request(&cs, r#"{"command":"test-open","path":"/etc/passwd"}"#);
    assert_eq!(open["ok"], true, "{open}");
    let inet = control_request(&cs, r#"{"command":"test-socket"}"#);
    assert_eq!(inet["ok"], true, "{inet}");
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

/// `ctl resize` through the write-back cache, then a kill with dirty pages on both sides of
/// the old end: the cache file names the new size, so the restart writes them all back.
#[test]
fn writeback_cache_a_resize_then_a_kill_loses_nothing() {
    let s = Scratch::new("wb-resize");
    let (img, sock, cs) = (s.path("disk.img"), s.path("sock"), s.path("ctl.sock"));
    create_image(&img, "16M");
    let rl = s.path("restart.log");
    let args = [
        "--control",
        cs.to_str().unwrap(),
        "--restart-log",
        rl.to_str().unwrap(),
        "--cache",
        "writeback",
        "--dirty-expire",
        "3600000",
    ];
    let d = Daemon::start_image(&img, &sock, &args);
    d.wait_socket(&cs);
    let mut c = Client::connect(&sock, 1);
    assert_eq!(c.write(0, 4096, &pattern(1, 4096)), 0);
    let r = ctl_json(&cs, &["resize", "+16M"]);
    assert_eq!(r["capacity"], 32u64 << 20, "{r}");
    drop(c);
    let mut c = Client::connect(&sock, 1);
    let high = (32 << 20) - 8192;
    assert_eq!(c.write(0, 8192, &pattern(2, 4096)), 0);
    assert_eq!(c.write(0, high, &pattern(3, 4096)), 0);
    drop(c);
    let _ = d.kill();
    let d = Daemon::start_image(&img, &sock, &args);
    let mut c = Client::connect(&sock, 1);
    assert_eq!(c.capacity(), 32 << 20);
    assert_eq!(c.read(0, 4096, 4096).unwrap(), pattern(1, 4096));
    assert_eq!(c.read(0, 8192, 4096).unwrap(), pattern(2, 4096));
    assert_eq!(c.read(0, high, 4096).unwrap(), pattern(3, 4096));
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("page(s) a killed daemon left written back"),
        "{log}"
    );
    image_clean(&img);
}

/// Issue 17: `ctl resize` grows a served disk while a client is connected (libblkio, which
/// keeps no backend channel, sees the new size at its next connection), refuses an online
/// shrink, and leaves an image e2fsck calls clean, with every write in place.
#[test]
fn ctl_resize_grows_a_served_disk_and_refuses_to_shrink_it() {
    let s = Scratch::new("ctl-resize");
    let (img, sock, cs) = (s.path("disk.img"), s.path("sock"), s.path("ctl.sock"));
    create_image(&img, "16M");
    let d = Daemon::start_image(&img, &sock, &["--control", cs.to_str().unwrap()]);
    d.wait_socket(&cs);
    let mut c = Client::connect(&sock, 1);
    assert_eq!(c.capacity(), 16 << 20);
    let last = (16 << 20) - 4096;
    assert_eq!(c.write(0, 0, &pattern(1, 4096)), 0);
    assert_eq!(c.write(0, last, &pattern(2, 4096)), 0);

    let r = ctl_json(&cs, &["resize", "+48M"]);
    assert_eq!(r["capacity"], 64u64 << 20, "{r}");
    assert_eq!(r["plan"]["old_size"], 16u64 << 20, "{r}");
    assert_eq!(r["plan"]["new_size"], 64u64 << 20, "{r}");
    assert_eq!(ctl_json(&cs, &["info"])["capacity"], 64u64 << 20);
    assert_eq!(ctl_json(&cs, &["info"])["paused"], false);
    // The connected client goes on.
    assert_eq!(c.read(0, 0, 4096).unwrap(), pattern(1, 4096));
    drop(c);
    let mut c = Client::connect(&sock, 1);
    assert_eq!(c.capacity(), 64 << 20, "a new connection sees the new size");
    let end = (64 << 20) - 4096;
    assert_eq!(c.write(0, end, &pattern(3, 4096)), 0);
    assert_eq!(c.flush(0), 0);
    assert_eq!(c.read(0, end, 4096).unwrap(), pattern(3, 4096));
    assert_eq!(c.read(0, last, 4096).unwrap(), pattern(2, 4096));
    assert_eq!(
        c.read(0, 32 << 20, 4096).unwrap(),
        vec![0u8; 4096],
        "the new part reads as zeroes"
    );

    let (code, out) = ctl(&cs, &["resize", "32M"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("only grows"), "{out}");
    let (code, out) = ctl(&cs, &["resize", "1000"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("multiple of the logical block size"), "{out}");
    assert_eq!(ctl_json(&cs, &["info"])["capacity"], 64u64 << 20);
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("resized: disk"), "{log}");
    image_clean(&img);
    let v = image_info(&img);
    assert_eq!(v["virtual_size"], 64u64 << 20, "{v}");
}
