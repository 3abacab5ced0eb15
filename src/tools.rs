//! The offline image tools behind `info`, `map`, `check`, `convert` and `compare`: human and
//! JSON output, progress bars.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::check::{self, Outcome};
use crate::engine::image::RestartLogAt;
use crate::image::{Image, OpenOptions, RunKind};
use crate::io::{BlockIo, FileIo};

fn open_ro(path: &Path) -> anyhow::Result<Image> {
    let io: Arc<dyn BlockIo> = Arc::new(FileIo::open(path, true)?);
    Image::open(io, OpenOptions { read_only: true })
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn uuid_str(u: &[u8; 16]) -> String {
    let h: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

#[derive(Serialize)]
struct Info {
    image: String,
    format: &'static str,
    virtual_size: u64,
    filesystem_size: u64,
    allocated_bytes: u64,
    written_bytes: u64,
    unwritten_bytes: u64,
    free_bytes: u64,
    extents: usize,
    tree_depth: u16,
    tree_blocks: u64,
    journal_size: u64,
    journal_state: String,
    journal_transactions_pending: u32,
    needs_recovery: bool,
    state: &'static str,
    error_count: u32,
    uuid: String,
    label: String,
}

pub fn info(path: &Path, json: bool) -> anyhow::Result<i32> {
    let img = open_ro(path)?;
    let sb = img.superblock();
    let t = img.tree();
    let unwritten: u64 = t
        .iter()
        .filter(|e| e.unwritten)
        .map(|e| u64::from(e.len))
        .sum();
    let rec = img.recovery();
    let jsb = img.journal_superblock();
    let info = Info {
        image: path.display().to_string(),
        format: "extblk (ext4)",
        virtual_size: img.disk_size(),
        filesystem_size: sb.blocks_count * 4096,
        allocated_bytes: t.data_blocks() * 4096,
        written_bytes: (t.data_blocks() - unwritten) * 4096,
        unwritten_bytes: unwritten * 4096,
        free_bytes: img.allocator().free_blocks() * 4096,
        extents: t.extent_count(),
        tree_depth: t.depth(),
        tree_blocks: t.tree_blocks(),
        journal_size: img.log_map().blocks() * 4096,
        journal_state: if rec.transactions > 0 {
            format!("{} committed transaction(s) to replay", rec.transactions)
        } else if jsb.errno != 0 {
            format!("aborted (errno {})", jsb.errno)
        } else {
            "empty".into()
        },
        journal_transactions_pending: rec.transactions,
        needs_recovery: sb.needs_recovery(),
        state: if sb.has_errors() {
            "error"
        } else if sb.needs_recovery() {
            "in use or not cleanly closed"
        } else {
            "clean"
        },
        error_count: sb.error.count,
        uuid: uuid_str(&sb.uuid),
        label: sb.label(),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!("image:           {}", info.image);
        println!("format:          {}", info.format);
        println!("virtual size:    {} bytes", info.virtual_size);
        println!("filesystem size: {} bytes", info.filesystem_size);
        println!(
            "allocated:       {} bytes ({} written, {} unwritten)",
            info.allocated_bytes, info.written_bytes, info.unwritten_bytes
        );
        println!("free:            {} bytes", info.free_bytes);
        println!(
            "extents:         {} (tree depth {}, {} tree blocks)",
            info.extents, info.tree_depth, info.tree_blocks
        );
        println!(
            "journal:         {} bytes, {}",
            info.journal_size, info.journal_state
        );
        println!(
            "state:           {}{}",
            info.state,
            if info.error_count > 0 {
                format!(" ({} errors recorded)", info.error_count)
            } else {
                String::new()
            }
        );
        println!("uuid:            {}", info.uuid);
        println!("label:           {}", info.label);
    }
    Ok(0)
}

#[derive(Serialize)]
struct MapEntry {
    start: u64,
    length: u64,
    /// Like qemu-img: `data` = backed by written blocks, `zero` = reads as zeroes.
    data: bool,
    zero: bool,
    present: bool,
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
}

pub fn map(path: &Path, json: bool) -> anyhow::Result<i32> {
    let img = open_ro(path)?;
    let size = img.disk_size();
    let entries: Vec<MapEntry> = img
        .runs()
        .into_iter()
        .map(|r| {
            let start = r.lblk * 4096;
            let length = (r.len * 4096).min(size - start);
            let (data, zero, present, kind) = match r.kind {
                RunKind::Data => (true, false, true, "data"),
                RunKind::Unwritten => (false, true, true, "unwritten"),
                RunKind::Hole => (false, true, false, "hole"),
            };
            MapEntry {
                start,
                length,
                data,
                zero,
                present,
                kind,
                offset: r.pblk.map(|p| p * 4096),
            }
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
    } else {
        println!(
            "{:<20} {:<20} {:<10} {:<20}",
            "Offset", "Length", "Kind", "Image offset"
        );
        for e in &entries {
            let off = e
                .offset
                .map(|o| format!("{o:#x}"))
                .unwrap_or_else(|| "-".into());
            println!(
                "{:<#20x} {:<#20x} {:<10} {:<20}",
                e.start, e.length, e.kind, off
            );
        }
    }
    Ok(0)
}

/// `check [--repair]`; `restart_log` is where the image's restart log is looked for.
pub fn check(
    path: &Path,
    json: bool,
    repair: bool,
    restart_log: &RestartLogAt,
) -> anyhow::Result<i32> {
    if repair {
        crate::repair::repair(path, restart_log)?;
    }
    match check::check_path(path, restart_log) {
        Outcome::CouldNotCheck(why) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "image": path.display().to_string(), "error": why })
                );
            } else {
                eprintln!("extblk: cannot check {why}");
            }
            Ok(2)
        }
        Outcome::Checked(r) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                for prob in &r.problems {
                    println!("{prob}");
                }
                if r.journal_transactions > 0 {
                    println!(
                        "(checked as replayed: the journal holds {} committed transaction(s))",
                        r.journal_transactions
                    );
                }
                if let Some(l) = &r.restart_log {
                    match &l.ignored {
                        Some(why) => println!(
                            "(restart log {}: the next read-write open ignores it: {why})",
                            l.path
                        ),
                        None if l.pending_records > 0 => println!(
                            "(restart log {}: {} change(s) a killed daemon acknowledged that the \
                             journal lacks; the next `serve` or `check --repair` applies them)",
                            l.path, l.pending_records
                        ),
                        None => {}
                    }
                }
                if r.problems.is_empty() {
                    println!(
                        "{}: no problems found ({} extents, {} blocks allocated)",
                        r.image, r.extents, r.allocated_blocks
                    );
                } else {
                    println!("{}: {} problem(s) found", r.image, r.problems.len());
                }
            }
            Ok(if r.problems.is_empty() { 0 } else { 1 })
        }
    }
}

