//! Multi-node `dtrain launch` (torchrun's static multi-node form): the launchers of one job
//! meet in a TCPStore that node 0's launcher hosts at `--master-ip:--master-port`, as
//! torchrun's agents do, and their ranks meet there too (the store rendezvous of
//! [`transport::store`]).
//!
//! Every key lives under `dtrain-launch/`:
//! - `job`: node 0's layout (nodes, ranks per node, restarts) and the job's run id; the
//!   others check it against their own flags.
//! - `node/<k>`: the launcher that claimed node rank k (compare-set: a second claim fails).
//! - `heartbeat/<k>`: a counter each launcher's watcher thread raises every
//!   [`HEARTBEAT_EVERY`]; one that stops moving for [`LAUNCHER_LIVENESS`] is a lost host.
//! - `attempt_<a>/{ready,done,stopped}/<k>`: barriers of attempt a (start together; all
//!   ranks succeeded; all ranks of a failed attempt reaped).
//! - `attempt_<a>/failed` (first failure, compare-set) and `attempt_<a>/failure/<k>` (node
//!   k's failed rank): every launcher names the same root cause, preferring a rank killed by
//!   a signal (the others usually only report that it died).
//! - `abort`: a reason that ends the job on every node without restart (a signal, a lost
//!   host, mismatched flags). `exit/<k>`: node k has read what it needs; node 0 waits for
//!   these before its store goes away.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use transport::{StoreClient, StoreError, StoreServer};

use super::LaunchError;

const NS: &str = "dtrain-launch";
/// How often each launcher's watcher raises its heartbeat and looks at the others.
pub const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);
/// A launcher whose heartbeat has not moved for this long is gone (its host died, or it was
/// killed): the job stops on every other host.
pub const LAUNCHER_LIVENESS: Duration = Duration::from_secs(10);
/// Deadline of one store call.
const STORE_CALL: Duration = Duration::from_secs(10);
/// How often barriers look at the store.
const POLL: Duration = Duration::from_millis(50);
/// How long node 0 keeps its store up for the others to read the outcome.
const EXIT_LINGER: Duration = Duration::from_secs(10);

/// This launcher's place in the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeLayout {
    pub nnodes: usize,
    pub node_rank: usize,
    pub nproc_per_node: usize,
    pub max_restarts: u32,
}

impl NodeLayout {
    pub fn world_size(&self) -> usize {
        self.nnodes * self.nproc_per_node
    }

    /// Global rank of this node's local rank `local`.
    pub fn global_rank(&self, local: usize) -> usize {
        self.node_rank * self.nproc_per_node + local
    }
}

/// What node 0 publishes under `job`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct JobRecord {
    nnodes: usize,
    nproc_per_node: usize,
    max_restarts: u32,
    run_id: String,
}

impl JobRecord {
    fn encode(&self) -> Vec<u8> {
        format!(
            "v1 nnodes={} nproc-per-node={} max-restarts={} run-id={}",
            self.nnodes, self.nproc_per_node, self.max_restarts, self.run_id
        )
        .into_bytes()
    }

    fn decode(bytes: &[u8]) -> Result<JobRecord, String> {
        let text = String::from_utf8_lossy(bytes);
        let mut fields = text.split(' ');
        if fields.next() != Some("v1") {
            return Err(format!("not a dtrain launch job record: {text:?}"));
        }
        let mut get = |name: &str| -> Result<String, String> {
            fields
                .next()
                .and_then(|f| f.strip_prefix(name)?.strip_prefix('='))
                .map(str::to_string)
                .ok_or_else(|| format!("job record {text:?} has no {name}"))
        };
        let number = |v: String, name: &str| -> Result<usize, String> {
            v.parse()
                .map_err(|_| format!("job record: {name}={v:?} is not a number"))
        };
        Ok(JobRecord {
            nnodes: number(get("nnodes")?, "nnodes")?,
            nproc_per_node: number(get("nproc-per-node")?, "nproc-per-node")?,
            max_restarts: number(get("max-restarts")?, "max-restarts")? as u32,
            run_id: get("run-id")?,
        })
    }
}

