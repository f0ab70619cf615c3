//! A passt process (ours or Debian's, by path) in the host namespace of a [`Topology`], its
//! output in a log file, and its readiness as an event rather than a sleep.
//!
//! Two ways to know the socket listens:
//! - [`Ready::Line`]: run in the foreground (`-f`) and wait for a line it prints once the
//!   socket is bound (Debian's passt: "UNIX domain socket bound at").
//! - [`Ready::Daemon`]: let it daemonise; the parent exits 0 only after the socket listens,
//!   and the daemon's PID comes from the `--pid` file the helper adds.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::netns::Topology;
use super::output::{Collector, WaitError};
use super::process::Pidfd;

/// Debian's passt, used to validate the harness before our binary exists.
pub const DEBIAN_PASST: &str = "/usr/bin/passt";

/// The line Debian's passt prints once its UNIX socket is bound.
pub const DEBIAN_READY_LINE: &str = "UNIX domain socket bound at";

/// How long passt may take to become ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Debian's passt if installed.
pub fn debian_passt() -> Option<PathBuf> {
    let p = PathBuf::from(DEBIAN_PASST);
    p.is_file().then_some(p)
}

/// When a started passt counts as ready.
#[derive(Debug, Clone)]
pub enum Ready {
    /// It stays in the foreground and prints this text once the socket listens.
    Line(String),
    /// It daemonises; the parent exiting 0 means the socket listens. The helper appends
    /// `--pid FILE` to learn the daemon's PID.
    Daemon,
    /// Don't wait.
    Started,
}

/// A running passt; killed (by pidfd) on drop.
pub struct Passt {
    /// The foreground child, if it didn't daemonise.
    child: Option<Child>,
    pidfd: Pidfd,
    output: Collector,
    log: PathBuf,
    command: String,
}

impl Passt {
    /// Starts `binary args...` in `topo`'s host namespaces, output (stdout and stderr) to
    /// `<topo.dir()>/<name>.log`, and waits for `ready`. Panics with the log on failure.
    pub fn start(topo: &Topology, binary: &Path, args: &[&str], ready: Ready) -> Passt {
        Passt::start_named(topo, "passt", binary, args, ready)
    }

    /// [`Passt::start`] with `name` for the log and PID files (several instances per test).
    pub fn start_named(
        topo: &Topology,
        name: &str,
        binary: &Path,
        args: &[&str],
        ready: Ready,
    ) -> Passt {
        Passt::start_inheriting(topo, name, binary, args, ready, &[])
    }

