//! The real `extblk serve` binary driven by a vhost-user frontend of our own (issue 15): the
//! `vhost` crate's frontend side for the messages, guest memory in a memfd and split rings the
//! test writes itself (`frontend/guest.rs`). No VM.
//!
//! - QEMU's and cloud-hypervisor's message sequences (`frontend/session.rs` names the source of
//!   each step), with writes that read back and the daemon's counters.
//! - Inflight I/O tracking: completions held in the daemon (`EXTBLK_HOLD_FROM`, a `testing`
//!   switch), SIGKILL, restart, reconnect with the same inflight memfd and rings: exactly the
//!   held heads come back, once each. Fresh and malformed regions. These skip (and fail under
//!   CI=true) while the daemon does not advertise INFLIGHT_SHMFD.
//! - Hostile rings: the daemon answers or stops the queue, never panics or hangs, and serves the
//!   next connection.
//!
//! Every wait has a timeout and says what it waited for.

mod common;
#[path = "frontend/daemon.rs"]
mod daemon;
#[path = "frontend/guest.rs"]
mod guest;
#[path = "frontend/session.rs"]
mod session;

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{skip_or_fail, Scratch};
use daemon::{exit_counter, Daemon, Start};
use guest::*;
use session::{inflight_queue_bytes, AddrOverride, Session};
use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;

const DISK: u64 = 16 << 20;
const QUEUE_SIZE: u16 = 128;
/// Guest RAM: 4 MiB at 0 and 4 MiB at 4 GiB, as QEMU splits RAM around the PCI hole.
const LAYOUT: &[(u64, u64)] = &[(0, 4 << 20), (1 << 32, 4 << 20)];
/// Generous for one request on an idle test machine; a daemon that lost a request never gets
/// there, and the message says which.
const WAIT: Duration = Duration::from_secs(10);
/// How long "nothing more arrives" is watched.
const QUIET: Duration = Duration::from_millis(500);

fn raw_image(s: &Scratch) -> PathBuf {
    let p = s.path("disk.raw");
    File::create(&p).unwrap().set_len(DISK).unwrap();
    p
}

