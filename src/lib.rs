//! passt-rs: an unprivileged, user-mode network back-end for virtual machines.
//!
//! Module map:
//! - [`conf`]: command line, host discovery, the validated [`conf::Config`].
//! - [`l2`]: ARP, DHCP, NDP, DHCPv6: frames in, reply frames out.
//! - [`tap`]: frames to and from the guest, over vhost-user or the stream socket.
//! - [`vhost_user`]: the vhost-user-net device: control socket, memory table, rings.
//! - [`virtio`]: the virtio-net data plane: split virtqueues, TX drain, mergeable RX.
pub mod conf;
pub mod l2;
pub mod tap;
pub mod vhost_user;
pub mod virtio;
