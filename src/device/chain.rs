//! Walking a descriptor chain from its head, for requests resubmitted after a restart: the
//! head comes from the inflight region, not from the avail ring, and virtio-queue's
//! `DescriptorChain::new` is private to that crate. The walk follows NEXT and one level of
//! INDIRECT exactly as the virtio spec (2.7.5) and virtio-queue do, and gives up — never
//! loops, never reads outside guest memory — on a chain longer than its table, a nested
//! indirect table, or a descriptor that does not lie in guest memory.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

const DESC_SIZE: u64 = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// One descriptor of a chain as the request parser consumes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: GuestAddress,
    pub len: u32,
    pub write_only: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Raw {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn read_raw<M: GuestMemory>(mem: &M, table: GuestAddress, i: u16) -> Option<Raw> {
    let at = table.checked_add(u64::from(i) * DESC_SIZE)?;
    let mut b = [0u8; DESC_SIZE as usize];
    mem.read_slice(&mut b, at).ok()?;
    Some(Raw {
        addr: u64::from_le_bytes(b[0..8].try_into().ok()?),
        len: u32::from_le_bytes(b[8..12].try_into().ok()?),
        flags: u16::from_le_bytes(b[12..14].try_into().ok()?),
        next: u16::from_le_bytes(b[14..16].try_into().ok()?),
    })
}

/// The descriptors of the chain at `head` in the descriptor table at `desc_table` of a ring of
/// `queue_size` entries, or `None` when the chain is malformed.
pub fn walk<M: GuestMemory>(
    mem: &M,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
) -> Option<Vec<Desc>> {
    if head >= queue_size {
        return None;
    }
    let mut out = Vec::new();
    let mut table = desc_table;
    let mut table_len = queue_size;
    let mut i = head;
    let mut indirect = false;
    // Every descriptor of a table at most once: a longer chain loops.
    let mut budget = u32::from(queue_size);
    loop {
        if i >= table_len || budget == 0 {
            return None;
        }
        budget -= 1;
        let d = read_raw(mem, table, i)?;
        if d.flags & F_INDIRECT != 0 {
            // An indirect descriptor is the only one of its (direct) chain and holds a table.
            if indirect || d.flags & F_NEXT != 0 || d.len == 0 || u64::from(d.len) % DESC_SIZE != 0
            {
                return None;
            }
            let n = u64::from(d.len) / DESC_SIZE;
            let n = u16::try_from(n).ok()?;
            // Each entry is read from guest memory when the walk reaches it: a table that
            // runs outside guest memory ends the walk there.
            let t = GuestAddress(d.addr);
            t.checked_add(u64::from(d.len) - 1)?;
            table = t;
            table_len = n;
            budget = u32::from(n);
            indirect = true;
            i = 0;
            continue;
        }
        out.push(Desc {
            addr: GuestAddress(d.addr),
            len: d.len,
            write_only: d.flags & F_WRITE != 0,
        });
        if d.flags & F_NEXT == 0 {
            return Some(out);
        }
        i = d.next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn put(
        m: &GuestMemoryMmap<()>,
        table: u64,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        m.write_slice(&b, GuestAddress(table + u64::from(i) * 16))
            .unwrap();
    }

    #[test]
    fn direct_and_indirect_chains_are_walked() {
        let m = mem();
        put(&m, 0, 2, 0x1000, 16, F_NEXT, 5);
        put(&m, 0, 5, 0x2000, 512, F_NEXT | F_WRITE, 7);
        put(&m, 0, 7, 0x3000, 1, F_WRITE, 0);
        let got = walk(&m, GuestAddress(0), 8, 2).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(
            got[1],
            Desc {
                addr: GuestAddress(0x2000),
                len: 512,
                write_only: true
            }
        );
        // An indirect table of two at 0x8000.
        put(&m, 0, 1, 0x8000, 32, F_INDIRECT, 0);
        put(&m, 0x8000, 0, 0x1000, 16, F_NEXT, 1);
        put(&m, 0x8000, 1, 0x3000, 1, F_WRITE, 0);
        assert_eq!(walk(&m, GuestAddress(0), 8, 1).unwrap().len(), 2);
    }

    #[test]
    fn malformed_chains_are_refused() {
        let m = mem();
        // A loop: 0 -> 1 -> 0.
        put(&m, 0, 0, 0x1000, 16, F_NEXT, 1);
        put(&m, 0, 1, 0x1000, 16, F_NEXT, 0);
        assert_eq!(walk(&m, GuestAddress(0), 8, 0), None);
        // A next past the table; a head past the table.
        put(&m, 0, 2, 0x1000, 16, F_NEXT, 9);
        assert_eq!(walk(&m, GuestAddress(0), 8, 2), None);
        assert_eq!(walk(&m, GuestAddress(0), 8, 8), None);
        // An indirect table outside guest memory, and a nested indirect.
        put(&m, 0, 3, 1 << 40, 32, F_INDIRECT, 0);
        assert_eq!(walk(&m, GuestAddress(0), 8, 3), None);
        put(&m, 0, 4, 0x8000, 16, F_INDIRECT, 0);
        put(&m, 0x8000, 0, 0x9000, 16, F_INDIRECT, 0);
        assert_eq!(walk(&m, GuestAddress(0), 8, 4), None);
        // A table outside guest memory.
        assert_eq!(walk(&m, GuestAddress(1 << 40), 8, 0), None);
    }
}
