//! Hierarchical backend for mixed placements: several hosts, several ranks on some host.
//!
//! **Topology.** Ranks are grouped by the host identity they reported at rendezvous
//! ([`host_groups`]; hosts ordered by their lowest global rank, ranks within a host in global
//! order). On each host with two or more ranks, those ranks attach to one shared-memory
//! segment of their own (named after the job id and the host's lowest rank), with local ranks
//! `0..local_size` in global order. The lowest global rank of each host is its *leader*
//! (local rank 0); the leaders form a TCP full mesh among themselves, leader `h` being the
//! leader of host `h`. Non-leaders never open a TCP data connection.
//!
//! **Every collective has three phases**, on every rank, in the same order:
//! 1. *local*: shared memory within each host (e.g. the host's partial sum);
//! 2. *leaders*: first a **status exchange** — each leader sends every other leader a small
//!    fixed-size record, "ok" or the failure it saw in phase 1 — then, if all are ok, the TCP
//!    part of the collective;
//! 3. *release*: each leader broadcasts a status record (ok, or the failure and its culprit's
//!    global rank) to its host over shared memory, then the data its host still needs.
//!
//! The status records are what carry a failure across the hierarchy: a rank killed on host
//! B is seen in shared memory by B's ranks, B's leader tells the other leaders in the next
//! status exchange, and they tell their hosts in the release — so every survivor returns an
//! error naming the dead rank's **global** rank, with the detector's explanation. A leader
//! that fails after its leaders' phase (e.g. a local peer dies during the release) sends its
//! record to the other leaders at once; they read it in their next status exchange. A
//! leader that dies is seen directly: by its host's ranks through the shm liveness check,
//! by the other leaders through TCP. Errors from the shm and TCP layers carry local or
//! leader indices; they are translated to global ranks, and the mapping is appended to the
//! message. After a failure the backend refuses further work; a failed leader drops its
//! shared-memory backend so no rank of its host can keep waiting on it.
//!
//! **Collectives.**
//! - `all_reduce`: shm all-reduce within each host (`Sum` for `Avg`), TCP all-reduce among
//!   leaders, `Avg` divided once by the *global* world size on the leader, then the leader's
//!   bytes are broadcast over shm — results are bitwise identical on all ranks. Sum order:
//!   per host in local (= global) rank order as documented in [`crate::shm`], then across
//!   host sums: up to 64 KiB the host sums travel with the leaders' status records and every
//!   leader folds them in host order (`((h0 ⊕ h1) ⊕ h2) ...`, one TCP round instead of two);
//!   above, the TCP ring as documented in [`crate::algorithms::ring_allreduce`].
//! - `broadcast(root)`: within the root's host from the root, among leaders from the root
//!   host's leader, then within each other host from its leader.
//! - `barrier`: shm barrier, status exchange among leaders (an all-to-all, so itself a
//!   barrier), status broadcast (the release).
//! - `gather`/`all_gather`: shm gather of each host's blocks at its leader, then the leaders
//!   send whole host blocks (variable sizes, since hosts may hold different numbers of ranks)
//!   straight to the root host's leader / to every other leader; `all_gather` ends with an
//!   shm broadcast of the full buffer, `gather` with a non-leader root gets it from its leader
//!   by an shm broadcast of the full buffer (the other ranks of that host receive it too —
//!   simple rather than optimal).
//! - `scatter`: the reverse: a non-leader root first hands the full buffer to its leader by
//!   shm broadcast, the root host's leader sends each other leader its host's blocks, each
//!   leader scatters over shm.
//! - `reduce_scatter`: a hierarchical all-reduce of a copy of the whole send buffer, then
//!   each rank keeps its block (moves `world_size` times more bytes than a true reduce-scatter;
//!   correct and simple).
//!
//! **Deadlines.** TCP waits use the job's timeouts. A non-leader waits in shared memory for
//! its leader's whole TCP phase (and, in `connect`, for the leaders' mesh setup), so shm
//! waits in this backend use a collective deadline of `2 × collective + connect`; a dead
//! process is still noticed within `timeouts.liveness` (pid check), independent of it.
//! Known limit: a *stalled* (alive, e.g. SIGSTOPped) non-leader is detected by its own host
//! only after that longer deadline, so leaders on other hosts time out on its leader first
//! and name the leader; every rank still fails within the deadlines. Dead ranks are always
//! named correctly.

use std::sync::Arc;
use std::time::Duration;

use crate::algorithms::PointToPoint;
use crate::reduce::{reduce_into, scale_for_avg};
use crate::rendezvous::{PeerInfo, Rendezvous};
use crate::shm::ShmBackend;
use crate::tcp::TcpBackend;
use crate::{Backend, DType, Error, PeerAt, ReduceOp, Result, Timeouts};

/// Global ranks grouped by `host_id`: hosts ordered by their lowest rank, ranks ascending.
pub fn host_groups(peers: &[PeerInfo]) -> Vec<Vec<usize>> {
    let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
    for (rank, p) in peers.iter().enumerate() {
        match groups.iter_mut().find(|(h, _)| *h == p.host_id) {
            Some((_, ranks)) => ranks.push(rank),
            None => groups.push((&p.host_id, vec![rank])),
        }
    }
    groups.into_iter().map(|(_, ranks)| ranks).collect()
}

