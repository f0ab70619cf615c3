//! Host datagrams towards the guest, received in batches with `recvmmsg`.
//!
//! [`RecvBufs`] holds what a batch needs besides the room the guest back-end lends: the
//! message headers, the iovec array (the back-end's room for message i, then private
//! overflow room of message i's own), a control buffer for `SO_RXQ_OVFL`, source addresses
//! (forwarded ports), and the overflow room, one largest datagram per message. All of it
//! is allocated once; the overflow room is only touched (and only then backed by memory)
//! by datagrams longer than the room the back-end predicted for them, and by forwarded
//! ports, whose datagrams are received there entirely.

use std::net::SocketAddr;
use std::os::fd::RawFd;

use nix::errno::Errno;

use super::{rxq_ovfl, udp_header, MAX_PAYLOAD_V4};
use crate::tap::{BatchWriter, MAX_BATCH};

/// Datagrams one `recvmmsg` takes at most.
pub const RECV_BATCH: usize = MAX_BATCH;
/// Private room per message: the largest datagram we can carry, and one byte more to
/// tell a longer one.
const OVERFLOW: usize = MAX_PAYLOAD_V4 + 1;
/// Iovecs of room a back-end may lend for one batch (the vhost-user back-end lends up to
/// two per guest buffer segment), plus ours.
const MAX_IOV: usize = 2048 + RECV_BATCH;
/// Control room per message, in `u64` for `cmsghdr` alignment: one `SO_RXQ_OVFL`.
const CMSG_WORDS: usize = 4;

/// Buffers of `recvmmsg` batches, allocated once.
pub struct RecvBufs {
    msgs: Box<[libc::mmsghdr]>,
    iov: Box<[libc::iovec]>,
    /// Control room of the first message of a batch.
    cmsg: Box<[u64; CMSG_WORDS]>,
    names: Box<[libc::sockaddr_storage]>,
    ovf: Box<[u8]>,
    /// Room the back-end lent to each message of the current batch.
    room: [usize; RECV_BATCH],
    /// Length of each message received (the full length, even if truncated).
    lens: [usize; RECV_BATCH],
}

impl Default for RecvBufs {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvBufs {
    pub fn new() -> Self {
        // SAFETY: all-zero mmsghdr, iovec and sockaddr_storage are valid values.
        let (msg, iov, name) = unsafe {
            (
                std::mem::zeroed::<libc::mmsghdr>(),
                std::mem::zeroed::<libc::iovec>(),
                std::mem::zeroed::<libc::sockaddr_storage>(),
            )
        };
        RecvBufs {
            msgs: vec![msg; RECV_BATCH].into_boxed_slice(),
            iov: vec![iov; MAX_IOV].into_boxed_slice(),
            cmsg: Box::new([0u64; CMSG_WORDS]),
            names: vec![name; RECV_BATCH].into_boxed_slice(),
            ovf: vec![0u8; RECV_BATCH * OVERFLOW].into_boxed_slice(),
            room: [0; RECV_BATCH],
            lens: [0; RECV_BATCH],
        }
    }

    /// Points message `i` at `iov[at..at + n]` and, if `named`, its address buffer. Only
    /// the first message gets a control buffer: the drop count (`SO_RXQ_OVFL`) is the
    /// socket's running total, once per batch is enough, and copying it out for every
    /// message cost several percent of the receive path.
    fn set_msg(&mut self, i: usize, at: usize, n: usize, named: bool) {
        let h = &mut self.msgs[i].msg_hdr;
        h.msg_iov = self.iov[at..].as_mut_ptr();
        h.msg_iovlen = n;
        if i == 0 {
            h.msg_control = self.cmsg.as_mut_ptr().cast();
            h.msg_controllen = std::mem::size_of_val(&*self.cmsg);
        } else {
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
        }
        h.msg_flags = 0;
        if named {
            h.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        } else {
            h.msg_name = std::ptr::null_mut();
            h.msg_namelen = 0;
        }
    }

    /// The overflow room of message `i`, as an iovec.
    fn ovf_iov(&mut self, i: usize) -> libc::iovec {
        libc::iovec {
            iov_base: self.ovf[i * OVERFLOW..].as_mut_ptr().cast(),
            iov_len: OVERFLOW,
        }
    }

    /// Receives the first `n` messages as set up; their lengths go to `lens`.
    fn recv(&mut self, fd: RawFd, n: usize) -> Result<usize, Errno> {
        loop {
            // SAFETY: the first `n` headers point at iovecs in `self.iov` (the back-end's
            // room, lent for writing for the duration of the batch, and our overflow room),
            // at control and address buffers of ours, all sized as their lengths say. The
            // kernel writes through the iovecs, never into the iovec array itself.
            let r = unsafe {
                libc::recvmmsg(
                    fd,
                    self.msgs.as_mut_ptr(),
                    n as libc::c_uint,
                    libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                    std::ptr::null_mut(),
                )
            };
            if r < 0 {
                match Errno::last() {
                    Errno::EINTR => continue,
                    e => return Err(e),
                }
            }
            let got = r as usize;
            for i in 0..got {
                // With MSG_TRUNC, the datagram's full length.
                self.lens[i] = self.msgs[i].msg_len as usize;
            }
            return Ok(got);
        }
    }

