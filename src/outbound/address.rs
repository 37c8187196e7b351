//! Which addresses a provider call may reach, and a resolver that enforces it on the address it returns.

use std::net::{IpAddr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// A provider host that resolved to an address the vault will not call.
#[derive(Debug, thiserror::Error)]
#[error("provider host {host} resolves to {}, which is not a public address", .addr.ip())]
pub struct NonPublicAddress {
    pub host: String,
    pub addr: SocketAddr,
}

/// Resolves a host once and hands reqwest exactly the checked addresses, so
/// the connection goes where the check looked (no second lookup to rebind).
pub struct PinnedResolver {
    pub allow_private: bool,
}

impl Resolve for PinnedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if !allow_private {
                if let Some(addr) = addrs.iter().find(|a| !is_public(a.ip())) {
                    return Err(Box::new(NonPublicAddress { host, addr: *addr }) as _);
                }
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// The blocks a provider call never goes to: every entry of IANA's IPv4 and
/// IPv6 Special-Purpose Address Registries (those marked globally reachable
/// too: no provider lives there, and anycast relays reach anything), plus
/// multicast, the limited broadcast, site-local and the translated ranges.
/// An IPv6 address must also be global unicast (`2000::/3`).
pub const NOT_CALLED: &[(&str, &str)] = &[
    ("0.0.0.0/8", "this network"),
    ("10.0.0.0/8", "private use"),
    ("100.64.0.0/10", "shared address space"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link local"),
    ("172.16.0.0/12", "private use"),
    (
        "192.0.0.0/24",
        "IETF protocol assignments (DS-Lite, PCP, TURN, NAT64 discovery)",
    ),
    ("192.0.2.0/24", "documentation (TEST-NET-1)"),
    ("192.31.196.0/24", "AS112-v4"),
    ("192.52.193.0/24", "AMT"),
    ("192.88.99.0/24", "deprecated 6to4 relay anycast"),
    ("192.168.0.0/16", "private use"),
    ("192.175.48.0/24", "direct delegation AS112 service"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation (TEST-NET-2)"),
    ("203.0.113.0/24", "documentation (TEST-NET-3)"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("255.255.255.255/32", "limited broadcast"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::/96", "IPv4-compatible (deprecated)"),
    ("::ffff:0:0:0/96", "IPv4-translated (SIIT)"),
    (
        "64:ff9b::/96",
        "IPv4-IPv6 translation (NAT64): may reach anything",
    ),
    ("64:ff9b:1::/48", "local-use IPv4-IPv6 translation"),
    ("100::/64", "discard-only"),
    ("100:0:0:1::/64", "dummy IPv6 prefix"),
    ("2001::/23", "IETF protocol assignments"),
    ("2001::/32", "Teredo: embeds an IPv4 address"),
    ("2001:1::1/128", "PCP anycast"),
    ("2001:1::2/128", "TURN anycast"),
    ("2001:1::3/128", "DNS-SD SRP anycast"),
    ("2001:2::/48", "benchmarking"),
    ("2001:3::/32", "AMT"),
    ("2001:4:112::/48", "AS112-v6"),
    ("2001:10::/28", "deprecated ORCHID"),
    ("2001:20::/28", "ORCHIDv2"),
    ("2001:30::/28", "drone remote ID"),
    ("2001:db8::/32", "documentation"),
    ("2002::/16", "6to4: embeds an IPv4 address"),
    ("2620:4f:8000::/48", "direct delegation AS112 service"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "segment routing SIDs"),
    ("fc00::/7", "unique local"),
    ("fe80::/10", "link-local unicast"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
];

/// Whether a provider call may go to `ip`: a global unicast address outside
/// every block of [`NOT_CALLED`]. An IPv4-mapped IPv6 address is judged as
/// the IPv4 address it carries.
pub fn is_public(ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let global_unicast = match ip {
        IpAddr::V4(_) => true,
        IpAddr::V6(v6) => (v6.segments()[0] & 0xe000) == 0x2000,
    };
    global_unicast && !NOT_CALLED.iter().any(|(block, _)| in_block(ip, block))
}

/// Whether `ip` is in `block`, written `address/prefix`. A block of the other
/// family, or one that does not parse (the table is fixed), never matches.
fn in_block(ip: IpAddr, block: &str) -> bool {
    let Some((net, prefix)) = block.split_once('/') else {
        return false;
    };
    let (Ok(net), Ok(prefix)) = (net.parse::<IpAddr>(), prefix.parse::<u32>()) else {
        return false;
    };
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => masked_eq(u32::from(ip), u32::from(net), prefix),
        (IpAddr::V6(ip), IpAddr::V6(net)) => masked_eq(u128::from(ip), u128::from(net), prefix),
        _ => false,
    }
}

fn masked_eq<T>(ip: T, net: T, prefix: u32) -> bool
where
    T: Copy + std::ops::Shl<u32, Output = T> + std::ops::BitAnd<Output = T> + PartialEq + Max,
{
    if prefix == 0 {
        return true;
    }
    let bits = T::BITS;
    if prefix > bits {
        return false;
    }
    let mask = T::MAX << (bits - prefix);
    (ip & mask) == (net & mask)
}

/// The integer widths an address is compared in.
trait Max {
    const MAX: Self;
    const BITS: u32;
}

impl Max for u32 {
    const MAX: Self = u32::MAX;
    const BITS: u32 = u32::BITS;
}

impl Max for u128 {
    const MAX: Self = u128::MAX;
    const BITS: u32 = u128::BITS;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn refuses_everything_but_global_addresses() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "198.18.0.1",
            "240.0.0.1",
            "192.0.2.1",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "::127.0.0.1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip} counted as public");
        }
        for ip in [
            "1.1.1.1",
            "104.16.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "2a00:1450:4001::1",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip} counted as private");
        }
    }

    /// Each row of the table, by its first and last address, and the
    /// addresses just outside it that are public.
    #[test]
    fn every_special_purpose_block_is_refused_from_end_to_end() {
        for (block, name) in NOT_CALLED {
            let (net, prefix) = block.split_once('/').unwrap();
            let prefix: u32 = prefix.parse().unwrap();
            let (first, last): (IpAddr, IpAddr) = match net.parse::<IpAddr>().unwrap() {
                IpAddr::V4(v4) => {
                    let host = u32::MAX.checked_shr(prefix).unwrap_or(0);
                    let n = u32::from(v4);
                    (Ipv4Addr::from(n).into(), Ipv4Addr::from(n | host).into())
                }
                IpAddr::V6(v6) => {
                    let host = u128::MAX.checked_shr(prefix).unwrap_or(0);
                    let n = u128::from(v6);
                    (Ipv6Addr::from(n).into(), Ipv6Addr::from(n | host).into())
                }
            };
            assert!(
                !is_public(first),
                "{block} ({name}): {first} counted as public"
            );
            assert!(
                !is_public(last),
                "{block} ({name}): {last} counted as public"
            );
        }
        // The registry's neighbours stay callable.
        for ip in [
            "192.0.1.255",
            "192.88.100.1",
            "2003::1",
            "2001:200::1",
            "2620:4f:8001::1",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip} counted as private");
        }
    }

    #[test]
    fn the_review_s_misses_are_refused() {
        for ip in [
            "2002:a00:1::1",
            "2001:0:4136:e378::1",
            "fec0::1",
            "100::1",
            "::ffff:0:a00:1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip} counted as public");
        }
    }
}
