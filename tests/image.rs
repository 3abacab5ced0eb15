//! Images through the library, judged by e2fsprogs and the kernel: create, random mapping
//! workloads against a model, reopen, journal replay.

mod common;
use common::{e2fsck_clean, skip_or_fail, Scratch};

use extblk::rng::Rng;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use extblk::image::create::create_path;
use extblk::image::{Image, OpenOptions, RunKind};
use extblk::io::backing::Backing;
use extblk::io::{BlockIo, FileIo};
use extblk::mapping::tree::Lookup;

fn open(path: &Path, read_only: bool) -> Image {
    let io: Arc<dyn BlockIo> = Arc::new(FileIo::new(backing(path, read_only)));
    Image::open(io, OpenOptions { read_only }).unwrap()
}

/// Opens and locks `path`, waiting out a lock held only for an instant: a child that another
/// test thread is spawning shares this process's descriptors (and their flocks) until it execs.
fn backing(path: &Path, read_only: bool) -> Backing {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match Backing::open(path, read_only) {
            Err(extblk::io::backing::OpenError::Locked(_))
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            r => return r.unwrap(),
        }
    }
}

/// Lets e2fsck replay the journal (`-fy`); its recovery must find nothing damaged.
fn e2fsck_replay(path: &Path) {
    let out = Command::new("e2fsck")
        .args(["-fy", "-E", "no_optimize_extents"])
        .arg(path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.code().unwrap_or(8) <= 1,
        "e2fsck -fy failed:\n{text}"
    );
    for bad in [
        "checksum error",
        "Invalid checksum",
        "corrupt",
        "was not replayed",
        "aborted",
    ] {
        assert!(
            !text.contains(bad),
            "e2fsck's journal recovery complained ({bad}):\n{text}"
        );
    }
}

/// `dumpe2fs` reads every group and the journal superblock without complaint, and sees a clean
/// extblk filesystem with the documented features.
fn dumpe2fs_ok(path: &Path) {
    let out = Command::new("dumpe2fs").arg(path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "dumpe2fs failed: {err}");
    for want in [
        "Filesystem features:      has_journal ext_attr sparse_super2 filetype extent 64bit flex_bg sparse_super large_file huge_file dir_nlink extra_isize metadata_csum",
        "Filesystem state:         clean",
        "Journal features:         journal_incompat_revoke journal_64bit journal_checksum_v3",
        "Checksum type:            crc32c",
    ] {
        assert!(text.contains(want), "dumpe2fs lacks {want:?}:\n{}", &text[..text.len().min(3000)]);
    }
    assert!(
        !err.to_lowercase().contains("corrupt") && !err.contains("checksum"),
        "{err}"
    );
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    Hole,
    Unwritten,
    Written(u64),
}

fn stamp(lblk: u64, gen: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    for (i, c) in b.chunks_mut(8).enumerate() {
        c.copy_from_slice(&(lblk << 32 ^ gen << 16 ^ i as u64).to_le_bytes());
    }
    b
}

fn check_model(img: &Image, model: &[St]) {
    for r in img.runs() {
        for l in r.lblk..r.lblk + r.len {
            let want = model[l as usize];
            let ok = matches!(
                (r.kind, want),
                (RunKind::Hole, St::Hole)
                    | (RunKind::Unwritten, St::Unwritten)
                    | (RunKind::Data, St::Written(_))
            );
            assert!(ok, "block {l}: image {:?}, model {want:?}", r.kind);
        }
    }
}

#[test]
fn created_images_pass_e2fsck() {
    let s = Scratch::new("create");
    for size in ["64M", "1G", "300G"] {
        let p = s.path(&format!("{size}.img"));
        let bytes = extblk::units::parse_size(size).unwrap().0;
        create_path(&p, bytes, None, false).unwrap();
        e2fsck_clean(&p);
        dumpe2fs_ok(&p);
        let img = open(&p, true);
        assert_eq!(img.disk_size(), bytes);
        assert_eq!(img.runs().len(), 1, "a new disk is one hole");
    }
}

