//! Seccomp for containers: which profile a CRI security context asks for, berth's built-in
//! `RuntimeDefault` profile, and `Localhost` profiles read from the node.
//!
//! The default profile is an allowlist in the spirit of Docker's and containerd's: every
//! other system call fails with `EPERM`. Calls that need a capability (`mount`, `unshare`,
//! `setns`, `ptrace`, `reboot`, module loading, clock setting…) are allowed only when the
//! container holds that capability; `clone` may not create namespaces without
//! `CAP_SYS_ADMIN`, and `clone3` (whose flags seccomp cannot inspect) answers `ENOSYS` so
//! libcs fall back to `clone`. Keyring calls (`keyctl`, `add_key`, `request_key`),
//! `kexec_load`, `userfaultfd`, `io_uring_*` and the like are never allowed.
//!
//! Localhost profiles may be in the OCI `LinuxSeccomp` form or in Docker's profile format
//! (`archMap`, `name`, and `includes`/`excludes` on capabilities, architectures and kernel
//! versions), which is evaluated for the container's capabilities here.

use std::path::{Path, PathBuf};

use crate::cri::v1 as cri;
use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompArgBuilder,
    LinuxSeccompFilterFlag, LinuxSeccompOperator, LinuxSyscall,
};
use serde::Deserialize;

/// Errors choosing or reading a seccomp profile.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp profile {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("seccomp profile {path} is not a valid profile: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("seccomp: {0}")]
    Invalid(String),
}

/// The profile a container asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Profile {
    Unconfined,
    RuntimeDefault,
    /// An absolute path on the node.
    Localhost(PathBuf),
}

const LOCALHOST_PREFIX: &str = "localhost/";

/// The profile of a security context: the `seccomp` field, else the deprecated
/// `seccomp_profile_path` (`runtime/default`, `docker/default`, `unconfined`,
/// `localhost/<path>`; empty means unconfined).
pub fn select(sc: &cri::LinuxContainerSecurityContext) -> Result<Profile, SeccompError> {
    if let Some(sp) = &sc.seccomp {
        let kind = cri::security_profile::ProfileType::try_from(sp.profile_type).map_err(|_| {
            SeccompError::Invalid(format!("unknown profile type {}", sp.profile_type))
        })?;
        return match kind {
            cri::security_profile::ProfileType::Localhost => localhost(&sp.localhost_ref),
            _ if !sp.localhost_ref.is_empty() => Err(SeccompError::Invalid(
                "localhost_ref must only be set for a Localhost profile".to_string(),
            )),
            cri::security_profile::ProfileType::RuntimeDefault => Ok(Profile::RuntimeDefault),
            cri::security_profile::ProfileType::Unconfined => Ok(Profile::Unconfined),
        };
    }
    #[allow(deprecated)]
    let path = sc.seccomp_profile_path.as_str();
    match path {
        "" | "unconfined" => Ok(Profile::Unconfined),
        "runtime/default" | "docker/default" => Ok(Profile::RuntimeDefault),
        p if p.starts_with(LOCALHOST_PREFIX) => localhost(p),
        p => Err(SeccompError::Invalid(format!(
            "unknown seccomp profile {p:?}"
        ))),
    }
}

fn localhost(reference: &str) -> Result<Profile, SeccompError> {
    let path = reference
        .strip_prefix(LOCALHOST_PREFIX)
        .unwrap_or(reference);
    if path.is_empty() || !Path::new(path).is_absolute() {
        return Err(SeccompError::Invalid(format!(
            "a Localhost profile needs an absolute path, got {reference:?}"
        )));
    }
    Ok(Profile::Localhost(PathBuf::from(path)))
}

/// The OCI seccomp config of a profile for a container holding `caps` (`CAP_*` names);
/// `None` for unconfined.
pub fn resolve(profile: &Profile, caps: &[String]) -> Result<Option<LinuxSeccomp>, SeccompError> {
    match profile {
        Profile::Unconfined => Ok(None),
        Profile::RuntimeDefault => Ok(Some(default_profile(caps))),
        Profile::Localhost(path) => load_profile(path, caps).map(Some),
    }
}

