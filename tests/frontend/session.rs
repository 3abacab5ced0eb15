//! The vhost-user side of our frontend, on the `vhost` crate's `Frontend`: the message sequences
//! of QEMU's vhost-user-blk and of cloud-hypervisor's, and the inflight region as a frontend
//! holds it (mapped, kept across reconnects, sent again).
//!
//! Every reply has a deadline (`Watchdog`), so a daemon that stops answering fails the test with
//! a message instead of hanging it.

use std::fs::File;
use std::net::Shutdown;
use std::ops::{Deref, DerefMut};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::guest::{map_shared, unmap, Guest};

/// Longest a reply may take. The daemon answers every message in microseconds, except
/// GET_VRING_BASE, which waits for the ring's requests (and none of ours is slow).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Size of `struct virtio_blk_config` both frontends ask for (up to write_zeroes_may_unmap and
/// its padding: cloud-hypervisor's `VirtioBlockConfig`, QEMU's config_len with these features).
pub const CONFIG_LEN: u32 = 60;

pub const INFLIGHT: VhostUserProtocolFeatures = VhostUserProtocolFeatures::INFLIGHT_SHMFD;

/// Bytes of one queue's inflight region (QEMU's `vu_queue_inflight_size` for split rings:
/// 16-byte header, 16 bytes per descriptor, 64-byte aligned).
pub fn inflight_queue_bytes(queue_size: u16) -> u64 {
    (16 * u64::from(queue_size) + 16).div_ceil(64) * 64
}

/// Connects to `socket` (retrying while the daemon starts), with a watchdog on every reply.
pub fn connect(socket: &Path, queues: u64) -> Conn {
    let deadline = Instant::now() + Duration::from_secs(10);
    let stream = loop {
        match UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "cannot connect to {}: {e}",
                    socket.display()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let watchdog = Watchdog::new(stream.try_clone().unwrap());
    Conn {
        frontend: Frontend::from_stream(stream, queues),
        watchdog,
    }
}

/// The vhost crate retries a socket read that times out (SO_RCVTIMEO gives EAGAIN, which it
/// takes for a signal), so a daemon that never answers would hang the test. Instead, while a
/// message waits for its reply, this thread watches the clock and shuts the socket down after
/// REPLY_TIMEOUT: the read then fails and the test fails with the message's name.
struct Watchdog {
    state: Arc<(Mutex<Watch>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Watch {
    deadline: Option<Instant>,
    stop: bool,
}

impl Watchdog {
    fn new(stream: UnixStream) -> Watchdog {
        let state = Arc::new((Mutex::new(Watch::default()), Condvar::new()));
        let s = state.clone();
        let thread = std::thread::spawn(move || {
            let (lock, cv) = &*s;
            let mut w = lock.lock().unwrap();
            while !w.stop {
                match w.deadline {
                    Some(d) if Instant::now() >= d => {
                        eprintln!(
                            "watchdog: the daemon did not answer within {REPLY_TIMEOUT:?}; \
                             shutting the connection down"
                        );
                        let _ = stream.shutdown(Shutdown::Both);
                        w.deadline = None;
                    }
                    Some(d) => w = cv.wait_timeout(w, d - Instant::now()).unwrap().0,
                    None => w = cv.wait(w).unwrap(),
                }
            }
        });
        Watchdog {
            state,
            thread: Some(thread),
        }
    }

    fn set(&self, deadline: Option<Instant>) {
        let (lock, cv) = &*self.state;
        lock.lock().unwrap().deadline = deadline;
        cv.notify_one();
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (lock, cv) = &*self.state;
        lock.lock().unwrap().stop = true;
        cv.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A connection: the vhost crate's frontend and the watchdog over its replies.
pub struct Conn {
    frontend: Frontend,
    watchdog: Watchdog,
}

impl Conn {
    /// The frontend, watched until the returned guard is dropped (the end of the statement).
    pub fn fe(&mut self) -> Watched<'_> {
        self.watchdog.set(Some(Instant::now() + REPLY_TIMEOUT));
        Watched(self)
    }
}

pub struct Watched<'a>(&'a mut Conn);

impl Deref for Watched<'_> {
    type Target = Frontend;
    fn deref(&self) -> &Frontend {
        &self.0.frontend
    }
}

impl DerefMut for Watched<'_> {
    fn deref_mut(&mut self) -> &mut Frontend {
        &mut self.0.frontend
    }
}

impl Drop for Watched<'_> {
    fn drop(&mut self) {
        self.0.watchdog.set(None);
    }
}