#[test]
fn random_mapping_workload_matches_the_model_and_e2fsck() {
    let s = Scratch::new("workload");
    let p = s.path("w.img");
    const BLOCKS: u64 = 16384;
    create_path(&p, BLOCKS * 4096, None, false).unwrap();
    let mut model = vec![St::Hole; BLOCKS as usize];
    let mut img = open(&p, false);
    let mut rng = Rng::new(0x1234_5678);
    let ops = std::env::var("EXTBLK_TREE_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000u64);
    for i in 0..ops {
        let len = 1 + if rng.below(8) == 0 {
            rng.below(600)
        } else {
            rng.below(6)
        };
        let a = rng.below(BLOCKS - len);
        match rng.below(10) {
            0..=3 => {
                img.allocate(a, len).unwrap();
                for l in a..a + len {
                    if model[l as usize] == St::Hole {
                        model[l as usize] = St::Unwritten;
                    }
                }
            }
            4..=6 => {
                // Write data into the unwritten blocks, then convert: the write path's order.
                for e in img
                    .tree()
                    .range(a as u32, (a + len) as u32)
                    .into_iter()
                    .filter(|e| e.unwritten)
                {
                    for k in 0..e.len {
                        let l = u64::from(e.lblk + k);
                        img.io()
                            .write_at(&stamp(l, i), (e.pblk + u64::from(k)) * 4096)
                            .unwrap();
                        model[l as usize] = St::Written(i);
                    }
                }
                img.convert(a, len).unwrap();
            }
            7 => {
                img.zero(a, len).unwrap();
                for l in a..a + len {
                    if let St::Written(_) = model[l as usize] {
                        model[l as usize] = St::Unwritten;
                    }
                }
            }
            _ => {
                img.punch(a, len).unwrap();
                model[a as usize..(a + len) as usize].fill(St::Hole);
            }
        }
        if i % 64 == 0 || img.should_commit() {
            img.commit().unwrap();
        }
        if i % 5000 == 0 {
            check_model(&img, &model);
        }
    }
    check_model(&img, &model);
    let extents = img.tree().extent_count();
    assert!(
        extents > 100,
        "the workload should fragment the disk ({extents} extents)"
    );
    img.close().unwrap();
    e2fsck_clean(&p);
    dumpe2fs_ok(&p);

    // Reopen: same mapping; the bytes of every written block are the last ones written.
    let img = open(&p, true);
    check_model(&img, &model);
    let mut buf = vec![0u8; 4096];
    for r in img.runs().into_iter().filter(|r| r.kind == RunKind::Data) {
        for k in 0..r.len {
            img.read_block(r.pblk.unwrap() + k, &mut buf).unwrap();
            let l = r.lblk + k;
            let St::Written(gen) = model[l as usize] else {
                unreachable!()
            };
            assert!(buf == stamp(l, gen), "block {l} holds the wrong data");
        }
    }
    drop(img);
    loop_mount_matches(&p, &model);
}

/// Mounts the image read-only with the kernel's ext4 and compares `/disk` with the model.
fn loop_mount_matches(p: &Path, model: &[St]) {
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/loop-control").exists() {
        skip_or_fail("loop mount check needs root and loop devices (/dev/loop-control)");
        return;
    }
    let mnt = p.with_extension("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let st = Command::new("mount")
        .args(["-o", "loop,ro,noload"])
        .arg(p)
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(st.success(), "kernel refused to mount the image");
    let data = std::fs::read(mnt.join("disk"));
    let _ = Command::new("umount").arg(&mnt).status();
    let data = data.unwrap();
    assert_eq!(data.len(), model.len() * 4096);
    for (l, st) in model.iter().enumerate() {
        let got = &data[l * 4096..(l + 1) * 4096];
        match st {
            St::Written(gen) => assert!(
                got == stamp(l as u64, *gen).as_slice(),
                "kernel reads wrong data at block {l}"
            ),
            _ => assert!(
                got.iter().all(|&b| b == 0),
                "kernel reads non-zero data in unwritten/hole block {l}"
            ),
        }
    }
}

#[test]
fn reopen_after_crash_replays_committed_metadata() {
    let s = Scratch::new("crash");
    let p = s.path("c.img");
    create_path(&p, 64 << 20, None, false).unwrap();
    let mut img = open(&p, false);
    img.allocate(100, 50).unwrap();
    img.convert(100, 20).unwrap();
    img.commit().unwrap();
    img.allocate(1000, 5).unwrap(); // never committed: must vanish
                                    // "Crash": drop without close. The log holds one transaction; needs_recovery is set.
    drop(img);
    let ro = open(&p, true);
    assert_eq!(ro.recovery().transactions, 1);
    let runs: BTreeMap<u64, RunKind> = ro.runs().iter().map(|r| (r.lblk, r.kind)).collect();
    assert_eq!(runs.get(&100), Some(&RunKind::Data));
    assert_eq!(runs.get(&120), Some(&RunKind::Unwritten));
    assert!(!runs.contains_key(&1000));
    drop(ro);
    // e2fsck replays it itself and then finds everything consistent.
    let copy = s.path("copy.img");
    std::fs::copy(&p, &copy).unwrap();
    let out = Command::new("e2fsck")
        .args(["-fy"])
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        out.status.code().unwrap() <= 1,
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    e2fsck_clean(&copy);
    // Our own replay leaves the same clean image.
    let img = open(&p, false);
    img.close().unwrap();
    e2fsck_clean(&p);
}

#[test]
fn a_freed_tree_block_is_revoked_and_never_replayed_over() {
    let s = Scratch::new("revoke");
    let p = s.path("r.img");
    create_path(&p, 64 << 20, None, false).unwrap();
    let mut img = open(&p, false);
    for k in 0..8 {
        img.allocate(k * 10, 1).unwrap();
    }
    img.commit().unwrap();
    let leaf = img.tree().node_blocks();
    assert_eq!(leaf.len(), 1, "eight extents need one leaf block");
    let leaf = leaf[0];
    img.punch(0, 100).unwrap();
    // Also map something new, so a replay that stopped early would be visible.
    img.allocate(5000, 3).unwrap();
    img.commit().unwrap();
    assert!(img.tree().node_blocks().is_empty());
    let final_runs = img.runs();
    // Crash with both transactions in the log, then replay two ways.
    drop(img);
    let copy = s.path("copy.img");
    std::fs::copy(&p, &copy).unwrap();
    let logdump = Command::new("debugfs")
        .args(["-R", "logdump"])
        .arg(&copy)
        .output()
        .unwrap();
    let logdump = String::from_utf8_lossy(&logdump.stdout).to_string();
    assert!(
        logdump.contains("revoke table"),
        "the log holds no revoke block:\n{logdump}"
    );
    let img = open(&p, false);
    let mut b = vec![0u8; 4096];
    img.read_block(leaf, &mut b).unwrap();
    assert!(
        b.iter().all(|&x| x == 0),
        "replay wrote the revoked leaf block home"
    );
    img.close().unwrap();
    e2fsck_clean(&p);
    e2fsck_replay(&copy);
    assert_eq!(
        open(&copy, true).runs(),
        final_runs,
        "e2fsck did not replay both transactions"
    );
    let data = std::fs::read(&copy).unwrap();
    assert!(
        data[(leaf * 4096) as usize..(leaf * 4096 + 4096) as usize]
            .iter()
            .all(|&x| x == 0),
        "e2fsck replayed the revoked block: we did not revoke it"
    );
}

fn extblk() -> Command {
    Command::new(env!("CARGO_BIN_EXE_extblk"))
}

/// Builds a small image with a two-level tree, closed cleanly.
fn fragmented_image(p: &Path) -> extblk::ext4::layout::Layout {
    let layout = create_path(p, 64 << 20, None, false).unwrap();
    let mut img = open(p, false);
    for k in 0..1500u64 {
        img.allocate(k * 7 % 16000, 1).unwrap();
        if k % 300 == 0 {
            img.commit().unwrap();
        }
    }
    img.convert(0, 8000).unwrap();
    img.close().unwrap();
    layout
}

#[test]
fn a_flipped_byte_in_any_metadata_block_is_reported() {
    let s = Scratch::new("flip");
    let p = s.path("f.img");
    let layout = fragmented_image(&p);
    e2fsck_clean(&p);
    let img = open(&p, true);
    assert!(img.tree().depth() >= 1);
    let mut regions: Vec<(String, u64, std::ops::Range<usize>)> = vec![
        ("superblock".into(), 0, 1024..2048),
        ("group descriptors".into(), 1, 0..4096),
        ("block bitmap".into(), layout.block_bitmap(0), 0..4096),
        ("inode bitmap".into(), layout.inode_bitmap(0), 0..4096),
        ("inode table".into(), layout.inode_table(0), 0..4096),
        ("root directory".into(), layout.root_dir_block(), 0..4096),
        ("lost+found".into(), layout.lost_found_block(), 0..4096),
        (
            "journal superblock".into(),
            layout.journal_runs()[0].0,
            0..4096,
        ),
    ];
    for b in img.tree().node_blocks() {
        regions.push((format!("extent block {b}"), b, 0..4096));
    }
    drop(img);
    let original = std::fs::read(&p).unwrap();
    let mut rng = Rng::new(99);
    let mut tried = 0;
    for (what, blk, range) in &regions {
        for _ in 0..12 {
            let off = blk * 4096
                + (range.start + rng.below((range.end - range.start) as u64) as usize) as u64;
            let mut data = original.clone();
            data[off as usize] ^= 0x40;
            std::fs::write(&p, &data).unwrap();
            let out = extblk().arg("check").arg(&p).output().unwrap();
            assert_eq!(
                out.status.code(),
                Some(1),
                "flip at byte {off} of the {what} was not reported: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            tried += 1;
        }
    }
    assert!(tried >= 100);
}

#[test]
fn tools_report_in_human_and_json_form() {
    let s = Scratch::new("tools");
    let p = s.path("t.img");
    fragmented_image(&p);
    let out = extblk()
        .args(["info", "--output", "json"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["virtual_size"], 64 << 20);
    assert_eq!(v["state"], "clean");
    assert!(v["extents"].as_u64().unwrap() > 4);
    let out = extblk()
        .args(["map", "--output", "json"])
        .arg(&p)
        .output()
        .unwrap();
    let runs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let total: u64 = runs.iter().map(|r| r["length"].as_u64().unwrap()).sum();
    assert_eq!(total, 64 << 20, "map covers the whole disk");
    assert!(
        runs.iter().any(|r| r["kind"] == "data") && runs.iter().any(|r| r["kind"] == "unwritten")
    );
    let out = extblk()
        .args(["check", "--output", "json"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["problems"].as_array().unwrap().len(), 0);
    // Not an image at all: could not check.
    let junk = s.path("junk");
    std::fs::write(&junk, vec![7u8; 1 << 20]).unwrap();
    let out = extblk().arg("check").arg(&junk).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = extblk().arg("info").arg(&junk).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an ext4 filesystem"));
}

#[test]
fn every_cut_of_the_journal_replays_to_a_committed_prefix() {
    use extblk::io::record::{apply, IoEvent, RecordingIo};
    let s = Scratch::new("cuts");
    let p = s.path("c.img");
    create_path(&p, 64 << 20, Some(1024), false).unwrap();
    let base = std::fs::read(&p).unwrap();
    let rec = Arc::new(RecordingIo::new(Arc::new(FileIo::new(backing(&p, false)))));
    let mut img = Image::open(rec.clone(), OpenOptions::default()).unwrap();
    // Four transactions, each changing the mapping differently; the third frees the tree's
    // leaf (a revoke record) and the fourth rebuilds a two-level tree.
    let mut snapshots = vec![img.runs()];
    let mut commit_at = Vec::new();
    type Step = Box<dyn Fn(&mut Image)>;
    let steps: Vec<Step> = vec![
        Box::new(|i| {
            i.allocate(10, 100).unwrap();
        }),
        Box::new(|i| {
            for k in 0..20 {
                i.allocate(1000 + k * 3, 1).unwrap();
            }
            i.convert(10, 50).unwrap();
        }),
        Box::new(|i| {
            i.punch(900, 2000).unwrap();
            i.zero(20, 10).unwrap();
        }),
        Box::new(|i| {
            for k in 0..300 {
                i.allocate(4000 + k * 37, 2).unwrap();
            }
        }),
    ];
    for step in &steps {
        step(&mut img);
        img.commit().unwrap();
        // The commit block is the write just before the final barrier (its Write, its
        // Complete, then the barrier's FlushStart and FlushEnd).
        let events = rec.events();
        assert_eq!(events.last(), Some(&IoEvent::FlushEnd));
        assert!(matches!(events[events.len() - 4], IoEvent::Write { .. }));
        commit_at.push(events.len() - 4);
        snapshots.push(img.runs());
    }
    drop(img);
    let events = rec.events();
    let work = s.path("cut.img");
    let mut judged = 0;
    for cut in 0..=events.len() {
        let mut state = base.clone();
        apply(&mut state, &events[..cut]);
        std::fs::write(&work, &state).unwrap();
        let committed = commit_at.iter().filter(|&&c| c < cut).count();
        let img = open(&work, true);
        assert_eq!(
            img.runs(),
            snapshots[committed],
            "cut {cut}: replay is not the state after {committed} commits"
        );
        let report = extblk::check::check(&img, "cut".into());
        assert!(
            report.problems.is_empty(),
            "cut {cut}: {:?}",
            report.problems
        );
        drop(img);
        // e2fsprogs as the second judge, on every other cut and every commit boundary.
        if cut % 2 == 0 || commit_at.contains(&cut) {
            e2fsck_replay(&work);
            e2fsck_clean(&work);
            assert_eq!(
                open(&work, true).runs(),
                snapshots[committed],
                "cut {cut}: e2fsck's replay differs from ours"
            );
            judged += 1;
        }
    }
    assert!(judged > 10 && events.len() > 30, "{} events", events.len());
}

#[test]
fn an_abort_is_recorded_like_ext4_and_reported() {
    let s = Scratch::new("abort");
    let p = s.path("a.img");
    create_path(&p, 64 << 20, None, false).unwrap();
    let mut img = open(&p, false);
    img.allocate(0, 10).unwrap();
    img.commit().unwrap();
    img.allocate(100, 10).unwrap();
    img.abort(libc::EIO, "write_data", 1234).unwrap();
    assert!(
        img.allocate(200, 1).is_err(),
        "an aborted image takes no more changes"
    );
    assert!(img.commit().is_err());
    drop(img);
    // Reopen: the committed transaction is replayed, the aborted one is gone, the error shows.
    let ro = open(&p, true);
    assert!(ro.superblock().has_errors());
    assert_eq!(
        ro.superblock().error.first_errcode,
        extblk::ext4::superblock::ERRCODE_EIO
    );
    assert_eq!(ro.journal_superblock().errno, -libc::EIO);
    let runs = ro.runs();
    assert_eq!(runs[0].kind, RunKind::Unwritten);
    assert!(runs
        .iter()
        .all(|r| r.lblk != 100 || r.kind == RunKind::Hole));
    drop(ro);
    let out = extblk().arg("info").arg(&p).output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("error"),
        "info shows the error state"
    );
    let out = extblk().arg("check").arg(&p).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "check reports the recorded error"
    );
    // e2fsck sees it too ("contains a file system with errors"), replays and clears it.
    let out = Command::new("e2fsck")
        .args(["-fy"])
        .arg(&p)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.code().unwrap() <= 1, "{text}");
    e2fsck_clean(&p);
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// mke2fs + debugfs: a filesystem with a sparse `/disk` holding `content` at block 5.
fn mke2fs_image(p: &Path, features: &[&str], content: &[u8]) {
    let f = std::fs::File::create(p).unwrap();
    f.set_len(1 << 30).unwrap();
    drop(f);
    let mut cmd = Command::new("mke2fs");
    cmd.args(["-q", "-F", "-t", "ext4", "-b", "4096"])
        .args(features)
        .arg(p);
    run_ok(&mut cmd);
    let src = p.with_extension("src");
    let mut disk = vec![0u8; 256 << 20];
    disk[5 * 4096..5 * 4096 + content.len()].copy_from_slice(content);
    std::fs::write(&src, &disk).unwrap();
    run_ok(
        Command::new("debugfs")
            .args(["-w", "-R"])
            .arg(format!("write {} disk", src.display()))
            .arg(p),
    );
    std::fs::remove_file(&src).unwrap();
}

#[test]
fn images_made_by_mke2fs_open_and_stay_consistent() {
    let s = Scratch::new("mke2fs");
    let content = stamp(5, 1);
    for (name, features) in [
        (
            "reference",
            vec![
                "-I", "256", "-m", "0", "-O",
                "none,has_journal,ext_attr,sparse_super,sparse_super2,filetype,extent,64bit,flex_bg,large_file,huge_file,dir_nlink,extra_isize,metadata_csum",
                "-E", "num_backup_sb=2,lazy_itable_init=0,lazy_journal_init=0",
            ],
        ),
        // Debian's default ext4 (resize_inode, dir_index, BLOCK_UNINIT groups).
        ("default", vec!["-E", "lazy_itable_init=0,lazy_journal_init=0"]),
    ] {
        let p = s.path(&format!("{name}.img"));
        mke2fs_image(&p, &features, &content);
        let mut img = open(&p, false);
        assert_eq!(img.disk_size(), 256 << 20, "{name}");
        let Lookup::Mapped(e) = img.lookup(5) else { panic!("{name}: block 5 not mapped") };
        let mut b = vec![0u8; 4096];
        img.read_block(e.pblk, &mut b).unwrap();
        assert_eq!(b, content, "{name}: /disk content");
        // Change it and close: the kernel's and e2fsprogs' structures must survive our writes.
        img.allocate(10_000, 3000).unwrap();
        img.punch(0, 8).unwrap();
        img.commit().unwrap();
        img.close().unwrap();
        e2fsck_clean(&p);
        let out = extblk().arg("check").arg(&p).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{name}: {}", String::from_utf8_lossy(&out.stdout));
    }
    // An incompatible feature set: a clear error naming the feature.
    let p = s.path("inline.img");
    mke2fs_image(&p, &["-O", "inline_data"], &content);
    let out = extblk().arg("info").arg(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unsupported ext4 feature: inline_data"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn create_formats_a_block_device() {
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/loop-control").exists() {
        skip_or_fail("block device test needs root and loop devices (/dev/loop-control)");
        return;
    }
    let s = Scratch::new("blockdev");
    let backing = s.path("dev.raw");
    // Old tenant's data everywhere: create must not leave any of it readable as metadata.
    std::fs::write(&backing, vec![0xA5u8; 300 << 20]).unwrap();
    let out = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&backing)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "losetup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let _detach = Detach(dev.clone());
    let out = extblk()
        .args(["create", "--size", "256M"])
        .arg(&dev)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "a device needs --force");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    let out = extblk()
        .args(["create", "--force", "--size", "256M"])
        .arg(&dev)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    e2fsck_clean(Path::new(&dev));
    let out = extblk()
        .args(["create", "--force", "--size", "1G"])
        .arg(&dev)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "a disk larger than the device is refused"
    );
    let mut img = open(Path::new(&dev), false);
    img.allocate(0, 1000).unwrap();
    img.close().unwrap();
    e2fsck_clean(Path::new(&dev));
}

