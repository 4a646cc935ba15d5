//! Where an upstream's `urls.stream` may be followed. Hosted Replicate names its
//! streams on another host than its API (`stream.replicate.com` beside
//! `api.replicate.com`), so following streams on the upstream's own origin only would
//! leave every hosted prediction polled. A URL an upstream hands hearth is still never
//! followed just anywhere (a hostile upstream could aim the front at any address):
//!
//! - on the upstream's own origin (scheme, host, port), with the token, as every call
//!   there;
//! - on a sibling host: https on both sides, the same port, domain names (never an
//!   address), the stream's host one label in front of the parent domain of the
//!   upstream's host — that host less its first label, with at least two labels left
//!   and not a bare public suffix (`co.uk` and its like) — connected to only at public
//!   addresses unless `--webhook-allow-private` (the parent's DNS is the upstream's);
//! - on an origin the operator named for it (`--upstream-stream-origin NAME=ORIGIN`,
//!   or `stream_origins` in its card).
//!
//! Off its own origin the token is not sent: the JS client sends no `Authorization`
//! to `urls.stream`, and the contract (replicate-api.md §2) has the stream URL work
//! without one.

pub use url::Origin;
use url::{Host, Url};

/// Where a stream URL may be followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// The upstream's own origin: the token goes along.
    Own,
    /// A sibling host of the upstream's: no token, public addresses only.
    Sibling,
    /// An origin configured for the upstream: no token.
    Configured,
}

/// `--upstream-stream-origin`'s ORIGIN: an http(s) URL of a scheme, a host and maybe a
/// port, nothing else.
pub fn parse_origin(s: &str) -> Result<Origin, String> {
    let u = Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") || u.host().is_none() {
        return Err(format!("{s:?} must be an http(s) origin with a host"));
    }
    if !u.username().is_empty()
        || u.password().is_some()
        || !matches!(u.path(), "" | "/")
        || u.query().is_some()
        || u.fragment().is_some()
    {
        return Err(format!(
            "{s:?} must be an origin only (scheme://host[:port]): no credentials, path or query"
        ));
    }
    Ok(u.origin())
}

/// Second-level labels that registries use under country codes (`co.uk`, `com.au`,
/// `ac.jp`, ...): a parent domain of this shape is a public suffix, whose other hosts
/// belong to anyone. Without the whole public suffix list this catches the common
/// ones; any other stream host can still be named with `--upstream-stream-origin`.
const REGISTRY_LABELS: &[&str] = &[
    "ac", "biz", "co", "com", "edu", "gen", "go", "gob", "gov", "gv", "info", "int", "ltd", "mil",
    "ne", "net", "nic", "nom", "or", "org", "plc", "sch",
];

fn labels(host: &str) -> Option<Vec<&str>> {
    let l: Vec<&str> = host.trim_end_matches('.').split('.').collect();
    l.iter().all(|x| !x.is_empty()).then_some(l)
}

/// Whether `target` is a sibling host of `base` (the rule in the module's comment).
pub fn is_sibling(base: &Url, target: &Url) -> bool {
    if base.scheme() != "https"
        || target.scheme() != "https"
        || base.port_or_known_default() != target.port_or_known_default()
    {
        return false;
    }
    let (Some(Host::Domain(b)), Some(Host::Domain(t))) = (base.host(), target.host()) else {
        return false;
    };
    let (Some(b), Some(t)) = (labels(b), labels(t)) else {
        return false;
    };
    // The parent domain: the upstream's host less its first label.
    let parent = &b[1..];
    if parent.len() < 2 {
        return false;
    }
    let public_suffix = parent.len() == 2
        && parent[1].len() == 2
        && parent[1].bytes().all(|c| c.is_ascii_alphabetic())
        && REGISTRY_LABELS.contains(&parent[0]);
    !public_suffix
        && t.len() == b.len()
        && t[1..]
            .iter()
            .zip(parent)
            .all(|(x, y)| x.eq_ignore_ascii_case(y))
}

