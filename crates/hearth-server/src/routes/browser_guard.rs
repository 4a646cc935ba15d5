//! What a web page the operator visits could make the server do. A DNS-rebinding page
//! reaches the server under the page's own name: only `Host` values that are loopback
//! names, IP literals, `--public-url`'s host or an `--allowed-host` are served (403
//! otherwise). A cross-site page can send simple requests without a CORS preflight:
//! state-changing methods carrying a foreign `Origin` or `Sec-Fetch-Site: cross-site`
//! are refused (403), and a JSON route given a body that is not declared JSON (a form,
//! `text/plain`) answers 415. An empty body needs no type; uploads stay multipart.
//! `/health` and `/health-check` answer whatever the `Host`: probes send their own.

use std::net::IpAddr;
use std::sync::Arc;

use axum::body::HttpBody;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::ServerConfig;

/// The checks' settings, from the server's configuration.
pub struct BrowserGuard {
    hosts: HostPolicy,
    public_url: Option<String>,
}

impl BrowserGuard {
    pub fn new(cfg: &ServerConfig) -> Self {
        Self {
            hosts: HostPolicy::new(cfg),
            public_url: cfg.public_url.clone(),
        }
    }
}

/// Which `Host` names the server answers to.
#[derive(Debug, Clone, Default)]
pub struct HostPolicy {
    any: bool,
    exact: Vec<String>,
    /// `.example.com`: the domain and every name under it.
    domains: Vec<String>,
}

impl HostPolicy {
    pub fn new(cfg: &ServerConfig) -> Self {
        let mut p = HostPolicy::default();
        for h in &cfg.allowed_hosts {
            let h = normalize(h);
            if h == "*" {
                p.any = true;
            } else if h.starts_with('.') {
                p.domains.push(h);
            } else {
                p.exact.push(h);
            }
        }
        if let Some(host) = cfg
            .public_url
            .as_deref()
            .and_then(|u| reqwest::Url::parse(u).ok())
            .and_then(|u| u.host_str().map(normalize))
        {
            p.exact.push(host);
        }
        p
    }

    /// `host` without its port.
    pub fn allows(&self, host: &str) -> bool {
        let host = normalize(host);
        if self.any || host == "localhost" || host.ends_with(".localhost") {
            return true;
        }
        let literal = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(&host);
        if literal.parse::<IpAddr>().is_ok() {
            return true;
        }
        self.exact.contains(&host)
            || self
                .domains
                .iter()
                .any(|d| host.ends_with(d.as_str()) || host == d[1..])
    }
}

/// Lowercase, without a trailing dot.
fn normalize(h: &str) -> String {
    h.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// Why an `--allowed-host` entry is not one: a name, `.domain` or `*`, no port or path.
pub fn check_allowed_host(h: &str) -> Result<(), String> {
    let ok = !h.is_empty()
        && (h == "*"
            || h.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "--allowed-host {h:?}: expected a host name (hearth.example.com), a domain and \
             the names under it (.example.com) or * (any), without a port"
        ))
    }
}

/// `host[:port]` split; an IPv6 literal keeps its brackets.
fn split_authority(a: &str) -> (&str, Option<u16>) {
    if a.starts_with('[') {
        return match a.find(']') {
            Some(i) => (
                &a[..=i],
                a[i + 1..].strip_prefix(':').and_then(|p| p.parse().ok()),
            ),
            None => (a, None),
        };
    }
    match a.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => (h, p.parse().ok()),
        _ => (a, None),
    }
}

/// The authority the request was sent to: HTTP/2's `:authority`, else `Host`.
fn request_authority(req: &Request) -> Option<String> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str().to_string());
    }
    req.headers()
        .get(header::HOST)
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
}

fn forbidden(detail: String) -> Response {
    ApiError::new(StatusCode::FORBIDDEN, "Forbidden", detail).into_response()
}

