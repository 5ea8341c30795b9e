//! Shared-secret authentication of rendezvous connections: HMAC-SHA256 challenge-response in
//! both directions. The token itself never crosses the wire.
//!
//! The client sends a fresh nonce in its hello; the server answers with its own nonce and a
//! proof `HMAC(token, "dtrain-server-v1" | client_nonce | server_nonce | hello)`; the client
//! checks it and answers `HMAC(token, "dtrain-client-v1" | server_nonce | client_nonce | hello)`.
//! Fresh nonces on both sides defeat replay; covering the hello bytes binds the rank, world
//! size and config hash to the proof.
//!
//! The data plane (TCP connections between ranks after rendezvous) uses the same HMAC with a
//! per-job key ([`data_key`] from the token and the job id, or a random key rank 0 hands out
//! when there is no token): `HMAC(key, label | connector nonce | acceptor nonce | connector
//! rank | acceptor rank)`, one label per direction (see `rendezvous/data_plane.rs`).

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const NONCE_LEN: usize = 32;
pub const PROOF_LEN: usize = 32;

type HmacSha256 = Hmac<Sha256>;

fn mac(key: &[u8], label: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC accepts any key length");
    m.update(label);
    for part in parts {
        m.update(part);
    }
    m
}

pub fn server_proof(
    token: &str,
    client_nonce: &[u8],
    server_nonce: &[u8],
    hello: &[u8],
) -> [u8; PROOF_LEN] {
    mac(
        token.as_bytes(),
        b"dtrain-server-v1",
        &[client_nonce, server_nonce, hello],
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
        token.as_bytes(),
        b"dtrain-client-v1",
        &[server_nonce, client_nonce, hello],
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
        token.as_bytes(),
        b"dtrain-server-v1",
        &[client_nonce, server_nonce, hello],
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
        token.as_bytes(),
        b"dtrain-client-v1",
        &[server_nonce, client_nonce, hello],
    )
    .verify_slice(proof)
    .is_ok()
}

pub const KEY_LEN: usize = 32;
/// A job's data-plane key.
pub type DataKey = [u8; KEY_LEN];

/// The data-plane key every rank of job `job_id` derives from the shared token (never sent).
pub fn data_key(token: &str, job_id: &str) -> DataKey {
    mac(
        token.as_bytes(),
        b"dtrain-data-key-v1",
        &[job_id.as_bytes()],
    )
    .finalize()
    .into_bytes()
    .into()
}

/// Which side of a data connection a proof comes from (the label keeps one side's proof from
/// passing as the other's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataRole {
    /// The rank that listened and accepted (the lower mesh rank).
    Acceptor,
    /// The rank that connected (the higher mesh rank).
    Connector,
}

fn data_mac(
    key: &DataKey,
    role: DataRole,
    connector_nonce: &[u8],
    acceptor_nonce: &[u8],
    connector: usize,
    acceptor: usize,
) -> HmacSha256 {
    let label: &[u8] = match role {
        DataRole::Acceptor => b"dtrain-data-acceptor-v1",
        DataRole::Connector => b"dtrain-data-connector-v1",
    };
    let (c, a) = (
        (connector as u64).to_le_bytes(),
        (acceptor as u64).to_le_bytes(),
    );
    mac(key, label, &[connector_nonce, acceptor_nonce, &c, &a])
}

/// `role`'s proof on the data connection from mesh rank `connector` to `acceptor`.
pub fn data_proof(
    key: &DataKey,
    role: DataRole,
    connector_nonce: &[u8],
    acceptor_nonce: &[u8],
    connector: usize,
    acceptor: usize,
) -> [u8; PROOF_LEN] {
    data_mac(
        key,
        role,
        connector_nonce,
        acceptor_nonce,
        connector,
        acceptor,
    )
    .finalize()
    .into_bytes()
    .into()
}

/// Constant-time check of a [`data_proof`].
pub fn verify_data_proof(
    key: &DataKey,
    role: DataRole,
    (connector_nonce, acceptor_nonce): (&[u8], &[u8]),
    (connector, acceptor): (usize, usize),
    proof: &[u8],
) -> bool {
    data_mac(
        key,
        role,
        connector_nonce,
        acceptor_nonce,
        connector,
        acceptor,
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
    fn data_proofs_bind_key_nonces_ranks_and_direction() {
        let key = data_key("secret", "job-a");
        assert_ne!(key, data_key("secret", "job-b"));
        assert_ne!(key, data_key("Secret", "job-a"));
        let (cn, an) = (nonce(), nonce());
        let p = data_proof(&key, DataRole::Connector, &cn, &an, 2, 0);
        let ok = |k: &DataKey, role, nonces, ranks| verify_data_proof(k, role, nonces, ranks, &p);
        assert!(ok(&key, DataRole::Connector, (&cn, &an), (2, 0)));
        assert!(!ok(&key, DataRole::Acceptor, (&cn, &an), (2, 0)));
        assert!(!ok(&key, DataRole::Connector, (&an, &cn), (2, 0)));
        let other = nonce();
        assert!(!ok(&key, DataRole::Connector, (&cn, &other), (2, 0)));
        assert!(!ok(&key, DataRole::Connector, (&cn, &an), (1, 0)));
        assert!(!ok(
            &data_key("secret", "job-b"),
            DataRole::Connector,
            (&cn, &an),
            (2, 0)
        ));
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