    /// The `SO_RXQ_OVFL` count the kernel attached to the first message, if any.
    fn ovfl(&self) -> Option<u32> {
        rxq_ovfl(&self.msgs[0].msg_hdr)
    }

    /// Receives up to [`RECV_BATCH`] datagrams with their sources, entirely into the
    /// overflow room (a forwarded port's socket: each may belong to another flow). Read
    /// them with [`Self::datagram`].
    pub fn recv_from(&mut self, fd: RawFd) -> Result<usize, Errno> {
        for i in 0..RECV_BATCH {
            self.iov[i] = self.ovf_iov(i);
            self.room[i] = 0;
            self.set_msg(i, i, 1, true);
        }
        self.recv(fd, RECV_BATCH)
    }

    /// Datagram `i` of the last [`Self::recv_from`]: its full length, its payload (cut to
    /// what we hold) and its source.
    pub fn datagram(&self, i: usize) -> (usize, &[u8], Option<SocketAddr>) {
        let len = self.lens[i];
        let payload = &self.ovf[i * OVERFLOW..][..len.min(OVERFLOW)];
        let h = &self.msgs[i].msg_hdr;
        let from = (h.msg_namelen > 0)
            .then(|| crate::fwd::from_sockaddr(&self.names[i]))
            .flatten();
        (len, payload, from)
    }
}

/// One flow's batch: datagrams from `from` to `to`, as a [`BatchWriter`].
pub struct DgramBatch<'a> {
    pub bufs: &'a mut RecvBufs,
    pub fd: RawFd,
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub macs: ([u8; 6], [u8; 6]),
    /// What `recvmmsg` returned: how many datagrams, or the error.
    pub res: Option<Result<usize, Errno>>,
    /// Messages asked for by the last `recvmmsg`.
    pub asked: usize,
    /// The socket's drop counter, if the kernel attached it.
    pub ovfl: Option<u32>,
}

impl DgramBatch<'_> {
    /// Datagrams received longer than `max`.
    pub fn longer_than(&self, max: usize) -> usize {
        let got = match self.res {
            Some(Ok(n)) => n,
            _ => 0,
        };
        self.bufs.lens[..got].iter().filter(|&&l| l > max).count()
    }
}

impl BatchWriter for DgramBatch<'_> {
    fn payloads(&mut self, room: &[libc::iovec], ends: &[usize], lens: &mut [usize]) -> usize {
        let b = &mut *self.bufs;
        let mut n = ends.len().min(RECV_BATCH).min(lens.len());
        let (mut at, mut prev) = (0, 0);
        for (i, &end) in ends[..n].iter().enumerate() {
            let end = end.clamp(prev, room.len());
            let lent = &room[prev..end];
            // The back-end counts on all of a message's room: a message whose room our
            // array can't take ends the batch.
            if at + lent.len() + 1 > MAX_IOV {
                n = i;
                break;
            }
            b.iov[at..at + lent.len()].copy_from_slice(lent);
            b.room[i] = lent.iter().map(|v| v.iov_len).sum();
            b.iov[at + lent.len()] = b.ovf_iov(i);
            b.set_msg(i, at, lent.len() + 1, false);
            at += lent.len() + 1;
            prev = end;
        }
        self.asked = n;
        if n == 0 {
            return 0;
        }
        match b.recv(self.fd, n) {
            Ok(got) => {
                self.res = Some(Ok(got));
                lens[..got].copy_from_slice(&b.lens[..got]);
                if got > 0 {
                    self.ovfl = b.ovfl();
                }
                got
            }
            Err(e) => {
                self.res = Some(Err(e));
                0
            }
        }
    }

    fn overflow(&self, i: usize) -> &[u8] {
        let (Some(&len), Some(&room)) = (self.bufs.lens.get(i), self.bufs.room.get(i)) else {
            return &[];
        };
        let extra = len.saturating_sub(room).min(OVERFLOW);
        &self.bufs.ovf[i * OVERFLOW..][..extra]
    }

    fn header(&mut self, _i: usize, hdr: &mut [u8], len: usize, payload_sum: u16) -> bool {
        udp_header(
            hdr,
            self.macs.0,
            self.macs.1,
            self.from,
            self.to,
            len,
            payload_sum,
        )
        .is_some()
    }
}