    /// [`Passt::start_named`], with `fds` inherited by passt under their numbers (`--fd`).
    pub fn start_inheriting(
        topo: &Topology,
        name: &str,
        binary: &Path,
        args: &[&str],
        ready: Ready,
        fds: &[std::os::fd::RawFd],
    ) -> Passt {
        let log = topo.dir().join(format!("{name}.log"));
        let pid_file = topo.dir().join(format!("{name}.pid"));
        let mut cmd = Command::new(binary);
        cmd.args(args);
        for &fd in fds {
            super::process::inherit_fd(&mut cmd, fd);
        }
        if matches!(ready, Ready::Daemon) {
            let _ = fs::remove_file(&pid_file);
            cmd.arg("--pid").arg(&pid_file);
        }
        let command = format!("{cmd:?}");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let log_file =
            File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let output = Collector::new(Some(log_file));
        let mut child = topo.spawn_host(cmd);
        output.attach(child.stdout.take().expect("piped stdout"));
        output.attach(child.stderr.take().expect("piped stderr"));
        let deadline = Instant::now() + START_TIMEOUT;

        let fail = |why: &str, output: &Collector| -> ! {
            panic!(
                "{name} did not start: {why}\ncommand: {command}\n--- log ({}):\n{}",
                log.display(),
                output.text()
            )
        };

        match ready {
            Ready::Started => {}
            Ready::Line(line) => match output.wait_for(0, &line, deadline) {
                Ok(_) => {}
                Err(WaitError::Timeout) => {
                    fail(&format!("no {line:?} within {START_TIMEOUT:?}"), &output)
                }
                Err(WaitError::Closed) => {
                    let status = child.wait();
                    fail(
                        &format!("exited ({status:?}) before printing {line:?}"),
                        &output,
                    )
                }
            },
            Ready::Daemon => {
                let status = wait_child(child, deadline);
                match status {
                    Some(s) if s.success() => {}
                    other => fail(&format!("parent exit status {other:?}"), &output),
                }
                let pid = fs::read_to_string(&pid_file)
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok())
                    .unwrap_or_else(|| fail(&format!("no PID in {}", pid_file.display()), &output));
                let pidfd = Pidfd::open(pid)
                    .unwrap_or_else(|e| fail(&format!("daemon PID {pid}: {e}"), &output));
                let keep = Pidfd::open(pid)
                    .unwrap_or_else(|e| fail(&format!("daemon PID {pid}: {e}"), &output));
                topo.track(keep);
                return Passt {
                    child: None,
                    pidfd,
                    output,
                    log,
                    command,
                };
            }
        }
        let pidfd = Pidfd::open(child.id()).expect("pidfd_open");
        Passt {
            child: Some(child),
            pidfd,
            output,
            log,
            command,
        }
    }

    /// PID of the passt process (the daemon, if it daemonised).
    pub fn pid(&self) -> u32 {
        self.pidfd.pid()
    }

    /// Path of the log file (stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything passt printed so far.
    pub fn log(&self) -> String {
        self.output.text()
    }

    /// The collected output, to wait for later messages.
    pub fn output(&self) -> &Collector {
        &self.output
    }

    /// The command line it was started with.
    pub fn command(&self) -> &str {
        &self.command
    }

    /// Whether it is still running.
    pub fn running(&self) -> bool {
        !self.pidfd.wait_exit(Duration::ZERO)
    }

    /// Kills it and waits until it is gone.
    pub fn stop(&mut self) {
        if !self.pidfd.kill_and_wait() {
            eprintln!("harness: passt {} did not exit after SIGKILL", self.pid());
        }
        if let Some(child) = self.child.as_mut() {
            let _ = child.wait();
        }
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "harness: {} log ({}):\n{}",
                self.command,
                self.log.display(),
                self.output.text()
            );
        }
    }
}

/// Waits for `child` to exit, up to `deadline`, on its pidfd. On timeout the child is killed.
fn wait_child(mut child: Child, deadline: Instant) -> Option<std::process::ExitStatus> {
    let pidfd = Pidfd::open(child.id()).ok()?;
    if pidfd.wait_exit(deadline.saturating_duration_since(Instant::now())) {
        child.wait().ok()
    } else {
        let _ = pidfd.kill_and_wait();
        None
    }
}

/// passt's log as it is written: `-l` names a FIFO (`<topo.dir()>/<name>.fifo`) that we
/// read, so waits on the log are woken by each line instead of polling a file. Returns the
/// `-l` argument and the collected text.
pub fn log_fifo(topo: &Topology, name: &str) -> (String, Collector) {
    let fifo = topo.dir().join(format!("{name}.fifo"));
    nix::unistd::mkfifo(
        &fifo,
        nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
    )
    .expect("mkfifo");
    // Read and write: opening doesn't wait for a writer, and reads never see end of file.
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .expect("open fifo");
    let log = Collector::new(None);
    log.attach(f);
    (fifo.to_str().expect("utf-8 path").to_string(), log)
}

impl Passt {
    /// Asks passt for its state (SIGUSR1: counters, guest queues) and returns what it
    /// logged into `log`, the [`log_fifo`] it was started with: for failure messages, when
    /// traffic stalled and the question is where.
    pub fn state(&self, log: &Collector) -> String {
        let from = log.len();
        if !self.running() {
            return "passt is not running".into();
        }
        self.signal(libc::SIGUSR1);
        let done = log
            .wait_for(
                from,
                "end of state dump",
                Instant::now() + Duration::from_secs(10),
            )
            .map(|_| ());
        let text = log.text();
        let dump = text.get(from..).unwrap_or("");
        match done {
            Ok(()) => format!("passt state (SIGUSR1):\n{dump}"),
            Err(e) => format!("passt state (SIGUSR1): incomplete ({e:?}):\n{dump}"),
        }
    }

    /// Sends `sig` to the passt process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the PID of a process we started; no memory is involved.
        assert_eq!(
            unsafe { libc::kill(self.pid() as i32, sig) },
            0,
            "kill({}, {sig})",
            self.pid()
        );
    }

    /// Waits up to `timeout` for the process to exit on its own; true if it did.
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        self.pidfd.wait_exit(timeout)
    }
}
