//! Egress control (NS-4): the destinations twinguard may connect to on its own initiative
//! (event endpoints, webhooks, import URLs).
//!
//! An operator lists what is allowed, one rule each (`serve --egress-allow`, or a file with one
//! rule a line): a host name (`hooks.example.com`, `*.example.com`) or an address range
//! (`203.0.113.0/24`, `2001:db8::/32`, a single address), each with an optional port
//! (`hooks.example.com:443`, `[2001:db8::/32]:443`). Nothing else is reachable.
//!
//! Two rules close the usual server-side request forgery paths:
//! - **Internal addresses need an address rule of their own.** Loopback, private, shared,
//!   link-local (the cloud metadata service at 169.254.169.254 among them), multicast and reserved
//!   addresses, also when written as IPv4 inside IPv6, are reached only through an address rule
//!   that lies inside that internal block: a listed host name that resolves to `127.0.0.1` is
//!   refused, and so is `0.0.0.0/0`'s claim on it.
//! - **The check is made on the addresses actually connected to.** A host name is resolved by
//!   [`Egress::resolve`] at each connection and only the admitted addresses are handed to the
//!   connector, so a name that resolved to a public address when the endpoint was created and to
//!   `127.0.0.1` a minute later (DNS rebinding) is refused then. HTTP clients from
//!   [`Egress::http_client`] resolve through the same check, follow no redirects and use no
//!   proxy from the environment (a proxy would resolve names where the check cannot see them).

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use reqwest::Url;

/// One allowlist rule: a host name pattern or an address range, and optionally one port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    target: Target,
    port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    /// A lowercase host name without a trailing dot; `*.` matches one or more labels below.
    Name(String),
    /// An address range; a single address is a full-length prefix.
    Net(IpNet),
}

/// Why a rule could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum RuleError {
    #[error("an egress rule is empty")]
    Empty,
    #[error("egress rule {0:?}: the port is not a number from 1 to 65535")]
    Port(String),
    #[error("egress rule {0:?} is neither a host name nor an address range")]
    Target(String),
}

impl FromStr for Rule {
    type Err = RuleError;

    fn from_str(text: &str) -> Result<Self, RuleError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(RuleError::Empty);
        }
        let (target, port) = split_port(text)?;
        let target = if let Ok(net) = target.parse::<IpNet>() {
            Target::Net(net.trunc())
        } else if let Ok(ip) = target.parse::<IpAddr>() {
            Target::Net(IpNet::from(ip))
        } else {
            Target::Name(host_pattern(target).ok_or_else(|| RuleError::Target(text.into()))?)
        };
        Ok(Rule { target, port })
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.target, self.port) {
            (Target::Name(name), None) => write!(f, "{name}"),
            (Target::Name(name), Some(port)) => write!(f, "{name}:{port}"),
            (Target::Net(net), None) => write!(f, "{net}"),
            (Target::Net(IpNet::V6(net)), Some(port)) => write!(f, "[{net}]:{port}"),
            (Target::Net(net), Some(port)) => write!(f, "{net}:{port}"),
        }
    }
}

/// `host[:port]`, `v4net[:port]`, `[v6net]:port` or a bare `v6net`.
fn split_port(text: &str) -> Result<(&str, Option<u16>), RuleError> {
    let port = |p: &str| match p.parse::<u16>() {
        Ok(port) if port > 0 => Ok(Some(port)),
        _ => Err(RuleError::Port(text.into())),
    };
    if let Some(rest) = text.strip_prefix('[') {
        let (inner, after) = rest
            .split_once(']')
            .ok_or_else(|| RuleError::Target(text.into()))?;
        return match after {
            "" => Ok((inner, None)),
            _ => match after.strip_prefix(':') {
                Some(p) => Ok((inner, port(p)?)),
                None => Err(RuleError::Target(text.into())),
            },
        };
    }
    match text.matches(':').count() {
        0 => Ok((text, None)),
        1 => {
            let (target, p) = text.split_once(':').ok_or(RuleError::Empty)?;
            Ok((target, port(p)?))
        }
        // More than one colon without brackets: an IPv6 address or range without a port.
        _ => Ok((text, None)),
    }
}