/// An inflight region as the frontend keeps it: the memfd, the message describing it, and our
/// own mapping of it (to look at the daemon's marks).
pub struct Inflight {
    pub file: File,
    pub info: VhostUserInflight,
    map: *mut u8,
    len: usize,
}

impl Inflight {
    pub fn new(file: File, info: VhostUserInflight) -> Inflight {
        let len = info.mmap_size as usize;
        let map = map_shared(&file, info.mmap_offset, len);
        Inflight {
            file,
            info,
            map,
            len,
        }
    }

    fn at(&self, q: usize, off: u64, len: u64) -> *mut u8 {
        let start = q as u64 * inflight_queue_bytes(self.info.queue_size) + off;
        assert!(
            start + len <= self.len as u64,
            "test bug: outside the region"
        );
        // SAFETY: checked inside the mapping of `len` bytes.
        unsafe { self.map.add(start as usize) }
    }

    fn get<const N: usize>(&self, q: usize, off: u64) -> [u8; N] {
        let p = self.at(q, off, N as u64);
        let mut b = [0u8; N];
        // SAFETY: `at` checked the range; the daemon may write it concurrently, and a torn read
        // only shows up as a failed assertion with the values printed.
        unsafe { std::ptr::copy_nonoverlapping(p, b.as_mut_ptr(), N) };
        b
    }

    fn put(&self, q: usize, off: u64, bytes: &[u8]) {
        let p = self.at(q, off, bytes.len() as u64);
        // SAFETY: `at` checked the range; only done while no daemon has the region.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) };
    }

    pub fn version(&self, q: usize) -> u16 {
        u16::from_le_bytes(self.get(q, 8))
    }

    pub fn used_idx(&self, q: usize) -> u16 {
        u16::from_le_bytes(self.get(q, 14))
    }

    /// Heads marked in flight in queue `q`'s region.
    pub fn marked(&self, q: usize) -> Vec<u16> {
        (0..self.info.queue_size)
            .filter(|&i| self.get::<1>(q, 16 + 16 * u64::from(i))[0] != 0)
            .collect()
    }

    /// Writes a descriptor entry by hand (a stale mark in a region, for the fresh-region test).
    pub fn set_desc(&self, q: usize, i: u16, inflight: u8, counter: u64) {
        let off = 16 + 16 * u64::from(i);
        self.put(q, off, &[inflight]);
        self.put(q, off + 8, &counter.to_le_bytes());
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        unmap(self.map, self.len);
    }
}

/// Per-queue overrides of what SET_VRING_ADDR carries (hostile rings); `None` = the guest's.
#[derive(Clone, Copy, Default)]
pub struct AddrOverride {
    pub used_va: Option<u64>,
}

pub struct Session {
    conn: Conn,
    pub queues: usize,
    pub backend_features: u64,
    /// What SET_FEATURES carries.
    pub acked: u64,
    pub backend_protocol: VhostUserProtocolFeatures,
    pub protocol: VhostUserProtocolFeatures,
    /// QEMU sets every vring's call fd to a masked notifier at init; kept alive here.
    _masked: Vec<EventFd>,
}

/// The device bits QEMU's vhost-user-blk passes through (`user_feature_bits` in
/// hw/block/vhost-user-blk.c), the ones a Linux guest acks among them.
pub fn qemu_guest_features() -> u64 {
    [
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_GEOMETRY,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_RO,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_RING_F_EVENT_IDX,
    ]
    .iter()
    .fold(0, |acc, b| acc | 1u64 << b)
}

