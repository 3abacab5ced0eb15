//! The control socket (`serve --control PATH`): a running daemon answers questions and takes
//! orders from `extblk ctl`, one JSON object per line each way.
//!
//! Requests are `{"command":"info"}`, `stats`, `flush`, `quiesce`, `resume` and
//! `{"command":"resize","size":"20G"}`; replies are
//! `{"ok":true,"result":{...}}` or `{"ok":false,"error":"..."}`. One request gets one reply, in
//! order; a client may send many on one connection (`ctl stats --watch` does). The wire format is
//! described in docs/operations.md; this module holds its types, [`server`] the daemon's side
//! and [`client`] `extblk ctl`'s.

pub mod client;
pub mod server;

use serde::{Deserialize, Serialize};

use crate::device::stats::QueueStatsSnapshot;

/// Longest request line the daemon reads: a request is a few dozen bytes, and a client that
/// sends more without a newline is not speaking the protocol.
pub const MAX_LINE: usize = 4096;

/// A request, as `{"command": "..."}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
/// Fields other than `command` are ignored (room for arguments later), unknown commands refused.
#[serde(tag = "command", rename_all = "lowercase")]
pub enum Request {
    /// What the daemon serves and how.
    Info,
    /// Counters, per-queue request counts and latency histograms.
    Stats,
    /// Make every completed write durable now (a commit), as a guest flush does.
    Flush,
    /// Stop taking requests, wait for those in flight, flush: the backing is a consistent image
    /// until `resume` (for a backup copy).
    Quiesce,
    /// Take requests again after `quiesce`.
    Resume,
    /// Grow the disk while served: `size` is `20G`, or `+10G` more.
    Resize { size: String },
    /// `testing` builds only: open `path` for reading, as code that took the daemon over would
    /// try, and answer with the outcome (tests/daemon.rs checks that the sandbox refuses it).
    #[cfg(feature = "testing")]
    #[serde(rename = "test-open")]
    TestOpen { path: std::path::PathBuf },
    /// `testing` builds only: open an AF_INET socket, which the seccomp filter refuses (only
    /// AF_UNIX sockets are allowed), and answer with the outcome.
    #[cfg(feature = "testing")]
    #[serde(rename = "test-socket")]
    TestSocket,
}

/// A reply line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    pub fn ok(result: serde_json::Value) -> Reply {
        Reply {
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    pub fn error(message: impl std::fmt::Display) -> Reply {
        Reply {
            ok: false,
            result: None,
            error: Some(message.to_string()),
        }
    }
}

/// `info`'s result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    pub version: String,
    pub pid: u32,
    pub uptime_s: u64,
    pub image: String,
    /// "extblk image" or "raw".
    pub format: String,
    pub socket: String,
    pub capacity: u64,
    pub read_only: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    pub logical_block_size: u32,
    /// The guest's cache mode (virtio-blk `writeback`): false means writethrough.
    pub writeback: bool,
    /// Quiesced by `quiesce`, not yet resumed.
    pub paused: bool,
}

/// `stats`' result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub uptime_s: u64,
    /// Microseconds since the daemon started, when this was read (rates between two reads).
    pub at_us: u64,
    pub inflight: u64,
    /// The device's counters (requests by type, bytes, errors), as in the log's SIGUSR1 line.
    pub device: serde_json::Value,
    /// The engine's counters (commits, allocations, …); what they are depends on the format.
    pub engine: serde_json::Value,
    pub queues: Vec<QueueStatsSnapshot>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_tagged_object_and_unknown_ones_are_refused() {
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"command":"stats"}"#).unwrap(),
            Request::Stats
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"command":"info","x":1}"#).unwrap(),
            Request::Info
        );
        assert_eq!(
            serde_json::to_string(&Request::Quiesce).unwrap(),
            r#"{"command":"quiesce"}"#
        );
        for bad in [r#"{"command":"format"}"#, r#"{}"#, r#"[1]"#, ""] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
        let r = serde_json::to_string(&Reply::error("no")).unwrap();
        assert_eq!(r, r#"{"ok":false,"error":"no"}"#);
    }
}
