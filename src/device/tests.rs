//! Request parsing and the device's answers, on `virtio_queue::mock` queues in real guest
//! memory, with the raw engine on a scratch file behind it.

use std::sync::Arc;

use proptest::prelude::*;
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;

use super::completion::{GuestMem, Vring};
use super::request::{parse, Limits, Request, RequestError, Status};
use super::{BlockDevice, DeviceOptions};
use crate::engine::raw::RawEngine;
use crate::io::backing::Backing;
use crate::units::Bytes as B;

const MEM_SIZE: usize = 16 << 20;
const DATA: u64 = 0x10_0000;
const CAPACITY: u64 = 1 << 20;

fn limits() -> Limits {
    Limits {
        capacity: B(CAPACITY),
        logical_block_size: 512,
        seg_max: 6,
        size_max: 64 * 1024,
        max_discard_sectors: 1024,
        max_discard_seg: 4,
        max_write_zeroes_sectors: 1024,
        max_write_zeroes_seg: 4,
        read_only: false,
    }
}

fn memory() -> Arc<GuestMem> {
    Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap())
}

fn header(mem: &GuestMem, at: u64, req_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(at)).unwrap();
}

fn ro(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0))
}

fn wo(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(
        addr,
        len,
        VRING_DESC_F_WRITE as u16,
        0,
    ))
}

/// Header at DATA, data at DATA+0x1000, status at DATA+0x10_0000.
const HDR: u64 = DATA;
const BUF: u64 = DATA + 0x1000;
const STATUS: u64 = DATA + 0x10_0000;

fn parse_chain(mem: &Arc<GuestMem>, descs: &[RawDescriptor], l: &Limits) -> super::request::Parsed {
    let vq = MockSplitQueue::new(&**mem, 16);
    let chain = vq.build_desc_chain(descs).unwrap();
    parse(chain, mem, l)
}

fn err_of(mem: &Arc<GuestMem>, descs: &[RawDescriptor], l: &Limits) -> RequestError {
    match parse_chain(mem, descs, l).request {
        Ok(_) => panic!("request accepted"),
        Err(e) => e,
    }
}

fn dwz(mem: &GuestMem, at: u64, segs: &[(u64, u32, u32)]) {
    for (i, (sector, num, flags)) in segs.iter().enumerate() {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&num.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        mem.write_slice(&s, GuestAddress(at + 16 * i as u64))
            .unwrap();
    }
}

#[test]
fn well_formed_requests_parse() {
    let mem = memory();
    let l = limits();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 8);
    let p = parse_chain(&mem, &[ro(HDR, 16), wo(BUF, 4096), wo(STATUS, 1)], &l);
    assert_eq!(p.status, Some(GuestAddress(STATUS)));
    match p.request.unwrap() {
        Request::Read { offset, bufs } => {
            assert_eq!(offset, B(4096));
            assert_eq!(bufs.len(), 4096);
        }
        _ => panic!("not a read"),
    }

    // Any layout: header, data and status in one writable/readable pair of descriptors.
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    let p = parse_chain(&mem, &[ro(HDR, 16 + 1024), wo(STATUS, 1)], &l);
    match p.request.unwrap() {
        Request::Write { offset, bufs } => {
            assert_eq!(offset, B(0));
            assert_eq!(bufs.len(), 1024);
        }
        _ => panic!("not a write"),
    }
    // Status as the last byte of a data descriptor.
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let p = parse_chain(&mem, &[ro(HDR, 16), wo(BUF, 513)], &l);
    assert_eq!(p.status, Some(GuestAddress(BUF + 512)));
    assert_eq!(p.request.unwrap().written_len(), 512);

    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    assert!(matches!(
        parse_chain(&mem, &[ro(HDR, 16), wo(STATUS, 1)], &l).request,
        Ok(Request::Flush)
    ));

    header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    let p = parse_chain(&mem, &[ro(HDR, 16), wo(BUF, 20), wo(STATUS, 1)], &l);
    assert_eq!(p.request.unwrap().written_len(), 20);

    header(&mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    dwz(
        &mem,
        BUF,
        &[(0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP), (16, 8, 0)],
    );
    match parse_chain(&mem, &[ro(HDR, 16), ro(BUF, 32), wo(STATUS, 1)], &l)
        .request
        .unwrap()
    {
        Request::WriteZeroes { ranges } => {
            assert_eq!(ranges.len(), 2);
            assert!(ranges[0].unmap && !ranges[1].unmap);
            assert_eq!(ranges[1].range.offset, B(16 * 512));
        }
        _ => panic!("not write zeroes"),
    }
}