/// Where every rank sits: host index and index within its host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Global ranks of each host; `hosts[h][0]` is host `h`'s leader.
    pub hosts: Vec<Vec<usize>>,
    /// Host index of each global rank.
    pub host_of: Vec<usize>,
    /// Index of each global rank within its host (0 = leader).
    pub local_index: Vec<usize>,
}

impl Placement {
    pub fn new(hosts: Vec<Vec<usize>>) -> Placement {
        let world_size = hosts.iter().map(Vec::len).sum();
        let mut host_of = vec![0; world_size];
        let mut local_index = vec![0; world_size];
        for (h, ranks) in hosts.iter().enumerate() {
            for (j, &r) in ranks.iter().enumerate() {
                host_of[r] = h;
                local_index[r] = j;
            }
        }
        Placement {
            hosts,
            host_of,
            local_index,
        }
    }

    /// Leader of each host; index = leader rank in the leaders' TCP mesh.
    pub fn leaders(&self) -> Vec<usize> {
        self.hosts.iter().map(|h| h[0]).collect()
    }

    /// Several hosts, and some host with several ranks: the placement this backend is for.
    pub fn is_mixed(&self) -> bool {
        self.hosts.len() > 1 && self.hosts.iter().any(|h| h.len() > 1)
    }
}

// ---- status records --------------------------------------------------------------------

/// All-reduces up to this size send the host sums along with the leaders' status records
/// (one round between leaders instead of two), as TCP's own direct path would.
pub const FUSED_ALL_REDUCE_MAX_BYTES: usize = 64 << 10;

/// Size of a status record (ok, or a failure with its culprit and explanation).
const STATUS_BYTES: usize = 512;
const STATUS_HEADER: usize = 34;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReportKind {
    PeerDied = 0,
    Timeout = 1,
    Protocol = 2,
    /// Any other error on the reporting rank (I/O, shm setup, ...): it blames itself.
    Other = 3,
}

/// A failure as it travels between ranks: the culprit's global rank, who saw it, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Report {
    kind: ReportKind,
    culprit: usize,
    reporter: usize,
    waited_ms: u64,
    what: String,
    detail: String,
}

impl Report {
    fn from_error(e: &Error, reporter: usize) -> Report {
        let (kind, culprit, waited_ms, what, detail) = match e {
            Error::PeerDied {
                rank, what, detail, ..
            } => (ReportKind::PeerDied, *rank, 0, what.clone(), detail.clone()),
            Error::Timeout {
                rank, what, waited, ..
            } => (
                ReportKind::Timeout,
                *rank,
                waited.as_millis() as u64,
                what.clone(),
                String::new(),
            ),
            Error::Protocol { rank, detail } => (
                ReportKind::Protocol,
                *rank,
                0,
                String::new(),
                detail.clone(),
            ),
            other => (
                ReportKind::Other,
                reporter,
                0,
                String::new(),
                other.to_string(),
            ),
        };
        Report {
            kind,
            culprit,
            reporter,
            waited_ms,
            what,
            detail,
        }
    }

