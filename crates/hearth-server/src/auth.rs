//! API tokens: `Authorization: Bearer T` or Replicate's older `Token T`. Tokens are
//! kept as SHA-256 digests and compared in constant time against every one, so
//! neither timing nor length says how close a guess was.

use axum::http::{header, HeaderMap};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub struct Auth {
    digests: Vec<[u8; 32]>,
}

impl Auth {
    pub fn new(tokens: &[String]) -> Self {
        Self {
            digests: tokens
                .iter()
                .map(|t| Sha256::digest(t.trim().as_bytes()).into())
                .collect(),
        }
    }

    /// No tokens configured: every request is accepted.
    pub fn is_open(&self) -> bool {
        self.digests.is_empty()
    }

    pub fn accepts(&self, headers: &HeaderMap) -> bool {
        if self.is_open() {
            return true;
        }
        let Some(presented) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("Token "))
            })
        else {
            return false;
        };
        let d: [u8; 32] = Sha256::digest(presented.trim().as_bytes()).into();
        // Every configured token is compared, match or not.
        self.digests
            .iter()
            .fold(subtle::Choice::from(0), |acc, k| acc | k.ct_eq(&d))
            .into()
    }
}

#[cfg(test)]
mod tests {
    use super::Auth;
    use axum::http::HeaderMap;

    fn h(v: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert("authorization", v.parse().unwrap());
        m
    }

    #[test]
    fn bearer_and_token_schemes_and_only_configured_tokens() {
        let a = Auth::new(&["alpha".into(), "beta".into()]);
        assert!(a.accepts(&h("Bearer alpha")));
        assert!(a.accepts(&h("Token beta")));
        assert!(!a.accepts(&h("Bearer alph")));
        assert!(!a.accepts(&h("Bearer alphaa")));
        assert!(!a.accepts(&h("Basic alpha")));
        assert!(!a.accepts(&HeaderMap::new()));
        assert!(Auth::new(&[]).accepts(&HeaderMap::new()));
    }
}