/// A failed rank as one launcher saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeFailure {
    /// Global rank.
    pub rank: usize,
    pub node: usize,
    /// The launcher's exit code for it (the rank's code, or 128 + signal).
    pub exit_code: u8,
    pub by_signal: bool,
    /// e.g. `exit status 1`, `signal 9 (SIGKILL)`.
    pub status: String,
}

impl NodeFailure {
    fn encode(&self) -> Vec<u8> {
        format!(
            "v1\n{}\n{}\n{}\n{}\n{}",
            self.rank, self.node, self.exit_code, self.by_signal as u8, self.status
        )
        .into_bytes()
    }

    fn decode(bytes: &[u8]) -> Option<NodeFailure> {
        let text = String::from_utf8_lossy(bytes);
        let mut p = text.splitn(6, '\n');
        if p.next()? != "v1" {
            return None;
        }
        Some(NodeFailure {
            rank: p.next()?.parse().ok()?,
            node: p.next()?.parse().ok()?,
            exit_code: p.next()?.parse().ok()?,
            by_signal: p.next()? == "1",
            status: p.next()?.to_string(),
        })
    }

    /// `rank 3 (node 1) failed with signal 9 (SIGKILL)`.
    pub fn describe(&self) -> String {
        format!(
            "rank {} (node {}) failed with {}",
            self.rank, self.node, self.status
        )
    }
}

/// Why a launcher stops waiting for the others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Interrupt {
    /// A rank failed in this attempt (on any node).
    Failed,
    /// The job ends everywhere without restart; the text says why.
    Abort(String),
    /// This launcher got SIGINT/SIGTERM while waiting (the job was aborted everywhere).
    Signalled(nix::sys::signal::Signal),
}

/// What the watcher thread found; read by the launcher's supervision loop.
#[derive(Default)]
struct Watch {
    stop: AtomicBool,
    attempt: AtomicU32,
    /// Attempt in which some node published a failure.
    failed_attempt: Mutex<Option<u32>>,
    /// A reason to end the job (abort key, lost launcher, lost store).
    fatal: Mutex<Option<String>>,
}

impl Watch {
    fn set_fatal(&self, text: String) {
        let mut f = self.fatal.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            *f = Some(text);
        }
    }

    fn interrupt(&self, attempt: u32) -> Option<Interrupt> {
        if let Some(text) = self.fatal.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Some(Interrupt::Abort(text));
        }
        let failed = *self
            .failed_attempt
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        (failed == Some(attempt)).then_some(Interrupt::Failed)
    }
}

/// This launcher's membership in a multi-node job.
pub struct NodeGroup {
    pub layout: NodeLayout,
    /// The store's address, as the ranks get it (MASTER_ADDR, MASTER_PORT).
    pub store_host: String,
    pub store_port: u16,
    /// TORCHELASTIC_RUN_ID of the ranks: the same on every node, fresh per job.
    pub run_id: String,
    client: StoreClient,
    watch: Arc<Watch>,
    watcher: Option<JoinHandle<()>>,
    /// Node 0 hosts the store; declared last so it is dropped after the watcher stopped.
    server: Option<StoreServer>,
}

fn key(rest: &str) -> String {
    format!("{NS}/{rest}")
}

fn attempt_key(attempt: u32, rest: &str) -> String {
    format!("{NS}/attempt_{attempt}/{rest}")
}

fn store_err(e: StoreError) -> LaunchError {
    LaunchError::Io(format!("launcher coordination failed: {e}"))
}

fn host_name() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "?".into())
}

