//! The start-up contract libvirt and scripts rely on, as with upstream passt: the socket
//! listens and the pid file names the daemon before the parent exits 0; any error before
//! that exits non-zero with the reason on standard error. On SIGTERM/SIGINT the daemon
//! removes its socket and pid file.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::sys::socket::{getsockopt, sockopt};
use nix::unistd::{fork, setsid, ForkResult};

use crate::event::Guest;

/// Default socket paths are `/tmp/passt_1.socket` up to this number.
const MAX_DEFAULT_SOCKETS: u32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("--socket {0}: another process is listening there")]
    SocketInUse(PathBuf),
    #[error("--socket {path}: can't bind")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no free default socket path /tmp/passt_N.socket (N = 1..{MAX_DEFAULT_SOCKETS})")]
    NoFreePath,
    #[error("--fd {0}: not an open UNIX stream socket")]
    BadFd(RawFd),
    #[error("--pid {path}")]
    PidFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("can't fork to the background")]
    Fork(#[source] nix::Error),
}

/// The guest-facing socket and the path to remove at exit, if we created one.
pub struct Socket {
    pub guest: Guest,
    pub path: Option<PathBuf>,
}

/// Binds the listening socket at `path` (or the first free default path), or adopts the
/// `--fd` socket.
pub fn open_socket(path: Option<&Path>, fd: Option<RawFd>) -> Result<Socket, DaemonError> {
    if let Some(fd) = fd {
        return adopt_fd(fd).map(|guest| Socket { guest, path: None });
    }
    if let Some(p) = path {
        let p = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        let l = bind_fresh(&p)?.ok_or_else(|| DaemonError::SocketInUse(p.clone()))?;
        return Ok(Socket {
            guest: Guest::Listen(l),
            path: Some(p),
        });
    }
    for n in 1..=MAX_DEFAULT_SOCKETS {
        let p = PathBuf::from(format!("/tmp/passt_{n}.socket"));
        match bind_fresh(&p) {
            Ok(Some(l)) => {
                return Ok(Socket {
                    guest: Guest::Listen(l),
                    path: Some(p),
                })
            }
            Ok(None) => continue,
            Err(e) => log::debug!("{e}"),
        }
    }
    Err(DaemonError::NoFreePath)
}

/// Binds `path`; a stale socket file nobody listens on is replaced. `Ok(None)`: in use.
fn bind_fresh(path: &Path) -> Result<Option<UnixListener>, DaemonError> {
    match UnixListener::bind(path) {
        Ok(l) => Ok(Some(l)),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                return Ok(None);
            }
            let _ = std::fs::remove_file(path);
            UnixListener::bind(path)
                .map(Some)
                .map_err(|source| DaemonError::Bind {
                    path: path.to_path_buf(),
                    source,
                })
        }
        Err(source) => Err(DaemonError::Bind {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Takes ownership of an inherited socket: listening sockets are accepted on, connected
/// ones carry the guest directly.
fn adopt_fd(fd: RawFd) -> Result<Guest, DaemonError> {
    // SAFETY: fcntl(F_GETFD) on any integer is harmless; it tells whether fd is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(DaemonError::BadFd(fd));
    }
    // SAFETY: the fd is open and was handed to us to own (--fd); nothing else in this
    // process uses it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    match getsockopt(&owned, sockopt::SockType) {
        Ok(nix::sys::socket::SockType::Stream) => {}
        _ => {
            std::mem::forget(owned);
            return Err(DaemonError::BadFd(fd));
        }
    }
    let listening = getsockopt(&owned, sockopt::AcceptConn).unwrap_or(false);
    Ok(if listening {
        Guest::Listen(UnixListener::from(owned))
    } else {
        Guest::Connected(UnixStream::from(owned))
    })
}

/// An opened (not yet written) pid file.
pub struct PidFile {
    file: File,
    pub path: PathBuf,
}

impl PidFile {
    /// Creates the file now, so a bad path fails before we fork.
    pub fn create(path: &Path) -> Result<PidFile, DaemonError> {
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&path)
            .map_err(|source| DaemonError::PidFile {
                path: path.clone(),
                source,
            })?;
        Ok(PidFile { file, path })
    }

    pub fn write(&mut self, pid: i32) -> Result<(), DaemonError> {
        writeln!(self.file, "{pid}")
            .and_then(|_| self.file.flush())
            .map_err(|source| DaemonError::PidFile {
                path: self.path.clone(),
                source,
            })
    }
}

/// Forks to the background. Returns in the daemon only: the parent writes the daemon's pid
/// to `pid_file` and exits 0 (or kills the child and exits 1 if it can't).
pub fn daemonize(pid_file: Option<&mut PidFile>) -> Result<(), DaemonError> {
    // SAFETY: no threads exist yet (we fork before the loop starts any), so the child may
    // run arbitrary code.
    match unsafe { fork() }.map_err(DaemonError::Fork)? {
        ForkResult::Parent { child } => {
            if let Some(pf) = pid_file {
                if let Err(e) = pf.write(child.as_raw()) {
                    eprintln!("{}", crate::error_chain(&e));
                    let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                    std::process::exit(1);
                }
            }
            std::process::exit(0);
        }
        ForkResult::Child => {
            let _ = setsid();
            let _ = std::env::set_current_dir("/");
            if let Ok(null) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                for target in 0..=2 {
                    // SAFETY: dup2 onto the standard descriptors, which we own.
                    unsafe { libc::dup2(null.as_raw_fd(), target) };
                }
            }
            crate::logger::daemonized();
            Ok(())
        }
    }
}
