//! `extblk bench`: a load generator for any vhost-user-blk socket, through libblkio (as fio's
//! libblkio engine does). One thread per queue keeps `iodepth` requests in flight; it reports
//! IOPS, MB/s and latency percentiles, with a progress line while it runs.

use crate::rng::Rng;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use blkio::{Blkio, Completion, ReqFlags};
use clap::ValueEnum;
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pattern {
    Randwrite,
    Randread,
    Write,
    Read,
    /// Random writes, each block at most once: every write allocates on a fresh image.
    RandwriteAlloc,
    /// Random writes with a FLUSH after every 16 writes on each queue.
    WriteFlush,
}

pub struct BenchOptions {
    pub socket: String,
    pub pattern: Pattern,
    pub bs: u64,
    pub iodepth: usize,
    pub queues: usize,
    pub runtime: Duration,
    /// Bytes of the disk to use (from offset 0); default the whole disk.
    pub size: Option<u64>,
    pub progress: bool,
    /// Stop each queue after its share of the disk was covered once (sequential and
    /// allocating patterns).
    pub once: bool,
    /// Run the seed's background load (allocating writes and discards beyond `size`) on an
    /// extra queue.
    pub background: bool,
    /// Stop after this many requests in all (shared among the queues).
    pub ios: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub pattern: Pattern,
    pub bs: u64,
    pub iodepth: usize,
    pub queues: usize,
    pub seconds: f64,
    pub ios: u64,
    pub iops: f64,
    pub mb_per_s: f64,
    pub lat_mean_us: f64,
    pub lat_p50_us: f64,
    pub lat_p99_us: f64,
    pub lat_p999_us: f64,
}

/// The request-size granularity: virtio-blk's 512-byte sector.
const SECTOR: u64 = crate::units::SECTOR_SIZE;
/// The buffer region's length is rounded up to this: libblkio wants a multiple of its
/// `mem-region-alignment` (a page), and 2 MiB is one for any page size, huge pages included.
const REGION_ROUNDING: usize = 2 << 20;
/// Disk beyond `--size` the background load needs, so its allocating writes and discards have
/// room of their own.
const BACKGROUND_SPAN: u64 = 64 << 20;
/// The byte the request buffers are filled with: non-zero, so nothing can shortcut zeroes.
const FILL: u8 = 0xA5;
/// `user_data` of a FLUSH: no request slot has this index.
const FLUSH_TAG: usize = usize::MAX;
/// Writes between two FLUSHes on a queue, in the write-flush pattern.
const WRITES_PER_FLUSH: u32 = 16;
/// Latencies each queue has room for up front (4 MiB), so recording one rarely allocates.
const LATENCIES_RESERVED: usize = 1 << 20;
/// Queue 0's generator seed (2⁶⁴/φ, the usual odd mixing constant); queue k's is xored with
/// k + 1, so every queue draws its own sequence, the same in every run.
const QUEUE_SEED: u64 = 0x9E37_79B9_7F4A_7C15;
/// How often the main thread checks the runtime and updates the progress line.
const TICK: Duration = Duration::from_millis(50);

