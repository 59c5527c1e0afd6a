//! Host and port handling.

use std::net::IpAddr;
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
    if_addrs::get_if_addrs()
        .ok()?
        .into_iter()
        .filter(|iface| iface.is_oper_up() && !iface.is_loopback())
        .find_map(|iface| match iface.addr {
            if_addrs::IfAddr::V4(v4) => Some(v4.ip),
            if_addrs::IfAddr::V6(_) => None,
        })
}

/// A local interface address a TCP rail can leave from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalRail {
    /// Interface name.
    pub device: String,
    /// Its address.
    pub ip: IpAddr,
    /// Network prefix length.
    pub prefix: u8,
}

impl LocalRail {
    /// Whether `remote` is on this interface's network, so the path stays on it.
    pub fn reaches(&self, remote: IpAddr) -> bool {
        let network = |ip: IpAddr| -> u128 {
            let (bits, width) = match ip {
                IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
                IpAddr::V6(v6) => (u128::from(v6), 128),
            };
            let host_bits = width - u32::from(self.prefix).min(width);
            bits.checked_shr(host_bits).unwrap_or(0)
        };
        self.ip.is_ipv4() == remote.is_ipv4() && network(self.ip) == network(remote)
    }
}

/// The addresses of the named interfaces, in the order named (link-local IPv6 left out).
pub fn local_rails(devices: &[String]) -> Vec<LocalRail> {
    let interfaces = if_addrs::get_if_addrs().unwrap_or_else(|e| {
        tracing::warn!("cannot list network interfaces: {e}");
        Vec::new()
    });
    devices
        .iter()
        .flat_map(|device| {
            interfaces
                .iter()
                .filter(move |iface| &iface.name == device)
                .filter_map(|iface| {
                    let (ip, prefix) = match &iface.addr {
                        if_addrs::IfAddr::V4(v4) => (IpAddr::V4(v4.ip), v4.prefixlen),
                        if_addrs::IfAddr::V6(v6) if v6.ip.segments()[0] & 0xffc0 == 0xfe80 => {
                            return None
                        }
                        if_addrs::IfAddr::V6(v6) => (IpAddr::V6(v6.ip), v6.prefixlen),
                    };
                    Some(LocalRail {
                        device: iface.name.clone(),
                        ip,
                        prefix,
                    })
                })
        })
        .collect()
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

    #[test]
    fn rails_reach_their_own_network() {
        let rail = LocalRail {
            device: "eth1".into(),
            ip: "10.10.1.1".parse().unwrap(),
            prefix: 24,
        };
        assert!(rail.reaches("10.10.1.2".parse().unwrap()));
        assert!(!rail.reaches("10.10.2.2".parse().unwrap()));
        assert!(!rail.reaches("::1".parse().unwrap()));
        let any = LocalRail { prefix: 0, ..rail };
        assert!(any.reaches("192.168.0.1".parse().unwrap()));
    }

    #[test]
    fn loopback_is_listed_by_name() {
        let rails = local_rails(&["lo".to_owned(), "no-such-interface".to_owned()]);
        assert!(rails.iter().all(|r| r.device == "lo"));
        assert!(rails
            .iter()
            .any(|r| r.ip == "127.0.0.1".parse::<IpAddr>().unwrap()));
    }
}
