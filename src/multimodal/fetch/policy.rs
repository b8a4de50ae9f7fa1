//! Which network addresses a media fetch may reach (SSRF hardening).
//!
//! A media URL comes from whoever sends the request, and the server fetches
//! it from inside its own network, so by default a fetch may only reach
//! public addresses: loopback, private, link-local, shared (CGNAT),
//! multicast, broadcast and reserved ranges are refused, as are IPv6 forms
//! that carry such an IPv4 address (IPv4-mapped `::ffff:a.b.c.d`,
//! IPv4-compatible `::a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`).
//! `--allow-private-media-urls` lifts that for deployments whose images live
//! on an internal host.
//!
//! Cloud instance-metadata endpoints (AWS/GCP/Azure/OpenStack
//! `169.254.169.254`, AWS `fd00:ec2::254`, the ECS credentials endpoint
//! `169.254.170.2`, Alibaba `100.100.100.200`, and the names that resolve to
//! them) are refused even with that flag: they hand out the host's cloud
//! credentials, and no image store lives there.
//!
//! `MediaResolver` applies `check_ip` to every address a name resolves to,
//! which are the addresses the connection is then made to, so a name that
//! resolves differently at check and at connect time (DNS rebinding) cannot
//! slip past. `check_host` looks at the URL's host as written, before any
//! lookup: it gives literal addresses and well-known names a clear answer,
//! and it is the only check when an HTTP proxy does the name resolution.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The flag that lets media fetches reach non-public addresses.
pub const ALLOW_FLAG: &str = "--allow-private-media-urls";

/// What kind of address a fetch would reach, for the policy and messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressKind {
    Public,
    /// A cloud instance-metadata endpoint: refused even when private
    /// addresses are allowed.
    Metadata,
    Loopback,
    Unspecified,
    Private,
    LinkLocal,
    /// 100.64.0.0/10, carrier-grade NAT (RFC 6598).
    Shared,
    Multicast,
    Broadcast,
    /// Documentation, benchmarking, protocol-assignment, Teredo and other
    /// special-purpose ranges: nothing an image is served from.
    Reserved,
}

impl AddressKind {
    fn phrase(self) -> &'static str {
        match self {
            AddressKind::Public => "a public address",
            AddressKind::Metadata => "a cloud instance-metadata endpoint",
            AddressKind::Loopback => "a loopback address",
            AddressKind::Unspecified => "an unspecified address",
            AddressKind::Private => "a private-network address",
            AddressKind::LinkLocal => "a link-local address",
            AddressKind::Shared => "a carrier-grade NAT (shared) address",
            AddressKind::Multicast => "a multicast address",
            AddressKind::Broadcast => "a broadcast address",
            AddressKind::Reserved => "a reserved special-purpose address",
        }
    }
}

/// Metadata endpoints by address (see the module comment).
const METADATA_V4: [Ipv4Addr; 3] =
    [Ipv4Addr::new(169, 254, 169, 254), Ipv4Addr::new(169, 254, 170, 2), Ipv4Addr::new(100, 100, 100, 200)];
const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
/// Names that resolve to a metadata endpoint inside a cloud (GCP's full and
/// short names, AWS's legacy ones), refused by name because behind a proxy
/// their address is never seen here.
const METADATA_NAMES: [&str; 4] =
    ["metadata.google.internal", "metadata", "instance-data", "instance-data.ec2.internal"];

