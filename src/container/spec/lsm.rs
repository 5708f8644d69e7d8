//! Linux security modules for a container: its AppArmor profile (`apparmor`, or the
//! deprecated `apparmor_profile` string) and SELinux options. Where the host lacks the module
//! the request is ignored and that is logged once, as containerd and CRI-O do; where the host
//! has it, berth applies what it can and refuses what it cannot.

use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::cri::v1 as cri;

use super::SpecError;

/// The AppArmor profile berth uses for `RuntimeDefault` when an operator has loaded it.
pub const DEFAULT_APPARMOR_PROFILE: &str = "berth-default";

static APPARMOR_IGNORED: AtomicBool = AtomicBool::new(false);
static APPARMOR_NO_DEFAULT: AtomicBool = AtomicBool::new(false);
static SELINUX_IGNORED: AtomicBool = AtomicBool::new(false);

/// Whether the host enforces AppArmor (probed once).
pub fn apparmor_enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| {
        std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
            .is_ok_and(|s| s.trim() == "Y")
            && Path::new("/sys/kernel/security/apparmor").is_dir()
    })
}

/// Whether the host has SELinux enabled (probed once).
pub fn selinux_enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| Path::new("/sys/fs/selinux/enforce").exists())
}

fn loaded_apparmor_profiles() -> Vec<String> {
    std::fs::read_to_string("/sys/kernel/security/apparmor/profiles")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit_once(" (").map(|(name, _)| name.to_string()))
        .collect()
}

/// What a container asked of AppArmor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppArmor {
    /// Nothing said, or `runtime/default`.
    RuntimeDefault,
    Unconfined,
    Localhost(String),
}

/// The container's AppArmor request (`apparmor` wins over the deprecated string).
#[allow(deprecated)] // `apparmor_profile`: older kubelets still send it.
pub fn apparmor_request(sc: &cri::LinuxContainerSecurityContext) -> Result<AppArmor, SpecError> {
    if let Some(p) = &sc.apparmor {
        return match cri::security_profile::ProfileType::try_from(p.profile_type) {
            Ok(cri::security_profile::ProfileType::RuntimeDefault) => Ok(AppArmor::RuntimeDefault),
            Ok(cri::security_profile::ProfileType::Unconfined) => Ok(AppArmor::Unconfined),
            Ok(cri::security_profile::ProfileType::Localhost) => {
                let name = p.localhost_ref.trim_start_matches("localhost/");
                if name.is_empty() {
                    return Err(SpecError::Invalid(
                        "apparmor profile type Localhost needs a localhost_ref".to_string(),
                    ));
                }
                Ok(AppArmor::Localhost(name.to_string()))
            }
            Err(_) => Err(SpecError::Invalid(format!(
                "unknown apparmor profile type {}",
                p.profile_type
            ))),
        };
    }
    match sc.apparmor_profile.as_str() {
        "" | "runtime/default" => Ok(AppArmor::RuntimeDefault),
        "unconfined" => Ok(AppArmor::Unconfined),
        s => match s.strip_prefix("localhost/") {
            Some(name) if !name.is_empty() => Ok(AppArmor::Localhost(name.to_string())),
            _ => Err(SpecError::Invalid(format!(
                "invalid apparmor_profile {s:?} (runtime/default, unconfined or localhost/<name>)"
            ))),
        },
    }
}

/// The `process.apparmorProfile` of a container, for a host with AppArmor `enabled` and
/// `loaded` profiles.
pub fn apparmor_profile_with(
    request: AppArmor,
    privileged: bool,
    enabled: bool,
    loaded: &dyn Fn() -> Vec<String>,
) -> Result<Option<String>, SpecError> {
    if privileged || request == AppArmor::Unconfined {
        return Ok(None);
    }
    if !enabled {
        if request != AppArmor::RuntimeDefault && !APPARMOR_IGNORED.swap(true, Ordering::Relaxed) {
            tracing::info!(
                "AppArmor is not enabled on this host: AppArmor profiles are ignored (logged once)"
            );
        }
        return Ok(None);
    }
    match request {
        AppArmor::Localhost(name) => {
            if !loaded().contains(&name) {
                return Err(SpecError::Invalid(format!(
                    "apparmor profile {name:?} is not loaded on this host"
                )));
            }
            Ok(Some(name))
        }
        AppArmor::RuntimeDefault => {
            if loaded().iter().any(|p| p == DEFAULT_APPARMOR_PROFILE) {
                return Ok(Some(DEFAULT_APPARMOR_PROFILE.to_string()));
            }
            if !APPARMOR_NO_DEFAULT.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    profile = DEFAULT_APPARMOR_PROFILE,
                    "no default AppArmor profile is loaded: containers asking for the runtime default run without one (logged once)"
                );
            }
            Ok(None)
        }
        AppArmor::Unconfined => Ok(None),
    }
}

/// The `process.apparmorProfile` of a container on this host.
pub fn apparmor_profile(
    sc: &cri::LinuxContainerSecurityContext,
    privileged: bool,
) -> Result<Option<String>, SpecError> {
    apparmor_profile_with(
        apparmor_request(sc)?,
        privileged,
        apparmor_enabled(),
        &loaded_apparmor_profiles,
    )
}

