//! `check --repair`: what can be rebuilt safely. The journal is replayed into place (by opening
//! the image read-write); block bitmaps and free counts that disagree with what the extent trees
//! and the metadata really use are rebuilt from them (only when no block is claimed twice or lies
//! past the end — then the claims can be trusted); the restart log a killed daemon left is
//! applied as a daemon's start would (the same code: `engine::image::apply_and_remove`), on the
//! rebuilt bitmaps, and removed; the image is closed cleanly, which rewrites the superblock's
//! counts. Damage that cannot be rebuilt (a bad checksum, a double-used block) is left for
//! `check` to report, and a restart log is then not applied either: its records claim blocks
//! the bitmaps say are free, which only rebuilt (or right) bitmaps can tell.
//!
//! The session count is bumped only once the log is handled, so that a repair killed while it
//! applies the log leaves one the next `serve` or `check --repair` still accepts; after it, a
//! log it did not apply (`--restart-log none`, not this image's) is stale.

use std::path::Path;
use std::sync::Arc;

use crate::engine::image::{apply_and_remove, Handled, RestartLogAt};
use crate::image::Image;
use crate::io::{BlockIo, FileIo};

pub fn repair(path: &Path, restart_log: &RestartLogAt) -> anyhow::Result<()> {
    let name = path.display();
    let io: Arc<dyn BlockIo> = Arc::new(FileIo::open(path, false)?);
    let mut img =
        Image::open_for_repair(io).map_err(|e| anyhow::anyhow!("{name}: cannot repair: {e}"))?;
    let r = img.recovery().clone();
    if r.transactions > 0 {
        println!(
            "replayed {} journal transaction(s) ({} blocks)",
            r.transactions, r.blocks
        );
    }
    let report = crate::check::check(&img, name.to_string());
    if report.bitmaps_rebuildable {
        for (g, bm) in report.rebuilt_bitmaps {
            img.replace_block_bitmap(g, bm)
                .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            println!("rebuilt the block bitmap and free count of group {g}");
        }
    } else if !report.rebuilt_bitmaps.is_empty() {
        println!("block bitmaps disagree with the trees, but some block is claimed twice: not rebuilding them");
    }
    if matches!(restart_log, RestartLogAt::Off) {
        println!(
            "restart log not looked at (--restart-log none, or no default path): a log the \
             last session left is left where it is, and stale from now on (the next serve \
             ignores it)"
        );
    } else if !report.bitmaps_rebuildable {
        println!(
            "some block is claimed twice: a restart log the last session left is not applied, \
             and is left where it is (stale from now on)"
        );
    } else {
        let at = restart_log.for_image(path);
        match apply_and_remove(&mut img, &at)
            .map_err(|e| anyhow::anyhow!("{name}: restart log: {e}"))?
        {
            None | Some((_, Handled::NoLog)) => {}
            Some((p, Handled::Nothing)) => println!(
                "restart log {}: nothing the journal lacks; removed",
                p.display()
            ),
            Some((p, Handled::Ignored(why))) => println!(
                "restart log {}: {why}; not applied, left where it is",
                p.display()
            ),
            Some((p, Handled::Applied(a))) => {
                println!("restart log {}: {a}; removed", p.display())
            }
        }
    }
    img.begin_session()
        .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    img.close().map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    Ok(())
}
