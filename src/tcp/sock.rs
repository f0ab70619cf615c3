//! The host side of a connection: a non-blocking kernel TCP socket behind [`SockOps`].
//!
//! Data from the peer stays in the socket until the guest acknowledges it: we read it with
//! `MSG_PEEK` at an offset (`SO_PEEK_OFF`, which TCP sockets support since Linux 6.9), and
//! discard acknowledged bytes with `MSG_TRUNC`, which drops them without copying. On older
//! kernels, the peek reads from the first unconsumed byte and the already-sent part is
//! skipped in our buffer; that caps what may be in flight at the buffer's size. Either way,
//! nothing the guest hasn't acknowledged is lost, and retransmission is just a peek at a
//! lower offset.

use crate::fwd::to_sockaddr;
use crate::sys::{cvt, getsockopt_int, setsockopt_int};
use std::io;
use std::mem::size_of;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::conn::{SendSpace, SockOps};

/// `SO_PEEK_OFF` (asm-generic; the same on every architecture we build for).
const SO_PEEK_OFF: libc::c_int = 42;
/// `SIOCOUTQ` = `TIOCOUTQ`: bytes in the send queue.
const SIOCOUTQ: libc::c_ulong = 0x5411;
/// `SO_MEMINFO` (Linux 4.13): the socket's memory counters, `u32` each, indexed by
/// `SK_MEMINFO_*` (linux/sock_diag.h).
const SO_MEMINFO: libc::c_int = 55;
const SK_MEMINFO_VARS: usize = 10;
const SK_MEMINFO_SNDBUF: usize = 3;
const SK_MEMINFO_WMEM_QUEUED: usize = 5;

/// A connected (or connecting) host TCP socket.
#[derive(Debug)]
pub struct HostSock {
    fd: OwnedFd,
    peek_off: bool,
    /// `EPOLLRDHUP` seen: without `SO_PEEK_OFF`, tells end of stream from "no new data".
    rdhup: bool,
    /// Where the kernel's peek offset stands, if we know: a peek moves it past what it
    /// returned, so consecutive segments need no `setsockopt` in between.
    peek_at: Option<usize>,
}

impl HostSock {
    /// Opens a non-blocking socket to `remote`, bound to `bind_addr` and `bind_if` if
    /// given, and starts connecting. Connection refused and the like show up later, as the
    /// socket's error.
    pub fn connect(
        remote: SocketAddr,
        bind_addr: Option<IpAddr>,
        bind_if: Option<&str>,
    ) -> io::Result<HostSock> {
        let family = if remote.is_ipv6() {
            libc::AF_INET6
        } else {
            libc::AF_INET
        };
        // SAFETY: plain socket(2) call.
        let fd = cvt(unsafe {
            libc::socket(
                family,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::IPPROTO_TCP,
            )
        })?;
        // SAFETY: socket(2) just returned this fd; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let raw = fd.as_raw_fd();
        if let Some(name) = bind_if {
            crate::sys::bind_to_device(raw, name)?;
        }
        if let Some(a) = bind_addr {
            let (ss, len) = to_sockaddr(SocketAddr::new(a, 0));
            // SAFETY: ss holds a sockaddr of length len.
            cvt(unsafe { libc::bind(raw, (&ss as *const libc::sockaddr_storage).cast(), len) })?;
        }
        let peek_off = setsockopt_int(raw, libc::SOL_SOCKET, SO_PEEK_OFF, 0).is_ok();
        let (ss, len) = to_sockaddr(remote);
        // SAFETY: ss holds a sockaddr of length len.
        let r = unsafe { libc::connect(raw, (&ss as *const libc::sockaddr_storage).cast(), len) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(e);
            }
        }
        Ok(HostSock {
            fd,
            peek_off,
            rdhup: false,
            peek_at: None,
        })
    }

    /// A connection `accept()` returned.
    pub fn accepted(fd: OwnedFd) -> HostSock {
        let peek_off = setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, SO_PEEK_OFF, 0).is_ok();
        HostSock {
            fd,
            peek_off,
            rdhup: false,
            peek_at: None,
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Notes what epoll reported, before the connection logic runs.
    pub fn note_events(&mut self, rdhup: bool) {
        self.rdhup |= rdhup;
    }

    /// Closes with a RST to the peer (`SO_LINGER` 0) instead of a FIN.
    pub fn abort(self) {
        let l = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: l is a live linger struct of the length given. A failure only means the
        // close below sends a FIN instead.
        unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&l as *const libc::linger).cast(),
                size_of::<libc::linger>() as libc::socklen_t,
            )
        };
    }

    /// The socket's MSS towards the peer.
    pub fn mss(&self) -> Option<u16> {
        getsockopt_int(self.raw_fd(), libc::IPPROTO_TCP, libc::TCP_MAXSEG)
            .ok()
            .and_then(|v| u16::try_from(v).ok())
    }
}

