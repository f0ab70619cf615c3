//! Thin, checked wrappers over the socket system calls that several modules make with
//! `libc` directly (where nix has no wrapper for the option, or the call is on the hot path).

use std::io;
use std::mem::size_of;
use std::os::fd::RawFd;

/// A `-1`-on-error return value as an `io::Result`, with `errno` as the error.
pub fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Sets an integer socket option.
pub fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value is a live c_int of the length given.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Reads an integer socket option.
pub fn getsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v and len are live and sized for an int option.
    cvt(unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(v)
}

/// Asks for the largest receive buffer the host lets an unprivileged process have
/// (`SO_RCVBUF` is capped at `net.core.rmem_max`), as upstream passt does. A UDP socket's
/// receive buffer is the queue of datagrams waiting for us: the default, 208 KiB, holds
/// about 90 datagrams of 1,400 bytes, a millisecond at 1 Gbit/s, and every longer pause of
/// the event loop lost datagrams (host-side `UdpRcvbufErrors` held all of the bench's
/// peer→guest loss). Best effort: a refusal leaves the default.
pub fn max_rcvbuf(fd: RawFd) {
    let _ = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, libc::c_int::MAX / 2);
}

/// Binds a socket to a network interface by name (`SO_BINDTODEVICE`).
pub fn bind_to_device(fd: RawFd, name: &str) -> io::Result<()> {
    // SAFETY: the name's bytes are live for the call, the length is theirs.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    })
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    #[test]
    fn max_rcvbuf_takes_what_rmem_max_allows() {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let fd = s.as_raw_fd();
        let before = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF).unwrap();
        max_rcvbuf(fd);
        let after = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF).unwrap();
        let rmem_max: i64 = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The kernel doubles what it accepts (bookkeeping overhead), capped at rmem_max.
        let want = 2 * rmem_max.min(i64::from(libc::c_int::MAX / 2));
        assert_eq!(i64::from(after), want, "SO_RCVBUF was {before}");
    }
}
