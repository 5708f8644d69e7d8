//! Stop signals: the names images give (`SIGTERM`, `TERM`, `15`, `SIGRTMIN+3`), the CRI's
//! `Signal` enum, and the effective stop signal of a container: the config's
//! (`ContainerConfig.stop_signal`), else the image's `StopSignal`, else SIGTERM.

use crate::cri::v1 as cri;

/// Linux's first real-time signal as programs see it (glibc keeps 32 and 33).
const SIGRTMIN: i32 = 34;
/// Linux's last real-time signal.
const SIGRTMAX: i32 = 64;

/// A signal name or number as images give it; `None` if it is no signal.
pub fn parse(s: &str) -> Option<i32> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i32>() {
        return (1..=SIGRTMAX).contains(&n).then_some(n);
    }
    let up = s.to_ascii_uppercase();
    let name = up.strip_prefix("SIG").unwrap_or(&up);
    let rt = |base: i32, rest: &str, sign: i32| -> Option<i32> {
        let n = if rest.is_empty() {
            0
        } else {
            rest.parse::<i32>().ok()?
        };
        let v = base + sign * n;
        (SIGRTMIN..=SIGRTMAX).contains(&v).then_some(v)
    };
    // RTMIN counts up (`RTMIN+3`), RTMAX down (`RTMAX-2`); no other sign.
    if let Some(rest) = name.strip_prefix("RTMIN") {
        return match rest.strip_prefix('+') {
            Some(n) => rt(SIGRTMIN, n, 1),
            None if rest.is_empty() => Some(SIGRTMIN),
            None => None,
        };
    }
    if let Some(rest) = name.strip_prefix("RTMAX") {
        return match rest.strip_prefix('-') {
            Some(n) => rt(SIGRTMAX, n, -1),
            None if rest.is_empty() => Some(SIGRTMAX),
            None => None,
        };
    }
    // Old names Linux keeps as aliases.
    let name = match name {
        "CLD" => "CHLD",
        "IOT" => "ABRT",
        "POLL" => "IO",
        n => n,
    };
    format!("SIG{name}")
        .parse::<nix::sys::signal::Signal>()
        .ok()
        .map(|s| s as i32)
}

/// The signal number of a CRI `Signal`; `None` for `RUNTIME_DEFAULT`.
pub fn from_cri(sig: cri::Signal) -> Option<i32> {
    if sig == cri::Signal::RuntimeDefault {
        return None;
    }
    let name = sig.as_str_name();
    if let Some(n) = name.strip_prefix("SIGRTMINPLUS") {
        return n.parse::<i32>().ok().map(|n| SIGRTMIN + n);
    }
    if let Some(n) = name.strip_prefix("SIGRTMAXMINUS") {
        return n.parse::<i32>().ok().map(|n| SIGRTMAX - n);
    }
    parse(name)
}

/// The CRI `Signal` of a signal number (`RUNTIME_DEFAULT` if the enum has no name for it).
pub fn to_cri(n: i32) -> cri::Signal {
    let name = match n {
        SIGRTMIN => "SIGRTMIN".to_string(),
        SIGRTMAX => "SIGRTMAX".to_string(),
        n if (SIGRTMIN + 1..=SIGRTMIN + 15).contains(&n) => format!("SIGRTMINPLUS{}", n - SIGRTMIN),
        n if (SIGRTMAX - 14..SIGRTMAX).contains(&n) => format!("SIGRTMAXMINUS{}", SIGRTMAX - n),
        n => match nix::sys::signal::Signal::try_from(n) {
            Ok(s) => s.as_str().to_string(),
            Err(_) => return cri::Signal::RuntimeDefault,
        },
    };
    cri::Signal::from_str_name(&name).unwrap_or(cri::Signal::RuntimeDefault)
}

/// The signal that stops a container: the config's, else the image's `StopSignal` (from the
/// stored image config JSON), else SIGTERM. An unknown config value is an error naming it; an
/// image signal that is no signal is logged and SIGTERM used.
pub fn effective(
    config: &cri::ContainerConfig,
    image_config: &serde_json::Value,
) -> Result<i32, String> {
    let requested = cri::Signal::try_from(config.stop_signal)
        .map_err(|_| format!("unknown stop_signal {}", config.stop_signal))?;
    if let Some(n) = from_cri(requested) {
        return Ok(n);
    }
    match image_config
        .pointer("/config/StopSignal")
        .and_then(|v| v.as_str())
        .filter(|s| !s.trim().is_empty())
    {
        Some(s) => Ok(parse(s).unwrap_or_else(|| {
            // The image's mistake should not keep its containers from running (containerd
            // only trips over it at stop): SIGTERM, said in the log.
            tracing::warn!(
                stop_signal = s,
                "the image's StopSignal is no signal; using SIGTERM"
            );
            libc::SIGTERM
        })),
        None => Ok(libc::SIGTERM),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse() {
        assert_eq!(parse("SIGTERM"), Some(15));
        assert_eq!(parse("term"), Some(15));
        assert_eq!(parse("SIGQUIT"), Some(3));
        assert_eq!(parse("9"), Some(9));
        assert_eq!(parse("SIGRTMIN+3"), Some(37));
        assert_eq!(parse("RTMAX-1"), Some(63));
        assert_eq!(parse("SIGRTMIN"), Some(34));
        assert_eq!(parse("SIGNOPE"), None);
        assert_eq!(parse("SIGRTMAX+1"), None);
        assert_eq!(parse("RTMIN-1"), None);
        assert_eq!(parse("SIGRTMAX"), Some(64));
        assert_eq!(parse("0"), None);
        assert_eq!(parse("65"), None);
    }

    #[test]
    fn every_cri_signal_round_trips() {
        for v in 1..=65 {
            let sig = cri::Signal::try_from(v).expect("enum value");
            let n = from_cri(sig).unwrap_or_else(|| panic!("{sig:?} has a number"));
            // SIGCLD, SIGIOT and SIGPOLL are aliases: they come back under the main name.
            let back = to_cri(n);
            assert_eq!(from_cri(back), Some(n), "{sig:?}");
        }
        assert_eq!(from_cri(cri::Signal::RuntimeDefault), None);
        assert_eq!(to_cri(15), cri::Signal::Sigterm);
        assert_eq!(to_cri(37), cri::Signal::Sigrtminplus3);
        assert_eq!(to_cri(0), cri::Signal::RuntimeDefault);
    }

    #[test]
    fn config_over_image_over_sigterm() {
        let image = serde_json::json!({"config": {"StopSignal": "SIGQUIT"}});
        let mut c = cri::ContainerConfig::default();
        assert_eq!(effective(&c, &image), Ok(3));
        assert_eq!(effective(&c, &serde_json::json!({})), Ok(15));
        c.stop_signal = cri::Signal::Sigusr1 as i32;
        assert_eq!(effective(&c, &image), Ok(10));
        c.stop_signal = 999;
        assert!(effective(&c, &image).is_err());
        let c = cri::ContainerConfig::default();
        let bad = serde_json::json!({"config": {"StopSignal": "SIGBOGUS"}});
        assert_eq!(effective(&c, &bad), Ok(15));
    }
}
