//! The accept loop: hyper connections with a header-read timeout, caps on open
//! connections (in all, and per client address), an idle timeout and a maximum age
//! per connection (HTTP/1 and HTTP/2 alike: past either the connection is shut down
//! gracefully, its responses in progress finishing), and graceful shutdown that the
//! caller can bound.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http::Request;
use axum::response::Response;
use axum::Router;
use futures_util::future::BoxFuture;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::ServerConfig;

/// The peer of the connection a request came on (a request extension).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// The open connections, to shut down together.
pub struct Connections {
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl Connections {
    /// Asks every connection to finish what it is answering and close; returns once
    /// all have.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Open connections per client (`client_of` its address).
#[derive(Default)]
struct PerAddress(Mutex<HashMap<IpAddr, usize>>);

/// The client an address is counted as: an IPv4 address itself (also when it comes
/// IPv4-mapped), an IPv6 address its /64. One host or site is handed a whole /64 and
/// picks addresses in it freely, so counting exact IPv6 addresses would let one
/// client open connections without limit.
pub fn client_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// One connection counted against its address until dropped.
struct AddressSlot {
    table: Arc<PerAddress>,
    ip: IpAddr,
}

impl PerAddress {
    fn take(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<AddressSlot> {
        let ip = client_of(ip);
        let mut m = self.0.lock().ok()?;
        let n = m.entry(ip).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            table: self.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        if let Ok(mut m) = self.table.0.lock() {
            if let Some(n) = m.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&self.ip);
                }
            }
        }
    }
}

/// Requests a connection is handling, and when it last started or answered one.
struct Activity {
    busy: AtomicUsize,
    last: Mutex<Instant>,
}

impl Activity {
    fn touch(&self) {
        if let Ok(mut t) = self.last.lock() {
            *t = Instant::now();
        }
    }

    /// Completes once the connection has handled nothing for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let since = self.last.lock().map(|t| t.elapsed()).unwrap_or_default();
            if self.busy.load(Ordering::SeqCst) == 0 && since >= idle {
                return;
            }
            let wait = if self.busy.load(Ordering::SeqCst) > 0 {
                idle
            } else {
                idle - since
            };
            tokio::time::sleep(wait.max(Duration::from_millis(50))).await;
        }
    }
}

/// A request in a connection's count until its response (head) is ready. A response
/// body still streaming (SSE) does not keep the connection from counting as idle:
/// a graceful shutdown lets it finish.
struct Busy(Arc<Activity>);

impl Busy {
    fn new(a: &Arc<Activity>) -> Self {
        a.busy.fetch_add(1, Ordering::SeqCst);
        a.touch();
        Busy(a.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The router, counting a connection's requests and telling them their peer.
#[derive(Clone)]
struct Tracked {
    app: Router,
    activity: Arc<Activity>,
    peer: SocketAddr,
}

impl<B> tower::Service<Request<B>> for Tracked
where
    B: axum::body::HttpBody<Data = axum::body::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let busy = Busy::new(&self.activity);
        req.extensions_mut().insert(ClientAddr(self.peer));
        let answer = self.app.clone().oneshot(req.map(axum::body::Body::new));
        Box::pin(async move {
            let r = answer.await;
            drop(busy);
            r
        })
    }
}

/// Accepts connections until `stop` is cancelled; returns the handle that shuts the
/// open ones down gracefully.
pub async fn accept_until(
    listener: TcpListener,
    app: Router,
    cfg: &ServerConfig,
    stop: CancellationToken,
) -> Connections {
    let connections = Connections {
        stop: CancellationToken::new(),
        tracker: TaskTracker::new(),
    };
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let per_address = Arc::new(PerAddress::default());
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        // A peer that does not answer a ping within this is gone: closed (a graceful
        // shutdown waits on a ping too, so this also bounds a peer that never answers).
        .keep_alive_timeout(Duration::from_secs(20));
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off, do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse(
                stream,
                "503 Service Unavailable",
                format!(
                    "too many open connections (--max-connections {}); retry shortly",
                    cfg.max_connections
                ),
            ));
            continue;
        };
        let Some(slot) = per_address.take(peer.ip(), cfg.max_connections_per_ip) else {
            tokio::spawn(refuse(
                stream,
                "429 Too Many Requests",
                format!(
                    "too many open connections from {} (--max-connections-per-ip {}, an \
                     IPv6 /64 counting as one address); reuse the open ones or retry shortly",
                    peer.ip(),
                    cfg.max_connections_per_ip
                ),
            ));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity {
            busy: AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
        });
        let service = TowerToHyperService::new(Tracked {
            app: app.clone(),
            activity: activity.clone(),
            peer,
        });
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let (idle, max_age) = (cfg.idle_timeout, cfg.max_connection_age);
        let closing_all = connections.stop.clone();
        connections.tracker.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let age = tokio::time::sleep(max_age);
            let mut age = std::pin::pin!(age);
            let mut closing = false;
            loop {
                tokio::select! {
                    _ = conn.as_mut() => break,
                    _ = closing_all.cancelled(), if !closing => {}
                    _ = &mut age, if !closing => {}
                    _ = activity.idle_for(idle), if !closing => {}
                }
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            drop(slot);
            drop(permit);
        });
    }
    connections
}

/// A connection past a cap: the status with `Retry-After`, then close.
async fn refuse(mut stream: TcpStream, status: &str, detail: String) {
    let code: u16 = status[..3].parse().unwrap_or(503);
    let body = serde_json::json!({
        "title": &status[4..],
        "detail": detail,
        "status": code,
    })
    .to_string();
    let msg = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/problem+json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = stream.write_all(msg.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::sync::Arc;

    use super::{client_of, PerAddress};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_ipv6_64_is_one_client_and_ipv4_is_per_address() {
        assert_eq!(client_of(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            client_of(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            client_of(ip("2001:db8:1:2::1"))
        );
        assert_ne!(
            client_of(ip("2001:db8:1:3::1")),
            client_of(ip("2001:db8:1:2::1"))
        );
        assert_eq!(client_of(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(client_of(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_ne!(client_of(ip("192.0.2.8")), client_of(ip("192.0.2.7")));
    }

    #[test]
    fn addresses_of_one_64_share_the_cap() {
        let table = Arc::new(PerAddress::default());
        let a = table.take(ip("2001:db8::1"), 2).unwrap();
        let _b = table.take(ip("2001:db8::2"), 2).unwrap();
        assert!(
            table.take(ip("2001:db8::3"), 2).is_none(),
            "a third address of the /64"
        );
        assert!(
            table.take(ip("2001:db8:0:1::1"), 2).is_some(),
            "another /64"
        );
        drop(a);
        assert!(
            table.take(ip("2001:db8::3"), 2).is_some(),
            "a slot came free"
        );
    }
}
