//! Rank 0's address under Slurm, from the job's own variables.
//!
//! Slurm starts tasks without a rendezvous address, so a job script usually computes
//! `MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -1)`. dtrain does the
//! same without `scontrol` (absent on compute nodes of some sites): the first host of the
//! compressed node list, and a port derived from the job id as PyTorch Lightning does
//! (15000 + the id's last four digits), so two jobs sharing a node do not collide.

/// Lightning's base for the job-id port.
const PORT_BASE: u16 = 15000;

/// The first host of a Slurm hostlist expression such as `node[01-04,07]`, `a1,b2` or
/// `rack[1-2]-gpu[001-008]` (zero padding kept: `node[01-04]` → `node01`).
pub fn first_host(nodelist: &str) -> Result<String, String> {
    let list = nodelist.trim();
    let first =
        first_top_level_item(list).ok_or_else(|| format!("node list {nodelist:?} is empty"))?;
    let mut host = String::new();
    let mut rest = first;
    while let Some(open) = rest.find('[') {
        host.push_str(&rest[..open]);
        let close = rest[open..]
            .find(']')
            .map(|c| open + c)
            .ok_or_else(|| format!("node list {nodelist:?}: '[' without ']'"))?;
        host.push_str(first_of_range_set(&rest[open + 1..close], nodelist)?);
        rest = &rest[close + 1..];
    }
    if rest.contains(']') {
        return Err(format!("node list {nodelist:?}: ']' without '['"));
    }
    host.push_str(rest);
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == ',') {
        return Err(format!("node list {nodelist:?}: malformed host {host:?}"));
    }
    Ok(host)
}

/// The text before the first comma that is not inside brackets (`None` if that is empty).
fn first_top_level_item(list: &str) -> Option<&str> {
    let mut depth = 0usize;
    let end = list
        .char_indices()
        .find(|&(_, c)| {
            match c {
                '[' => depth += 1,
                ']' => depth = depth.saturating_sub(1),
                _ => {}
            }
            c == ',' && depth == 0
        })
        .map_or(list.len(), |(i, _)| i);
    let item = list[..end].trim();
    (!item.is_empty()).then_some(item)
}

/// The first number of a bracket body like `01-04,07`, after checking the whole body.
fn first_of_range_set<'a>(body: &'a str, nodelist: &str) -> Result<&'a str, String> {
    let bad = || format!("node list {nodelist:?}: [{body}] is not a list of numbers and ranges");
    let mut first = None;
    for item in body.split(',') {
        let (lo, hi) = item.split_once('-').unwrap_or((item, item));
        let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !numeric(lo) || !numeric(hi) {
            return Err(bad());
        }
        // Both fit in u128 for any node list Slurm can write; longer digit runs are garbage.
        match (lo.parse::<u128>(), hi.parse::<u128>()) {
            (Ok(a), Ok(b)) if a <= b => {}
            _ => return Err(bad()),
        }
        first.get_or_insert(lo);
    }
    first.ok_or_else(bad)
}

/// The rendezvous port for Slurm job `job_id`: 15000 + its last four digits.
pub fn port_for_job(job_id: &str) -> Result<u16, String> {
    let id = job_id.trim();
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("SLURM_JOB_ID={job_id:?} is not a job number"));
    }
    let tail = &id[id.len().saturating_sub(4)..];
    let n: u16 = tail
        .parse()
        .map_err(|_| format!("SLURM_JOB_ID={job_id:?}"))?;
    Ok(PORT_BASE + n)
}

/// Rank 0's host and port from a Slurm job's environment: `SLURM_JOB_NODELIST` (or the older
/// `SLURM_NODELIST`) and `SLURM_JOB_ID`. `Ok(None)` outside a Slurm allocation.
pub fn master_from_env(
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<(String, Option<u16>)>, String> {
    let Some(list) = env("SLURM_JOB_NODELIST").or_else(|| env("SLURM_NODELIST")) else {
        return Ok(None);
    };
    let host = first_host(&list).map_err(|e| format!("SLURM_JOB_NODELIST: {e}"))?;
    let port = env("SLURM_JOB_ID")
        .map(|id| port_for_job(&id))
        .transpose()?;
    Ok(Some((host, port)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_host_of_every_nodelist_form() {
        for (list, host) in [
            ("node01", "node01"),
            ("node[01-04,07]", "node01"),
            ("node[07,01-04]", "node07"),
            ("node[001-004]", "node001"),
            ("a1,b2", "a1"),
            ("gpu[3-4],cpu[1-9]", "gpu3"),
            ("rack[1-2]-node[01-03]", "rack1-node01"),
            ("10.0.0.5", "10.0.0.5"),
            ("  host-a  ", "host-a"),
            ("n[5]", "n5"),
            ("[1-3]x", "1x"),
        ] {
            assert_eq!(first_host(list).as_deref(), Ok(host), "{list}");
        }
    }

    #[test]
    fn malformed_nodelists_are_named() {
        for list in [
            "",
            " ",
            ",node1",
            "node[01-04",
            "node]1",
            "node[]",
            "node[a-b]",
            "node[4-1]",
            "node[1-]",
            "node[1,,2]",
            "node[1-2]x]",
        ] {
            let err = first_host(list).expect_err(list);
            assert!(err.contains("node list"), "{list}: {err}");
        }
    }

    #[test]
    fn the_port_follows_the_job_id_as_lightning_does() {
        assert_eq!(port_for_job("123"), Ok(15123));
        assert_eq!(port_for_job("4567890"), Ok(22890));
        assert_eq!(port_for_job("10000"), Ok(15000));
        assert_eq!(port_for_job("9999"), Ok(24999));
        assert!(port_for_job("12_3").is_err());
        assert!(port_for_job("").is_err());
    }

    #[test]
    fn master_from_env_reads_the_job_variables() {
        let env = |k: &str| match k {
            "SLURM_JOB_NODELIST" => Some("cn[12-13]".to_string()),
            "SLURM_JOB_ID" => Some("77".to_string()),
            _ => None,
        };
        assert_eq!(
            master_from_env(&env),
            Ok(Some(("cn12".to_string(), Some(15077))))
        );
        let old = |k: &str| (k == "SLURM_NODELIST").then(|| "x[2-3]".to_string());
        assert_eq!(master_from_env(&old), Ok(Some(("x2".to_string(), None))));
        assert_eq!(master_from_env(&|_| None), Ok(None));
        let bad = |k: &str| (k == "SLURM_JOB_NODELIST").then(|| "x[".to_string());
        assert!(master_from_env(&bad)
            .unwrap_err()
            .contains("SLURM_JOB_NODELIST"));
    }
}
