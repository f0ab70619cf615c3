//! Placeholder: being written.

use super::HostInfo;

/// Placeholder until discovery lands.
pub fn host_info(_ifname: Option<&str>) -> Result<HostInfo, std::io::Error> {
    Ok(HostInfo::default())
}