#[test]
fn chains_without_a_status_byte_are_unreportable() {
    let mem = memory();
    let l = limits();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    let p = parse_chain(&mem, &[ro(HDR, 16), ro(BUF, 512)], &l);
    assert_eq!(p.status, None);
    assert_eq!(p.request.err(), Some(RequestError::NoStatus));
    let p = parse_chain(&mem, &[ro(HDR, 16), wo(STATUS, 0)], &l);
    assert_eq!(p.status, None);
}

#[test]
fn every_malformed_chain_gets_the_right_status() {
    let mem = memory();
    let l = limits();
    let st = |e: RequestError| e.status();

    // Header too short, or missing (first descriptor writable).
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        err_of(&mem, &[ro(HDR, 8), wo(STATUS, 1)], &l),
        RequestError::ShortHeader
    );
    assert_eq!(
        err_of(&mem, &[wo(BUF, 512), wo(STATUS, 1)], &l),
        RequestError::ShortHeader
    );
    // Readable after writable.
    assert_eq!(
        err_of(
            &mem,
            &[ro(HDR, 16), wo(BUF, 512), ro(BUF, 512), wo(STATUS, 1)],
            &l
        ),
        RequestError::DescriptorOrder
    );
    // Wrong direction: read with device-readable data, write with device-writable data.
    assert_eq!(
        err_of(&mem, &[ro(HDR, 16), ro(BUF, 512), wo(STATUS, 1)], &l),
        RequestError::WrongDirection(VIRTIO_BLK_T_IN)
    );
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        err_of(&mem, &[ro(HDR, 16), wo(BUF, 512), wo(STATUS, 1)], &l),
        RequestError::WrongDirection(VIRTIO_BLK_T_OUT)
    );
    // Length not a multiple of 512.
    assert_eq!(
        err_of(&mem, &[ro(HDR, 16), ro(BUF, 100), wo(STATUS, 1)], &l),
        RequestError::UnalignedLength(100)
    );
    // Past the capacity, and overflowing u64.
    header(&mem, HDR, VIRTIO_BLK_T_OUT, CAPACITY / 512);
    assert!(matches!(
        err_of(&mem, &[ro(HDR, 16), ro(BUF, 512), wo(STATUS, 1)], &l),
        RequestError::OutOfRange(_)
    ));
    header(&mem, HDR, VIRTIO_BLK_T_IN, u64::MAX / 512 + 1);
    assert_eq!(
        err_of(&mem, &[ro(HDR, 16), wo(BUF, 512), wo(STATUS, 1)], &l),
        RequestError::Overflow
    );
    header(&mem, HDR, VIRTIO_BLK_T_IN, u64::MAX / 512);
    assert_eq!(
        err_of(&mem, &[ro(HDR, 16), wo(BUF, 1024), wo(STATUS, 1)], &l),
        RequestError::Overflow
    );
    // Too many descriptors and oversized segments.
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let mut long = vec![ro(HDR, 16)];
    long.extend((0..8).map(|i| wo(BUF + i * 512, 512)));
    long.push(wo(STATUS, 1));
    assert!(matches!(
        err_of(&mem, &long, &l),
        RequestError::TooManyDescriptors(_)
    ));
    // The refusal is reported in the chain's real status byte, past the limit, never in a
    // data buffer.
    assert_eq!(
        parse_chain(&mem, &long, &l).status,
        Some(GuestAddress(STATUS))
    );
    let mut no_status = long.clone();
    *no_status.last_mut().unwrap() = ro(STATUS, 1);
    assert_eq!(parse_chain(&mem, &no_status, &l).status, None);
    assert_eq!(
        err_of(&mem, &[ro(HDR, 16), wo(BUF, 128 * 1024), wo(STATUS, 1)], &l),
        RequestError::SegmentTooLarge(128 * 1024)
    );
    // Buffers outside guest memory.
    assert!(matches!(
        err_of(
            &mem,
            &[ro(HDR, 16), wo(MEM_SIZE as u64 - 512, 1024), wo(STATUS, 1)],
            &l
        ),
        RequestError::BadGuestAddress(..)
    ));
    // Unknown types, including ones other devices implement.
    for t in [2, 3, VIRTIO_BLK_T_SECURE_ERASE, 10, 0xdead] {
        header(&mem, HDR, t, 0);
        let e = err_of(&mem, &[ro(HDR, 16), wo(STATUS, 1)], &l);
        assert_eq!(e, RequestError::UnknownType(t));
        assert_eq!(st(e), Status::Unsupp);
    }
    // GET_ID without a buffer.
    header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    assert_eq!(
        err_of(&mem, &[ro(HDR, 16), wo(STATUS, 1)], &l),
        RequestError::NoIdBuffer
    );

    // Discard / write-zeroes segment lists.
    header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    assert_eq!(
        err_of(&mem, &[ro(HDR, 16), wo(STATUS, 1)], &l),
        RequestError::BadSegmentList(0)
    );
    assert_eq!(
        err_of(&mem, &[ro(HDR, 16), ro(BUF, 24), wo(STATUS, 1)], &l),
        RequestError::BadSegmentList(24)
    );
    dwz(&mem, BUF, &[(0, 8, 0); 5]);
    assert_eq!(
        err_of(&mem, &[ro(HDR, 16), ro(BUF, 80), wo(STATUS, 1)], &l),
        RequestError::TooManySegments(5)
    );
    dwz(&mem, BUF, &[(0, 8, 0x4)]);
    let e = err_of(&mem, &[ro(HDR, 16), ro(BUF, 16), wo(STATUS, 1)], &l);
    assert_eq!(
        (e.clone(), st(e)),
        (RequestError::ReservedFlags(4), Status::Unsupp)
    );
    dwz(&mem, BUF, &[(0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)]);
    let e = err_of(&mem, &[ro(HDR, 16), ro(BUF, 16), wo(STATUS, 1)], &l);
    assert_eq!(
        (e.clone(), st(e)),
        (RequestError::UnmapOnDiscard, Status::Unsupp)
    );
    dwz(&mem, BUF, &[(0, 2048, 0)]);
    assert_eq!(
        err_of(&mem, &[ro(HDR, 16), ro(BUF, 16), wo(STATUS, 1)], &l),
        RequestError::SegmentTooLong(2048)
    );
    dwz(&mem, BUF, &[(CAPACITY / 512 - 4, 8, 0)]);
    assert!(matches!(
        err_of(&mem, &[ro(HDR, 16), ro(BUF, 16), wo(STATUS, 1)], &l),
        RequestError::OutOfRange(_)
    ));
    dwz(&mem, BUF, &[(u64::MAX, 8, 0)]);
    assert_eq!(
        err_of(&mem, &[ro(HDR, 16), ro(BUF, 16), wo(STATUS, 1)], &l),
        RequestError::Overflow
    );
}