/// Reads and evaluates a profile file.
pub fn load_profile(path: &Path, caps: &[String]) -> Result<LinuxSeccomp, SeccompError> {
    let data = std::fs::read(path).map_err(|source| SeccompError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_profile(&data, caps).map_err(|message| SeccompError::Parse {
        path: path.to_path_buf(),
        message,
    })
}

/// A profile file: the OCI `LinuxSeccomp` fields plus Docker's extensions.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProfileFile {
    default_action: LinuxSeccompAction,
    #[serde(default)]
    default_errno_ret: Option<u32>,
    #[serde(default)]
    architectures: Option<Vec<Arch>>,
    #[serde(default)]
    arch_map: Option<Vec<ArchMapEntry>>,
    #[serde(default)]
    flags: Option<Vec<LinuxSeccompFilterFlag>>,
    #[serde(default)]
    listener_path: Option<PathBuf>,
    #[serde(default)]
    listener_metadata: Option<String>,
    #[serde(default)]
    syscalls: Option<Vec<SyscallRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ArchMapEntry {
    architecture: Arch,
    #[serde(default)]
    sub_architectures: Option<Vec<Arch>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SyscallRule {
    #[serde(default)]
    names: Option<Vec<String>>,
    #[serde(default)]
    name: Option<String>,
    action: LinuxSeccompAction,
    #[serde(default)]
    errno_ret: Option<u32>,
    #[serde(default)]
    args: Option<Vec<LinuxSeccompArg>>,
    #[serde(default)]
    includes: Option<Filter>,
    #[serde(default)]
    excludes: Option<Filter>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Filter {
    #[serde(default)]
    caps: Option<Vec<String>>,
    #[serde(default)]
    arches: Option<Vec<String>>,
    #[serde(default)]
    min_kernel: Option<String>,
}

/// Parses a profile (OCI or Docker format) and evaluates it for `caps`.
pub fn parse_profile(data: &[u8], caps: &[String]) -> Result<LinuxSeccomp, String> {
    let file: ProfileFile = serde_json::from_slice(data).map_err(|e| e.to_string())?;
    let architectures = match (file.architectures, file.arch_map) {
        (Some(a), Some(m)) if !a.is_empty() && !m.is_empty() => {
            return Err("both architectures and archMap are set".to_string());
        }
        (Some(a), _) if !a.is_empty() => Some(a),
        (_, Some(map)) => {
            let native = native_arches();
            let mut out = Vec::new();
            for entry in map {
                if native.first() == Some(&entry.architecture) {
                    out.push(entry.architecture);
                    out.extend(entry.sub_architectures.unwrap_or_default());
                }
            }
            (!out.is_empty()).then_some(out)
        }
        _ => None,
    };
    let kernel = kernel_version();
    let mut syscalls = Vec::new();
    for rule in file.syscalls.unwrap_or_default() {
        let names = match (rule.names, rule.name) {
            (Some(n), _) if !n.is_empty() => n,
            (_, Some(n)) if !n.is_empty() => vec![n],
            _ => return Err("a syscall rule has no names".to_string()),
        };
        let include = rule.includes.unwrap_or_default();
        let exclude = rule.excludes.unwrap_or_default();
        if !filter_matches(&include, caps, kernel)? || excluded(&exclude, caps, kernel)? {
            continue;
        }
        let mut s = LinuxSyscall::default();
        s.set_names(names)
            .set_action(rule.action)
            .set_errno_ret(rule.errno_ret)
            .set_args(rule.args.filter(|a| !a.is_empty()));
        syscalls.push(s);
    }
    let mut out = LinuxSeccomp::default();
    out.set_default_action(file.default_action)
        .set_default_errno_ret(file.default_errno_ret)
        .set_architectures(architectures)
        .set_flags(file.flags.filter(|f| !f.is_empty()))
        .set_listener_path(file.listener_path)
        .set_listener_metadata(file.listener_metadata)
        .set_syscalls((!syscalls.is_empty()).then_some(syscalls));
    Ok(out)
}

/// Whether an `includes` filter holds (every condition given must hold).
fn filter_matches(f: &Filter, caps: &[String], kernel: Option<(u32, u32)>) -> Result<bool, String> {
    if let Some(want) = &f.caps
        && !want.iter().all(|c| has_cap(caps, c))
    {
        return Ok(false);
    }
    if let Some(arches) = &f.arches
        && !arches.is_empty()
        && !arches.iter().any(|a| is_native_arch_name(a))
    {
        return Ok(false);
    }
    if let Some(min) = &f.min_kernel {
        let min = parse_kernel(min).ok_or_else(|| format!("bad minKernel {min:?}"))?;
        if kernel.is_some_and(|k| k < min) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether an `excludes` filter rules the syscall out (any condition given that holds).
fn excluded(f: &Filter, caps: &[String], kernel: Option<(u32, u32)>) -> Result<bool, String> {
    if let Some(c) = &f.caps
        && c.iter().any(|c| has_cap(caps, c))
    {
        return Ok(true);
    }
    if let Some(arches) = &f.arches
        && arches.iter().any(|a| is_native_arch_name(a))
    {
        return Ok(true);
    }
    if let Some(min) = &f.min_kernel {
        let min = parse_kernel(min).ok_or_else(|| format!("bad minKernel {min:?}"))?;
        if kernel.is_some_and(|k| k >= min) {
            return Ok(true);
        }
    }
    Ok(false)
}

fn has_cap(caps: &[String], want: &str) -> bool {
    let want = want.trim().to_ascii_uppercase();
    let want = want.strip_prefix("CAP_").unwrap_or(&want);
    caps.iter().any(|c| {
        let c = c.to_ascii_uppercase();
        c.strip_prefix("CAP_").unwrap_or(&c) == want
    })
}

fn parse_kernel(s: &str) -> Option<(u32, u32)> {
    let mut parts = s.trim().split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts
        .next()
        .map(|m| {
            m.chars()
                .take_while(|c| c.is_ascii_digit())
                .collect::<String>()
        })
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    Some((major, minor))
}

fn kernel_version() -> Option<(u32, u32)> {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .and_then(|s| parse_kernel(&s))
}

/// The seccomp architectures a filter for this host covers (the native one first).
pub fn native_arches() -> Vec<Arch> {
    if cfg!(target_arch = "x86_64") {
        vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32]
    } else if cfg!(target_arch = "aarch64") {
        vec![Arch::ScmpArchAarch64, Arch::ScmpArchArm]
    } else if cfg!(target_arch = "x86") {
        vec![Arch::ScmpArchX86]
    } else if cfg!(target_arch = "arm") {
        vec![Arch::ScmpArchArm]
    } else if cfg!(target_arch = "s390x") {
        vec![Arch::ScmpArchS390x, Arch::ScmpArchS390]
    } else if cfg!(target_arch = "powerpc64") {
        vec![Arch::ScmpArchPpc64le]
    } else if cfg!(target_arch = "riscv64") {
        vec![Arch::ScmpArchRiscv64]
    } else if cfg!(target_arch = "loongarch64") {
        vec![Arch::ScmpArchLoongarch64]
    } else {
        Vec::new()
    }
}

/// Whether an architecture name of a Docker profile (`amd64`, `x86_64`, `arm64`…) is this
/// host's.
fn is_native_arch_name(name: &str) -> bool {
    let names: &[&str] = if cfg!(target_arch = "x86_64") {
        &["amd64", "x86_64", "SCMP_ARCH_X86_64"]
    } else if cfg!(target_arch = "aarch64") {
        &["arm64", "aarch64", "SCMP_ARCH_AARCH64"]
    } else if cfg!(target_arch = "x86") {
        &["386", "x86", "SCMP_ARCH_X86"]
    } else if cfg!(target_arch = "arm") {
        &["arm", "SCMP_ARCH_ARM"]
    } else if cfg!(target_arch = "s390x") {
        &["s390x", "SCMP_ARCH_S390X"]
    } else if cfg!(target_arch = "powerpc64") {
        &["ppc64le", "SCMP_ARCH_PPC64LE"]
    } else if cfg!(target_arch = "riscv64") {
        &["riscv64", "SCMP_ARCH_RISCV64"]
    } else {
        &[]
    };
    names.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// `EPERM`: what a call outside the allowlist returns.
pub const DEFAULT_ERRNO: u32 = libc::EPERM as u32;

/// The namespace flags `clone` may not carry without `CAP_SYS_ADMIN`.
const CLONE_NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u64;

/// System calls every container may make.
const ALLOWED: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "alarm",
    "bind",
    "brk",
    "cachestat",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "chown32",
    "clock_getres",
    "clock_getres_time64",
    "clock_gettime",
    "clock_gettime64",
    "clock_nanosleep",
    "clock_nanosleep_time64",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fadvise64_64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchown32",
    "fchownat",
    "fcntl",
    "fcntl64",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstat64",
    "fstatat64",
    "fstatfs",
    "fstatfs64",
    "fsync",
    "ftruncate",
    "ftruncate64",
    "futex",
    "futex_requeue",
    "futex_time64",
    "futex_wait",
    "futex_waitv",
    "futex_wake",
    "futimesat",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "getegid32",
    "geteuid",
    "geteuid32",
    "getgid",
    "getgid32",
    "getgroups",
    "getgroups32",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresgid32",
    "getresuid",
    "getresuid32",
    "getrlimit",
    "get_robust_list",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "get_thread_area",
    "gettid",
    "gettimeofday",
    "getuid",
    "getuid32",
    "getxattr",
    "getxattrat",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "ioctl",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_pgetevents_time64",
    "ioprio_get",
    "ioprio_set",
    "io_setup",
    "io_submit",
    "ipc",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lchown32",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listxattr",
    "listxattrat",
    "llistxattr",
    "_llseek",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "lstat64",
    "madvise",
    "map_shadow_stack",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mmap2",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedreceive_time64",
    "mq_timedsend",
    "mq_timedsend_time64",
    "mq_unlink",
    "mremap",
    "mseal",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "nanosleep",
    "newfstatat",
    "_newselect",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "ppoll_time64",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "pselect6",
    "pselect6_time64",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recv",
    "recvfrom",
    "recvmmsg",
    "recvmmsg_time64",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "removexattrat",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_rr_get_interval_time64",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "semtimedop_time64",
    "send",
    "sendfile",
    "sendfile64",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setfsgid",
    "setfsgid32",
    "setfsuid",
    "setfsuid32",
    "setgid",
    "setgid32",
    "setgroups",
    "setgroups32",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setregid32",
    "setresgid",
    "setresgid32",
    "setresuid",
    "setresuid32",
    "setreuid",
    "setreuid32",
    "setrlimit",
    "set_robust_list",
    "setsid",
    "setsockopt",
    "set_thread_area",
    "set_tid_address",
    "setuid",
    "setuid32",
    "setxattr",
    "setxattrat",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "sigprocmask",
    "sigreturn",
    "socket",
    "socketcall",
    "socketpair",
    "splice",
    "stat",
    "stat64",
    "statfs",
    "statfs64",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_gettime64",
    "timer_settime",
    "timer_settime64",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_gettime64",
    "timerfd_settime",
    "timerfd_settime64",
    "times",
    "tkill",
    "truncate",
    "truncate64",
    "ugetrlimit",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "utime",
    "utimensat",
    "utimensat_time64",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "waitpid",
    "write",
    "writev",
];

/// System calls allowed only to holders of a capability.
const BY_CAPABILITY: &[(&str, &[&str])] = &[
    ("CAP_DAC_READ_SEARCH", &["open_by_handle_at"]),
    (
        "CAP_SYS_ADMIN",
        &[
            "bpf",
            "clone",
            "clone3",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "mount",
            "mount_setattr",
            "move_mount",
            "name_to_handle_at",
            "open_tree",
            "perf_event_open",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "syslog",
            "umount",
            "umount2",
            "unshare",
        ],
    ),
    ("CAP_SYS_BOOT", &["reboot"]),
    ("CAP_SYS_CHROOT", &["chroot"]),
    (
        "CAP_SYS_MODULE",
        &["delete_module", "init_module", "finit_module"],
    ),
    ("CAP_SYS_PACCT", &["acct"]),
    (
        "CAP_SYS_PTRACE",
        &[
            "kcmp",
            "pidfd_getfd",
            "process_madvise",
            "process_vm_readv",
            "process_vm_writev",
            "ptrace",
        ],
    ),
    ("CAP_SYS_RAWIO", &["iopl", "ioperm"]),
    (
        "CAP_SYS_TIME",
        &[
            "settimeofday",
            "stime",
            "clock_settime",
            "clock_settime64",
            "adjtimex",
            "clock_adjtime",
            "clock_adjtime64",
        ],
    ),
    ("CAP_SYS_TTY_CONFIG", &["vhangup"]),
    (
        "CAP_SYS_NICE",
        &[
            "get_mempolicy",
            "mbind",
            "set_mempolicy",
            "set_mempolicy_home_node",
        ],
    ),
    ("CAP_SYSLOG", &["syslog"]),
    ("CAP_BPF", &["bpf"]),
    ("CAP_PERFMON", &["perf_event_open"]),
];

/// Architecture-specific calls of this host.
fn arch_allowed() -> &'static [&'static str] {
    if cfg!(target_arch = "x86_64") {
        &["arch_prctl", "modify_ldt"]
    } else if cfg!(target_arch = "x86") {
        &["modify_ldt"]
    } else if cfg!(any(target_arch = "aarch64", target_arch = "arm")) {
        &[
            "arm_fadvise64_64",
            "arm_sync_file_range",
            "sync_file_range2",
            "breakpoint",
            "cacheflush",
            "set_tls",
        ]
    } else if cfg!(target_arch = "s390x") {
        &[
            "s390_pci_mmio_read",
            "s390_pci_mmio_write",
            "s390_runtime_instr",
        ]
    } else {
        &[]
    }
}

fn rule(names: &[&str], action: LinuxSeccompAction) -> LinuxSyscall {
    let mut s = LinuxSyscall::default();
    s.set_names(names.iter().map(|n| n.to_string()).collect())
        .set_action(action);
    s
}

fn arg(index: usize, value: u64, op: LinuxSeccompOperator) -> LinuxSeccompArg {
    // The builder has a default for every field: building cannot fail.
    LinuxSeccompArgBuilder::default()
        .index(index)
        .value(value)
        .op(op)
        .build()
        .expect("a seccomp argument with every field set")
}

/// berth's `RuntimeDefault` profile for a container holding `caps` (`CAP_*` names).
pub fn default_profile(caps: &[String]) -> LinuxSeccomp {
    let allow = LinuxSeccompAction::ScmpActAllow;
    let mut syscalls = vec![rule(ALLOWED, allow)];
    let arch = arch_allowed();
    if !arch.is_empty() {
        syscalls.push(rule(arch, allow));
    }
    // personality(2): only the harmless personas (Linux, 32-bit, UNAME26 and queries).
    for persona in [0x0u64, 0x0008, 0x20000, 0x20008, 0xffff_ffff] {
        let mut s = rule(&["personality"], allow);
        s.set_args(Some(vec![arg(0, persona, LinuxSeccompOperator::ScmpCmpEq)]));
        syscalls.push(s);
    }
    for (cap, names) in BY_CAPABILITY {
        if has_cap(caps, cap) {
            syscalls.push(rule(names, allow));
        }
    }
    if !has_cap(caps, "CAP_SYS_ADMIN") {
        // clone without namespace flags (the flags are argument 1 on s390).
        let index = if cfg!(target_arch = "s390x") { 1 } else { 0 };
        let mut s = rule(&["clone"], allow);
        s.set_args(Some(vec![arg(
            index,
            CLONE_NAMESPACE_FLAGS,
            LinuxSeccompOperator::ScmpCmpMaskedEq,
        )]));
        syscalls.push(s);
        // clone3 hides its flags in memory: make libcs fall back to clone.
        let mut s = rule(&["clone3"], LinuxSeccompAction::ScmpActErrno);
        s.set_errno_ret(Some(libc::ENOSYS as u32));
        syscalls.push(s);
    }
    let arches = native_arches();
    let mut out = LinuxSeccomp::default();
    out.set_default_action(LinuxSeccompAction::ScmpActErrno)
        .set_default_errno_ret(Some(DEFAULT_ERRNO))
        .set_architectures((!arches.is_empty()).then_some(arches))
        .set_syscalls(Some(syscalls));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    /// The action a profile takes for a call made with no arguments considered.
    fn unconditional_action(p: &LinuxSeccomp, name: &str) -> LinuxSeccompAction {
        p.syscalls()
            .as_ref()
            .and_then(|s| {
                s.iter()
                    .find(|r| r.names().iter().any(|n| n == name) && r.args().is_none())
            })
            .map(|r| r.action())
            .unwrap_or(p.default_action())
    }

    #[test]
    fn default_profile_allows_the_basics_and_blocks_the_dangerous() {
        let p = default_profile(&caps(&["CAP_CHOWN", "CAP_KILL", "CAP_SYS_CHROOT"]));
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(p.default_errno_ret(), Some(1));
        for ok in [
            "read",
            "write",
            "execve",
            "openat",
            "mmap",
            "futex",
            "epoll_wait",
            "socket",
            "accept4",
            "wait4",
            "rt_sigaction",
            "getdents64",
            "chroot",
            "exit_group",
        ] {
            assert_eq!(
                unconditional_action(&p, ok),
                LinuxSeccompAction::ScmpActAllow,
                "{ok}"
            );
        }
        for blocked in [
            "unshare",
            "mount",
            "umount2",
            "reboot",
            "kexec_load",
            "keyctl",
            "add_key",
            "request_key",
            "ptrace",
            "setns",
            "init_module",
            "bpf",
            "clock_settime",
            "open_by_handle_at",
            "userfaultfd",
            "syslog",
        ] {
            assert_eq!(
                unconditional_action(&p, blocked),
                LinuxSeccompAction::ScmpActErrno,
                "{blocked}"
            );
        }
        // clone only without namespace flags; clone3 → ENOSYS.
        let rules = p.syscalls().as_ref().expect("syscalls");
        let clone = rules
            .iter()
            .find(|r| r.names() == &vec!["clone".to_string()])
            .expect("clone rule");
        let a = clone.args().as_ref().expect("clone args")[0];
        assert_eq!(a.op(), LinuxSeccompOperator::ScmpCmpMaskedEq);
        assert_eq!(a.value(), 2_114_060_288);
        let clone3 = rules
            .iter()
            .find(|r| r.names() == &vec!["clone3".to_string()])
            .expect("clone3 rule");
        assert_eq!(clone3.errno_ret(), Some(libc::ENOSYS as u32));
        if cfg!(target_arch = "x86_64") {
            assert_eq!(
                p.architectures().as_deref(),
                Some(&[Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32][..])
            );
            assert_eq!(
                unconditional_action(&p, "arch_prctl"),
                LinuxSeccompAction::ScmpActAllow
            );
        }
    }

    #[test]
    fn capabilities_open_their_calls() {
        let p = default_profile(&caps(&["CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_SYS_BOOT"]));
        for name in [
            "mount", "unshare", "setns", "clone", "clone3", "ptrace", "reboot",
        ] {
            assert_eq!(
                unconditional_action(&p, name),
                LinuxSeccompAction::ScmpActAllow,
                "{name}"
            );
        }
        let rules = p.syscalls().as_ref().expect("syscalls");
        assert!(
            !rules
                .iter()
                .any(|r| r.action() == LinuxSeccompAction::ScmpActErrno)
        );
        assert_eq!(
            unconditional_action(&p, "kexec_load"),
            LinuxSeccompAction::ScmpActErrno
        );
    }

    #[test]
    fn default_profile_serializes_like_oci() {
        let p = default_profile(&[]);
        let v = serde_json::to_value(&p).expect("json");
        assert_eq!(v["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(v["defaultErrnoRet"], 1);
        assert_eq!(v["syscalls"][0]["action"], "SCMP_ACT_ALLOW");
    }

    #[test]
    fn selects_profiles() {
        let mut sc = cri::LinuxContainerSecurityContext::default();
        assert_eq!(select(&sc).expect("none"), Profile::Unconfined);
        #[allow(deprecated)]
        {
            sc.seccomp_profile_path = "runtime/default".to_string();
            assert_eq!(select(&sc).expect("rd"), Profile::RuntimeDefault);
            sc.seccomp_profile_path = "docker/default".to_string();
            assert_eq!(select(&sc).expect("dd"), Profile::RuntimeDefault);
            sc.seccomp_profile_path = "localhost//etc/p.json".to_string();
            assert_eq!(
                select(&sc).expect("lh"),
                Profile::Localhost(PathBuf::from("/etc/p.json"))
            );
            sc.seccomp_profile_path = "localhost/relative.json".to_string();
            assert!(select(&sc).is_err());
            sc.seccomp_profile_path = "bogus".to_string();
            assert!(select(&sc).is_err());
        }
        // The field wins over the deprecated string.
        sc.seccomp = Some(cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::Unconfined as i32,
            localhost_ref: String::new(),
        });
        assert_eq!(select(&sc).expect("unconfined"), Profile::Unconfined);
        sc.seccomp = Some(cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::Localhost as i32,
            localhost_ref: "/var/lib/kubelet/seccomp/x.json".to_string(),
        });
        assert_eq!(
            select(&sc).expect("localhost"),
            Profile::Localhost(PathBuf::from("/var/lib/kubelet/seccomp/x.json"))
        );
        sc.seccomp = Some(cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
            localhost_ref: "/x".to_string(),
        });
        assert!(select(&sc).is_err());
    }

    #[test]
    fn parses_oci_and_docker_profiles() {
        let oci = br#"{
            "defaultAction": "SCMP_ACT_ERRNO",
            "defaultErrnoRet": 38,
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [
                {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]}
            ]
        }"#;
        let p = parse_profile(oci, &[]).expect("oci");
        assert_eq!(p.default_errno_ret(), Some(38));
        let rules = p.syscalls().as_ref().expect("syscalls");
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[1].args().as_ref().expect("args")[0].value(), 8);

        let docker = br#"{
            "defaultAction": "SCMP_ACT_ERRNO",
            "archMap": [
                {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86"]},
                {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]}
            ],
            "syscalls": [
                {"names": ["read"], "action": "SCMP_ACT_ALLOW", "args": [], "comment": "",
                 "includes": {}, "excludes": {}},
                {"name": "write", "action": "SCMP_ACT_ALLOW"},
                {"names": ["mount"], "action": "SCMP_ACT_ALLOW",
                 "includes": {"caps": ["CAP_SYS_ADMIN"]}},
                {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                 "excludes": {"caps": ["CAP_SYS_ADMIN"]}},
                {"names": ["ptrace"], "action": "SCMP_ACT_ALLOW",
                 "includes": {"minKernel": "4.8"}},
                {"names": ["future_call"], "action": "SCMP_ACT_ALLOW",
                 "includes": {"minKernel": "999.0"}}
            ]
        }"#;
        let names = |p: &LinuxSeccomp| -> Vec<String> {
            p.syscalls()
                .as_ref()
                .map(|s| s.iter().flat_map(|r| r.names().clone()).collect())
                .unwrap_or_default()
        };
        let p = parse_profile(docker, &caps(&["CAP_CHOWN"])).expect("docker");
        assert_eq!(names(&p), vec!["read", "write", "clone", "ptrace"]);
        assert!(p.syscalls().as_ref().expect("s")[0].args().is_none());
        if cfg!(target_arch = "x86_64") {
            assert_eq!(
                p.architectures().as_deref(),
                Some(&[Arch::ScmpArchX86_64, Arch::ScmpArchX86][..])
            );
        }
        let p = parse_profile(docker, &caps(&["CAP_SYS_ADMIN"])).expect("docker admin");
        assert_eq!(names(&p), vec!["read", "write", "mount", "ptrace"]);

        assert!(parse_profile(b"{}", &[]).is_err());
        assert!(parse_profile(b"not json", &[]).is_err());
        assert!(
            parse_profile(
                br#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"action":"SCMP_ACT_ERRNO"}]}"#,
                &[]
            )
            .is_err()
        );
    }

    #[test]
    fn localhost_profiles_are_read_from_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("profile.json");
        std::fs::write(
            &path,
            r#"{"defaultAction":"SCMP_ACT_LOG","syscalls":[{"names":["getpid"],"action":"SCMP_ACT_ALLOW"}]}"#,
        )
        .expect("write");
        let p = resolve(&Profile::Localhost(path.clone()), &[])
            .expect("load")
            .expect("some");
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActLog);

        let missing = dir.path().join("missing.json");
        let err = resolve(&Profile::Localhost(missing.clone()), &[]).expect_err("missing");
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );
        std::fs::write(&path, "{").expect("write");
        let err = load_profile(&path, &[]).expect_err("invalid");
        assert!(matches!(err, SeccompError::Parse { .. }));
        assert!(err.to_string().contains("profile.json"), "{err}");
        assert_eq!(resolve(&Profile::Unconfined, &[]).expect("none"), None);
    }
}
