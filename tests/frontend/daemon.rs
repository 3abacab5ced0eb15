//! The `extblk serve` process under test: started on an image and a socket, its log kept in a
//! file (printed when a test fails), killed on drop. SIGKILL is the daemon crash of issue 15.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static LOG_SEQ: AtomicU32 = AtomicU32::new(0);

pub struct Daemon {
    child: Child,
    log: PathBuf,
}

/// How the daemon is started: its arguments before the image, and extra environment.
#[derive(Clone, Default)]
pub struct Start<'a> {
    pub args: Vec<&'a str>,
    pub env: Vec<(&'a str, String)>,
}

impl Daemon {
    pub fn start(image: &Path, socket: &Path, how: &Start) -> Daemon {
        let _ = fs::remove_file(socket);
        let n = LOG_SEQ.fetch_add(1, Ordering::Relaxed);
        let log =
            std::env::temp_dir().join(format!("extblk-frontend-{}-{n}.log", std::process::id()));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_extblk"));
        cmd.env("RUST_LOG", "debug")
            .arg("serve")
            .arg("--socket")
            .arg(socket)
            .args(&how.args)
            .arg(image);
        for (k, v) in &how.env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let d = Daemon { child, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "daemon did not create its socket within 10 s: {}",
                d.read_log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    pub fn read_log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Panics if the daemon has exited (a panic ends it with status 101, a SIGBUS by signal).
    pub fn assert_alive(&mut self, after: &str) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!(
                "the daemon died after {after}: {status:?}\n{}",
                self.read_log()
            );
        }
        let log = self.read_log();
        assert!(
            !log.contains("panicked"),
            "the daemon panicked after {after}:\n{log}"
        );
    }

    /// CPU time (user and system) the daemon has used so far, from /proc/<pid>/stat.
    pub fn cpu_time(&self) -> Duration {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // The fields after the command name, which is in parentheses and may hold spaces: the
        // state is field 3 of stat(5), so utime (14) and stime (15) are at 11 and 12 here.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_millis(ticks * 1000 / hz)
    }

    /// SIGKILL: the crash. Returns the log.
    pub fn kill(mut self) -> String {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.read_log()
    }

    /// SIGTERM, then the exit status and the log (with the exit counters), within 60 s.
    pub fn stop(mut self) -> (ExitStatus, String) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, self.read_log());
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not exit within 60 s of SIGTERM:\n{}",
                self.read_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- daemon log ----\n{}", self.read_log());
        }
        let _ = fs::remove_file(&self.log);
    }
}