#[test]
fn logical_block_size_alignment_is_enforced() {
    let mem = memory();
    let l = Limits {
        logical_block_size: 4096,
        ..limits()
    };
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 1);
    assert_eq!(
        err_of(&mem, &[ro(HDR, 16), ro(BUF, 4096), wo(STATUS, 1)], &l),
        RequestError::UnalignedSector(1)
    );
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 8);
    assert_eq!(
        err_of(&mem, &[ro(HDR, 16), ro(BUF, 512), wo(STATUS, 1)], &l),
        RequestError::UnalignedLength(512)
    );
    header(&mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    dwz(&mem, BUF, &[(4, 8, 0)]);
    assert_eq!(
        err_of(&mem, &[ro(HDR, 16), ro(BUF, 16), wo(STATUS, 1)], &l),
        RequestError::UnalignedSector(4)
    );
}

#[test]
fn writes_to_a_read_only_device_are_refused() {
    let mem = memory();
    let l = Limits {
        read_only: true,
        ..limits()
    };
    for t in [
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
    ] {
        header(&mem, HDR, t, 0);
        dwz(&mem, BUF, &[(0, 8, 0)]);
        let e = err_of(&mem, &[ro(HDR, 16), ro(BUF, 16 * 32), wo(STATUS, 1)], &l);
        assert_eq!(
            (e.clone(), e.status()),
            (RequestError::ReadOnly, Status::IoErr),
            "type {t}"
        );
    }
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    assert!(
        parse_chain(&mem, &[ro(HDR, 16), wo(BUF, 512), wo(STATUS, 1)], &l)
            .request
            .is_ok()
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    /// Arbitrary chains — any addresses, lengths, directions and header bytes — never panic.
    #[test]
    fn arbitrary_chains_never_panic(
        descs in prop::collection::vec((0u64..(MEM_SIZE as u64 + 4096), 0u32..70_000, any::<bool>()), 1..12),
        req_type in prop_oneof![Just(0u32), Just(1), Just(4), Just(8), Just(11), Just(13), any::<u32>()],
        sector in any::<u64>(),
        payload in prop::collection::vec(any::<u8>(), 64),
    ) {
        let mem = memory();
        header(&mem, HDR, req_type, sector);
        mem.write_slice(&payload, GuestAddress(BUF)).unwrap();
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(a, len, w)| if w { wo(a, len) } else { ro(a, len) })
            .collect();
        let _ = parse_chain(&mem, &raw, &limits());
    }
}