/// A progress bar on stderr when it is a terminal; hidden otherwise (scripts, logs, tests),
/// so stdout keeps only the report and stderr only errors.
fn progress_bar(what: &'static str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(0);
    let style = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:40}] {percent:>3}% {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    pb.set_style(style);
    pb.set_message(what);
    pb
}

/// `convert`: the copy with its progress bar, then the summary.
pub fn convert(
    src: &Path,
    dst: &Path,
    opts: &crate::convert::ConvertOptions,
    json: bool,
) -> anyhow::Result<i32> {
    let pb = progress_bar("converting");
    let r = crate::convert::convert(
        src,
        dst,
        opts,
        &|n| pb.suspend(|| eprintln!("extblk: note: {n}")),
        &|done, total| {
            pb.set_length(total);
            pb.set_position(done);
        },
    );
    pb.finish_and_clear();
    let s = r?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        println!(
            "converted {} ({}) to {} ({}): {} byte disk, {} bytes copied, {} bytes skipped (holes, unwritten or zero blocks), {:.2} s",
            s.source,
            s.source_format,
            s.destination,
            s.destination_format,
            s.virtual_size,
            s.bytes_copied,
            s.bytes_skipped,
            s.seconds
        );
    }
    Ok(0)
}

#[derive(Serialize)]
struct CompareReport {
    a: String,
    b: String,
    format_a: crate::disk_source::SourceFormat,
    format_b: crate::disk_source::SourceFormat,
    size_a: u64,
    size_b: u64,
    identical: bool,
    /// The first byte at which the disks differ.
    mismatch_offset: Option<u64>,
}

