//! Webhook URL validation and the destination address policy.
//!
//! A webhook URL is an absolute `https` URL of at most 2048 characters with
//! no user info, no fragment and no whitespace. Hosts are parsed as browsers
//! parse them (the WHATWG URL standard), so `https://2130706433/` and
//! `https://0x7f.1/` are both `127.0.0.1`. Unless private targets are allowed,
//! hosts that name this machine or a non-public network are rejected; the
//! same address check runs again on every resolved address at delivery.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use url::{Host, Url};

/// The longest accepted webhook URL, in characters.
pub const MAX_URL_LENGTH: usize = 2048;

/// Which destinations a deployment accepts.
#[derive(Debug, Clone, Copy, Default)]
pub struct DestinationPolicy {
    /// Accept plain `http` URLs (local development and tests only).
    pub allow_http: bool,
    /// Accept loopback and private addresses (local development and tests only).
    pub allow_private_targets: bool,
}

/// Validates a webhook URL and returns it parsed, or a message naming the problem.
pub fn parse_webhook_url(text: &str, policy: DestinationPolicy) -> Result<Url, String> {
    if text.chars().count() > MAX_URL_LENGTH {
        return Err(format!("must be at most {MAX_URL_LENGTH} characters"));
    }
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain whitespace or control characters".to_owned());
    }
    let url = Url::parse(text).map_err(|error| format!("is not an absolute URL ({error})"))?;
    match url.scheme() {
        "https" => {}
        "http" if policy.allow_http => {}
        scheme => return Err(format!("must use https, not {scheme}")),
    }
    if !url.username().is_empty() || url.password().is_some() || has_user_info_marker(text) {
        return Err("must not contain user info".to_owned());
    }
    if url.fragment().is_some() {
        return Err("must not contain a fragment".to_owned());
    }
    let host = url.host().ok_or_else(|| "must have a host".to_owned())?;
    if !policy.allow_private_targets {
        check_host(&host)?;
    }
    Ok(url)
}

/// Finds an `@` in the authority, which marks user info even when it is
/// empty (`https://@example.com/`) and the parser drops it.
fn has_user_info_marker(text: &str) -> bool {
    let Some((_, rest)) = text.split_once("://") else {
        return false;
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    rest[..authority_end].contains('@')
}

/// Rejects hosts that name this machine or a non-public address.
pub fn check_host(host: &Host<&str>) -> Result<(), String> {
    match host {
        Host::Domain(name) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if name == "localhost" || name.ends_with(".localhost") {
                Err(format!("host {name} is not allowed: it names this machine"))
            } else {
                Ok(())
            }
        }
        Host::Ipv4(address) => check_address(IpAddr::V4(*address)),
        Host::Ipv6(address) => check_address(IpAddr::V6(*address)),
    }
}

/// Rejects an address that is not a public unicast address.
pub fn check_address(address: IpAddr) -> Result<(), String> {
    if is_public(address) {
        Ok(())
    } else {
        Err(format!(
            "address {address} is not allowed: it is not a public address"
        ))
    }
}

/// Tells whether an address is a public unicast address that webhooks may reach.
pub fn is_public(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn in_v4_range(address: Ipv4Addr, network: [u8; 4], prefix: u32) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    (u32::from(address) & mask) == (u32::from(Ipv4Addr::from(network)) & mask)
}

/// IPv4 ranges that are never a webhook destination (IANA special-purpose registry).
const BLOCKED_V4: &[([u8; 4], u32)] = &[
    ([0, 0, 0, 0], 8),       // "this network", including the unspecified address
    ([10, 0, 0, 0], 8),      // private
    ([100, 64, 0, 0], 10),   // shared address space (carrier-grade NAT)
    ([127, 0, 0, 0], 8),     // loopback
    ([169, 254, 0, 0], 16),  // link-local, including cloud metadata services
    ([172, 16, 0, 0], 12),   // private
    ([192, 0, 0, 0], 24),    // IETF protocol assignments
    ([192, 0, 2, 0], 24),    // documentation (TEST-NET-1)
    ([192, 88, 99, 0], 24),  // deprecated 6to4 relay anycast
    ([192, 168, 0, 0], 16),  // private
    ([198, 18, 0, 0], 15),   // benchmarking
    ([198, 51, 100, 0], 24), // documentation (TEST-NET-2)
    ([203, 0, 113, 0], 24),  // documentation (TEST-NET-3)
    ([224, 0, 0, 0], 4),     // multicast
    ([240, 0, 0, 0], 4),     // reserved, including broadcast
];

fn is_public_v4(address: Ipv4Addr) -> bool {
    !BLOCKED_V4
        .iter()
        .any(|(network, prefix)| in_v4_range(address, *network, *prefix))
}

fn in_v6_range(address: Ipv6Addr, network: [u16; 8], prefix: u32) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - prefix)
    };
    (u128::from(address) & mask) == (u128::from(Ipv6Addr::from(network)) & mask)
}