/// SELinux options: ignored (logged once) where SELinux is off; refused where it is on,
/// since berth does not label processes and files.
pub fn check_selinux_with(
    options: Option<&cri::SeLinuxOption>,
    enabled: bool,
    what: &str,
) -> Result<(), String> {
    let Some(o) = options.filter(|o| **o != cri::SeLinuxOption::default()) else {
        return Ok(());
    };
    if enabled {
        return Err(format!(
            "{what} selinux_options {}:{}:{}:{}: berth does not apply SELinux labels, and this host enforces SELinux",
            o.user, o.role, o.r#type, o.level
        ));
    }
    if !SELINUX_IGNORED.swap(true, Ordering::Relaxed) {
        tracing::info!(
            "SELinux is not enabled on this host: selinux_options are ignored (logged once)"
        );
    }
    Ok(())
}

/// [`check_selinux_with`] on this host.
pub fn check_selinux(options: Option<&cri::SeLinuxOption>, what: &str) -> Result<(), String> {
    check_selinux_with(options, selinux_enabled(), what)
}

/// User namespaces (`userns_options` mode POD) need idmapped mounts, which the OCI runtime
/// here (runc 1.1) cannot make; `Status` says so (`user_namespaces = false`).
pub fn check_userns(opts: Option<&cri::NamespaceOption>, what: &str) -> Result<(), String> {
    let mode = opts
        .and_then(|o| o.userns_options.as_ref())
        .map(|u| u.mode)
        .unwrap_or(cri::NamespaceMode::Node as i32);
    if mode == cri::NamespaceMode::Node as i32 {
        return Ok(());
    }
    Err(format!(
        "{what} asks for a user namespace (userns_options mode {}): berth does not support user namespaces here (they need idmapped mounts, which the OCI runtime cannot make)",
        cri::NamespaceMode::try_from(mode)
            .map(|m| m.as_str_name().to_string())
            .unwrap_or_else(|_| mode.to_string())
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(t: cri::security_profile::ProfileType, r: &str) -> Option<cri::SecurityProfile> {
        Some(cri::SecurityProfile {
            profile_type: t as i32,
            localhost_ref: r.into(),
        })
    }

    #[test]
    #[allow(deprecated)]
    fn apparmor_requests() {
        use cri::security_profile::ProfileType as T;
        let mut sc = cri::LinuxContainerSecurityContext::default();
        assert_eq!(apparmor_request(&sc).expect("ok"), AppArmor::RuntimeDefault);
        sc.apparmor_profile = "localhost/p1".into();
        assert_eq!(
            apparmor_request(&sc).expect("ok"),
            AppArmor::Localhost("p1".into())
        );
        sc.apparmor_profile = "bogus".into();
        assert!(apparmor_request(&sc).is_err());
        sc.apparmor = profile(T::Unconfined, "");
        assert_eq!(apparmor_request(&sc).expect("ok"), AppArmor::Unconfined);
        sc.apparmor = profile(T::Localhost, "localhost/p2");
        assert_eq!(
            apparmor_request(&sc).expect("ok"),
            AppArmor::Localhost("p2".into())
        );
        sc.apparmor = profile(T::Localhost, "");
        assert!(apparmor_request(&sc).is_err());
    }

    #[test]
    fn apparmor_on_and_off_hosts() {
        let loaded = || vec!["p1".to_string(), DEFAULT_APPARMOR_PROFILE.to_string()];
        let none = Vec::new;
        let local = AppArmor::Localhost("p1".into());
        // Off: ignored.
        assert_eq!(
            apparmor_profile_with(local.clone(), false, false, &loaded).expect("ok"),
            None
        );
        // On: applied, or refused when not loaded.
        assert_eq!(
            apparmor_profile_with(local.clone(), false, true, &loaded)
                .expect("ok")
                .as_deref(),
            Some("p1")
        );
        assert!(apparmor_profile_with(local.clone(), false, true, &none).is_err());
        assert_eq!(
            apparmor_profile_with(local, true, true, &none).expect("ok"),
            None
        );
        assert_eq!(
            apparmor_profile_with(AppArmor::RuntimeDefault, false, true, &loaded)
                .expect("ok")
                .as_deref(),
            Some(DEFAULT_APPARMOR_PROFILE)
        );
        assert_eq!(
            apparmor_profile_with(AppArmor::RuntimeDefault, false, true, &none).expect("ok"),
            None
        );
    }

    #[test]
    fn selinux_and_userns() {
        let o = cri::SeLinuxOption {
            level: "s0:c1,c2".into(),
            ..Default::default()
        };
        assert!(check_selinux_with(Some(&o), false, "container").is_ok());
        let e = check_selinux_with(Some(&o), true, "container").expect_err("enforcing");
        assert!(e.to_string().contains("selinux_options"), "{e}");
        assert!(check_selinux_with(Some(&cri::SeLinuxOption::default()), true, "x").is_ok());
        assert!(check_userns(None, "pod").is_ok());
        let pod = cri::NamespaceOption {
            userns_options: Some(cri::UserNamespace {
                mode: cri::NamespaceMode::Pod as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        let e = check_userns(Some(&pod), "pod").expect_err("userns");
        assert!(e.to_string().contains("userns_options mode POD"), "{e}");
    }
}
