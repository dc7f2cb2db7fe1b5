//! Which URLs webhooks may be sent to. An endpoint must be `https` (unless `allow_http`) and its
//! host must be, and resolve only to, public addresses (unless `allow_private_addresses`):
//! otherwise a client could make Ingestion POST into its own network. The check is made at
//! registration and again at every send, since a name may resolve elsewhere later (DNS
//! rebinding): the sending client resolves through [`GuardedResolver`], which drops refused
//! addresses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;

/// How long resolving a host at registration may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
pub(crate) struct UrlPolicy {
    pub allow_http: bool,
    pub allow_private: bool,
}

impl UrlPolicy {
    /// Checks an endpoint being registered; the reason it is refused, as a field error says it.
    pub(crate) async fn check(&self, raw: &str) -> Result<(), String> {
        let url = self.parse(raw)?;
        if self.allow_private {
            return Ok(());
        }
        if let Some(why) = self.literal_refused(&url) {
            return Err(why);
        }
        let Some(name) = url.domain() else {
            return Ok(());
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if name == "localhost" || name.ends_with(".localhost") {
            return Err(
                "names this machine (localhost); webhooks must reach a public address".into(),
            );
        }
        let port = url.port_or_known_default().unwrap_or(443);
        let addrs: Vec<SocketAddr> = match tokio::time::timeout(
            RESOLVE_TIMEOUT,
            tokio::net::lookup_host((name.as_str(), port)),
        )
        .await
        {
            Ok(Ok(addrs)) => addrs.collect(),
            Ok(Err(e)) => return Err(format!("host {name} could not be resolved ({e})")),
            Err(_) => return Err(format!("host {name} could not be resolved in time")),
        };
        if addrs.is_empty() {
            return Err(format!("host {name} resolves to no address"));
        }
        for a in addrs {
            if let Some(kind) = refused(a.ip()) {
                return Err(format!(
                    "host {name} resolves to a {kind} address ({}); webhooks must reach a public address",
                    a.ip()
                ));
            }
        }
        Ok(())
    }

    /// The URL if its form and scheme are acceptable.
    pub(crate) fn parse(&self, raw: &str) -> Result<Url, String> {
        let url = Url::parse(raw).map_err(|e| format!("is not a valid URL ({e})"))?;
        match url.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            "http" => return Err("must use https (http is not allowed)".into()),
            other => return Err(format!("must use https, not {other}")),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err("must not contain credentials".into());
        }
        if url.fragment().is_some() {
            return Err("must not have a fragment".into());
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err("must have a host".into());
        }
        Ok(url)
    }

    /// Why a URL whose host is an address literal is refused (names go through the resolver).
    pub(crate) fn literal_refused(&self, url: &Url) -> Option<String> {
        if self.allow_private || url.domain().is_some() {
            return None;
        }
        let host = url
            .host_str()?
            .trim_start_matches('[')
            .trim_end_matches(']');
        let ip: IpAddr = host.parse().ok()?;
        refused(ip)
            .map(|kind| format!("is a {kind} address ({ip}); webhooks must reach a public address"))
    }
}

/// What kind of non-public address `ip` is, or `None` for a public (global unicast) one.
pub(crate) fn refused(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => refused_v4(v4),
        IpAddr::V6(v6) => refused_v6(v6),
    }
}

fn refused_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    if a == 0 {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if a == 100 && (64..128).contains(&b) {
        Some("shared (carrier-grade NAT)")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if a >= 240 {
        Some("reserved")
    } else if ip.is_documentation() {
        Some("documentation")
    } else if a == 198 && (b == 18 || b == 19) {
        Some("benchmarking")
    } else if a == 192 && b == 0 && c == 0 {
        Some("reserved")
    } else {
        None
    }
}

fn refused_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if let Some(v4) = ip.to_ipv4_mapped() {
        return refused_v4(v4);
    }
    // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) reach the IPv4 address they embed.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return refused_v4(embedded_v4(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        return refused_v4(embedded_v4(s[1], s[2]));
    }
    if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if s[0] & 0xfe00 == 0xfc00 {
        Some("private (unique local)")
    } else if s[0] & 0xffc0 == 0xfe80 {
        Some("link-local")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if s[0] & 0xe000 != 0x2000 {
        // Only 2000::/3 is global unicast.
        Some("reserved")
    } else if s[0] == 0x2001 && s[1] == 0x0db8 {
        Some("documentation")
    } else if s[0] == 0x2001 && s[1] < 0x0200 {
        Some("reserved")
    } else {
        None
    }
}

fn embedded_v4(hi: u16, lo: u16) -> Ipv4Addr {
    let [a, b] = hi.to_be_bytes();
    let [c, d] = lo.to_be_bytes();
    Ipv4Addr::new(a, b, c, d)
}

/// Resolves names for sending, keeping only addresses the policy allows: a name that resolved
/// to a public address at registration and to a private one now is not followed there.
pub(crate) struct GuardedResolver {
    pub allow_private: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| allow_private || refused(a.ip()).is_none())
                .collect();
            if addrs.is_empty() {
                return Err(
                    format!("{host} resolves to no address webhooks may be sent to").into(),
                );
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(s: &str) -> Option<&'static str> {
        s.parse().ok().and_then(refused)
    }

    #[test]
    fn non_public_ranges_are_refused() {
        for (ip, expected) in [
            ("127.0.0.1", Some("loopback")),
            ("10.1.2.3", Some("private")),
            ("172.16.0.1", Some("private")),
            ("192.168.1.1", Some("private")),
            ("169.254.169.254", Some("link-local")),
            ("0.0.0.0", Some("unspecified")),
            ("100.64.0.1", Some("shared (carrier-grade NAT)")),
            ("224.0.0.1", Some("multicast")),
            ("255.255.255.255", Some("reserved")),
            ("192.0.2.1", Some("documentation")),
            ("93.184.216.34", None),
            ("8.8.8.8", None),
            ("::1", Some("loopback")),
            ("::", Some("unspecified")),
            ("fd00::1", Some("private (unique local)")),
            ("fe80::1", Some("link-local")),
            ("ff02::1", Some("multicast")),
            ("::ffff:127.0.0.1", Some("loopback")),
            ("::ffff:10.0.0.1", Some("private")),
            ("64:ff9b::a00:1", Some("private")),
            ("2002:7f00:1::", Some("loopback")),
            ("2001:db8::1", Some("documentation")),
            ("2606:4700:4700::1111", None),
        ] {
            assert_eq!(kind(ip), expected, "{ip}");
        }
    }

    #[tokio::test]
    async fn registration_rules() {
        let strict = UrlPolicy {
            allow_http: false,
            allow_private: false,
        };
        for bad in [
            "http://example.com/h",
            "ftp://example.com/h",
            "https://user:pw@example.com/h",
            "https://example.com/h#frag",
            "https://127.0.0.1/h",
            "https://[::1]:8443/h",
            "https://0x7f.1/h",
            "https://localhost:8080/h",
            "https://api.localhost/h",
            "https://10.0.0.7/h",
            "not a url",
        ] {
            assert!(strict.check(bad).await.is_err(), "{bad} is refused");
        }
        assert!(strict.check("https://93.184.216.34/h").await.is_ok());
        let local = UrlPolicy {
            allow_http: true,
            allow_private: true,
        };
        assert!(local.check("http://127.0.0.1:9/h").await.is_ok());
        assert!(local.check("ftp://127.0.0.1/h").await.is_err());
    }
}