/// QEMU keeps every protocol feature it knows (VHOST_USER_PROTOCOL_FEATURE_MASK: all bits below
/// VHOST_USER_PROTOCOL_F_MAX, 19 in QEMU 9/10), which covers everything extblk advertises.
const QEMU_PROTOCOL_MASK: u64 = (1 << 19) - 1;

/// cloud-hypervisor's vhost-user-blk offer (virtio-devices/src/vhost_user/blk.rs and mod.rs's
/// DEFAULT_VIRTIO_FEATURES): device bits, ring bits, IN_ORDER, ORDER_PLATFORM,
/// NOTIFICATION_DATA, PROTOCOL_FEATURES and LOG_ALL; MQ only with more than one queue.
pub fn ch_avail_features(queues: usize) -> u64 {
    const VIRTIO_F_IN_ORDER: u32 = 35;
    const VIRTIO_F_ORDER_PLATFORM: u32 = 36;
    const VIRTIO_F_NOTIFICATION_DATA: u32 = 38;
    let mut f = [
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_GEOMETRY,
        VIRTIO_BLK_F_RO,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_F_VERSION_1,
        VIRTIO_F_IN_ORDER,
        VIRTIO_F_ORDER_PLATFORM,
        VIRTIO_F_NOTIFICATION_DATA,
    ]
    .iter()
    .fold(0, |acc, b| acc | 1u64 << b)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        | VhostUserVirtioFeatures::LOG_ALL.bits();
    if queues > 1 {
        f |= 1 << VIRTIO_BLK_F_MQ;
    }
    f
}

/// cloud-hypervisor's protocol-feature offer (blk.rs).
pub fn ch_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::DEVICE_STATE
}

pub fn check<T>(r: vhost::Result<T>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what} failed: {e}"))
}

