//! Processes the harness starts, and how they end.
//!
//! Every long-lived process is also held by a pidfd, so a later kill can never hit a recycled
//! PID even if the `Child` was already waited for elsewhere. Processes started through
//! [`die_with_parent`] get SIGKILL when the thread that spawned them exits, so an aborted test
//! run (Ctrl-C, a killed test binary) leaves no namespace holders or QEMU behind. That parent
//! is the spawning *thread*: create harness objects in the test thread that uses them.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::Duration;

/// How long a SIGKILLed process may take to disappear before we give up waiting.
pub const KILL_WAIT: Duration = Duration::from_secs(10);

/// A process referred to by pidfd rather than by its (recyclable) PID.
#[derive(Debug)]
pub struct Pidfd {
    fd: OwnedFd,
    pid: u32,
}

impl Pidfd {
    /// Opens a pidfd for `pid`. Call it while the process can't have been reaped yet (right
    /// after spawning it), or the PID may name somebody else.
    pub fn open(pid: u32) -> io::Result<Self> {
        // SAFETY: plain syscall, no pointers; a non-negative result is a new fd we own.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this fd to us, nobody else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(Pidfd { fd, pid })
    }

    /// The PID as seen when the pidfd was opened.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends SIGKILL; a process that already exited is not an error.
    pub fn kill(&self) -> io::Result<()> {
        let fd = self.fd.as_raw_fd();
        // SAFETY: no pointers besides the null siginfo, which the syscall accepts.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd,
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ESRCH) {
                return Err(err);
            }
        }
        Ok(())
    }

    /// Waits until the process has exited (not necessarily reaped); false on timeout.
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        loop {
            // SAFETY: one valid pollfd, count 1.
            let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
            if rc >= 0 {
                return rc > 0;
            }
            if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                return false;
            }
        }
    }

    /// SIGKILL and wait for the exit. Returns false if it didn't exit within [`KILL_WAIT`].
    /// Doesn't reap: whoever holds the `Child` can still `wait` for it, and an unreaped zombie
    /// has already left its namespaces.
    pub fn kill_and_wait(&self) -> bool {
        let _ = self.kill();
        self.wait_exit(KILL_WAIT)
    }
}

/// Makes `cmd`'s process receive SIGKILL when the spawning thread exits. Add this after any
/// other `pre_exec` step that changes credentials or namespaces.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: getpid is async-signal-safe and runs before the fork.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure only makes async-signal-safe syscalls and doesn't allocate.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have gone between fork and prctl: then nobody will signal us.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Kills a child we own and reaps it.
pub fn kill_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Lets `cmd`'s process inherit `fd` under the same number (std opens everything
/// close-on-exec): for `--fd`-style hand-over of a socket.
pub fn inherit_fd(cmd: &mut Command, fd: std::os::fd::RawFd) {
    // SAFETY: fcntl on an fd number is async-signal-safe, as pre_exec requires.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