#[test]
fn check_repair_rebuilds_wrong_bitmaps_and_counts() {
    let s = Scratch::new("repair");
    let p = s.path("r.img");
    let layout = fragmented_image(&p);
    // Damage that keeps every checksum valid: a leaked block and a block marked free while used.
    let mut img = open(&p, false);
    let used = img.tree().iter().next().unwrap().pblk;
    let mut bm = img.allocator().bitmap(0).to_vec();
    extblk::ext4::bitmap::clear(&mut bm, used as usize);
    extblk::ext4::bitmap::set(&mut bm, (layout.blocks_count - 100) as usize % 32768);
    img.replace_block_bitmap(0, bm).unwrap();
    img.close().unwrap();
    let out = extblk().arg("check").arg(&p).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("used block(s) marked free") && text.contains("free block(s) marked used"),
        "{text}"
    );
    let out = extblk()
        .args(["check", "--repair"])
        .arg(&p)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        out.status.code(),
        Some(0),
        "repair did not leave a clean image: {text}"
    );
    assert!(text.contains("rebuilt the block bitmap"), "{text}");
    e2fsck_clean(&p);
}

/// A running `extblk serve` on an image, stopped with SIGTERM (and reaped) on drop.
struct Served {
    child: std::process::Child,
}

impl Served {
    fn start(image: &Path, socket: &Path) -> Served {
        // A few tries: the lock can be held for an instant by a child another test is spawning
        // (see `backing`), and then the daemon rightly refuses the image.
        for _ in 0..3 {
            let mut child = extblk()
                .args(["serve", "--socket"])
                .arg(socket)
                .arg(image)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            // The socket appears after the image is opened and locked.
            loop {
                if socket.exists() {
                    return Served { child };
                }
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "extblk serve did not create its socket"
                );
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("extblk serve exited before creating its socket, three times");
    }

    fn stop(mut self) -> std::process::ExitStatus {
        self.terminate()
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        self.child.wait().unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.terminate();
        }
    }
}

