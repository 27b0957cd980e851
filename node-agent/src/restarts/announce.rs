//! A container announcing its own address on its network (a gratuitous ARP), once its gateway
//! answers again after a start.
//!
//! Why: clients reach a gateway through its published port, and the host forwards to the
//! container's address on its bridge. A client that connects while the container restarts
//! makes the host look the address up while nothing answers it; the host's entry then waits
//! for its next ARP retry, about a second later, and every connection meanwhile waits with it
//! (measured: clients back 1.2 s after a `docker restart` that took 0.45 s). An announcement
//! from the container updates that entry at once and sends what waited on it.
//!
//! Ensures: one ARP announcement (RFC 5227 §2.3: a request from the address, for the
//! address) leaves the interface that holds the address, in the network namespace of the
//! calling thread. No IP packet is sent, so no egress rule or counter sees it.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const ETH_P_ARP: u16 = 0x0806;

/// The ARP payload announcing that `ip` is at `mac`.
pub fn announcement(mac: [u8; 6], ip: Ipv4Addr) -> [u8; 28] {
    let mut packet = [0u8; 28];
    packet[0..2].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    packet[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    packet[4] = 6; // hardware address length
    packet[5] = 4; // protocol address length
    packet[6..8].copy_from_slice(&1u16.to_be_bytes()); // a request
    packet[8..14].copy_from_slice(&mac);
    packet[14..18].copy_from_slice(&ip.octets());
    // The target hardware address stays zero: nobody is asked.
    packet[24..28].copy_from_slice(&ip.octets());
    packet
}

/// Why an address was not announced.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("listing the interfaces: {0}")]
    Interfaces(nix::errno::Errno),
    #[error("no interface holds {0}")]
    NoInterface(Ipv4Addr),
    #[error("{0} has no link address")]
    NoLink(String),
    #[error("{0} has no hardware address")]
    NoHardwareAddress(String),
    #[error("{interface}: interface index {index} out of range")]
    Index { interface: String, index: usize },
    #[error("{interface}: {source}")]
    Send {
        interface: String,
        source: std::io::Error,
    },
}

/// Broadcasts [`announcement`] of `ip` on the interface of this thread's network namespace
/// that holds it.
pub fn announce(ip: Ipv4Addr) -> Result<(), AnnounceError> {
    let interfaces: Vec<_> = nix::ifaddrs::getifaddrs()
        .map_err(AnnounceError::Interfaces)?
        .collect();
    let name = interfaces
        .iter()
        .find(|i| {
            i.address
                .as_ref()
                .and_then(|a| a.as_sockaddr_in())
                .is_some_and(|a| a.ip() == ip)
        })
        .map(|i| i.interface_name.as_str())
        .ok_or(AnnounceError::NoInterface(ip))?;
    let link = interfaces
        .iter()
        .filter(|i| i.interface_name == name)
        .find_map(|i| i.address.as_ref()?.as_link_addr().copied())
        .ok_or_else(|| AnnounceError::NoLink(name.to_string()))?;
    let mac = link
        .addr()
        .ok_or_else(|| AnnounceError::NoHardwareAddress(name.to_string()))?;
    let ifindex = i32::try_from(link.ifindex()).map_err(|_| AnnounceError::Index {
        interface: name.to_string(),
        index: link.ifindex(),
    })?;
    send_broadcast(ifindex, &announcement(mac, ip)).map_err(|source| AnnounceError::Send {
        interface: name.to_string(),
        source,
    })
}

/// Sends `payload` as an ARP frame to the link-layer broadcast address of interface `ifindex`.
#[allow(unsafe_code)]
fn send_broadcast(ifindex: i32, payload: &[u8]) -> std::io::Result<()> {
    // SAFETY: socket() takes three integers and returns a new descriptor or -1.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ARP.to_be()),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is a plain C struct for which all zeros is a valid value.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = ETH_P_ARP.to_be();
    to.sll_ifindex = ifindex;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: `payload` and `to` outlive the call, and their lengths are the ones given.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            payload.as_ptr().cast(),
            payload.len(),
            0,
            (&raw const to).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_announcement_asks_for_its_own_address_from_it() {
        let mac = [0x02, 0x42, 0x0a, 0xfa, 0x07, 0x02];
        let packet = announcement(mac, Ipv4Addr::new(10, 250, 7, 2));
        assert_eq!(
            packet,
            [
                0, 1, 8, 0, 6, 4, 0, 1, // Ethernet, IPv4, 6 and 4 bytes, request
                0x02, 0x42, 0x0a, 0xfa, 0x07, 0x02, 10, 250, 7, 2, // sender
                0, 0, 0, 0, 0, 0, 10, 250, 7, 2, // target: the same address, nobody's MAC
            ]
        );
    }

    #[test]
    fn an_address_no_interface_holds_is_not_announced() {
        // 192.0.2.0/24 is TEST-NET-1: no interface of a test machine holds it.
        let e = announce(Ipv4Addr::new(192, 0, 2, 77)).unwrap_err();
        assert_eq!(e.to_string(), "no interface holds 192.0.2.77");
    }
}
