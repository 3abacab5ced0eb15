//! The daemon's side of the control socket: one thread, one epoll loop (the `epoll` crate)
//! over the listening socket, the daemon's stop event and every client connection.
//!
//! Clients are non-blocking: a request is read as far as it has arrived, a reply waits in the
//! connection's output buffer until the socket takes it. So a client that sends half a line or
//! stops reading holds only its own connection, never the loop. Commands run on this thread:
//! `info`, `stats` and `resume` take microseconds; `flush` waits for one commit and `quiesce` for
//! the requests in flight (at most [`QUIESCE_TIMEOUT`]) and a commit, and other clients wait that
//! long for their answer. The loop ends when the daemon's stop event fires.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use epoll::{ControlOptions, Event, Events};

use super::{Info, Reply, Request, Stats, MAX_LINE};
use crate::device::BlockDevice;
use crate::engine::BlockEngine;

/// Longest a `quiesce` waits for the requests in flight before it gives up and resumes.
pub const QUIESCE_TIMEOUT: Duration = Duration::from_secs(30);
/// Most clients at once; more are accepted and closed at once.
const MAX_CLIENTS: usize = 64;
/// Reply bytes a client may leave unread before it is dropped (a `stats` reply is ~3 KiB).
const MAX_PENDING_OUT: usize = 1 << 20;

const LISTENER: u64 = 0;
const STOP: u64 = 1;
/// Client tokens are their descriptor plus this.
const CLIENT_BASE: u64 = 2;

/// What `info` says about the daemon that does not come from the device.
#[derive(Clone, Debug)]
pub struct DaemonInfo {
    pub image: PathBuf,
    pub socket: PathBuf,
    pub format: &'static str,
    pub started: Instant,
}

struct Client {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// The client sent something that is not the protocol: its reply is sent, then it is closed.
    closing: bool,
}

/// Starts the control thread. It serves until `stop` is readable (the daemon's stop event:
/// written once at shutdown and never read, so it stays readable).
pub fn spawn<E: BlockEngine>(
    listener: UnixListener,
    device: BlockDevice<E>,
    info: DaemonInfo,
    stop: vmm_sys_util::eventfd::EventFd,
) -> io::Result<std::thread::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    let epfd = epoll::create(true)?;
    // SAFETY: epoll::create returned a new descriptor that nothing else owns.
    let epfd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(epfd) };
    add(
        epfd.as_raw_fd(),
        listener.as_raw_fd(),
        LISTENER,
        Events::EPOLLIN,
    )?;
    add(epfd.as_raw_fd(), stop.as_raw_fd(), STOP, Events::EPOLLIN)?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            let mut server = Server {
                epfd,
                listener,
                device,
                info,
                clients: HashMap::new(),
            };
            if let Err(e) = server.run() {
                log::error!("control socket: {e}; it no longer answers");
            }
            drop(stop);
        })
}

fn add(epfd: RawFd, fd: RawFd, token: u64, events: Events) -> io::Result<()> {
    epoll::ctl(
        epfd,
        ControlOptions::EPOLL_CTL_ADD,
        fd,
        Event::new(events, token),
    )
}

struct Server<E: BlockEngine> {
    epfd: OwnedFd,
    listener: UnixListener,
    device: BlockDevice<E>,
    info: DaemonInfo,
    clients: HashMap<RawFd, Client>,
}