pub fn run(o: &BenchOptions) -> anyhow::Result<BenchResult> {
    if o.bs == 0 || o.bs % SECTOR != 0 {
        bail!("--bs must be a positive multiple of 512");
    }
    let extra = usize::from(o.background);
    let (mut b, mut queues, capacity) = connect(o, o.queues + extra)?;
    let size = o.size.unwrap_or(capacity).min(capacity);
    let blocks = size / o.bs;
    if blocks < (o.queues * o.iodepth) as u64 {
        bail!(
            "the disk ({size} bytes) is too small for {} requests of {} bytes in flight",
            o.queues * o.iodepth,
            o.bs
        );
    }
    let slot = o.bs as usize * o.iodepth;
    let bg_slot = BG_DEPTH * BG_BLOCK as usize;
    let region_len =
        (slot * o.queues + bg_slot * extra).div_ceil(REGION_ROUNDING) * REGION_ROUNDING;
    if o.background && capacity < size + BACKGROUND_SPAN {
        bail!("--background needs at least 64 MiB of disk beyond --size");
    }
    let region = map_buffers(&mut b, region_len)?;
    let done_ios = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let mut handles = Vec::new();
    if o.background {
        let q = queues.pop().expect("the background queue");
        let base = region.addr + slot * o.queues;
        let stop = stop.clone();
        handles.push(std::thread::spawn(move || {
            background(q, base, size, capacity, &stop).map(|()| Vec::new())
        }));
    }
    for (qi, q) in queues.drain(..).enumerate() {
        let (done_ios, stop) = (done_ios.clone(), stop.clone());
        let nq = o.queues as u64;
        let job = QueueJob {
            qi,
            pattern: o.pattern,
            bs: o.bs,
            depth: o.iodepth,
            blocks,
            share: blocks / nq,
            once: o.once,
            ios_limit: o
                .ios
                .map_or(u64::MAX, |n| n / nq + u64::from((qi as u64) < n % nq)),
            base: region.addr + qi * slot,
        };
        handles.push(std::thread::spawn(move || {
            run_queue(q, job, &done_ios, &stop)
        }));
    }
    wait_with_progress(o, t0, &handles, &done_ios);
    stop.store(true, Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    let mut lat: Vec<u32> = Vec::new();
    for h in handles {
        let l = h
            .join()
            .map_err(|_| anyhow!("a queue thread panicked"))?
            .map_err(|e| anyhow!(e))
            .context("benchmark")?;
        lat.extend(l);
    }
    if o.progress {
        eprintln!();
    }
    Ok(summarize(o, secs, lat))
}

/// Connects libblkio to the socket with `num_queues` queues and starts it: the handle, its
/// queues and the disk's capacity in bytes.
fn connect(
    o: &BenchOptions,
    num_queues: usize,
) -> anyhow::Result<(Blkio, Vec<blkio::Blkioq>, u64)> {
    let mut b =
        Blkio::new("virtio-blk-vhost-user").map_err(|e| anyhow!("libblkio: {}", e.message()))?;
    b.set_str("path", &o.socket)
        .map_err(|e| anyhow!("{}", e.message()))?;
    b.connect()
        .map_err(|e| anyhow!("cannot connect to {}: {}", o.socket, e.message()))?;
    b.set_i32("num-queues", num_queues as i32)
        .map_err(|e| anyhow!("{}", e.message()))?;
    let capacity = b
        .get_u64("capacity")
        .map_err(|e| anyhow!("{}", e.message()))?;
    let started = b
        .start()
        .map_err(|e| anyhow!("cannot start: {}", e.message()))?;
    Ok((b, started.queues, capacity))
}

/// The request buffers: one region of `len` bytes shared with the backend, filled with
/// [`FILL`].
fn map_buffers(b: &mut Blkio, len: usize) -> anyhow::Result<blkio::MemoryRegion> {
    let region = b
        .alloc_mem_region(len)
        .map_err(|e| anyhow!("{}", e.message()))?;
    b.map_mem_region(&region)
        .map_err(|e| anyhow!("{}", e.message()))?;
    // SAFETY: the region is a fresh mapping of `len` bytes that only this benchmark uses.
    unsafe { std::ptr::write_bytes(region.addr as *mut u8, FILL, len) };
    Ok(region)
}

/// What one measured queue does: its pattern over its part of the disk, from its buffers.
struct QueueJob {
    qi: usize,
    pattern: Pattern,
    bs: u64,
    depth: usize,
    /// Blocks of `bs` bytes in the measured part of the disk.
    blocks: u64,
    /// This queue's share of them (sequential and allocating patterns).
    share: u64,
    once: bool,
    /// This queue's part of `--ios`.
    ios_limit: u64,
    /// This queue's buffers: `depth` slots of `bs` bytes.
    base: usize,
}

/// Which block a measured queue's next request goes to, by its pattern.
struct BlockPicker {
    pattern: Pattern,
    /// The first block of this queue's share, and its length.
    from: u64,
    share: u64,
    blocks: u64,
    /// Sequential patterns: requests picked so far (each queue walks its own share).
    seq: u64,
    /// Allocating pattern: a pseudo-random permutation of this queue's share.
    perm: Permutation,
}

impl BlockPicker {
    fn new(job: &QueueJob, key: u64) -> BlockPicker {
        BlockPicker {
            pattern: job.pattern,
            from: job.qi as u64 * job.share,
            share: job.share,
            blocks: job.blocks,
            seq: 0,
            perm: Permutation::new(job.share, key),
        }
    }

    fn next(&mut self, rng: &mut Rng) -> u64 {
        self.seq += 1;
        match self.pattern {
            Pattern::Write | Pattern::Read => self.from + (self.seq - 1) % self.share,
            Pattern::RandwriteAlloc => self.from + self.perm.next(),
            _ => rng.next() % self.blocks,
        }
    }
}

/// One measured queue: keeps `depth` requests in flight until `stop` (or its limit), and
/// returns each request's latency in microseconds.
fn run_queue(
    mut q: blkio::Blkioq,
    job: QueueJob,
    done_ios: &AtomicU64,
    stop: &AtomicBool,
) -> Result<Vec<u32>, String> {
    let (pattern, bs, depth, base) = (job.pattern, job.bs, job.depth, job.base);
    let mut rng = Rng::new(QUEUE_SEED ^ (job.qi as u64 + 1));
    let mut picker = BlockPicker::new(&job, rng.next());
    // With --once, a queue stops after covering its share once.
    let once_limit = if job.once { job.share } else { u64::MAX }.min(job.ios_limit);
    let write = !matches!(pattern, Pattern::Read | Pattern::Randread);
    let mut lat: Vec<u32> = Vec::with_capacity(LATENCIES_RESERVED);
    let mut started_at = vec![Instant::now(); depth];
    let mut since_flush = 0u32;
    let submit = |q: &mut blkio::Blkioq, slot_i: usize, blk: u64| {
        let buf = base + slot_i * bs as usize;
        if write {
            q.write(
                blk * bs,
                buf as *const u8,
                bs as usize,
                slot_i,
                ReqFlags::empty(),
            );
        } else {
            q.read(
                blk * bs,
                buf as *mut u8,
                bs as usize,
                slot_i,
                ReqFlags::empty(),
            );
        }
    };
    let mut submitted = 0u64;
    for (i, at) in started_at.iter_mut().enumerate() {
        if submitted >= once_limit {
            break;
        }
        submitted += 1;
        let blk = picker.next(&mut rng);
        *at = Instant::now();
        submit(&mut q, i, blk);
    }
    let mut comps: Vec<MaybeUninit<Completion>> =
        (0..depth).map(|_| MaybeUninit::uninit()).collect();
    let mut inflight = submitted as usize;
    while inflight > 0 {
        let n = q
            .do_io(&mut comps, 1, None, None)
            .map_err(|e| e.message().to_string())?;
        let now = Instant::now();
        for c in &comps[..n] {
            // SAFETY: do_io initialised these n completions.
            let c = unsafe { c.assume_init_read() };
            if c.ret != 0 {
                return Err(format!("request failed: errno {}", -c.ret));
            }
            inflight -= 1;
            if c.user_data == FLUSH_TAG {
                continue;
            }
            let i = c.user_data;
            lat.push(
                now.duration_since(started_at[i])
                    .as_micros()
                    .min(u32::MAX as u128) as u32,
            );
            done_ios.fetch_add(1, Ordering::Relaxed);
            if pattern == Pattern::WriteFlush {
                since_flush += 1;
                if since_flush == WRITES_PER_FLUSH {
                    since_flush = 0;
                    q.flush(FLUSH_TAG, ReqFlags::empty());
                    inflight += 1;
                }
            }
            if !stop.load(Ordering::Relaxed) && submitted < once_limit {
                submitted += 1;
                let blk = picker.next(&mut rng);
                started_at[i] = Instant::now();
                submit(&mut q, i, blk);
                inflight += 1;
            }
        }
    }
    Ok(lat)
}

/// The main thread while the queues run: until the runtime is over or every queue is done,
/// with a progress line (IOPS so far) once a second when asked.
fn wait_with_progress<T>(
    o: &BenchOptions,
    t0: Instant,
    handles: &[std::thread::JoinHandle<T>],
    done_ios: &AtomicU64,
) {
    let mut last = 0;
    while t0.elapsed() < o.runtime && !handles.iter().all(|h| h.is_finished()) {
        std::thread::sleep(TICK.min(o.runtime.saturating_sub(t0.elapsed())));
        if o.progress && t0.elapsed().as_millis() / 1000 != last {
            last = t0.elapsed().as_millis() / 1000;
            let ios = done_ios.load(Ordering::Relaxed);
            eprint!(
                "\r{:?} {:>5.1}s {:>10.0} IOPS",
                o.pattern,
                t0.elapsed().as_secs_f64(),
                ios as f64 / t0.elapsed().as_secs_f64()
            );
        }
    }
}

/// The result: throughput over `secs`, and latency mean and percentiles over every request.
fn summarize(o: &BenchOptions, secs: f64, mut lat: Vec<u32>) -> BenchResult {
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
    };
    let ios = lat.len() as u64;
    BenchResult {
        pattern: o.pattern,
        bs: o.bs,
        iodepth: o.iodepth,
        queues: o.queues,
        seconds: secs,
        ios,
        iops: ios as f64 / secs,
        mb_per_s: ios as f64 * o.bs as f64 / secs / 1e6,
        lat_mean_us: lat.iter().map(|&x| x as f64).sum::<f64>() / lat.len().max(1) as f64,
        lat_p50_us: pct(0.50),
        lat_p99_us: pct(0.99),
        lat_p999_us: pct(0.999),
    }
}