impl NodeGroup {
    /// Joins the job's launchers: node 0 binds the store at `host:port` and publishes the
    /// job; the others connect (retrying until `connect_timeout`) and check the job against
    /// their own layout; every launcher claims its node rank.
    pub fn join(
        layout: NodeLayout,
        host: &str,
        port: u16,
        connect_timeout: Duration,
    ) -> Result<NodeGroup, LaunchError> {
        let server = match layout.node_rank {
            0 => Some(bind_store(host, port)?),
            _ => None,
        };
        let mut client =
            StoreClient::connect(host, port, connect_timeout).map_err(|e| match e {
                StoreError::Connect { .. } => LaunchError::Io(format!(
                    "{e} — is node 0's `dtrain launch --node-rank 0` running there?"
                )),
                other => store_err(other),
            })?;
        let job_key = key("job");
        let mine = JobRecord {
            nnodes: layout.nnodes,
            nproc_per_node: layout.nproc_per_node,
            max_restarts: layout.max_restarts,
            run_id: format!("{:016x}", rand::random::<u64>()),
        };
        let job = if layout.node_rank == 0 {
            client.set(&job_key, &mine.encode()).map_err(store_err)?;
            mine
        } else {
            client
                .wait(&[&job_key], connect_timeout)
                .map_err(|e| match e {
                    StoreError::Timeout { .. } => LaunchError::Io(format!(
                        "node 0's launcher did not publish the job in the TCPStore at {}:{port} within {connect_timeout:?} (is it running with --node-rank 0?)",
                        host
                    )),
                    other => store_err(other),
                })?;
            let job = JobRecord::decode(&client.get(&job_key).map_err(store_err)?)
                .map_err(LaunchError::Io)?;
            if let Some(diff) = layout_mismatch(&job, &mine) {
                let text = format!(
                    "node {} was started with {diff} — every node needs the same --nnodes, --nproc-per-node and --max-restarts",
                    layout.node_rank
                );
                let _ = client.compare_set(&key("abort"), b"", text.as_bytes());
                return Err(LaunchError::Usage(crate::usage::UsageError::Invalid(text)));
            }
            job
        };
        let me = format!("pid {} on {}", std::process::id(), host_name());
        let node_key = key(&format!("node/{}", layout.node_rank));
        let claimed = client
            .compare_set(&node_key, b"", me.as_bytes())
            .map_err(store_err)?;
        if claimed != me.as_bytes() {
            return Err(LaunchError::Usage(crate::usage::UsageError::Invalid(
                format!(
                    "two launchers claim --node-rank {}: {} and this one ({me})",
                    layout.node_rank,
                    String::from_utf8_lossy(&claimed)
                ),
            )));
        }
        // The first heartbeat goes up before `join` returns, so no rank starts anywhere (the
        // ready barrier needs every node) while a node's heartbeat still reads 0, which the
        // watchers take for "never started" and would never time out.
        client
            .add(&key(&format!("heartbeat/{}", layout.node_rank)), 1)
            .map_err(store_err)?;
        let watch = Arc::new(Watch::default());
        let watcher = {
            let (watch, host) = (Arc::clone(&watch), host.to_string());
            std::thread::Builder::new()
                .name("launch-watch".into())
                .spawn(move || watch_loop(&watch, layout, &host, port))
                .map_err(|e| LaunchError::Io(format!("cannot start the watcher thread: {e}")))?
        };
        Ok(NodeGroup {
            layout,
            store_host: host.to_string(),
            store_port: port,
            run_id: job.run_id,
            client,
            watch,
            watcher: Some(watcher),
            server,
        })
    }

    /// Why the current attempt must stop, if it must (polled by the supervision loop).
    pub fn interrupt(&self, attempt: u32) -> Option<Interrupt> {
        self.watch.interrupt(attempt)
    }

    /// Ends the job on every node with `text` (first reason wins).
    pub fn abort(&mut self, text: &str) {
        let _ = self.client.compare_set(&key("abort"), b"", text.as_bytes());
        self.watch.set_fatal(text.to_string());
    }

