//! Shared-secret authentication of rendezvous connections: HMAC-SHA256 challenge-response in
//! both directions. The token itself never crosses the wire.
//!
//! The client sends a fresh nonce in its hello; the server answers with its own nonce and a
//! proof `HMAC(token, "dtrain-server-v1" | client_nonce | server_nonce | hello)`; the client
//! checks it and answers `HMAC(token, "dtrain-client-v1" | server_nonce | client_nonce | hello)`.
//! Fresh nonces on both sides defeat replay; covering the hello bytes binds the rank, world
//! size and config hash to the proof.

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const NONCE_LEN: usize = 32;
pub const PROOF_LEN: usize = 32;

type HmacSha256 = Hmac<Sha256>;

fn mac(token: &str, label: &[u8], first: &[u8], second: &[u8], hello: &[u8]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(token.as_bytes()).expect("HMAC accepts any key length");
    m.update(label);
    m.update(first);
    m.update(second);
    m.update(hello);
    m
}

pub fn server_proof(
    token: &str,
    client_nonce: &[u8],
    server_nonce: &[u8],
    hello: &[u8],
) -> [u8; PROOF_LEN] {
    mac(
        token,
        b"dtrain-server-v1",
        client_nonce,
        server_nonce,
        hello,
    )
    .finalize()
    .into_bytes()
    .into()
}

pub fn client_proof(
    token: &str,
    server_nonce: &[u8],
    client_nonce: &[u8],
    hello: &[u8],
) -> [u8; PROOF_LEN] {
    mac(
        token,
        b"dtrain-client-v1",
        server_nonce,
        client_nonce,
        hello,
    )
    .finalize()
    .into_bytes()
    .into()
}

/// Constant-time check of a server proof.
pub fn verify_server_proof(
    token: &str,
    client_nonce: &[u8],
    server_nonce: &[u8],
    hello: &[u8],
    proof: &[u8],
) -> bool {
    mac(
        token,
        b"dtrain-server-v1",
        client_nonce,
        server_nonce,
        hello,
    )
    .verify_slice(proof)
    .is_ok()
}

/// Constant-time check of a client proof.
pub fn verify_client_proof(
    token: &str,
    server_nonce: &[u8],
    client_nonce: &[u8],
    hello: &[u8],
    proof: &[u8],
) -> bool {
    mac(
        token,
        b"dtrain-client-v1",
        server_nonce,
        client_nonce,
        hello,
    )
    .verify_slice(proof)
    .is_ok()
}

pub fn nonce() -> [u8; NONCE_LEN] {
    use rand::RngCore;
    let mut n = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_verify_only_with_the_same_token_and_direction() {
        let (cn, sn, hello) = (nonce(), nonce(), b"hello bytes".to_vec());
        let sp = server_proof("secret", &cn, &sn, &hello);
        assert!(verify_server_proof("secret", &cn, &sn, &hello, &sp));
        assert!(!verify_server_proof("Secret", &cn, &sn, &hello, &sp));
        assert!(!verify_server_proof(
            "secret",
            &cn,
            &sn,
            b"other hello",
            &sp
        ));
        // A server proof is not a valid client proof (direction label differs).
        assert!(!verify_client_proof("secret", &cn, &sn, &hello, &sp));
        let cp = client_proof("secret", &sn, &cn, &hello);
        assert!(verify_client_proof("secret", &sn, &cn, &hello, &cp));
        assert_ne!(cp, sp);
        assert_ne!(nonce(), nonce());
    }

    #[test]
    fn hmac_matches_rfc4231_test_case_2() {
        // RFC 4231, test case 2: key "Jefe", data "what do ya want for nothing?".
        let mut m = HmacSha256::new_from_slice(b"Jefe").unwrap();
        m.update(b"what do ya want for nothing?");
        let hex: String = m
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