/// Requests in flight on the background queue.
const BG_DEPTH: usize = 8;
/// The background load's write size and block: 4 KiB, the image's block.
const BG_BLOCK: u64 = 4096;
/// Every this many background requests, one is a discard (the others are writes).
const BG_DISCARD_EVERY: u64 = 4;
/// A background discard's length in blocks (64 KiB), and its alignment.
const BG_DISCARD_BLOCKS: u64 = 16;
/// The background load's generator seed: fixed, so the load replays.
const BG_SEED: u64 = 0xB6;

/// The seed's background load, on its own queue beyond the measured region: allocating 4 KiB
/// writes, and every fourth request a 64 KiB discard, until `stop`. Not counted.
fn background(
    mut q: blkio::Blkioq,
    base: usize,
    from: u64,
    to: u64,
    stop: &AtomicBool,
) -> Result<(), String> {
    let mut rng = Rng::new(BG_SEED);
    let (first, blocks) = (from / BG_BLOCK, (to - from) / BG_BLOCK);
    let mut n = 0u64;
    let mut submit = |q: &mut blkio::Blkioq, slot: usize, rng: &mut Rng| {
        n += 1;
        let off = rng.next() % (blocks - BG_DISCARD_BLOCKS);
        let blk = first + off;
        if n % BG_DISCARD_EVERY == 0 {
            let at = first + (off & !(BG_DISCARD_BLOCKS - 1));
            q.discard(
                at * BG_BLOCK,
                BG_DISCARD_BLOCKS * BG_BLOCK,
                slot,
                ReqFlags::empty(),
            );
        } else {
            let buf = (base + slot * BG_BLOCK as usize) as *const u8;
            q.write(
                blk * BG_BLOCK,
                buf,
                BG_BLOCK as usize,
                slot,
                ReqFlags::empty(),
            );
        }
    };
    for slot in 0..BG_DEPTH {
        submit(&mut q, slot, &mut rng);
    }
    let mut comps: Vec<MaybeUninit<Completion>> =
        (0..BG_DEPTH).map(|_| MaybeUninit::uninit()).collect();
    let mut inflight = BG_DEPTH;
    while inflight > 0 {
        let got = q
            .do_io(&mut comps, 1, None, None)
            .map_err(|e| e.message().to_string())?;
        for c in &comps[..got] {
            // SAFETY: do_io initialised these completions.
            let c = unsafe { c.assume_init_read() };
            if c.ret != 0 {
                return Err(format!("background request failed: errno {}", -c.ret));
            }
            inflight -= 1;
            if !stop.load(Ordering::Relaxed) {
                submit(&mut q, c.user_data, &mut rng);
                inflight += 1;
            }
        }
    }
    Ok(())
}