    /// Waits until every node is ready for attempt `attempt` (deadline `limit`).
    pub fn ready(&mut self, attempt: u32, limit: Duration) -> Result<(), Interrupt> {
        self.watch.attempt.store(attempt, Ordering::SeqCst);
        self.barrier(attempt, "ready", limit, false)
    }

    /// This node's ranks all succeeded; waits for the other nodes' outcome. `Err(Failed)`:
    /// a rank failed elsewhere.
    pub fn done(&mut self, attempt: u32) -> Result<(), Interrupt> {
        // No fixed deadline: the others' ranks may still be finishing (rank 0 writes the
        // final checkpoint); the watcher's liveness check bounds the wait.
        self.barrier(attempt, "done", Duration::MAX, true)
    }

    /// Records this node's failed rank (if any) and waits (up to `limit`) until every node
    /// has reaped its ranks; returns the attempt's root failure as every node names it.
    pub fn stopped(
        &mut self,
        attempt: u32,
        mine: Option<&NodeFailure>,
        limit: Duration,
    ) -> Result<Option<NodeFailure>, Interrupt> {
        if let Some(f) = mine {
            let me = self.layout.node_rank;
            let bytes = f.encode();
            let published = self
                .client
                .set(&attempt_key(attempt, &format!("failure/{me}")), &bytes)
                .and_then(|_| {
                    self.client
                        .compare_set(&attempt_key(attempt, "failed"), b"", &bytes)
                });
            if let Err(e) = published {
                return Err(self.lost_store(e));
            }
        }
        match self.barrier(attempt, "stopped", limit, false) {
            Ok(()) | Err(Interrupt::Failed) => {}
            Err(other) => return Err(other),
        }
        self.root_failure(attempt).map_err(|e| self.lost_store(e))
    }

    /// Tells the others this node is leaving; node 0 then keeps its store up until they all
    /// said so too (at most [`EXIT_LINGER`]), so nobody loses the store while reading the
    /// outcome.
    pub fn finish(&mut self) {
        let me = self.layout.node_rank;
        let _ = self.client.set(&key(&format!("exit/{me}")), b"1");
        if self.server.is_none() {
            return;
        }
        let keys: Vec<String> = (0..self.layout.nnodes)
            .map(|k| key(&format!("exit/{k}")))
            .collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let deadline = Instant::now() + EXIT_LINGER;
        while Instant::now() < deadline && !self.client.check(&refs).unwrap_or(true) {
            std::thread::sleep(POLL);
        }
    }

    /// Of the failures published in `attempt`: a rank killed by a signal (lowest node), else
    /// the first one published.
    fn root_failure(&mut self, attempt: u32) -> Result<Option<NodeFailure>, StoreError> {
        let mut all = Vec::new();
        for k in 0..self.layout.nnodes {
            let key = attempt_key(attempt, &format!("failure/{k}"));
            if self.client.check(&[&key])? {
                all.extend(NodeFailure::decode(&self.client.get(&key)?));
            }
        }
        if let Some(f) = all.iter().find(|f| f.by_signal) {
            return Ok(Some(f.clone()));
        }
        let first = attempt_key(attempt, "failed");
        if self.client.check(&[&first])? {
            return Ok(NodeFailure::decode(&self.client.get(&first)?));
        }
        Ok(all.into_iter().next())
    }

    fn lost_store(&self, e: StoreError) -> Interrupt {
        let text = format!(
            "lost the launchers' TCPStore at {}:{} (node 0's launcher): {e}",
            self.store_host, self.store_port
        );
        self.watch.set_fatal(text.clone());
        Interrupt::Abort(text)
    }

