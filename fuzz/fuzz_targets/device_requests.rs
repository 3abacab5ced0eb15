//! Arbitrary guest requests through the whole device: descriptor chains (direct and indirect,
//! any split of header, data and status, up to and past seg_max and size_max, buffers in and
//! out of guest memory) of every request type, known or not, parsed by the device layer and
//! executed by the image engine over an image in memory. No panic; every chain gets its
//! used-ring entry; afterwards the image closes cleanly and `check` finds nothing wrong.
#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::Arc;
use std::time::Duration;

use extblk::device::completion::Vring;
use extblk::device::{BlockDevice, DeviceOptions};
use extblk::engine::image::{EngineOptions, HotPath, ImageEngine};
use extblk::image::{Image, OpenOptions};
use extblk::io::mem::MemIo;
use extblk::io::BlockIo;
use libfuzzer_sys::fuzz_target;
use vhost_user_backend::{VhostUserBackend, VringT};
use vm_memory::{
    Address, Bytes as _, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;

// virtio 1.2 §2.7.5 and §5.2.6.
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const WZ_UNMAP: u32 = 1;

const QSIZE: u16 = 128;
/// Guest memory: 4 MiB, a 1 MiB hole, 1 MiB.
const MEM_A: u64 = 4 << 20;
const HOLE: u64 = 1 << 20;
const MEM_B_AT: u64 = MEM_A + HOLE;
const MEM_END: u64 = MEM_B_AT + (1 << 20);
/// Headers, segment lists, status bytes and indirect tables (data buffers never overlap it,
/// so a read landing early cannot change a chain not yet parsed).
const CTRL: u64 = 0x1000;
const CTRL_END: u64 = 0x10_0000;
const SIZE_MAX: u32 = 1 << 20;

/// Reads the fuzz input; zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn done(&self) -> bool {
        self.0.is_empty()
    }
}

#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    write: bool,
}

struct Guest {
    mem: GuestMemoryAtomic<GuestMemoryMmap<()>>,
    ctrl: u64,
}

impl Guest {
    /// `n` bytes of the control area, or `None` when it is used up.
    fn ctrl(&mut self, n: u64) -> Option<u64> {
        let at = self.ctrl;
        let end = at.checked_add(n)?;
        if end > CTRL_END {
            return None;
        }
        self.ctrl = end.next_multiple_of(16);
        Some(at)
    }
    fn write(&self, at: u64, b: &[u8]) {
        let _ = self.mem.memory().write_slice(b, GuestAddress(at));
    }
}

fn sector(inp: &mut Input, cap_sectors: u64) -> u64 {
    let v = u64::from(inp.u16());
    match inp.u8() % 5 {
        0 | 1 => v,
        2 => cap_sectors.saturating_sub(v % 64),
        3 => u64::MAX - v,
        _ => u64::from(inp.u32()) * 8,
    }
}

/// A data buffer: usually valid, sometimes unaligned, empty, oversized or unmapped.
fn data_desc(inp: &mut Input, write: bool) -> Desc {
    let sel = inp.u16();
    let len = match sel >> 14 {
        0 => (u32::from(sel & 0xFF) + 1) * 512,
        1 => {
            if sel & 1 == 0 {
                SIZE_MAX
            } else {
                SIZE_MAX + 512
            }
        }
        2 => u32::from(sel & 0x3FFF),
        _ => 0,
    };
    let a = u64::from(inp.u32());
    let addr = CTRL_END + (a * 512) % (MEM_END - CTRL_END);
    Desc { addr, len, write }
}