/// A tool that would write an image a daemon holds must refuse before touching it: one line
/// naming the lock, a non-zero exit, and the file byte for byte as the daemon has it.
fn refused_while_served(what: &str, args: &[&str], tail: &[&str]) {
    let s = Scratch::new(&format!("held-{what}"));
    let p = s.path("held.img");
    fragmented_image(&p);
    let runs = open(&p, true).runs();
    let served = Served::start(&p, &s.path("sock"));
    let before = std::fs::read(&p).unwrap();
    let out = extblk().args(args).arg(&p).args(tail).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what} on a served image: {err}"
    );
    let after = std::fs::read(&p).unwrap();
    assert_eq!(
        after.len(),
        before.len(),
        "{what} changed the image's length"
    );
    assert!(after == before, "{what} changed the image's bytes");
    assert!(
        err.contains("in use by another process (locked)"),
        "{what}: {err}"
    );
    assert_eq!(err.lines().count(), 1, "{what}: {err}");
    assert!(served.stop().success(), "the daemon did not stop cleanly");
    let out = extblk().arg("check").arg(&p).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{what}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        open(&p, true).runs(),
        runs,
        "{what}: the disk's mapping changed"
    );
    // With the daemon gone the same command goes ahead: it was the lock that stopped it.
    let out = extblk().args(args).arg(&p).args(tail).output().unwrap();
    assert!(
        out.status.success(),
        "{what} after the daemon stopped: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    e2fsck_clean(&p);
}