impl Session {
    /// The connection's frontend, watched for the statement's duration.
    pub fn fe(&mut self) -> Watched<'_> {
        self.conn.fe()
    }

    /// QEMU's connection (vhost_user_backend_init, vhost_dev_init, then realize's GET_CONFIG):
    /// GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
    /// GET_MAX_MEM_SLOTS, SET_OWNER, GET_FEATURES, SET_VRING_CALL (masked notifier) per queue,
    /// GET_CONFIG. `event_idx` false plays a guest that does not ack EVENT_IDX.
    pub fn qemu_connect(socket: &Path, queues: usize, event_idx: bool) -> Session {
        let mut conn = connect(socket, queues as u64);
        let backend_features = check(conn.fe().get_features(), "GET_FEATURES");
        assert!(
            backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0,
            "QEMU's vhost-user-blk needs PROTOCOL_FEATURES (for CONFIG): {backend_features:#x}"
        );
        let backend_protocol = check(conn.fe().get_protocol_features(), "GET_PROTOCOL_FEATURES");
        let protocol = VhostUserProtocolFeatures::from_bits_truncate(
            backend_protocol.bits() & QEMU_PROTOCOL_MASK,
        );
        check(
            conn.fe().set_protocol_features(protocol),
            "SET_PROTOCOL_FEATURES",
        );
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // QEMU asks for acks where it needs them; we ask for every one, so that no error
            // answer of the daemon's goes unnoticed.
            conn.fe().set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if protocol.contains(VhostUserProtocolFeatures::MQ) {
            let n = check(conn.fe().get_queue_num(), "GET_QUEUE_NUM");
            assert!(
                n >= queues as u64,
                "daemon offers {n} queues, we need {queues}"
            );
        }
        if protocol.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
            let slots = check(conn.fe().get_max_mem_slots(), "GET_MAX_MEM_SLOTS");
            assert!(slots >= 2, "daemon offers {slots} memory slots");
        }
        check(conn.fe().set_owner(), "SET_OWNER");
        check(conn.fe().get_features(), "GET_FEATURES (again)");
        let masked: Vec<EventFd> = (0..queues)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        for (q, fd) in masked.iter().enumerate() {
            check(conn.fe().set_vring_call(q, fd), "SET_VRING_CALL (masked)");
        }
        let mut acked = backend_features & qemu_guest_features();
        if !event_idx {
            acked &= !(1 << VIRTIO_RING_F_EVENT_IDX);
        }
        acked |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let mut s = Session {
            conn,
            queues,
            backend_features,
            acked,
            backend_protocol,
            protocol,
            _masked: masked,
        };
        let cfg = s.config();
        assert_eq!(cfg.len(), CONFIG_LEN as usize);
        s
    }

    /// GET_CONFIG of the whole structure, as both frontends read it at realize.
    pub fn config(&mut self) -> Vec<u8> {
        let buf = vec![0u8; CONFIG_LEN as usize];
        let (_, payload) = check(
            self.fe()
                .get_config(0, CONFIG_LEN, VhostUserConfigFlags::WRITABLE, &buf),
            "GET_CONFIG",
        );
        payload
    }

    /// Capacity in bytes from the config space.
    pub fn capacity(&mut self) -> u64 {
        let c = self.config();
        u64::from_le_bytes(c[0..8].try_into().unwrap()) * 512
    }

    pub fn has_inflight(&self) -> bool {
        self.protocol.contains(INFLIGHT)
    }

    /// GET_INFLIGHT_FD as both frontends send it (size and offset zero, the queues and their
    /// size), with the reply's facts checked and the region mapped.
    pub fn get_inflight(&mut self, queue_size: u16) -> Inflight {
        let req = VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: self.queues as u16,
            queue_size,
        };
        let (info, file) = check(self.fe().get_inflight_fd(&req), "GET_INFLIGHT_FD");
        let want = self.queues as u64 * inflight_queue_bytes(queue_size);
        assert_eq!(
            (info.num_queues, info.queue_size, info.mmap_size),
            (self.queues as u16, queue_size, want),
            "GET_INFLIGHT_FD: (num_queues, queue_size, mmap_size) of the reply"
        );
        let len = file.metadata().unwrap().len();
        assert!(
            len >= info.mmap_offset + info.mmap_size,
            "the inflight fd has {len} bytes, the region ends at {}",
            info.mmap_offset + info.mmap_size
        );
        // SAFETY: F_GET_SEALS on a descriptor we own.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        assert!(
            seals >= 0 && seals & (libc::F_SEAL_GROW | libc::F_SEAL_SHRINK) != 0,
            "the inflight memfd must be sealed against resizing (seals {seals:#x}): a frontend \
             that shrinks it would SIGBUS the daemon"
        );
        let region = Inflight::new(file, info);
        for q in 0..self.queues {
            assert!(
                region.marked(q).is_empty() && region.version(q) == 0,
                "a fresh inflight region is zeroed"
            );
        }
        region
    }

    /// SET_INFLIGHT_FD of `region` (checked).
    pub fn set_inflight(&mut self, region: &Inflight) {
        check(
            self.fe()
                .set_inflight_fd(&region.info, region.file.as_raw_fd()),
            "SET_INFLIGHT_FD",
        );
    }

    fn vring_config(guest: &Guest, q: usize, over: AddrOverride) -> VringConfigData {
        let r = &guest.rings[q];
        VringConfigData {
            queue_max_size: r.size,
            queue_size: r.size,
            flags: 0,
            desc_table_addr: guest.va(r.desc),
            used_ring_addr: over.used_va.unwrap_or_else(|| guest.va(r.used)),
            avail_ring_addr: guest.va(r.avail),
            log_addr: None,
        }
    }

    /// QEMU's vhost_user_blk_start: SET_FEATURES (vhost_dev_prepare_inflight), GET_INFLIGHT_FD
    /// unless a region is kept, SET_INFLIGHT_FD, then vhost_dev_start: SET_FEATURES, memory,
    /// per queue SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK, then
    /// SET_VRING_ENABLE for each, then the unmask: SET_VRING_CALL with the real call fd.
    /// `bases` are QEMU's last_avail_idx per queue: 0 on a fresh device, the used index after a
    /// backend crash (virtio_queue_restore_last_avail_idx). Returns the region in use, if any.
    pub fn qemu_start(
        &mut self,
        guest: &Guest,
        kept: Option<Inflight>,
        bases: &[u16],
    ) -> Option<Inflight> {
        self.try_qemu_start(guest, kept, bases, AddrOverride::default())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// `qemu_start` that reports the first refused step instead of panicking (hostile setups).
    pub fn try_qemu_start(
        &mut self,
        guest: &Guest,
        kept: Option<Inflight>,
        bases: &[u16],
        over: AddrOverride,
    ) -> Result<Option<Inflight>, String> {
        let acked = self.acked;
        fn step<T>(r: vhost::Result<T>, what: &str) -> Result<T, String> {
            r.map_err(|e| format!("{what} failed: {e}"))
        }
        step(self.fe().set_features(acked), "SET_FEATURES")?;
        let region = if self.has_inflight() {
            let region = match kept {
                Some(r) => r,
                None => self.get_inflight(guest.rings[0].size),
            };
            step(
                self.fe()
                    .set_inflight_fd(&region.info, region.file.as_raw_fd()),
                "SET_INFLIGHT_FD",
            )?;
            Some(region)
        } else {
            None
        };
        step(self.fe().set_features(acked), "SET_FEATURES")?;
        if self
            .protocol
            .contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
        {
            for r in guest.vhost_regions() {
                step(self.fe().add_mem_region(&r), "ADD_MEM_REG")?;
            }
        } else {
            step(
                self.fe().set_mem_table(&guest.vhost_regions()),
                "SET_MEM_TABLE",
            )?;
        }
        assert_eq!(bases.len(), self.queues, "test bug: one base per queue");
        for (q, &base) in bases.iter().enumerate() {
            let r = &guest.rings[q];
            step(self.fe().set_vring_num(q, r.size), "SET_VRING_NUM")?;
            step(self.fe().set_vring_base(q, base), "SET_VRING_BASE")?;
            let cfg = Session::vring_config(guest, q, over);
            step(self.fe().set_vring_addr(q, &cfg), "SET_VRING_ADDR")?;
            step(self.fe().set_vring_kick(q, &r.kick), "SET_VRING_KICK")?;
        }
        for q in 0..self.queues {
            step(self.fe().set_vring_enable(q, true), "SET_VRING_ENABLE")?;
        }
        for q in 0..self.queues {
            step(
                self.fe().set_vring_call(q, &guest.rings[q].call),
                "SET_VRING_CALL",
            )?;
        }
        Ok(region)
    }

    /// QEMU's vhost_virtqueue_stop on every queue: GET_VRING_BASE (the daemon stops the ring and
    /// answers its next avail index).
    pub fn get_bases(&mut self) -> Vec<u16> {
        (0..self.queues)
            .map(|q| check(self.fe().get_vring_base(q), "GET_VRING_BASE") as u16)
            .collect()
    }

    /// cloud-hypervisor's connection (VhostUserHandle::connect_vhost_user, Blk::new):
    /// SET_OWNER, GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES (its offer and the
    /// daemon's), NEED_REPLY from then on if REPLY_ACK, GET_QUEUE_NUM, GET_CONFIG (WRITABLE).
    pub fn ch_connect(socket: &Path, queues: usize) -> Session {
        let mut conn = connect(socket, queues as u64);
        check(conn.fe().set_owner(), "SET_OWNER");
        let backend_features = check(conn.fe().get_features(), "GET_FEATURES");
        let offered = ch_avail_features(queues) & backend_features;
        let (backend_protocol, protocol) =
            if offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
                let b = check(conn.fe().get_protocol_features(), "GET_PROTOCOL_FEATURES");
                let p = ch_protocol_features() & b;
                check(conn.fe().set_protocol_features(p), "SET_PROTOCOL_FEATURES");
                (b, p)
            } else {
                (
                    VhostUserProtocolFeatures::empty(),
                    VhostUserProtocolFeatures::empty(),
                )
            };
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            conn.fe().set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if protocol.contains(VhostUserProtocolFeatures::MQ) {
            let n = check(conn.fe().get_queue_num(), "GET_QUEUE_NUM");
            assert!(
                n >= queues as u64,
                "daemon offers {n} queues, we need {queues}"
            );
        }
        // The guest acks what it knows of the offer (LOG_ALL is no virtio bit and is never
        // acked); cloud-hypervisor keeps PROTOCOL_FEATURES in the acked set itself.
        let acked = offered & !VhostUserVirtioFeatures::LOG_ALL.bits();
        let mut s = Session {
            conn,
            queues,
            backend_features,
            acked,
            backend_protocol,
            protocol,
            _masked: Vec::new(),
        };
        let cfg = s.config();
        assert_eq!(cfg.len(), CONFIG_LEN as usize);
        s
    }

    /// cloud-hypervisor's reconnect (VhostUserEpollHandler::reconnect on EPOLLHUP): SET_OWNER,
    /// GET_FEATURES, SET_PROTOCOL_FEATURES with the features acked before (no
    /// GET_PROTOCOL_FEATURES), NEED_REPLY; then `ch_setup` with the kept inflight region.
    pub fn ch_reconnect(socket: &Path, before: &Session) -> Session {
        let mut conn = connect(socket, before.queues as u64);
        check(conn.fe().set_owner(), "SET_OWNER");
        let backend_features = check(conn.fe().get_features(), "GET_FEATURES");
        if before.acked & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            check(
                conn.fe().set_protocol_features(before.protocol),
                "SET_PROTOCOL_FEATURES",
            );
            if before
                .protocol
                .contains(VhostUserProtocolFeatures::REPLY_ACK)
            {
                conn.fe().set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        Session {
            conn,
            queues: before.queues,
            backend_features,
            acked: before.acked,
            backend_protocol: before.backend_protocol,
            protocol: before.protocol,
            _masked: Vec::new(),
        }
    }

    /// cloud-hypervisor's setup_vhost_user (device activation, and again after a reconnect):
    /// SET_FEATURES, SET_MEM_TABLE, SET_VRING_NUM for every queue, GET_INFLIGHT_FD unless a
    /// region is kept and SET_INFLIGHT_FD, then per queue SET_VRING_ADDR, SET_VRING_BASE (the
    /// avail index read from guest memory: it has no IN_ORDER with extblk, and so no used-index
    /// bases), SET_VRING_CALL, SET_VRING_KICK; then SET_VRING_ENABLE for each.
    pub fn ch_setup(&mut self, guest: &Guest, kept: Option<Inflight>) -> Option<Inflight> {
        let features = self.acked & self.backend_features;
        check(self.fe().set_features(features), "SET_FEATURES");
        check(
            self.fe().set_mem_table(&guest.vhost_regions()),
            "SET_MEM_TABLE",
        );
        for q in 0..self.queues {
            check(
                self.fe().set_vring_num(q, guest.rings[q].size),
                "SET_VRING_NUM",
            );
        }
        let region = if self.has_inflight() {
            let region = match kept {
                Some(r) => r,
                None => self.get_inflight(guest.rings[0].size),
            };
            self.set_inflight(&region);
            Some(region)
        } else {
            None
        };
        for q in 0..self.queues {
            let r = &guest.rings[q];
            let cfg = Session::vring_config(guest, q, AddrOverride::default());
            check(self.fe().set_vring_addr(q, &cfg), "SET_VRING_ADDR");
            check(
                self.fe().set_vring_base(q, guest.avail_idx_in_memory(q)),
                "SET_VRING_BASE",
            );
            check(self.fe().set_vring_call(q, &r.call), "SET_VRING_CALL");
            check(self.fe().set_vring_kick(q, &r.kick), "SET_VRING_KICK");
        }
        for q in 0..self.queues {
            check(self.fe().set_vring_enable(q, true), "SET_VRING_ENABLE");
        }
        region
    }
}
