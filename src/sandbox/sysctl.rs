//! Pod sysctls: only namespaced ones are allowed (as Kubernetes defines them): the IPC ones
//! (`kernel.shm*`, `kernel.msg*`, `kernel.sem`, `fs.mqueue.*`) in a pod with its own IPC
//! namespace, and `net.*` in a pod with its own network namespace. They are written from a
//! thread that joined the pod's namespaces.

use std::path::PathBuf;

/// Which namespace a sysctl belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SysctlNamespace {
    Ipc,
    Net,
}

const IPC_SYSCTLS: &[&str] = &[
    "kernel.shmall",
    "kernel.shmmax",
    "kernel.shmmni",
    "kernel.shm_rmid_forced",
    "kernel.msgmax",
    "kernel.msgmnb",
    "kernel.msgmni",
    "kernel.sem",
];

/// A validated sysctl: its canonical dotted name, its `/proc/sys` path and value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sysctl {
    pub name: String,
    pub ns: SysctlNamespace,
    pub path: PathBuf,
    pub value: String,
}

/// Validates one sysctl of a pod config. `name` uses dots or (if it has any '/') slashes as
/// separators, as Kubernetes allows.
pub fn classify(name: &str, value: &str) -> Result<Sysctl, String> {
    let (dotted, rel) = if name.contains('/') {
        (name.replace('/', "."), name.to_string())
    } else {
        (name.to_string(), name.replace('.', "/"))
    };
    if name.is_empty()
        || rel
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        || name.contains('\0')
    {
        return Err(format!("invalid sysctl name {name:?}"));
    }
    if value.contains('\n') {
        return Err(format!("sysctl {name}: value must be one line"));
    }
    let ns = if IPC_SYSCTLS.contains(&dotted.as_str()) || dotted.starts_with("fs.mqueue.") {
        SysctlNamespace::Ipc
    } else if dotted.starts_with("net.") {
        SysctlNamespace::Net
    } else {
        return Err(format!(
            "sysctl {name} is not namespaced: a pod may only set net.*, kernel.shm*, kernel.msg*, kernel.sem and fs.mqueue.*"
        ));
    };
    Ok(Sysctl {
        name: dotted,
        ns,
        path: PathBuf::from("/proc/sys").join(rel),
        value: value.to_string(),
    })
}

/// Writes the sysctls; must run on a thread inside the pod's namespaces.
pub fn apply(sysctls: &[Sysctl]) -> Result<(), String> {
    for s in sysctls {
        std::fs::write(&s.path, s.value.as_bytes())
            .map_err(|e| format!("setting sysctl {}={}: {e}", s.name, s.value))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaced_sysctls_are_classified() {
        let s = classify("net.ipv4.ip_unprivileged_port_start", "0").expect("net");
        assert_eq!(s.ns, SysctlNamespace::Net);
        assert_eq!(
            s.path,
            PathBuf::from("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        );
        assert_eq!(
            classify("kernel.shm_rmid_forced", "1").expect("ipc").ns,
            SysctlNamespace::Ipc
        );
        assert_eq!(
            classify("fs.mqueue.msg_max", "20").expect("ipc").ns,
            SysctlNamespace::Ipc
        );
        let slashed = classify("net/ipv4/conf/eth0.1/forwarding", "1").expect("slashes");
        assert_eq!(
            slashed.path,
            PathBuf::from("/proc/sys/net/ipv4/conf/eth0.1/forwarding")
        );
    }

    #[test]
    fn others_are_refused() {
        assert!(classify("kernel.panic", "1").is_err());
        assert!(classify("vm.swappiness", "1").is_err());
        assert!(classify("net/../../etc/passwd", "x").is_err());
        assert!(classify("", "1").is_err());
        assert!(classify("net.ipv4.ip_forward", "1\n2").is_err());
    }
}