/// Builds one chain's descriptors (header, data, status) from the input; `None` when the
/// control area is full.
fn chain(inp: &mut Input, g: &mut Guest, cap_sectors: u64) -> Option<Vec<Desc>> {
    let kind = inp.u8() % 8;
    let req_type = match kind {
        0 | 7 => T_IN,
        1 => T_OUT,
        2 => T_FLUSH,
        3 => T_GET_ID,
        4 => T_DISCARD,
        5 => T_WRITE_ZEROES,
        _ => inp.u32(),
    };
    let start = sector(inp, cap_sectors);
    let shape = inp.u8();
    let header_at = g.ctrl(16)?;
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&req_type.to_le_bytes());
    h[4..8].copy_from_slice(&inp.u32().to_le_bytes()); // reserved/ioprio: ignored
    h[8..16].copy_from_slice(&start.to_le_bytes());
    g.write(header_at, &h);
    let mut descs = Vec::new();
    if shape & 0x20 != 0 {
        // The header split over two descriptors (any layout).
        descs.push(Desc {
            addr: header_at,
            len: 7,
            write: false,
        });
        descs.push(Desc {
            addr: header_at + 7,
            len: 9,
            write: false,
        });
    } else {
        descs.push(Desc {
            addr: header_at,
            len: 16,
            write: false,
        });
    }
    let device_writes = matches!(req_type, T_IN | T_GET_ID);
    let flip = shape & 0x40 != 0;
    match req_type {
        T_DISCARD | T_WRITE_ZEROES => {
            let nseg = match inp.u8() % 8 {
                7 => 257,
                n => usize::from(n),
            };
            let at = g.ctrl(16 * nseg.max(1) as u64)?;
            for i in 0..nseg {
                let s = sector(inp, cap_sectors);
                let num = match inp.u8() % 4 {
                    0 => u32::MAX,
                    _ => u32::from(inp.u16()) * 8,
                };
                let flags = match inp.u8() % 4 {
                    0 => 0,
                    1 => WZ_UNMAP,
                    2 => 2,
                    _ => inp.u32(),
                };
                let mut seg = [0u8; 16];
                seg[0..8].copy_from_slice(&s.to_le_bytes());
                seg[8..12].copy_from_slice(&num.to_le_bytes());
                seg[12..16].copy_from_slice(&flags.to_le_bytes());
                g.write(at + 16 * i as u64, &seg);
            }
            let len = if shape & 1 != 0 {
                16 * nseg as u32 + 3
            } else {
                16 * nseg as u32
            };
            descs.push(Desc {
                addr: at,
                len,
                write: flip,
            });
        }
        _ => {
            let n = match shape & 7 {
                6 => usize::from(QSIZE - 2),
                7 => usize::from(QSIZE - 1),
                k => usize::from(k),
            };
            for _ in 0..n {
                descs.push(data_desc(inp, device_writes != flip));
            }
        }
    }
    if shape & 0x80 == 0 {
        let st = g.ctrl(1)?;
        g.write(st, &[0xEE]);
        if shape & 0x10 != 0 && descs.last().is_some_and(|d| d.write && d.len > 0) {
            // The status as the last byte of the last data buffer: nothing to add.
        } else {
            descs.push(Desc {
                addr: st,
                len: 1,
                write: true,
            });
        }
    }
    Some(descs)
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let cfg = inp.u8();
    let p = common::pristine();
    let io: Arc<dyn BlockIo> = Arc::new(MemIo::new(p.bytes.clone()));
    let read_only = cfg & 4 != 0;
    let engine = ImageEngine::open(
        io.clone(),
        EngineOptions {
            read_only,
            commit_interval: Duration::from_secs(3600),
            hot_path: HotPath::Fast,
            alloc_unit: [1, 4, 16, 256][usize::from(cfg >> 3) % 4],
            ..Default::default()
        },
    )
    .expect("the pristine image opens");
    let lbs = if cfg & 1 == 0 { 512 } else { 4096 };
    let device = BlockDevice::new(
        engine,
        DeviceOptions {
            num_queues: 1,
            queue_size: QSIZE,
            logical_block_size: lbs,
            serial: *b"fuzz-serial-0123456\0",
        },
    )
    .expect("device");
    if cfg & 2 != 0 {
        device.set_config(32, &[0]).expect("write-through"); // FUA on every write
    }
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), MEM_A as usize),
        (GuestAddress(MEM_B_AT), (MEM_END - MEM_B_AT) as usize),
    ])
    .expect("guest memory");
    let atomic = GuestMemoryAtomic::new(mem);
    let vring = Vring::new(atomic.clone(), QSIZE).expect("vring");
    // The rings laid out by hand (virtio 1.2 §2.7): virtio-queue 0.18's MockSplitQueue puts
    // the used ring `len` bytes after the avail ring's entries instead of `2 * len + 2`, so
    // with more than len/2 chains in flight the two overlap (the device then reads its own used
    // entries as avail heads).
    let q = u64::from(QSIZE);
    let desc_table = GuestAddress(0);
    let avail = GuestAddress(16 * q);
    let used = GuestAddress((avail.0 + 6 + 2 * q).next_multiple_of(4));
    assert!(used.0 + 6 + 8 * q <= CTRL, "rings overlap the control area");
    vring.set_queue_size(QSIZE);
    vring
        .set_queue_info(desc_table.0, avail.0, used.0)
        .expect("queue info");
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    device.update_memory(atomic.clone()).expect("memory");
    let cap_sectors = (p.layout.disk_size / 512).max(1);

    let debug = std::env::var_os("EXTBLK_FUZZ_DEBUG").is_some();
    let m = atomic.memory();
    let put = |at: GuestAddress, d: &Desc, flags: u16, nx: u16| {
        let flags = flags | if d.write { F_WRITE } else { 0 };
        let _ = m.write_obj(d.addr, at);
        let _ = m.write_obj(d.len, at.unchecked_add(8));
        let _ = m.write_obj(flags, at.unchecked_add(12));
        let _ = m.write_obj(nx, at.unchecked_add(14));
    };
    // Rounds: a batch of chains, kicked at once, all answered before the next batch reuses the
    // descriptor table and the control area (later rounds meet the state earlier ones left:
    // allocated blocks, commits, discards).
    let mut avail_idx: u16 = 0;
    for round in 0..4 {
        if inp.done() {
            break;
        }
        let per_round = u16::from(inp.u8()) % QSIZE + 1;
        let mut g = Guest {
            mem: atomic.clone(),
            ctrl: CTRL,
        };
        let mut next: u16 = 0;
        let mut chains: u16 = 0;
        while !inp.done() && chains < per_round {
            let Some(descs) = chain(&mut inp, &mut g, cap_sectors) else {
                break;
            };
            let indirect = descs.len() > 1 && inp.u8() % 3 == 0;
            let head = next;
            let table_len = if indirect { 1 } else { descs.len() as u16 };
            if u32::from(next) + u32::from(table_len) > u32::from(QSIZE) {
                break;
            }
            if indirect {
                let Some(t) = g.ctrl(16 * descs.len() as u64) else {
                    break;
                };
                for (i, d) in descs.iter().enumerate() {
                    let flags = if i + 1 == descs.len() { 0 } else { F_NEXT };
                    put(GuestAddress(t + 16 * i as u64), d, flags, i as u16 + 1);
                }
                let table = Desc {
                    addr: t,
                    len: 16 * descs.len() as u32,
                    write: false,
                };
                let at = desc_table.unchecked_add(16 * u64::from(next));
                put(at, &table, F_INDIRECT, 0);
            } else {
                for (i, d) in descs.iter().enumerate() {
                    let idx = next + i as u16;
                    let flags = if i + 1 == descs.len() { 0 } else { F_NEXT };
                    put(
                        desc_table.unchecked_add(16 * u64::from(idx)),
                        d,
                        flags,
                        idx + 1,
                    );
                }
            }
            if debug {
                let d: Vec<String> = descs
                    .iter()
                    .map(|d| format!("{:#x}+{}{}", d.addr, d.len, if d.write { "w" } else { "r" }))
                    .collect();
                eprintln!(
                    "round {round} chain {chains} head {head} indirect {indirect}: {}",
                    d.join(" ")
                );
            }
            next += table_len;
            let slot =
                avail.unchecked_add(4 + 2 * u64::from(avail_idx.wrapping_add(chains) % QSIZE));
            let _ = m.write_obj(head, slot);
            chains += 1;
        }
        if chains == 0 {
            break;
        }
        avail_idx = avail_idx.wrapping_add(chains);
        let _ = m.write_obj(avail_idx, avail.unchecked_add(2));
        device
            .handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
            .expect("handle_event");
        assert!(
            device.drain(Duration::from_secs(30)),
            "requests still in flight"
        );
        let done: u16 = m.read_obj(used.unchecked_add(2)).expect("used idx");
        assert_eq!(done, avail_idx, "a request was never answered");
    }
    if debug {
        // What the input did (to judge the seeds): the device's and the engine's counters.
        eprintln!(
            "{avail_idx} chains; device: {}",
            device.counters().snapshot()
        );
        eprintln!("engine: {}", device.engine().stats().snapshot());
    }
    device.engine().close().expect("close");
    drop(device);
    // The image the guest's requests left behind is consistent.
    let mut bytes = vec![0u8; io.size() as usize];
    io.read_at(&mut bytes, 0).expect("read back");
    let img = Image::open(Arc::new(MemIo::new(bytes)), OpenOptions { read_only: true })
        .expect("the image reopens");
    let report = extblk::check::check(&img, "fuzz".into());
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(read_only || report.clean, "not closed cleanly");
});