fn extblk_image(s: &Scratch) -> PathBuf {
    let p = s.path("disk.img");
    let out = Command::new(env!("CARGO_BIN_EXE_extblk"))
        .args(["create", "--size", "16M"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "extblk create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    p
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Format {
    Raw,
    Extblk,
}

fn start(
    image: &Path,
    socket: &Path,
    format: Format,
    queues: u16,
    env: &[(&str, String)],
) -> Daemon {
    let q = format!("--queues={queues}");
    let mut args = vec![q.as_str(), "--queue-size=256"];
    if format == Format::Raw {
        args.push("--format=raw");
    }
    Daemon::start(
        image,
        socket,
        &Start {
            args,
            env: env.to_vec(),
        },
    )
}

/// Waits for exactly the requests `reqs` of queue `q` (any order, each once) and checks their
/// status and used length; returns the used elements.
fn complete(g: &mut Guest, reqs: &[Req], what: &str) -> Vec<Used> {
    let q = reqs[0].q;
    let used = g.wait_used(q, reqs.len(), WAIT, what);
    let want: BTreeSet<u16> = reqs.iter().map(|r| r.head).collect();
    let got: Vec<u16> = used.iter().map(|u| u.id).collect();
    let got_set: BTreeSet<u16> = got.iter().copied().collect();
    assert!(
        got.len() == reqs.len() && got_set == want,
        "{what}: used heads {got:?}, expected each of {want:?} once"
    );
    for r in reqs {
        let u = used.iter().find(|u| u.id == r.head).unwrap();
        let st = g.status(r);
        assert_eq!(st, VIRTIO_BLK_S_OK, "{what}: status of head {}", r.head);
        // A READ's used length counts the data and the status byte, a WRITE's the status.
        let data_in = if r.device_writes { r.len as u32 } else { 0 };
        assert_eq!(u.len, data_in + 1, "{what}: used length of head {}", r.head);
    }
    used
}

/// Reads `len` bytes at `sector` on queue `q` through the device and returns them.
fn read_back(g: &mut Guest, q: usize, sector: u64, len: usize) -> Vec<u8> {
    let r = g.post_read(q, sector, len);
    g.kick(q);
    complete(
        g,
        std::slice::from_ref(&r),
        &format!("READ of sector {sector}"),
    );
    g.read(r.data, len)
}

/// A fresh, well-behaved QEMU session on `socket`: one write, read back, GET_VRING_BASE. What a
/// daemon must still do after each hostile or malformed thing a test did to it.
fn normal_session(socket: &Path, queues: usize, after: &str) {
    let mut g = Guest::new(LAYOUT, queues, QUEUE_SIZE);
    let mut s = Session::qemu_connect(socket, queues, true);
    s.qemu_start(&g, None, &vec![0; queues]);
    let data = pattern(0xabc, 8192);
    let w = g.post_write(0, 2048, &data);
    g.kick(0);
    complete(
        &mut g,
        &[w],
        &format!("a normal WRITE on a new connection {after}"),
    );
    assert!(
        read_back(&mut g, 0, 2048, 8192) == data,
        "a normal READ on a new connection {after} returned other data"
    );
    let bases = s.get_bases();
    assert_eq!(bases[0], g.rings[0].avail_idx, "GET_VRING_BASE {after}");
}

/// The daemon's log must show no warning or error of its own.
fn assert_quiet_log(log: &str) {
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("panicked"))
        .collect();
    assert!(bad.is_empty(), "the daemon complained:\n{}", bad.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// 1. A QEMU-like session.

#[test]
fn qemu_sequence_two_queues_writes_read_back_on_the_other_queue() {
    let s = Scratch::new("fe-qemu");
    let (img, sock) = (raw_image(&s), s.path("sock"));
    let d = start(&img, &sock, Format::Raw, 2, &[]);
    let mut g = Guest::new(LAYOUT, 2, QUEUE_SIZE);
    let mut sess = Session::qemu_connect(&sock, 2, true);
    assert_eq!(sess.capacity(), DISK, "capacity in config space");
    let region = sess.qemu_start(&g, None, &[0, 0]);
    if region.is_none() {
        println!("note: the daemon does not advertise INFLIGHT_SHMFD; session without inflight");
    }

    // 16 writes per queue, 4 to 16 KiB, 64 KiB apart, all in flight together.
    let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
    for q in 0..2 {
        let mut reqs = Vec::new();
        for i in 0..16u64 {
            let n = q as u64 * 16 + i;
            let data = pattern(n + 1, 4096 * (1 + (i as usize % 4)));
            let sector = n * 128;
            reqs.push(g.post_write(q, sector, &data));
            writes.push((sector, data));
        }
        g.kick(q);
        complete(&mut g, &reqs, &format!("16 WRITEs on queue {q}"));
        let f = g.post_flush(q);
        g.kick(q);
        complete(&mut g, &[f], &format!("FLUSH on queue {q}"));
    }
    // Read each back on the other queue than the one that wrote it.
    for (k, (sector, data)) in writes.iter().enumerate() {
        let q = 1 - k / 16;
        let got = read_back(&mut g, q, *sector, data.len());
        assert!(
            got == *data,
            "sector {sector} read on queue {q} differs from what was written"
        );
    }
    if let Some(region) = &region {
        for q in 0..2 {
            assert!(
                region.marked(q).is_empty(),
                "queue {q}: heads {:?} still marked in flight after every request completed",
                region.marked(q)
            );
            assert_eq!(
                region.used_idx(q),
                g.used_idx(q),
                "queue {q}: the region's used_idx follows the used ring"
            );
        }
    }
    for q in 0..2 {
        // EVENT_IDX negotiated and used_event set as Linux sets it: the device must notify.
        assert!(
            g.rings[q].calls > 0,
            "queue {q}: no guest notification at all"
        );
    }
    // QEMU stopping the device: GET_VRING_BASE answers where the daemon stopped.
    let bases = sess.get_bases();
    assert_eq!(bases, vec![g.rings[0].avail_idx, g.rings[1].avail_idx]);
    drop(sess);

    let (status, log) = d.stop();
    assert!(status.success(), "exit status {status:?}:\n{log}");
    assert_eq!(exit_counter(&log, "writes"), 32, "{log}");
    assert_eq!(exit_counter(&log, "reads"), 32, "{log}");
    assert_eq!(exit_counter(&log, "flushes"), 2, "{log}");
    assert_eq!(exit_counter(&log, "errors"), 0, "{log}");
    assert_eq!(exit_counter(&log, "unsupported"), 0, "{log}");
    let bytes: u64 = writes.iter().map(|(_, d)| d.len() as u64).sum();
    assert_eq!(exit_counter(&log, "bytes_written"), bytes, "{log}");
    assert_eq!(exit_counter(&log, "bytes_read"), bytes, "{log}");
    assert_quiet_log(&log);
    // And the file holds it.
    let f = File::open(&img).unwrap();
    for (sector, data) in &writes {
        let mut b = vec![0u8; data.len()];
        f.read_exact_at(&mut b, sector * SECTOR).unwrap();
        assert!(b == *data, "the image file differs at sector {sector}");
    }
}