    /// The error a rank other than the reporter returns.
    fn to_error(&self) -> Error {
        let by = self.reporter;
        match self.kind {
            ReportKind::PeerDied => Error::PeerDied {
                rank: self.culprit,
                at: PeerAt::Unknown,
                what: self.what.clone(),
                detail: format!("{} (seen by rank {by})", self.detail),
            },
            ReportKind::Timeout => Error::Timeout {
                rank: self.culprit,
                at: PeerAt::Unknown,
                what: format!("{} (seen by rank {by})", self.what),
                waited: Duration::from_millis(self.waited_ms),
            },
            ReportKind::Protocol => Error::Protocol {
                rank: self.culprit,
                detail: format!("{} (seen by rank {by})", self.detail),
            },
            ReportKind::Other => Error::PeerDied {
                rank: self.culprit,
                at: PeerAt::Unknown,
                what: "a collective".into(),
                detail: format!("it failed: {}", self.detail),
            },
        }
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary.
fn truncated(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn encode_status(report: Option<&Report>) -> [u8; STATUS_BYTES] {
    let mut out = [0u8; STATUS_BYTES];
    let Some(r) = report else {
        return out;
    };
    let room = STATUS_BYTES - STATUS_HEADER;
    let what = truncated(&r.what, room / 2);
    let detail = truncated(&r.detail, room - what.len());
    out[0] = 1;
    out[1] = r.kind as u8;
    out[2..10].copy_from_slice(&(r.culprit as u64).to_le_bytes());
    out[10..18].copy_from_slice(&(r.reporter as u64).to_le_bytes());
    out[18..26].copy_from_slice(&r.waited_ms.to_le_bytes());
    out[26..30].copy_from_slice(&(what.len() as u32).to_le_bytes());
    out[30..34].copy_from_slice(&(detail.len() as u32).to_le_bytes());
    out[STATUS_HEADER..STATUS_HEADER + what.len()].copy_from_slice(what.as_bytes());
    out[STATUS_HEADER + what.len()..STATUS_HEADER + what.len() + detail.len()]
        .copy_from_slice(detail.as_bytes());
    out
}

fn decode_status(buf: &[u8]) -> std::result::Result<Option<Report>, String> {
    if buf.len() != STATUS_BYTES {
        return Err(format!("status record of {} bytes", buf.len()));
    }
    match buf[0] {
        0 => return Ok(None),
        1 => {}
        other => return Err(format!("status record with flag {other}")),
    }
    let u64_at = |at: usize| u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"));
    let u32_at = |at: usize| u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"));
    let kind = match buf[1] {
        0 => ReportKind::PeerDied,
        1 => ReportKind::Timeout,
        2 => ReportKind::Protocol,
        3 => ReportKind::Other,
        other => return Err(format!("status record of unknown kind {other}")),
    };
    let (what_len, detail_len) = (u32_at(26) as usize, u32_at(30) as usize);
    if STATUS_HEADER + what_len + detail_len > STATUS_BYTES {
        return Err("status record with text longer than the record".into());
    }
    let text = |from: usize, len: usize| String::from_utf8_lossy(&buf[from..from + len]).into();
    Ok(Some(Report {
        kind,
        culprit: u64_at(2) as usize,
        reporter: u64_at(10) as usize,
        waited_ms: u64_at(18),
        what: text(STATUS_HEADER, what_len),
        detail: text(STATUS_HEADER + what_len, detail_len),
    }))
}

/// Rewrites the rank of an error from the shm (local index) or TCP (leader index) layer into
/// a global rank, and appends the index mapping so ranks quoted inside the text make sense.
fn to_global(e: Error, ranks: &[usize], scope: &str) -> Error {
    let global = |r: usize| ranks.get(r).copied().unwrap_or(r);
    let note = format!("[{scope} of global ranks {ranks:?}; its rank i is the i-th of them]");
    match e {
        Error::PeerDied {
            rank,
            at,
            what,
            detail,
        } => Error::PeerDied {
            rank: global(rank),
            at,
            what: format!("{what} {note}"),
            detail,
        },
        Error::Timeout {
            rank,
            at,
            what,
            waited,
        } => Error::Timeout {
            rank: global(rank),
            at,
            what: format!("{what} {note}"),
            waited,
        },
        Error::Protocol { rank, detail } => Error::Protocol {
            rank: global(rank),
            detail: format!("{detail} {note}"),
        },
        other => other,
    }
}

/// A failed phase: the error this rank returns, and the report it passes on.
struct Failure {
    error: Error,
    report: Report,
}

impl Failure {
    fn own(error: Error, rank: usize) -> Box<Failure> {
        let report = Report::from_error(&error, rank);
        Box::new(Failure { error, report })
    }
    fn reported(report: Report) -> Box<Failure> {
        Box::new(Failure {
            error: report.to_error(),
            report,
        })
    }
}

type Phase = std::result::Result<(), Box<Failure>>;

// ---- the backend -----------------------------------------------------------------------

/// Shared memory within each host, TCP between host leaders. See the module docs.
pub struct HierarchicalBackend {
    rank: usize,
    world_size: usize,
    place: Arc<Placement>,
    host: usize,
    local: usize,
    /// This host's segment (`None` when the host has one rank, or after a leader failed).
    shm: Option<ShmBackend>,
    /// The leaders' mesh (`Some` on leaders when there are several hosts).
    tcp: Option<TcpBackend>,
    /// False once the leaders' mesh returned an error (it then refuses work anyway).
    tcp_healthy: bool,
    /// This leader completed the status exchange of the collective in progress: a failure
    /// after it must be sent to the other leaders separately.
    owe_report: bool,
    op: &'static str,
    /// Culprit and reason of the failure that broke this backend.
    broken: Option<(usize, String)>,
    /// Where each global rank is, named in errors about it (see [`peer_locations`]).
    peer_at: Vec<PeerAt>,
}

/// Where each rank is as seen from rank `me`: a rank on this host by its pid, a leader of
/// another host by its data address (the leaders' TCP mesh uses it), a non-leader of
/// another host by its host's address (this rank has no link to it).
fn peer_locations(peers: &[PeerInfo], me: usize) -> Vec<PeerAt> {
    let my_host = peers.get(me).map(|p| p.host_id.as_str());
    peers
        .iter()
        .enumerate()
        .map(|(r, p)| {
            let leader = peers.iter().position(|q| q.host_id == p.host_id) == Some(r);
            if Some(p.host_id.as_str()) == my_host {
                PeerAt::ThisHost { pid: Some(p.pid) }
            } else if leader {
                PeerAt::Tcp(p.data_addr)
            } else {
                PeerAt::Host(p.data_addr.ip())
            }
        })
        .collect()
}

fn shm_scope(op: &str) -> String {
    format!("within {op}: shared memory of the host")
}
fn tcp_scope(op: &str) -> String {
    format!("within {op}: TCP mesh of the host leaders")
}

impl HierarchicalBackend {
    /// Builds the backend for `rank` from a finished rendezvous: attaches this host's shared
    /// memory, and on leaders connects the leaders' mesh (non-leaders drop their data
    /// listener). Returns once this host's ranks know whether the leaders' mesh came up.
    pub fn connect(rank: usize, rv: Rendezvous, timeouts: &Timeouts) -> Result<Self> {
        let peer_at = peer_locations(&rv.peers, rank);
        Self::connect_mapped(rank, rv, timeouts, peer_at.clone())
            .map_err(|e| e.located(|r| peer_at.get(r).copied().unwrap_or_default()))
    }

    fn connect_mapped(
        rank: usize,
        rv: Rendezvous,
        timeouts: &Timeouts,
        peer_at: Vec<PeerAt>,
    ) -> Result<Self> {
        let place = Arc::new(Placement::new(host_groups(&rv.peers)));
        let world_size = rv.peers.len();
        if rank >= world_size {
            return Err(Error::InvalidArgument(format!(
                "rank {rank} is not in a world of size {world_size}"
            )));
        }
        let host = place.host_of[rank];
        let local = place.local_index[rank];
        let group = &place.hosts[host];
        let op = "setup";
        let shm_timeouts = Timeouts {
            collective: timeouts.collective * 2 + timeouts.connect,
            ..*timeouts
        };
        let mut shm = if group.len() > 1 {
            let job = format!("{}-h{}", rv.job_id, group[0]);
            let attached = ShmBackend::attach(&job, local, group.len(), &shm_timeouts)
                .map_err(|e| to_global(e, group, &shm_scope(op)))?;
            Some(attached)
        } else {
            None
        };
        let leaders = place.leaders();
        let tcp = if local == 0 && leaders.len() > 1 {
            let addrs: Vec<_> = leaders.iter().map(|&r| rv.peers[r].data_addr).collect();
            crate::tcp::connect_mesh(host, &addrs, &rv.data_key, rv.data_listener, timeouts)
                .map(Some)
                .map_err(|e| to_global(e, &leaders, &tcp_scope(op)))
        } else {
            drop(rv.data_listener);
            Ok(None)
        };
        // Tell the host's other ranks whether the leaders' mesh came up, so a failure there
        // is an error from `connect` on them too.
        if let Some(shm) = shm.as_mut() {
            let report = tcp.as_ref().err().map(|e| Report::from_error(e, rank));
            let mut status = encode_status(report.as_ref());
            shm.broadcast(&mut status, 0)
                .map_err(|e| to_global(e, group, &shm_scope(op)))?;
            if local != 0 {
                let leader = group[0];
                let decoded = decode_status(&status).map_err(|detail| Error::Protocol {
                    rank: leader,
                    detail,
                })?;
                if let Some(report) = decoded {
                    return Err(report.to_error());
                }
            }
        }
        Ok(HierarchicalBackend {
            rank,
            world_size,
            place,
            host,
            local,
            shm,
            tcp: tcp?,
            tcp_healthy: true,
            owe_report: false,
            op: "setup",
            broken: None,
            peer_at,
        })
    }

    /// The placement this backend runs on.
    pub fn placement(&self) -> &Placement {
        &self.place
    }

    fn is_leader(&self) -> bool {
        self.local == 0
    }

    fn peer_at(&self, rank: usize) -> PeerAt {
        self.peer_at.get(rank).copied().unwrap_or_default()
    }

    fn local_size(&self) -> usize {
        self.place.hosts[self.host].len()
    }

    fn begin(&mut self, op: &'static str) -> Result<()> {
        self.op = op;
        self.owe_report = false;
        if let Some((culprit, reason)) = &self.broken {
            return Err(Error::PeerDied {
                rank: *culprit,
                at: self.peer_at(*culprit),
                what: op.to_string(),
                detail: format!("communicator is unusable after an earlier failure: {reason}"),
            });
        }
        Ok(())
    }

    /// Phase 1 on this host's shared memory (nothing when the host has one rank).
    fn local(&mut self, f: impl FnOnce(&mut ShmBackend) -> Result<()>) -> Phase {
        if self.local_size() == 1 {
            return Ok(());
        }
        let (rank, op) = (self.rank, self.op);
        let place = self.place.clone();
        let Some(shm) = self.shm.as_mut() else {
            return Err(Failure::own(
                Error::Shm(format!("{}: this host's shared memory was closed", self.op)),
                rank,
            ));
        };
        f(shm)
            .map_err(|e| Failure::own(to_global(e, &place.hosts[self.host], &shm_scope(op)), rank))
    }

    /// Phase 2 on leaders: status exchange, then `f` over TCP if everybody is fine. On
    /// non-leaders (and with a single host) it passes `prior` through.
    fn among_leaders(
        &mut self,
        prior: Phase,
        f: impl FnOnce(&mut TcpBackend) -> Result<()>,
    ) -> Phase {
        self.among_leaders_with(prior, &[], &mut [], f)
    }

    /// [`Self::among_leaders`] whose status records also carry `payload` to every leader
    /// (gathered by leader index into `gathered`), saving a round for small collectives.
    fn among_leaders_with(
        &mut self,
        prior: Phase,
        payload: &[u8],
        gathered: &mut [u8],
        f: impl FnOnce(&mut TcpBackend) -> Result<()>,
    ) -> Phase {
        if !self.is_leader() || self.tcp.is_none() {
            return prior;
        }
        let leaders = self.place.leaders();
        let op = self.op;
        let mine = prior.as_ref().err().map(|f| &f.report);
        match self.exchange_status(mine, payload, gathered) {
            Err(e) => {
                self.tcp_healthy = false;
                let e = to_global(e, &leaders, &tcp_scope(op));
                return Err(prior.err().unwrap_or_else(|| Failure::own(e, self.rank)));
            }
            Ok(remote) => {
                prior?;
                if let Some(report) = remote {
                    return Err(Failure::reported(report));
                }
            }
        }
        self.owe_report = true;
        let tcp = self.tcp.as_mut().expect("checked above");
        let result = f(tcp);
        if let Err(e) = result {
            self.tcp_healthy = false;
            self.owe_report = false;
            return Err(Failure::own(
                to_global(e, &leaders, &tcp_scope(op)),
                self.rank,
            ));
        }
        Ok(())
    }

    /// Every leader sends every other leader its status record followed by `payload`
    /// (direct exchange in `n - 1` rounds); the payloads land in `gathered` (`n` blocks of
    /// `payload.len()`, by leader index, this leader's own included). Returns the failure
    /// reported by another leader, if any (a dead peer is preferred over a timeout, then the
    /// lowest culprit rank). Errors name leader indices.
    fn exchange_status(
        &mut self,
        mine: Option<&Report>,
        payload: &[u8],
        gathered: &mut [u8],
    ) -> Result<Option<Report>> {
        let op = self.op;
        let tcp = self.tcp.as_mut().expect("leaders' mesh");
        let n = tcp.world_size();
        let me = tcp.rank();
        let len = payload.len();
        let mut out = encode_status(mine).to_vec();
        out.extend_from_slice(payload);
        gathered[me * len..(me + 1) * len].copy_from_slice(payload);
        let mut incoming = vec![0u8; STATUS_BYTES + len];
        let mut worst: Option<Report> = None;
        tcp.p2p.set_op(op);
        for d in 1..n {
            let (to, from) = ((me + d) % n, (me + n - d) % n);
            tcp.p2p.send_recv(to, &out, from, &mut incoming)?;
            let report =
                decode_status(&incoming[..STATUS_BYTES]).map_err(|detail| Error::Protocol {
                    rank: from,
                    detail: format!("{op}: bad status record from a host leader: {detail}"),
                })?;
            gathered[from * len..(from + 1) * len].copy_from_slice(&incoming[STATUS_BYTES..]);
            if let Some(r) = report {
                let key = |r: &Report| (r.kind != ReportKind::PeerDied, r.culprit);
                if worst.as_ref().is_none_or(|w| key(&r) < key(w)) {
                    worst = Some(r);
                }
            }
        }
        Ok(worst)
    }

    /// Phase 3: the leader broadcasts the outcome to its host, then (if all went well) `f`
    /// moves the data the host still needs. Non-leaders learn the outcome here.
    fn release(
        &mut self,
        outcome: Phase,
        f: impl FnOnce(&mut ShmBackend) -> Result<()>,
    ) -> Result<()> {
        if self.local_size() == 1 {
            return outcome.map_err(|failure| self.fail(*failure));
        }
        let place = self.place.clone();
        let group = &place.hosts[self.host];
        let (rank, op) = (self.rank, self.op);
        let Some(shm) = self.shm.as_mut() else {
            let failure = outcome.err().unwrap_or_else(|| {
                Failure::own(
                    Error::Shm(format!("{}: this host's shared memory was closed", self.op)),
                    rank,
                )
            });
            return Err(self.fail(*failure));
        };
        if self.local == 0 {
            let mut status = encode_status(outcome.as_ref().err().map(|f| &f.report));
            let result = match outcome {
                Err(failure) => {
                    // Best effort: after a local failure the segment may be unusable; the
                    // host's ranks then see this leader leave.
                    let _ = shm.broadcast(&mut status, 0);
                    Err(failure)
                }
                Ok(()) => shm
                    .broadcast(&mut status, 0)
                    .and_then(|()| f(shm))
                    .map_err(|e| Failure::own(to_global(e, group, &shm_scope(op)), rank)),
            };
            result.map_err(|failure| self.fail(*failure))
        } else {
            if let Err(failure) = outcome {
                return Err(self.fail(*failure));
            }
            let mut status = [0u8; STATUS_BYTES];
            let step = shm
                .broadcast(&mut status, 0)
                .map_err(|e| Failure::own(to_global(e, group, &shm_scope(op)), rank))
                .and_then(|()| match decode_status(&status) {
                    Ok(None) => Ok(()),
                    Ok(Some(report)) => Err(Failure::reported(report)),
                    Err(detail) => Err(Failure::own(
                        Error::Protocol {
                            rank: group[0],
                            detail: format!("bad status record from this host's leader: {detail}"),
                        },
                        rank,
                    )),
                })
                .and_then(|()| {
                    f(shm).map_err(|e| Failure::own(to_global(e, group, &shm_scope(op)), rank))
                });
            step.map_err(|failure| self.fail(*failure))
        }
    }

    /// Marks the backend broken. A leader forwards a failure the other leaders have not
    /// heard of yet, and closes its shared memory so its host's ranks stop waiting for it.
    fn fail(&mut self, failure: Failure) -> Error {
        let error = failure.error.located(|r| self.peer_at(r));
        self.broken = Some((failure.report.culprit, error.to_string()));
        if self.is_leader() {
            if self.owe_report && self.tcp_healthy {
                if let Some(tcp) = self.tcp.as_mut() {
                    let record = encode_status(Some(&failure.report));
                    let (n, me) = (tcp.world_size(), tcp.rank());
                    for peer in (0..n).filter(|&p| p != me) {
                        // Best effort: a leader that is gone learns nothing anyway.
                        let _ = tcp.p2p.send(peer, &record);
                    }
                }
            }
            self.shm = None;
        }
        self.owe_report = false;
        error
    }
}

fn invalid(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

fn check_root(root: usize, world_size: usize) -> Result<()> {
    if root >= world_size {
        return Err(invalid(format!(
            "root {root} is not in a world of size {world_size}"
        )));
    }
    Ok(())
}

fn check_reducible(len: usize, dtype: DType) -> Result<()> {
    if dtype == DType::U8 {
        return Err(invalid("U8 buffers can be moved but not reduced".into()));
    }
    if !len.is_multiple_of(dtype.size()) {
        return Err(invalid(format!(
            "buffer of {len} bytes is not a whole number of {dtype:?} elements"
        )));
    }
    Ok(())
}

/// Copies host `h`'s blocks (`len` bytes each, in local order) from `packed` to their
/// global positions in `full`.
fn unpack_host(place: &Placement, h: usize, packed: &[u8], full: &mut [u8], len: usize) {
    for (j, &g) in place.hosts[h].iter().enumerate() {
        full[g * len..(g + 1) * len].copy_from_slice(&packed[j * len..(j + 1) * len]);
    }
}

/// The reverse of [`unpack_host`].
fn pack_host(place: &Placement, h: usize, full: &[u8], len: usize) -> Vec<u8> {
    let mut packed = Vec::with_capacity(place.hosts[h].len() * len);
    for &g in &place.hosts[h] {
        packed.extend_from_slice(&full[g * len..(g + 1) * len]);
    }
    packed
}

impl HierarchicalBackend {
    fn all_reduce_as(
        &mut self,
        name: &'static str,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        check_reducible(buf.len(), dtype)?;
        self.begin(name)?;
        // Sum everywhere for Avg; divide once, by the global world size, at the end.
        let partial_op = if op == ReduceOp::Avg {
            ReduceOp::Sum
        } else {
            op
        };
        let local = self.local(|shm| shm.all_reduce(buf, dtype, partial_op));
        let outcome = if buf.len() <= FUSED_ALL_REDUCE_MAX_BYTES {
            // Host sums travel with the status records; every leader folds them in leader
            // order, so all leaders compute the same bits.
            let hosts = self.place.hosts.len();
            let len = buf.len();
            let mut sums = if self.is_leader() {
                vec![0u8; hosts * len]
            } else {
                Vec::new()
            };
            let outcome = self.among_leaders_with(local, buf, &mut sums, |_| Ok(()));
            if self.is_leader() && outcome.is_ok() && hosts > 1 {
                buf.copy_from_slice(&sums[..len]);
                for h in 1..hosts {
                    reduce_into(buf, &sums[h * len..(h + 1) * len], dtype, partial_op);
                }
            }
            outcome
        } else {
            self.among_leaders(local, |tcp| tcp.all_reduce(buf, dtype, partial_op))
        };
        if self.is_leader() && outcome.is_ok() {
            scale_for_avg(buf, dtype, op, self.world_size);
        }
        self.release(outcome, |shm| shm.broadcast(buf, 0))
    }

    /// Phase 1 of gather/all_gather: this host's blocks, in local order, at its leader.
    fn gather_host(&mut self, send: &[u8]) -> (Phase, Vec<u8>) {
        let leader = self.is_leader();
        let mut host_blocks = if leader {
            vec![0u8; self.local_size() * send.len()]
        } else {
            Vec::new()
        };
        if self.local_size() == 1 {
            host_blocks.copy_from_slice(send);
            return (Ok(()), host_blocks);
        }
        let phase = self.local(|shm| shm.gather(send, leader.then_some(&mut host_blocks[..]), 0));
        (phase, host_blocks)
    }
}

impl Backend for HierarchicalBackend {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce(&mut self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        self.all_reduce_as("all_reduce", buf, dtype, op)
    }

    fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<()> {
        check_root(root, self.world_size)?;
        self.begin("broadcast")?;
        let root_host = self.place.host_of[root];
        let root_local = self.place.local_index[root];
        let on_root_host = self.host == root_host;
        let local = if on_root_host {
            self.local(|shm| shm.broadcast(buf, root_local))
        } else {
            Ok(())
        };
        let outcome = self.among_leaders(local, |tcp| tcp.broadcast(buf, root_host));
        self.release(outcome, |shm| {
            if on_root_host {
                Ok(())
            } else {
                shm.broadcast(buf, 0)
            }
        })
    }

    fn gather(&mut self, send: &[u8], recv: Option<&mut [u8]>, root: usize) -> Result<()> {
        check_root(root, self.world_size)?;
        let (n, len) = (self.world_size, send.len());
        let recv = match (self.rank == root, recv) {
            (true, Some(r)) if r.len() == n * len => Some(r),
            (true, _) => {
                return Err(invalid(format!(
                    "gather root needs a receive buffer of {} bytes",
                    n * len
                )))
            }
            (false, _) => None,
        };
        self.begin("gather")?;
        let place = self.place.clone();
        let root_host = place.host_of[root];
        let root_local = place.local_index[root];
        let on_root_host = self.host == root_host;
        let (local, host_blocks) = self.gather_host(send);
        // The root host's leader assembles everything in global rank order.
        let mut full = if self.is_leader() && on_root_host {
            vec![0u8; n * len]
        } else {
            Vec::new()
        };
        if !full.is_empty() {
            unpack_host(&place, self.host, &host_blocks, &mut full, len);
        }
        let outcome = self.among_leaders(local, |tcp| {
            let me = tcp.rank();
            if me == root_host {
                for h in (0..place.hosts.len()).filter(|&h| h != me) {
                    let mut packed = vec![0u8; place.hosts[h].len() * len];
                    tcp.p2p.recv(h, &mut packed)?;
                    unpack_host(&place, h, &packed, &mut full, len);
                }
                Ok(())
            } else {
                tcp.p2p.send(root_host, &host_blocks)
            }
        });
        let (leader, is_root) = (self.is_leader(), self.rank == root);
        let mut recv = recv;
        let result = self.release(outcome, |shm| {
            if !on_root_host || root_local == 0 {
                return Ok(());
            }
            // A non-leader root gets the assembled buffer from its leader.
            if leader {
                shm.broadcast(&mut full, 0)
            } else if let Some(recv) = recv.as_deref_mut() {
                shm.broadcast(recv, 0)
            } else {
                shm.broadcast(&mut vec![0u8; n * len], 0)
            }
        });
        result?;
        if is_root && leader {
            if let Some(recv) = recv {
                recv.copy_from_slice(&full);
            }
        }
        Ok(())
    }

    fn scatter(&mut self, send: Option<&[u8]>, recv: &mut [u8], root: usize) -> Result<()> {
        check_root(root, self.world_size)?;
        let (n, len) = (self.world_size, recv.len());
        let send = match (self.rank == root, send) {
            (true, Some(s)) if s.len() == n * len => Some(s),
            (true, _) => {
                return Err(invalid(format!(
                    "scatter root needs a send buffer of {} bytes",
                    n * len
                )))
            }
            (false, _) => None,
        };
        self.begin("scatter")?;
        let place = self.place.clone();
        let root_host = place.host_of[root];
        let root_local = place.local_index[root];
        let on_root_host = self.host == root_host;
        let leader = self.is_leader();
        // Phase 1: a non-leader root hands the whole buffer to its leader.
        let mut full: Vec<u8> = Vec::new();
        let local = if on_root_host && root_local != 0 {
            full = match send {
                Some(s) => s.to_vec(),
                None => vec![0u8; n * len],
            };
            self.local(|shm| shm.broadcast(&mut full, root_local))
        } else {
            Ok(())
        };
        let whole: &[u8] = match send {
            Some(s) if leader => s,
            _ => &full,
        };
        // Phase 2: the root host's leader sends each other leader its host's blocks.
        let mut host_blocks = if leader && !on_root_host {
            vec![0u8; self.local_size() * len]
        } else if leader {
            pack_host(&place, self.host, whole, len)
        } else {
            Vec::new()
        };
        let outcome = self.among_leaders(local, |tcp| {
            let me = tcp.rank();
            if me == root_host {
                for h in (0..place.hosts.len()).filter(|&h| h != me) {
                    tcp.p2p.send(h, &pack_host(&place, h, whole, len))?;
                }
                Ok(())
            } else {
                tcp.p2p.recv(root_host, &mut host_blocks)
            }
        });
        if self.local_size() == 1 {
            outcome.map_err(|failure| self.fail(*failure))?;
            recv.copy_from_slice(&host_blocks);
            return Ok(());
        }
        self.release(outcome, |shm| {
            shm.scatter(leader.then_some(&host_blocks[..]), recv, 0)
        })
    }

    fn all_gather(&mut self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        let (n, len) = (self.world_size, send.len());
        if recv.len() != n * len {
            return Err(invalid(format!(
                "all_gather needs a receive buffer of {} bytes, got {}",
                n * len,
                recv.len()
            )));
        }
        self.begin("all_gather")?;
        let place = self.place.clone();
        let (local, host_blocks) = self.gather_host(send);
        if self.is_leader() {
            unpack_host(&place, self.host, &host_blocks, recv, len);
        }
        let outcome = self.among_leaders(local, |tcp| {
            let (hosts, me) = (tcp.world_size(), tcp.rank());
            for d in 1..hosts {
                let (to, from) = ((me + d) % hosts, (me + hosts - d) % hosts);
                let mut packed = vec![0u8; place.hosts[from].len() * len];
                tcp.p2p.send_recv(to, &host_blocks, from, &mut packed)?;
                unpack_host(&place, from, &packed, recv, len);
            }
            Ok(())
        });
        self.release(outcome, |shm| shm.broadcast(recv, 0))
    }

    fn reduce_scatter(
        &mut self,
        send: &[u8],
        recv: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        check_reducible(recv.len(), dtype)?;
        let len = recv.len();
        if send.len() != len * self.world_size {
            return Err(invalid(format!(
                "reduce_scatter needs a send buffer of {} bytes, got {}",
                len * self.world_size,
                send.len()
            )));
        }
        let mut whole = send.to_vec();
        self.all_reduce_as("reduce_scatter", &mut whole, dtype, op)?;
        recv.copy_from_slice(&whole[self.rank * len..(self.rank + 1) * len]);
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        self.begin("barrier")?;
        let local = self.local(|shm| shm.barrier());
        let outcome = self.among_leaders(local, |_| Ok(()));
        self.release(outcome, |_| Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_where_each_rank_is() {
        let at = |host: &str, ip: &str, pid| PeerInfo {
            host_id: host.to_string(),
            pid,
            data_addr: format!("{ip}:7000").parse().expect("address"),
        };
        // Host a: ranks 0, 2; host b: ranks 1 (leader), 3. Seen from rank 2.
        let peers = [
            at("a", "10.0.0.1", 10),
            at("b", "10.0.0.2", 11),
            at("a", "10.0.0.1", 12),
            at("b", "10.0.0.2", 13),
        ];
        let located = peer_locations(&peers, 2);
        assert_eq!(located[0], PeerAt::ThisHost { pid: Some(10) });
        assert_eq!(located[1], PeerAt::Tcp(peers[1].data_addr));
        assert_eq!(located[3], PeerAt::Host(peers[3].data_addr.ip()));
        let report = Report::from_error(
            &Error::PeerDied {
                rank: 3,
                at: PeerAt::Unknown,
                what: "all_reduce".into(),
                detail: "process 13 no longer exists".into(),
            },
            1,
        );
        let seen_here = report.to_error().located(|r| located[r]);
        assert!(
            seen_here
                .to_string()
                .starts_with("rank 3 on host 10.0.0.2 died"),
            "{seen_here}"
        );
    }

    fn peer(host: &str, port: u16) -> PeerInfo {
        PeerInfo {
            host_id: host.to_string(),
            pid: 1,
            data_addr: format!("127.0.0.1:{port}").parse().expect("address"),
        }
    }

    #[test]
    fn hosts_are_grouped_in_rank_order_and_placement_inverts_them() {
        let peers: Vec<PeerInfo> = ["b", "a", "b", "c", "a", "a"]
            .iter()
            .enumerate()
            .map(|(r, h)| peer(h, 1000 + r as u16))
            .collect();
        let groups = host_groups(&peers);
        assert_eq!(groups, vec![vec![0, 2], vec![1, 4, 5], vec![3]]);
        let place = Placement::new(groups);
        assert_eq!(place.leaders(), vec![0, 1, 3]);
        assert_eq!(place.host_of, vec![0, 1, 0, 2, 1, 1]);
        assert_eq!(place.local_index, vec![0, 0, 1, 0, 1, 2]);
        assert!(place.is_mixed());
        assert!(!Placement::new(vec![vec![0], vec![1]]).is_mixed());
        assert!(!Placement::new(vec![vec![0, 1, 2]]).is_mixed());
    }

    #[test]
    fn host_blocks_pack_and_unpack_by_global_rank() {
        let place = Placement::new(vec![vec![0, 2], vec![1, 3]]);
        let full: Vec<u8> = (0..8).collect();
        let packed = pack_host(&place, 1, &full, 2);
        assert_eq!(packed, vec![2, 3, 6, 7]);
        let mut out = vec![0u8; 8];
        unpack_host(&place, 1, &packed, &mut out, 2);
        assert_eq!(out, vec![0, 0, 2, 3, 0, 0, 6, 7]);
    }

    #[test]
    fn status_records_round_trip_and_reject_garbage() {
        assert_eq!(decode_status(&encode_status(None)), Ok(None));
        let errors = [
            Error::PeerDied {
                rank: 3,
                at: PeerAt::Unknown,
                what: "all_reduce".into(),
                detail: "process 12 no longer exists".into(),
            },
            Error::Timeout {
                rank: 1,
                at: PeerAt::Unknown,
                what: "barrier".into(),
                waited: Duration::from_millis(1500),
            },
            Error::Protocol {
                rank: 2,
                detail: "bad frame".into(),
            },
            Error::Shm("segment vanished".into()),
        ];
        let culprits = [3, 1, 2, 5];
        for (e, culprit) in errors.iter().zip(culprits) {
            let report = Report::from_error(e, 5);
            let decoded = decode_status(&encode_status(Some(&report)));
            assert_eq!(decoded, Ok(Some(report.clone())));
            let named = match report.to_error() {
                Error::PeerDied { rank, .. }
                | Error::Timeout { rank, .. }
                | Error::Protocol { rank, .. } => rank,
                other => panic!("unexpected {other:?}"),
            };
            assert_eq!(named, culprit, "{e}");
        }
        assert_eq!(
            Report::from_error(&errors[0], 5).to_error().to_string(),
            "rank 3 died or disconnected during all_reduce: process 12 no longer exists \
             (seen by rank 5)"
        );
        // Text longer than the record is cut on a character boundary.
        let long = Report::from_error(
            &Error::PeerDied {
                rank: 0,
                at: PeerAt::Unknown,
                what: "é".repeat(400),
                detail: "ü".repeat(400),
            },
            1,
        );
        let decoded = decode_status(&encode_status(Some(&long)))
            .expect("valid")
            .expect("a failure");
        assert!(decoded.what.len() <= STATUS_BYTES / 2 && decoded.what.starts_with("éé"));
        assert!(decoded.detail.starts_with("üü") && !decoded.detail.contains('\u{fffd}'));
        let mut bad = encode_status(Some(&long));
        bad[0] = 7;
        assert!(decode_status(&bad).is_err());
        bad[0] = 1;
        bad[1] = 9;
        assert!(decode_status(&bad).is_err());
        bad[1] = 0;
        bad[26..30].copy_from_slice(&10_000u32.to_le_bytes());
        assert!(decode_status(&bad).is_err());
        assert!(decode_status(&bad[..10]).is_err());
    }

    #[test]
    fn errors_from_lower_layers_name_global_ranks() {
        let e = to_global(
            Error::PeerDied {
                rank: 1,
                at: PeerAt::Unknown,
                what: "broadcast".into(),
                detail: "gone".into(),
            },
            &[2, 5],
            &shm_scope("broadcast"),
        );
        let text = e.to_string();
        assert!(matches!(e, Error::PeerDied { rank: 5, .. }), "{text}");
        assert!(
            text.starts_with("rank 5 ") && text.contains("[2, 5]"),
            "{text}"
        );
        let e = to_global(
            Error::Timeout {
                rank: 0,
                at: PeerAt::Unknown,
                what: "x".into(),
                waited: Duration::from_secs(1),
            },
            &[4],
            &tcp_scope("all_reduce"),
        );
        assert!(matches!(e, Error::Timeout { rank: 4, .. }));
        let e = to_global(Error::InvalidArgument("y".into()), &[4], "x");
        assert!(matches!(e, Error::InvalidArgument(_)));
    }
}