/// A create that fails says why once, and leaves no half-made file behind.
#[test]
fn a_failed_create_says_why_once_and_leaves_no_file() {
    let s = Scratch::new("create-fails");
    let p = s.path("big.img");
    let out = extblk()
        .args(["create", "--size", "16T"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("exceeds the maximum").count(), 1, "{err}");
    assert!(!p.exists(), "nothing was made");
    // Refused by the host (a file larger than its filesystem takes), after the file was made.
    let out = extblk()
        .args(["create", "--size", "16383G"])
        .arg(&p)
        .output()
        .unwrap();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(!p.exists(), "the half-made file was removed: {err}");
    }
}

#[test]
fn create_force_on_a_served_image_is_refused_and_changes_nothing() {
    refused_while_served("create", &["create", "--force", "--size", "1G"], &[]);
}

#[test]
fn check_repair_on_a_served_image_is_refused_and_changes_nothing() {
    refused_while_served("repair", &["check", "--repair"], &[]);
}

#[test]
fn resize_of_a_served_image_is_refused_and_changes_nothing() {
    refused_while_served("resize", &["resize"], &["+1G"]);
}

/// The daemon's panic hook, in a child copy of this test binary: a panic on a named thread is
/// reported with that thread and its location, and ends the whole process with status 101 while
/// the main thread would have gone on.
#[test]
fn a_panic_on_any_thread_ends_the_process() {
    const CHILD: &str = "EXTBLK_TEST_PANIC_CHILD";
    if std::env::var_os(CHILD).is_some() {
        extblk::fatal::install_panic_hook();
        let t = std::thread::Builder::new()
            .name("queue-3".into())
            .spawn(|| panic!("provoked {}", 42))
            .unwrap();
        let _ = t.join();
        std::thread::sleep(std::time::Duration::from_millis(200));
        println!("the main thread carried on");
        std::process::exit(0);
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_panic_on_any_thread_ends_the_process",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(extblk::fatal::PANIC_EXIT_STATUS),
        "{stdout}{stderr}"
    );
    assert!(!stdout.contains("carried on"), "{stdout}");
    assert!(
        stderr.contains("thread 'queue-3' panicked at tests/image.rs:")
            && stderr.contains(": provoked 42; exiting with status 101"),
        "{stderr}"
    );
}

/// The space rule (docs/architecture.md): on an image sized as `create` sizes it and no larger,
/// a write inside the disk never fails for lack of space, however discards, rewrites and
/// (overlapping) commits interleave on a full disk. When an allocation finds no free block,
/// free space exists only as blocks freed by the running or committing transaction
/// (`space_pending`), and finishing at most the committing and the running transaction's
/// commits makes it succeed. The mapping always matches a model; `check` stays clean.
mod space_rule {
    use super::*;
    use extblk::ext4::layout::Layout;
    use extblk::image::create::{create, CreateParams};
    use extblk::io::mem::MemIo;
    use proptest::prelude::*;

    const DISK: u64 = 384;

