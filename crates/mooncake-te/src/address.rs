//! Host and port handling.

use std::ops::RangeInclusive;

use mooncake_common::{Error, ErrorKind, Result};
use tokio::net::TcpListener;

/// Splits `host[:port]`, with IPv6 as `[v6]:port` (or a bare v6 address without a port).
pub fn split_host_port(name: &str) -> Result<(String, Option<u16>)> {
    let name = name.trim();
    if let Some(rest) = name.strip_prefix('[') {
        let (host, tail) = rest
            .split_once(']')
            .ok_or_else(|| Error::invalid(format!("unbalanced brackets in '{name}'")))?;
        let port = match tail.strip_prefix(':') {
            Some(port) => Some(parse_port(port, name)?),
            None if tail.is_empty() => None,
            None => {
                return Err(Error::invalid(format!(
                    "unexpected '{tail}' after ']' in '{name}'"
                )))
            }
        };
        return Ok((host.to_owned(), port));
    }
    match name.rsplit_once(':') {
        Some((host, _)) if host.contains(':') => Ok((name.to_owned(), None)),
        Some((host, port)) => Ok((host.to_owned(), Some(parse_port(port, name)?))),
        None => Ok((name.to_owned(), None)),
    }
}

/// `host:port`, bracketing IPv6 hosts.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn parse_port(port: &str, name: &str) -> Result<u16> {
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| Error::invalid(format!("bad port '{port}' in '{name}'")))
}

/// The host peers are told to reach: an IP literal as given; a name that resolves, as given;
/// otherwise the first non-loopback IPv4 interface that is up (Mooncake's default).
pub async fn advertised_host(host: &str) -> Result<String> {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(host.to_owned());
    }
    if !host.is_empty() && tokio::net::lookup_host((host, 0)).await.is_ok() {
        return Ok(host.to_owned());
    }
    first_interface_ip()
        .map(|ip| ip.to_string())
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Dns,
                format!(
                    "'{host}' does not resolve and no network interface is up; set ipOrHostName"
                ),
            )
        })
}

fn first_interface_ip() -> Option<std::net::Ipv4Addr> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list we free below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cursor = list;
    while !cursor.is_null() {
        // SAFETY: `cursor` walks the list getifaddrs returned, which stays valid until freed.
        let entry = unsafe { &*cursor };
        let flags = entry.ifa_flags;
        let up = flags & libc::IFF_UP as u32 != 0 && flags & libc::IFF_RUNNING as u32 != 0;
        let loopback = flags & libc::IFF_LOOPBACK as u32 != 0;
        if up && !loopback && !entry.ifa_addr.is_null() {
            // SAFETY: a non-null ifa_addr points to a sockaddr whose family says its type.
            let family = unsafe { (*entry.ifa_addr).sa_family };
            if i32::from(family) == libc::AF_INET {
                // SAFETY: AF_INET entries are sockaddr_in.
                let addr = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in) };
                found = Some(std::net::Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)));
                break;
            }
        }
        cursor = entry.ifa_next;
    }
    // SAFETY: frees the list from getifaddrs exactly once.
    unsafe { libc::freeifaddrs(list) };
    found
}

/// The address to listen on for `host`: the host itself when it is an IP literal (so a
/// loopback engine stays on loopback), every interface otherwise.
pub fn bind_ip(host: &str) -> String {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.to_string(),
        Err(_) => "0.0.0.0".to_owned(),
    }
}

/// Binds `ip:port`, or a random free port in `range` (up to 500 tries, as Mooncake).
pub async fn bind(ip: &str, port: Option<u16>, range: &RangeInclusive<u16>) -> Result<TcpListener> {
    if let Some(port) = port {
        return TcpListener::bind((ip, port))
            .await
            .map_err(|e| Error::socket(format!("bind {}", join_host_port(ip, port)), e));
    }
    let mut last = None;
    for _ in 0..500 {
        let port = fastrand::u16(range.clone());
        match TcpListener::bind((ip, port)).await {
            Ok(listener) => return Ok(listener),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => {
                return Err(Error::socket(
                    format!("bind {}", join_host_port(ip, port)),
                    e,
                ))
            }
        }
    }
    Err(Error::new(
        ErrorKind::Socket,
        format!(
            "no free port in {}-{} on {ip}: {}",
            range.start(),
            range.end(),
            last.map(|e| e.to_string()).unwrap_or_default()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(split_host_port("node01").unwrap(), ("node01".into(), None));
        assert_eq!(
            split_host_port("10.0.0.1:15001").unwrap(),
            ("10.0.0.1".into(), Some(15001))
        );
        assert_eq!(
            split_host_port("[::1]:15001").unwrap(),
            ("::1".into(), Some(15001))
        );
        assert_eq!(
            split_host_port("fe80::1").unwrap(),
            ("fe80::1".into(), None)
        );
        assert!(split_host_port("host:0").is_err());
        assert!(split_host_port("host:99999").is_err());
        assert!(split_host_port("[::1").is_err());
        assert_eq!(join_host_port("::1", 5), "[::1]:5");
    }
}