    /// Sets `attempt_<a>/<what>/<me>` and waits until every node has set it, or `limit`
    /// passes (then the job is aborted, naming the missing nodes), or the job is aborted, or
    /// (with `stop_on_failure`) a rank fails in this attempt.
    fn barrier(
        &mut self,
        attempt: u32,
        what: &str,
        limit: Duration,
        stop_on_failure: bool,
    ) -> Result<(), Interrupt> {
        let me = self.layout.node_rank;
        if let Err(e) = self
            .client
            .set(&attempt_key(attempt, &format!("{what}/{me}")), b"1")
        {
            return Err(self.lost_store(e));
        }
        let keys: Vec<String> = (0..self.layout.nnodes)
            .map(|k| attempt_key(attempt, &format!("{what}/{k}")))
            .collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let start = Instant::now();
        loop {
            match self.client.check(&refs) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(self.lost_store(e)),
            }
            match self.watch.interrupt(attempt) {
                Some(Interrupt::Failed) if !stop_on_failure => {}
                Some(i) => return Err(i),
                None => {}
            }
            let signal = super::RECEIVED_SIGNAL.swap(0, Ordering::SeqCst);
            if let Ok(sig) = nix::sys::signal::Signal::try_from(signal) {
                self.abort(&format!("node {me}'s launcher was stopped by {sig:?}"));
                return Err(Interrupt::Signalled(sig));
            }
            if start.elapsed() >= limit {
                let mut missing = Vec::new();
                for (k, key) in refs.iter().enumerate() {
                    if !self.client.check(&[key]).unwrap_or(false) {
                        missing.push(k);
                    }
                }
                let text = format!(
                    "nodes {missing:?} did not get {what} for attempt {attempt} within {limit:?}"
                );
                self.abort(&text);
                return Err(Interrupt::Abort(text));
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for NodeGroup {
    fn drop(&mut self) {
        self.watch.stop.store(true, Ordering::SeqCst);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
        // Then `server` (node 0's store) closes with the struct.
    }
}

/// Node 0's store at `host:port`, with errors that say what to change.
fn bind_store(host: &str, port: u16) -> Result<StoreServer, LaunchError> {
    StoreServer::bind((host, port)).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                " — pick another --master-port (or stop the job using it)".to_string()
            }
            std::io::ErrorKind::AddrNotAvailable => format!(
                " — {host} is not an address of this host: node 0 must run on the --master-ip host"
            ),
            _ => String::new(),
        };
        LaunchError::Io(format!(
            "node 0 cannot host the launchers' TCPStore on {host}:{port}: {e}{hint}"
        ))
    })
}

fn layout_mismatch(job: &JobRecord, mine: &JobRecord) -> Option<String> {
    let fields = [
        ("--nnodes", job.nnodes, mine.nnodes),
        ("--nproc-per-node", job.nproc_per_node, mine.nproc_per_node),
        (
            "--max-restarts",
            job.max_restarts as usize,
            mine.max_restarts as usize,
        ),
    ];
    fields
        .iter()
        .find(|(_, theirs, ours)| theirs != ours)
        .map(|(flag, theirs, ours)| format!("{flag} {ours} but node 0 with {flag} {theirs}"))
}