/// A host name, or `*.` and a host name, in lowercase without the trailing dot.
fn host_pattern(text: &str) -> Option<String> {
    let name = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
    let labels = name.strip_prefix("*.").unwrap_or(&name);
    let valid_label = |label: &str| {
        (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    (labels.len() <= 253 && labels.split('.').all(valid_label)).then_some(name)
}

impl Rule {
    fn admits_port(&self, port: u16) -> bool {
        self.port.is_none_or(|p| p == port)
    }

    fn admits_name(&self, host: &str) -> bool {
        match &self.target {
            Target::Name(pattern) => match pattern.strip_prefix("*.") {
                Some(parent) => host
                    .strip_suffix(parent)
                    .is_some_and(|below| below.len() > 1 && below.ends_with('.')),
                None => pattern == host,
            },
            Target::Net(_) => false,
        }
    }
}

/// Where twinguard is asked to connect: a host (name or address) and a port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    host: Host,
    port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Host {
    Name(String),
    Ip(IpAddr),
}

impl Destination {
    /// The destination a URL names, with the usual ports of the schemes twinguard speaks.
    pub fn from_url(url: &Url) -> Result<Self, EgressError> {
        let refused = |reason: &'static str| EgressError::Refused {
            destination: url.host_str().unwrap_or("").to_string(),
            reason,
        };
        let port = url
            .port_or_known_default()
            .or(match url.scheme() {
                "nats" | "tls" => Some(4222),
                "mqtt" => Some(1883),
                "mqtts" => Some(8883),
                _ => None,
            })
            .ok_or_else(|| refused("the URL names no port and its scheme has no usual one"))?;
        let host = url
            .host_str()
            .ok_or_else(|| refused("the URL names no host"))?;
        let destination = Destination::new(host, port)?;
        Ok(destination)
    }

    /// A destination given as a host name (or an address in text) and a port.
    pub fn new(host: &str, port: u16) -> Result<Self, EgressError> {
        let host = match host.trim_start_matches('[').trim_end_matches(']').parse() {
            Ok(ip) => Host::Ip(ip),
            Err(_) => match host_pattern(host) {
                Some(name) if !name.starts_with("*.") => Host::Name(name),
                _ => {
                    return Err(EgressError::Refused {
                        destination: host.to_string(),
                        reason: "not a host name or an address",
                    });
                }
            },
        };
        Ok(Destination { host, port })
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Name(name) => write!(f, "{name}:{}", self.port),
            Host::Ip(ip) => write!(f, "{}", SocketAddr::new(*ip, self.port)),
        }
    }
}

/// A refused or failed egress.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EgressError {
    #[error("egress to {destination} refused: {reason}")]
    Refused {
        destination: String,
        reason: &'static str,
    },
    #[error("egress to {destination}: the name could not be resolved")]
    Lookup {
        destination: String,
        #[source]
        source: io::Error,
    },
}

/// The rules, as the operator listed them.
#[derive(Clone, Debug, Default)]
pub struct EgressPolicy {
    rules: Vec<Rule>,
}

impl EgressPolicy {
    /// No destination at all: the default.
    pub fn deny_all() -> Self {
        Self::default()
    }

    pub fn new(rules: impl IntoIterator<Item = Rule>) -> Self {
        Self {
            rules: rules.into_iter().collect(),
        }
    }

    /// One rule a line; `#` starts a comment, blank lines are skipped. The error names the line.
    pub fn from_lines(text: &str) -> Result<Self, (usize, RuleError)> {
        let mut rules = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if !line.is_empty() {
                rules.push(line.parse().map_err(|e| (index + 1, e))?);
            }
        }
        Ok(Self { rules })
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether some rule could admit the destination at all: its name is listed, or it is an
    /// address that [`Self::admits`] admits. A listed name still has to resolve to admitted
    /// addresses when connecting.
    pub fn may_reach(&self, destination: &Destination) -> Result<(), EgressError> {
        let admitted = match &destination.host {
            Host::Ip(ip) => self.admits(destination, *ip),
            Host::Name(name) => self.rules.iter().any(|rule| {
                rule.admits_port(destination.port)
                    && (rule.admits_name(name) || matches!(rule.target, Target::Net(_)))
            }),
        };
        if admitted {
            Ok(())
        } else {
            Err(EgressError::Refused {
                destination: destination.to_string(),
                reason: "not on the egress allowlist",
            })
        }
    }

