//! What a rank needs to join a job: [`CommConfig`] (with [`TransportKind`] and, for torchrun's
//! agent store, [`StoreRendezvous`]). A leaf below the communicator and the rendezvous, so
//! both read the same settings without importing each other.

use crate::backend::Timeouts;

/// Which backend to use between ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportKind {
    /// Shared memory when all ranks are on one host; with several hosts, shared memory within
    /// each host and TCP between host leaders (`"shm+tcp"`) if some host runs several ranks,
    /// plain TCP if none does.
    Auto,
    /// Shared memory; an error unless all ranks share a host.
    Shm,
    /// TCP full mesh, also between ranks of one host.
    Tcp,
}

/// Everything a rank needs to join a job.
#[derive(Clone, Debug)]
pub struct CommConfig {
    /// Host name or IP of rank 0 (rank 0 binds its rendezvous port on this address).
    pub master_addr: String,
    /// Rendezvous port on the master (default 29500).
    pub master_port: u16,
    pub rank: usize,
    pub world_size: usize,
    pub transport: TransportKind,
    /// Digest of the job configuration; ranks with a different value are rejected.
    pub config_hash: u64,
    /// Shared secret (the caller passes `DTRAIN_AUTH_TOKEN`); `Some` on every rank or none.
    pub auth_token: Option<String>,
    pub timeouts: Timeouts,
    /// Find rank 0 through this TCPStore (torchrun's agent store) instead of rank 0 binding
    /// `master_addr:master_port`; `None` (the default) for the classic rendezvous.
    pub store: Option<StoreRendezvous>,
}

impl CommConfig {
    /// Defaults: `TransportKind::Auto`, config hash 0, no auth token, `Timeouts::default()`,
    /// no store.
    pub fn new(
        master_addr: impl Into<String>,
        master_port: u16,
        rank: usize,
        world_size: usize,
    ) -> Self {
        CommConfig {
            master_addr: master_addr.into(),
            master_port,
            rank,
            world_size,
            transport: TransportKind::Auto,
            config_hash: 0,
            auth_token: None,
            timeouts: Timeouts::default(),
            store: None,
        }
    }
}

/// Where the ranks of a job meet: a TCPStore and a key prefix unique to this attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreRendezvous {
    /// The store's host (torchrun: `MASTER_ADDR`).
    pub host: String,
    /// The store's port (torchrun: `MASTER_PORT`).
    pub port: u16,
    /// Prefix of every key this job writes, e.g. from [`torchelastic_prefix`].
    pub prefix: String,
}

/// `dtrain/<run id>/attempt_<restart count>`: keys of one attempt of one torchrun job.
pub fn torchelastic_prefix(run_id: &str, restart_count: u64) -> String {
    format!("dtrain/{run_id}/attempt_{restart_count}")
}

/// The store rendezvous torchrun asks for, from its worker environment: `Ok(None)` unless
/// `TORCHELASTIC_USE_AGENT_STORE=True` (then `MASTER_ADDR:MASTER_PORT` is free for rank 0 to
/// bind, as without torchrun). Errors name the variable that is missing or malformed.
pub fn torchelastic_store(
    env: &dyn Fn(&str) -> Option<String>,
) -> std::result::Result<Option<StoreRendezvous>, String> {
    if env("TORCHELASTIC_USE_AGENT_STORE").as_deref() != Some("True") {
        return Ok(None);
    }
    let need = |name: &str| {
        env(name)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("TORCHELASTIC_USE_AGENT_STORE=True but {name} is not set"))
    };
    let host = need("MASTER_ADDR")?;
    let port_text = need("MASTER_PORT")?;
    let port = port_text
        .parse::<u16>()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| {
            format!("environment variable MASTER_PORT={port_text:?} is not a port number")
        })?;
    let run_id = need("TORCHELASTIC_RUN_ID")?;
    let restarts_text = need("TORCHELASTIC_RESTART_COUNT")?;
    let restarts = restarts_text.parse::<u64>().map_err(|_| {
        format!(
            "environment variable TORCHELASTIC_RESTART_COUNT={restarts_text:?} is not a non-negative integer"
        )
    })?;
    Ok(Some(StoreRendezvous {
        host,
        port,
        prefix: torchelastic_prefix(&run_id, restarts),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torchelastic_env_is_read_only_with_the_agent_store() {
        let env_of = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let full: &[(&str, &str)] = &[
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("MASTER_ADDR", "localhost"),
            ("MASTER_PORT", "38763"),
            ("TORCHELASTIC_RUN_ID", "5679"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
        ];
        assert_eq!(
            torchelastic_store(&env_of(full)),
            Ok(Some(StoreRendezvous {
                host: "localhost".into(),
                port: 38763,
                prefix: "dtrain/5679/attempt_2".into(),
            }))
        );
        assert_eq!(
            torchelastic_store(&env_of(&[("TORCHELASTIC_USE_AGENT_STORE", "False")])),
            Ok(None)
        );
        assert_eq!(torchelastic_store(&env_of(&[])), Ok(None));
        let no_count: &[(&str, &str)] = &full[..4];
        let err = torchelastic_store(&env_of(no_count)).unwrap_err();
        assert!(err.contains("TORCHELASTIC_RESTART_COUNT"), "{err}");
        let bad_port: &[(&str, &str)] = &[
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("MASTER_ADDR", "localhost"),
            ("MASTER_PORT", "70000"),
        ];
        let err = torchelastic_store(&env_of(bad_port)).unwrap_err();
        assert!(err.contains("MASTER_PORT=\"70000\""), "{err}");
    }
}