/// IPv6 ranges that are never a webhook destination, whatever they embed.
const BLOCKED_V6: &[([u16; 8], u32)] = &[
    ([0, 0, 0, 0, 0, 0, 0, 0], 96), // unspecified, loopback, IPv4-compatible
    ([0, 0, 0, 0, 0, 0xffff, 0, 0], 96), // IPv4-mapped
    ([0, 0, 0, 0, 0xffff, 0, 0, 0], 96), // IPv4-translated
    ([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48), // local-use NAT64
    ([0x100, 0, 0, 0, 0, 0, 0, 0], 64), // discard-only
    ([0x2001, 0, 0, 0, 0, 0, 0, 0], 23), // IETF protocol assignments, Teredo
    ([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32), // documentation
    ([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20), // documentation
    ([0x5f00, 0, 0, 0, 0, 0, 0, 0], 16), // segment routing identifiers
    ([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7), // unique local
    ([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), // link-local
    ([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10), // deprecated site-local
    ([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), // multicast
];

fn is_public_v6(address: Ipv6Addr) -> bool {
    if BLOCKED_V6
        .iter()
        .any(|(network, prefix)| in_v6_range(address, *network, *prefix))
    {
        return false;
    }
    // Forms that carry an IPv4 address are public only if that address is.
    if let Some(embedded) = embedded_v4(address) {
        return is_public_v4(embedded);
    }
    true
}

/// Extracts the IPv4 address carried by a NAT64 (64:ff9b::/96) or 6to4 (2002::/16) address.
fn embedded_v4(address: Ipv6Addr) -> Option<Ipv4Addr> {
    let segments = address.segments();
    let octets = address.octets();
    if in_v6_range(address, [0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96) {
        return Some(Ipv4Addr::new(
            octets[12], octets[13], octets[14], octets[15],
        ));
    }
    if segments[0] == 0x2002 {
        return Some(Ipv4Addr::new(octets[2], octets[3], octets[4], octets[5]));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRICT: DestinationPolicy = DestinationPolicy {
        allow_http: false,
        allow_private_targets: false,
    };

    #[test]
    fn accepts_public_https_urls() {
        for url in [
            "https://example.com/hooks",
            "https://hooks.example.com:8443/a/b?x=1",
            "https://8.8.8.8/",
            "https://[2606:4700:4700::1111]/",
            "https://[64:ff9b::808:808]/",
            "https://[2002:808:808::1]/",
        ] {
            assert!(
                parse_webhook_url(url, STRICT).is_ok(),
                "{url} should be accepted"
            );
        }
    }

    #[test]
    fn rejects_malformed_or_unsafe_urls() {
        let too_long = format!("https://example.com/{}", "a".repeat(MAX_URL_LENGTH));
        let cases = [
            "http://example.com/",
            "ftp://example.com/",
            "example.com/hooks",
            " https://example.com/",
            "https://example.com/ ",
            "https://exa mple.com/",
            "https://example.com/\t",
            "https://user:pass@example.com/",
            "https://user@example.com/",
            "https://@example.com/",
            "https://:@example.com/",
            "https://example.com/#frag",
            "https://localhost/",
            "https://LOCALHOST./",
            "https://api.localhost/",
            "https://127.0.0.1/",
            "https://127.1/",
            "https://2130706433/",
            "https://0x7f000001/",
            "https://0177.0.0.1/",
            "https://0x7f.1/",
            "https://0.0.0.0/",
            "https://10.1.2.3/",
            "https://172.16.0.1/",
            "https://172.31.255.255/",
            "https://192.168.1.1/",
            "https://169.254.169.254/latest/meta-data",
            "https://100.64.0.1/",
            "https://192.0.2.10/",
            "https://198.51.100.1/",
            "https://203.0.113.9/",
            "https://224.0.0.1/",
            "https://255.255.255.255/",
            "https://[::1]/",
            "https://[::]/",
            "https://[::ffff:127.0.0.1]/",
            "https://[::ffff:8.8.8.8]/",
            "https://[::127.0.0.1]/",
            "https://[fe80::1]/",
            "https://[fc00::1]/",
            "https://[fd12:3456::1]/",
            "https://[ff02::1]/",
            "https://[2001:db8::1]/",
            "https://[64:ff9b::7f00:1]/",
            "https://[64:ff9b::a9fe:a9fe]/",
            "https://[2002:7f00:1::]/",
            "https://[2002:c0a8:101::1]/",
            "https://[2001::1]/",
            too_long.as_str(),
        ];
        for url in cases {
            assert!(
                parse_webhook_url(url, STRICT).is_err(),
                "{url:?} should be rejected"
            );
        }
    }

    #[test]
    fn development_switches_allow_http_and_loopback() {
        let open = DestinationPolicy {
            allow_http: true,
            allow_private_targets: true,
        };
        assert!(parse_webhook_url("http://127.0.0.1:9000/hook", open).is_ok());
        assert!(parse_webhook_url("http://user@127.0.0.1/", open).is_err());
    }

    #[test]
    fn resolved_addresses_follow_the_same_rules() {
        assert!(check_address("93.184.216.34".parse().unwrap()).is_ok());
        assert!(check_address("10.0.0.1".parse().unwrap()).is_err());
        assert!(check_address("::ffff:10.0.0.1".parse().unwrap()).is_err());
    }
}