pub fn classify(ip: IpAddr) -> AddressKind {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddressKind {
    let [a, b, c, _] = ip.octets();
    if METADATA_V4.contains(&ip) {
        AddressKind::Metadata
    } else if a == 0 {
        // 0.0.0.0/8, "this network"; connecting to 0.0.0.0 reaches the host itself.
        AddressKind::Unspecified
    } else if a == 127 {
        AddressKind::Loopback
    } else if a == 10 || (a == 172 && (16..32).contains(&b)) || (a == 192 && b == 168) {
        AddressKind::Private
    } else if a == 169 && b == 254 {
        AddressKind::LinkLocal
    } else if a == 100 && (64..128).contains(&b) {
        AddressKind::Shared
    } else if ip.is_broadcast() {
        AddressKind::Broadcast
    } else if (224..240).contains(&a) {
        AddressKind::Multicast
    } else if a >= 240
        || (a == 192 && b == 0 && (c == 0 || c == 2))
        || (a == 198 && (b == 18 || b == 19))
        || (a == 198 && b == 51 && c == 100)
        || (a == 203 && b == 0 && c == 113)
    {
        AddressKind::Reserved
    } else {
        AddressKind::Public
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddressKind {
    let s = ip.segments();
    let embedded_v4 = |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    if ip == METADATA_V6 {
        AddressKind::Metadata
    } else if ip.is_unspecified() {
        AddressKind::Unspecified
    } else if ip.is_loopback() {
        AddressKind::Loopback
    } else if let Some(v4) = ip.to_ipv4() {
        // IPv4-mapped (::ffff:a.b.c.d) and IPv4-compatible (::a.b.c.d);
        // :: and ::1 are handled above.
        classify_v4(v4)
    } else if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        // NAT64 well-known prefix: the gateway connects to the IPv4 address inside.
        classify_v4(embedded_v4(s[6], s[7]))
    } else if s[0] == 0x2002 {
        // 6to4: the relay forwards to the IPv4 address in bits 16..48.
        classify_v4(embedded_v4(s[1], s[2]))
    } else if s[0] & 0xfe00 == 0xfc00 || s[0] & 0xffc0 == 0xfec0 || s[..3] == [0x64, 0xff9b, 1] {
        // Unique local fc00::/7, deprecated site-local fec0::/10, local-use NAT64 64:ff9b:1::/48.
        AddressKind::Private
    } else if s[0] & 0xffc0 == 0xfe80 {
        AddressKind::LinkLocal
    } else if s[0] & 0xff00 == 0xff00 {
        AddressKind::Multicast
    } else if (s[0] == 0x2001 && (s[1] == 0 || s[1] == 0xdb8)) || s[..4] == [0x100, 0, 0, 0] {
        // Teredo 2001::/32 (its IPv4 target is obfuscated), documentation
        // 2001:db8::/32, discard-only 100::/64.
        AddressKind::Reserved
    } else {
        AddressKind::Public
    }
}

/// Why a fetch may not connect to `ip`, or None when it may.
pub fn check_ip(ip: IpAddr, allow_private: bool) -> Option<String> {
    refusal(&ip.to_string(), classify(ip), allow_private)
}

/// Why a fetch may not go to the URL host `host` as written (a name, an
/// IPv4 literal or a bracketed IPv6 literal), or None when nothing about the
/// text forbids it. Names are judged again by address when they resolve.
pub fn check_host(host: &str, allow_private: bool) -> Option<String> {
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return check_ip(ip, allow_private);
    }
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    let kind = if METADATA_NAMES.contains(&name.as_str()) {
        AddressKind::Metadata
    } else if name == "localhost" || name.ends_with(".localhost") {
        // RFC 6761: always the loopback interface.
        AddressKind::Loopback
    } else {
        AddressKind::Public
    };
    refusal(&format!("{host:?}"), kind, allow_private)
}

fn refusal(what: &str, kind: AddressKind, allow_private: bool) -> Option<String> {
    match kind {
        AddressKind::Public => None,
        AddressKind::Metadata => Some(format!("{what} is {}, which media URLs may never reach", kind.phrase())),
        _ if allow_private => None,
        _ => Some(format!(
            "{what} is {}; media URLs may only reach public addresses unless kestrel is started with {ALLOW_FLAG}",
            kind.phrase()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(s: &str) -> AddressKind {
        classify(s.parse().unwrap())
    }

    #[test]
    fn ipv4_ranges() {
        use AddressKind::*;
        let cases = [
            ("8.8.8.8", Public),
            ("93.184.216.34", Public),
            ("127.0.0.1", Loopback),
            ("127.255.0.9", Loopback),
            ("0.0.0.0", Unspecified),
            ("0.1.2.3", Unspecified),
            ("10.0.0.1", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("172.15.0.1", Public),
            ("172.32.0.1", Public),
            ("192.168.1.1", Private),
            ("169.254.1.1", LinkLocal),
            ("169.254.169.254", Metadata),
            ("169.254.170.2", Metadata),
            ("100.100.100.200", Metadata),
            ("100.64.0.1", Shared),
            ("100.127.255.255", Shared),
            ("100.128.0.1", Public),
            ("224.0.0.1", Multicast),
            ("239.255.255.250", Multicast),
            ("255.255.255.255", Broadcast),
            ("240.0.0.1", Reserved),
            ("192.0.2.7", Reserved),
            ("198.18.0.1", Reserved),
            ("203.0.113.9", Reserved),
        ];
        for (ip, want) in cases {
            assert_eq!(kind(ip), want, "{ip}");
        }
    }

    #[test]
    fn ipv6_ranges_and_embedded_ipv4() {
        use AddressKind::*;
        let cases = [
            ("2606:4700::1111", Public),
            ("::1", Loopback),
            ("::", Unspecified),
            ("fd00:ec2::254", Metadata),
            ("fd12:3456::1", Private),
            ("fc00::1", Private),
            ("fec0::1", Private),
            ("fe80::1", LinkLocal),
            ("ff02::1", Multicast),
            ("2001:db8::1", Reserved),
            ("2001:0:4136:e378::1", Reserved),
            ("::ffff:127.0.0.1", Loopback),
            ("::ffff:10.1.2.3", Private),
            ("::ffff:169.254.169.254", Metadata),
            ("::ffff:8.8.8.8", Public),
            ("::127.0.0.1", Loopback),
            ("::192.168.0.1", Private),
            ("64:ff9b::a9fe:a9fe", Metadata),
            ("64:ff9b::7f00:1", Loopback),
            ("64:ff9b::808:808", Public),
            ("2002:7f00:1::", Loopback),
            ("2002:a00:1::5", Private),
            ("2002:808:808::1", Public),
        ];
        for (ip, want) in cases {
            assert_eq!(kind(ip), want, "{ip}");
        }
    }

    #[test]
    fn the_flag_allows_all_but_metadata() {
        for ip in ["127.0.0.1", "10.0.0.1", "fe80::1", "::ffff:192.168.0.1"] {
            let e = check_ip(ip.parse().unwrap(), false).unwrap();
            assert!(e.starts_with(ip) && e.contains(ALLOW_FLAG), "{e}");
            assert_eq!(check_ip(ip.parse().unwrap(), true), None, "{ip}");
        }
        for ip in ["169.254.169.254", "fd00:ec2::254"] {
            let e = check_ip(ip.parse().unwrap(), true).unwrap();
            assert!(e.contains("instance-metadata") && !e.contains(ALLOW_FLAG), "{e}");
        }
        assert_eq!(check_ip("1.1.1.1".parse().unwrap(), false), None);
    }

    #[test]
    fn hosts_as_written() {
        assert!(check_host("[::1]", false).unwrap().starts_with("::1 is a loopback"));
        assert!(check_host("127.0.0.1", false).unwrap().contains("loopback"));
        assert!(check_host("LocalHost.", false).unwrap().contains("loopback"));
        assert!(check_host("api.localhost", false).unwrap().contains("loopback"));
        assert_eq!(check_host("localhost", true), None);
        for name in ["metadata.google.internal", "Metadata.Google.Internal.", "metadata", "instance-data"] {
            assert!(check_host(name, true).unwrap().contains("instance-metadata"), "{name}");
        }
        // Other names are judged by address once resolved.
        assert_eq!(check_host("example.com", false), None);
        assert_eq!(check_host("localhost.example.com", false), None);
    }
}
