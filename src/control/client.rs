//! `extblk ctl`: the client side of the control socket.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use super::{Info, Reply, Request, Stats};
use crate::device::stats::HistogramSnapshot;

/// Longest wait for a reply: a `quiesce` may wait for the requests in flight (bounded by the
/// daemon's 30 s) and a commit.
const REPLY_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Debug, Error)]
pub enum CtlError {
    #[error("cannot connect to the control socket {0}: {1}")]
    Connect(PathBuf, io::Error),
    #[error("control socket: {0}")]
    Io(#[from] io::Error),
    #[error("the daemon closed the control socket")]
    Closed,
    #[error("the daemon's reply is not the protocol: {0}")]
    Protocol(#[from] serde_json::Error),
    /// The daemon refused or failed the request; its words.
    #[error("{0}")]
    Daemon(String),
}

/// A connection to a daemon's control socket.
pub struct Ctl {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Ctl {
    pub fn connect(path: &Path) -> Result<Ctl, CtlError> {
        let s = UnixStream::connect(path).map_err(|e| CtlError::Connect(path.to_path_buf(), e))?;
        s.set_read_timeout(Some(REPLY_TIMEOUT))?;
        s.set_write_timeout(Some(REPLY_TIMEOUT))?;
        let reader = BufReader::new(s.try_clone()?);
        Ok(Ctl { writer: s, reader })
    }

    /// Sends one request and returns its result (an error reply becomes [`CtlError::Daemon`]).
    pub fn call(&mut self, req: &Request) -> Result<serde_json::Value, CtlError> {
        let mut line = serde_json::to_vec(req)?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        let mut reply = String::new();
        if self.reader.read_line(&mut reply)? == 0 {
            return Err(CtlError::Closed);
        }
        let reply: Reply = serde_json::from_str(&reply)?;
        match (reply.ok, reply.result, reply.error) {
            (true, r, _) => Ok(r.unwrap_or(serde_json::Value::Null)),
            (false, _, e) => Err(CtlError::Daemon(
                e.unwrap_or_else(|| "request failed".into()),
            )),
        }
    }

    pub fn info(&mut self) -> Result<Info, CtlError> {
        Ok(serde_json::from_value(self.call(&Request::Info)?)?)
    }

    pub fn stats(&mut self) -> Result<Stats, CtlError> {
        Ok(serde_json::from_value(self.call(&Request::Stats)?)?)
    }
}

/// `ctl info` for people.
pub fn format_info(i: &Info) -> String {
    format!(
        "image:        {}\nformat:       {}\nsocket:       {}\ncapacity:     {} bytes\n\
         read-only:    {}\nqueues:       {} of {}\nblock size:   {}\ncache:        {}\n\
         state:        {}\npid:          {}\nuptime:       {} s\nversion:      {}\n",
        i.image,
        i.format,
        i.socket,
        i.capacity,
        i.read_only,
        i.num_queues,
        i.queue_size,
        i.logical_block_size,
        if i.writeback {
            "writeback"
        } else {
            "writethrough"
        },
        if i.paused { "quiesced" } else { "running" },
        i.pid,
        i.uptime_s,
        i.version,
    )
}

/// `ctl stats` for people: the counters, then one line per queue with its latency quantiles.
pub fn format_stats(s: &Stats) -> String {
    let mut out = format!(
        "uptime {} s, {} request(s) in flight\n",
        s.uptime_s, s.inflight
    );
    for (name, v) in [("device", &s.device), ("engine", &s.engine)] {
        if let Some(m) = v.as_object() {
            let pairs: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out += &format!("{name}: {}\n", pairs.join(" "));
        }
    }
    for q in &s.queues {
        out += &format!(
            "queue {}: {} completed, {} in flight, latency p50 {} p99 {} max {}\n",
            q.queue,
            q.completed,
            q.inflight,
            us(q.latency_us.quantile_us(0.5)),
            us(q.latency_us.quantile_us(0.99)),
            us(q.latency_us.quantile_us(1.0)),
        );
    }
    out
}

fn us(v: Option<u64>) -> String {
    match v {
        None => "-".into(),
        Some(u) if u >= 10_000 => format!("<{}ms", u / 1000),
        Some(u) => format!("<{u}us"),
    }
}

fn counter(v: &serde_json::Value, name: &str) -> u64 {
    v.get(name).and_then(|x| x.as_u64()).unwrap_or(0)
}

/// The header of `ctl stats --watch`.
pub const WATCH_HEADER: &str =
    "    time    r/s    w/s    f/s  rMiB/s  wMiB/s inflight     p50     p99  errors";

/// One `--watch` line: the rates between two reads.
pub fn watch_line(prev: &Stats, now: &Stats) -> String {
    let dt = (now.at_us.saturating_sub(prev.at_us) as f64 / 1e6).max(1e-6);
    let rate = |name: &str| {
        counter(&now.device, name).saturating_sub(counter(&prev.device, name)) as f64 / dt
    };
    let mut hist = HistogramSnapshot::default();
    for q in &now.queues {
        let before = prev
            .queues
            .iter()
            .find(|p| p.queue == q.queue)
            .map(|p| p.latency_us.clone())
            .unwrap_or_default();
        let d = q.latency_us.since(&before);
        if hist.counts.is_empty() {
            hist = d;
        } else {
            for (a, b) in hist.counts.iter_mut().zip(d.counts) {
                *a += b;
            }
        }
    }
    let errors = counter(&now.device, "errors").saturating_sub(counter(&prev.device, "errors"));
    format!(
        "{:>8} {:>6.0} {:>6.0} {:>6.0} {:>7.1} {:>7.1} {:>8} {:>7} {:>7} {:>7}",
        now.uptime_s,
        rate("reads"),
        rate("writes"),
        rate("flushes"),
        rate("bytes_read") / (1024.0 * 1024.0),
        rate("bytes_written") / (1024.0 * 1024.0),
        now.inflight,
        us(hist.quantile_us(0.5)),
        us(hist.quantile_us(0.99)),
        errors,
    )
}