    /// Whether connecting to `ip` for `destination` is allowed: a rule for the port lists the
    /// destination's name and the address is not internal, or an address rule holds the address
    /// and, for an internal address, lies inside its internal block.
    pub fn admits(&self, destination: &Destination, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        let internal = internal_block(ip);
        self.rules
            .iter()
            .filter(|rule| rule.admits_port(destination.port))
            .any(|rule| match &rule.target {
                Target::Net(net) => {
                    net.contains(&ip) && internal.is_none_or(|(block, _)| block.contains(net))
                }
                Target::Name(_) => {
                    internal.is_none()
                        && matches!(&destination.host, Host::Name(name) if rule.admits_name(name))
                }
            })
    }
}

/// IPv4 addresses written as IPv4-mapped IPv6 are judged as the IPv4 address they are.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// The internal block an address lies in, and its name, or `None` for a global address.
pub fn internal_block(ip: IpAddr) -> Option<(IpNet, &'static str)> {
    const V4: [(Ipv4Addr, u8, &str); 11] = [
        (Ipv4Addr::new(0, 0, 0, 0), 8, "this network"),
        (Ipv4Addr::new(10, 0, 0, 0), 8, "private"),
        (Ipv4Addr::new(100, 64, 0, 0), 10, "shared address space"),
        (Ipv4Addr::new(127, 0, 0, 0), 8, "loopback"),
        (
            Ipv4Addr::new(169, 254, 0, 0),
            16,
            "link-local (cloud metadata)",
        ),
        (Ipv4Addr::new(172, 16, 0, 0), 12, "private"),
        (Ipv4Addr::new(192, 0, 0, 0), 24, "protocol assignments"),
        (Ipv4Addr::new(192, 168, 0, 0), 16, "private"),
        (Ipv4Addr::new(198, 18, 0, 0), 15, "benchmarking"),
        (Ipv4Addr::new(224, 0, 0, 0), 4, "multicast"),
        (Ipv4Addr::new(240, 0, 0, 0), 4, "reserved"),
    ];
    const V6: [(Ipv6Addr, u8, &str); 6] = [
        (Ipv6Addr::UNSPECIFIED, 128, "unspecified"),
        (Ipv6Addr::LOCALHOST, 128, "loopback"),
        (Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0), 64, "discard"),
        (
            Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0),
            7,
            "unique local",
        ),
        (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10, "link-local"),
        (Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8, "multicast"),
    ];
    // IPv6 prefixes that carry an IPv4 address: NAT64 (RFC 6052) and 6to4 (RFC 3056).
    const EMBEDDING: [(Ipv6Addr, u8); 2] = [
        (Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96),
        (Ipv6Addr::new(0x2002, 0, 0, 0, 0, 0, 0, 0), 16),
    ];
    match canonical(ip) {
        IpAddr::V4(v4) => V4.iter().find_map(|&(addr, len, name)| {
            let net = Ipv4Net::new_assert(addr, len);
            net.contains(&v4).then_some((IpNet::V4(net), name))
        }),
        IpAddr::V6(v6) => {
            let listed = V6.iter().find_map(|&(addr, len, name)| {
                let net = Ipv6Net::new_assert(addr, len);
                net.contains(&v6).then_some((IpNet::V6(net), name))
            });
            listed.or_else(|| {
                EMBEDDING.iter().find_map(|&(addr, len)| {
                    let net = Ipv6Net::new_assert(addr, len);
                    let octets = v6.octets();
                    let embedded = match len {
                        96 => Ipv4Addr::new(octets[12], octets[13], octets[14], octets[15]),
                        _ => Ipv4Addr::new(octets[2], octets[3], octets[4], octets[5]),
                    };
                    (net.contains(&v6) && internal_block(IpAddr::V4(embedded)).is_some())
                        .then_some((IpNet::V6(net), "internal IPv4 inside IPv6"))
                })
            })
        }
    }
}

type LookupFuture = Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>>;

/// Name resolution, injectable so that tests can play a rebinding DNS server.
pub trait Lookup: Send + Sync {
    fn lookup(&self, host: &str, port: u16) -> LookupFuture;
}

/// A name resolver to hand to [`crate::startup::ServeConfig`] (tests play a DNS server with
/// it); `None` there is the system resolver.
#[derive(Clone)]
pub struct SharedLookup(pub Arc<dyn Lookup>);

impl fmt::Debug for SharedLookup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedLookup")
    }
}

/// The system resolver.
#[derive(Debug, Default)]
pub struct SystemLookup;