impl<E: BlockEngine> Server<E> {
    fn run(&mut self) -> io::Result<()> {
        let mut events = [Event::new(Events::empty(), 0); 16];
        loop {
            let n = match epoll::wait(self.epfd.as_raw_fd(), -1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for ev in &events[..n] {
                let token = ev.data;
                let flags = Events::from_bits_retain(ev.events);
                match token {
                    STOP => return Ok(()),
                    LISTENER => self.accept(),
                    t => self.client_ready((t - CLIENT_BASE) as RawFd, flags),
                }
            }
        }
    }

    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("control socket: cannot accept: {e}");
                    return;
                }
            };
            if self.clients.len() >= MAX_CLIENTS {
                log::warn!("control socket: {MAX_CLIENTS} clients already; one more refused");
                continue;
            }
            let fd = stream.as_raw_fd();
            let registered = stream.set_nonblocking(true).and_then(|()| {
                add(
                    self.epfd.as_raw_fd(),
                    fd,
                    CLIENT_BASE + fd as u64,
                    Events::EPOLLIN | Events::EPOLLRDHUP,
                )
            });
            if let Err(e) = registered {
                log::warn!("control socket: cannot watch a client: {e}");
                continue;
            }
            self.clients.insert(
                fd,
                Client {
                    stream,
                    input: Vec::new(),
                    output: Vec::new(),
                    closing: false,
                },
            );
        }
    }

    fn client_ready(&mut self, fd: RawFd, flags: Events) {
        let Some(mut c) = self.clients.remove(&fd) else {
            return;
        };
        let mut open = !flags.contains(Events::EPOLLERR);
        if open
            && !c.closing
            && flags.intersects(Events::EPOLLIN | Events::EPOLLHUP | Events::EPOLLRDHUP)
        {
            open = self.read_requests(&mut c);
        }
        if open {
            open = flush_output(&mut c);
        }
        if open && !(c.closing && c.output.is_empty()) {
            // Writability only while a reply waits; nothing more is read from a closing client
            // (its hang-up would otherwise be reported again and again while it does not read).
            let mut want = if c.closing {
                Events::empty()
            } else {
                Events::EPOLLIN | Events::EPOLLRDHUP
            };
            if !c.output.is_empty() {
                want |= Events::EPOLLOUT;
            }
            let ev = Event::new(want, CLIENT_BASE + fd as u64);
            if epoll::ctl(self.epfd.as_raw_fd(), ControlOptions::EPOLL_CTL_MOD, fd, ev).is_ok() {
                self.clients.insert(fd, c);
            }
        }
        // Otherwise `c` is dropped here: closing its stream also removes it from the epoll set.
    }

    /// Reads what has arrived and answers every complete line. False when the client is gone.
    fn read_requests(&mut self, c: &mut Client) -> bool {
        let mut buf = [0u8; 1024];
        let mut eof = false;
        loop {
            match c.stream.read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => c.input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
            if c.input.len() > MAX_LINE {
                break;
            }
        }
        while !c.closing {
            let Some(end) = c.input.iter().position(|&b| b == b'\n') else {
                if c.input.len() > MAX_LINE {
                    queue_reply(
                        c,
                        &Reply::error(format!("request longer than {MAX_LINE} bytes")),
                    );
                    c.closing = true;
                }
                break;
            };
            let line: Vec<u8> = c.input.drain(..=end).collect();
            let reply = match serde_json::from_slice::<Request>(&line) {
                Ok(req) => self.handle(req),
                Err(e) => {
                    c.closing = true;
                    Reply::error(format!("bad request: {e}"))
                }
            };
            queue_reply(c, &reply);
            if c.output.len() > MAX_PENDING_OUT {
                return false;
            }
        }
        // A client that closed its side still gets the replies to what it sent.
        if eof {
            c.closing = true;
        }
        true
    }

    fn handle(&self, req: Request) -> Reply {
        log::debug!("control: {req:?}");
        let d = &self.device;
        match req {
            Request::Info => {
                let e = d.engine().info();
                let o = d.options();
                let info = Info {
                    version: env!("CARGO_PKG_VERSION").into(),
                    pid: std::process::id(),
                    uptime_s: self.info.started.elapsed().as_secs(),
                    image: self.info.image.display().to_string(),
                    format: self.info.format.into(),
                    socket: self.info.socket.display().to_string(),
                    capacity: e.capacity.0,
                    read_only: e.read_only,
                    num_queues: o.num_queues,
                    queue_size: o.queue_size,
                    logical_block_size: o.logical_block_size,
                    writeback: d.is_writeback(),
                    paused: d.is_paused(),
                };
                to_reply(&info)
            }
            Request::Stats => {
                let elapsed = self.info.started.elapsed();
                let device = serde_json::to_value(d.counters().snapshot());
                let engine = serde_json::to_value(d.engine().counters());
                match (device, engine) {
                    (Ok(device), Ok(engine)) => to_reply(&Stats {
                        uptime_s: elapsed.as_secs(),
                        at_us: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
                        inflight: d.inflight() as u64,
                        device,
                        engine,
                        queues: d.queue_stats(),
                    }),
                    (Err(e), _) | (_, Err(e)) => Reply::error(e),
                }
            }
            Request::Flush => match d.engine().flush() {
                Ok(()) => Reply::ok(serde_json::json!({})),
                Err(e) => Reply::error(format!("flush failed: {e}")),
            },
            Request::Quiesce => match d.quiesce(QUIESCE_TIMEOUT) {
                Ok(()) => {
                    log::info!("quiesced by the control socket: no request is taken until resume");
                    Reply::ok(serde_json::json!({}))
                }
                Err(e) => Reply::error(format!("quiesce failed: {e}")),
            },
            Request::Resize { size } => {
                let new = crate::resize::NewSize::parse(&size)
                    .map_err(|e| format!("size {size:?}: {e}"))
                    .and_then(|n| {
                        n.resolve(d.capacity().0)
                            .ok_or_else(|| format!("size {size:?}: not a positive size"))
                    });
                match new.map(|n| d.resize(n, QUIESCE_TIMEOUT)) {
                    Err(e) => Reply::error(format!("resize: {e}")),
                    Ok(Err(e)) => Reply::error(format!("resize failed: {e}")),
                    Ok(Ok(r)) => to_reply(&r),
                }
            }
            Request::Resume => {
                let was = d.is_paused();
                d.resume();
                if was {
                    log::info!("resumed by the control socket");
                }
                Reply::ok(serde_json::json!({ "was_paused": was }))
            }
            #[cfg(feature = "testing")]
            Request::TestOpen { path } => match std::fs::File::open(&path) {
                Ok(_) => Reply::ok(serde_json::json!({})),
                Err(e) => Reply::error(format!("open {}: {e}", path.display())),
            },
            #[cfg(feature = "testing")]
            Request::TestSocket => match std::net::UdpSocket::bind(("127.0.0.1", 0)) {
                Ok(_) => Reply::ok(serde_json::json!({})),
                Err(e) => Reply::error(format!("AF_INET socket: {e}")),
            },
        }
    }
}

fn to_reply<T: serde::Serialize>(v: &T) -> Reply {
    match serde_json::to_value(v) {
        Ok(v) => Reply::ok(v),
        Err(e) => Reply::error(e),
    }
}

fn queue_reply(c: &mut Client, reply: &Reply) {
    // A Reply of plain values always serialises; a failure would be a bug, answered as an error.
    let mut line = serde_json::to_vec(reply)
        .unwrap_or_else(|_| br#"{"ok":false,"error":"internal: reply not encodable"}"#.to_vec());
    line.push(b'\n');
    c.output.extend_from_slice(&line);
}

/// Writes what the socket takes now. False when the client is gone.
fn flush_output(c: &mut Client) -> bool {
    while !c.output.is_empty() {
        match c.stream.write(&c.output) {
            Ok(0) => return false,
            Ok(n) => {
                c.output.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
    true
}
