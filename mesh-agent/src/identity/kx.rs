//! X25519 for the HBONE handshakes, computed by aws-lc instead of ring: every fresh tunnel
//! costs each agent one X25519 key generation and one agreement, and aws-lc's implementation
//! takes less than half of ring's portable one. Only the key exchange comes from aws-lc; the
//! rest of the TLS provider stays ring, and rustls' own aws-lc provider is deliberately not
//! enabled (with two providers compiled in, code that builds TLS configurations without naming
//! one panics). docs/decisions/0005-x25519-from-aws-lc.md has the measurements.

use rustls::crypto::{ActiveKeyExchange, SharedSecret, SupportedKxGroup};
use rustls::{Error, NamedGroup, PeerMisbehaved};

use aws_lc_rs::agreement;

/// Ephemeral X25519 (RFC 7748), as rustls' `X25519` group.
pub static X25519: &dyn SupportedKxGroup = &X25519Group;

#[derive(Debug)]
struct X25519Group;

impl SupportedKxGroup for X25519Group {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let priv_key = agreement::EphemeralPrivateKey::generate(&agreement::X25519, &rng)
            .map_err(|_| Error::FailedToGetRandomBytes)?;
        let pub_key = priv_key.compute_public_key().map_err(|_| Error::FailedToGetRandomBytes)?;
        Ok(Box::new(Exchange { priv_key, pub_key }))
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

struct Exchange {
    priv_key: agreement::EphemeralPrivateKey,
    pub_key: agreement::PublicKey,
}

impl ActiveKeyExchange for Exchange {
    fn complete(self: Box<Self>, peer: &[u8]) -> Result<SharedSecret, Error> {
        // TLS 1.3 allows exactly the 32-byte encoding. aws-lc refuses a peer key that gives
        // the all-zero secret (a low-order point), as RFC 7748 section 6.1 recommends.
        if peer.len() != 32 {
            return Err(PeerMisbehaved::InvalidKeyShare.into());
        }
        let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, peer);
        agreement::agree_ephemeral(self.priv_key, peer, Error::from(PeerMisbehaved::InvalidKeyShare), |secret| {
            Ok(SharedSecret::from(secret))
        })
    }

    fn pub_key(&self) -> &[u8] {
        self.pub_key.as_ref()
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ends derive the same secret, whichever implementation each end uses.
    #[test]
    fn agrees_with_rings_x25519() {
        let ring = rustls::crypto::ring::kx_group::X25519;
        for (a, b) in [(X25519, ring), (ring, X25519), (X25519, X25519)] {
            let ka = a.start().unwrap();
            let kb = b.start().unwrap();
            let (pa, pb) = (ka.pub_key().to_vec(), kb.pub_key().to_vec());
            assert_eq!(pa.len(), 32);
            let sa = ka.complete(&pb).unwrap();
            let sb = kb.complete(&pa).unwrap();
            assert_eq!(sa.secret_bytes(), sb.secret_bytes());
            assert_ne!(sa.secret_bytes(), &[0u8; 32][..]);
        }
        // Fresh keys each time.
        assert_ne!(X25519.start().unwrap().pub_key(), X25519.start().unwrap().pub_key());
    }

    #[test]
    fn refuses_malformed_and_low_order_peer_keys() {
        for bad in [&[9u8; 31][..], &[9u8; 33][..], &[][..]] {
            assert!(X25519.start().unwrap().complete(bad).is_err(), "length {}", bad.len());
        }
        // Small-order points (u = 0, u = 1) give the all-zero secret.
        let zero = [0u8; 32];
        let mut order4 = [0u8; 32];
        order4[0] = 1;
        for low in [zero, order4] {
            assert!(X25519.start().unwrap().complete(&low).is_err());
        }
    }
}