/// A device with the raw engine on a scratch file, and one mock virtqueue wired to it.
struct Rig {
    device: BlockDevice<RawEngine>,
    vring: Vring,
    atomic: GuestMemoryAtomic<GuestMem>,
    file: std::path::PathBuf,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    next_desc: u16,
    used_seen: u16,
}

const QSIZE: u16 = 64;

impl Rig {
    fn new(name: &str, read_only: bool) -> Rig {
        let file = std::env::temp_dir().join(format!("extblk-unit-{name}-{}", std::process::id()));
        std::fs::write(&file, vec![0u8; CAPACITY as usize]).unwrap();
        let backing = Backing::open(&file, read_only).unwrap();
        let direct = backing.open_direct(read_only);
        let engine = RawEngine::new(backing, read_only, 512, direct).unwrap();
        let mut serial = [0u8; 20];
        serial[..6].copy_from_slice(b"serial");
        let device = BlockDevice::new(
            engine,
            DeviceOptions {
                num_queues: 1,
                queue_size: QSIZE,
                logical_block_size: 512,
                serial,
            },
        )
        .unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let atomic = GuestMemoryAtomic::new(mem);
        let vring = Vring::new(atomic.clone(), QSIZE).unwrap();
        let (desc, avail, used) = {
            let m = atomic.memory();
            let vq = MockSplitQueue::new(&*m, QSIZE);
            (vq.desc_table_addr(), vq.avail_addr(), vq.used_addr())
        };
        vring.set_queue_size(QSIZE);
        vring.set_queue_info(desc.0, avail.0, used.0).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        device.update_memory(atomic.clone()).unwrap();
        Rig {
            device,
            vring,
            atomic,
            file,
            desc,
            avail,
            used,
            next_desc: 0,
            used_seen: 0,
        }
    }

    /// Queues one chain, kicks the device, and returns (status byte, used length).
    /// (The mock builds the rings once; chains are added by hand so the rings keep their state.)
    fn submit(&mut self, descs: &[RawDescriptor], status_at: u64) -> (u8, u32) {
        let head = self.post(descs, status_at);
        // Reads and writes complete on the queue's io_uring: collect them.
        assert!(
            self.device.drain(std::time::Duration::from_secs(10)),
            "request still in flight"
        );
        let m = self.atomic.memory();
        assert_eq!(
            self.used_idx(),
            self.used_seen + 1,
            "request was not completed"
        );
        let slot = self
            .used
            .unchecked_add(4 + 8 * u64::from(self.used_seen % QSIZE));
        let id: u32 = m.read_obj(slot).unwrap();
        let len: u32 = m.read_obj(slot.unchecked_add(4)).unwrap();
        assert_eq!(id, u32::from(head));
        self.used_seen += 1;
        (m.read_obj(GuestAddress(status_at)).unwrap(), len)
    }

    fn used_idx(&self) -> u16 {
        let m = self.atomic.memory();
        m.read_obj(self.used.unchecked_add(2)).unwrap()
    }

