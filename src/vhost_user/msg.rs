//! vhost-user message framing on the control socket.
//!
//! Every message is a 12-byte header (request, flags, payload size; native byte order)
//! followed by the payload. File descriptors travel as SCM_RIGHTS ancillary data attached to
//! the header bytes, so they are collected by the `recvmsg` that reads the header. The
//! `vhost` crate's header type is private, so the header is defined here; request codes and
//! payload types come from [`vhost::vhost_user::message`].
//!
//! Reads are blocking with a timeout: the front-end writes each message in one `sendmsg`, so
//! once the socket is readable the whole message follows at once; the timeout only bounds
//! how long a broken front-end can stall the event loop.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;

use vhost::vhost_user::message::{MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Header size on the wire.
pub const HDR_SIZE: usize = 12;
/// Protocol version, in the low two bits of `flags`.
const VERSION: u32 = 0x1;
const VERSION_MASK: u32 = 0x3;
/// Set in replies.
const FLAG_REPLY: u32 = 0x4;
/// The sender wants a REPLY_ACK answer.
const FLAG_NEED_REPLY: u32 = 0x8;

/// A message header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub request: u32,
    pub flags: u32,
    pub size: u32,
}

impl Header {
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        let word = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header {
            request: word(0),
            flags: word(4),
            size: word(8),
        }
    }

    pub fn to_bytes(self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..4].copy_from_slice(&self.request.to_ne_bytes());
        b[4..8].copy_from_slice(&self.flags.to_ne_bytes());
        b[8..12].copy_from_slice(&self.size.to_ne_bytes());
        b
    }

    /// A request header (for tests and tools).
    pub fn request(request: u32, size: u32, need_reply: bool) -> Self {
        Header {
            request,
            flags: VERSION | if need_reply { FLAG_NEED_REPLY } else { 0 },
            size,
        }
    }

    pub fn need_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }

    pub fn is_reply(&self) -> bool {
        self.flags & FLAG_REPLY != 0
    }
}

/// Why no message could be read. All of them end the connection: after a short or
/// oversized message we can't find the next header again.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error("front-end closed the connection")]
    Closed,
    #[error("reading the control socket")]
    Io(#[source] io::Error),
    #[error("bad header: version {version}, size {size}")]
    BadHeader { version: u32, size: u32 },
}

/// Reads one message: header (with any fds, appended to `fds`) and payload into `body`.
pub fn recv(
    sock: &UnixStream,
    body: &mut [u8; MAX_MSG_SIZE],
    fds: &mut Vec<File>,
) -> Result<(Header, usize), RecvError> {
    let mut hdr = [0u8; HDR_SIZE];
    let mut raw: [RawFd; MAX_ATTACHED_FD_ENTRIES] = [-1; MAX_ATTACHED_FD_ENTRIES];
    let mut iov = [libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: HDR_SIZE,
    }];
    // SAFETY: the iovec points to `hdr`, which is writable and outlives the call.
    let (n, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut raw) }
        .map_err(|e| RecvError::Io(io::Error::from_raw_os_error(e.errno())))?;
    for &fd in &raw[..nfds] {
        // SAFETY: the kernel just installed these descriptors for us; nothing else owns them.
        fds.push(unsafe { File::from_raw_fd(fd) });
    }
    if n == 0 {
        return Err(RecvError::Closed);
    }
    if n < HDR_SIZE {
        read_exact(sock, &mut hdr[n..])?;
    }
    let h = Header::from_bytes(&hdr);
    let size = h.size as usize;
    if h.flags & VERSION_MASK != VERSION || size > MAX_MSG_SIZE {
        return Err(RecvError::BadHeader {
            version: h.flags & VERSION_MASK,
            size: h.size,
        });
    }
    read_exact(sock, &mut body[..size])?;
    Ok((h, size))
}

fn read_exact(mut sock: &UnixStream, buf: &mut [u8]) -> Result<(), RecvError> {
    sock.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => RecvError::Closed,
        _ => RecvError::Io(e),
    })
}

/// Sends a reply to `request` with `payload`.
pub fn send_reply(mut sock: &UnixStream, request: u32, payload: &[u8]) -> io::Result<()> {
    let h = Header {
        request,
        flags: VERSION | FLAG_REPLY,
        size: payload.len() as u32,
    };
    let mut buf = [0u8; HDR_SIZE + 16];
    if payload.len() <= 16 {
        buf[..HDR_SIZE].copy_from_slice(&h.to_bytes());
        buf[HDR_SIZE..HDR_SIZE + payload.len()].copy_from_slice(payload);
        sock.write_all(&buf[..HDR_SIZE + payload.len()])
    } else {
        sock.write_all(&h.to_bytes())?;
        sock.write_all(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = Header::request(18, 8, true);
        assert_eq!(Header::from_bytes(&h.to_bytes()), h);
        assert!(h.need_reply());
        assert!(!h.is_reply());
        assert_eq!(h.flags, 0x9);
    }

    #[test]
    fn recv_collects_fds_and_payload() {
        let (a, b) = UnixStream::pair().expect("pair");
        let f = File::open("/dev/null").expect("null");
        let h = Header::request(12, 8, false);
        let mut msg = h.to_bytes().to_vec();
        msg.extend_from_slice(&7u64.to_ne_bytes());
        use std::os::fd::AsRawFd;
        a.send_with_fds(&[&msg[..]], &[f.as_raw_fd()])
            .expect("send");
        let mut body = [0u8; MAX_MSG_SIZE];
        let mut fds = Vec::new();
        let (got, n) = recv(&b, &mut body, &mut fds).expect("recv");
        assert_eq!(got, h);
        assert_eq!(n, 8);
        assert_eq!(&body[..8], &7u64.to_ne_bytes());
        assert_eq!(fds.len(), 1);
    }

    #[test]
    fn recv_rejects_bad_headers_and_reports_close() {
        let (mut a, b) = UnixStream::pair().expect("pair");
        let mut body = [0u8; MAX_MSG_SIZE];
        let mut fds = Vec::new();
        let h = Header {
            request: 1,
            flags: 0x2,
            size: 0,
        };
        a.write_all(&h.to_bytes()).expect("write");
        assert!(matches!(
            recv(&b, &mut body, &mut fds),
            Err(RecvError::BadHeader { version: 2, .. })
        ));
        let h = Header::request(1, MAX_MSG_SIZE as u32 + 1, false);
        a.write_all(&h.to_bytes()).expect("write");
        assert!(matches!(
            recv(&b, &mut body, &mut fds),
            Err(RecvError::BadHeader { .. })
        ));
        // Truncated payload, then EOF.
        let h = Header::request(2, 8, false);
        a.write_all(&h.to_bytes()).expect("write");
        a.write_all(&[1, 2]).expect("write");
        drop(a);
        assert!(matches!(
            recv(&b, &mut body, &mut fds),
            Err(RecvError::Closed)
        ));
        assert!(matches!(
            recv(&b, &mut body, &mut fds),
            Err(RecvError::Closed)
        ));
    }

    #[test]
    fn reply_layout() {
        let (a, mut b) = UnixStream::pair().expect("pair");
        send_reply(&a, 11, &[1, 0, 0, 0, 5, 0, 0, 0]).expect("reply");
        let mut buf = [0u8; 20];
        b.read_exact(&mut buf).expect("read");
        let h = Header::from_bytes(buf[..12].try_into().expect("12"));
        assert_eq!(h.request, 11);
        assert_eq!(h.flags, 0x5);
        assert_eq!(h.size, 8);
        assert_eq!(&buf[12..], &[1, 0, 0, 0, 5, 0, 0, 0]);
    }
}