fn recv(fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: buf is live and writable for its length (or null with length 0 for TRUNC).
    let r = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            flags | libc::MSG_DONTWAIT,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

impl HostSock {
    fn peek_iov_at(&mut self, skip: usize, iov: &[libc::iovec]) -> io::Result<usize> {
        if self.peek_at != Some(skip) {
            let off = libc::c_int::try_from(skip)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            self.peek_at = None;
            setsockopt_int(self.raw_fd(), libc::SOL_SOCKET, SO_PEEK_OFF, off)?;
            self.peek_at = Some(skip);
        }
        // SAFETY: msghdr is plain data; all zeroes is valid, the iovec fields are set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        // The kernel only writes through these iovecs (recvmsg takes a non-const pointer
        // but never modifies the array itself); what they point to is the caller's room.
        msg.msg_iov = iov.as_ptr().cast_mut();
        msg.msg_iovlen = iov.len();
        // SAFETY: msg points at `iov`, live for the call; each iovec is memory the caller
        // lent for writing (see `FrameWriter::payload`).
        let r =
            unsafe { libc::recvmsg(self.raw_fd(), &mut msg, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        self.peek_at = Some(skip + r as usize);
        Ok(r as usize)
    }
}

impl SockOps for HostSock {
    fn send(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: an all-zero msghdr is valid (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr().cast_mut();
        msg.msg_iovlen = iov.len();
        // SAFETY: the iovecs describe live memory (the caller's contract: frames of the
        // current batch), which the kernel only reads.
        let r =
            unsafe { libc::sendmsg(self.raw_fd(), &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }

    fn peek(&mut self, skip: usize, want: usize, buf: &mut [u8]) -> io::Result<usize> {
        if self.peek_off {
            let off = libc::c_int::try_from(skip)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            self.peek_at = None;
            setsockopt_int(self.raw_fd(), libc::SOL_SOCKET, SO_PEEK_OFF, off)?;
            return recv(self.raw_fd(), &mut buf[..want], libc::MSG_PEEK);
        }
        let end = (skip + want).min(buf.len());
        let n = recv(self.raw_fd(), &mut buf[..end], libc::MSG_PEEK)?;
        if n <= skip {
            return if self.rdhup && n == skip {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        buf.copy_within(skip..n, 0);
        Ok(n - skip)
    }

    fn peek_limit(&self, skip: usize, buf_len: usize) -> usize {
        if self.peek_off {
            buf_len
        } else {
            buf_len.saturating_sub(skip)
        }
    }

    fn peek_iov(&mut self, skip: usize, iov: &[libc::iovec]) -> Option<io::Result<usize>> {
        if !self.peek_off {
            return None;
        }
        Some(self.peek_iov_at(skip, iov))
    }

    fn consume(&mut self, mut n: usize) -> io::Result<()> {
        self.peek_at = None;
        while n > 0 {
            // MSG_TRUNC on TCP: drop the bytes, copy nothing.
            // SAFETY: a null buffer is fine with MSG_TRUNC, nothing is written.
            let r = unsafe {
                libc::recv(
                    self.raw_fd(),
                    std::ptr::null_mut(),
                    n,
                    libc::MSG_TRUNC | libc::MSG_DONTWAIT,
                )
            };
            match r {
                r if r > 0 => n -= r as usize,
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    fn shutdown_write(&mut self) -> io::Result<()> {
        // SAFETY: plain shutdown(2) on our fd.
        cvt(unsafe { libc::shutdown(self.raw_fd(), libc::SHUT_WR) }).map(drop)
    }

    fn send_space(&mut self) -> SendSpace {
        let fd = self.raw_fd();
        // The kernel's own accounting: the buffer and what its queue takes of it, both in
        // memory (payload plus skb overhead). Showing the guest most of the difference lets
        // the queue reach the point where the kernel calls the socket full, which is what
        // makes it grow the buffer and signal space (see `arm_write_space`).
        let mut mem = [0u32; SK_MEMINFO_VARS];
        let mut len = std::mem::size_of_val(&mem) as libc::socklen_t;
        // SAFETY: mem has room for len bytes; the kernel writes at most that and sets len.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                SO_MEMINFO,
                mem.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if r == 0 && len as usize >= (SK_MEMINFO_WMEM_QUEUED + 1) * 4 {
            let free = mem[SK_MEMINFO_SNDBUF].saturating_sub(mem[SK_MEMINFO_WMEM_QUEUED]);
            // Overhead the payload will bring: an eighth covers the large skbs bulk data
            // makes.
            return SendSpace {
                free: free as usize / 8 * 7,
                queued: mem[SK_MEMINFO_WMEM_QUEUED] > 0,
            };
        }
        let Ok(sndbuf) = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF) else {
            return SendSpace::default();
        };
        let mut queued: libc::c_int = 0;
        // SAFETY: SIOCOUTQ writes one int to the pointer given.
        if unsafe { libc::ioctl(fd, SIOCOUTQ as _, &mut queued) } < 0 {
            return SendSpace::default();
        }
        // Kernels before 4.13: SO_SNDBUF counts memory (payload and overhead), SIOCOUTQ
        // payload only; three quarters of the buffer still takes the queue past the
        // kernel's "full" mark (two thirds).
        SendSpace {
            free: (sndbuf.max(0) as usize / 4 * 3).saturating_sub(queued.max(0) as usize),
            queued: queued > 0,
        }
    }

    fn arm_write_space(&mut self) {
        let mut pfd = libc::pollfd {
            fd: self.raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout. Its side effect is the point: tcp_poll()
        // marks a socket it finds full, so that freed space wakes our epoll with EPOLLOUT.
        unsafe { libc::poll(&mut pfd, 1, 0) };
    }

    fn take_error(&mut self) -> Option<io::Error> {
        match getsockopt_int(self.raw_fd(), libc::SOL_SOCKET, libc::SO_ERROR) {
            Ok(0) => None,
            Ok(e) => Some(io::Error::from_raw_os_error(e)),
            Err(e) => Some(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;

    fn epoll_out_edges(ep: RawFd, timeout_ms: i32) -> usize {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 4];
        // SAFETY: evs is live and holds 4 events.
        let n = unsafe { libc::epoll_wait(ep, evs.as_mut_ptr(), 4, timeout_ms) };
        evs[..n.max(0) as usize]
            .iter()
            .filter(|e| e.events & libc::EPOLLOUT as u32 != 0)
            .count()
    }

    /// A guest that sends exactly the window we show, never more, fills the socket; once
    /// the peer reads, an EPOLLOUT edge must tell us the socket drained (and the window may
    /// reopen), rather than our next look at it, [`super::super::conn::WND_POLL`] later.
    #[test]
    fn filling_the_window_we_show_gets_an_edge_when_it_drains() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut s = HostSock::connect(l.local_addr().unwrap(), None, None).unwrap();
        let (mut peer, _) = l.accept().unwrap();
        // SAFETY: plain syscalls; ep is closed at the end.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(ep >= 0);
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLOUT | libc::EPOLLET) as u32,
            u64: 1,
        };
        // SAFETY: valid fds and event.
        assert_eq!(
            unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, s.raw_fd(), &mut ev) },
            0
        );
        // The connection's own edge. From here on, nothing of ours polls the socket but
        // send_space(): an epoll_wait() now would poll it too and hide what we test.
        while epoll_out_edges(ep, 0) > 0 {}
        let chunk = [0x5au8; 16384];
        let mut total = 0;
        loop {
            let space = s.send_space().free;
            if space == 0 {
                break;
            }
            // What the connection does whenever the window it shows is low.
            s.arm_write_space();
            let want = space.min(chunk.len());
            let iov = [libc::iovec {
                iov_base: chunk.as_ptr().cast_mut().cast(),
                iov_len: want,
            }];
            let n = s.send(&iov).unwrap();
            assert_eq!(n, want, "the kernel took less than the window we showed");
            total += n;
            assert!(total < 64 << 20, "the send buffer never filled");
        }
        // Edges while filling, if any, are not the point.
        while epoll_out_edges(ep, 0) > 0 {}
        let mut buf = vec![0u8; 1 << 16];
        let mut read = 0;
        while read < total {
            read += peer.read(&mut buf).unwrap();
        }
        assert!(
            epoll_out_edges(ep, 2000) > 0,
            "no EPOLLOUT after the socket drained ({total} bytes)"
        );
        // SAFETY: ep is ours.
        unsafe { libc::close(ep) };
    }
}
