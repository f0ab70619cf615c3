//! Stream mode: the tap against a back-end speaking QEMU's stream protocol (each frame
//! preceded by its length, 32 bits big-endian) on a UNIX socket.
//!
//! Tap → socket: frames are read straight into a large send buffer, each with `readv()` so
//! that the tap's 12-byte virtio-net header lands 8 bytes in a scratch area and 4 bytes in
//! the frame's length slot, which is then overwritten with the length: the batch leaves in
//! one `write()` with no copy of our own. Socket → tap: the socket is read in large chunks
//! and each frame goes to the tap with `writev()` behind a zeroed header. While the socket
//! cannot take the send buffer, the tap is not read, so back-pressure reaches the guest's
//! TCP through the tap queue, as it would with a VM.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::tap::{Tap, VNET_HDR};
use crate::vhost::TX_BUF;
use crate::{Counters, Epoll};

const OUT_CAP: usize = 1 << 20;
const IN_CAP: usize = 1 << 20;
/// Largest frame accepted from the back-end.
const MAX_FRAME: usize = 65_535 + 14;

pub struct Bridge {
    sock: UnixStream,
    out: Vec<u8>,
    out_len: usize,
    out_sent: usize,
    inb: Vec<u8>,
    in_len: usize,
}

impl Bridge {
    pub fn connect(path: &Path) -> io::Result<Bridge> {
        let sock = UnixStream::connect(path)?;
        sock.set_nonblocking(true)?;
        eprintln!("passt-bridge: stream connected to {}", path.display());
        Ok(Bridge {
            sock,
            out: vec![0; OUT_CAP + TX_BUF],
            out_len: 0,
            out_sent: 0,
            inb: vec![0; IN_CAP],
            in_len: 0,
        })
    }

    /// Reads frames from the tap into the send buffer while it has room.
    fn tap_to_buf(&mut self, tap: &Tap, c: &mut Counters) -> io::Result<bool> {
        let mut scratch = [0u8; VNET_HDR - 4];
        while self.out_len + TX_BUF <= self.out.len() {
            let at = self.out_len;
            let iov = [
                libc::iovec {
                    iov_base: scratch.as_mut_ptr().cast(),
                    iov_len: scratch.len(),
                },
                libc::iovec {
                    iov_base: self.out[at..].as_mut_ptr().cast(),
                    iov_len: TX_BUF - scratch.len(),
                },
            ];
            match tap.readv(&iov)? {
                None => return Ok(true),
                Some(n) if n <= VNET_HDR => c.errors += 1,
                Some(n) => {
                    let len = n - VNET_HDR;
                    self.out[at..at + 4].copy_from_slice(&(len as u32).to_be_bytes());
                    self.out_len += 4 + len;
                    c.tx_frames += 1;
                    c.tx_bytes += len as u64;
                }
            }
        }
        Ok(false)
    }

    /// Sends what the buffer holds; true when it is empty.
    fn flush(&mut self) -> io::Result<bool> {
        while self.out_sent < self.out_len {
            // SAFETY: valid buffer range.
            let n = unsafe {
                libc::send(
                    self.sock.as_raw_fd(),
                    self.out[self.out_sent..self.out_len].as_ptr().cast(),
                    self.out_len - self.out_sent,
                    libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    return Ok(false);
                }
                return Err(e);
            }
            self.out_sent += n as usize;
        }
        self.out_len = 0;
        self.out_sent = 0;
        Ok(true)
    }

    /// Reads from the socket and writes every complete frame to the tap.
    fn sock_to_tap(&mut self, tap: &Tap, c: &mut Counters) -> io::Result<()> {
        let hdr = [0u8; VNET_HDR];
        loop {
            // SAFETY: valid buffer range.
            let n = unsafe {
                libc::recv(
                    self.sock.as_raw_fd(),
                    self.inb[self.in_len..].as_mut_ptr().cast(),
                    IN_CAP - self.in_len,
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    return Ok(());
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::other("back-end closed the stream"));
            }
            self.in_len += n as usize;
            let mut pos = 0;
            while self.in_len - pos >= 4 {
                let b = &self.inb[pos..pos + 4];
                let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
                if len > MAX_FRAME {
                    return Err(io::Error::other(format!("frame of {len} bytes: lost sync")));
                }
                if self.in_len - pos < 4 + len {
                    break;
                }
                let iov = [
                    libc::iovec {
                        iov_base: hdr.as_ptr() as *mut libc::c_void,
                        iov_len: VNET_HDR,
                    },
                    libc::iovec {
                        iov_base: self.inb[pos + 4..].as_mut_ptr().cast(),
                        iov_len: len,
                    },
                ];
                match tap.writev(&iov) {
                    Ok(_) => {
                        c.rx_frames += 1;
                        c.rx_bytes += len as u64;
                    }
                    Err(_) => c.rx_dropped += 1,
                }
                pos += 4 + len;
            }
            self.inb.copy_within(pos..self.in_len, 0);
            self.in_len -= pos;
        }
    }

    pub fn run(mut self, tap: &Tap, c: &mut Counters) -> io::Result<()> {
        const TAP: u64 = 0;
        const SOCK: u64 = 1;
        let ep = Epoll::new()?;
        let fd = self.sock.as_raw_fd();
        ep.add(tap.fd(), libc::EPOLLIN as u32, TAP)?;
        ep.add(fd, libc::EPOLLIN as u32, SOCK)?;
        let mut blocked = false;
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 8];
        loop {
            let n = ep.wait(&mut events, -1)?;
            for ev in &events[..n] {
                let (tok, bits) = (ev.u64, ev.events);
                if tok == SOCK && bits & (libc::EPOLLIN | libc::EPOLLHUP) as u32 != 0 {
                    self.sock_to_tap(tap, c)?;
                }
                if (tok == TAP && !blocked) || (tok == SOCK && bits & libc::EPOLLOUT as u32 != 0) {
                    // Fill, send, repeat while the socket takes everything.
                    loop {
                        let drained = self.tap_to_buf(tap, c)?;
                        if !self.flush()? {
                            blocked = true;
                            break;
                        }
                        blocked = false;
                        if drained {
                            break;
                        }
                    }
                    let (tap_ev, sock_ev) = if blocked {
                        (0, (libc::EPOLLIN | libc::EPOLLOUT) as u32)
                    } else {
                        (libc::EPOLLIN as u32, libc::EPOLLIN as u32)
                    };
                    ep.modify(tap.fd(), tap_ev, TAP)?;
                    ep.modify(fd, sock_ev, SOCK)?;
                }
            }
        }
    }
}