/// Where `target` (already resolved against `base`) may be followed for the upstream
/// at `base` with the extra `origins`; the error says why not, without the URL (it
/// may be a capability).
pub fn reach(base: &Url, origins: &[Origin], target: &Url, name: &str) -> Result<Reach, String> {
    let origin = target.origin();
    if origin == base.origin() {
        Ok(Reach::Own)
    } else if origins.contains(&origin) {
        Ok(Reach::Configured)
    } else if is_sibling(base, target) {
        Ok(Reach::Sibling)
    } else {
        Err(format!(
            "its URL is on {}: not upstream {name}'s own origin, a sibling host of it, \
             or an --upstream-stream-origin of it",
            origin.ascii_serialization()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sib(base: &str, target: &str) -> bool {
        is_sibling(&Url::parse(base).unwrap(), &Url::parse(target).unwrap())
    }

    #[test]
    fn hosted_replicates_stream_host_is_a_sibling_of_its_api() {
        assert!(sib(
            "https://api.replicate.com",
            "https://stream.replicate.com/v1/streams/abc"
        ));
        assert!(sib(
            "https://api.replicate.com/",
            "https://STREAM.Replicate.com./x"
        ));
        assert!(sib(
            "https://api.example.co.uk",
            "https://s.example.co.uk/x"
        ));
        assert!(sib(
            "https://api.example.com:8443",
            "https://s.example.com:8443/x"
        ));
    }

    #[test]
    fn nothing_else_is_a_sibling() {
        for (base, target) in [
            // Not https, on either side, or another port.
            ("http://api.replicate.com", "http://stream.replicate.com/x"),
            ("https://api.replicate.com", "http://stream.replicate.com/x"),
            (
                "https://api.replicate.com",
                "https://stream.replicate.com:444/x",
            ),
            // The parent would be a bare public suffix: com, co.uk, com.au.
            ("https://replicate.com", "https://evil.com/x"),
            ("https://example.co.uk", "https://evil.co.uk/x"),
            ("https://example.com.au", "https://evil.com.au/x"),
            // Deeper or shallower than a sibling, or under another parent.
            ("https://api.replicate.com", "https://a.b.replicate.com/x"),
            ("https://api.replicate.com", "https://replicate.com/x"),
            ("https://api.replicate.com", "https://stream.replicate.co/x"),
            ("https://api.replicate.com", "https://streamreplicate.com/x"),
            ("https://api.replicate.com", "https://evilreplicate.com/x"),
            // Addresses and single labels never.
            ("https://127.0.0.1", "https://127.0.0.2/x"),
            ("https://10.0.0.1", "https://10.0.0.1.nip.io/x"),
            ("https://localhost", "https://other/x"),
            ("https://api.replicate.com", "https://[::1]/x"),
            (
                "https://api.replicate.com",
                "https://169.254.169.254/latest",
            ),
        ] {
            assert!(!sib(base, target), "{base} -> {target}");
        }
    }

    #[test]
    fn own_configured_sibling_or_refused() {
        let base = Url::parse("http://127.0.0.1:8000").unwrap();
        let extra = [parse_origin("http://127.0.0.1:9000").unwrap()];
        let r = |u: &str| reach(&base, &extra, &base.join(u).unwrap(), "up");
        assert_eq!(r("/v1/predictions/x/stream"), Ok(Reach::Own));
        assert_eq!(
            r("http://127.0.0.1:9000/s?token=abc"),
            Ok(Reach::Configured)
        );
        let e = r("http://127.0.0.1:9001/s?token=abc").unwrap_err();
        assert!(
            e.contains("not upstream up's own origin") && !e.contains("token"),
            "{e}"
        );
        let hosted = Url::parse("https://api.replicate.com").unwrap();
        let to = Url::parse("https://stream.replicate.com/v1/x").unwrap();
        assert_eq!(reach(&hosted, &[], &to, "h"), Ok(Reach::Sibling));
    }

    #[test]
    fn an_origin_is_a_scheme_a_host_and_a_port_only() {
        assert_eq!(
            parse_origin("https://s.example.com")
                .unwrap()
                .ascii_serialization(),
            "https://s.example.com"
        );
        assert!(parse_origin("http://127.0.0.1:9000/").is_ok());
        for bad in [
            "ftp://h",
            "s.example.com",
            "https://u:p@h",
            "https://h/path",
            "https://h/?q=1",
        ] {
            assert!(parse_origin(bad).is_err(), "{bad}");
        }
    }
}
