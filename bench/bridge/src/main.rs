//! `passt-bridge`: plays the VM for a network back-end, with the kernel of the current
//! network namespace as the guest.
//!
//! It opens a tap device here (the "guest" namespace) and moves its frames to and from a
//! back-end: as a vhost-user front-end (the VMM's part: guest memory in a memfd, split
//! virtqueues, MRG_RXBUF, EVENT_IDX; see [`vhost`]) or over QEMU's stream protocol (see
//! [`stream`]). The guest namespace's TCP/IP stack then drives the back-end at native speed,
//! which a TCG guest cannot do. One thread, one epoll loop.

mod stream;
mod tap;
mod vhost;

use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Connects a tap device in this network namespace to a vhost-user or stream back-end.
#[derive(Parser)]
#[command(name = "passt-bridge")]
struct Args {
    /// Tap device to create here
    #[arg(long, default_value = "tap0")]
    tap: String,
    /// vhost-user back-end socket: act as the VMM
    #[arg(long, value_name = "SOCKET", conflicts_with = "stream")]
    vhost_user: Option<PathBuf>,
    /// Stream back-end socket (4-byte big-endian length + frame)
    #[arg(long, value_name = "SOCKET")]
    stream: Option<PathBuf>,
    /// Virtqueue size (power of two)
    #[arg(long, default_value_t = 1024)]
    queue_size: u16,
    /// Size of each RX buffer posted to the back-end (mergeable: frames may span several)
    #[arg(long, default_value_t = 16384)]
    rx_buf: u32,
    /// Don't negotiate VIRTIO_RING_F_EVENT_IDX
    #[arg(long)]
    no_event_idx: bool,
    /// Create this file once the back-end is attached
    #[arg(long, value_name = "FILE")]
    ready: Option<PathBuf>,
}

/// Data-path counters.
#[derive(Default, Debug)]
pub struct Counters {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub errors: u64,
    pub kicks: u64,
    pub calls: u64,
}

/// A minimal epoll set.
pub struct Epoll(RawFd);

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Epoll(fd))
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: valid epoll fd and event.
        if unsafe { libc::epoll_ctl(self.0, op, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn add(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, events, token)
    }

    pub fn modify(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, events, token)
    }

    pub fn wait(&self, events: &mut [libc::epoll_event], timeout: i32) -> io::Result<usize> {
        loop {
            // SAFETY: valid buffer of the given length.
            let n = unsafe {
                libc::epoll_wait(self.0, events.as_mut_ptr(), events.len() as i32, timeout)
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: our own fd.
        unsafe { libc::close(self.0) };
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("passt-bridge: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(args: &Args) -> io::Result<()> {
    let tap = tap::Tap::open(&args.tap)
        .map_err(|e| io::Error::other(format!("tap {}: {e}", args.tap)))?;
    let mut c = Counters::default();
    let ready = || -> io::Result<()> {
        eprintln!("passt-bridge: {} attached", tap.name());
        if let Some(p) = &args.ready {
            std::fs::write(p, b"ready\n")?;
        }
        Ok(())
    };
    let r = if let Some(path) = &args.vhost_user {
        let o = vhost::Options {
            queue_size: args.queue_size,
            rx_buf: args.rx_buf,
            event_idx: !args.no_event_idx,
        };
        let b = vhost::Bridge::connect(path, &o)?;
        ready()?;
        b.run(&tap, &mut c)
    } else if let Some(path) = &args.stream {
        let b = stream::Bridge::connect(path)?;
        ready()?;
        b.run(&tap, &mut c)
    } else {
        return Err(io::Error::other(
            "give --vhost-user SOCKET or --stream SOCKET",
        ));
    };
    eprintln!("passt-bridge: {c:?}");
    r
}
