//! extblk: a vhost-user-blk backend daemon.
//!
//! Layers point down only: device → engine → image → (mapping, jbd2) → ext4 → io. Data flows
//! that way; completions flow back on whichever thread can finish them. See
//! `docs/architecture.md`.

/// `broken!(Name)`: is the test switch `testing::Broken::Name` on? With the `testing`
/// feature it reads the switch; without it the macro is the constant `false` and names nothing,
/// so a normal build has no reference to `testing` (which does not exist there) and the checks
/// compile away.
#[cfg(feature = "testing")]
macro_rules! broken {
    ($b:ident) => {
        $crate::testing::broken($crate::testing::Broken::$b)
    };
}
#[cfg(not(feature = "testing"))]
macro_rules! broken {
    ($b:ident) => {
        false
    };
}

/// `failpoint!(Name, n)`: with the `testing` feature, the process is killed here when the
/// environment asks for failpoint `testing::Failpoint::Name` at its `n`-th pass (see
/// `testing::failpoint`); without it the macro only evaluates `n`, and names nothing.
#[cfg(feature = "testing")]
macro_rules! failpoint {
    ($f:ident, $n:expr) => {
        $crate::testing::failpoint($crate::testing::Failpoint::$f, $n)
    };
}
#[cfg(not(feature = "testing"))]
macro_rules! failpoint {
    ($f:ident, $n:expr) => {{
        let _: u32 = $n;
    }};
}

pub mod bench;
pub mod check;
pub mod cli;
pub mod control;
pub mod convert;
pub mod counters;
pub mod device;
pub mod disk_source;
pub mod engine;
pub mod ext4;
pub mod fatal;
pub mod image;
pub mod io;
pub mod jbd2;
pub mod mapping;
pub mod notify;
pub mod repair;
pub mod resize;
pub mod restart_log;
pub mod rng;
pub mod sandbox;
pub mod serve;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tools;
pub mod units;
