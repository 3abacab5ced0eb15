//! Arbitrary descriptor chains (addresses, lengths, flags incl. INDIRECT, header and payload
//! bytes) through the virtio-blk request parser: it must answer, never panic.
#![no_main]

use std::sync::Arc;

use extblk::device::request::{parse, Limits};
use extblk::units::Bytes;
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes as _, GuestAddress, GuestMemoryMmap};

const MEM: usize = 0x40000;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap());
    let n = usize::from(data[0] % 12) + 1;
    let lbs = if data[1] & 1 == 0 { 512 } else { 4096 };
    let descs_bytes = &data[2..];
    let mut descs = Vec::new();
    for i in 0..n {
        let c = descs_bytes.get(i * 8..i * 8 + 8).unwrap_or(&[0; 8]);
        let addr =
            u64::from(u32::from_le_bytes([c[0], c[1], c[2], 0])) * 16 % (MEM as u64 + 0x1000);
        let len = u32::from(u16::from_le_bytes([c[3], c[4]])) * u32::from(c[5] % 4 + 1);
        let flags = u16::from(c[6]) & 0x6; // WRITE and INDIRECT; NEXT is set by the mock
        descs.push(RawDescriptor::from(Descriptor::new(
            addr.max(0x1000),
            len,
            flags,
            0,
        )));
    }
    let payload = descs_bytes.get(n * 8..).unwrap_or(&[]);
    let _ = mem.write_slice(&payload[..payload.len().min(0x8000)], GuestAddress(0x1000));
    let limits = Limits {
        capacity: Bytes(1 << 30),
        logical_block_size: lbs,
        seg_max: 8,
        size_max: 1 << 16,
        max_discard_sectors: 1 << 20,
        max_discard_seg: 4,
        max_write_zeroes_sectors: 1 << 20,
        max_write_zeroes_seg: 4,
        read_only: data[1] & 2 != 0,
    };
    let vq = MockSplitQueue::new(&*mem, 16);
    if let Ok(chain) = vq.build_desc_chain(&descs) {
        let _ = parse(chain, &mem, &limits);
    }
});