/// The watcher thread: raises this node's heartbeat, and watches the abort key, the current
/// attempt's failure key and the other launchers' heartbeats.
fn watch_loop(watch: &Watch, layout: NodeLayout, host: &str, port: u16) {
    let me = layout.node_rank;
    let mut client: Option<StoreClient> = None;
    let mut last_ok = Instant::now();
    // Per node: last heartbeat value and when it last moved.
    let mut seen: Vec<(i64, Instant)> = vec![(0, Instant::now()); layout.nnodes];
    while !watch.stop.load(Ordering::SeqCst) {
        if client.is_none() {
            client = StoreClient::connect(host, port, STORE_CALL.min(HEARTBEAT_EVERY * 4)).ok();
        }
        let result = match client.as_mut() {
            Some(c) => watch_once(c, watch, layout, &mut seen),
            None => Err(None),
        };
        match result {
            Ok(()) => last_ok = Instant::now(),
            Err(Some(text)) => watch.set_fatal(text),
            Err(None) => {
                client = None;
                if last_ok.elapsed() > LAUNCHER_LIVENESS {
                    watch.set_fatal(format!(
                        "node {me} lost the launchers' TCPStore at {host}:{port} (node 0's launcher) for {LAUNCHER_LIVENESS:?}"
                    ));
                }
            }
        }
        // Sleep in small steps so Drop does not wait long.
        let until = Instant::now() + HEARTBEAT_EVERY;
        while Instant::now() < until && !watch.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One round of the watcher. `Err(None)`: the store did not answer; `Err(Some(text))`: the
/// job must end.
fn watch_once(
    c: &mut StoreClient,
    watch: &Watch,
    layout: NodeLayout,
    seen: &mut [(i64, Instant)],
) -> Result<(), Option<String>> {
    let me = layout.node_rank;
    let attempt = watch.attempt.load(Ordering::SeqCst);
    let store = |_| None;
    c.add(&key(&format!("heartbeat/{me}")), 1).map_err(store)?;
    let abort = key("abort");
    if c.check(&[&abort]).map_err(store)? {
        let text = c.get(&abort).map_err(store)?;
        return Err(Some(String::from_utf8_lossy(&text).into_owned()));
    }
    if c.check(&[&attempt_key(attempt, "failed")]).map_err(store)? {
        *watch
            .failed_attempt
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(attempt);
    }
    for (k, (value, moved)) in seen.iter_mut().enumerate() {
        if k == me {
            continue;
        }
        let now = c.add(&key(&format!("heartbeat/{k}")), 0).map_err(store)?;
        if now != *value {
            *value = now;
            *moved = Instant::now();
            continue;
        }
        // A node that finished this attempt may leave; one that never started is the
        // barriers' business.
        if now == 0 || moved.elapsed() < LAUNCHER_LIVENESS {
            continue;
        }
        if c.check(&[&key(&format!("exit/{k}"))]).map_err(store)?
            || c.check(&[&attempt_key(attempt, &format!("done/{k}"))])
                .map_err(store)?
        {
            continue;
        }
        let who = c
            .get(&key(&format!("node/{k}")))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|_| "?".into());
        return Err(Some(format!(
            "node {k}'s launcher ({who}) stopped answering: no heartbeat for {LAUNCHER_LIVENESS:?}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let job = JobRecord {
            nnodes: 3,
            nproc_per_node: 2,
            max_restarts: 1,
            run_id: "00ff".into(),
        };
        assert_eq!(JobRecord::decode(&job.encode()), Ok(job.clone()));
        assert!(JobRecord::decode(b"v2 nnodes=1").is_err());
        assert!(JobRecord::decode(b"v1 nnodes=x nproc-per-node=1").is_err());
        let f = NodeFailure {
            rank: 3,
            node: 1,
            exit_code: 137,
            by_signal: true,
            status: "signal 9 (SIGKILL)".into(),
        };
        assert_eq!(NodeFailure::decode(&f.encode()), Some(f.clone()));
        assert_eq!(
            f.describe(),
            "rank 3 (node 1) failed with signal 9 (SIGKILL)"
        );
        assert_eq!(NodeFailure::decode(b"garbage"), None);
    }

    #[test]
    fn a_layout_mismatch_names_the_flag() {
        let job = JobRecord {
            nnodes: 2,
            nproc_per_node: 2,
            max_restarts: 0,
            run_id: "x".into(),
        };
        let mine = JobRecord {
            nproc_per_node: 3,
            ..job.clone()
        };
        assert_eq!(
            layout_mismatch(&job, &mine).as_deref(),
            Some("--nproc-per-node 3 but node 0 with --nproc-per-node 2")
        );
        assert_eq!(layout_mismatch(&job, &job), None);
    }

    #[test]
    fn global_ranks_are_node_major() {
        let l = NodeLayout {
            nnodes: 2,
            node_rank: 1,
            nproc_per_node: 3,
            max_restarts: 0,
        };
        assert_eq!(
            (l.world_size(), l.global_rank(0), l.global_rank(2)),
            (6, 3, 5)
        );
    }
}