impl Lookup for SystemLookup {
    fn lookup(&self, host: &str, port: u16) -> LookupFuture {
        let target = format!("{host}:{port}");
        Box::pin(async move { Ok(tokio::net::lookup_host(target).await?.collect()) })
    }
}

/// The policy and the resolver that every outbound connection goes through.
#[derive(Clone)]
pub struct Egress {
    policy: Arc<EgressPolicy>,
    lookup: Arc<dyn Lookup>,
}

impl fmt::Debug for Egress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Egress")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Egress {
    pub fn new(policy: EgressPolicy) -> Self {
        Self::with_lookup(policy, Arc::new(SystemLookup))
    }

    pub fn with_lookup(policy: EgressPolicy, lookup: Arc<dyn Lookup>) -> Self {
        Self {
            policy: Arc::new(policy),
            lookup,
        }
    }

    pub fn policy(&self) -> &EgressPolicy {
        &self.policy
    }

    /// The addresses to connect to for `destination`: those it resolves to now that the policy
    /// admits. Refused when the destination is not listed or no address is admitted.
    pub async fn resolve(&self, destination: &Destination) -> Result<Vec<SocketAddr>, EgressError> {
        self.policy.may_reach(destination)?;
        let resolved = match &destination.host {
            Host::Ip(ip) => vec![SocketAddr::new(*ip, destination.port)],
            Host::Name(name) => {
                self.lookup
                    .lookup(name, destination.port)
                    .await
                    .map_err(|source| EgressError::Lookup {
                        destination: destination.to_string(),
                        source,
                    })?
            }
        };
        let admitted: Vec<SocketAddr> = resolved
            .into_iter()
            .filter(|addr| self.policy.admits(destination, addr.ip()))
            .map(|addr| SocketAddr::new(canonical(addr.ip()), destination.port))
            .collect();
        if admitted.is_empty() {
            return Err(EgressError::Refused {
                destination: destination.to_string(),
                reason: "it resolves to no address the egress allowlist admits",
            });
        }
        Ok(admitted)
    }

    /// An HTTP client builder for `url`: the URL must be admitted, every name is resolved
    /// through [`Self::resolve`] at connection time, redirects are not followed and no proxy is
    /// used. Callers add TLS roots and time-outs.
    pub fn http_client(&self, url: &Url) -> Result<reqwest::ClientBuilder, EgressError> {
        let destination = Destination::from_url(url)?;
        self.policy.may_reach(&destination)?;
        // reqwest takes rustls' process-wide provider; the server installs aws-lc-rs at start,
        // and this keeps a client made before (or without) the server from having none.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        Ok(reqwest::Client::builder()
            .dns_resolver(Arc::new(GuardedResolver {
                egress: self.clone(),
                port: destination.port,
            }))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy())
    }
}