/// `compare`, with qemu-img compare's messages and exit status: 0 identical, 1 different, 2
/// could not compare (the reason on stderr, or in the JSON).
pub fn compare(
    a: (&Path, Option<crate::disk_source::SourceFormat>),
    b: (&Path, Option<crate::disk_source::SourceFormat>),
    json: bool,
) -> i32 {
    use crate::disk_source::DiskSource;
    let pb = progress_bar("comparing");
    let r = (|| {
        let tmp = std::env::temp_dir();
        let sa = DiskSource::open(a.0, a.1, &tmp)?;
        let sb = DiskSource::open(b.0, b.1, &tmp)?;
        for n in [sa.note(), sb.note()].into_iter().flatten() {
            pb.suspend(|| eprintln!("extblk: note: {n}"));
        }
        let found = crate::convert::compare(&sa, &sb, &|done, total| {
            pb.set_length(total);
            pb.set_position(done);
        })?;
        Ok::<_, crate::disk_source::SourceError>(CompareReport {
            a: a.0.display().to_string(),
            b: b.0.display().to_string(),
            format_a: sa.format(),
            format_b: sb.format(),
            size_a: sa.size(),
            size_b: sb.size(),
            identical: found.is_none(),
            mismatch_offset: found,
        })
    })();
    pb.finish_and_clear();
    match r {
        Err(e) => {
            if json {
                println!("{}", serde_json::json!({ "error": e.to_string() }));
            } else {
                eprintln!("extblk: cannot compare: {e}");
            }
            2
        }
        Ok(rep) => {
            if json {
                match serde_json::to_string_pretty(&rep) {
                    Ok(t) => println!("{t}"),
                    Err(e) => {
                        eprintln!("extblk: {e}");
                        return 2;
                    }
                }
            } else {
                if rep.size_a != rep.size_b {
                    println!("Warning: Image size mismatch!");
                }
                match rep.mismatch_offset {
                    None => println!("Images are identical."),
                    Some(o) => println!("Content mismatch at offset {o}!"),
                }
            }
            if rep.identical {
                0
            } else {
                1
            }
        }
    }
}

/// `extblk ctl SOCKET COMMAND`.
pub fn ctl(a: &crate::cli::CtlArgs) -> anyhow::Result<i32> {
    use crate::cli::CtlCommand;
    use crate::control::client::{self, Ctl};
    use crate::control::Request;
    let json = a.output == crate::cli::Output::Json;
    let mut c = Ctl::connect(&a.socket)?;
    let simple = |c: &mut Ctl, req: Request, done: &str| -> anyhow::Result<i32> {
        let r = c.call(&req)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            println!("{done}");
        }
        Ok(0)
    };
    match &a.command {
        CtlCommand::Info => {
            let i = c.info()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&i)?);
            } else {
                print!("{}", client::format_info(&i));
            }
            Ok(0)
        }
        CtlCommand::Stats { watch: false, .. } => {
            let s = c.stats()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", client::format_stats(&s));
            }
            Ok(0)
        }
        CtlCommand::Stats {
            watch: true,
            interval,
            count,
        } => {
            use std::io::Write as _;
            let mut prev = c.stats()?;
            if !json {
                println!("{}", client::WATCH_HEADER);
            }
            let mut n = 0u64;
            while count.is_none_or(|max| n < max) {
                std::thread::sleep(std::time::Duration::from_secs_f64(*interval));
                let now = c.stats()?;
                if json {
                    println!("{}", serde_json::to_string(&now)?);
                } else {
                    println!("{}", client::watch_line(&prev, &now));
                }
                std::io::stdout().flush()?;
                prev = now;
                n += 1;
            }
            Ok(0)
        }
        CtlCommand::Flush => simple(&mut c, Request::Flush, "flushed"),
        CtlCommand::Quiesce => simple(
            &mut c,
            Request::Quiesce,
            "quiesced: the image is consistent until resume",
        ),
        CtlCommand::Resume => simple(&mut c, Request::Resume, "resumed"),
        CtlCommand::Resize { size } => {
            let size = match size {
                crate::resize::NewSize::Absolute(n) => n.to_string(),
                crate::resize::NewSize::Grow(n) => format!("+{n}"),
                crate::resize::NewSize::Shrink(n) => format!("-{n}"),
            };
            let r = c.call(&Request::Resize { size })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                let p = &r["plan"];
                println!(
                    "resized: disk {} -> {} bytes, filesystem {} -> {} groups; {}",
                    p["old_size"],
                    p["new_size"],
                    p["old_groups"],
                    p["new_groups"],
                    if r["frontend_notified"] == true {
                        "the frontend was told"
                    } else {
                        "the frontend sees it at its next config read or connection"
                    }
                );
            }
            Ok(0)
        }
    }
}
