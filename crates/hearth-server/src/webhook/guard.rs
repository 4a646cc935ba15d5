//! Where a webhook may point: only at public addresses, unless the operator allows
//! private ones. Checked when the prediction is created (a 422 naming `webhook`) and
//! again by the delivery client's resolver at every connection, so a name that
//! resolves elsewhere later (DNS rebinding) cannot reach the host or its network.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// How long the check at creation waits for DNS.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// False for loopback, private (RFC 1918, unique local), shared (CGNAT), link-local
/// (169.254.169.254, the cloud metadata address, among them), multicast, broadcast,
/// unspecified and reserved addresses, IPv4 inside IPv6 included.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            // NAT64 (64:ff9b::/96) and the deprecated IPv4-compatible form embed an IPv4.
            if (s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0; 4]) || s[0..6] == [0; 6] {
                let v4 =
                    Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
                return !v6.is_unspecified() && !v6.is_loopback() && is_public_v4(v4);
            }
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
                || (s[0] & 0xffc0) == 0xfec0 // site-local fec0::/10 (deprecated)
                || (s[0] == 0x2001 && s[1] == 0x0db8)) // documentation
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || o[0] == 0 // "this network"
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // shared address space 100.64/10
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // benchmarking 198.18/15
        || o[0] >= 240) // reserved
}

/// Checks a webhook URL at creation: http(s), a host, and (unless `allow_private`)
/// every address it resolves to public. The error is the reason, for a 422.
pub async fn check_url(url: &str, allow_private: bool) -> Result<(), String> {
    let u = reqwest::Url::parse(url).map_err(|e| format!("not a URL ({e})"))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(format!("scheme {:?} is not http or https", u.scheme()));
    }
    let host = match u.host() {
        Some(h) => h,
        None => return Err("the URL has no host".into()),
    };
    if allow_private {
        return Ok(());
    }
    let port = u.port_or_known_default().unwrap_or(80);
    let addrs: Vec<SocketAddr> = match host {
        url::Host::Ipv4(ip) => vec![SocketAddr::new(IpAddr::V4(ip), port)],
        url::Host::Ipv6(ip) => vec![SocketAddr::new(IpAddr::V6(ip), port)],
        url::Host::Domain(d) => {
            match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((d, port))).await {
                Ok(Ok(it)) => it.collect(),
                Ok(Err(e)) => return Err(format!("host {d:?} does not resolve ({e})")),
                Err(_) => return Err(format!("host {d:?} did not resolve within 5s")),
            }
        }
    };
    if addrs.is_empty() {
        return Err("the host has no address".into());
    }
    if let Some(bad) = addrs.iter().find(|a| !is_public(a.ip())) {
        return Err(format!(
            "{} is a loopback, private, link-local or otherwise non-public address; \
             webhooks may only target public addresses (the server's operator can allow \
             private ones with --webhook-allow-private)",
            bad.ip()
        ));
    }
    Ok(())
}

/// The delivery client's resolver: the addresses it connects to are the ones it
/// checked, so a name cannot pass at creation and then resolve to the host.
pub struct PublicOnlyResolver;

impl reqwest::dns::Resolve for PublicOnlyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = all.into_iter().filter(|a| is_public(a.ip())).collect();
            if public.is_empty() {
                return Err(format!("{host} resolves to no public address").into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(public.into_iter());
            Ok(addrs)
        })
    }
}

/// For URLs that name an address directly (no resolver involved): whether delivery
/// may connect to it.
pub fn literal_allowed(url: &reqwest::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => is_public(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => is_public(IpAddr::V6(ip)),
        Some(url::Host::Domain(_)) => true,
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_special_addresses_are_not_public() {
        for a in [
            "127.0.0.1",
            "127.5.5.5",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "fd12:3456::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "::127.0.0.1",
        ] {
            assert!(!is_public(a.parse().unwrap()), "{a} counted as public");
        }
        for a in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(a.parse().unwrap()), "{a} counted as private");
        }
    }

    #[tokio::test]
    async fn urls_to_the_host_are_refused_unless_allowed() {
        for u in [
            "http://127.0.0.1:8080/hook",
            "http://localhost/hook",
            "http://[::1]/x",
            "http://169.254.169.254/latest/meta-data",
            "http://10.0.0.5/x",
        ] {
            let e = check_url(u, false).await.unwrap_err();
            assert!(!e.is_empty(), "{u}");
            assert!(check_url(u, true).await.is_ok(), "{u} with allow_private");
        }
        assert!(check_url("http://8.8.8.8/x", false).await.is_ok());
        assert!(check_url("ftp://8.8.8.8/x", true).await.is_err());
        assert!(check_url("not a url", true).await.is_err());
    }

    #[tokio::test]
    async fn the_resolver_drops_private_answers() {
        use reqwest::dns::Resolve;
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        assert!(PublicOnlyResolver.resolve(name).await.is_err());
    }
}