/// reqwest's resolver hook: names resolve only to admitted addresses. (reqwest connects to an
/// address literal in a URL without asking; [`Egress::http_client`] checked that one.)
struct GuardedResolver {
    egress: Egress,
    port: u16,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let egress = self.egress.clone();
        let destination = Destination::new(name.as_str(), self.port);
        Box::pin(async move {
            let addrs = egress.resolve(&destination?).await?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn policy(rules: &[&str]) -> EgressPolicy {
        EgressPolicy::new(rules.iter().map(|r| r.parse::<Rule>().unwrap()))
    }

    fn dest(host: &str, port: u16) -> Destination {
        Destination::new(host, port).unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn rules_read_names_ranges_addresses_and_ports_and_print_back() {
        for (text, printed) in [
            ("hooks.example.com", "hooks.example.com"),
            ("Hooks.Example.COM.:443", "hooks.example.com:443"),
            ("*.example.com", "*.example.com"),
            ("203.0.113.0/24", "203.0.113.0/24"),
            ("203.0.113.77/24:8443", "203.0.113.0/24:8443"),
            ("203.0.113.7", "203.0.113.7/32"),
            ("2001:db8::/32", "2001:db8::/32"),
            ("[2001:db8::/32]:443", "[2001:db8::/32]:443"),
            ("[2001:db8::1]:443", "[2001:db8::1/128]:443"),
        ] {
            let rule: Rule = text.parse().unwrap();
            assert_eq!(rule.to_string(), printed, "{text}");
            assert_eq!(printed.parse::<Rule>().unwrap(), rule, "{printed}");
        }
        for bad in [
            "",
            "host:0",
            "host:65536",
            "host:port",
            "bad_host!",
            "-lead.example.com",
            "[2001:db8::/32",
            "[2001:db8::/32]443",
            "a..b",
            "http://hooks.example.com",
        ] {
            assert!(bad.parse::<Rule>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn a_rule_file_skips_comments_and_names_the_line_of_a_bad_rule() {
        let good =
            EgressPolicy::from_lines("# webhooks\nhooks.example.com:443\n\n10.20.0.0/16 # nats\n")
                .unwrap();
        assert_eq!(good.rules().len(), 2);
        let (line, _) = EgressPolicy::from_lines("hooks.example.com\nnot a rule\n").unwrap_err();
        assert_eq!(line, 2);
    }

    #[test]
    fn internal_blocks_cover_loopback_private_link_local_metadata_and_embedded_ipv4() {
        for internal in [
            "127.0.0.1",
            "127.255.0.9",
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "192.0.0.192",
            "198.18.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fc00::1",
            "fd00:ec2::254",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
            "2002:a9fe:a9fe::1",
        ] {
            assert!(
                internal_block(ip(internal)).is_some(),
                "{internal} is internal"
            );
        }
        for global in [
            "8.8.8.8",
            "203.0.113.7",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::",
        ] {
            assert!(internal_block(ip(global)).is_none(), "{global} is global");
        }
    }

    #[test]
    fn a_listed_name_reaches_global_addresses_only_on_its_port() {
        let p = policy(&["hooks.example.com:443", "*.events.example.com"]);
        assert!(p.admits(&dest("hooks.example.com", 443), ip("203.0.113.7")));
        assert!(!p.admits(&dest("hooks.example.com", 80), ip("203.0.113.7")));
        assert!(!p.admits(&dest("other.example.com", 443), ip("203.0.113.7")));
        assert!(p.admits(&dest("a.events.example.com", 8080), ip("203.0.113.7")));
        assert!(p.admits(&dest("a.b.events.example.com", 1), ip("203.0.113.7")));
        assert!(!p.admits(&dest("events.example.com", 443), ip("203.0.113.7")));
        assert!(!p.admits(&dest("xevents.example.com", 443), ip("203.0.113.7")));
        // The listed name resolving to an internal address is refused.
        for internal in [
            "127.0.0.1",
            "10.0.0.8",
            "169.254.169.254",
            "::ffff:127.0.0.1",
            "::1",
        ] {
            assert!(
                !p.admits(&dest("hooks.example.com", 443), ip(internal)),
                "{internal}"
            );
        }
    }

    #[test]
    fn internal_addresses_need_an_address_rule_inside_their_block() {
        let broad = policy(&["0.0.0.0/0", "::/0"]);
        assert!(broad.admits(&dest("8.8.8.8", 53), ip("8.8.8.8")));
        for internal in ["127.0.0.1", "10.0.0.8", "169.254.169.254", "::1", "fd00::1"] {
            assert!(
                !broad.admits(&dest(internal, 80), ip(internal)),
                "{internal}"
            );
        }
        let listed = policy(&["10.20.0.0/16:4222", "127.0.0.1"]);
        assert!(listed.admits(&dest("10.20.3.4", 4222), ip("10.20.3.4")));
        assert!(listed.admits(&dest("nats.internal", 4222), ip("10.20.3.4")));
        assert!(!listed.admits(&dest("10.20.3.4", 4223), ip("10.20.3.4")));
        assert!(!listed.admits(&dest("10.21.3.4", 4222), ip("10.21.3.4")));
        assert!(listed.admits(&dest("localhost", 9000), ip("127.0.0.1")));
        assert!(listed.admits(&dest("localhost", 9000), ip("::ffff:127.0.0.1")));
        assert!(!listed.admits(&dest("localhost", 9000), ip("127.0.0.2")));
        assert!(!listed.admits(&dest("169.254.169.254", 80), ip("169.254.169.254")));
    }

    #[test]
    fn urls_are_judged_on_their_host_and_usual_port() {
        let p = policy(&[
            "hooks.example.com:443",
            "10.20.0.0/16:4222",
            "[fd00::/8]:8883",
        ]);
        let reach = |url: &str| {
            Destination::from_url(&Url::parse(url).unwrap()).and_then(|d| p.may_reach(&d))
        };
        assert!(reach("https://hooks.example.com/in").is_ok());
        assert!(reach("http://hooks.example.com/in").is_err());
        assert!(reach("nats://10.20.0.5").is_ok());
        assert!(reach("mqtts://[fd00::5]").is_ok());
        assert!(reach("mqtt://[fd00::5]").is_err());
        assert!(reach("https://169.254.169.254/latest/meta-data/").is_err());
        assert!(reach("https://127.0.0.1/").is_err());
        assert!(reach("https://[::ffff:127.0.0.1]/").is_err());
        assert!(reach("file:///etc/passwd").is_err());
        assert!(reach("unknown://hooks.example.com").is_err());
    }

    #[test]
    fn no_rules_reach_nothing() {
        let p = EgressPolicy::deny_all();
        assert!(p.may_reach(&dest("hooks.example.com", 443)).is_err());
        assert!(!p.admits(&dest("8.8.8.8", 53), ip("8.8.8.8")));
    }

    fn internal_addr() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<u32>().prop_map(|n| IpAddr::V4(Ipv4Addr::from(0x7f00_0000 | (n & 0x00ff_ffff)))),
            any::<u32>().prop_map(|n| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (n & 0x00ff_ffff)))),
            any::<u16>().prop_map(|n| IpAddr::V4(Ipv4Addr::from(0xa9fe_0000 | u32::from(n)))),
            any::<u32>().prop_map(|n| IpAddr::V4(Ipv4Addr::from(0xc0a8_0000 | (n & 0xffff)))),
            any::<u32>().prop_map(|n| IpAddr::V4(Ipv4Addr::from(0xac10_0000 | (n & 0x000f_ffff)))),
            any::<u128>().prop_map(|n| IpAddr::V6(Ipv6Addr::from(
                0xfc00_u128 << 112 | (n & (u128::MAX >> 7))
            ))),
            any::<u128>().prop_map(|n| IpAddr::V6(Ipv6Addr::from(
                0xfe80_u128 << 112 | (n & (u128::MAX >> 10))
            ))),
            any::<u32>().prop_map(|n| IpAddr::V6(
                Ipv4Addr::from(0x7f00_0000 | (n & 0x00ff_ffff)).to_ipv6_mapped()
            )),
        ]
    }

    fn name_or_broad_rule() -> impl Strategy<Value = Rule> {
        prop_oneof![
            Just("hooks.example.com".parse::<Rule>().unwrap()),
            Just("*.example.com".parse::<Rule>().unwrap()),
            (0u8..=7).prop_map(|len| format!("0.0.0.0/{len}").parse::<Rule>().unwrap()),
            (0u8..=6).prop_map(|len| format!("::/{len}").parse::<Rule>().unwrap()),
            Just("::ffff:0:0/96".parse::<Rule>().unwrap()),
        ]
    }

    proptest! {
        /// No combination of name rules and ranges wider than an internal block admits an
        /// internal address, whatever name the destination has.
        #[test]
        fn only_an_address_rule_inside_the_block_admits_an_internal_address(
            addr in internal_addr(),
            rules in proptest::collection::vec(name_or_broad_rule(), 1..5),
            port in 1u16..,
        ) {
            let p = EgressPolicy::new(rules);
            for host in ["hooks.example.com", "a.example.com"] {
                prop_assert!(!p.admits(&dest(host, port), addr));
            }
            let literal = Destination { host: Host::Ip(addr), port };
            prop_assert!(!p.admits(&literal, addr));
            let (block, _) = internal_block(addr).unwrap();
            let exact = EgressPolicy::new([Rule { target: Target::Net(IpNet::from(canonical(addr))), port: None }]);
            let whole = EgressPolicy::new([Rule { target: Target::Net(block), port: Some(port) }]);
            prop_assert!(exact.admits(&dest("hooks.example.com", port), addr));
            prop_assert!(whole.admits(&dest("hooks.example.com", port), addr));
        }
    }

    /// A DNS that answers from a script, one answer per lookup, and counts the lookups.
    struct ScriptedDns {
        answers: Mutex<Vec<Vec<IpAddr>>>,
        lookups: AtomicUsize,
    }

    impl Lookup for ScriptedDns {
        fn lookup(&self, _host: &str, port: u16) -> LookupFuture {
            self.lookups.fetch_add(1, Ordering::SeqCst);
            let mut answers = self.answers.lock().unwrap();
            let answer = if answers.len() > 1 {
                answers.remove(0)
            } else {
                answers[0].clone()
            };
            Box::pin(async move {
                Ok(answer
                    .into_iter()
                    .map(|ip| SocketAddr::new(ip, port))
                    .collect())
            })
        }
    }

    /// A plain HTTP server on loopback that answers every request with `response` and counts
    /// the connections it accepted.
    async fn http_server(response: String) -> (u16, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let response = response.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = stream.read(&mut buf).await;
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        (port, accepted)
    }

    const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok";

    #[tokio::test]
    async fn a_name_that_rebinds_to_loopback_is_refused_at_connect_time() {
        let (port, accepted) = http_server(OK.into()).await;
        let dns = Arc::new(ScriptedDns {
            // Public when the endpoint is checked, loopback at the connection.
            answers: Mutex::new(vec![vec![ip("203.0.113.7")], vec![ip("127.0.0.1")]]),
            lookups: AtomicUsize::new(0),
        });
        let egress = Egress::with_lookup(policy(&["hooks.example.test"]), dns.clone());
        let url = Url::parse(&format!("http://hooks.example.test:{port}/in")).unwrap();
        let at_creation = egress
            .resolve(&Destination::from_url(&url).unwrap())
            .await
            .unwrap();
        assert_eq!(at_creation, vec![SocketAddr::new(ip("203.0.113.7"), port)]);

        let client = egress.http_client(&url).unwrap().build().unwrap();
        let refused = client.get(url.clone()).send().await;
        assert!(refused.is_err(), "the rebound name must not connect");
        assert_eq!(
            dns.lookups.load(Ordering::SeqCst),
            2,
            "resolved again at connect time"
        );
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            0,
            "nothing reached the loopback server"
        );

        // Positive control: with loopback listed by address, the same client path connects.
        let listed = Egress::with_lookup(policy(&["hooks.example.test", "127.0.0.1"]), dns);
        let client = listed.http_client(&url).unwrap().build().unwrap();
        let answer = client.get(url).send().await.unwrap();
        assert_eq!(answer.status(), 200);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_redirect_is_answered_not_followed() {
        let (target_port, target_hits) = http_server(OK.into()).await;
        let (port, _) = http_server(format!(
            "HTTP/1.1 307 Temporary Redirect\r\nlocation: http://127.0.0.1:{target_port}/\r\n\
             content-length: 0\r\nconnection: close\r\n\r\n"
        ))
        .await;
        let egress = Egress::new(policy(&[&format!("127.0.0.1:{port}")]));
        let url = Url::parse(&format!("http://127.0.0.1:{port}/hook")).unwrap();
        let client = egress.http_client(&url).unwrap().build().unwrap();
        let answer = client.get(url).send().await.unwrap();
        assert_eq!(answer.status(), 307);
        assert_eq!(
            target_hits.load(Ordering::SeqCst),
            0,
            "the redirect was not followed"
        );
        // And the redirect's target, not being listed, could not be reached directly either.
        let target = Url::parse(&format!("http://127.0.0.1:{target_port}/")).unwrap();
        assert!(egress.http_client(&target).is_err());
    }

    #[tokio::test]
    async fn a_name_resolving_only_to_internal_addresses_is_refused_when_checked() {
        let dns = Arc::new(ScriptedDns {
            answers: Mutex::new(vec![vec![ip("10.0.0.8"), ip("169.254.169.254")]]),
            lookups: AtomicUsize::new(0),
        });
        let egress = Egress::with_lookup(policy(&["hooks.example.test:443"]), dns);
        let err = egress
            .resolve(&dest("hooks.example.test", 443))
            .await
            .unwrap_err();
        assert!(matches!(err, EgressError::Refused { .. }), "{err}");
        // A mixed answer keeps only the admitted address.
        let dns = Arc::new(ScriptedDns {
            answers: Mutex::new(vec![vec![ip("127.0.0.1"), ip("203.0.113.9")]]),
            lookups: AtomicUsize::new(0),
        });
        let egress = Egress::with_lookup(policy(&["hooks.example.test:443"]), dns);
        let addrs = egress
            .resolve(&dest("hooks.example.test", 443))
            .await
            .unwrap();
        assert_eq!(addrs, vec![SocketAddr::new(ip("203.0.113.9"), 443)]);
    }
}