/// A pseudo-random permutation of `0..n`: a bijective mix of a counter over the next power of
/// two, skipping values ≥ n (cycle walking). Neighbouring outputs are far apart, so allocating
/// writes are truly scattered.
struct Permutation {
    n: u64,
    bits: u32,
    counter: u64,
    key: u64,
}

impl Permutation {
    fn new(n: u64, key: u64) -> Permutation {
        let bits = (64 - n.max(2).saturating_sub(1).leading_zeros()).max(2);
        Permutation {
            n: n.max(1),
            bits,
            counter: 0,
            key,
        }
    }

    fn mix(&self, x: u64) -> u64 {
        // Each step is a bijection on `bits`-bit values: xor with a shifted copy of itself,
        // multiplication by an odd constant, addition of a key (all modulo 2^bits).
        let mask = if self.bits == 64 {
            u64::MAX
        } else {
            (1 << self.bits) - 1
        };
        let h = self.bits / 2;
        let mut x = x & mask;
        x = (x ^ (x >> h)) & mask;
        x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15) & mask;
        x = (x ^ (x >> h)) & mask;
        x = x.wrapping_add(self.key) & mask;
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9) & mask;
        (x ^ (x >> h)) & mask
    }

    fn next(&mut self) -> u64 {
        loop {
            let v = self.mix(self.counter);
            self.counter = self.counter.wrapping_add(1);
            if v < self.n {
                return v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Permutation;

    #[test]
    fn permutation_covers_every_block_once() {
        for n in [1u64, 2, 3, 1000, 4096, 65_537] {
            let mut p = Permutation::new(n, 12345);
            let mut seen = vec![false; n as usize];
            for _ in 0..n {
                let v = p.next();
                assert!(!seen[v as usize], "{v} twice for n={n}");
                seen[v as usize] = true;
            }
        }
        // Scattered: consecutive outputs are rarely neighbours.
        let mut p = Permutation::new(1 << 18, 7);
        let v: Vec<u64> = (0..10_000).map(|_| p.next()).collect();
        let adjacent = v.windows(2).filter(|w| w[0].abs_diff(w[1]) <= 2).count();
        assert!(adjacent < 10, "{adjacent} near-neighbour steps");
    }
}
