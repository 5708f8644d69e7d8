//! Signals and exits in the monitor: SIGCHLD reaping (the monitor is the subreaper), the
//! exit record of each container (code, signal, time, OOM) once its output drained.

use super::io::close_output;
use super::*;

impl Monitor {
    pub(super) fn handle_signals(&mut self) {
        let mut term = false;
        while let Ok(Some(info)) = self.signals.read_signal() {
            if info.ssi_signo == Signal::SIGTERM as u32 || info.ssi_signo == Signal::SIGINT as u32 {
                term = true;
            }
        }
        if term && !self.shutting_down {
            self.shutting_down = true;
            self.diag("SIGTERM: exiting once no container process remains");
        }
        self.reap();
    }

    pub(super) fn reap(&mut self) {
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    self.diag(&format!("waitpid: {e}"));
                    return;
                }
                Ok(s) => s,
            };
            let Some(pid) = status.pid() else { continue };
            let pid = pid.as_raw();
            if !matches!(status, WaitStatus::Exited(..) | WaitStatus::Signaled(..)) {
                continue;
            }
            let now = unix_nanos();
            if let Some(k) = self.creates.iter().position(|p| p.runtime_pid == pid) {
                let p = self.creates.remove(k);
                self.complete_create(p, status);
            } else if let Some(c) = self
                .containers
                .iter_mut()
                .find(|c| c.pid == pid && c.reaped.is_none() && c.exited.is_none())
            {
                c.reaped = Some((status, now, Instant::now() + DRAIN_TIMEOUT));
            } else {
                if self.orphan_exits.len() >= MAX_ORPHAN_EXITS {
                    self.orphan_exits.pop_front();
                }
                self.orphan_exits.push_back((pid, status, now));
            }
        }
    }

    /// Records the exit of every reaped container whose output is drained (or whose drain
    /// deadline passed).
    pub(super) fn finish_exits(&mut self) {
        let now = Instant::now();
        for k in 0..self.containers.len() {
            let c = &mut self.containers[k];
            let Some((status, finished_at, deadline)) = c.reaped else {
                continue;
            };
            if c.exited.is_some() || (!c.outputs.is_empty() && now < deadline) {
                continue;
            }
            for mut o in std::mem::take(&mut c.outputs) {
                close_output(&mut o, &mut c.log);
            }
            c.stdin = None;
            let (exit_code, signal) = match status {
                WaitStatus::Exited(_, code) => (code, None),
                WaitStatus::Signaled(_, sig, _) => (128 + sig as i32, Some(sig as i32)),
                _ => (255, None),
            };
            let info = ExitInfo {
                exit_code,
                signal,
                finished_at,
                oom_killed: c.oom_files.iter().any(|f| oom_killed(f)),
            };
            c.exited = Some(info);
            let r = serde_json::to_vec(&info)
                .map_err(std::io::Error::other)
                .and_then(|json| write_atomic(&c.exit_file, &json));
            let msg = match r {
                Ok(()) => format!("container {} exited: {info:?}", c.id),
                Err(e) => format!(
                    "container {} exited: {info:?}; writing {}: {e}",
                    c.id,
                    c.exit_file.display()
                ),
            };
            self.diag(&msg);
        }
    }

    // ---- create ----
}

/// The parent pid of a process, from `/proc/PID/stat`.
pub(super) fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start after the last ')'.
    stat.get(stat.rfind(')')? + 2..)?
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}

/// `oom_kill N` with N > 0 in a cgroup file (v1 `memory.oom_control`, v2 `memory.events`).
pub(super) fn oom_killed(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|text| {
        text.lines().any(|l| {
            l.strip_prefix("oom_kill ")
                .and_then(|n| n.trim().parse::<u64>().ok())
                .is_some_and(|n| n > 0)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_pid() {
        assert_eq!(
            parent_of(std::process::id() as i32),
            Some(nix::unistd::getppid().as_raw())
        );
        assert_eq!(parent_of(i32::MAX), None);
    }

    #[test]
    fn oom_counter() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = dir.path().join("memory.oom_control");
        std::fs::write(&v1, "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n").unwrap();
        assert!(!oom_killed(&v1));
        std::fs::write(&v1, "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n").unwrap();
        assert!(oom_killed(&v1));
        let v2 = dir.path().join("memory.events");
        std::fs::write(
            &v2,
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n",
        )
        .unwrap();
        assert!(oom_killed(&v2));
        assert!(!oom_killed(&dir.path().join("missing")));
    }
}
