//! The tap device the guest namespace's kernel talks through.
//!
//! Opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and a 12-byte virtio-net header
//! (`virtio_net_hdr_v1`, the layout VERSION_1 devices use), so a frame read from the tap is
//! exactly what a virtio-net driver puts on its TX ring, and an RX buffer the device filled
//! can be written to the tap unchanged. No offloads are enabled (`TUNSETOFFLOAD` is never
//! called), so the kernel hands us complete, checksummed, unsegmented frames and the header
//! stays all zeros: the device under test offers no offloads either.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Size of the virtio-net header in front of every frame (VERSION_1: with `num_buffers`).
pub const VNET_HDR: usize = 12;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open, non-blocking tap queue.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates (or attaches to) tap `name` in the current network namespace.
    pub fn open(name: &str) -> io::Result<Tap> {
        if name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "name too long"));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        for (d, s) in req.name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        // SAFETY: valid fd and a properly sized ifreq.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let sz: libc::c_int = VNET_HDR as libc::c_int;
        // SAFETY: valid fd, pointer to an int.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &sz) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel NUL-terminates the name it returns.
        let name = unsafe { CStr::from_ptr(req.name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        Ok(Tap { file, name })
    }

    /// The interface name the kernel gave.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (header included) into `buf`; `Ok(None)` when nothing is queued.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: buf is valid for writes of its length.
        let n = unsafe { libc::read(self.fd(), buf.as_mut_ptr().cast(), buf.len()) };
        ret_len(n)
    }

    /// Reads one frame scattered over `iov`; `Ok(None)` when nothing is queued.
    pub fn readv(&self, iov: &[libc::iovec]) -> io::Result<Option<usize>> {
        // SAFETY: the caller's iovecs point to writable memory of their lengths.
        let n = unsafe { libc::readv(self.fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        ret_len(n)
    }

    /// Writes one frame (header included) gathered from `iov`.
    pub fn writev(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller's iovecs point to readable memory of their lengths.
        let n = unsafe { libc::writev(self.fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

fn ret_len(n: isize) -> io::Result<Option<usize>> {
    if n >= 0 {
        return Ok(Some(n as usize));
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::WouldBlock {
        Ok(None)
    } else {
        Err(e)
    }
}