/// The request's `Origin` is this server's (the `Host` it was sent to, or
/// `--public-url`'s): the same site's page, or no browser at all.
fn same_origin(origin: &str, authority: Option<&str>, public_url: Option<&str>) -> bool {
    let Ok(o) = reqwest::Url::parse(origin) else {
        return false;
    };
    let (Some(ohost), oport) = (o.host_str(), o.port_or_known_default()) else {
        return false;
    };
    let matches = |a: &str| {
        let (h, p) = split_authority(a);
        normalize(h) == normalize(ohost) && p.or(oport) == oport
    };
    if authority.is_some_and(matches) {
        return true;
    }
    public_url
        .and_then(|u| reqwest::Url::parse(u).ok())
        .is_some_and(|u| {
            u.host_str().map(normalize) == Some(normalize(ohost))
                && u.port_or_known_default() == oport
                && u.scheme() == o.scheme()
        })
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .is_some_and(|m| {
            m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
        })
}

pub async fn check(State(guard): State<Arc<BrowserGuard>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let probe = path == "/health" || path == "/health-check";
    let authority = request_authority(&req);
    if !probe {
        if let Some(a) = &authority {
            let (host, _) = split_authority(a);
            if !guard.hosts.allows(host) {
                return forbidden(format!(
                    "Host: {host:?} is not a name this server answers to (a page rebinding \
                     its own name to this address would send it). Allow it with \
                     --allowed-host {host} (HEARTH_ALLOWED_HOSTS) or --public-url"
                ));
            }
        }
    }
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !safe {
        let headers = req.headers();
        let cross_site = headers
            .get("sec-fetch-site")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"));
        if cross_site {
            return forbidden(
                "Sec-Fetch-Site: cross-site: a page of another site cannot change anything here"
                    .into(),
            );
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let origin = String::from_utf8_lossy(origin.as_bytes());
            if !same_origin(&origin, authority.as_deref(), guard.public_url.as_deref()) {
                return forbidden(format!(
                    "Origin: {origin:?} is not this server: a page of another origin cannot \
                     change anything here"
                ));
            }
        }
        let has_body = !(req.body().is_end_stream() || req.body().size_hint().exact() == Some(0));
        let json_route = matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH)
            && path != "/v1/files";
        if json_route && has_body && !is_json(headers) {
            let given = headers
                .get(header::CONTENT_TYPE)
                .map(|v| format!("{:?}", String::from_utf8_lossy(v.as_bytes())))
                .unwrap_or_else(|| "none".into());
            return ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Unsupported media type",
                format!("Content-Type: expected application/json for a request body, got {given}"),
            )
            .into_response();
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allowed: &[&str], public: Option<&str>) -> HostPolicy {
        let mut cfg = ServerConfig::new("127.0.0.1:0".parse().unwrap(), "/tmp".into());
        cfg.allowed_hosts = allowed.iter().map(|s| s.to_string()).collect();
        cfg.public_url = public.map(str::to_string);
        HostPolicy::new(&cfg)
    }

    #[test]
    fn hosts_loopback_literals_public_url_and_the_allowed_list() {
        let p = policy(
            &["hearth.internal", ".svc.cluster.local"],
            Some("https://ai.example.com/"),
        );
        for ok in [
            "localhost",
            "LOCALHOST.",
            "app.localhost",
            "127.0.0.1",
            "10.1.2.3",
            "[::1]",
            "ai.example.com",
            "hearth.internal",
            "hearth.ns.svc.cluster.local",
            "svc.cluster.local",
        ] {
            assert!(p.allows(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "example.com",
            "localhost.evil.com",
            "xsvc.cluster.local",
            "",
        ] {
            assert!(!p.allows(bad), "{bad}");
        }
        assert!(policy(&["*"], None).allows("anything.at.all"));
    }

    #[test]
    fn origins_match_the_host_or_the_public_url() {
        assert!(same_origin(
            "http://127.0.0.1:8080",
            Some("127.0.0.1:8080"),
            None
        ));
        assert!(same_origin(
            "https://ai.example.com",
            Some("ai.example.com"),
            None
        ));
        assert!(!same_origin(
            "http://127.0.0.1:9999",
            Some("127.0.0.1:8080"),
            None
        ));
        assert!(!same_origin(
            "http://evil.example",
            Some("127.0.0.1:8080"),
            None
        ));
        assert!(!same_origin("null", Some("127.0.0.1:8080"), None));
        assert!(same_origin(
            "https://ai.example.com",
            Some("10.0.0.5:8080"),
            Some("https://ai.example.com")
        ));
        assert_eq!(split_authority("[::1]:8080"), ("[::1]", Some(8080)));
        assert_eq!(split_authority("host"), ("host", None));
    }
}
