//! What `bench` reads of a process in `/proc`: its CPU time (the generator's own, in
//! `run`'s report; a broker's, in `compare`) and its resident memory.

/// User and system CPU seconds of `/proc/{pid}/stat` (`pid` = `self` for this process):
/// fields 14 and 15, in clock ticks (USER_HZ, 100 on Linux). `None` where there is no such
/// process (or no `/proc`).
pub(super) fn cpu_seconds(pid: &str) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: the fields after it start
    // after the last `)`, state (field 3) first, so utime and stime are at 11 and 12.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let mut ticks = || -> Option<f64> { Some(fields.next()?.parse::<u64>().ok()? as f64 / 100.0) };
    Some((ticks()?, ticks()?))
}

/// Resident memory of `pid` in bytes (`VmRSS` of `/proc/{pid}/status`).
pub(super) fn rss_bytes(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    Some(
        kb.trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .ok()?
            * 1024,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_and_memory() {
        let (user, system) = cpu_seconds("self").unwrap();
        assert!(user >= 0.0 && system >= 0.0);
        assert!(rss_bytes("self").unwrap() > 1_000_000);
        assert_eq!(cpu_seconds("0"), None, "no process 0 in /proc");
    }
}
