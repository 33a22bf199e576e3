//! SPIFFE IDs, parsed and validated per the SPIFFE ID specification; never a bare string.
//! Workload identities have the path `/ns/<namespace>/sa/<service-account>`.

use std::fmt;

/// The longest SPIFFE ID accepted, in bytes (SPIFFE ID spec, §2.3).
pub const MAX_LEN: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    path: String,
}

/// Why a string is not a (workload) SPIFFE ID. Bounded: these become metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    #[error("empty")]
    Empty,
    #[error("longer than 2048 bytes")]
    TooLong,
    #[error("scheme is not spiffe://")]
    WrongScheme,
    #[error("trust domain is empty")]
    EmptyTrustDomain,
    #[error("trust domain has a character other than a-z 0-9 . - _")]
    BadTrustDomainChar,
    #[error("has a port")]
    Port,
    #[error("has user info")]
    UserInfo,
    #[error("has a query")]
    Query,
    #[error("has a fragment")]
    Fragment,
    #[error("path has an empty segment")]
    EmptySegment,
    #[error("path has a '.' or '..' segment")]
    DotSegment,
    #[error("path has a character other than a-z A-Z 0-9 . - _")]
    BadPathChar,
    #[error("path ends with '/'")]
    TrailingSlash,
    #[error("path is not /ns/<namespace>/sa/<service-account>")]
    NotWorkload,
}

impl SpiffeError {
    /// A bounded label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            SpiffeError::Empty => "empty",
            SpiffeError::TooLong => "too_long",
            SpiffeError::WrongScheme => "wrong_scheme",
            SpiffeError::EmptyTrustDomain => "empty_trust_domain",
            SpiffeError::BadTrustDomainChar => "bad_trust_domain_char",
            SpiffeError::Port => "port",
            SpiffeError::UserInfo => "userinfo",
            SpiffeError::Query => "query",
            SpiffeError::Fragment => "fragment",
            SpiffeError::EmptySegment => "empty_segment",
            SpiffeError::DotSegment => "dot_segment",
            SpiffeError::BadPathChar => "bad_path_char",
            SpiffeError::TrailingSlash => "trailing_slash",
            SpiffeError::NotWorkload => "not_workload",
        }
    }
}

impl SpiffeId {
    /// Parses any SPIFFE ID (trust domain and optional path).
    pub fn parse(s: &str) -> Result<SpiffeId, SpiffeError> {
        if s.is_empty() {
            return Err(SpiffeError::Empty);
        }
        if s.len() > MAX_LEN {
            return Err(SpiffeError::TooLong);
        }
        let rest = s.strip_prefix("spiffe://").ok_or(SpiffeError::WrongScheme)?;
        if rest.contains('#') {
            return Err(SpiffeError::Fragment);
        }
        if rest.contains('?') {
            return Err(SpiffeError::Query);
        }
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if td.contains('@') {
            return Err(SpiffeError::UserInfo);
        }
        if td.contains(':') {
            return Err(SpiffeError::Port);
        }
        if td.is_empty() {
            return Err(SpiffeError::EmptyTrustDomain);
        }
        if !td.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b)) {
            return Err(SpiffeError::BadTrustDomainChar);
        }
        if !path.is_empty() {
            if path.ends_with('/') {
                return Err(SpiffeError::TrailingSlash);
            }
            for seg in path[1..].split('/') {
                if seg.is_empty() {
                    return Err(SpiffeError::EmptySegment);
                }
                if seg == "." || seg == ".." {
                    return Err(SpiffeError::DotSegment);
                }
                if !seg.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) {
                    return Err(SpiffeError::BadPathChar);
                }
            }
        }
        Ok(SpiffeId { trust_domain: td.to_owned(), path: path.to_owned() })
    }

    /// Parses a workload identity: a SPIFFE ID whose path is `/ns/<ns>/sa/<sa>`.
    pub fn parse_workload(s: &str) -> Result<SpiffeId, SpiffeError> {
        let id = Self::parse(s)?;
        id.workload_parts().ok_or(SpiffeError::NotWorkload)?;
        Ok(id)
    }

    pub fn workload(trust_domain: &str, namespace: &str, service_account: &str) -> Result<SpiffeId, SpiffeError> {
        Self::parse_workload(&format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"))
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// (namespace, service account) of a workload identity.
    pub fn workload_parts(&self) -> Option<(&str, &str)> {
        let mut it = self.path.strip_prefix('/')?.split('/');
        match (it.next(), it.next(), it.next(), it.next(), it.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = SpiffeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_workload_ids_parse_and_round_trip() {
        let id = SpiffeId::parse_workload("spiffe://cluster.local/ns/default/sa/web").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.workload_parts(), Some(("default", "web")));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
        // A '.' inside a name is a literal character.
        let dotted = SpiffeId::parse_workload("spiffe://td/ns/a/sa/my.sa").unwrap();
        assert_eq!(dotted.workload_parts(), Some(("a", "my.sa")));
    }

    #[test]
    fn malformed_ids_are_refused_with_their_reason() {
        let long = format!("spiffe://td/ns/a/sa/{}", "x".repeat(2048));
        let cases: &[(&str, SpiffeError)] = &[
            ("", SpiffeError::Empty),
            (&long, SpiffeError::TooLong),
            ("https://td/ns/a/sa/b", SpiffeError::WrongScheme),
            ("SPIFFE://td/ns/a/sa/b", SpiffeError::WrongScheme),
            ("spiffe://td:8080/ns/a/sa/b", SpiffeError::Port),
            ("spiffe://user@td/ns/a/sa/b", SpiffeError::UserInfo),
            ("spiffe://td/ns/a/sa/b?x=1", SpiffeError::Query),
            ("spiffe://td/ns/a/sa/b#frag", SpiffeError::Fragment),
            ("spiffe:///ns/a/sa/b", SpiffeError::EmptyTrustDomain),
            ("spiffe://TD/ns/a/sa/b", SpiffeError::BadTrustDomainChar),
            ("spiffe://td/ns//sa/b", SpiffeError::EmptySegment),
            ("spiffe://td/ns/../sa/b", SpiffeError::DotSegment),
            ("spiffe://td/ns/a/sa/b%20", SpiffeError::BadPathChar),
            ("spiffe://td/ns/a/sa/b/", SpiffeError::TrailingSlash),
            ("spiffe://td/ns/a/sa", SpiffeError::NotWorkload),
            ("spiffe://td/ns/a/sa/b/c", SpiffeError::NotWorkload),
            ("spiffe://td", SpiffeError::NotWorkload),
        ];
        for (s, want) in cases {
            assert_eq!(SpiffeId::parse_workload(s), Err(*want), "{s:?}");
        }
    }
}
