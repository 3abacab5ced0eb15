//! Helpers shared by the integration-test binaries. Each binary uses a subset, hence the
//! `dead_code` allowance.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A scratch directory removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("extblk-test-{}-{}", name, std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    pub fn dir(&self) -> &Path {
        &self.0
    }
    pub fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Whether this run is CI's (`CI=true`, as `.ci/run` and hosted CI set it).
pub fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// A test that cannot run here (no root, no loop devices, ...) ends with a clear SKIP line; under
/// CI a skip is a failure with its reason, since CI is set up to run everything and a silent skip
/// would pass untested code.
pub fn skip_or_fail(reason: &str) {
    assert!(
        !in_ci(),
        "cannot run under CI=true (a skip is not a pass): {reason}"
    );
    println!("SKIP: {reason}");
}

/// `e2fsck -fn` must exit 0 and print only its pass and summary lines. Extent-tree optimisation
/// notices are switched off: a shallower tree is a suggestion, not damage.
pub fn e2fsck_clean(path: &Path) {
    let out = Command::new("e2fsck")
        .args(["-fn", "-E", "no_optimize_extents"])
        .arg(path)
        .output()
        .expect("e2fsck");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let noise: Vec<&str> = text
        .lines()
        .filter(|l| {
            !l.starts_with("Pass ")
                && !l.starts_with("e2fsck ")
                && !l.contains(" files (")
                && !l.trim().is_empty()
        })
        .collect();
    assert!(
        out.status.success() && noise.is_empty(),
        "e2fsck -fn complained:\n{text}"
    );
}

/// The value of counter `name` in the daemon's last "exiting:" line (its counters at exit).
pub fn exit_counter(log: &str, name: &str) -> u64 {
    let line = log
        .lines()
        .rfind(|l| l.contains("exiting:"))
        .unwrap_or_else(|| panic!("no exit counters in the log:\n{log}"));
    let key = format!(" {name}=");
    let i = line
        .find(&key)
        .unwrap_or_else(|| panic!("no counter {name}: {line}"))
        + key.len();
    line[i..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}
