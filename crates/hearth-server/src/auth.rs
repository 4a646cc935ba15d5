//! API tokens: `Authorization: Bearer T` or Replicate's older `Token T`. Tokens are
//! kept as SHA-256 digests and compared in constant time against every one, so
//! neither timing nor length says how close a guess was.
//!
//! A list of tokens (`HEARTH_API_TOKEN`, `--api-token`) is split on whitespace, which
//! cannot occur in a token; a token file has one per line. A token must be visible
//! ASCII (what an `Authorization` header can carry), checked at startup.

use axum::http::{header, HeaderMap};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The tokens in a whitespace-separated list (spaces, tabs, newlines).
pub fn split_tokens(list: &str) -> Vec<String> {
    list.split_whitespace().map(str::to_string).collect()
}

/// The tokens in a token file: one a line; blank lines and lines starting with `#`
/// skipped. A line is taken whole (a space inside it makes it invalid, never two).
pub fn file_tokens(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

/// Why a token cannot be used: empty, or a character an `Authorization` header cannot
/// carry as part of a token (anything but visible ASCII). Never says the token.
pub fn check_token(token: &str) -> Result<(), &'static str> {
    if token.is_empty() {
        return Err("is empty");
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("contains a character other than visible ASCII (a space, a control character or non-ASCII), which an Authorization header cannot carry");
    }
    Ok(())
}

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

    #[test]
    fn lists_split_on_whitespace_only_and_files_by_line() {
        use super::{check_token, file_tokens, split_tokens};
        assert_eq!(split_tokens("ab,cd"), vec!["ab,cd"]);
        assert_eq!(split_tokens(" a\tb\n c "), vec!["a", "b", "c"]);
        assert_eq!(
            file_tokens("# ops\nfirst,one\n\n  second  \nthird token\n"),
            vec!["first,one", "second", "third token"]
        );
        assert!(check_token("first,one").is_ok());
        assert!(check_token("third token").is_err());
        assert!(check_token("caf\u{e9}").is_err());
        assert!(check_token("a\u{7f}").is_err());
        assert!(check_token("").is_err());
    }
}
