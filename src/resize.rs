//! `extblk resize IMAGE [+|-]SIZE`: the offline resize of an image no process holds, as
//! `qemu-img resize`. The plan is made on a read-only open first, so that a refusal (a shrink
//! without `--shrink`, data in the cut range, a layout it cannot grow) touches nothing; then the
//! image is opened read-write, the restart log a killed daemon left is applied first (as `serve`
//! and `check --repair` do: a resize must not make acknowledged writes stale), and
//! [`Image::resize`] does the work in one journal transaction.

use std::path::Path;
use std::sync::Arc;

use crate::engine::image::{apply_and_remove, Handled, RestartLogAt};
use crate::image::resize::ResizePlan;
use crate::image::{Image, OpenOptions};
use crate::io::{BlockIo, FileIo};

/// The size argument: absolute, or relative to the current size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewSize {
    Absolute(u64),
    Grow(u64),
    Shrink(u64),
}

impl NewSize {
    /// `20G`, `+10G` or `-1G` (sizes as `crate::units::parse_size` reads them).
    pub fn parse(s: &str) -> Result<NewSize, String> {
        let size = |r: &str| crate::units::parse_size(r).map(|b| b.0);
        if let Some(r) = s.strip_prefix('+') {
            Ok(NewSize::Grow(size(r)?))
        } else if let Some(r) = s.strip_prefix('-') {
            Ok(NewSize::Shrink(size(r)?))
        } else {
            Ok(NewSize::Absolute(size(s)?))
        }
    }

    /// The new size in bytes for a disk of `old` bytes; `None` if it is not a positive size.
    pub fn resolve(self, old: u64) -> Option<u64> {
        match self {
            NewSize::Absolute(n) => Some(n),
            NewSize::Grow(d) => old.checked_add(d),
            NewSize::Shrink(d) => old.checked_sub(d).filter(|&n| n > 0),
        }
    }
}

pub fn resize(
    path: &Path,
    size: NewSize,
    allow_shrink: bool,
    json: bool,
    restart_log: &RestartLogAt,
) -> anyhow::Result<i32> {
    let name = path.display();
    let plan = {
        let io: Arc<dyn BlockIo> = Arc::new(FileIo::open(path, true)?);
        let img = Image::open(io, OpenOptions { read_only: true })
            .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        let new = size.resolve(img.disk_size()).ok_or_else(|| {
            anyhow::anyhow!("{name}: {size:?} from {} bytes is no size", img.disk_size())
        })?;
        img.resize_plan(new, allow_shrink)
            .map_err(|e| anyhow::anyhow!("{name}: {e}"))?
    };
    let io: Arc<dyn BlockIo> = Arc::new(FileIo::open(path, false)?);
    let mut img = Image::open_keeping_session(io).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    if !matches!(restart_log, RestartLogAt::Off) {
        let at = restart_log.for_image(path);
        match apply_and_remove(&mut img, &at)
            .map_err(|e| anyhow::anyhow!("{name}: restart log: {e}"))?
        {
            None | Some((_, Handled::NoLog)) | Some((_, Handled::Nothing)) => {}
            Some((p, Handled::Ignored(why))) => {
                log::warn!("restart log {}: {why}; not applied", p.display())
            }
            Some((p, Handled::Applied(a))) => {
                log::info!("restart log {}: {a}; applied first", p.display())
            }
        }
    }
    img.begin_session()
        .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    let done = img
        .resize(plan.new_size, allow_shrink)
        .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    img.close().map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&done)?);
    } else {
        println!("{}", describe(&name.to_string(), &done));
    }
    Ok(0)
}

/// One line for people: what changed.
pub fn describe(name: &str, p: &ResizePlan) -> String {
    let mut s = format!(
        "resized {name}: disk {} -> {} bytes",
        p.old_size, p.new_size
    );
    if p.fs_grows() {
        s += &format!(
            "; filesystem {} -> {} groups ({} -> {} bytes)",
            p.old_groups,
            p.new_groups,
            p.old_fs_blocks * 4096,
            p.new_fs_blocks * 4096
        );
        if !p.moved.is_empty() {
            s += &format!(
                ", {} metadata item(s) moved for a {}-block descriptor table",
                p.moved.len(),
                p.new_gdt_blocks
            );
        }
    } else if p.new_size < p.old_size {
        s += " (the filesystem keeps its size; the cut range held no data)";
    }
    s
}