    /// Queues one chain and kicks the device; returns its head. Its completion, if the engine
    /// completes it on the queue's io_uring, waits for someone to reap it.
    fn post(&mut self, descs: &[RawDescriptor], status_at: u64) -> u16 {
        let m = self.atomic.memory();
        m.write_obj(0xffu8, GuestAddress(status_at)).unwrap();
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let d = SplitDescriptor::from(*d);
            let index = self.next_desc + i as u16;
            let last = i == descs.len() - 1;
            let next_flag = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
            let flags = if last {
                d.flags()
            } else {
                d.flags() | next_flag
            };
            let at = self.desc.unchecked_add(16 * u64::from(index));
            m.write_obj(d.addr().0, at).unwrap();
            m.write_obj(d.len(), at.unchecked_add(8)).unwrap();
            m.write_obj(flags, at.unchecked_add(12)).unwrap();
            m.write_obj(index + 1, at.unchecked_add(14)).unwrap();
        }
        self.next_desc += descs.len() as u16;
        let avail_idx: u16 = m.read_obj(self.avail.unchecked_add(2)).unwrap();
        m.write_obj(
            head,
            self.avail
                .unchecked_add(4 + 2 * u64::from(avail_idx % QSIZE)),
        )
        .unwrap();
        m.write_obj(avail_idx.wrapping_add(1), self.avail.unchecked_add(2))
            .unwrap();
        self.kick();
        head
    }

    fn kick(&self) {
        self.device
            .handle_event(0, EventSet::IN, std::slice::from_ref(&self.vring), 0)
            .unwrap();
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn device_answers_on_the_used_ring_and_keeps_serving() {
    let mut r = Rig::new("answers", false);
    let m = r.atomic.memory();
    // A write, then a read of it.
    header(&m, HDR, VIRTIO_BLK_T_OUT, 2);
    m.write_slice(&[0xabu8; 1024], GuestAddress(BUF)).unwrap();
    assert_eq!(
        r.submit(&[ro(HDR, 16), ro(BUF, 1024), wo(STATUS, 1)], STATUS),
        (OK, 1)
    );
    header(&m, HDR, VIRTIO_BLK_T_IN, 2);
    m.write_slice(&[0u8; 1024], GuestAddress(BUF)).unwrap();
    assert_eq!(
        r.submit(&[ro(HDR, 16), wo(BUF, 1024), wo(STATUS, 1)], STATUS),
        (OK, 1025)
    );
    let mut got = [0u8; 1024];
    m.read_slice(&mut got, GuestAddress(BUF)).unwrap();
    assert_eq!(got, [0xab; 1024]);
    assert_eq!(&std::fs::read(&r.file).unwrap()[1024..2048], &[0xab; 1024]);

    // Garbage in between: unknown type, bad length, out of range, no status.
    header(&m, HDR, 0x77, 0);
    assert_eq!(r.submit(&[ro(HDR, 16), wo(STATUS, 1)], STATUS).0, UNSUPP);
    header(&m, HDR, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        r.submit(&[ro(HDR, 16), ro(BUF, 100), wo(STATUS, 1)], STATUS)
            .0,
        IOERR
    );
    header(&m, HDR, VIRTIO_BLK_T_IN, CAPACITY / 512);
    assert_eq!(
        r.submit(&[ro(HDR, 16), wo(BUF, 512), wo(STATUS, 1)], STATUS)
            .0,
        IOERR
    );
    assert_eq!(
        r.submit(&[ro(HDR, 16), ro(BUF, 512)], STATUS),
        (0xff, 0),
        "no status: nothing written"
    );

    // GET_ID, FLUSH, and discard still work afterwards.
    header(&m, HDR, VIRTIO_BLK_T_GET_ID, 0);
    assert_eq!(
        r.submit(&[ro(HDR, 16), wo(BUF, 20), wo(STATUS, 1)], STATUS),
        (OK, 21)
    );
    let mut id = [0u8; 20];
    m.read_slice(&mut id, GuestAddress(BUF)).unwrap();
    assert_eq!(&id[..7], b"serial\0");
    header(&m, HDR, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(r.submit(&[ro(HDR, 16), wo(STATUS, 1)], STATUS).0, OK);
    header(&m, HDR, VIRTIO_BLK_T_DISCARD, 0);
    dwz(&m, BUF + 0x8000, &[(2, 2, 0)]);
    assert_eq!(
        r.submit(&[ro(HDR, 16), ro(BUF + 0x8000, 16), wo(STATUS, 1)], STATUS)
            .0,
        OK
    );
    assert_eq!(&std::fs::read(&r.file).unwrap()[1024..2048], &[0u8; 1024]);
    let c = r.device.counters();
    assert_eq!(c.unsupported.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(c.errors.load(std::sync::atomic::Ordering::Relaxed), 3);
    assert_eq!(r.device.inflight(), 0);
}

#[test]
fn read_only_device_answers_ioerr_to_writes() {
    let mut r = Rig::new("ro", true);
    let m = r.atomic.memory();
    assert_ne!(r.device.features() & (1 << VIRTIO_BLK_F_RO), 0);
    header(&m, HDR, VIRTIO_BLK_T_OUT, 0);
    m.write_slice(&[1u8; 512], GuestAddress(BUF)).unwrap();
    assert_eq!(
        r.submit(&[ro(HDR, 16), ro(BUF, 512), wo(STATUS, 1)], STATUS)
            .0,
        IOERR
    );
    header(&m, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    dwz(&m, BUF, &[(0, 8, 0)]);
    assert_eq!(
        r.submit(&[ro(HDR, 16), ro(BUF, 16), wo(STATUS, 1)], STATUS)
            .0,
        IOERR
    );
    header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        r.submit(&[ro(HDR, 16), wo(BUF, 512), wo(STATUS, 1)], STATUS)
            .0,
        OK
    );
    assert!(std::fs::read(&r.file).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn config_space_and_write_cache_switch() {
    let r = Rig::new("config", false);
    let cfg = r.device.get_config(0, 60);
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().unwrap()),
        CAPACITY / 512
    );
    assert_eq!(
        u32::from_le_bytes(cfg[12..16].try_into().unwrap()),
        u32::from(QSIZE) - 2
    );
    assert_eq!(cfg[32], 1, "write-back advertised");
    // Frontends may read beyond our structure; they get exactly what they asked for.
    assert_eq!(r.device.get_config(0, 96).len(), 96);
    r.device.set_config(32, &[0]).unwrap();
    assert!(!r.device.is_writeback());
    assert_eq!(r.device.get_config(32, 1), vec![0]);
    assert!(
        r.device.set_config(0, &[0; 8]).is_err(),
        "capacity is not writable"
    );
    r.device.set_config(32, &[1]).unwrap();
    assert!(r.device.is_writeback());
    // A driver without FLUSH gets write-through.
    r.device.acked_features(1 << 32);
    assert!(!r.device.is_writeback());
}

#[test]
fn a_request_completing_after_its_ring_was_restarted_is_not_published() {
    let mut r = Rig::new("stale", false);
    let m = r.atomic.memory();
    header(&m, HDR, VIRTIO_BLK_T_OUT, 8);
    m.write_slice(&[0x5au8; 4096], GuestAddress(BUF)).unwrap();
    // Aligned, so on the queue's io_uring (not written at once through the page cache). In the engine, its completion not yet reaped: as after a drain that timed out.
    r.post(&[ro(HDR, 16), ro(BUF, 4096), wo(STATUS, 1)], STATUS);
    assert_eq!(
        r.device.inflight(),
        1,
        "the write completed before the restart"
    );
    // A new connection (or GET_VRING_BASE) ends the ring's run.
    r.device.connection_started();
    // The next request on the restarted ring: start_queue first waits for the old run's
    // write (reaping it, unpublished), then serves this one, whose used entry is the ring's
    // first. Had the old write been published, the used index would be 2.
    header(&m, HDR, VIRTIO_BLK_T_IN, 8);
    assert_eq!(
        r.submit(
            &[ro(HDR, 16), wo(BUF + 0x2000, 4096), wo(STATUS + 8, 1)],
            STATUS + 8
        ),
        (OK, 4097)
    );
    assert_eq!(r.used_idx(), 1);
    assert_eq!(r.device.inflight(), 0);
    // The old write's I/O was done (only its completion was dropped), and read before the new
    // request ran: start_queue waited for it.
    let mut got = [0u8; 4096];
    m.read_slice(&mut got, GuestAddress(BUF + 0x2000)).unwrap();
    assert_eq!(got, [0x5a; 4096]);
}

#[test]
fn a_ring_larger_than_its_inflight_region_is_refused_until_reset() {
    use super::inflight::InflightRegion;
    use super::relay::RelayHandler;
    let mut r = Rig::new("region-small", false);
    let m = r.atomic.memory();
    // A region for 16 descriptors, a ring of QSIZE (64): heads 16.. could not be marked.
    r.device
        .set_inflight_fd(InflightRegion::create(1, 16).unwrap())
        .unwrap();
    header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    r.post(&[ro(HDR, 16), wo(BUF, 512), wo(STATUS, 1)], STATUS);
    assert!(r.device.drain(std::time::Duration::from_secs(10)));
    assert_eq!(r.used_idx(), 0, "a request was served on an untracked ring");
    let st: u8 = m.read_obj(GuestAddress(STATUS)).unwrap();
    assert_eq!(st, 0xff, "the request was taken off the ring");
    r.kick();
    assert_eq!(r.used_idx(), 0, "served on a second kick");
    // A region of the ring's size: the queue starts again and serves what was waiting.
    r.device
        .set_inflight_fd(InflightRegion::create(1, QSIZE).unwrap())
        .unwrap();
    r.kick();
    assert!(r.device.drain(std::time::Duration::from_secs(10)));
    assert_eq!(r.used_idx(), 1);
    let st: u8 = m.read_obj(GuestAddress(STATUS)).unwrap();
    assert_eq!(st, OK);
}