    #[derive(Clone, Debug)]
    enum Op {
        Write {
            lblk: u64,
            len: u64,
        },
        Discard {
            lblk: u64,
            len: u64,
        },
        /// Freeze the running transaction (a commit under way).
        CommitStart,
        /// The commit under way is durable.
        CommitEnd,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (0..DISK, 1..=16u64).prop_map(|(lblk, len)| Op::Write { lblk, len }),
            3 => (0..DISK, 1..=48u64).prop_map(|(lblk, len)| Op::Discard { lblk, len }),
            1 => Just(Op::CommitStart),
            1 => Just(Op::CommitEnd),
        ]
    }

    /// The smallest filesystem `Layout` accepts for the disk: no slack beyond the sizing rule.
    fn tight_image() -> Image {
        let probe = Layout::compute(DISK * 4096, 1024, None).unwrap();
        let mut lo = probe.data_start + DISK;
        let mut hi = probe.blocks_count;
        while lo < hi {
            let mid = (lo + hi) / 2;
            if Layout::compute(DISK * 4096, 1024, Some(mid)).is_ok() {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        let layout = Layout::compute(DISK * 4096, 1024, Some(lo)).unwrap();
        let mem = MemIo::new(vec![0u8; (layout.blocks_count * 4096) as usize]);
        let params = CreateParams {
            label: "space".into(),
            uuid: [7; 16],
            now: 1_700_000_000,
        };
        create(&mem, &layout, &params).unwrap();
        Image::open(Arc::new(mem), OpenOptions { read_only: false }).unwrap()
    }

    struct Sim {
        img: Image,
        committing: Option<extblk::jbd2::CommitWrite>,
        mapped: Vec<bool>,
        /// Allocations that had to wait for commits.
        waits: u64,
    }

    impl Sim {
        fn commit_start(&mut self) {
            if self.committing.is_none() {
                self.committing = self.img.commit_prepare().unwrap();
            }
        }

        fn commit_end(&mut self) {
            if let Some(w) = self.committing.take() {
                let r = w.write(&**self.img.io());
                self.img.commit_finish(r).unwrap();
            }
        }

        fn write(&mut self, lblk: u64, len: u64) {
            let len = len.min(DISK - lblk);
            let mut commits = 0;
            loop {
                match self.img.allocate(lblk, len) {
                    Ok(_) => break,
                    Err(extblk::image::ImageError::NoSpace) => {
                        assert!(
                            self.img.space_pending(),
                            "no space for a write inside the disk, and nothing waiting to be freed"
                        );
                        assert!(commits < 2, "still no space after two commits");
                        // What the engine's committer does for a parked write: finish the
                        // commit under way, else commit the running transaction.
                        if self.committing.is_none() {
                            self.commit_start();
                        }
                        self.commit_end();
                        commits += 1;
                        self.waits += 1;
                    }
                    Err(e) => panic!("allocate: {e}"),
                }
            }
            self.img.convert(lblk, len).unwrap();
            for b in lblk..lblk + len {
                self.mapped[b as usize] = true;
            }
        }

        fn discard(&mut self, lblk: u64, len: u64) {
            let len = len.min(DISK - lblk);
            match self.img.punch(lblk, len) {
                Ok(_) => {
                    for b in lblk..lblk + len {
                        self.mapped[b as usize] = false;
                    }
                }
                // Splitting an extent needs a tree block: the engine parks it until a commit.
                Err(extblk::image::ImageError::NoSpace) => {
                    assert!(self.img.space_pending(), "a discard found no tree block");
                    self.commit_start();
                    self.commit_end();
                    self.commit_start();
                    self.commit_end();
                    self.discard(lblk, len);
                }
                Err(e) => panic!("punch: {e}"),
            }
        }

        fn matches_model(&self) {
            for (b, &m) in self.mapped.iter().enumerate() {
                let got = match self.img.lookup(b as u32) {
                    Lookup::Mapped(e) => !e.unwritten,
                    Lookup::Hole { .. } => false,
                };
                assert_eq!(got, m, "block {b}");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        #[test]
        fn a_write_inside_the_disk_never_fails_for_space(ops in prop::collection::vec(op(), 1..300)) {
            let mut sim = Sim { img: tight_image(), committing: None, mapped: vec![false; DISK as usize], waits: 0 };
            // A full disk, committed, then churn.
            for l in (0..DISK).step_by(16) {
                sim.write(l, 16);
            }
            sim.commit_start();
            sim.commit_end();
            for op in ops {
                match op {
                    Op::Write { lblk, len } => sim.write(lblk, len),
                    Op::Discard { lblk, len } => sim.discard(lblk, len),
                    Op::CommitStart => sim.commit_start(),
                    Op::CommitEnd => sim.commit_end(),
                }
                sim.matches_model();
            }
            sim.commit_end();
            sim.commit_start();
            sim.commit_end();
            let report = extblk::check::check(&sim.img, "space".into());
            prop_assert!(report.problems.is_empty(), "{:?}", report.problems);
        }
    }

    /// The rule is tight: on that image, a full disk with a pending discard and a rewrite
    /// really does wait for the commit (the property above exercises the waiting path).
    #[test]
    fn a_rewrite_after_a_discard_on_a_full_disk_waits_for_the_commit() {
        let mut sim = Sim {
            img: tight_image(),
            committing: None,
            mapped: vec![false; DISK as usize],
            waits: 0,
        };
        for l in (0..DISK).step_by(16) {
            sim.write(l, 16);
        }
        sim.commit_start();
        sim.commit_end();
        let free = sim.img.allocator().free_blocks();
        // Discard more than the slack, then rewrite it all before any commit.
        let n = (free + 32).min(DISK);
        sim.discard(0, n);
        for l in 0..n {
            sim.write(l, 1);
        }
        assert!(sim.waits > 0, "the rewrite never had to wait (free {free})");
        sim.matches_model();
    }
}

/// `extblk check IMAGE` exits 0.
fn extblk_check_clean(img: &Path) {
    let out = extblk().arg("check").arg(img).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Runs an extblk tool that must succeed and print JSON on stdout.
fn tool_json(args: &[&std::ffi::OsStr]) -> serde_json::Value {
    let out = extblk().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "extblk {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "extblk {args:?}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// `extblk compare A B`: exit status and stdout.
fn compare(a: &Path, b: &Path) -> (i32, String) {
    let out = extblk().arg("compare").arg(a).arg(b).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A sparse raw disk of `size` bytes with data here and there: stamped blocks, a run with
/// blocks of zeroes inside it, zeroes written explicitly (host data that reads as zero), a
/// partial block and the disk's last bytes. Returns its bytes.
fn raw_disk(p: &Path, size: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(p).unwrap();
    f.set_len(size).unwrap();
    let mut want = vec![0u8; size as usize];
    let mut put = |off: u64, data: &[u8]| {
        f.write_all_at(data, off).unwrap();
        want[off as usize..off as usize + data.len()].copy_from_slice(data);
    };
    put(0, &stamp(0, 1));
    let run: Vec<u8> = (0..256u64).flat_map(|b| stamp(768 + b, 2)).collect();
    put(3 << 20, &run);
    // 64 KiB at 10 MiB: blocks 2, 3 and 9 of it are zeroes.
    let mut mixed: Vec<u8> = (0..16u64).flat_map(|b| stamp(2560 + b, 3)).collect();
    for b in [2usize, 3, 9] {
        mixed[b * 4096..(b + 1) * 4096].fill(0);
    }
    put(10 << 20, &mixed);
    put(30 << 20, &vec![0u8; 1 << 20]);
    put((20 << 20) + 17, &[0xa5; 100]);
    let tail = size - 1000;
    put(tail, &[0x5a; 1000]);
    want
}

/// The non-zero 4 KiB blocks of a disk's bytes (the last one perhaps partial): how many, and
/// their bytes.
fn nonzero_blocks(bytes: &[u8]) -> (u64, u64) {
    let chunks = bytes.chunks(4096).filter(|c| c.iter().any(|&x| x != 0));
    chunks.fold((0, 0), |(n, b), c| (n + 1, b + c.len() as u64))
}

#[test]
fn convert_round_trips_raw_through_an_image_keeping_holes_and_zero_blocks_unallocated() {
    use std::ffi::OsStr;
    use std::os::unix::fs::MetadataExt;
    let s = Scratch::new("convert");
    let raw = s.path("disk.raw");
    // A multiple of 512, not of 4096: the disk's last block is partial.
    let size = (64 << 20) + 1536;
    let want = raw_disk(&raw, size);
    let (blocks, bytes) = nonzero_blocks(&want);
    let img = s.path("disk.img");
    let v = tool_json(&[
        OsStr::new("convert"),
        OsStr::new("--output"),
        OsStr::new("json"),
        raw.as_os_str(),
        img.as_os_str(),
    ]);
    assert_eq!(v["source_format"], "raw", "{v}");
    assert_eq!(v["destination_format"], "extblk", "{v}");
    assert_eq!(v["virtual_size"], size, "{v}");
    assert_eq!(v["bytes_copied"], bytes, "{v}");
    assert_eq!(v["bytes_skipped"], size - bytes, "{v}");
    assert!(v["seconds"].as_f64().is_some(), "{v}");
    // Only the non-zero blocks are allocated, all written: the explicit zeroes and the zero
    // blocks inside data stay holes.
    let info = tool_json(&[
        OsStr::new("info"),
        OsStr::new("--output"),
        OsStr::new("json"),
        img.as_os_str(),
    ]);
    assert_eq!(info["virtual_size"], size);
    assert_eq!(info["allocated_bytes"], blocks * 4096, "{info}");
    assert_eq!(info["written_bytes"], blocks * 4096, "{info}");
    assert_eq!(info["state"], "clean", "{info}");
    let out = extblk().arg("check").arg(&img).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    e2fsck_clean(&img);
    assert_eq!(compare(&raw, &img), (0, "Images are identical.\n".into()));

    // Back to raw: byte for byte, and sparse.
    let back = s.path("back.raw");
    run_ok(extblk().args(["convert", "-O", "raw"]).arg(&img).arg(&back));
    let got = std::fs::read(&back).unwrap();
    assert!(got == want, "the round trip changed the disk");
    let on_disk = std::fs::metadata(&back).unwrap().blocks() * 512;
    assert!(
        on_disk <= blocks * 4096 + (64 << 10),
        "the raw copy allocates {on_disk} bytes for {} of data",
        blocks * 4096
    );

    // An existing destination is refused without --force, and left alone.
    let before = std::fs::read(&back).unwrap();
    let out = extblk()
        .args(["convert", "-O", "raw"])
        .arg(&img)
        .arg(&back)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    assert!(std::fs::read(&back).unwrap() == before);
    run_ok(
        extblk()
            .args(["convert", "--force", "-f", "raw", "-O", "raw"])
            .arg(&raw)
            .arg(&back),
    );
    assert!(std::fs::read(&back).unwrap() == want);
    let out = extblk()
        .args(["convert", "--force"])
        .arg(&img)
        .arg(&img)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("same file"));

    // Image to image: a fresh image with the same disk and allocation.
    let img2 = s.path("copy.img");
    let v = tool_json(&[
        OsStr::new("convert"),
        OsStr::new("--journal-size"),
        OsStr::new("4M"),
        OsStr::new("--output"),
        OsStr::new("json"),
        img.as_os_str(),
        img2.as_os_str(),
    ]);
    assert_eq!(v["source_format"], "extblk", "{v}");
    assert_eq!(v["bytes_copied"], bytes, "{v}");
    let info2 = tool_json(&[
        OsStr::new("info"),
        OsStr::new("--output"),
        OsStr::new("json"),
        img2.as_os_str(),
    ]);
    assert_eq!(info2["allocated_bytes"], blocks * 4096);
    assert_eq!(info2["journal_size"], 4 << 20);
    e2fsck_clean(&img2);
    assert_eq!(compare(&img, &img2).0, 0);
    assert_eq!(compare(&img2, &back).0, 0);
}

#[test]
fn compare_reports_the_first_difference_and_exits_like_qemu_img() {
    use std::ffi::OsStr;
    use std::os::unix::fs::FileExt;
    let s = Scratch::new("compare");
    let a = s.path("a.raw");
    let size = 32 << 20;
    raw_disk(&a, size);
    let img = s.path("a.img");
    run_ok(extblk().arg("convert").arg(&a).arg(&img));
    assert_eq!(compare(&a, &img), (0, "Images are identical.\n".into()));

    // One byte changed inside data, then one where the other side has a hole.
    let b = s.path("b.raw");
    run_ok(Command::new("cp").arg("--sparse=always").arg(&a).arg(&b));
    let f = std::fs::OpenOptions::new().write(true).open(&b).unwrap();
    f.write_all_at(&[0xff], (3 << 20) + 123).unwrap();
    let want = format!("Content mismatch at offset {}!\n", (3 << 20) + 123);
    assert_eq!(compare(&a, &b), (1, want.clone()));
    assert_eq!(compare(&img, &b), (1, want.clone()));
    assert_eq!(compare(&b, &img), (1, want));
    f.write_all_at(&[0], (3 << 20) + 123).unwrap();
    f.write_all_at(&[1], (7 << 20) + 5).unwrap();
    let want = format!("Content mismatch at offset {}!\n", (7 << 20) + 5);
    assert_eq!(compare(&img, &b), (1, want.clone()));
    assert_eq!(compare(&b, &img), (1, want));
    let v = {
        let out = extblk()
            .args(["compare", "--output", "json"])
            .arg(&img)
            .arg(&b)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    assert_eq!(v["identical"], false);
    assert_eq!(v["mismatch_offset"], (7 << 20) + 5);
    assert_eq!(v["format_a"], "extblk");
    assert_eq!(v["format_b"], "raw");

    // Different sizes: identical if the longer disk's extra part reads as zeroes.
    f.write_all_at(&[0], (7 << 20) + 5).unwrap();
    f.set_len(size + (1 << 20)).unwrap();
    assert_eq!(
        compare(&img, &b),
        (
            0,
            "Warning: Image size mismatch!\nImages are identical.\n".into()
        )
    );
    f.write_all_at(&[9], size + 4096 + 7).unwrap();
    assert_eq!(
        compare(&b, &img),
        (
            1,
            format!(
                "Warning: Image size mismatch!\nContent mismatch at offset {}!\n",
                size + 4096 + 7
            )
        )
    );
    let v = tool_json(&[
        OsStr::new("compare"),
        OsStr::new("--output"),
        OsStr::new("json"),
        a.as_os_str(),
        a.as_os_str(),
    ]);
    assert_eq!(v["identical"], true);

    // Errors: exit status 2.
    let (code, text) = compare(&a, &s.path("missing"));
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("no such file"), "{text}");
    let out = extblk()
        .args(["compare", "-F", "extblk"])
        .arg(&a)
        .arg(&b)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an extblk image"));
}

#[test]
fn convert_reads_qcow2_through_qemu_img() {
    use std::ffi::OsStr;
    if Command::new("qemu-img").arg("--version").output().is_err() {
        return skip_or_fail("convert from qcow2: qemu-img is not installed (qemu-utils)");
    }
    let s = Scratch::new("qcow2");
    let raw = s.path("a.raw");
    let want = raw_disk(&raw, 32 << 20);
    let (blocks, bytes) = nonzero_blocks(&want);
    let q = s.path("a.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&q),
    );
    let img = s.path("a.img");
    let v = tool_json(&[
        OsStr::new("convert"),
        OsStr::new("--output"),
        OsStr::new("json"),
        q.as_os_str(),
        img.as_os_str(),
    ]);
    assert_eq!(v["source_format"], "qcow2", "{v}");
    assert_eq!(v["bytes_copied"], bytes, "{v}");
    let info = tool_json(&[
        OsStr::new("info"),
        OsStr::new("--output"),
        OsStr::new("json"),
        img.as_os_str(),
    ]);
    assert_eq!(info["allocated_bytes"], blocks * 4096, "{info}");
    e2fsck_clean(&img);
    assert_eq!(compare(&raw, &img).0, 0);
    assert_eq!(compare(&q, &img).0, 0);
    let left: Vec<_> = std::fs::read_dir(s.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".extblk-"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
    // Not qcow2 at all: qemu-img's own complaint, exit 1, nothing created.
    let out = extblk()
        .args(["convert", "-f", "qcow2"])
        .arg(&raw)
        .arg(s.path("b.img"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("qemu-img failed"));
    assert!(!s.path("b.img").exists());
}

/// `extblk resize`: the disk grows and the filesystem with it — from one group to several, then
/// past a larger descriptor table (group 0's metadata moved) — e2fsck-clean, readable by
/// dumpe2fs, the data kept and the new part reading as zeroes; shrinking only when asked and
/// only over holes.
#[test]
fn resize_grows_the_filesystem_keeps_the_data_and_shrinks_only_over_holes() {
    use std::ffi::OsStr;
    let s = Scratch::new("resize");
    let raw = s.path("disk.raw");
    let size = 64u64 << 20;
    let want = raw_disk(&raw, size);
    let img = s.path("disk.img");
    run_ok(extblk().arg("convert").arg(&raw).arg(&img));
    let grow = |arg: &str| {
        tool_json(&[
            OsStr::new("resize"),
            OsStr::new("--output"),
            OsStr::new("json"),
            img.as_os_str(),
            OsStr::new(arg),
        ])
    };
    let v = grow("+300M");
    assert_eq!(v["old_size"], size, "{v}");
    assert_eq!(v["new_size"], size + (300 << 20), "{v}");
    assert_eq!(v["old_groups"], 1, "{v}");
    assert!(v["new_groups"].as_u64().unwrap() >= 3, "{v}");
    let last = v["new_groups"].as_u64().unwrap() - 1;
    assert_eq!(v["backup_groups"], serde_json::json!([1, last]), "{v}");
    e2fsck_clean(&img);
    dumpe2fs_ok(&img);
    assert_eq!(
        compare(&raw, &img),
        (
            0,
            "Warning: Image size mismatch!\nImages are identical.\n".into()
        )
    );
    let info = tool_json(&[
        OsStr::new("info"),
        OsStr::new("--output"),
        OsStr::new("json"),
        img.as_os_str(),
    ]);
    assert_eq!(info["virtual_size"], size + (300 << 20));
    assert_eq!(info["state"], "clean", "{info}");

    // Past 64 groups: the descriptor table takes a second block, where group 0's metadata was.
    let v = grow("9G");
    assert_eq!(v["new_gdt_blocks"], 2, "{v}");
    assert!(!v["moved"].as_array().unwrap().is_empty(), "{v}");
    e2fsck_clean(&img);
    dumpe2fs_ok(&img);
    let out = Command::new("dumpe2fs")
        .arg("-h")
        .arg(&img)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let groups = v["new_groups"].as_u64().unwrap();
    assert!(
        text.contains(&format!("Block count:              {}", groups * 32768)),
        "{text}"
    );
    assert!(
        text.contains(&format!(" {} ", groups - 1)) && text.contains("Backup block groups:"),
        "{text}"
    );
    assert_eq!(
        compare(&raw, &img),
        (
            0,
            "Warning: Image size mismatch!\nImages are identical.\n".into()
        )
    );
    extblk_check_clean(&img);

    // Past what the descriptor table can take over (group 0's bitmaps and inode tables): refused
    // before anything is written, with the limit and the way around it. (A 9 GiB file is not
    // read whole: its length, its first 16 MiB — superblock, descriptors, group 0's metadata,
    // the journal — and the disk's map stand for it.)
    let state = |p: &Path| {
        use std::io::Read;
        let mut b = vec![0u8; 16 << 20];
        std::fs::File::open(p).unwrap().read_exact(&mut b).unwrap();
        (std::fs::metadata(p).unwrap().len(), b, open(p, true).runs())
    };
    let before = state(&img);
    let out = extblk()
        .arg("resize")
        .arg(&img)
        .arg("40G")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("256 groups (32 GiB of filesystem) at most") && err.contains("convert"),
        "{err}"
    );
    assert!(state(&img) == before, "a refused grow changed the image");

    // The grown disk takes writes everywhere: a raw disk of the new size converted in, data at
    // its end included, round-trips.
    let big = s.path("big.raw");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(9 << 30).unwrap();
        f.write_all_at(&want[..4 << 20], 0).unwrap();
        f.write_all_at(&[0xAB; 8192], (9 << 30) - 8192).unwrap();
    }
    let img2 = s.path("big.img");
    run_ok(extblk().arg("create").arg("--size").arg("64M").arg(&img2));
    run_ok(extblk().arg("resize").arg(&img2).arg("9G"));
    run_ok(
        extblk()
            .args(["convert", "--force", "-f", "raw"])
            .arg(&big)
            .arg(&img2),
    );
    assert_eq!(compare(&big, &img2).0, 0);

    // Shrinking: refused without --shrink, refused over data, allowed over holes.
    let before = state(&img);
    let out = extblk()
        .arg("resize")
        .arg(&img)
        .arg("32M")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --shrink"));
    let out = extblk()
        .args(["resize", "--shrink"])
        .arg(&img)
        .arg("32M")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("holds data at byte"), "{err}");
    assert!(state(&img) == before, "a refused resize changed the image");
    let v = tool_json(&[
        OsStr::new("resize"),
        OsStr::new("--shrink"),
        OsStr::new("--output"),
        OsStr::new("json"),
        img.as_os_str(),
        OsStr::new("64M"),
    ]);
    assert_eq!(v["new_size"], size, "{v}");
    e2fsck_clean(&img);
    assert_eq!(compare(&raw, &img), (0, "Images are identical.\n".into()));
}
